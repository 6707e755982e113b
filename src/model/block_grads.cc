// Zero-filled gradient storage shaped like a block's weights (train.h: allocate_block_grads).
#include <algorithm>

#include "foldcube/tensor.h"
#include "model/train.h"

namespace fc {

namespace {
void zero(const Tensor& t) {
  if (t.defined()) std::fill(t.f32(), t.f32() + t.numel(), 0.f);
}
void zero(const LayerNormW& w) {
  zero(w.w);
  zero(w.b);
}
void zero(const LinearW& w) {
  zero(w.w);
  zero(w.b);
}
void zero(const GatedAttentionW& w) {
  zero(w.w_qkvg);
  zero(w.b_qkvg);
  zero(w.o);
}

// Zeroes the layers both block types share (BlockWeights, ExtraMsaBlockWeights).
template <typename W>
void zero_shared_layers(W* g) {
  zero(g->msa_att_row.ln_m);
  zero(g->msa_att_row.ln_z);
  zero(g->msa_att_row.lin_z);
  zero(g->msa_att_row.mha);
  for (const TransitionW* t : {&g->msa_transition, &g->pair_transition}) {
    zero(t->ln);
    zero(t->l1);
    zero(t->l2);
  }
  zero(g->outer_product_mean.ln);
  zero(g->outer_product_mean.l12);
  zero(g->outer_product_mean.out);
  for (const TriangleMultiplicationW* t : {&g->tri_mul_out, &g->tri_mul_in}) {
    zero(t->ln_in);
    zero(t->ab);
    zero(t->ln_out);
    zero(t->lin_z);
    zero(t->lin_g);
  }
  for (const TriangleAttentionW* t : {&g->tri_att_start, &g->tri_att_end}) {
    zero(t->ln);
    zero(t->lin);
    zero(t->mha);
  }
}
}  // namespace

void allocate_block_grads(const EvoformerConfig& cfg, BlockWeights* g) {
  allocate_block(cfg, g);
  zero_shared_layers(g);
  zero(g->msa_att_col.ln_m);
  zero(g->msa_att_col.mha);
}

void allocate_block_grads(const EvoformerConfig& cfg, ExtraMsaBlockWeights* g) {
  allocate_extra_msa_block(cfg, g);
  zero_shared_layers(g);
  zero(g->msa_att_col.ln_m);
  zero(g->msa_att_col.q);
  zero(g->msa_att_col.kvg);
  zero(g->msa_att_col.o);
}

}  // namespace fc
