// Training forward and backward of the gated-attention modules: MSA row attention with pair bias,
// MSA column attention, triangle attention (starting and ending node), chunked over batch items.
// See train.h.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "foldcube/status.h"
#include "kernels/backward.h"
#include "kernels/kernels.h"
#include "model/dropout.h"
#include "model/train.h"

namespace fc {

namespace {
constexpr int64_t kF = sizeof(float);

// The attention module's view of its stream S: N items of L positions with c channels; S is
// [N, L, c] itself, or (transposed) [L, N, c].
struct View {
  int64_t N, L, c;
  bool transposed;
  // Offset of item n, its row stride (floats).
  int64_t item(int64_t n) const { return transposed ? n * c : n * L * c; }
  int64_t row_stride() const { return transposed ? N * c : c; }
};

// x [n, L, c] = items n0 .. n0+n of S.
void gather(const float* S, const View& v, int64_t n0, int64_t n, float* x) {
  if (!v.transposed) {
    std::memcpy(x, S + v.item(n0), static_cast<size_t>(n * v.L * v.c) * kF);
    return;
  }
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < n; ++b)
    for (int64_t l = 0; l < v.L; ++l)
      std::memcpy(x + (b * v.L + l) * v.c, S + (l * v.N + n0 + b) * v.c,
                  static_cast<size_t>(v.c) * kF);
}

// Items n0 .. n0+n of S += x [n, L, c].
void scatter_add(const float* x, const View& v, int64_t n0, int64_t n, float* S) {
  if (!v.transposed) {
    kern::add_inplace(S + v.item(n0), v.c, x, v.c, n * v.L, v.c);
    return;
  }
  for (int64_t b = 0; b < n; ++b)
    kern::add_inplace(S + v.item(n0 + b), v.row_stride(), x + b * v.L * v.c, v.c, v.L, v.c);
}

// y [n, L, c] = LayerNorm of items n0 .. n0+n of S (statistics [n*L] when mean/rstd non-null).
void layernorm_items(const LayerNormW& ln, float eps, const float* S, const View& v, int64_t n0,
                     int64_t n, float* y, float* mean, float* rstd) {
  if (!v.transposed) {
    kern::layernorm(S + v.item(n0), v.c, y, v.c, n * v.L, v.c, ln.w.f32(), ln.b.f32(), eps, mean,
                    rstd);
    return;
  }
  for (int64_t b = 0; b < n; ++b)
    kern::layernorm(S + v.item(n0 + b), v.row_stride(), y + b * v.L * v.c, v.c, v.L, v.c,
                    ln.w.f32(), ln.b.f32(), eps, mean ? mean + b * v.L : nullptr,
                    rstd ? rstd + b * v.L : nullptr);
}

kern::AttentionArgs attention_args(const float* qkvg, int64_t H, int64_t C, int64_t n, int64_t L,
                                   const float* mask_bias, const float* bias, float* og) {
  const int64_t hc = H * C, ld = 4 * hc;
  kern::AttentionArgs a;
  a.B = n, a.Lq = L, a.Lk = L, a.H = H, a.C = C;
  a.scale = 1.f / std::sqrt(static_cast<float>(C));
  a.q = qkvg, a.q_bs = L * ld, a.q_rs = ld;
  a.k = qkvg + hc, a.k_bs = L * ld, a.k_rs = ld;
  a.v = qkvg + 2 * hc, a.v_bs = L * ld, a.v_rs = ld;
  a.gate = qkvg + 3 * hc, a.g_bs = L * ld, a.g_rs = ld;
  a.o = og, a.o_bs = L * hc, a.o_rs = hc;
  a.mask_bias = mask_bias;
  a.pair_bias = bias;
  return a;
}

// Bias branch forward: bias[h][q][k] = (LN(z) W^T)[q, k, h] (or [k, q, h] when transposed), by
// blocks of rows of z.
Tensor bias_forward(const LayerNormW& ln, const LinearW& lin, const BlockContext& ctx,
                    const float* z, bool transposed) {
  const int64_t r = ctx.r, cz = ctx.cfg->c_z, H = lin.w.dim(0);
  const int64_t ch = bias_train_chunk(ctx, H);
  Tensor bias = Tensor::empty({H, r, r});
  Tensor x = Tensor::empty({ch * r, cz});  // LN(z) of a row block
  Tensor t = Tensor::empty({ch * r, H});   // [(q, k), h] of a row block
  float* bp = bias.f32();
  for (int64_t i0 = 0; i0 < r; i0 += ch) {
    const int64_t n = std::min(ch, r - i0);
    kern::layernorm(z + i0 * r * cz, cz, x.f32(), cz, n * r, cz, ln.w.f32(), ln.b.f32(),
                    ctx.cfg->eps_ln);
    kern::linear(x.f32(), cz, n * r, cz, lin.w.f32(), nullptr, H, t.f32(), H);
    const float* tp = t.f32();
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t k = 0; k < r; ++k)
        for (int64_t h = 0; h < H; ++h) {
          const float val = tp[(i * r + k) * H + h];
          if (transposed)
            bp[(h * r + k) * r + i0 + i] = val;
          else
            bp[(h * r + i0 + i) * r + k] = val;
        }
  }
  return bias;
}

