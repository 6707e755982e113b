#include "layers/global_attention.h"

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

// Chunk buffers per residue column: x [s, c_e], kvg [s, 2C + H*C], mean [c_e], q/o [H*C].
int64_t global_attention_item_bytes(const EvoformerConfig& cfg, int64_t s) {
  const int64_t ce = cfg.c_m, C = cfg.c_hidden_msa_att, hc = cfg.no_heads_msa * C;
  return (s * ce + s * (2 * C + hc) + ce + hc) * kF;
}

// The global attention as the attention kernel sees it: per residue b, the H heads are H queries
// of ONE kernel head of width C over the s keys. Sizes only; the caller sets the pointers.
kern::AttentionArgs global_attention_dims(const EvoformerConfig& cfg, int64_t n, int64_t s) {
  kern::AttentionArgs a;
  a.B = n, a.Lq = cfg.no_heads_msa, a.Lk = s, a.H = 1, a.C = cfg.c_hidden_msa_att;
  a.scale = 1.f / std::sqrt(static_cast<float>(a.C));
  return a;
}

// Sizes of the module at a context.
struct GlobalDims {
  int64_t s, r, ce, H, C, hc, ld;  // ld: width of k | v | g = 2C + H*C
};
GlobalDims global_dims(const BlockContext& ctx) {
  const EvoformerConfig& c = *ctx.cfg;
  const int64_t H = c.no_heads_msa, C = c.c_hidden_msa_att;
  return {ctx.s, ctx.r, c.c_m, H, C, H * C, 2 * C + H * C};
}

// x [n, s, c_e] = LN of columns r0 .. r0+n of m [s, r, c_e]; statistics [n*s] when mean/rstd are
// non-null.
void layernorm_columns(const LayerNormW& ln, const BlockContext& ctx, const GlobalDims& d,
                       const float* m, int64_t r0, int64_t n, float* x, float* mean, float* rstd) {
  for (int64_t b = 0; b < n; ++b)
    kern::layernorm(m + (r0 + b) * d.ce, d.r * d.ce, x + b * d.s * d.ce, d.ce, d.s, d.ce,
                    ln.w.f32(), ln.b.f32(), ctx.cfg->eps_ln, mean ? mean + b * d.s : nullptr,
                    rstd ? rstd + b * d.s : nullptr);
}

// Mask count of column b plus eps (the masked mean's denominator), summed as the forward does.
float column_count(const BlockContext& ctx, const GlobalDims& d, int64_t col) {
  float count = 0.f;
  for (int64_t j = 0; j < d.s; ++j) count += ctx.msa_mask[j * d.r + col];
  return count + ctx.global_eps;
}

// mu [n, c_e]: mu[b] = sum_j mask[j, r0+b] x[b, j] / (sum_j mask[j, r0+b] + eps).
void masked_means(const BlockContext& ctx, const GlobalDims& d, const float* x, int64_t r0,
                  int64_t n, float* mu) {
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < n; ++b) {
    float* u = mu + b * d.ce;
    std::fill(u, u + d.ce, 0.f);
    for (int64_t j = 0; j < d.s; ++j) {
      const float mk = ctx.msa_mask[j * d.r + r0 + b];
      const float* xr = x + (b * d.s + j) * d.ce;
      for (int64_t c = 0; c < d.ce; ++c) u[c] += mk * xr[c];
    }
    const float den = column_count(ctx, d, r0 + b);
    for (int64_t c = 0; c < d.ce; ++c) u[c] /= den;
  }
}

// The attention of n columns as the kernel sees it: per column, the H heads are H queries of one
// kernel head of width C over the s keys (as the inference form runs it).
kern::AttentionArgs global_args(const GlobalDims& d, const BlockContext& ctx,
                                const GlobalAttentionChunk& k, int64_t r0, int64_t n) {
  kern::AttentionArgs a;
  a.B = n, a.Lq = d.H, a.Lk = d.s, a.H = 1, a.C = d.C;
  a.scale = 1.f / std::sqrt(static_cast<float>(d.C));
  a.q = k.q.f32(), a.q_bs = d.hc, a.q_rs = d.C;
  a.k = k.kvg.f32(), a.k_bs = d.s * d.ld, a.k_rs = d.ld;
  a.v = k.kvg.f32() + d.C, a.v_bs = d.s * d.ld, a.v_rs = d.ld;
  a.mask_bias = ctx.msa_bias_t + r0 * d.s;  // [n, s]
  a.o = k.o.f32(), a.o_bs = d.hc, a.o_rs = d.C;
  return a;
}

