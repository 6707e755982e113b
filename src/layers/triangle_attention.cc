#include "layers/triangle_attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "foldcube/status.h"
#include "foldcube/tensor.h"
#include "kernels/backward.h"
#include "kernels/convert.h"
#include "kernels/fused.h"
#include "kernels/kernels.h"
#include "kernels/typed.h"
#include "layers/layer_util.h"
#include "model/dropout.h"

namespace fc {

namespace {
constexpr int64_t kF = sizeof(float);

GatedAttentionSpec tri_attn(const TriangleAttentionW& w, const BlockContext& ctx, bool ending) {
  const EvoformerConfig& cfg = *ctx.cfg;
  return {ending ? "tri_att_end" : "tri_att_start",
          w.ln,
          w.mha,
          cfg.no_heads_pair,
          cfg.c_hidden_pair_att,
          {ctx.r, ctx.r, cfg.c_z, ending},
          ending ? ctx.pair_bias_t : ctx.pair_bias};
}
}  // namespace

void triangle_attention(const TriangleAttentionW& w, const BlockContext& ctx, bool ending,
                        float* z) {
  const EvoformerConfig& cfg = *ctx.cfg;
  Tensor bias = pair_bias_heads(w.ln, w.lin, ctx, z, ending);  // [H_p, r, r]
  attention_module(w.ln, w.mha, cfg.no_heads_pair, cfg.c_hidden_pair_att, ctx, z, ctx.r, ctx.r,
                   cfg.c_z, ending, ending ? ctx.pair_bias_t : ctx.pair_bias, bias.f32());
}

int64_t triangle_attention_bytes(const BlockContext& ctx) {
  const EvoformerConfig& cfg = *ctx.cfg;
  const int64_t Hp = cfg.no_heads_pair, r = ctx.r;
  return std::max(
      pair_bias_heads_bytes(ctx, Hp),
      Hp * r * r * kF + attention_module_bytes(Hp, cfg.c_hidden_pair_att, ctx, r, r, cfg.c_z));
}

void triangle_attention_train(const TriangleAttentionW& w, const BlockContext& ctx, bool ending,
                              float* z, AttentionState* st) {
  Tensor bias = pair_bias_train(w.ln, w.lin, ctx, z, ending);  // [H_p, r, r]
  attention_layer_train(tri_attn(w, ctx, ending), ctx, z, bias.f32(), st ? &st->chunks : nullptr);
  if (st) st->bias = std::move(bias);
}

void triangle_attention_backward(const TriangleAttentionW& w, TriangleAttentionW* g,
                                 const BlockContext& ctx, bool ending, const float* z_in,
                                 AttentionState* st, float* dz) {
  const int64_t H = ctx.cfg->no_heads_pair, r = ctx.r;
  Tensor bias = st->bias.defined() ? st->bias : pair_bias_train(w.ln, w.lin, ctx, z_in, ending);
  st->bias = Tensor();
  Tensor dbias = Tensor::zeros({H, r, r});  // [H, r, r]
  attention_layer_backward(tri_attn(w, ctx, ending), &g->ln, &g->mha, ctx, z_in, dz, bias.f32(),
                           &st->chunks, dbias.f32());
  bias = Tensor();
  pair_bias_backward(w.ln, w.lin, &g->ln, &g->lin, ctx, ending, z_in, dbias.f32(), dz);
}

}  // namespace fc
