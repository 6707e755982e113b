// The AlphaFold3 trunk stacks as Boltz-2 runs them: the Pairformer stack (PairformerModule, v2)
// and the MSA module (MSAModule). Parameters under Boltz state_dict names; tensors without a batch
// dimension; semantics and golden data in shared/golden/README.md ("AF3 trunk cases").
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "foldcube/config.h"
#include "foldcube/io.h"
#include "foldcube/model.h"
#include "foldcube/status.h"
#include "foldcube/tensor.h"

namespace fc {

struct Af3Access;

struct Af3Config {
  std::string kind = "pairformer";  // "pairformer" | "msa_module"
  int64_t c_s = 384;                // token_s: the single stream (MSA module: the emb width)
  int64_t c_z = 128;                // token_z
  int64_t c_m = 64;                 // msa_s (MSA module)
  int64_t no_heads_single = 16;     // Pairformer single attention (head dim c_s / heads)
  int64_t no_heads_pair = 4, c_hidden_pair = 32;  // triangle attention
  int64_t pwa_heads = 8, pwa_head_dim = 32;       // pair-weighted averaging (fixed in Boltz)
  int64_t c_hidden_opm = 32;                      // outer product mean (fixed in Boltz)
  int64_t transition_n = 4;
  int64_t msa_feat = 36;  // one_hot(msa, 33) | has_deletion | deletion_value | msa_paired
  int64_t no_blocks = 48;
  float pair_dropout = 0.25f;  // Pairformer `dropout`, MSA module `z_dropout`
  float msa_dropout = 0.15f;   // MSA module

  Status validate() const;
  // From the parameter shapes of a Boltz state dict: kind from its names (s_proj/msa_proj: MSA
  // module; layers.0.pre_norm_s: Pairformer), dims from shapes, blocks counted; dropout rates
  // from metadata `constructor_kwargs` when present.
  static Status from_weights(const TensorFile& weights, Af3Config* out);
};

// The trunk view of an AF3 config, as the block tables' layers and the memory model read it: the
// Pairformer's single stream is the m stream of a one-row MSA (c_m = c_s, its attention heads the
// "MSA" heads, s = 1); the MSA module's pair-weighted averaging heads are the MSA heads; the
// triangle multiplication's hidden size is c_z.
EvoformerConfig af3_trunk_config(const Af3Config& cfg);

class PairformerStack {
 public:
  PairformerStack();
  ~PairformerStack();
  PairformerStack(PairformerStack&&) noexcept;
  PairformerStack& operator=(PairformerStack&&) noexcept;

  // Every layers.<i>.* tensor must be present, F32 and of the config's shape.
  static Status load(const Af3Config& cfg, const TensorFile& weights, PairformerStack* out);
  static PairformerStack random(const Af3Config& cfg, uint64_t seed);

  // s [n, c_s], z [n, n, c_z] (contiguous F32) updated in place to the stack output; mask [n]
  // (0/1, undefined = ones); the pair mask is mask[i] * mask[j], as Boltz builds it. Traces name
  // the streams "s" and "z".
  Status forward(Tensor& s, Tensor& z, const Tensor& mask, const ForwardOptions& opts = {}) const;
  // One training step (recompute policies, chunking and dropout as for the Evoformer; dropout
  // with Boltz's masks: one draw per row i of z for tri_mul_out/in and tri_att_start, per column
  // j for tri_att_end): forward, then backward of L with dL/d output = grad_out_s, grad_out_z.
  // out->grad_m is dL/d input s, out->grad_z dL/d input z; grad_params under Boltz names.
  Status train_step(Tensor& s, Tensor& z, const Tensor& mask, const Tensor& grad_out_s,
                    const Tensor& grad_out_z, const TrainOptions& opts, TrainResult* out) const;

  const Af3Config& config() const;
  void export_weights(TensorFile* out) const;

