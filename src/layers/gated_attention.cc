#include "layers/gated_attention.h"

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

// Self-attention of B items over L positions with H heads of width C: sizes and scale only; the
// caller sets the pointers.
kern::AttentionArgs attention_dims(int64_t H, int64_t C, int64_t B, int64_t L) {
  kern::AttentionArgs a;
  a.B = B, a.Lq = L, a.Lk = L, a.H = H, a.C = C;
  a.scale = 1.f / std::sqrt(static_cast<float>(C));
  return a;
}

// Without a query / key projection (w.bias_logits) the projections write the v | g columns of
// q|k|v|g only: the first column written and how many (of 4*H*C).
int64_t proj_col0(const GatedAttentionW& w, int64_t hc) { return w.bias_logits ? 2 * hc : 0; }

// Bias-only logits for such weights: q and k are not read.
void set_bias_logits(const GatedAttentionW& w, kern::AttentionArgs* a) {
  if (!w.bias_logits) return;
  a->bias_logits = true;
  a->q = nullptr, a->k = nullptr;
}

// y [rows, 4*H*C] (q | k | v | g columns; v | g only under w.bias_logits) = x [rows, c_in]
// W_qkvg^T + b_qkvg.
void project_qkvg(const GatedAttentionW& w, int64_t hc, const float* x, int64_t rows, float* y) {
  const int64_t c_in = w.w_qkvg.dim(1), c0 = proj_col0(w, hc);
  kern::linear(x, c_in, rows, c_in, w.w_qkvg.f32() + c0 * c_in, w.b_qkvg.f32() + c0, 4 * hc - c0,
               y + c0, 4 * hc);
}

// Gated self-attention over L positions for B batch items.
// x [B, L, c_in] is the normalised input; out [B, L, c_in] receives linear_o(gated attention).
// mask_bias [B, L] (per key), bias [H, L, L] (shared over the batch) or nullptr.
// Allocates qkvg [B*L, 4*H*C] and the attention scratch.
void gated_attention(const GatedAttentionW& w, int64_t H, int64_t C, const float* x, int64_t B,
                     int64_t L, const float* mask_bias, const float* bias, float* out,
                     int threads) {
  const int64_t c_in = w.w_qkvg.dim(1), hc = H * C, ld = 4 * hc;
  Tensor qkvg = Tensor::empty({B * L, ld});  // [B*L, q | k | v | g]
  float* p = qkvg.f32();
  project_qkvg(w, hc, x, B * L, p);
  kern::AttentionArgs a = attention_dims(H, C, B, L);
  a.q = p, a.q_bs = L * ld, a.q_rs = ld;
  a.k = p + hc, a.k_bs = L * ld, a.k_rs = ld;
  a.v = p + 2 * hc, a.v_bs = L * ld, a.v_rs = ld;
  a.gate = p + 3 * hc, a.g_bs = L * ld, a.g_rs = ld;
  a.o = p, a.o_bs = L * ld, a.o_rs = ld;  // each (b, h) item overwrites only its own q slot
  a.mask_bias = mask_bias;
  a.pair_bias = bias;
  set_bias_logits(w, &a);
  {
    Tensor scratch = Tensor::empty({kern::attention_scratch_floats(a, threads)});
    kern::attention(a, scratch.f32(), threads);
  }
  kern::linear(p, ld, B * L, hc, w.o.w.f32(), bias_ptr(w.o), c_in, out, c_in);
}

int64_t gated_attention_bytes(int64_t H, int64_t C, int64_t B, int64_t L, int threads) {
  return B * L * 4 * H * C * kF +
         kern::attention_scratch_floats(attention_dims(H, C, B, L), threads) * kF;
}

// The fused projection of chunk items [n0, n0 + n) of S (see attention_module) to y [n*L, 4*H*C]:
// LN rows read in place (strided when transposed), q | k | v | g written per row.
// wb: gemm_weights(w.w_qkvg, dtype).
kern::LayerNormLinearArgs qkvg_args(const LayerNormW& ln, const GatedAttentionW& w,
                                    const Tensor& wb, DType dtype, float eps, const float* S,
                                    int64_t n0, int64_t n, int64_t N, int64_t L, int64_t c,
                                    bool transposed, float* y) {
  kern::LayerNormLinearArgs a = ln_linear_dims(n, L, c, w.w_qkvg.dim(0), dtype);
  a.W_bf16 = bf16_ptr(wb);
  a.x = S + (transposed ? n0 * c : n0 * L * c);
  a.x_bs = transposed ? c : L * c;
  a.x_rs = transposed ? N * c : c;
  a.gamma = ln.w.f32(), a.beta = ln.b.f32(), a.eps = eps;
  a.W = w.w_qkvg.f32(), a.bias = w.b_qkvg.f32();
  a.y = y, a.ldy = a.out;
  return a;
}

