// Training forward and backward of the gated-attention modules: MSA row attention with pair bias,
// MSA column attention, triangle attention (starting and ending node). See train.h.
#include <cmath>
#include <cstring>

#include "foldcube/status.h"
#include "kernels/backward.h"
#include "kernels/kernels.h"
#include "model/dropout.h"
#include "model/train.h"

namespace fc {

namespace {

// Copies the stream into the module's batch-major layout x [N, L, c]: the stream is [N, L, c]
// itself, or (transposed) [L, N, c].
void gather(const float* S, int64_t N, int64_t L, int64_t c, bool transposed, float* x) {
  if (!transposed) {
    std::memcpy(x, S, static_cast<size_t>(N * L * c) * sizeof(float));
    return;
  }
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n)
    for (int64_t l = 0; l < L; ++l)
      std::memcpy(x + (n * L + l) * c, S + (l * N + n) * c, static_cast<size_t>(c) * sizeof(float));
}

// S += x, x in batch-major layout [N, L, c] (inverse of gather).
void scatter_add(const float* x, int64_t N, int64_t L, int64_t c, bool transposed, float* S) {
  if (!transposed) {
    kern::add_inplace(S, c, x, c, N * L, c);
    return;
  }
  for (int64_t n = 0; n < N; ++n) kern::add_inplace(S + n * c, N * c, x + n * L * c, c, L, c);
}

kern::AttentionArgs attention_args(const AttentionState& st, int64_t H, int64_t C, int64_t N,
                                   int64_t L, const float* mask_bias, float* og) {
  const int64_t hc = H * C, ld = 4 * hc;
  const float* p = st.qkvg.f32();
  kern::AttentionArgs a;
  a.B = N, a.Lq = L, a.Lk = L, a.H = H, a.C = C;
  a.scale = 1.f / std::sqrt(static_cast<float>(C));
  a.q = p, a.q_bs = L * ld, a.q_rs = ld;
  a.k = p + hc, a.k_bs = L * ld, a.k_rs = ld;
  a.v = p + 2 * hc, a.v_bs = L * ld, a.v_rs = ld;
  a.gate = p + 3 * hc, a.g_bs = L * ld, a.g_rs = ld;
  a.o = og, a.o_bs = L * hc, a.o_rs = hc;
  a.mask_bias = mask_bias;
  a.pair_bias = st.bias.defined() ? st.bias.f32() : nullptr;
  return a;
}

// Bias branch forward: bias[h][q][k] = (LN(z) W^T)[q, k, h] (or [k, q, h] when transposed).
void bias_train(const LayerNormW& ln, const LinearW& lin, const BlockContext& ctx, const float* z,
                bool transposed, AttentionState* st) {
  const int64_t r = ctx.r, cz = ctx.cfg->c_z, H = lin.w.dim(0);
  st->b_in = Tensor::empty({r * r, cz});
  std::memcpy(st->b_in.f32(), z, st->b_in.nbytes());
  st->b_mean = Tensor::empty({r * r});
  st->b_rstd = Tensor::empty({r * r});
  st->b_ln = Tensor::empty({r * r, cz});
  kern::layernorm(z, cz, st->b_ln.f32(), cz, r * r, cz, ln.w.f32(), ln.b.f32(), ctx.cfg->eps_ln,
                  st->b_mean.f32(), st->b_rstd.f32());
  Tensor t = Tensor::empty({r * r, H});  // [(q, k), h]
  kern::linear(st->b_ln.f32(), cz, r * r, cz, lin.w.f32(), nullptr, H, t.f32(), H);
  st->bias = Tensor::empty({H, r, r});
  const float* tp = t.f32();
  float* bp = st->bias.f32();
#pragma omp parallel for schedule(static)
  for (int64_t q = 0; q < r; ++q)
    for (int64_t k = 0; k < r; ++k)
      for (int64_t h = 0; h < H; ++h)
        bp[(h * r + q) * r + k] = tp[(transposed ? k * r + q : q * r + k) * H + h];
}

// Bias branch backward: dz += d(bias)/dz^T dbias; parameter gradients accumulate.
void bias_backward(const LayerNormW& ln, const LinearW& lin, LayerNormW* gln, LinearW* glin,
                   const BlockContext& ctx, bool transposed, const AttentionState& st,
                   const float* dbias, float* dz) {
  const int64_t r = ctx.r, cz = ctx.cfg->c_z, H = lin.w.dim(0);
  Tensor dt = Tensor::empty({r * r, H});  // [(q, k), h]
  float* dtp = dt.f32();
#pragma omp parallel for schedule(static)
  for (int64_t q = 0; q < r; ++q)
    for (int64_t k = 0; k < r; ++k)
      for (int64_t h = 0; h < H; ++h)
        dtp[(transposed ? k * r + q : q * r + k) * H + h] = dbias[(h * r + q) * r + k];
  Tensor dln = Tensor::empty({r * r, cz});
  kern::linear_backward(st.b_ln.f32(), cz, r * r, cz, lin.w.f32(), H, dtp, H, dln.f32(), cz,
                        glin->w.f32(), nullptr);
  Tensor scratch = Tensor::empty({kern::layernorm_backward_scratch_floats(r * r, cz)});
  kern::layernorm_backward(st.b_in.f32(), cz, dln.f32(), cz, r * r, cz, ln.w.f32(), st.b_mean.f32(),
                           st.b_rstd.f32(), dz, cz, gln->w.f32(), gln->b.f32(), scratch.f32(),
                           /*accumulate=*/true);
}

// Attention forward on a gathered input: fills x_in (from S), the LN, q|k|v|g and the gated
// output in st, and adds the update to the stream S.
void attention_train(const char* module, const LayerNormW& ln, const GatedAttentionW& w, int64_t H,
                     int64_t C, const BlockContext& ctx, float* S, int64_t N, int64_t L, int64_t c,
                     bool transposed, const float* mask_bias, AttentionState* st) {
  const int64_t hc = H * C, rows = N * L;
  st->x_in = Tensor::empty({N, L, c});
  gather(S, N, L, c, transposed, st->x_in.f32());
  st->mean = Tensor::empty({rows});
  st->rstd = Tensor::empty({rows});
  st->x_ln = Tensor::empty({N, L, c});
  kern::layernorm(st->x_in.f32(), c, st->x_ln.f32(), c, rows, c, ln.w.f32(), ln.b.f32(),
                  ctx.cfg->eps_ln, st->mean.f32(), st->rstd.f32());
  st->qkvg = Tensor::empty({rows, 4 * hc});
  kern::linear(st->x_ln.f32(), c, rows, c, w.w_qkvg.f32(), w.b_qkvg.f32(), 4 * hc, st->qkvg.f32(),
               4 * hc);
  st->og = Tensor::empty({rows, hc});
  const kern::AttentionArgs a = attention_args(*st, H, C, N, L, mask_bias, st->og.f32());
  {
    Tensor scratch = Tensor::empty({kern::attention_scratch_floats(a, ctx.threads)});
    kern::attention(a, scratch.f32(), ctx.threads);
  }
  Tensor u = Tensor::empty({N, L, c});  // update
  kern::linear(st->og.f32(), hc, rows, hc, w.o.w.f32(), w.o.b.f32(), c, u.f32(), c);
  apply_dropout(u.f32(), N, L, c, dropout_mask(ctx, module, L, c));
  scatter_add(u.f32(), N, L, c, transposed, S);
}

// Attention backward. dS holds dL/d(stream out); on return dL/d(stream in) (accumulated).
// dbias [H, L, L] accumulates the bias gradient when non-null.
void attention_backward(const char* module, const LayerNormW& ln, const GatedAttentionW& w,
                        LayerNormW* gln, GatedAttentionW* gw, int64_t H, int64_t C,
                        const BlockContext& ctx, float* dS, int64_t N, int64_t L, int64_t c,
                        bool transposed, const float* mask_bias, const AttentionState& st,
                        float* dbias) {
  const int64_t hc = H * C, rows = N * L;
  Tensor du = Tensor::empty({N, L, c});  // dL/d update, then dL/d x_in
  gather(dS, N, L, c, transposed, du.f32());
  apply_dropout(du.f32(), N, L, c, dropout_mask(ctx, module, L, c));
  Tensor dog = Tensor::empty({rows, hc});
  kern::linear_backward(st.og.f32(), hc, rows, hc, w.o.w.f32(), c, du.f32(), c, dog.f32(), hc,
                        gw->o.w.f32(), gw->o.b.f32());
  Tensor dqkvg = Tensor::empty({rows, 4 * hc});
  {
    kern::AttentionArgs a = attention_args(st, H, C, N, L, mask_bias, nullptr);
    kern::AttentionGrads g;
    float* d = dqkvg.f32();
    g.d_out = dog.f32();
    g.dq = d, g.dk = d + hc, g.dv = d + 2 * hc, g.dgate = d + 3 * hc;
    g.d_pair_bias = dbias;
    Tensor scratch =
        Tensor::empty({kern::attention_backward_scratch_floats(a, ctx.threads, dbias != nullptr)});
    kern::attention_backward(a, g, scratch.f32(), ctx.threads);
  }
  dog = Tensor();
  Tensor dln = Tensor::empty({rows, c});
  kern::linear_backward(st.x_ln.f32(), c, rows, c, w.w_qkvg.f32(), 4 * hc, dqkvg.f32(), 4 * hc,
                        dln.f32(), c, gw->w_qkvg.f32(), gw->b_qkvg.f32());
  dqkvg = Tensor();
  Tensor scratch = Tensor::empty({kern::layernorm_backward_scratch_floats(rows, c)});
  kern::layernorm_backward(st.x_in.f32(), c, dln.f32(), c, rows, c, ln.w.f32(), st.mean.f32(),
                           st.rstd.f32(), du.f32(), c, gln->w.f32(), gln->b.f32(), scratch.f32());
  scatter_add(du.f32(), N, L, c, transposed, dS);
}

}  // namespace