// Bias branch backward, by blocks of rows of z: dz += d(bias)/dz^T dbias (LN(z) recomputed);
// parameter gradients accumulate.
void bias_backward(const LayerNormW& ln, const LinearW& lin, LayerNormW* gln, LinearW* glin,
                   const BlockContext& ctx, bool transposed, const float* z, const float* dbias,
                   float* dz) {
  const int64_t r = ctx.r, cz = ctx.cfg->c_z, H = lin.w.dim(0);
  const int64_t ch = bias_train_chunk(ctx, H);
  Tensor x = Tensor::empty({ch * r, cz});  // LN(z) of a row block
  Tensor mean = Tensor::empty({ch * r});
  Tensor rstd = Tensor::empty({ch * r});
  Tensor dt = Tensor::empty({ch * r, H});    // [(q, k), h] gradient of the row block
  Tensor dln = Tensor::empty({ch * r, cz});  // dL/d LN(z) of the row block
  Tensor scratch = Tensor::empty({kern::layernorm_backward_scratch_floats(ch * r, cz)});
  float* dtp = dt.f32();
  for (int64_t i0 = 0; i0 < r; i0 += ch) {
    const int64_t n = std::min(ch, r - i0);
    const float* zr = z + i0 * r * cz;
    kern::layernorm(zr, cz, x.f32(), cz, n * r, cz, ln.w.f32(), ln.b.f32(), ctx.cfg->eps_ln,
                    mean.f32(), rstd.f32());
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t k = 0; k < r; ++k)
        for (int64_t h = 0; h < H; ++h)
          dtp[(i * r + k) * H + h] =
              transposed ? dbias[(h * r + k) * r + i0 + i] : dbias[(h * r + i0 + i) * r + k];
    kern::linear_backward(x.f32(), cz, n * r, cz, lin.w.f32(), H, dtp, H, dln.f32(), cz,
                          glin->w.f32(), nullptr);
    kern::layernorm_backward(zr, cz, dln.f32(), cz, n * r, cz, ln.w.f32(), mean.f32(), rstd.f32(),
                             dz + i0 * r * cz, cz, gln->w.f32(), gln->b.f32(), scratch.f32(),
                             /*accumulate=*/true);
  }
}

// The module's weights and shapes as the chunk functions need them.
struct Attn {
  const char* module;  // golden trace name (dropout key)
  const LayerNormW& ln;
  const GatedAttentionW& w;
  int64_t H, C;
  View v;
  const float* mask_bias;  // [N, L]
};

