// The whole AlphaFold2 monomer model (inference): input and recycling embedders, templates,
// extra-MSA embedder and stack, Evoformer, structure module and heads, over the recycling passes.
// Parameters under OpenFold `AlphaFold` state_dict names; features and outputs under the names of
// OpenFold's batch and output dicts (golden README, "Full AlphaFold2 model cases").
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "foldcube/config.h"
#include "foldcube/io.h"
#include "foldcube/status.h"
#include "foldcube/tensor.h"

namespace fc {

struct AlphaFoldConfig {
  EvoformerConfig evoformer;      // c_m, c_z, c_s and the Evoformer blocks
  EvoformerConfig extra_msa;      // c_m holds c_e
  EvoformerConfig template_pair;  // c_z holds c_t; pair modules only
  bool templates = true;
  int64_t template_att_heads = 4, template_att_hidden = 16;
  float template_att_inf = 1e5f;
  int64_t structure_layers = 8;
  int64_t relpos_k = 32;  // relative positions clipped to [-k, k]
  bool ptm = true;        // the TM-score head (pTM, PAE)
  // Structure-module and head widths (AF2's; from the parameter shapes when read from a file).
  // Only the memory model reads them: AlphaFold::load takes the widths from the parameters.
  int64_t ipa_heads = 12, ipa_hidden = 16, ipa_qk_points = 4, ipa_v_points = 8, c_resnet = 128;
  int64_t plddt_hidden = 128, plddt_bins = 50, distogram_bins = 64, tm_bins = 64;
};

// AlphaFold2 model_1_ptm dimensions: Evoformer 48 blocks (c_m 256, c_z 128, c_s 384), extra-MSA
// stack 4 blocks (c_e 64, 8 global heads of 8), template pair stack 2 blocks (c_t 64, 2 heads of
// 16, tri-mul 64, transition 2), template pointwise attention 4 heads of 16, structure module 8
// layers, TM head on.
AlphaFoldConfig alphafold_model_1_ptm();
// The AlphaFold2 monomer presets model_1 ... model_5, each optionally `_ptm`: model_1_ptm's
// dimensions, templates for models 1 and 2 only, the TM head for `_ptm`.
Status alphafold_preset(const std::string& name, AlphaFoldConfig* out);

// Config from the parameter shapes of an OpenFold AlphaFold state dict; the counts the shapes do
// not hold (template pointwise-attention heads, structure-module layers) come from the file's
// metadata `config` (OpenFold model config JSON) when present, else the AF2 defaults.
Status alphafold_config_from_weights(const TensorFile& weights, AlphaFoldConfig* out);
// The same from names, shapes and metadata only: a DAP rank's filtered read (read_weights with a
// BlockFilter and TensorShapes) holds only its own blocks but gives every tensor's shape.
Status alphafold_config_from_shapes(const TensorShapes& shapes, AlphaFoldConfig* out);

// Features: OpenFold batch names without prefix (aatype, target_feat, residue_index, msa_feat,
// seq_mask, msa_mask, extra_msa, extra_has_deletion, extra_deletion_value, extra_msa_mask,
// template_* ...), each with the trailing recycling axis of R passes.
using FeatureDict = std::map<std::string, Tensor>;

// Wall time and tracked memory of one stage of one recycling pass.
struct AlphaFoldStageStat {
  int pass = 0;
  std::string stage;  // input_embedder, recycling_embedder, template_embedder, extra_msa_stack,
                      // evoformer, structure_module, heads
  double ms = 0;
  // Tracked bytes above those live when forward was called (weights, features): live when the
  // stage starts, and at the stage's peak.
  int64_t entry_bytes = 0;
  int64_t peak_bytes = 0;
};

struct AlphaFoldOptions {
  int64_t chunk = 0;               // items per chunk in the stacks' modules; 0 = automatic
  int64_t chunk_target_bytes = 0;  // automatic chunking target; 0 = default
  // Bytes per block of rows where a stage outside the stacks works through the pair a block of
  // rows at a time (recycling embedder, structure-module pair LayerNorm); 0 = 4 MiB.
  int64_t pair_block_bytes = 0;
  int passes = 0;  // recycling passes to run; 0 = all R of the features
  // Size bucket: > r runs the model on the features padded to pad_to residues (padding masked
  // out) and crops the outputs back to r, so one shape serves every protein of the bucket; the
  // valid outputs equal the unpadded run's within fp32 noise (pTM is taken over the r residues).
  // Traces show the padded tensors. 0 or r: no padding.
  int64_t pad_to = 0;
  // Early stop: after a pass whose CA distance matrix changed by less than this (root mean square,
  // Angstrom) from the previous pass, the heads run and no further pass does; 0 = off.
  double recycle_tolerance = 0;
  // GEMM inputs of the template pair, Extra-MSA and Evoformer stacks: F32, or BF16 (bf16 products
  // with f32 accumulation, as ForwardOptions::dtype; the streams, LayerNorm, softmax, embedders,
  // structure module and heads stay f32).
  DType dtype = DType::F32;
  // Called with intermediate values: pass, golden stage name (e.g. "input_embedder.m",
  // "template.pair_stack"), index (the template for per-template stages, the layer for sm.*
  // stages, else -1) and the value.
  std::function<void(int pass, const std::string& stage, int index, const Tensor& value)> trace;
  // Called after each stage of each pass (stage names as in AlphaFoldStageStat). Unlike `trace`,
  // it costs no memory.
  std::function<void(int pass, const std::string& stage)> progress;
  // When non-null, receives one entry per stage and pass, in execution order.
  std::vector<AlphaFoldStageStat>* stats = nullptr;
};

// Seeded random but valid features for r residues, S clusters, E extra sequences, T templates and
// `passes` recycling passes (aatype 0..19, one-hot MSA features with profiles, template
// backbones along a random walk, all masks 1), for benchmarks.
FeatureDict random_alphafold_features(int64_t r, int64_t S, int64_t E, int64_t T, int passes,
                                      uint64_t seed);

class AlphaFold;
// A whole model from a parameter file (OpenFold `AlphaFold` state dict as safetensors, or
// DeepMind's params_model_*.npz): config from its shapes and metadata, then AlphaFold::load.
// Errors name the file.
Status load_alphafold(const std::string& path, AlphaFold* out);
// The feature.<name> tensors of a safetensors file (`foldcube features` output, a golden model
// file), without the prefix; a user error when there are none.
Status read_feature_file(const std::string& path, FeatureDict* out);

// ---- Memory model and budget
// --------------------------------------------------------------------- Sizes that set the memory
// of a forward: residues, cluster rows, extra rows, templates (0 when the config has none or the
// features hold none) and recycling passes.
struct AlphaFoldDims {
  int64_t r = 0, S = 0, E = 0, T = 0;
  int passes = 1;               // passes run
  int feature_passes = 0;       // the features' recycling axis R (0: = passes)
  bool templates_given = true;  // the features hold template_* tensors (T may still be 0)
  // With AlphaFoldOptions::pad_to: r is the bucket and r_features the residues of the features
  // (0: not padded). The padded copy of the features and the cropped outputs are then counted,
  // and the prediction is an upper bound (at most the cropped outputs' bytes above measured).
  int64_t r_features = 0;
};
// The dims of a feature dict (as AlphaFold::forward reads it), or a user error naming the feature.
Status alphafold_dims(const AlphaFoldConfig& cfg, const FeatureDict& features, AlphaFoldDims* out);

// Tracked memory of AlphaFold::forward without a trace hook, by replaying its allocations: per
// stage and pass the bytes live at the stage's start and at its peak (AlphaFoldStageStat, ms 0),
// and the forward's peak, all above the bytes live before the call (weights and features).
// Exact for the tracked allocator when every template is present (tests/af2_memory_test.cc); a
// trace hook adds whole-size copies of the traced values.
struct AlphaFoldMemory {
  int64_t peak_bytes = 0;
  std::vector<AlphaFoldStageStat> stages;
};
// Reads opts' chunk, chunk_target_bytes and pair_block_bytes.
Status alphafold_forward_memory(const AlphaFoldConfig& cfg, const AlphaFoldDims& dims,
                                const AlphaFoldOptions& opts, int threads, AlphaFoldMemory* out);

// Chunking of the three stacks (template pair, extra-MSA, Evoformer) for a forward whose tracked
// peak, base_bytes (weights and features already live) plus the forward's own, stays within
// budget_bytes: the default chunking if it fits, else the coarsest that does. A budget that no
// chunking fits is refused with the smallest feasible budget and the stage that sets it. `dtype`
// is the AlphaFoldOptions::dtype the forward will run with.
struct AlphaFoldPlan {
  int64_t chunk_target_bytes = 0;  // pass as AlphaFoldOptions::chunk_target_bytes
  int64_t pair_block_bytes = 0;    // pass as AlphaFoldOptions::pair_block_bytes
  int64_t predicted_peak_bytes = 0;
  std::string peak_stage;  // the stage at the predicted peak
};
Status plan_alphafold(const AlphaFoldConfig& cfg, const AlphaFoldDims& dims, int64_t base_bytes,
                      int64_t budget_bytes, int threads, AlphaFoldPlan* out,
                      DType dtype = DType::F32);

class AlphaFold {
 public:
  AlphaFold();
  ~AlphaFold();
  AlphaFold(AlphaFold&&) noexcept;
  AlphaFold& operator=(AlphaFold&&) noexcept;

