// Parameter structs of the Evoformer block. Projections that read the same input are stored
// fused (one GEMM instead of several); the OpenFold-named parameters are views into them.
#pragma once

#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "foldcube/config.h"
#include "foldcube/extra_msa.h"
#include "foldcube/io.h"
#include "foldcube/model.h"
#include "foldcube/tensor.h"

namespace fc {

struct LayerNormW {
  Tensor w, b;  // [c], [c]
};

struct LinearW {
  Tensor w, b;  // [out, in], [out] (b undefined: no bias)
};

// The bias of a linear layer, or nullptr when it has none (AF3's projections): kernels and
// linear_backward skip a null bias, so code that runs both model families passes this.
inline float* bias_ptr(const LinearW& l) { return l.b.defined() ? l.b.f32() : nullptr; }

// Gated multi-head attention: q, k, v, g fused as rows of one weight.
struct GatedAttentionW {
  Tensor w_qkvg;  // [4*H*C, c_in]: rows q | k | v | g
  Tensor b_qkvg;  // [4*H*C]: linear_g.bias for g, zeros for q, k, v (AF3 single attention: the
                  // query bias for q) and wherever the file has no bias
  LinearW o;      // [c_in, H*C], [c_in] (AF3: no bias)
  // No query / key projection (AF3 pair-weighted averaging): the logits are the biases alone
  // (kern::AttentionArgs::bias_logits); only the v | g rows of w_qkvg are used (the q | k rows
  // stay zero, their gradients zero) and the q | k columns of the q|k|v|g buffers are not written.
  bool bias_logits = false;
};

struct MsaRowAttentionW {
  LayerNormW ln_m;  // [c_m]
  LayerNormW ln_z;  // [c_z]
  LinearW lin_z;    // [H_m, c_z], no bias
  GatedAttentionW mha;
};

struct MsaColumnAttentionW {
  LayerNormW ln_m;
  GatedAttentionW mha;
};

struct TransitionW {
  LayerNormW ln;  // [c]
  LinearW l1;     // [n*c, c]
  LinearW l2;     // [c, n*c]
};

// AF3 SwiGLU transition (src/layers/swiglu_transition.h): fc1 and fc2 read the same input and
// are fused.
struct SwiGluTransitionW {
  LayerNormW ln;  // [c]
  LinearW fc12;   // fused fc1 | fc2: [2*n*c, c] (bias optional; AF3: none)
  LinearW fc3;    // [c, n*c] (bias optional; AF3: none)
};

struct OuterProductMeanW {
  LayerNormW ln;  // [c_m]
  LinearW l12;    // fused linear_1 | linear_2: [2*c_o, c_m], [2*c_o] (AF3: no bias)
  LinearW out;    // [c_z, c_o*c_o], [c_z]
  // Layer spec. false (AF2/OpenFold): z += linear_out(outer) / (norm + eps_opm), bias included;
  // true (AF3/Boltz): z += linear_out.w (outer / max(norm, 1)) + linear_out.b (mean first, bias
  // unscaled).
  bool mean_first = false;
};

struct TriangleMultiplicationW {
  LayerNormW ln_in;   // [c_z]
  LinearW ab;         // fused a_p | a_g | b_p | b_g: [4*c_t, c_z], [4*c_t] (zeros where a file
                      // has no bias: AF3)
  LayerNormW ln_out;  // [c_t]
  LinearW lin_z;      // [c_z, c_t], [c_z] (AF3: no bias)
  LinearW lin_g;      // [c_z, c_z], [c_z] (AF3: no bias)
};

struct TriangleAttentionW {
  LayerNormW ln;  // [c_z]
  LinearW lin;    // [H_p, c_z], no bias
  GatedAttentionW mha;
};

struct BlockWeights {
  MsaRowAttentionW msa_att_row;
  MsaColumnAttentionW msa_att_col;
  TransitionW msa_transition;
  OuterProductMeanW outer_product_mean;
  TriangleMultiplicationW tri_mul_out, tri_mul_in;
  TriangleAttentionW tri_att_start, tri_att_end;
  TransitionW pair_transition;
};

// Allocates every parameter of one block (uninitialised) for cfg.
void allocate_block(const EvoformerConfig& cfg, BlockWeights* w);
// Allocates only the pair modules of *w (tri_mul_out/in, tri_att_start/end, pair_transition),
// uninitialised: the parameters of a template pair block (kTemplatePairBlock).
void allocate_pair_layers(const EvoformerConfig& cfg, BlockWeights* w);

// The block's parameters under OpenFold state_dict names with prefix "blocks.<i>." as views into
// the fused storage (writing a view writes the parameter). Biases that OpenFold does not have
// (q, k, v parts of b_qkvg) are not listed.
std::vector<std::pair<std::string, Tensor>> named_params(const BlockWeights& w,
                                                         const std::string& prefix);
// Only the pair modules of *w (allocate_pair_layers) under the template pair block's state_dict
// names, prefix + "tri_mul_out.…", "tri_mul_in.…", "tri_att_start.…", "tri_att_end.…",
// "pair_transition.…" (OpenFold's TemplatePairStackBlock: no "pair_stack." level).
std::vector<std::pair<std::string, Tensor>> named_pair_params(const BlockWeights& w,
                                                              const std::string& prefix);

// ---- ExtraMSA block (OpenFold ExtraMSABlock) ------------------------------------------------
// Global column attention (MSAColumnGlobalAttention); k and v have ONE head shared by all H
// query heads. k, v and g read the same input and are fused.
struct MsaColumnGlobalAttentionW {
  LayerNormW ln_m;  // [c_e]
  LinearW q;        // [H*C, c_e], no bias
  LinearW kvg;      // fused k | v | g: [2*C + H*C, c_e], [2*C + H*C] (zeros for k, v)
  LinearW o;        // [c_e, H*C], [c_e]
};

// As BlockWeights, with global column attention (c_m of the config holds c_e).
struct ExtraMsaBlockWeights {
  MsaRowAttentionW msa_att_row;
  MsaColumnGlobalAttentionW msa_att_col;
  TransitionW msa_transition;
  OuterProductMeanW outer_product_mean;
  TriangleMultiplicationW tri_mul_out, tri_mul_in;
  TriangleAttentionW tri_att_start, tri_att_end;
  TransitionW pair_transition;
};

// Allocates every parameter of one ExtraMSA block (uninitialised) for cfg.
void allocate_extra_msa_block(const EvoformerConfig& cfg, ExtraMsaBlockWeights* w);

// OpenFold state_dict names (prefix "blocks.<i>.") as views into the fused storage, as
// named_params; the k, v parts of kvg's bias are not listed.
std::vector<std::pair<std::string, Tensor>> named_params(const ExtraMsaBlockWeights& w,
                                                         const std::string& prefix);

// Block i's parameters of a stack (the sharded executors, tests); i in [0, no_blocks).
struct StackAccess {
  static const BlockWeights& block(const EvoformerStack& stack, int i) { return *stack.blocks_[i]; }
  static const ExtraMsaBlockWeights& block(const ExtraMsaStack& stack, int i) {
    return *stack.blocks_[i];
  }
  // Mutable, for releasing a block a DAP rank does not own (src/exec/af2_dap_weights.cc).
  static BlockWeights& block(EvoformerStack& stack, int i) { return *stack.blocks_[i]; }
  static ExtraMsaBlockWeights& block(ExtraMsaStack& stack, int i) { return *stack.blocks_[i]; }
  // EvoformerStack::load / ExtraMsaStack::load allocating and loading only the blocks i with
  // keep(i) (the others left empty, and absent from the file if it likes): a DAP rank's share.
  static Status load_blocks(const EvoformerConfig& cfg, const TensorFile& weights,
                            const std::function<bool(int)>& keep, EvoformerStack* out);
  static Status load_blocks(const EvoformerConfig& cfg, const TensorFile& weights,
                            const std::function<bool(int)>& keep, ExtraMsaStack* out);
};

}  // namespace fc