// q|k|v|g and the gated output of items n0 .. n0+n from their normalised input x_ln [n, L, c].
AttentionChunk chunk_state(const Attn& at, const BlockContext& ctx, const float* x_ln, int64_t n0,
                           int64_t n, const float* bias) {
  const int64_t hc = at.H * at.C, c = at.v.c, rows = n * at.v.L;
  AttentionChunk k;
  k.qkvg = Tensor::empty({rows, 4 * hc});
  kern::linear(x_ln, c, rows, c, at.w.w_qkvg.f32(), at.w.b_qkvg.f32(), 4 * hc, k.qkvg.f32(),
               4 * hc);
  k.og = Tensor::empty({rows, hc});
  k.lse = Tensor::empty({n, at.H, at.v.L});
  kern::AttentionArgs a = attention_args(k.qkvg.f32(), at.H, at.C, n, at.v.L,
                                         at.mask_bias + n0 * at.v.L, bias, k.og.f32());
  a.lse = k.lse.f32();
  Tensor scratch = Tensor::empty({kern::attention_scratch_floats(a, ctx.threads)});
  kern::attention(a, scratch.f32(), ctx.threads);
  return k;
}

// Forward over all chunks: S += update; chunk states appended to `keep` when non-null.
void attention_forward(const Attn& at, const BlockContext& ctx, float* S, const float* bias,
                       std::vector<AttentionChunk>* keep) {
  const View& v = at.v;
  const int64_t ch = attention_train_chunk(ctx, v.N, v.L, v.c, at.H * at.C);
  // [L, c] shared over the items, or [N, 1] one per item (AF3), or undefined
  const bool per_item = dropout_per_item(ctx, at.module);
  const Tensor mask =
      per_item ? dropout_mask(ctx, at.module, v.N, 1) : dropout_mask(ctx, at.module, v.L, v.c);
  for (int64_t n0 = 0; n0 < v.N; n0 += ch) {
    const int64_t n = std::min(ch, v.N - n0);
    AttentionChunk k;
    {
      Tensor x_ln = Tensor::empty({n, v.L, v.c});
      layernorm_items(at.ln, ctx.cfg->eps_ln, S, v, n0, n, x_ln.f32(), nullptr, nullptr);
      k = chunk_state(at, ctx, x_ln.f32(), n0, n, bias);
    }
    {
      Tensor u = Tensor::empty({n, v.L, v.c});  // update of the chunk
      kern::linear(k.og.f32(), at.H * at.C, n * v.L, at.H * at.C, at.w.o.w.f32(), bias_ptr(at.w.o),
                   v.c, u.f32(), v.c);
      if (per_item)
        apply_item_dropout(u.f32(), n0, n, v.L * v.c, mask);
      else
        apply_dropout(u.f32(), n, v.L, v.c, mask);
      scatter_add(u.f32(), v, n0, n, S);
    }
    if (keep) keep->push_back(std::move(k));
  }
}