// The chunk state of columns r0 .. r0+n from their normalised input x [n, s, c_e].
GlobalAttentionChunk chunk_state(const MsaColumnGlobalAttentionW& w, const BlockContext& ctx,
                                 const GlobalDims& d, const float* x, int64_t r0, int64_t n) {
  GlobalAttentionChunk k;
  {
    Tensor mu = Tensor::empty({n, d.ce});  // masked means
    masked_means(ctx, d, x, r0, n, mu.f32());
    k.q = Tensor::empty({n, d.hc});
    kern::linear(mu.f32(), d.ce, n, d.ce, w.q.w.f32(), nullptr, d.hc, k.q.f32(), d.hc);
  }
  k.kvg = Tensor::empty({n * d.s, d.ld});
  kern::linear(x, d.ce, n * d.s, d.ce, w.kvg.w.f32(), w.kvg.b.f32(), d.ld, k.kvg.f32(), d.ld);
  k.o = Tensor::empty({n, d.hc});
  k.lse = Tensor::empty({n, d.H});
  kern::AttentionArgs a = global_args(d, ctx, k, r0, n);
  a.lse = k.lse.f32();
  Tensor scratch = Tensor::empty({kern::attention_scratch_floats(a, ctx.threads)});
  kern::attention(a, scratch.f32(), ctx.threads);
  return k;
}

// y [n*s, H*C]: y[(b, j)] = o[b] * sigmoid(g[(b, j)]), the input of linear_o.
void gated_outputs(const GlobalDims& d, const GlobalAttentionChunk& k, int64_t n, float* y) {
  const float* kp = k.kvg.f32();
  const float* op = k.o.f32();
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < n * d.s; ++row)
    std::memcpy(y + row * d.hc, kp + row * d.ld + 2 * d.C, static_cast<size_t>(d.hc) * kF);
  kern::sigmoid_inplace(y, d.hc, n * d.s, d.hc);
  // Column b's s rows times o[b] (broadcast, ldx 0): one call per column, not one nested
  // parallel region per row (that cost more than the rest of the module).
  for (int64_t b = 0; b < n; ++b)
    kern::mul_inplace(y + b * d.s * d.hc, d.hc, op + b * d.hc, 0, d.s, d.hc);
}

// Backward of the gating: given dy [n*s, H*C] (overwritten with dy * sigmoid(g)), writes dg (the
// gate columns of dkvg, ld) and do [n, H*C]: do[b] = sum_j dy[(b, j)] * sigmoid(g[(b, j)]), summed
// over j in order. The vectorised sigmoid-gate backward per column (o[b] broadcast), not a scalar
// exp per element (that was a third of the module's backward).
void gate_backward(const GlobalDims& d, const GlobalAttentionChunk& k, int64_t n, float* dy,
                   float* dkvg, float* dout) {
  const float* kp = k.kvg.f32();
  const float* op = k.o.f32();
  for (int64_t b = 0; b < n; ++b) {
    const int64_t row0 = b * d.s;
    kern::sigmoid_mul_backward(op + b * d.hc, 0, kp + row0 * d.ld + 2 * d.C, d.ld, dy + row0 * d.hc,
                               d.hc, dy + row0 * d.hc, d.hc, dkvg + row0 * d.ld + 2 * d.C, d.ld,
                               d.s, d.hc);
  }
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < n; ++b) {
    float* dob = dout + b * d.hc;
    std::fill(dob, dob + d.hc, 0.f);
    for (int64_t j = 0; j < d.s; ++j) {
      const float* dyr = dy + (b * d.s + j) * d.hc;
      for (int64_t c = 0; c < d.hc; ++c) dob[c] += dyr[c];
    }
  }
}

kern::AttentionArgs replay_dims(const GlobalDims& d, int64_t n) {
  kern::AttentionArgs a;
  a.B = n, a.Lq = d.H, a.Lk = d.s, a.H = 1, a.C = d.C;
  return a;
}

int64_t replay_state(const GlobalDims& d, int64_t n) {
  return n * d.s * d.ld + 2 * n * d.hc + n * d.H;  // kvg, q, o, lse
}

