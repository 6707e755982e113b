// Running a job in one process: what to run (JobSpec), loading it (config resolution, stack
// detection, weights and inputs), a forward or a training step with timing and memory figures,
// and the output file. The CLI (`foldcube run`) and the Python package are front ends over these
// functions; they print nothing. Many processes: foldcube/parallel.h.
//
//   fc::JobSpec spec;                      // files, or seeded random weights and inputs
//   spec.weights = spec.inputs = "evo_tiny.safetensors";
//   fc::Job job;
//   if (fc::Status st = fc::load_job(spec, &job); !st.ok()) return st;
//   fc::ForwardReport rep;
//   FC_RETURN_IF_ERROR(fc::run_forward(job, fc::RunOptions{}, &rep));
//   FC_RETURN_IF_ERROR(fc::write_outputs("out.safetensors", job.cfg, rep.m, rep.z, rep.s_out,
//                                        nullptr));
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "foldcube/config.h"
#include "foldcube/extra_msa.h"
#include "foldcube/io.h"
#include "foldcube/model.h"
#include "foldcube/plan.h"
#include "foldcube/status.h"
#include "foldcube/tensor.h"

namespace fc {

enum class StackKind { kEvoformer, kExtraMsa };
const char* stack_kind_name(StackKind k);  // "evoformer", "extra_msa"
// requested: "evoformer", "extra_msa" or "auto" (the weights' metadata `kind`: "extra_msa" gives
// the ExtraMSA stack, anything else or no weights the Evoformer stack).
Status detect_stack(const std::string& requested, const TensorFile* weights, StackKind* out);

// The model config, first match: the JSON file config_path (non-empty); the weights' metadata
// (when it has c_m); the weights' parameter shapes; without weights the AF2 model_1 defaults
// (ExtraMSA: c_e = 64, 8 heads of 8) with no_blocks = blocks.
Status resolve_config(const std::string& config_path, const TensorFile* weights, StackKind kind,
                      int64_t blocks, EvoformerConfig* out);

// What to run on: files, or seeded random weights and inputs.
struct JobSpec {
  std::string weights;  // OpenFold state_dict names; empty = random weights from seed
  std::string inputs;   // input.m, input.z [, input.msa_mask, input.pair_mask]; empty = random
  std::string config;   // model config JSON; empty = resolve_config's fallbacks
  std::string stack = "auto";
  std::string grad_outputs;              // training: grad.output.m, grad.output.z; empty = random
  int64_t s = 128, r = 256, blocks = 2;  // sizes of random inputs and weights
  uint64_t seed = 0;
};

// A loaded job: the model and one protein.
struct Job {
  EvoformerConfig cfg;
  StackKind kind = StackKind::kEvoformer;
  EvoformerStack stack;        // kind == kEvoformer
  ExtraMsaStack extra_stack;   // kind == kExtraMsa
  Tensor m, z;                 // [s, r, c_m], [r, r, c_z]
  Tensor msa_mask, pair_mask;  // [s, r], [r, r]; undefined = all ones
  int64_t param_bytes() const;
};
// Reads (or makes) weights and inputs. Sizes from files and flags are checked: absurd sizes give
// OutOfMemory naming the tensor, not an abort.
Status load_job(const JobSpec& spec, Job* out);
// The model part of load_job: spec.weights (or random weights), spec.config, spec.stack,
// spec.blocks and spec.seed set out->cfg, kind and the stack; out->m, z and the masks are
// untouched.
Status load_model(const JobSpec& spec, Job* out);
// dL/d outputs for a training step: spec.grad_outputs' tensors (shapes of job.m, job.z), else
// seeded random ones (seed * 2 + 3, seed * 2 + 4).
// With a file each tensor is optional (missing: zeros); grad.output.s is not read here (the
// overload below reads it).
Status load_grad_outputs(const JobSpec& spec, const Job& job, Tensor* gm, Tensor* gz);
// The same, and dL/d output.s [r, c_s] into *gs when the file holds grad.output.s (Evoformer
// only: a user error for the ExtraMSA stack), else *gs undefined (zero).
Status load_grad_outputs(const JobSpec& spec, const Job& job, Tensor* gm, Tensor* gz, Tensor* gs);
// Seeded uniform values of unit variance (the random jobs' inputs); a checked allocation.
Status random_tensor(const Shape& shape, uint64_t seed, const std::string& what, Tensor* out);

struct RunOptions {
  int64_t chunk = 0;               // ForwardOptions / TrainOptions::chunk
  int64_t chunk_target_bytes = 0;  // 0 = default
  int64_t memory_budget = 0;       // inference: chunking from the memory model (plan_inference)
  int warmup = 0, repeats = 1;     // untimed, then timed passes
  bool profile = false;            // per-module times
  bool fused = true;               // inference: ForwardOptions::fused
  DType dtype = DType::F32;        // inference: ForwardOptions::dtype
  // Training.
  std::vector<Recompute> policy;  // per block, one for all, or empty (none)
  bool dropout = false;           // AF2 training-mode dropout, seeded by seed
  uint64_t seed = 0;
};
// "none" when empty, else the comma-separated names; parse_policy is its inverse.
std::string policy_string(const std::vector<Recompute>& policy);
Status parse_policy(const std::string& list, std::vector<Recompute>* out);

struct ForwardReport {
  Tensor m, z, s_out;                          // outputs (s_out: Evoformer only)
  std::vector<double> times_ms, cpu_times_ms;  // per timed pass: wall and process CPU time
  double time_ms = 0, cpu_ms = 0;              // medians
  int64_t peak_tracked_bytes = 0;              // absolute tracked peak over the passes
  int64_t inference_peak_bytes = 0;            // m + z + the forward's own work
  int64_t mz_bytes = 0, param_bytes = 0, peak_rss_bytes = 0;
  double gflop = 0;                     // Evoformer matmul work of one pass (0 for ExtraMSA)
  int64_t chunk_target_bytes = 0;       // passed to the forward (0 = default)
  int64_t chunk_target_bytes_used = 0;  // the target in effect
  InferencePlan plan;                   // memory_budget > 0
  std::vector<ModuleChunk> chunking;    // every module's chunk loops
  std::vector<std::pair<std::string, double>> module_ms;      // profile: last pass, run order
  std::vector<std::pair<std::string, double>> module_cpu_ms;  // the same, process CPU time
};
// warmup + repeats forward passes; the last runs on job->m, job->z themselves (moved out), the
// others on copies. A memory budget refuses (OutOfMemory) when nothing fits.
Status run_forward(Job* job, const RunOptions& opts, ForwardReport* out);

struct TrainReport {
  Tensor m, z;         // outputs of the last pass
  TrainResult result;  // last pass: gradients, activation and step peak bytes
  std::vector<double> forward_ms, backward_ms, total_ms;  // per timed pass
  std::vector<double> cpu_ms;         // process CPU time (all threads) of each timed pass
  std::vector<ModuleTime> module_ms;  // profile: mean over the timed passes, block order
  int64_t peak_tracked_bytes = 0, peak_rss_bytes = 0;  // process-wide peaks after the step
};
// warmup + repeats training steps (Evoformer or ExtraMSA stack) with upstream gradients gm, gz;
// out->result.s holds the Evoformer's output.s.
Status run_training(Job* job, const Tensor& gm, const Tensor& gz, const RunOptions& opts,
                    TrainReport* out);
// The same with dL/d output.s = gs (Evoformer; undefined = zero).
Status run_training(Job* job, const Tensor& gm, const Tensor& gz, const Tensor& gs,
                    const RunOptions& opts, TrainReport* out);

// The output file of a run (metadata format = "foldcube-output/1" and the config): output.m,
// output.z, output.s (when defined) and, with grads, grad.input.m, grad.input.z and
// grad.param.<state_dict name>. Written to a temporary file and renamed: a failure never leaves
// a partial file at path.
Status write_outputs(const std::string& path, const EvoformerConfig& cfg, const Tensor& m,
                     const Tensor& z, const Tensor& s_out, const TrainResult* grads);

double median(std::vector<double> v);  // 0 for an empty list

}  // namespace fc