// linear_o of the chunk's attention output o (q slots of qkvg p [n*L, 4*H*C]) added to items
// [n0, n0 + n) of S (strided when transposed, as qkvg_args reads them). wo: gemm_weights(w.o.w,
// dtype).
kern::LinearResidualArgs output_args(const GatedAttentionW& w, const Tensor& wo, DType dtype,
                                     const float* p, float* S, int64_t n0, int64_t n, int64_t N,
                                     int64_t L, int64_t c, bool transposed) {
  kern::LinearResidualArgs a;
  a.B = n, a.L = L, a.in = w.o.w.dim(1), a.out = c;
  a.dtype = dtype, a.W_bf16 = bf16_ptr(wo);
  a.x = p, a.ldx = 4 * a.in;
  a.W = w.o.w.f32(), a.bias = bias_ptr(w.o);
  a.y = S + (transposed ? n0 * c : n0 * L * c);
  a.y_bs = transposed ? c : L * c;
  a.y_rs = transposed ? N * c : c;
  return a;
}

// The fused attention module (ctx.fused): per chunk, qkvg [n*L, 4*H*C] straight from the
// LayerNorm-Linear kernel (no normalised chunk), the attention in place, then linear_o added to
// the stream rows block by block (no update chunk).
void attention_module_fused(const LayerNormW& ln, const GatedAttentionW& w, int64_t H, int64_t C,
                            const BlockContext& ctx, float* S, int64_t N, int64_t L, int64_t c,
                            bool transposed, const float* mask_bias, const float* bias) {
  const int64_t ch = attention_chunk(ctx, H, C, N, L, c);
  const int64_t hc = H * C, ld = 4 * hc;
  const Tensor wb = gemm_weights(w.w_qkvg, ctx.dtype);  // [4*H*C, c] bf16 (BF16 only)
  const Tensor wo = gemm_weights(w.o.w, ctx.dtype);     // [c, H*C] bf16 (BF16 only)
  Tensor qkvg = Tensor::empty({ch * L, ld});            // [(b, l), q | k | v | g] of a chunk
  float* p = qkvg.f32();
  for (int64_t n0 = 0; n0 < N; n0 += ch) {
    const int64_t n = std::min(ch, N - n0);
    kern::AttentionArgs a = attention_dims(H, C, n, L);
    a.q = p, a.q_bs = L * ld, a.q_rs = ld;
    a.k = p + hc, a.k_bs = L * ld, a.k_rs = ld;
    a.v = p + 2 * hc, a.v_bs = L * ld, a.v_rs = ld;
    a.gate = p + 3 * hc, a.g_bs = L * ld, a.g_rs = ld;
    a.o = p, a.o_bs = L * ld, a.o_rs = ld;
    a.mask_bias = mask_bias + n0 * L;
    a.pair_bias = bias;
    a.dtype = ctx.dtype;
    set_bias_logits(w, &a);
    {
      kern::LayerNormLinearArgs la =
          qkvg_args(ln, w, wb, ctx.dtype, ctx.cfg->eps_ln, S, n0, n, N, L, c, transposed, p);
      int64_t floats = kern::layernorm_linear_scratch_floats(la, ctx.threads);
      if (w.bias_logits) {
        // v | g only, when its (larger-block) scratch fits under the module's other scratch
        // buffers, so that the peak is attention_module_bytes' (else all four projections).
        kern::LayerNormLinearArgs vg = la;
        const int64_t c0 = proj_col0(w, hc);
        vg.out -= c0, vg.W += c0 * c, vg.bias += c0, vg.y += c0;
        if (vg.W_bf16) vg.W_bf16 += c0 * c;
        const int64_t need = kern::layernorm_linear_scratch_floats(vg, ctx.threads);
        kern::LinearResidualArgs lr;
        lr.B = n, lr.L = L, lr.in = hc, lr.out = c, lr.dtype = ctx.dtype;
        if (need <= std::max({floats, kern::attention_scratch_floats(a, ctx.threads),
                              kern::linear_residual_scratch_floats(lr, ctx.threads)}))
          la = vg, floats = need;
      }
      Tensor scratch = Tensor::empty({floats});
      kern::layernorm_linear(la, scratch.f32(), ctx.threads);
    }
    {
      Tensor scratch = Tensor::empty({kern::attention_scratch_floats(a, ctx.threads)});
      kern::attention(a, scratch.f32(), ctx.threads);
    }
    {
      const kern::LinearResidualArgs lr =
          output_args(w, wo, ctx.dtype, p, S, n0, n, N, L, c, transposed);
      Tensor scratch = Tensor::empty({kern::linear_residual_scratch_floats(lr, ctx.threads)});
      kern::linear_residual(lr, scratch.f32(), ctx.threads);
    }
  }
}