// chunk_state: the means (transient), q, kvg, o, lse and the attention scratch (transient).
void replay_chunk_state(AllocReplay& S, const BlockContext& ctx, const GlobalDims& d, int64_t n) {
  const int64_t scratch = kern::attention_scratch_floats(replay_dims(d, n), ctx.threads);
  S.alloc(n * d.ce);  // mu
  S.alloc(n * d.hc);  // q
  S.free(n * d.ce);
  S.alloc(n * d.s * d.ld + n * d.hc + n * d.H);  // kvg, o, lse
  S.alloc(scratch);
  S.free(scratch);
}
}  // namespace

// ---- Inference ---------------------------------------------------------------------------------

int64_t global_attention_chunk(const BlockContext& ctx) {
  return pick_chunk(ctx, ctx.r, global_attention_item_bytes(*ctx.cfg, ctx.s));
}

void msa_column_global_attention(const MsaColumnGlobalAttentionW& w, const BlockContext& ctx,
                                 float eps, float* m) {
  const EvoformerConfig& cfg = *ctx.cfg;
  const int64_t s = ctx.s, r = ctx.r, ce = cfg.c_m;
  const int64_t C = cfg.c_hidden_msa_att, hc = cfg.no_heads_msa * C, ld = 2 * C + hc;
  const int64_t ch = global_attention_chunk(ctx);
  Tensor x = Tensor::empty({ch, s, ce});     // LN(m^T) chunk, then the update
  Tensor kvg = Tensor::empty({ch * s, ld});  // [(b, j), k | v | g]
  Tensor mean = Tensor::empty({ch, ce});     // masked mean of x over the sequences
  Tensor qo = Tensor::empty({ch, hc});       // q, then the attention output o (in place)
  Tensor scratch = Tensor::empty(
      {kern::attention_scratch_floats(global_attention_dims(cfg, ch, s), ctx.threads)});
  float* xp = x.f32();
  float* kp = kvg.f32();
  float* gp = kp + 2 * C;  // gate columns of kvg
  float* mp = mean.f32();
  float* qp = qo.f32();
  for (int64_t r0 = 0; r0 < r; r0 += ch) {
    const int64_t n = std::min(ch, r - r0);
    for (int64_t b = 0; b < n; ++b)
      kern::layernorm(m + (r0 + b) * ce, r * ce, xp + b * s * ce, ce, s, ce, w.ln_m.w.f32(),
                      w.ln_m.b.f32(), cfg.eps_ln);
      // mean[b] = sum_j x[b, j] mask[j, b] / (sum_j mask[j, b] + eps)
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < n; ++b) {
      float* mu = mp + b * ce;
      std::fill(mu, mu + ce, 0.f);
      float count = 0.f;
      for (int64_t j = 0; j < s; ++j) {
        const float mk = ctx.msa_mask[j * r + r0 + b];
        const float* xr = xp + (b * s + j) * ce;
        count += mk;
        for (int64_t c = 0; c < ce; ++c) mu[c] += mk * xr[c];
      }
      for (int64_t c = 0; c < ce; ++c) mu[c] /= count + eps;
    }
    kern::linear(mp, ce, n, ce, w.q.w.f32(), nullptr, hc, qp, hc);
    kern::linear(xp, ce, n * s, ce, w.kvg.w.f32(), w.kvg.b.f32(), ld, kp, ld);
    kern::AttentionArgs a = global_attention_dims(cfg, n, s);
    a.q = qp, a.q_bs = hc, a.q_rs = C;  // q [b, h*C + c]: head h is query h
    a.k = kp, a.k_bs = s * ld, a.k_rs = ld;
    a.v = kp + C, a.v_bs = s * ld, a.v_rs = ld;
    a.mask_bias = ctx.msa_bias_t + r0 * s;  // [n, s]
    a.o = qp, a.o_bs = hc, a.o_rs = C;      // a query tile is read before it is overwritten
    kern::attention(a, scratch.f32(), ctx.threads);
    // g[b, j] = o[b] * sigmoid(linear_g(x[b, j]))
    kern::sigmoid_inplace(gp, ld, n * s, hc);
    for (int64_t b = 0; b < n; ++b)  // column b's s rows times o[b] (broadcast)
      kern::mul_inplace(gp + b * s * ld, ld, qp + b * hc, 0, s, hc);
    kern::linear(gp, ld, n * s, hc, w.o.w.f32(), bias_ptr(w.o), ce, xp, ce);
    for (int64_t b = 0; b < n; ++b)
      kern::add_inplace(m + (r0 + b) * ce, r * ce, xp + b * s * ce, ce, s, ce);
  }
}

