#include "layers/msa_column_attention.h"

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
GatedAttentionSpec col_attn(const MsaColumnAttentionW& w, const BlockContext& ctx) {
  const EvoformerConfig& cfg = *ctx.cfg;
  return {"msa_att_col",
          w.ln_m,
          w.mha,
          cfg.no_heads_msa,
          cfg.c_hidden_msa_att,
          {ctx.r, ctx.s, cfg.c_m, true},
          ctx.msa_bias_t};
}
}  // namespace

void msa_column_attention(const MsaColumnAttentionW& w, const BlockContext& ctx, float* m) {
  const EvoformerConfig& cfg = *ctx.cfg;
  attention_module(w.ln_m, w.mha, cfg.no_heads_msa, cfg.c_hidden_msa_att, ctx, m, ctx.r, ctx.s,
                   cfg.c_m, true, ctx.msa_bias_t, nullptr);
}

int64_t msa_column_attention_bytes(const BlockContext& ctx) {
  const EvoformerConfig& cfg = *ctx.cfg;
  return attention_module_bytes(cfg.no_heads_msa, cfg.c_hidden_msa_att, ctx, ctx.r, ctx.s, cfg.c_m);
}

void msa_column_attention_train(const MsaColumnAttentionW& w, const BlockContext& ctx, float* m,
                                AttentionState* st) {
  attention_layer_train(col_attn(w, ctx), ctx, m, nullptr, st ? &st->chunks : nullptr);
}

void msa_column_attention_backward(const MsaColumnAttentionW& w, MsaColumnAttentionW* g,
                                   const BlockContext& ctx, const float* m_in, AttentionState* st,
                                   float* dm) {
  attention_layer_backward(col_attn(w, ctx), &g->ln_m, &g->mha, ctx, m_in, dm, nullptr, &st->chunks,
                           nullptr);
}

}  // namespace fc
