// The AlphaFold2 Evoformer stack (inference).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "foldcube/config.h"
#include "foldcube/io.h"
#include "foldcube/status.h"
#include "foldcube/tensor.h"

namespace fc {

struct BlockWeights;  // private: the library's parameter storage
struct StackAccess;

// Called after each module's residual update: block index, module name (golden trace name, e.g.
// "msa_att_row"), stream ("m" or "z") and the updated stream tensor.
using TraceFn = std::function<void(int block, const std::string& module, const std::string& stream,
                                   const Tensor& value)>;

struct ForwardOptions {
  TraceFn trace;      // optional
  int64_t chunk = 0;  // rows per chunk inside modules; 0 = automatic
  // Automatic chunking aims every module's chunk buffers at this many bytes; 0 = the default
  // (default_chunk_target_bytes). A memory plan (plan_inference) lowers it to fit a budget.
  int64_t chunk_target_bytes = 0;
  // LayerNorm fused into the following Linear and the fused transition, in cache-sized row blocks
  // (docs/benchmarks.md); false runs the unfused reference path (results equal within f32
  // rounding, workspace per module_workspace_bytes either way).
  bool fused = true;
  // GEMM inputs of the fused projections (attention q|k|v|g, OPM, triangle-multiplication gate)
  // and transitions: F32, or BF16 (bf16-rounded inputs and weights, f32 accumulation; streams,
  // LayerNorm statistics, softmax and residual adds stay f32). BF16 needs fused; other types
  // are a user error.
  DType dtype = DType::F32;
};

// A user error unless opts.dtype is F32, or BF16 with opts.fused.
Status check_forward_dtype(const ForwardOptions& opts);
// The compute dtype's command-line / Python spelling: "fp32" -> F32, "bf16" -> BF16 (GEMM inputs
// in bf16; ForwardOptions, TrainOptions and AlphaFoldOptions::dtype); anything else is an error.
Status parse_compute_dtype(const std::string& name, DType* out);

// Activation recompute policy of one block in training (see src/model/train.h):
// kNone keeps every module's saved state, kModule ("small") keeps each module's input and
// recomputes the module in backward, kBlock ("large") keeps the block input and recomputes the
// block. Gradients do not depend on the policy.
enum class Recompute { kNone, kModule, kBlock };
const char* recompute_name(Recompute p);  // "none", "module", "block"
Status parse_recompute(const std::string& name, Recompute* out);

struct TrainOptions {
  std::vector<Recompute> policy;  // one per block, or a single entry for all (empty = kNone)
  // Items per chunk of every module's training forward and backward along its batch-like axis
  // (src/model/train.h); 0 = automatic: each module's chunk buffers aim at chunk_target_bytes
  // (0 = default_train_chunk_target_bytes), as in ForwardOptions. Results do not depend on it
  // beyond rounding.
  int64_t chunk = 0;
  int64_t chunk_target_bytes = 0;
  // Training-mode dropout as in AF2 (rates from the config): masks come from a counter-based RNG
  // keyed by (seed, block, module, element), so recompute reproduces them and runs repeat.
  bool dropout = false;
  uint64_t seed = 0;
  // Time every module's training forward and backward (TrainResult::module_ms).
  bool profile = false;
  // F32, or BF16: the layer inputs kept for the backward are stored in bf16, each layer reading
  // its streams rounded to bf16 (BlockContext::store says how); gradients, weights, streams and
  // the layers' internal states stay f32.
  DType dtype = DType::F32;
};

// Policy of block b under opts (a single entry applies to every block; empty = kNone).
Recompute policy_of(const TrainOptions& opts, int block);

// Wall time of one module summed over the blocks of a training step (TrainOptions::profile):
// forward; backward (including the per-chunk rebuilds of policy module); and the block re-run of
// policy block.
struct ModuleTime {
  std::string module;  // golden trace name, e.g. "tri_mul_out"
  double forward_ms = 0, backward_ms = 0, recompute_ms = 0;
};

struct TrainResult {
  Tensor grad_m, grad_z;  // dL/d input m, z
  // dL/d parameter under OpenFold state_dict names: every block parameter, and linear.weight,
  // linear.bias when a gradient of output.s was given.
  std::vector<std::pair<std::string, Tensor>> grad_params;
  Tensor s;  // output.s = linear(output.m[0]) [r, c_s] (EvoformerStack; undefined for ExtraMSA)
  int64_t activation_bytes = 0;  // tracked bytes kept alive from the forward for the backward
  int64_t peak_bytes = 0;        // tracked peak of the step above what was live before it
  double forward_ms = 0, backward_ms = 0;
  std::vector<ModuleTime> module_ms;  // with TrainOptions::profile, in block order
};

class EvoformerStack {
 public:
  EvoformerStack();
  ~EvoformerStack();
  EvoformerStack(EvoformerStack&&) noexcept;
  EvoformerStack& operator=(EvoformerStack&&) noexcept;