int64_t msa_column_global_attention_bytes(const BlockContext& ctx) {
  const EvoformerConfig& cfg = *ctx.cfg;
  const int64_t item = global_attention_item_bytes(cfg, ctx.s);
  const int64_t ch = global_attention_chunk(ctx);
  return ch * item +
         kern::attention_scratch_floats(global_attention_dims(cfg, ch, ctx.s), ctx.threads) * kF;
}

// ---- Training ----------------------------------------------------------------------------------

int64_t global_attention_train_chunk(const BlockContext& ctx) {
  return pick_chunk(ctx, global_dims(ctx).r, global_attention_train_item_bytes(ctx));
}

int64_t global_attention_train_item_bytes(const BlockContext& ctx) {
  const GlobalDims d = global_dims(ctx);
  // Per column: x, du, dLN(x) [s, c_e]; k|v|g and its gradient [s, ld]; y, dy [s, H*C]; the LN
  // statistics; the small per-column vectors (mu, q, o, dq, do, dmu).
  return (d.s * (3 * d.ce + 2 * d.ld + 2 * d.hc + 2) + 2 * d.ce + 4 * d.hc) * kF;
}

void msa_column_global_attention_train(const MsaColumnGlobalAttentionW& w, const BlockContext& ctx,
                                       float* m, GlobalAttentionState* st) {
  const GlobalDims d = global_dims(ctx);
  const int64_t ch = global_attention_train_chunk(ctx);
  for (int64_t r0 = 0; r0 < d.r; r0 += ch) {
    const int64_t n = std::min(ch, d.r - r0), rows = n * d.s;
    GlobalAttentionChunk k;
    {
      Tensor x = Tensor::empty({n, d.s, d.ce});  // LN of the chunk's columns
      layernorm_columns(w.ln_m, ctx, d, m, r0, n, x.f32(), nullptr, nullptr);
      k = chunk_state(w, ctx, d, x.f32(), r0, n);
    }
    Tensor y = Tensor::empty({rows, d.hc});  // gated attention output
    gated_outputs(d, k, n, y.f32());
    Tensor u = Tensor::empty({n, d.s, d.ce});  // the chunk's update
    kern::linear(y.f32(), d.hc, rows, d.hc, w.o.w.f32(), w.o.b.f32(), d.ce, u.f32(), d.ce);
    y = Tensor();
    for (int64_t b = 0; b < n; ++b)
      kern::add_inplace(m + (r0 + b) * d.ce, d.r * d.ce, u.f32() + b * d.s * d.ce, d.ce, d.s, d.ce);
    u = Tensor();
    if (st) st->chunks.push_back(std::move(k));
  }
}