 private:
  friend struct Af3Access;  // the library's DAP executor reads the blocks (src/model/af3_access.h)
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

class MsaModule {
 public:
  MsaModule();
  ~MsaModule();
  MsaModule(MsaModule&&) noexcept;
  MsaModule& operator=(MsaModule&&) noexcept;

  // s_proj, msa_proj and layers.<i>.* under Boltz names.
  static Status load(const Af3Config& cfg, const TensorFile& weights, MsaModule* out);
  static MsaModule random(const Af3Config& cfg, uint64_t seed);

  // z [n, n, c_z] updated in place to MSAModule's return value (input z plus every update);
  // emb [n, c_s]; msa_feat [N, n, msa_feat] (see msa_features); msa_mask [N, n] and token_mask
  // [n] 0/1 (undefined = ones). Traces: "embed"/"m" with block -1, then the blocks' layers.
  Status forward(Tensor& z, const Tensor& emb, const Tensor& msa_feat, const Tensor& msa_mask,
                 const Tensor& token_mask, const ForwardOptions& opts = {}) const;
  // One training step from dL/d output z = grad_out_z: out->grad_z = dL/d input z, out->grad_m =
  // dL/d the MSA embedding entering block 0, grad_emb = dL/d emb; parameters under Boltz names.
  Status train_step(Tensor& z, const Tensor& emb, const Tensor& msa_feat, const Tensor& msa_mask,
                    const Tensor& token_mask, const Tensor& grad_out_z, const TrainOptions& opts,
                    TrainResult* out, Tensor* grad_emb) const;

  const Af3Config& config() const;
  void export_weights(TensorFile* out) const;