void msa_row_attention_train(const MsaRowAttentionW& w, const BlockContext& ctx, float* m,
                             const float* z, AttentionState* st) {
  const EvoformerConfig& cfg = *ctx.cfg;
  bias_train(w.ln_z, w.lin_z, ctx, z, false, st);
  attention_train("msa_att_row", w.ln_m, w.mha, cfg.no_heads_msa, cfg.c_hidden_msa_att, ctx, m,
                  ctx.s, ctx.r, cfg.c_m, false, ctx.msa_bias, st);
}

void msa_row_attention_backward(const MsaRowAttentionW& w, MsaRowAttentionW* g,
                                const BlockContext& ctx, const AttentionState& st, float* dm,
                                float* dz) {
  const EvoformerConfig& cfg = *ctx.cfg;
  const int64_t H = cfg.no_heads_msa, r = ctx.r;
  Tensor dbias = Tensor::zeros({H, r, r});
  attention_backward("msa_att_row", w.ln_m, w.mha, &g->ln_m, &g->mha, H, cfg.c_hidden_msa_att, ctx,
                     dm, ctx.s, r, cfg.c_m, false, ctx.msa_bias, st, dbias.f32());
  bias_backward(w.ln_z, w.lin_z, &g->ln_z, &g->lin_z, ctx, false, st, dbias.f32(), dz);
}