void msa_column_global_attention_backward(const MsaColumnGlobalAttentionW& w,
                                          MsaColumnGlobalAttentionW* g, const BlockContext& ctx,
                                          const float* m_in, GlobalAttentionState* st, float* dm) {
  const GlobalDims d = global_dims(ctx);
  const int64_t ch = global_attention_train_chunk(ctx);
  std::vector<GlobalAttentionChunk>& kept = st->chunks;
  FC_CHECK_MSG(kept.empty() || static_cast<int64_t>(kept.size()) == (d.r + ch - 1) / ch,
               "global attention state was saved with another chunking");
  for (int64_t r0 = 0, idx = 0; r0 < d.r; r0 += ch, ++idx) {
    const int64_t n = std::min(ch, d.r - r0), rows = n * d.s;
    NormedRows ln = normed_rows({n, d.s, d.ce}, rows);  // LN of the chunk's columns
    layernorm_columns(w.ln_m, ctx, d, m_in, r0, n, ln.y.f32(), ln.mean.f32(), ln.rstd.f32());
    GlobalAttentionChunk k =
        kept.empty() ? chunk_state(w, ctx, d, ln.y.f32(), r0, n) : std::move(kept[idx]);
    Tensor mu = Tensor::empty({n, d.ce});  // masked means (input of linear_q)
    masked_means(ctx, d, ln.y.f32(), r0, n, mu.f32());
    Tensor dy = Tensor::empty({rows, d.hc});  // dL/d the gated output
    {
      Tensor du = Tensor::empty({n, d.s, d.ce});  // dL/d update
      for (int64_t b = 0; b < n; ++b)
        for (int64_t j = 0; j < d.s; ++j)
          std::memcpy(du.f32() + (b * d.s + j) * d.ce, dm + (j * d.r + r0 + b) * d.ce,
                      static_cast<size_t>(d.ce) * kF);
      Tensor y = Tensor::empty({rows, d.hc});
      gated_outputs(d, k, n, y.f32());
      kern::linear_backward(y.f32(), d.hc, rows, d.hc, w.o.w.f32(), d.ce, du.f32(), d.ce, dy.f32(),
                            d.hc, g->o.w.f32(), g->o.b.f32());
    }
    Tensor dkvg = Tensor::empty({rows, d.ld});  // dL/d k | v | g
    Tensor dout = Tensor::empty({n, d.hc});     // dL/d o
    gate_backward(d, k, n, dy.f32(), dkvg.f32(), dout.f32());
    dy = Tensor();
    Tensor dq = Tensor::empty({n, d.hc});
    {
      const kern::AttentionArgs a = global_args(d, ctx, k, r0, n);
      kern::AttentionGrads ag;
      ag.d_out = dout.f32();
      ag.dq = dq.f32();
      ag.dk = dkvg.f32();
      ag.dv = dkvg.f32() + d.C;
      ag.lse = k.lse.f32();
      Tensor scratch =
          Tensor::empty({kern::attention_backward_scratch_floats(a, ctx.threads, false)});
      kern::attention_backward(a, ag, scratch.f32(), ctx.threads);
    }
    dout = Tensor();
    k.o = Tensor();
    k.lse = Tensor();
    Tensor dmu = Tensor::empty({n, d.ce});  // dL/d mu
    kern::linear_backward(mu.f32(), d.ce, n, d.ce, w.q.w.f32(), d.hc, dq.f32(), d.hc, dmu.f32(),
                          d.ce, g->q.w.f32(), nullptr);
    dq = Tensor();
    k.q = Tensor();
    mu = Tensor();
    Tensor dxln = Tensor::empty({n, d.s, d.ce});  // dL/d LN(x)
    kern::linear_backward(ln.y.f32(), d.ce, rows, d.ce, w.kvg.w.f32(), d.ld, dkvg.f32(), d.ld,
                          dxln.f32(), d.ce, g->kvg.w.f32(), g->kvg.b.f32());
    dkvg = Tensor();
    k.kvg = Tensor();
    ln.y = Tensor();
    // The masked mean's share: dLN(x)[b, j] += mask[j, b] / (count_b + eps) * dmu[b].
    const float* dmp = dmu.f32();
    float* dxp = dxln.f32();
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < n; ++b) {
      const float den = column_count(ctx, d, r0 + b);
      for (int64_t j = 0; j < d.s; ++j) {
        const float f = ctx.msa_mask[j * d.r + r0 + b] / den;
        float* dr = dxp + (b * d.s + j) * d.ce;
        for (int64_t c = 0; c < d.ce; ++c) dr[c] += f * dmp[b * d.ce + c];
      }
    }
    dmu = Tensor();
    Tensor scratch = Tensor::empty({kern::layernorm_backward_scratch_floats(d.s, d.ce)});
    for (int64_t b = 0; b < n; ++b)
      kern::layernorm_backward(
          m_in + (r0 + b) * d.ce, d.r * d.ce, dxp + b * d.s * d.ce, d.ce, d.s, d.ce, w.ln_m.w.f32(),
          ln.mean.f32() + b * d.s, ln.rstd.f32() + b * d.s, dm + (r0 + b) * d.ce, d.r * d.ce,
          g->ln_m.w.f32(), g->ln_m.b.f32(), scratch.f32(), /*accumulate=*/true);
  }
  kept.clear();
}

// ---- Models ------------------------------------------------------------------------------------