// Backward over all chunks. S_in: the module input; dS: dL/d out on entry, dL/d in on exit.
// kept: the forward's chunk states (freed one by one) or empty (recomputed one by one).
// dbias [H, L, L] accumulates the bias gradient when non-null.
void attention_backward(const Attn& at, LayerNormW* gln, GatedAttentionW* gw,
                        const BlockContext& ctx, const float* S_in, float* dS, const float* bias,
                        std::vector<AttentionChunk>* kept, float* dbias) {
  const View& v = at.v;
  const int64_t hc = at.H * at.C, c = v.c;
  const int64_t ch = attention_train_chunk(ctx, v.N, v.L, c, hc);
  // as in attention_forward
  const bool per_item = dropout_per_item(ctx, at.module);
  const Tensor mask =
      per_item ? dropout_mask(ctx, at.module, v.N, 1) : dropout_mask(ctx, at.module, v.L, c);
  FC_CHECK_MSG(kept->empty() || static_cast<int64_t>(kept->size()) == (v.N + ch - 1) / ch,
               "attention state was saved with another chunking");
  for (int64_t n0 = 0, idx = 0; n0 < v.N; n0 += ch, ++idx) {
    const int64_t n = std::min(ch, v.N - n0), rows = n * v.L;
    Tensor x_ln = Tensor::empty({n, v.L, c});
    Tensor mean = Tensor::empty({rows});
    Tensor rstd = Tensor::empty({rows});
    layernorm_items(at.ln, ctx.cfg->eps_ln, S_in, v, n0, n, x_ln.f32(), mean.f32(), rstd.f32());
    AttentionChunk k =
        kept->empty() ? chunk_state(at, ctx, x_ln.f32(), n0, n, bias) : std::move((*kept)[idx]);
    Tensor du = Tensor::empty({n, v.L, c});  // dL/d update, then dL/d x_in
    gather(dS, v, n0, n, du.f32());
    if (per_item)
      apply_item_dropout(du.f32(), n0, n, v.L * c, mask);
    else
      apply_dropout(du.f32(), n, v.L, c, mask);
    Tensor dog = Tensor::empty({rows, hc});
    kern::linear_backward(k.og.f32(), hc, rows, hc, at.w.o.w.f32(), c, du.f32(), c, dog.f32(), hc,
                          gw->o.w.f32(), bias_ptr(gw->o));
    k.og = Tensor();
    Tensor dqkvg = Tensor::empty({rows, 4 * hc});
    {
      const kern::AttentionArgs a =
          attention_args(k.qkvg.f32(), at.H, at.C, n, v.L, at.mask_bias + n0 * v.L, bias, nullptr);
      kern::AttentionGrads g;
      float* d = dqkvg.f32();
      g.d_out = dog.f32();
      g.dq = d, g.dk = d + hc, g.dv = d + 2 * hc, g.dgate = d + 3 * hc;
      g.d_pair_bias = dbias;
      g.lse = k.lse.f32();
      Tensor scratch = Tensor::empty(
          {kern::attention_backward_scratch_floats(a, ctx.threads, dbias != nullptr)});
      kern::attention_backward(a, g, scratch.f32(), ctx.threads);
    }
    k.lse = Tensor();
    dog = Tensor();
    Tensor dln = Tensor::empty({rows, c});
    kern::linear_backward(x_ln.f32(), c, rows, c, at.w.w_qkvg.f32(), 4 * hc, dqkvg.f32(), 4 * hc,
                          dln.f32(), c, gw->w_qkvg.f32(), gw->b_qkvg.f32());
    dqkvg = Tensor();
    k.qkvg = Tensor();
    x_ln = Tensor();
    {
      // The chunk's input rows: in place in S_in, or gathered [n, L, c] when transposed.
      Tensor x = v.transposed ? Tensor::empty({n, v.L, c}) : Tensor();
      if (v.transposed) gather(S_in, v, n0, n, x.f32());
      const float* xp = v.transposed ? x.f32() : S_in + v.item(n0);
      Tensor scratch = Tensor::empty({kern::layernorm_backward_scratch_floats(rows, c)});
      kern::layernorm_backward(xp, c, dln.f32(), c, rows, c, at.ln.w.f32(), mean.f32(), rstd.f32(),
                               du.f32(), c, gln->w.f32(), gln->b.f32(), scratch.f32());
    }
    scatter_add(du.f32(), v, n0, n, dS);
  }
  kept->clear();
}