 private:
  friend struct Af3Access;  // the library's DAP executor reads the blocks (src/model/af3_access.h)
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// ---- Running a stack from files (the CLI's `run --stack pairformer|msa_module`) ---------------
struct Af3RunSpec {
  std::string stack = "auto";  // pairformer | msa_module | auto (from the weights)
  std::string weights;         // Boltz state dict (safetensors); empty: seeded random weights of
                               // the AF3 / Boltz-2 dims with `blocks` blocks (stack not auto)
  std::string inputs;          // input.* tensors under the golden names (README "AF3 trunk");
                               // empty: seeded random inputs of n tokens (and n_msa MSA rows)
  int64_t n = 256, n_msa = 128, blocks = 2;
  uint64_t seed = 0;
  int repeats = 1;  // forward passes timed (time_ms: the median); training: 1
  // Training step when set: dL/d outputs as grad.output.<s|z> (or the golden files' probe.<s|z>).
  bool training = false;
  bool dropout = false;      // training: AF3's dropout (Boltz's axes), seeded by `seed`
  std::string grad_outputs;  // empty with training: dL/d output = 1 everywhere
  std::vector<Recompute> policy;
  int64_t chunk = 0, chunk_target_bytes = 0;
  // F32, or BF16 (run --dtype): the forward's GEMM inputs in bf16 with f32 accumulation
  // (ForwardOptions::dtype), the training step's kept state and GEMM inputs in bf16
  // (TrainOptions::dtype); one process and under DAP, with or without a memory budget.
  DType dtype = DType::F32;
  // Budget for the tracked peak of the whole run (weights, inputs and the work), 0 = none: the
  // chunk target (and, training without `policy`, the least recompute) come from af3_plan, and a
  // budget nothing fits is a user error naming the smallest one that would.
  int64_t memory_bytes = 0;
};
struct Af3RunReport {
  std::string stack;
  int64_t n = 0, n_msa = 0;  // tokens, MSA rows (MSA module)
  // output.s / output.z, and with training grad.input.*, grad.trace.embed.m (MSA module) and
  // grad.param.<Boltz name>: the golden files' names.
  TensorFile out;
  double time_ms = 0, forward_ms = 0, backward_ms = 0;
  int64_t peak_tracked_bytes = 0;  // of the run, above what was live before it
  int64_t activation_bytes = 0;    // training: kept from the forward for the backward
  // With a memory budget: the memory model's tracked peak of the run (everything live included),
  // the measured one, and the plan's choices.
  int64_t planned_peak_bytes = 0, measured_peak_bytes = 0;
  int64_t least_budget_bytes = 0;  // the smallest budget the plan can meet for this run
  int64_t chunk_target_bytes = 0;
  std::string policy;  // training: the recompute policy used ("" without a budget)
};
// "pairformer" / "msa_module" when the safetensors file at `path` holds a Boltz Pairformer / MSA
// module state dict (metadata kind, else parameter names; only the header is read), else "".
Status af3_stack_of_file(const std::string& path, std::string* kind);
// The state dict at `path` (safetensors or .npz) and its config: `kind` "pairformer" or
// "msa_module" must match the file's, "auto" takes either. Errors name the file. Used by the CLI
// and the Python package.
Status read_af3_weights(const std::string& path, const std::string& kind, TensorFile* w,
                        Af3Config* cfg);
Status af3_run(const Af3RunSpec& spec, Af3RunReport* rep);

// ---- Memory plan (exact for the tracked allocator; `foldcube plan --stack` adds the cost model's
// time per row, src/plan/table_cost.h) ------------------------------------------------------------
struct Af3PlanRequest {
  Af3Config cfg;
  int64_t n = 0;       // tokens
  int64_t n_msa = 1;   // MSA rows (MSA module)
  int64_t blocks = 0;  // 0 = cfg.no_blocks
  bool train = false;
  std::vector<Recompute> policy;  // training: empty = choose; one entry, or one per block
  int64_t chunk = 0, chunk_target_bytes = 0;  // as TrainOptions / ForwardOptions (0 = automatic)
  int64_t memory_bytes = 0;                   // budget for the tracked peak; 0 = none
  int threads = 1;
  // F32, or BF16: the bf16 forward's GEMM-input copies (ForwardOptions::dtype) and, training, the
  // bf16 kept state and GEMM inputs (TrainOptions::dtype).
  DType dtype = DType::F32;
};
struct Af3PlanRow {
  Recompute policy = Recompute::kNone;  // training rows
  int64_t chunk_target_bytes = 0;       // the automatic chunking target used
  int64_t param_bytes = 0;              // the stack's weights
  int64_t activation_bytes = 0;         // training: kept for the backward
  int64_t peak_bytes = 0;  // forward or training step: tracked peak above weights and inputs
  bool fits = false;       // param_bytes + inputs + peak_bytes <= memory_bytes (or no budget)
};
struct Af3Plan {
  int64_t input_bytes = 0;       // the caller's input tensors (streams, masks, features)
  std::vector<Af3PlanRow> rows;  // inference: one row; training: one per candidate policy
  int chosen = -1;               // the least recompute that fits (-1: none fits)
};
// Inference: the peak at the automatic chunk target, lowered (bisection, as plan_inference) to
// fit the budget. Training: policies none, module, block (or the given one) with their
// activations and step peaks from the memory model.
Status af3_plan(const Af3PlanRequest& req, Af3Plan* out);
// Tracked peak of PairformerStack::forward / MsaModule::forward above what was live before (masks
// not given: all-ones masks are allocated); dtype as ForwardOptions::dtype.
int64_t af3_forward_peak_bytes(const Af3Config& cfg, int64_t n, int64_t n_msa, int64_t chunk,
                               int64_t chunk_target_bytes, int threads, DType dtype = DType::F32);

// Boltz's MSA feature [N, n, 36] from msa [N, n] (I64 token classes 0..32), has_deletion,
// deletion_value and msa_paired [N, n] (F32): one_hot(msa, 33) | has_deletion | deletion_value |
// msa_paired. A class outside 0..32 is a user error.
Status msa_features(const Tensor& msa, const Tensor& has_deletion, const Tensor& deletion_value,
                    const Tensor& msa_paired, Tensor* out);

}  // namespace fc