// Global column attention (ExtraMSA), chunked over columns: per column the k | v | g projection [s,
// c_e] x [c_e, 2C + HC], the query of the masked mean, the attention of H queries over s keys with
// one head, the gating and linear_o. rb: LN, means, q, k | v | g and the attention, not the gating
// nor linear_o.
LayerWork global_attention_work(const EvoformerConfig& cfg, int64_t s, int64_t r,
                                const WorkChunks& ch, LayerWork* rb) {
  const int64_t ce = cfg.c_m, H = cfg.no_heads_msa, C = cfg.c_hidden_msa_att, hc = H * C;
  const int64_t ld = 2 * C + hc;
  const int64_t n =
      ch.training ? global_attention_train_chunk(*ch.ctx) : global_attention_chunk(*ch.ctx);
  const double sr = static_cast<double>(s) * r;
  LayerWork w;
  w.chunks += div_ceil(r, n);
  w.gemm.push_back({2 * sr * ce * ld, static_cast<double>(n * s)});
  w.gemm.push_back({2.0 * r * ce * hc, static_cast<double>(n)});
  w.att.push_back({attention_flops(r, 1, H, s, C), static_cast<double>(s)});
  w.att_scores = static_cast<double>(r) * H * s;
  w.gemm.push_back({2 * sr * hc * ce, static_cast<double>(n * s)});
  // LayerNorm, masked mean, gating (inference: sigmoid and multiply in place; training: the gate
  // columns copied out first, gated_outputs), residual add.
  w.mem += 2 * sr * ce + sr * ce + (ch.training ? 6 : 4) * sr * hc + 3 * sr * ce;
  w.re_mem += 3 * sr * ce;  // LayerNorm and masked mean rebuilt per chunk
  if (rb) {
    *rb = LayerWork{};
    rb->chunks = w.chunks;
    rb->gemm = {w.gemm[0], w.gemm[1]};
    rb->att = w.att;
    rb->att_scores = w.att_scores;
    rb->mem = 3 * sr * ce;
  }
  return w;
}

void global_attention_train_replay(AllocReplay& S, const BlockContext& ctx, bool keep) {
  const GlobalDims d = global_dims(ctx);
  const int64_t ch = global_attention_train_chunk(ctx);
  for (int64_t r0 = 0; r0 < ctx.r; r0 += ch) {
    const int64_t n = std::min(ch, ctx.r - r0), rows = n * d.s;
    S.alloc(rows * d.ce);  // x
    replay_chunk_state(S, ctx, d, n);
    S.free(rows * d.ce);
    S.alloc(rows * (d.hc + d.ce));  // y, u
    S.free(rows * (d.hc + d.ce));
    if (!keep) S.free(replay_state(d, n));
  }
}

void global_attention_backward_replay(AllocReplay& S, const BlockContext& ctx, bool kept) {
  const GlobalDims d = global_dims(ctx);
  const int64_t ch = global_attention_train_chunk(ctx);
  for (int64_t r0 = 0; r0 < ctx.r; r0 += ch) {
    const int64_t n = std::min(ch, ctx.r - r0), rows = n * d.s;
    S.alloc(rows * d.ce + 2 * rows);  // x, mean, rstd
    if (!kept) replay_chunk_state(S, ctx, d, n);
    S.alloc(n * d.ce);              // mu
    S.alloc(rows * d.hc);           // dy
    S.alloc(rows * (d.ce + d.hc));  // du, y
    S.free(rows * (d.ce + d.hc));
    S.alloc(rows * d.ld + n * d.hc);  // dkvg, dout
    S.free(rows * d.hc);              // dy
    S.alloc(n * d.hc);                // dq
    const int64_t scratch =
        kern::attention_backward_scratch_floats(replay_dims(d, n), ctx.threads, false);
    S.alloc(scratch);
    S.free(scratch);
    S.free(2 * n * d.hc + n * d.H);         // dout, o, lse
    S.alloc(n * d.ce);                      // dmu
    S.free(2 * n * d.hc + n * d.ce);        // dq, q, mu
    S.alloc(rows * d.ce);                   // dxln
    S.free(2 * rows * d.ld + rows * d.ce);  // dkvg, kvg, x
    S.free(n * d.ce);                       // dmu
    S.alloc(ln_scratch(d.s, d.ce));
    S.free(ln_scratch(d.s, d.ce) + rows * d.ce + 2 * rows);  // scratch, dxln, mean, rstd
  }
}

}  // namespace fc
