// Parameter storage of the AF3 trunk blocks (Boltz-2 PairformerLayer and MSALayer) over the same
// layer structs as the AF2 blocks, and the Boltz state_dict names that map files onto them.
// AF3's projections have no bias: those LinearW biases stay undefined (bias_ptr gives nullptr),
// while fused internal storage (the q|k|v|g and a_p|a_g|b_p|b_g rows) keeps zero biases that no
// file name maps to.
#pragma once

#include <string>
#include <vector>

#include "foldcube/config.h"
#include "foldcube/io.h"
#include "foldcube/status.h"
#include "foldcube/tensor.h"
#include "model/weights.h"

namespace fc {

// Boltz PairformerLayer. The single attention with pair bias is the MSA row attention unit on a
// one-row "MSA" (s = 1, c_m = c_s): pre_norm_s = ln_m, proj_z.0 = ln_z, proj_z.1 = lin_z,
// proj_q|k|v|g = mha.w_qkvg (query bias in b_qkvg), proj_o = mha.o (no bias).
struct PairformerBlockWeights {
  TriangleMultiplicationW tri_mul_out, tri_mul_in;
  TriangleAttentionW tri_att_start, tri_att_end;
  SwiGluTransitionW transition_z;
  MsaRowAttentionW attention;
  SwiGluTransitionW transition_s;
};

// Boltz MSALayer. Pair-weighted averaging is the MSA row attention unit with zero query and key
// projections (logits = the pair bias; see docs/architecture.md): norm_m = ln_m, norm_z = ln_z,
// proj_z = lin_z, proj_m = the v rows, proj_g = the g rows of mha.w_qkvg, proj_o = mha.o.
struct MsaModuleBlockWeights {
  MsaRowAttentionW pair_weighted_averaging;
  SwiGluTransitionW msa_transition;
  OuterProductMeanW outer_product_mean;  // mean_first (AF3)
  TriangleMultiplicationW tri_mul_out, tri_mul_in;
  TriangleAttentionW tri_att_start, tri_att_end;
  SwiGluTransitionW transition_z;
};

// Zero-filled parameters of one block for cfg (the trunk view of the AF3 config, see af3.cc):
// weights to be loaded, or gradient accumulators.
void allocate_pairformer_block(const EvoformerConfig& cfg, PairformerBlockWeights* w);
void allocate_msa_module_block(const EvoformerConfig& cfg, MsaModuleBlockWeights* w);

// A file tensor mapped onto storage: the concatenation of `parts` along dim 0 (one part for a
// plain view; Boltz's p_in = a_p | b_p and g_in = a_g | b_g are two rows blocks each of the fused
// a_p|a_g|b_p|b_g storage).
struct NamedParam {
  std::string name;
  std::vector<Tensor> parts;
};
using NamedParams = std::vector<NamedParam>;

// Boltz state_dict names with the given prefix ("layers.<i>." / "layers.<i>.pairformer_layer."
// as Boltz nests them), in state_dict order.
NamedParams boltz_params(const PairformerBlockWeights& w, const std::string& prefix);
NamedParams boltz_params(const MsaModuleBlockWeights& w, const std::string& prefix);

// The file tensor's shape of a named param (its parts' rows summed).
Shape named_shape(const NamedParam& p);
// Copies each named parameter from the file into its parts: present, F32, of its shape and
// finite, else a user error naming it.
Status load_named(const NamedParams& params, const TensorFile& weights);
// The named parameter as one contiguous tensor (parts concatenated).
Tensor gather_named(const NamedParam& p);

}  // namespace fc
