// Internals of the AlphaFold2 model (src/model/af2/alphafold.cc) shared with its DAP executor
// (src/exec/af2_dap.cc): the weights, one pass's features and the stages, several of them on a
// range of rows so that a rank can embed its own shard.
#pragma once

#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "foldcube/alphafold.h"
#include "foldcube/extra_msa.h"
#include "foldcube/model.h"
#include "model/af2/structure_module.h"
#include "model/weights.h"

namespace fc {

// One pass's features (the trailing recycling axis selected), validated.
struct PassFeatures {
  int64_t r = 0, S = 0, E = 0, T = 0;
  Tensor aatype, residue_index;                                     // [r] I64
  Tensor target_feat;                                               // [r, 22]
  Tensor msa_feat, msa_mask;                                        // [S, r, 49], [S, r]
  Tensor seq_mask;                                                  // [r]
  Tensor extra_msa;                                                 // [E, r] I64
  Tensor extra_has_deletion, extra_deletion_value, extra_msa_mask;  // [E, r]
  Tensor t_aatype;                                                  // [T, r] I64
  Tensor t_positions, t_atom_mask;                                  // [T, r, 37, 3], [T, r, 37]
  Tensor t_mask;                                                    // [T]
  Tensor t_pb, t_pb_mask;                                           // [T, r, 3], [T, r]
  Tensor t_tors, t_alt_tors, t_tors_mask;                           // [T, r, 7, 2] x2, [T, r, 7]
};

// A template pair block's weights; its layers and their order are kTemplatePairBlock
// (src/model/block_table.cc; unlike the Evoformer: attention first).
struct TemplateBlock {
  BlockWeights w;  // only the pair modules are allocated (allocate_pair_layers)
};

struct AlphaFold::Impl {
  AlphaFoldConfig cfg;
  // DAP weight sharding (shard_alphafold_weights, src/exec/af2_dap.h): > 1 when only the stack
  // blocks b with b % weight_ranks == weight_rank are held (the others released); such a model
  // runs only under alphafold_dap_forward over weight_ranks ranks.
  int weight_ranks = 1, weight_rank = 0;
  EvoformerStack evoformer;
  ExtraMsaStack extra;
  // Embedders
  LinearW tf_z_i, tf_z_j, tf_m, msa_m, relpos;  // input embedder
  LinearW rec_lin;                              // [c_z, 15]
  LayerNormW rec_ln_m, rec_ln_z;
  LinearW extra_lin;  // [c_e, 25]
  // Templates
  LinearW tmpl_single_1, tmpl_single_2, tmpl_pair_lin;
  std::vector<TemplateBlock> tmpl_blocks;
  LayerNormW tmpl_ln;
  LinearW tmpl_q, tmpl_k, tmpl_v, tmpl_o;  // pointwise attention (no gating)
  // Structure module and heads
  af2::StructureModuleConfig sm_cfg;
  af2::StructureModuleWeights sm;
  LayerNormW plddt_ln;
  LinearW plddt_1, plddt_2, plddt_3, distogram, masked_msa, exp_resolved, tm;

  // The trace hook of one pass; empty (false) when no trace was asked for, in which case the
  // stages never hold whole-size copies that exist only to be traced.
  struct Emit {
    std::function<void(const std::string& stage, int index, const Tensor& value)> fn;
    explicit operator bool() const { return static_cast<bool>(fn); }
    void operator()(const std::string& stage, int index, const Tensor& value) const {
      if (fn) fn(stage, index, value);
    }
    // The structure module's trace hook forwarding to this one (empty when this one is).
    af2::StructureTraceFn structure() const {
      if (!fn) return {};
      return [f = fn](const std::string& name, int layer, const Tensor& v) { f(name, layer, v); };
    }
    // The structure module's outputs under their trace names (sm.frames ... sm.single).
    void structure_outputs(const af2::StructureModuleOutput& o) const {
      for (const auto& [name, t] : {std::pair{"sm.frames", &o.frames},
                                    {"sm.sidechain_frames", &o.sidechain_frames},
                                    {"sm.unnormalized_angles", &o.unnormalized_angles},
                                    {"sm.angles", &o.angles},
                                    {"sm.positions", &o.positions},
                                    {"sm.states", &o.states},
                                    {"sm.single", &o.single}})
        (*this)(name, -1, *t);
    }
  };

  // With weight_ranks > 1 (set before): only the stack blocks b % weight_ranks == weight_rank.
  Status load(const TensorFile& f);
  Status forward(const FeatureDict& feats, std::map<std::string, Tensor>* out,
                 const AlphaFoldOptions& opts) const;
  // m [S, r, c_m], z [r, r, c_z] from target_feat, residue_index and msa_feat.
  void embed_inputs(const PassFeatures& f, float* m, float* z) const;
  // m[0] += LN(m_prev); z += LN(z_prev) + Linear(distogram of the previous pseudo-beta).
  void embed_recycled(const PassFeatures& f, const Tensor& m_prev, const Tensor& z_prev,
                      const Tensor& x_prev, int64_t pair_block_bytes, float* m, float* z,
                      const Emit& emit) const;
  // z += the template pair embedding; single [T, r, c_m] receives the template MSA rows.
  Status embed_templates(const PassFeatures& f, const Tensor& pair_mask,
                         const AlphaFoldOptions& opts, float* z, Tensor* single,
                         const Emit& emit) const;
  // z updated by the extra-MSA embedding and stack.
  Status run_extra_msa(const PassFeatures& f, const Tensor& pair_mask, const AlphaFoldOptions& opts,
                       Tensor& z, const Emit& emit) const;
  void run_heads(const PassFeatures& f, const Tensor& m, const Tensor& z, const Tensor& s,
                 const af2::StructureModuleOutput& sm_out,
                 std::map<std::string, Tensor>* out) const;