  // Every parameter the config implies must be present, F32, finite and of its shape.
  static Status load(const AlphaFoldConfig& cfg, const TensorFile& weights, AlphaFold* out);
  // Seeded random parameters (as a state dict) scaled so that activations stay O(1), for
  // benchmarks and the embedded default job. Structure-module and head widths are AF2's.
  // Each tensor's values depend only on its name and the seed, so `keep` (BlockFilter, as for a
  // filtered read_weights) leaves out stack blocks without changing the others: a DAP rank
  // generates only its own blocks (load_alphafold_shard, src/exec/af2_dap.h).
  static TensorFile random_weights(const AlphaFoldConfig& cfg, uint64_t seed,
                                   const BlockFilter& keep = {});

  // Outputs of the last pass under OpenFold output names: final_atom_positions [r, 37, 3],
  // final_atom_mask, final_affine_tensor, plddt, lddt_logits, distogram_logits,
  // masked_msa_logits, experimentally_resolved_logits, tm_logits, predicted_aligned_error,
  // aligned_confidence_probs, max_predicted_aligned_error, ptm_score, single, msa, pair and the
  // structure module's sm.* (frames, sidechain_frames, unnormalized_angles, angles, positions,
  // states, single).
  Status forward(const FeatureDict& features, std::map<std::string, Tensor>* out,
                 const AlphaFoldOptions& opts = {}) const;

  const AlphaFoldConfig& config() const;

  struct Impl;  // src/model/af2/alphafold_impl.h

 private:
  friend struct AlphaFoldAccess;
  std::unique_ptr<Impl> impl_;
};

}  // namespace fc