Attn row_attn(const MsaRowAttentionW& w, const BlockContext& ctx) {
  const EvoformerConfig& cfg = *ctx.cfg;
  return {"msa_att_row",
          w.ln_m,
          w.mha,
          cfg.no_heads_msa,
          cfg.c_hidden_msa_att,
          {ctx.s, ctx.r, cfg.c_m, false},
          ctx.msa_bias};
}
Attn col_attn(const MsaColumnAttentionW& w, const BlockContext& ctx) {
  const EvoformerConfig& cfg = *ctx.cfg;
  return {"msa_att_col",
          w.ln_m,
          w.mha,
          cfg.no_heads_msa,
          cfg.c_hidden_msa_att,
          {ctx.r, ctx.s, cfg.c_m, true},
          ctx.msa_bias_t};
}
Attn tri_attn(const TriangleAttentionW& w, const BlockContext& ctx, bool ending) {
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

int64_t attention_train_chunk(const BlockContext& ctx, int64_t N, int64_t L, int64_t c,
                              int64_t hc) {
  // Per item: the chunk state (q|k|v|g, og) and the backward's buffers (x_ln, du, dln, dog,
  // dq|dk|dv|dg). The saved lse (H floats per position, small next to 5*H*C) is left out, so the
  // chunk picks are those from before it was saved.
  return pick_chunk(ctx, N, L * (3 * c + 10 * hc) * kF);
}

int64_t bias_train_chunk(const BlockContext& ctx, int64_t H) {
  // Per row of z: LN(z) and its gradient, the bias rows and their gradient.
  return pick_chunk(ctx, ctx.r, ctx.r * (2 * ctx.cfg->c_z + 2 * H + 2) * kF);
}

void msa_row_attention_train(const MsaRowAttentionW& w, const BlockContext& ctx, float* m,
                             const float* z, AttentionState* st) {
  Tensor bias = bias_forward(w.ln_z, w.lin_z, ctx, z, false);  // [H_m, r, r]
  attention_forward(row_attn(w, ctx), ctx, m, bias.f32(), st ? &st->chunks : nullptr);
  if (st) st->bias = std::move(bias);
}

void msa_row_attention_backward(const MsaRowAttentionW& w, MsaRowAttentionW* g,
                                const BlockContext& ctx, const float* m_in, const float* z_in,
                                AttentionState* st, float* dm, float* dz) {
  const int64_t H = ctx.cfg->no_heads_msa, r = ctx.r;
  Tensor bias = st->bias.defined() ? st->bias : bias_forward(w.ln_z, w.lin_z, ctx, z_in, false);
  st->bias = Tensor();
  Tensor dbias = Tensor::zeros({H, r, r});  // [H, r, r]
  attention_backward(row_attn(w, ctx), &g->ln_m, &g->mha, ctx, m_in, dm, bias.f32(), &st->chunks,
                     dbias.f32());
  bias = Tensor();
  bias_backward(w.ln_z, w.lin_z, &g->ln_z, &g->lin_z, ctx, false, z_in, dbias.f32(), dz);
}

void msa_column_attention_train(const MsaColumnAttentionW& w, const BlockContext& ctx, float* m,
                                AttentionState* st) {
  attention_forward(col_attn(w, ctx), ctx, m, nullptr, st ? &st->chunks : nullptr);
}

void msa_column_attention_backward(const MsaColumnAttentionW& w, MsaColumnAttentionW* g,
                                   const BlockContext& ctx, const float* m_in, AttentionState* st,
                                   float* dm) {
  attention_backward(col_attn(w, ctx), &g->ln_m, &g->mha, ctx, m_in, dm, nullptr, &st->chunks,
                     nullptr);
}

void triangle_attention_train(const TriangleAttentionW& w, const BlockContext& ctx, bool ending,
                              float* z, AttentionState* st) {
  Tensor bias = bias_forward(w.ln, w.lin, ctx, z, ending);  // [H_p, r, r]
  attention_forward(tri_attn(w, ctx, ending), ctx, z, bias.f32(), st ? &st->chunks : nullptr);
  if (st) st->bias = std::move(bias);
}

void triangle_attention_backward(const TriangleAttentionW& w, TriangleAttentionW* g,
                                 const BlockContext& ctx, bool ending, const float* z_in,
                                 AttentionState* st, float* dz) {
  const int64_t H = ctx.cfg->no_heads_pair, r = ctx.r;
  Tensor bias = st->bias.defined() ? st->bias : bias_forward(w.ln, w.lin, ctx, z_in, ending);
  st->bias = Tensor();
  Tensor dbias = Tensor::zeros({H, r, r});  // [H, r, r]
  attention_backward(tri_attn(w, ctx, ending), &g->ln, &g->mha, ctx, z_in, dz, bias.f32(),
                     &st->chunks, dbias.f32());
  bias = Tensor();
  bias_backward(w.ln, w.lin, &g->ln, &g->lin, ctx, ending, z_in, dbias.f32(), dz);
}

void attention_rows_train(const LayerNormW& ln, const GatedAttentionW& w, int64_t H, int64_t C,
                          const char* module, const BlockContext& ctx, float* S, int64_t N,
                          int64_t L, int64_t c, const float* mask_bias, const float* bias,
                          AttentionState* st) {
  const Attn at{module, ln, w, H, C, {N, L, c, false}, mask_bias};
  attention_forward(at, ctx, S, bias, st ? &st->chunks : nullptr);
}

void attention_rows_backward(const LayerNormW& ln, const GatedAttentionW& w, LayerNormW* gln,
                             GatedAttentionW* gw, int64_t H, int64_t C, const char* module,
                             const BlockContext& ctx, const float* S_in, float* dS, int64_t N,
                             int64_t L, int64_t c, const float* mask_bias, const float* bias,
                             AttentionState* st, float* dbias) {
  const Attn at{module, ln, w, H, C, {N, L, c, false}, mask_bias};
  attention_backward(at, gln, gw, ctx, S_in, dS, bias, &st->chunks, dbias);
}

void pair_bias_unpermute(const float* dbias, int64_t r, int64_t H, float* dt) {
#pragma omp parallel for schedule(static)
  for (int64_t q = 0; q < r; ++q)
    for (int64_t k = 0; k < r; ++k)
      for (int64_t h = 0; h < H; ++h) dt[(q * r + k) * H + h] = dbias[(h * r + q) * r + k];
}

void pair_bias_project_backward(const LayerNormW& ln, const LinearW& lin, LayerNormW* gln,
                                LinearW* glin, const BlockContext& ctx, const float* z,
                                int64_t rows, const float* dt, float* dz) {
  const int64_t r = ctx.r, cz = ctx.cfg->c_z, H = lin.w.dim(0);
  const int64_t ch = std::min(bias_train_chunk(ctx, H), std::max<int64_t>(rows, 1));
  Tensor x = Tensor::empty({ch * r, cz});  // LN(z) of a row block
  Tensor mean = Tensor::empty({ch * r});
  Tensor rstd = Tensor::empty({ch * r});
  Tensor dln = Tensor::empty({ch * r, cz});  // dL/d LN(z) of the row block
  Tensor scratch = Tensor::empty({kern::layernorm_backward_scratch_floats(ch * r, cz)});
  for (int64_t i0 = 0; i0 < rows; i0 += ch) {
    const int64_t n = std::min(ch, rows - i0);
    const float* zr = z + i0 * r * cz;
    kern::layernorm(zr, cz, x.f32(), cz, n * r, cz, ln.w.f32(), ln.b.f32(), ctx.cfg->eps_ln,
                    mean.f32(), rstd.f32());
    kern::linear_backward(x.f32(), cz, n * r, cz, lin.w.f32(), H, dt + i0 * r * H, H, dln.f32(), cz,
                          glin->w.f32(), nullptr);
    kern::layernorm_backward(zr, cz, dln.f32(), cz, n * r, cz, ln.w.f32(), mean.f32(), rstd.f32(),
                             dz + i0 * r * cz, cz, gln->w.f32(), gln->b.f32(), scratch.f32(),
                             /*accumulate=*/true);
  }
}

}  // namespace fc