  // ---- Stages on a range of rows (a DAP rank's shard; the one-process forward passes all rows)
  // The input embedder's per-residue terms: a_i, a_j [r, c_z] and the relative-position rows
  // rel [2k+1, c_z] (Linear(one_hot(bin)) = W[:, bin] + b).
  struct InputTables {
    Tensor a_i, a_j, rel;
  };
  InputTables input_tables(const PassFeatures& f) const;
  // Rows i0 .. i0+n of the input pair embedding into z [n, ld, c_z] (columns r .. ld untouched).
  void embed_pair_rows(const PassFeatures& f, const InputTables& t, int64_t i0, int64_t n,
                       int64_t ld, float* z) const;
  // MSA rows s0 .. s0+n (< S) of the input embedding into m [n, ld, c_m] (columns r .. ld
  // untouched).
  void embed_msa_rows(const PassFeatures& f, int64_t s0, int64_t n, int64_t ld, float* m) const;
  // blk [n, ld, c_z] = LN(z_prev) + Linear(distogram bins of the previous pseudo-beta pb [r, 3])
  // for pair rows i0 .. i0+n, from those rows of z_prev [n, ld, c_z] (columns r .. ld: LN only).
  void recycled_pair_rows(const float* pb, int64_t r, const float* z_prev, int64_t i0, int64_t n,
                          int64_t ld, float* blk) const;
  // The template angle embedding, single [T, r, c_m] (MSA rows appended after the clusters).
  Tensor template_single(const PassFeatures& f, const Emit& emit) const;
  // One template of the pointwise attention's online softmax over npos pair positions: queries
  // from z [npos, c_z], keys and values from the template's stack output act [npos, c_t], into
  // o [npos, H*C], den and mx [npos, H], in blocks of `block` positions.
  void template_attention_update(const float* z, const float* act, int64_t npos, int64_t block,
                                 float mask_bias, float* o, float* den, float* mx) const;
  // o [npos, H*C] /= den [npos, H]; then (add) z [npos, c_z] += Linear_o(o) in blocks.
  void template_attention_normalise(float* o, const float* den, int64_t npos) const;
  void template_attention_add(const float* o, int64_t npos, int64_t block, float* z) const;
  // Extra-MSA rows e0 .. e0+n: a [n, r, c_e] = Linear(one-hot and deletion features).
  void extra_embedding_rows(const PassFeatures& f, int64_t e0, int64_t n, float* a,
                            const Emit& emit) const;
  // lddt_logits and plddt from the structure module's single [r, c_s].
  void plddt_head(const Tensor& sm_single, std::map<std::string, Tensor>* out) const;
};

struct AlphaFoldAccess {
  static const AlphaFold::Impl& impl(const AlphaFold& m) { return *m.impl_; }
  static AlphaFold::Impl& impl(AlphaFold& m) { return *m.impl_; }
};

namespace af2 {
// pass k of the features (trailing recycling axis of `passes`), validated.
Status pass_features(const FeatureDict& d, bool templates, int k, int64_t passes,
                     PassFeatures* out);
// Pair mask [r, r] = seq_mask_i seq_mask_j.
Tensor pair_mask_of(const Tensor& seq_mask);
// The features the model reads, zero-padded along their residue axis from r to n residues (the
// masks of the new residues are 0); features the model does not read are dropped (pad_to). n < r
// is an error naming both.
Status pad_residues(const FeatureDict& in, int64_t r, int64_t n, FeatureDict* out);
// Residue axes of each output (empty: none), along which a padded run's outputs are cropped.
std::vector<int> output_residue_axes(const std::string& name);
// RMS change of the CA distance matrix between two passes' atom37 positions [r, 37, 3] (A).
double ca_distance_change(const Tensor& prev, const Tensor& cur, const Tensor& seq_mask);
// Template pair features of template t for rows i0 .. i0+n, out [n, ld, 88] (columns r .. ld
// untouched).
void template_pair_feat(const PassFeatures& f, int64_t t, int64_t i0, int64_t n, int64_t ld,
                        float* out);
// The outputs of the last pass that every rank holds whole: final atoms and frames, the Evoformer
// single s, the structure module's sm.* and num_recycles (= passes_run).
void put_last_pass_outputs(const StructureModuleOutput& sm_out, const Tensor& x37,
                           const Tensor& mask37, const Tensor& s, int passes_run,
                           std::map<std::string, Tensor>* out);
}  // namespace af2

}  // namespace fc