void msa_column_attention_train(const MsaColumnAttentionW& w, const BlockContext& ctx, float* m,
                                AttentionState* st) {
  const EvoformerConfig& cfg = *ctx.cfg;
  attention_train("msa_att_col", w.ln_m, w.mha, cfg.no_heads_msa, cfg.c_hidden_msa_att, ctx, m,
                  ctx.r, ctx.s, cfg.c_m, true, ctx.msa_bias_t, st);
}

void msa_column_attention_backward(const MsaColumnAttentionW& w, MsaColumnAttentionW* g,
                                   const BlockContext& ctx, const AttentionState& st, float* dm) {
  const EvoformerConfig& cfg = *ctx.cfg;
  attention_backward("msa_att_col", w.ln_m, w.mha, &g->ln_m, &g->mha, cfg.no_heads_msa,
                     cfg.c_hidden_msa_att, ctx, dm, ctx.r, ctx.s, cfg.c_m, true, ctx.msa_bias_t, st,
                     nullptr);
}

void triangle_attention_train(const TriangleAttentionW& w, const BlockContext& ctx, bool ending,
                              float* z, AttentionState* st) {
  const EvoformerConfig& cfg = *ctx.cfg;
  bias_train(w.ln, w.lin, ctx, z, ending, st);
  attention_train(ending ? "tri_att_end" : "tri_att_start", w.ln, w.mha, cfg.no_heads_pair,
                  cfg.c_hidden_pair_att, ctx, z, ctx.r, ctx.r, cfg.c_z, ending,
                  ending ? ctx.pair_bias_t : ctx.pair_bias, st);
}

void triangle_attention_backward(const TriangleAttentionW& w, TriangleAttentionW* g,
                                 const BlockContext& ctx, bool ending, const AttentionState& st,
                                 float* dz) {
  const EvoformerConfig& cfg = *ctx.cfg;
  const int64_t H = cfg.no_heads_pair, r = ctx.r;
  Tensor dbias = Tensor::zeros({H, r, r});
  attention_backward(ending ? "tri_att_end" : "tri_att_start", w.ln, w.mha, &g->ln, &g->mha, H,
                     cfg.c_hidden_pair_att, ctx, dz, r, r, cfg.c_z, ending,
                     ending ? ctx.pair_bias_t : ctx.pair_bias, st, dbias.f32());
  bias_backward(w.ln, w.lin, &g->ln, &g->lin, ctx, ending, st, dbias.f32(), dz);
}

}  // namespace fc
