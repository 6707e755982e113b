// Automatic schedule planner (issue 6): a Plan is a serialisable value (per-block recompute
// policy, chunking, DAP/DP degrees, dtype, estimates); a cost model turns it into time from
// per-kernel-class rates of a DeviceProfile (calibrated on this machine or read from JSON) and
// into memory from the exact analytic model (include/foldcube/plan.h); the search minimises the
// estimated time per protein under a memory limit. docs/planner.md has the formulas.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "foldcube/config.h"
#include "foldcube/model.h"
#include "foldcube/partition.h"
#include "foldcube/status.h"
#include "foldcube/tensor.h"

namespace fc {

// ---- Device profiles ---------------------------------------------------------------------------
// Rates per kernel class (GFLOP/s, or GB/s of bytes read + written) for one device. A calibrated
// profile holds measured rates; a user profile may give peak_gflops / peak_mem_gbps instead and
// the rates are derived with the efficiencies below (docs/planner.md).
struct DeviceProfile {
  std::string name;
  bool calibrated = false;    // measured by calibrate_profile on this machine
  int devices = 1;            // devices (MPI ranks) available
  int threads = 1;            // threads per device the rates were measured with
  int64_t memory_bytes = 0;   // per device; 0 = unknown (then a request must give a limit)
  DType dtype = DType::F32;   // precision the rates refer to: F32 | BF16 | F16 (JSON "fp32"...)
  double gemm_gflops = 0;     // large projections, M -> infinity
  double gemm_half_rows = 0;  // rows at which a projection runs at half of gemm_gflops
  // Calibrated projection rates by row count: (rows, forward GFLOP/s, backward GFLOP/s), rows
  // ascending, interpolated in log rows; empty (user profiles): the gemm_* / *_half_rows fit.
  std::vector<std::array<double, 3>> gemm_by_rows;
  double gemm_half_cols = 0;  // narrow side (columns) at which a product runs at half rate
  // The training triangle multiplication's channel-group projections as the model runs them
  // (src/layers/triangle_multiplication.cc): (outputs n = 4 x group, forward GFLOP/s, backward
  // GFLOP/s) at the block shapes it uses, n ascending; empty (user profiles): gemm rates x n / (n +
  // gemm_half_cols).
  std::vector<std::array<double, 3>> narrow_gemm;
  double gemm_bwd_gflops = 0;     // linear backward (dX = dY W, dW = dY^T X), M -> infinity
  double gemm_bwd_half_rows = 0;  // rows at half of gemm_bwd_gflops (absent in JSON: the forward's)
  double batched_gflops = 0;      // batched r x r x r products (triangle mult.), OPM outer product
  // Calibrated batched products of M x M outputs over K = 256 (16 per call, as the triangle
  // multiplication's channel group): (M, GFLOP/s of P = A B^T, GFLOP/s of A^T B), M ascending.
  // A DAP shard's triangle products are [r_loc, r_loc] blocks (one per rank's part), slower than
  // the one-process [r, r] ones; empty (user profiles): batched_gflops at every size.
  std::vector<std::array<double, 3>> batched_by_rows;
  double attention_gflops = 0;      // fused attention forward at 256 keys, C = 32
  double attention_bwd_gflops = 0;  // fused attention backward at 256 keys
  double attention_len_exp = 0;     // rate(L) = rate(256) * (L / 256)^exp, L clamped to [32, 4096]
  // Per score element (B * H * Lq * Lk) of an attention, the work that does not grow with the head
  // width C: the fused kernel's exp, scaling and masking, in G scores/s, forward and backward
  // (calibrated from the kernel at C = 32 and at the global attention's form, 8 queries of C = 8;
  // 0: not separate, the FLOP rate covers it).
  double attention_score_gps = 0, attention_bwd_score_gps = 0;
  // An unfused attention (QK^T, bias adds, softmax and PV as separate kernels, as PyTorch runs
  // OpenFold's): elements moved through memory per score element, forward and backward, at the
  // memory-bound rates (0: a fused kernel). docs/planner.md counts 8 and 8 for OpenFold's.
  double attention_score_passes = 0, attention_bwd_score_passes = 0;
  // Of an unfused attention with a pair bias, the further passes of the bias add over the scores
  // it is added to, forward and backward (the seeds' code: 2 and 1, docs/planner.md); 0 when
  // attention_score_passes already counts them.
  double attention_bias_score_passes = 0, attention_bias_bwd_score_passes = 0;
  double mem_gbps = 0;      // memory-bound kernels (LayerNorm, elementwise, transposes)
  double mem_bwd_gbps = 0;  // their backward (LayerNorm backward; 0 or absent: mem_gbps)
  // Memory-bound passes by working set (LayerNorm forward and backward with in + out = bytes):
  // (bytes, forward GB/s, backward GB/s), bytes ascending, calibrated; a module's passes run at
  // the rate of its chunk working set (min(chunk target, its whole-axis buffers)). Empty (user
  // profiles): mem_gbps / mem_bwd_gbps at every size.
  std::vector<std::array<double, 3>> mem_by_size;
  // Sweeps over buffers far larger than the caches (e.g. LN_in(z) re-read by every channel group
  // of the training triangle multiplication); 0 or absent: mem_gbps.
  double stream_gbps = 0;
  double link_gbps = 0;        // collective bandwidth per device (bytes sent + received)
  double link_latency_us = 0;  // per collective call
  // This machine's collectives measured under mpirun (calibrate_link, src/exec/plan_runner.cc):
  // (ranks, GB/s of bytes sent + received, latency us per call), ranks ascending; the time of an
  // all-to-all and an all-gather of a DAP block's message sizes, MPI's copies into and out of the
  // shared segment included. profile_for_ranks takes the row of its rank count as the link; empty
  // or no such row: link_gbps (or stream_gbps / 2).
  std::vector<std::array<double, 3>> link_by_ranks;
  // The core share profile_for_ranks applied (ranks x threads > cores: every rate x core_share);
  // 0: none. Kept in JSON so a profile written after the sharing is not shared again.
  double core_share = 0;
  // Device memory traffic of each DAP collective of the software the profile describes, at the
  // stream rate (stream_gbps, else mem_gbps): elements moved (read + write) per element of an
  // all-to-all's per-rank shard, and per element of an all-gather's (or reduce-scatter's) whole
  // tensor. The seeds' nnScaler + PyTorch collectives: 3 and 4 (docs/planner.md, "The seeds'
  // collectives"); 0 (default): none beyond the link (foldcube's own executor's copies are
  // dap_copy_estimate's).
  double collective_a2a_copies = 0, collective_gather_copies = 0;
  // Which DAP form the software runs, for the link volume: "engine" (foldcube's executor,
  // dap_block_comm) or "pasdap" (the seeds' nnScaler PASDAP, pasdap_block_comm).
  std::string dap_form = "engine";
  // Measured / modelled time of a training step's forward and backward (calibration: one block
  // at (32, 128), policy none, whole chunks); 1 for user profiles unless given.
  double train_fwd_factor = 1, train_bwd_factor = 1;
  // Fixed cost of one chunk-loop iteration of a module (calibration: a finely chunked training
  // step at (16, 64)); 0 for user profiles unless given.
  double chunk_overhead_us = 0;
  // Fixed cost of one module's pass (framework dispatch, kernel launches): charged once per module
  // to its forward, its backward and its rebuild; 0 unless given (fitted by `profile fit`).
  double module_overhead_us = 0;
  // Kernel launches per module pass of the software the profile describes (the seeds' PyTorch
  // code: 132 per Evoformer block forward over 9 modules, docs/planner.md): module_overhead_us /
  // module_kernels is the cost of one launch, charged to the launches of a fit row's chunk loops
  // (profile fit's chunk_launches column); 0: no such rows.
  double module_kernels = 0;
  // Bytes of every buffer on the device (docs/planner.md, "Element size and store dtype"): 0 =
  // foldcube's engine (f32 streams, workspaces and weights; a BF16 / F16 plan keeps the layer
  // inputs for the backward in 2 bytes, as `run --dtype bf16 --backward`); 2 = a device that
  // holds every activation, weight and message in 2 bytes (the seeds' all-fp16 GPU runs); 4 =
  // every buffer in 4 bytes whatever the dtype.
  int element_bytes = 0;