  // Weights under OpenFold state_dict names (blocks.<i>.…, linear.*). Every tensor must be
  // present, F32 and of the shape the config implies; otherwise a user error naming it.
  static Status load(const EvoformerConfig& cfg, const TensorFile& weights, EvoformerStack* out);
  // Seeded random weights scaled so that activations stay O(1) (for the embedded default job
  // and benchmarks).
  static EvoformerStack random(const EvoformerConfig& cfg, uint64_t seed);

  // m [s, r, c_m] and z [r, r, c_z] (contiguous F32) are updated in place to the stack output.
  // msa_mask [s, r], pair_mask [r, r]: undefined tensors mean all ones. s_out (if non-null)
  // receives linear(m[0]) [r, c_s].
  Status forward(Tensor& m, Tensor& z, const Tensor& msa_mask, const Tensor& pair_mask,
                 Tensor* s_out, const ForwardOptions& opts = {}) const;

  // One training step: forward (m, z updated in place to the outputs; with opts.dropout in
  // training mode), then backward of L with dL/d output.m = grad_out_m, dL/d output.z = grad_out_z.
  // out->s receives output.s; dL/d output.s is zero.
  Status train_step(Tensor& m, Tensor& z, const Tensor& msa_mask, const Tensor& pair_mask,
                    const Tensor& grad_out_m, const Tensor& grad_out_z, const TrainOptions& opts,
                    TrainResult* out) const;
  // The same with dL/d output.s = grad_out_s [r, c_s] (undefined: zero, as above). When it is
  // given, its share flows back into dL/d m and out->grad_params lists linear.weight and
  // linear.bias last. output.s and these gradients are computed after the blocks' backward.
  Status train_step(Tensor& m, Tensor& z, const Tensor& msa_mask, const Tensor& pair_mask,
                    const Tensor& grad_out_m, const Tensor& grad_out_z, const Tensor& grad_out_s,
                    const TrainOptions& opts, TrainResult* out) const;

  const EvoformerConfig& config() const { return cfg_; }
  // For the sharded executors: the single projection linear.weight [c_s, c_m], linear.bias [c_s]
  // (block parameters: the library's StackAccess).
  const Tensor& linear_weight() const { return linear_w_; }
  const Tensor& linear_bias() const { return linear_b_; }
  int64_t param_bytes() const;
  // Writes the weights under their state_dict names.
  void export_weights(TensorFile* out) const;

 private:
  friend struct StackAccess;  // the library's executors read the block parameters
  EvoformerConfig cfg_;
  std::vector<std::unique_ptr<BlockWeights>> blocks_;
  Tensor linear_w_, linear_b_;  // [c_s, c_m], [c_s]
};

// Matmul FLOPs of one Evoformer block's forward at (s, r) (formula in docs/benchmarks.md).
double evoformer_block_flops(const EvoformerConfig& cfg, int64_t s, int64_t r);

// Config from the parameter shapes of an OpenFold EvoformerStack state dict (for weight files
// without config metadata). Constants (inf, eps) keep their defaults.
Status infer_config_from_weights(const TensorFile& weights, EvoformerConfig* out);
// The same from names and shapes only (shapes_of a state dict, or a filtered read's TensorShapes).
Status infer_config_from_shapes(const TensorShapes& shapes, EvoformerConfig* out);

// Automatic chunking: bytes that one module's chunk buffers aim for at (s, r).
int64_t default_chunk_target_bytes(const EvoformerConfig& cfg, int64_t s, int64_t r);
// Automatic chunking of the training step: 4 x the inference target (bytes(m+z)/2, at least
// 16 MiB). Chosen when an 8 MiB target took 1.8x the time of 32 MiB at (128, 256) (2-channel
// triangle-multiplication groups); since that module's rewrite the two run equally fast
// (docs/training.md), and plans pick their own target.
int64_t default_train_chunk_target_bytes(const EvoformerConfig& cfg, int64_t s, int64_t r);

}  // namespace fc
