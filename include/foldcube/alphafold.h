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
};

// AlphaFold2 model_1_ptm dimensions: Evoformer 48 blocks (c_m 256, c_z 128, c_s 384), extra-MSA
// stack 4 blocks (c_e 64, 8 global heads of 8), template pair stack 2 blocks (c_t 64, 2 heads of
// 16, tri-mul 64, transition 2), template pointwise attention 4 heads of 16, structure module 8
// layers, TM head on.
AlphaFoldConfig alphafold_model_1_ptm();

// Config from the parameter shapes of an OpenFold AlphaFold state dict; the counts the shapes do
// not hold (template pointwise-attention heads, structure-module layers) come from the file's
// metadata `config` (OpenFold model config JSON) when present, else the AF2 defaults.
Status alphafold_config_from_weights(const TensorFile& weights, AlphaFoldConfig* out);

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
  int64_t peak_bytes = 0;  // tracked peak (all live tensor memory) during the stage
};

struct AlphaFoldOptions {
  int64_t chunk = 0;               // items per chunk in the stacks' modules; 0 = automatic
  int64_t chunk_target_bytes = 0;  // automatic chunking target; 0 = default
  int passes = 0;                  // recycling passes to run; 0 = all R of the features
  // Early stop: after a pass whose CA distance matrix changed by less than this (root mean square,
  // Angstrom) from the previous pass, the heads run and no further pass does; 0 = off.
  double recycle_tolerance = 0;
  // Called with intermediate values: pass, golden stage name (e.g. "input_embedder.m",
  // "template.pair_stack"), index (the template for per-template stages, the layer for sm.*
  // stages, else -1) and the value.
  std::function<void(int pass, const std::string& stage, int index, const Tensor& value)> trace;
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
  static TensorFile random_weights(const AlphaFoldConfig& cfg, uint64_t seed);

  // Outputs of the last pass under OpenFold output names: final_atom_positions [r, 37, 3],
  // final_atom_mask, final_affine_tensor, plddt, lddt_logits, distogram_logits,
  // masked_msa_logits, experimentally_resolved_logits, tm_logits, predicted_aligned_error,
  // aligned_confidence_probs, max_predicted_aligned_error, ptm_score, single, msa, pair and the
  // structure module's sm.* (frames, sidechain_frames, unnormalized_angles, angles, positions,
  // states, single).
  Status forward(const FeatureDict& features, std::map<std::string, Tensor>* out,
                 const AlphaFoldOptions& opts = {}) const;

  const AlphaFoldConfig& config() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace fc