  std::string to_json() const;
  // Either the calibrated fields or peak_gflops + peak_mem_gbps (+ optional efficiencies
  // eff_gemm, eff_bwd, eff_batched, eff_attention, eff_attention_bwd, eff_mem). Unknown keys are
  // ignored; missing required ones and non-positive values are errors naming the key.
  static Status from_json(const std::string& text, DeviceProfile* out);
  Status validate() const;
};

// Micro-benchmarks this machine (GEMM and linear backward at Evoformer projection shapes and two
// row counts, batched triangle products, the attention kernel forward/backward at two key
// lengths, LayerNorm forward and backward for bandwidth, and one training step of one block at
// (32, 128) for train_fwd_factor / train_bwd_factor, one finely chunked step at (16, 64) for
// chunk_overhead_us; ~4-7 s) with
// `threads` threads (0 = current setting). Link rates are left 0 (single process).
Status calibrate_profile(int threads, DeviceProfile* out);
// $XDG_CACHE_HOME/foldcube/profile-<hostname>-<T>t.json (or ~/.cache/...), T = num_threads():
// one calibration per thread count.
std::string default_profile_path();
// Reads `path` (empty = default_profile_path()); when the file is missing (or recalibrate) and
// the path is the local default, calibrates and writes it. A missing explicit path is an error.
Status load_or_calibrate_profile(const std::string& path, bool recalibrate, DeviceProfile* out);
// Writes dev's JSON to path all or nothing (a temporary file renamed over path), creating the
// directory: the profile cache is never left half-written.
Status write_profile(const std::string& path, const DeviceProfile& dev);

// ---- Cost model --------------------------------------------------------------------------------
// Estimated time of one module at (s, r) on one device, from its FLOPs per class and bytes moved.
struct ModuleCost {
  std::string name;  // golden trace name, e.g. "msa_att_row"
  double forward_ms = 0, backward_ms = 0;
  // Training: the forward work the module's backward rebuilds under policy module (its saved
  // state from its input; less than the forward: no output projection, residual or z update).
  double rebuild_ms = 0;
};
// The nine modules of one block in execution order. chunk / chunk_target_bytes as in
// ForwardOptions / TrainOptions: they set the items per chunk, hence the GEMM row counts (and
// rates), of the inference modules or, with training=true, of the training functions
// (src/model/train.h), whose forward and exact backward are both modelled.
// extra_msa: the ExtraMSA block (its table, kExtraMsaBlock) instead of the Evoformer's.
std::vector<ModuleCost> block_module_costs(const EvoformerConfig& cfg, int64_t s, int64_t r,
                                           int64_t chunk, int64_t chunk_target_bytes, bool training,
                                           const DeviceProfile& dev, bool extra_msa = false);

// DAP communication of one block over N ranks (docs/dap.md): bytes each rank sends + receives
// (2x the executor's dap_block_volume / dap_block_backward_volume of src/exec/dap.h, scaled to
// elem_bytes; all-gathers and reduce-scatters together) and the number of collective calls.
struct DapComm {
  int64_t all_to_all_bytes = 0, all_gather_bytes = 0;
  int all_to_all_calls = 0, all_gather_calls = 0;
  int dap = 1;  // ranks of the collectives
};
DapComm dap_block_comm(const EvoformerConfig& cfg, int64_t s, int64_t r, int dap,
                       int64_t elem_bytes);
// One block's backward under `policy`, recompute included (without the gradient all-reduce).
DapComm dap_block_backward_comm(const EvoformerConfig& cfg, int64_t s, int64_t r, int dap,
                                int64_t elem_bytes, Recompute policy);
// The same for the seeds' DAP form (nnScaler examples/alphafold2 PASDAP: every node of a module
// split on one axis of its first input, nnScaler's adapters between them; docs/planner.md "The
// seeds' collectives"): forward, or the backward under `policy` with its recompute.
DapComm pasdap_block_comm(const EvoformerConfig& cfg, int64_t s, int64_t r, int dap,
                          int64_t elem_bytes, bool backward, Recompute policy);
double comm_ms(const DapComm& c, const DeviceProfile& dev);

// ---- Plan --------------------------------------------------------------------------------------
struct Plan {
  EvoformerConfig cfg;   // model config (no_blocks = blocks)
  int64_t s = 0, r = 0;  // planned shape (r after bucket padding)
  int64_t r_real = 0;    // residues before padding (== r without buckets)
  bool training = false;
  std::vector<Recompute> policy;   // one per block (training); empty for inference
  int64_t chunk = 0;               // forced batch items per chunk (0 = from chunk_target_bytes)
  int64_t chunk_target_bytes = 0;  // automatic chunking target (0 = default)
  std::vector<std::pair<std::string, int64_t>> module_chunks;  // items per chunk, by pick_chunk
  int dap = 1, dp = 1;
  DType dtype = DType::F32;  // F32 | BF16 | F16 (JSON "fp32" | "bf16" | "fp16")
  int element_bytes = 0;     // DeviceProfile::element_bytes of the plan (JSON, absent = 0)
  int threads = 1;
  // The ExtraMSA stack (JSON "stack": "extra_msa"; c_m holds c_e): inference and training, DAP
  // and DP as for the Evoformer.
  bool extra_msa = false;
  // Estimates (filled by make_plan / evaluate_plan).
  double time_ms = 0;              // one step: dp proteins, each over dap ranks
  double time_per_protein_ms = 0;  // time_ms / dp (the search objective)
  double forward_ms = 0, backward_ms = 0, recompute_ms = 0, comm_ms = 0;
  int64_t peak_bytes = 0;          // per device: weights, inputs, masks and the step's peak
  int64_t activation_bytes = 0;    // per device: kept from forward for backward (training)
  int64_t memory_limit_bytes = 0;  // the limit the plan was made for
  bool fits = true;                // peak_bytes <= memory_limit_bytes (fixed policies may not)
  double search_ms = 0;
  std::string profile;                   // device profile name
  std::vector<ModuleCost> module_costs;  // one block, per device
  // Per-layer partition of each block over the DAP group (JSON "partitions": one list per block
  // of {"layer", "split"}); empty: pure DAP. include/foldcube/partition.h.
  StackPartition partitions;

