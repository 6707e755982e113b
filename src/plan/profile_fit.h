// Fitted device profiles (issue 20): measured rows (shape, blocks, policy, devices, time, memory)
// from a CSV table, the cost model's prediction of each row, and a least-squares fit of a
// profile's free parameters (per-class rate scales, link bandwidth and latency, a per-module
// overhead) on the rows' relative time error. docs/planner.md, "Fitted profiles".
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "foldcube/config.h"
#include "foldcube/model.h"
#include "foldcube/planner.h"
#include "foldcube/status.h"

namespace fc {

// One measured row. Header (exact): s,r,blocks,train,policy,devices,dap,dtype,time_ms,peak_mb,
// activation_mb, optionally followed by ,threads or ,threads,stack or
// ,threads,stack,chunk_launches or ,threads,stack,chunk_launches,ckpt_chunk. Empty cells are
// unknown: policy (training: the planner chooses per block), dap (the planner chooses DAP x DP
// over the devices), dtype (the profile's), the measurements, threads (the profile's), stack
// (evoformer), chunk_launches and ckpt_chunk (0). MB are MiB (2^20 bytes).
struct FitRow {
  int line = 0;  // 1-based line in the table
  int64_t s = 0, r = 0, blocks = 0;
  bool train = false;
  std::optional<Recompute> policy;
  // A mix of policies (cell e.g. none:38+block:10, counts summing to blocks; training rows with
  // a DAP degree): the blocks' policies in that order. Exclusive with `policy`.
  std::vector<std::pair<Recompute, int64_t>> policy_counts;
  int devices = 1;
  int dap = 0;  // 0 = unknown
  std::optional<DType> dtype;
  std::optional<double> time_ms, peak_mb, activation_mb;
  int threads = 0;         // threads per process; 0 = unknown (the profile's)
  bool extra_msa = false;  // the ExtraMSA stack (AF2's c_e = 64, C = 8 unless the config says)
  // Kernel launches per block of the chunk loops of the code that ran (on one device, beyond the
  // module passes' own; e.g. the seeds' chunked inference): each costs module_overhead_us /
  // module_kernels of the profile; under DAP every rank runs 1/dap of them.
  double chunk_launches = 0;
  // Training: sequences per chunk of the MSA row attention of the code that ran, each chunk a
  // checkpoint taking the whole q, k, v, gate and pair bias (the seeds' ExtraMSA stack: 4; 0: not
  // chunked so). Each chunk's backward returns zero-filled gradients of those whole tensors, added
  // into the running ones: ckpt_chunk_grad_bytes per block, at the profile's stream rate.
  int64_t ckpt_chunk = 0;
};

// policy: none|module|block (the seeds' small|large also). Strict parser: the exact header, 11
// cells per line, integers in range (s, r <= 2^20, blocks
// <= 1024, devices, dap <= 4096), finite non-negative measurements below 1e12; blank lines and
// lines starting with '#' are skipped. Errors are one line naming name:line.
Status parse_fit_table(const std::string& text, const std::string& name, std::vector<FitRow>* out);
Status read_fit_table(const std::string& path, std::vector<FitRow>* out);

// Bytes per buffer element of a row in `dtype` on `dev`: a device that keeps every buffer in
// half precision (element_bytes 2) keeps them in 4 bytes for an fp32 row (the seeds' T1044
// inference ran in float32 on their fp16 GPUs); otherwise the profile's element_bytes.
int row_element_bytes(const DeviceProfile& dev, DType dtype);

// The plan a row stands for: its given choices, the planner's for the unknown ones (make_plan
// on `dev` with the row's devices, under dev.memory_bytes, or without a limit when 0); training
// plans with a given policy and DAP degree use the whole-axis chunk target ("no chunking").
Status resolve_row_plan(const EvoformerConfig& cfg, const DeviceProfile& dev, const FitRow& row,
                        Plan* out);

struct RowPrediction {
  double time_ms = 0, peak_mb = 0, activation_mb = 0;
  std::string plan;  // e.g. "dap 2, dp 1, 48 x block, target 512 MiB"
};
// The estimates of `plan` (its choices kept) on `dev` with the row's device count, plus the row's
// chunk launches (blocks x chunk_launches / dap x module_overhead_us / module_kernels; an error
// when the row has some and the profile no module_kernels).
Status predict_row(const DeviceProfile& dev, const FitRow& row, const Plan& plan,
                   RowPrediction* out);

// Bytes one block of `plan` moves for the gradients of a row attention checkpointed in chunks of
// `chunk` sequences (FitRow::ckpt_chunk), per rank (a DAP rank holds s / dap sequences): n =
// ceil(s / chunk) chunks each write zero-filled gradients of the whole q, k, v, gate [s, r, H, C]
// and bias [H, r, r], and n - 1 of them add theirs into the running sums (read 2, write 1).
double ckpt_chunk_grad_bytes(const Plan& plan, int64_t chunk);

// The free parameters. Rate classes are scales of the start profile's rates (scalar and the
// calibrated tables' columns): gemm (forward projections, narrow products), gemm_bwd, batched,
// attention, attention_bwd, mem (forward passes, streams), mem_bwd; link_gbps, link_latency_us
// and module_overhead_us are values (a zero start value starts at 100 GB/s, 10 us, 10 us), fitted
// in log space like the scales; attention_len_exp (rate ~ L^x) is fitted as is, clamped to [-4, 4].
const std::vector<std::string>& fit_parameter_names();

struct FitOptions {
  std::vector<std::string> params;  // empty: all of fit_parameter_names()
  // Weight of the prior rows w * (log p - log p_start): keeps parameters the rows do not
  // determine near the start profile (0: none; parameters with no effect are frozen anyway).
  double prior_weight = 0;
  int max_iterations = 200;
  // Start profiles at other thread counts (each calibrated at its count): a row with `threads`
  // T != the start's uses the one with threads == T, with the same fitted parameters applied
  // (the rates come from each count's calibration, the fit's corrections are shared).
  std::vector<DeviceProfile> thread_profiles;
};

struct FitParameter {
  std::string name;
  double start = 0, value = 0;  // scale (rate classes) or value (link, overhead)
  bool determined = true;       // false: no row's time depends on it (left at the start)
};

struct FitResult {
  DeviceProfile profile;  // the start profile with the fitted parameters applied
  std::vector<DeviceProfile> thread_profiles;  // FitOptions::thread_profiles, fitted likewise
  std::vector<FitParameter> params;
  std::vector<Plan> plans;  // the plan of every row (resolved on the fitted profile)
  std::vector<RowPrediction> predictions;
  double rms_relative = 0;  // over the rows with a time
  int iterations = 0;
};

// Levenberg-Marquardt on the log-parameters with a central-difference Jacobian: minimises
// sum over rows with a time of ((predicted - measured) / measured)^2 (+ the prior rows). The
// rows' plans are resolved on the start profile and kept fixed during a fit (a smooth
// objective); when the fitted profile resolves a row differently, the fit is redone from there
// (at most 3 rounds).
Status fit_profile(const EvoformerConfig& cfg, const DeviceProfile& start,
                   const std::vector<FitRow>& fit_rows, const FitOptions& opts, FitResult* out);

// The profile of a row: `main` unless the row's thread count is another's (one of `others`
// with that `threads`); an error naming the row when none has it.
Status row_profile(const DeviceProfile& main, const std::vector<DeviceProfile>& others,
                   const FitRow& row, DeviceProfile* out);

// The start profile with parameter values applied (names of fit_parameter_names(), or the tied
// scales `compute` and `memory`).
Status apply_fit_parameters(const DeviceProfile& start, const std::vector<FitParameter>& params,
                            DeviceProfile* out);

// Markdown table: one line per row with its plan, measured and predicted time, memory and the
// relative errors; then the count of rows with a time within 15 % (issue 20's target), on one
// device and on more.
std::string fit_report(const std::vector<FitRow>& rows, const std::vector<RowPrediction>& pred);

}  // namespace fc