// x [n, L, c] = items n0 .. n0+n of S.
void gather(const float* S, const AttentionView& v, int64_t n0, int64_t n, float* x) {
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
void scatter_add(const float* x, const AttentionView& v, int64_t n0, int64_t n, float* S) {
  if (!v.transposed) {
    kern::add_inplace(S + v.item(n0), v.c, x, v.c, n * v.L, v.c);
    return;
  }
  for (int64_t b = 0; b < n; ++b)
    kern::add_inplace(S + v.item(n0 + b), v.row_stride(), x + b * v.L * v.c, v.c, v.L, v.c);
}

// y [n, L, c] = LayerNorm of items n0 .. n0+n of S (statistics [n*L] when mean/rstd non-null), in
// y's element type (F32, or BF16: the rounding, the bf16 training's GEMM input).
void layernorm_items(const LayerNormW& ln, float eps, const float* S, const AttentionView& v,
                     int64_t n0, int64_t n, Tensor& y, float* mean, float* rstd) {
  const bool bf = y.dtype() == DType::BF16;
  auto rows = [&](const float* x, int64_t ldx, int64_t count, int64_t off, float* mu, float* rs) {
    if (bf)
      kern::layernorm_bf16(x, ldx, y.data<uint16_t>() + off, v.c, count, v.c, ln.w.f32(),
                           ln.b.f32(), eps, mu, rs);
    else
      kern::layernorm(x, ldx, y.f32() + off, v.c, count, v.c, ln.w.f32(), ln.b.f32(), eps, mu, rs);
  };
  if (!v.transposed) return rows(S + v.item(n0), v.c, n * v.L, 0, mean, rstd);
  for (int64_t b = 0; b < n; ++b)
    rows(S + v.item(n0 + b), v.row_stride(), v.L, b * v.L * v.c, mean ? mean + b * v.L : nullptr,
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

// q|k|v|g and the gated output of items n0 .. n0+n from their normalised input x_ln [n, L, c]
// (bf16 under BF16 storage; og then bf16 too).
AttentionChunk chunk_state(const GatedAttentionSpec& at, const BlockContext& ctx,
                           const Tensor& x_ln, int64_t n0, int64_t n, const float* bias) {
  const int64_t hc = at.H * at.C, c = at.v.c, rows = n * at.v.L;
  const bool bf = ctx.store == DType::BF16;
  AttentionChunk k;
  k.qkvg = Tensor::empty({rows, 4 * hc});
  const int64_t c0 = proj_col0(at.w, hc);  // bias-only logits: the v | g columns only
  if (bf)
    train_linear(ctx, x_ln.data<uint16_t>(), c, rows, c, at.w.w_qkvg.f32() + c0 * c,
                 at.w.b_qkvg.f32() + c0, 4 * hc - c0, k.qkvg.f32() + c0, 4 * hc);
  else
    train_linear(ctx, x_ln.f32(), c, rows, c, at.w.w_qkvg.f32() + c0 * c, at.w.b_qkvg.f32() + c0,
                 4 * hc - c0, k.qkvg.f32() + c0, 4 * hc);
  round_for_store(ctx, k.qkvg);
  k.og = Tensor::empty({rows, hc});
  k.lse = Tensor::empty({n, at.H, at.v.L});
  kern::AttentionArgs a = attention_args(k.qkvg.f32(), at.H, at.C, n, at.v.L,
                                         at.mask_bias + n0 * at.v.L, bias, k.og.f32());
  a.lse = k.lse.f32();
  set_bias_logits(at.w, &a);
  a.dtype = ctx.store;  // bf16 training: bf16 dot products (q|k|v|g hold bf16 values already)
  {
    Tensor scratch = Tensor::empty({kern::attention_scratch_floats(a, ctx.threads)});
    kern::attention(a, scratch.f32(), ctx.threads);
  }
  if (bf) {
    Tensor og = Tensor::empty({rows, hc}, DType::BF16);  // bf16(og)
    kern::f32_to_bf16(k.og.f32(), og.data<uint16_t>(), rows * hc);
    k.og = std::move(og);
  }
  return k;
}

// linear_o's input: og in f32, or bf16 under BF16 storage (chunk_state).
void linear_o_train(const BlockContext& ctx, const GatedAttentionW& w, const Tensor& og,
                    int64_t rows, int64_t hc, float* u, int64_t c) {
  if (og.dtype() == DType::BF16)
    train_linear(ctx, og.data<uint16_t>(), hc, rows, hc, w.o.w.f32(), bias_ptr(w.o), c, u, c);
  else
    train_linear(ctx, og.f32(), hc, rows, hc, w.o.w.f32(), bias_ptr(w.o), c, u, c);
}

// The first projected column of q | k | v | g in the replays (proj_col0 of the weights).
int64_t proj_cols0(const AttentionDims& d) { return d.bias_logits ? 2 * d.H * d.C : 0; }

kern::AttentionArgs replay_dims(const AttentionDims& d, int64_t n) {
  kern::AttentionArgs a;
  a.B = n, a.Lq = d.L, a.Lk = d.L, a.H = d.H, a.C = d.C;
  return a;
}

GatedAttentionSpec row_attn(const MsaRowAttentionW& w, const BlockContext& ctx) {
  const EvoformerConfig& cfg = *ctx.cfg;
  return {"msa_att_row",
          w.ln_m,
          w.mha,
          cfg.no_heads_msa,
          cfg.c_hidden_msa_att,
          {ctx.s, ctx.r, cfg.c_m, false},
          ctx.msa_bias};
}
}  // namespace

// ---- Inference ---------------------------------------------------------------------------------

int64_t attention_chunk(const BlockContext& ctx, int64_t H, int64_t C, int64_t N, int64_t L,
                        int64_t c) {
  return pick_chunk(ctx, N, L * c * 2 * kF + L * 4 * H * C * kF);
}

// Attention module over a stream S viewed as [N, L, c] (batch over N, attention over L), or, when
// transposed, S viewed as [L, N, c] with batch over N = dim 1. bias: [H, L, L] or nullptr.
// mask_bias: [N, L].
void attention_module(const LayerNormW& ln, const GatedAttentionW& w, int64_t H, int64_t C,
                      const BlockContext& ctx, float* S, int64_t N, int64_t L, int64_t c,
                      bool transposed, const float* mask_bias, const float* bias) {
  if (ctx.fused)
    return attention_module_fused(ln, w, H, C, ctx, S, N, L, c, transposed, mask_bias, bias);
  const int64_t ch = attention_chunk(ctx, H, C, N, L, c);
  Tensor x = Tensor::empty({ch, L, c});    // normalised input chunk
  Tensor out = Tensor::empty({ch, L, c});  // update chunk
  const float eps = ctx.cfg->eps_ln;
  for (int64_t n0 = 0; n0 < N; n0 += ch) {
    const int64_t n = std::min(ch, N - n0);
    if (!transposed) {
      kern::layernorm(S + n0 * L * c, c, x.f32(), c, n * L, c, ln.w.f32(), ln.b.f32(), eps);
    } else {
      for (int64_t b = 0; b < n; ++b)
        kern::layernorm(S + (n0 + b) * c, N * c, x.f32() + b * L * c, c, L, c, ln.w.f32(),
                        ln.b.f32(), eps);
    }
    gated_attention(w, H, C, x.f32(), n, L, mask_bias + n0 * L, bias, out.f32(), ctx.threads);
    if (!transposed) {
      kern::add_inplace(S + n0 * L * c, c, out.f32(), c, n * L, c);
    } else {
      for (int64_t b = 0; b < n; ++b)
        kern::add_inplace(S + (n0 + b) * c, N * c, out.f32() + b * L * c, c, L, c);
    }
  }
}

int64_t attention_module_bytes(int64_t H, int64_t C, const BlockContext& ctx, int64_t N, int64_t L,
                               int64_t c) {
  const int64_t ch = attention_chunk(ctx, H, C, N, L, c);
  if (ctx.fused) {
    kern::LinearResidualArgs lr;
    lr.B = ch, lr.L = L, lr.in = H * C, lr.out = c, lr.dtype = ctx.dtype;
    return gemm_weights_bytes(5 * H * C * c, ctx.dtype) + ch * L * 4 * H * C * kF +
           std::max({kern::layernorm_linear_scratch_floats(
                         ln_linear_dims(ch, L, c, 4 * H * C, ctx.dtype), ctx.threads),
                     kern::attention_scratch_floats(attention_dims(H, C, ch, L), ctx.threads),
                     kern::linear_residual_scratch_floats(lr, ctx.threads)}) *
               kF;
  }
  return 2 * ch * L * c * kF + gated_attention_bytes(H, C, ch, L, ctx.threads);
}

void attention_rows(const LayerNormW& ln, const GatedAttentionW& w, int64_t H, int64_t C,
                    const BlockContext& ctx, float* S, int64_t N, int64_t L, int64_t c,
                    const float* mask_bias, const float* bias) {
  attention_module(ln, w, H, C, ctx, S, N, L, c, false, mask_bias, bias);
}

void msa_row_attention(const MsaRowAttentionW& w, const BlockContext& ctx, float* m,
                       const float* z) {
  const EvoformerConfig& cfg = *ctx.cfg;
  Tensor bias = pair_bias_heads(w.ln_z, w.lin_z, ctx, z, false);  // [H_m, r, r]
  attention_module(w.ln_m, w.mha, cfg.no_heads_msa, cfg.c_hidden_msa_att, ctx, m, ctx.s, ctx.r,
                   cfg.c_m, false, ctx.msa_bias, bias.f32());
}

int64_t msa_row_attention_bytes(const BlockContext& ctx) {
  const EvoformerConfig& cfg = *ctx.cfg;
  const int64_t Hm = cfg.no_heads_msa, r = ctx.r;
  return std::max(
      pair_bias_heads_bytes(ctx, Hm),
      Hm * r * r * kF + attention_module_bytes(Hm, cfg.c_hidden_msa_att, ctx, ctx.s, r, cfg.c_m));
}

// ---- Training ----------------------------------------------------------------------------------

int64_t attention_train_chunk(const BlockContext& ctx, int64_t N, int64_t L, int64_t c,
                              int64_t hc) {
  return pick_chunk(ctx, N, attention_train_item_bytes(L, c, hc));
}

int64_t attention_train_item_bytes(int64_t L, int64_t c, int64_t hc) {
  // Per item: the chunk state (q|k|v|g, og) and the backward's buffers (x_ln, du, dln, dog,
  // dq|dk|dv|dg). The saved lse (H floats per position, small next to 5*H*C) is left out, so the
  // chunk picks are those from before it was saved.
  return L * (3 * c + 10 * hc) * kF;
}

// Forward over all chunks: S += update; chunk states appended to `keep` when non-null.
void attention_layer_train(const GatedAttentionSpec& at, const BlockContext& ctx, float* S,
                           const float* bias, std::vector<AttentionChunk>* keep) {
  const AttentionView& v = at.v;
  const int64_t ch = attention_train_chunk(ctx, v.N, v.L, v.c, at.H * at.C);
  // [L, c] shared over the items, or [N, 1] one per item (AF3), or undefined
  const bool per_item = dropout_per_item(ctx, at.module);
  const Tensor mask = per_item ? dropout_mask(ctx, at.module, v.N, 1, ctx.dropout_item0)
                               : dropout_mask(ctx, at.module, v.L, v.c);
  for (int64_t n0 = 0; n0 < v.N; n0 += ch) {
    const int64_t n = std::min(ch, v.N - n0);
    AttentionChunk k;
    {
      Tensor x_ln = Tensor::empty({n, v.L, v.c}, ctx.store);  // LN (bf16 under BF16 storage)
      layernorm_items(at.ln, ctx.cfg->eps_ln, S, v, n0, n, x_ln, nullptr, nullptr);
      k = chunk_state(at, ctx, x_ln, n0, n, bias);
    }
    {
      Tensor u = Tensor::empty({n, v.L, v.c});  // update of the chunk
      linear_o_train(ctx, at.w, k.og, n * v.L, at.H * at.C, u.f32(), v.c);
      if (per_item)
        apply_item_dropout(u.f32(), n0, n, v.L * v.c, mask);
      else
        apply_dropout(u.f32(), n, v.L, v.c, mask);
      scatter_add(u.f32(), v, n0, n, S);
    }
    if (keep) {
      k.qkvg = to_store(ctx, std::move(k.qkvg));
      keep->push_back(std::move(k));
    }
  }
}

// Backward over all chunks. S_in: the module input; dS: dL/d out on entry, dL/d in on exit.
// kept: the forward's chunk states (freed one by one) or empty (recomputed one by one).
// dbias [H, L, L] accumulates the bias gradient when non-null.
void attention_layer_backward(const GatedAttentionSpec& at, LayerNormW* gln, GatedAttentionW* gw,
                              const BlockContext& ctx, const float* S_in, float* dS,
                              const float* bias, std::vector<AttentionChunk>* kept, float* dbias) {
  const AttentionView& v = at.v;
  const int64_t hc = at.H * at.C, c = v.c;
  const int64_t ch = attention_train_chunk(ctx, v.N, v.L, c, hc);
  // as in attention_forward
  const bool per_item = dropout_per_item(ctx, at.module);
  const Tensor mask = per_item ? dropout_mask(ctx, at.module, v.N, 1, ctx.dropout_item0)
                               : dropout_mask(ctx, at.module, v.L, c);
  FC_CHECK_MSG(kept->empty() || static_cast<int64_t>(kept->size()) == (v.N + ch - 1) / ch,
               "attention state was saved with another chunking");
  for (int64_t n0 = 0, idx = 0; n0 < v.N; n0 += ch, ++idx) {
    const int64_t n = std::min(ch, v.N - n0), rows = n * v.L;
    // LN of the chunk's items (bf16 under BF16 storage)
    NormedRows ln = normed_rows({n, v.L, c}, rows, ctx.store);
    layernorm_items(at.ln, ctx.cfg->eps_ln, S_in, v, n0, n, ln.y, ln.mean.f32(), ln.rstd.f32());
    AttentionChunk k =
        kept->empty() ? chunk_state(at, ctx, ln.y, n0, n, bias) : std::move((*kept)[idx]);
    k.qkvg = from_store(std::move(k.qkvg));
    Tensor du = Tensor::empty({n, v.L, c});  // dL/d update, then dL/d x_in
    gather(dS, v, n0, n, du.f32());
    if (per_item)
      apply_item_dropout(du.f32(), n0, n, v.L * c, mask);
    else
      apply_dropout(du.f32(), n, v.L, c, mask);
    Tensor dog = Tensor::empty({rows, hc});
    if (k.og.dtype() == DType::BF16)
      train_linear_backward(ctx, k.og.data<uint16_t>(), hc, rows, hc, at.w.o.w.f32(), c, du.f32(),
                            c, dog.f32(), hc, gw->o.w.f32(), bias_ptr(gw->o));
    else
      train_linear_backward(ctx, k.og.f32(), hc, rows, hc, at.w.o.w.f32(), c, du.f32(), c,
                            dog.f32(), hc, gw->o.w.f32(), bias_ptr(gw->o));
    k.og = Tensor();
    Tensor dqkvg = Tensor::empty({rows, 4 * hc});
    {
      kern::AttentionArgs a =
          attention_args(k.qkvg.f32(), at.H, at.C, n, v.L, at.mask_bias + n0 * v.L, bias, nullptr);
      set_bias_logits(at.w, &a);  // then no dq, dk: their columns of dqkvg stay unwritten
      a.dtype = ctx.store;        // bf16 training: bf16 inputs to the backward's products
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
    const int64_t c0 = proj_col0(at.w, hc);  // the projected columns: their weights' gradients
    if (ln.y.dtype() == DType::BF16)
      train_linear_backward(ctx, ln.y.data<uint16_t>(), c, rows, c, at.w.w_qkvg.f32() + c0 * c,
                            4 * hc - c0, dqkvg.f32() + c0, 4 * hc, dln.f32(), c,
                            gw->w_qkvg.f32() + c0 * c, gw->b_qkvg.f32() + c0);
    else
      train_linear_backward(ctx, ln.y.f32(), c, rows, c, at.w.w_qkvg.f32() + c0 * c, 4 * hc - c0,
                            dqkvg.f32() + c0, 4 * hc, dln.f32(), c, gw->w_qkvg.f32() + c0 * c,
                            gw->b_qkvg.f32() + c0);
    dqkvg = Tensor();
    k.qkvg = Tensor();
    ln.y = Tensor();
    {
      // The chunk's input rows: in place in S_in, or gathered [n, L, c] when transposed.
      Tensor x = v.transposed ? Tensor::empty({n, v.L, c}) : Tensor();
      if (v.transposed) gather(S_in, v, n0, n, x.f32());
      const float* xp = v.transposed ? x.f32() : S_in + v.item(n0);
      Tensor scratch = Tensor::empty({kern::layernorm_backward_scratch_floats(rows, c)});
      kern::layernorm_backward(xp, c, dln.f32(), c, rows, c, at.ln.w.f32(), ln.mean.f32(),
                               ln.rstd.f32(), du.f32(), c, gln->w.f32(), gln->b.f32(),
                               scratch.f32());
    }
    scatter_add(du.f32(), v, n0, n, dS);
  }
  kept->clear();
}

void msa_row_attention_train(const MsaRowAttentionW& w, const BlockContext& ctx, float* m,
                             const float* z, AttentionState* st) {
  Tensor bias = pair_bias_train(w.ln_z, w.lin_z, ctx, z, false);  // [H_m, r, r]
  attention_layer_train(row_attn(w, ctx), ctx, m, bias.f32(), st ? &st->chunks : nullptr);
  if (st) st->bias = std::move(bias);
}

void msa_row_attention_backward(const MsaRowAttentionW& w, MsaRowAttentionW* g,
                                const BlockContext& ctx, const float* m_in, const float* z_in,
                                AttentionState* st, float* dm, float* dz) {
  const int64_t H = ctx.cfg->no_heads_msa, r = ctx.r;
  Tensor bias = st->bias.defined() ? st->bias : pair_bias_train(w.ln_z, w.lin_z, ctx, z_in, false);
  st->bias = Tensor();
  Tensor dbias = Tensor::zeros({H, r, r});  // [H, r, r]
  attention_layer_backward(row_attn(w, ctx), &g->ln_m, &g->mha, ctx, m_in, dm, bias.f32(),
                           &st->chunks, dbias.f32());
  bias = Tensor();
  pair_bias_backward(w.ln_z, w.lin_z, &g->ln_z, &g->lin_z, ctx, false, z_in, dbias.f32(), dz);
}

void attention_rows_train(const LayerNormW& ln, const GatedAttentionW& w, int64_t H, int64_t C,
                          const char* module, const BlockContext& ctx, float* S, int64_t N,
                          int64_t L, int64_t c, const float* mask_bias, const float* bias,
                          AttentionState* st) {
  const GatedAttentionSpec at{module, ln, w, H, C, {N, L, c, false}, mask_bias};
  attention_layer_train(at, ctx, S, bias, st ? &st->chunks : nullptr);
}

void attention_rows_backward(const LayerNormW& ln, const GatedAttentionW& w, LayerNormW* gln,
                             GatedAttentionW* gw, int64_t H, int64_t C, const char* module,
                             const BlockContext& ctx, const float* S_in, float* dS, int64_t N,
                             int64_t L, int64_t c, const float* mask_bias, const float* bias,
                             AttentionState* st, float* dbias) {
  const GatedAttentionSpec at{module, ln, w, H, C, {N, L, c, false}, mask_bias};
  attention_layer_backward(at, gln, gw, ctx, S_in, dS, bias, &st->chunks, dbias);
}

// ---- Models ------------------------------------------------------------------------------------

// rb (training, may be null) receives the work the module's backward rebuilds under policy
// module (src/model/train.h): here the bias branch and per chunk LN, q|k|v|g and the attention
// (og, lse), not the output projection nor the residual add.
LayerWork attention_work(int64_t N, int64_t L, int64_t c, int64_t H, int64_t C, bool bias,
                         int64_t r, int64_t cz, const WorkChunks& ch, LayerWork* rb, bool qk) {
  LayerWork w;
  const double rows = static_cast<double>(N) * L, hc = static_cast<double>(H) * C;
  const int64_t n = ch.training ? attention_train_chunk(*ch.ctx, N, L, c, H * C)
                                : attention_chunk(*ch.ctx, H, C, N, L, c);
  w.chunks += div_ceil(N, n);
  if (bias) {
    const int64_t nb = ch.training ? bias_train_chunk(*ch.ctx, H) : pair_bias_chunk(*ch.ctx, r);
    w.chunks += div_ceil(r, nb);
    w.gemm.push_back({2.0 * r * r * cz * H, static_cast<double>(nb * r)});
    w.mem += 2.0 * r * r * cz + 2.0 * H * r * r;  // LayerNorm of z, bias transpose
  }
  const double proj = qk ? 4 : 2, prod = qk ? 1 : 0.5;  // bias-only: v | g, P.V (of QK^T, PV)
  w.gemm.push_back({2.0 * rows * c * proj * hc, static_cast<double>(n * L)});
  w.gemm.push_back({2.0 * rows * hc * c, static_cast<double>(n * L)});
  w.att.push_back({prod * attention_flops(N, H, L, L, C), static_cast<double>(L)});
  w.att_scores = static_cast<double>(N) * H * L * L;
  w.att_bias_scores = bias ? w.att_scores : 0.0;
  w.mem += 2 * rows * c + 3 * rows * c;                        // LayerNorm, residual add
  w.re_mem += 2 * rows * c + (bias ? 2.0 * r * r * cz : 0.0);  // LayerNorms rebuilt per chunk
  if (!ch.training) {
    // Inference reads the stream rows into the LayerNorm-Linear kernel and adds linear_o into
    // the stream in place (and normalises z's rows for the bias): passes over whole streams.
    const double zln = bias ? 2.0 * r * r * cz : 0.0;
    w.mem -= 5 * rows * c + zln;
    w.mem_stream += 5 * rows * c + zln;
    w.ws_stream = std::max(rows * c, bias ? static_cast<double>(r) * r * cz : 0.0) * sizeof(float);
  }
  if (rb) {
    *rb = LayerWork{};
    rb->chunks = w.chunks;
    if (bias) {
      rb->gemm.push_back(w.gemm[0]);
      rb->mem += 2.0 * r * r * cz + 2.0 * H * r * r;
    }
    rb->gemm.push_back(w.gemm[bias ? 1 : 0]);
    rb->att = w.att;
    rb->att_scores = w.att_scores;
    rb->att_bias_scores = w.att_bias_scores;
    rb->mem += 2 * rows * c;
  }
  return w;
}

// chunk_state on n items: qkvg, og, lse stay live (og in bf16 under BF16 storage).
void chunk_state_replay(AllocReplay& S, const BlockContext& ctx, const AttentionDims& d,
                        int64_t n) {
  const int64_t hc = d.H * d.C, rows = n * d.L;
  const bool bf = ctx.store == DType::BF16;
  kern::AttentionArgs a = replay_dims(d, n);
  a.dtype = ctx.store;
  const int64_t scratch = kern::attention_scratch_floats(a, ctx.threads);
  S.alloc(rows * 4 * hc);  // qkvg
  train_linear_replay(S, ctx, rows, d.c, 4 * hc - proj_cols0(d), bf);
  S.alloc(rows * (hc + d.H));  // og, lse
  S.alloc(scratch);
  S.free(scratch);
  if (bf) {
    S.alloc_bf16(rows * hc);  // bf16(og)
    S.free(rows * hc);
  }
}

// Forward of an attention module; keep: the chunk states (q|k|v|g, og, lse) and the bias stay
// (policy none).
void attention_train_replay(AllocReplay& S, const BlockContext& ctx, const AttentionDims& d,
                            bool keep) {
  const int64_t hc = d.H * d.C, ch = attention_train_chunk(ctx, d.N, d.L, d.c, hc);
  const bool bf = ctx.store == DType::BF16;
  // x_ln and og in the storage type (bf16 under BF16)
  auto alloc_s = [&](int64_t k) { bf ? S.alloc_bf16(k) : S.alloc(k); };
  auto free_s = [&](int64_t k) { bf ? S.free_bf16(k) : S.free(k); };
  if (d.bias) pair_bias_train_replay(S, ctx, d.H);
  for (int64_t n0 = 0; n0 < d.N; n0 += ch) {
    const int64_t n = std::min(ch, d.N - n0), rows = n * d.L;
    alloc_s(rows * d.c);  // x_ln
    chunk_state_replay(S, ctx, d, n);
    free_s(rows * d.c);
    S.alloc(rows * d.c);  // u
    train_linear_replay(S, ctx, rows, hc, d.c, bf);
    S.free(rows * d.c);
    if (!keep) {
      S.free(rows * (4 * hc + d.H));  // qkvg, lse
      free_s(rows * hc);              // og
    }
    if (keep) to_store_replay(S, ctx, rows * 4 * hc);  // qkvg
  }
  if (d.bias && !keep) S.free(d.H * ctx.r * ctx.r);
}

// Backward of an attention module; kept: the forward's state is live (and is freed chunk by
// chunk), else each chunk's state is recomputed.
void attention_backward_replay(AllocReplay& S, const BlockContext& ctx, const AttentionDims& d,
                               bool kept) {
  const int64_t hc = d.H * d.C, ch = attention_train_chunk(ctx, d.N, d.L, d.c, hc);
  const int64_t r = ctx.r, rr = r * r, cz = ctx.cfg->c_z;
  if (d.bias) {
    if (!kept) pair_bias_train_replay(S, ctx, d.H);
    S.alloc(d.H * rr);  // dbias
  }
  const bool bf = ctx.store == DType::BF16;
  // x_ln and og in the storage type (bf16 under BF16)
  auto alloc_s = [&](int64_t k) { bf ? S.alloc_bf16(k) : S.alloc(k); };
  auto free_s = [&](int64_t k) { bf ? S.free_bf16(k) : S.free(k); };
  for (int64_t n0 = 0; n0 < d.N; n0 += ch) {
    const int64_t n = std::min(ch, d.N - n0), rows = n * d.L;
    kern::AttentionArgs a = replay_dims(d, n);
    a.dtype = ctx.store;  // the backward's scratch depends on it
    alloc_s(rows * d.c);  // x_ln
    S.alloc(2 * rows);    // mean, rstd
    if (!kept)
      chunk_state_replay(S, ctx, d, n);
    else
      from_store_replay(S, ctx, rows * 4 * hc);  // qkvg
    S.alloc(rows * d.c);                         // du
    S.alloc(rows * hc);                          // dog
    train_linear_backward_replay(S, ctx, rows, hc, d.c, true, bf);
    free_s(rows * hc);       // og
    S.alloc(rows * 4 * hc);  // dqkvg
    const int64_t scratch = kern::attention_backward_scratch_floats(a, ctx.threads, d.bias);
    S.alloc(scratch);
    S.free(scratch);
    S.free(rows * (d.H + hc));  // lse, dog
    S.alloc(rows * d.c);        // dln
    train_linear_backward_replay(S, ctx, rows, d.c, 4 * hc - proj_cols0(d), true, bf);
    S.free(rows * 8 * hc);  // dqkvg, qkvg
    free_s(rows * d.c);     // x_ln
    const int64_t x = d.transposed ? rows * d.c : 0;
    S.alloc(x + ln_scratch(rows, d.c));
    S.free(x + ln_scratch(rows, d.c));
    S.free(2 * rows * d.c + 2 * rows);  // du, dln, mean, rstd
  }
  if (d.bias) {
    S.free(d.H * rr);  // bias
    const int64_t rows = bias_train_chunk(ctx, d.H) * r;
    const int64_t bwd = rows * (2 * cz + 2 + d.H) + ln_scratch(rows, cz);
    S.alloc(bwd);
    S.free(bwd);
    S.free(d.H * rr);  // dbias
  }
}

}  // namespace fc