  Status validate() const;
  std::string to_json(int indent = 2) const;
  static Status from_json(const std::string& text, Plan* out);
};

struct PlanRequest {
  EvoformerConfig cfg;  // no_blocks = number of blocks
  int64_t s = 0, r = 0;
  bool training = false;
  DeviceProfile profile;
  int devices = 0;             // 0 = profile.devices
  int64_t memory_bytes = 0;    // per device limit; 0 = profile.memory_bytes
  std::optional<DType> dtype;  // unset = profile.dtype
  bool fixed_policy = false;   // evaluate `policy` for every block instead of searching
  Recompute policy = Recompute::kNone;
  int64_t chunk = 0;             // force items per chunk (no chunk search)
  int64_t chunk_target = 0;      // force the chunk target in bytes (no chunk search)
  int dap = 0, dp = 0;           // force degrees (0 = search)
  bool bucket = false;           // pad r up to the next bucket
  std::vector<int64_t> buckets;  // empty = default_buckets()
  bool extra_msa = false;        // plan the ExtraMSA stack
  // Per-layer partitions (include/foldcube/partition.h): false keeps pure DAP; true picks each
  // layer's split for the chosen DAP degree (Plan::partitions).
  bool split_auto = false;
  std::optional<int> element_bytes;  // unset = profile.element_bytes
};

// Searches (or, with fixed_policy, evaluates) and fills *out with the fastest plan that fits.
// User errors for bad requests; OutOfMemory naming the smallest feasible budget when nothing fits.
Status make_plan(const PlanRequest& req, Plan* out);
// Chunk targets a training search tries: default/16 (at least 64 KiB) times powers of 4, then the
// smallest target at which every training module runs in one chunk (the fastest), last.
std::vector<int64_t> training_chunk_targets(const EvoformerConfig& cfg, int64_t s, int64_t r,
                                            bool extra_msa = false);
// Bytes of each module's training chunk buffers when it runs in one chunk (the nine modules of
// block_module_costs, in order); training_chunk_targets ends at their maximum.
std::vector<std::pair<std::string, int64_t>> training_module_whole_bytes(const EvoformerConfig& cfg,
                                                                         int64_t s, int64_t r,
                                                                         bool extra_msa = false);
// Fills the estimates of a plan whose choices are set (validates it first).
Status evaluate_plan(const DeviceProfile& dev, Plan* plan);

// The executor's options for a plan (single process; dap/dp > 1 need the DAP layer).
ForwardOptions to_forward_options(const Plan& plan);
TrainOptions to_train_options(const Plan& plan);

// ---- Buckets and the plan cache ----------------------------------------------------------------
std::vector<int64_t> default_buckets();  // AF3: 256, 512, ..., 5120
// Smallest bucket >= r; an error when r exceeds the largest or the list is not increasing.
Status bucket_residues(int64_t r, const std::vector<int64_t>& buckets, int64_t* out);
// Pads m [s, r, c_m], z [r, r, c_z] and the masks (undefined = all ones) to r_pad residues with
// zero activations and zero masks; the real residues' outputs do not change (docs/planner.md).
Status pad_residues(int64_t r_pad, Tensor* m, Tensor* z, Tensor* msa_mask, Tensor* pair_mask);
// Stable key of a request: hash of (config, s, bucketed r, devices, budget, training, dtype,
// forced choices, profile name).
std::string plan_cache_key(const PlanRequest& req);
// make_plan through an on-disk cache: dir/<key>.json is read when present, else written.
Status cached_plan(const PlanRequest& req, const std::string& dir, Plan* out, bool* hit);

// The planner's precisions and their JSON / command-line spelling: F32 "fp32", BF16 "bf16", F16
// "fp16" (F64 is not a planner precision).
int64_t dtype_bytes(DType dtype);          // bytes per element: 4, 2, 2 (8 for F64)
const char* plan_dtype_name(DType dtype);  // "fp32", "bf16", "fp16" ("fp64" for F64)
Status parse_plan_dtype(const std::string& name, DType* out);  // the three planner spellings
Status check_plan_dtype(DType dtype);  // a user error unless F32, BF16 or F16
// What a plan's (dtype, element_bytes) put in memory: bytes per element of its f32-class buffers
// (element_bytes, or 4 for the engine's 0) and the dtype of the layer inputs kept for the backward
// (the memory model's `store`: BF16 for an engine plan in BF16 or F16, both 2 bytes; else F32,
// i.e. element_bytes for everything).
int64_t plan_buffer_bytes(int element_bytes);
DType plan_store_dtype(DType dtype, int element_bytes);
Status check_element_bytes(int element_bytes);  // a user error unless 0, 2 or 4

}  // namespace fc
