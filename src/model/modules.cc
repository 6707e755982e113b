#include "model/modules.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "foldcube/status.h"
#include "foldcube/tensor.h"
#include "kernels/convert.h"
#include "kernels/fused.h"
#include "kernels/kernels.h"
#include "kernels/typed.h"
#include "layers/swiglu_transition.h"
#include "model/block_table.h"

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
  kern::linear(x, c_in, B * L, c_in, w.w_qkvg.f32(), w.b_qkvg.f32(), ld, p, ld);
  kern::AttentionArgs a = attention_dims(H, C, B, L);
  a.q = p, a.q_bs = L * ld, a.q_rs = ld;
  a.k = p + hc, a.k_bs = L * ld, a.k_rs = ld;
  a.v = p + 2 * hc, a.v_bs = L * ld, a.v_rs = ld;
  a.gate = p + 3 * hc, a.g_bs = L * ld, a.g_rs = ld;
  a.o = p, a.o_bs = L * ld, a.o_rs = ld;  // each (b, h) item overwrites only its own q slot
  a.mask_bias = mask_bias;
  a.pair_bias = bias;
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

// bias [H, r, r] from the pair stream: bias[h][q][k] = (LN(z) W^T)[q, k, h] (or [k, q, h] when
// transposed). Allocates t [r*r, H] plus an LN chunk.
Tensor pair_bias_heads(const LayerNormW& ln, const LinearW& lin, const BlockContext& ctx,
                       const float* z, bool transposed) {
  const int64_t r = ctx.r, H = lin.w.dim(0);
  Tensor bias = Tensor::empty({H, r, r});
  Tensor t = Tensor::empty({r * r, H});  // [(q, k), h]
  pair_bias_project(ln, lin, ctx, z, r, t.f32());
  pair_bias_permute(t.f32(), r, H, transposed, bias.f32());
  return bias;
}

int64_t pair_bias_heads_bytes(const BlockContext& ctx, int64_t H) {
  return 2 * H * ctx.r * ctx.r * kF + pair_bias_project_bytes(ctx, ctx.r, H);
}

// A LayerNorm-Linear call's sizes and GEMM input type (what its scratch formula reads); the caller
// sets the pointers.
kern::LayerNormLinearArgs ln_linear_dims(int64_t B, int64_t L, int64_t in, int64_t out,
                                         DType dtype) {
  kern::LayerNormLinearArgs a;
  a.B = B, a.L = L, a.in = in, a.out = out, a.dtype = dtype;
  return a;
}

// The GEMM-input copy of a weight matrix for the fused kernels: its bf16 rounding (a tracked
// tensor, same shape) when dtype is BF16, else undefined (the kernels read the f32 weights).
Tensor gemm_weights(const Tensor& w, DType dtype) {
  if (dtype != DType::BF16) return Tensor();
  Tensor out = Tensor::empty(w.shape(), DType::BF16);
  kern::f32_to_bf16(w.f32(), out.data<uint16_t>(), w.numel());
  return out;
}
int64_t gemm_weights_bytes(int64_t numel, DType dtype) {
  return dtype == DType::BF16 ? numel * 2 : 0;
}
const uint16_t* bf16_ptr(const Tensor& t) { return t.defined() ? t.data<uint16_t>() : nullptr; }

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
  const int64_t ch = pick_chunk(ctx, N, L * c * 2 * kF + L * 4 * H * C * kF);
  const int64_t hc = H * C, ld = 4 * hc;
  const Tensor wb = gemm_weights(w.w_qkvg, ctx.dtype);  // [4*H*C, c] bf16 (BF16 only)
  const Tensor wo = gemm_weights(w.o.w, ctx.dtype);     // [c, H*C] bf16 (BF16 only)
  Tensor qkvg = Tensor::empty({ch * L, ld});            // [(b, l), q | k | v | g] of a chunk
  float* p = qkvg.f32();
  for (int64_t n0 = 0; n0 < N; n0 += ch) {
    const int64_t n = std::min(ch, N - n0);
    {
      const kern::LayerNormLinearArgs la =
          qkvg_args(ln, w, wb, ctx.dtype, ctx.cfg->eps_ln, S, n0, n, N, L, c, transposed, p);
      Tensor scratch = Tensor::empty({kern::layernorm_linear_scratch_floats(la, ctx.threads)});
      kern::layernorm_linear(la, scratch.f32(), ctx.threads);
    }
    kern::AttentionArgs a = attention_dims(H, C, n, L);
    a.q = p, a.q_bs = L * ld, a.q_rs = ld;
    a.k = p + hc, a.k_bs = L * ld, a.k_rs = ld;
    a.v = p + 2 * hc, a.v_bs = L * ld, a.v_rs = ld;
    a.gate = p + 3 * hc, a.g_bs = L * ld, a.g_rs = ld;
    a.o = p, a.o_bs = L * ld, a.o_rs = ld;
    a.mask_bias = mask_bias + n0 * L;
    a.pair_bias = bias;
    a.dtype = ctx.dtype;
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

// Attention module over a stream S viewed as [N, L, c] (batch over N, attention over L), or, when
// transposed, S viewed as [L, N, c] with batch over N = dim 1. bias: [H, L, L] or nullptr.
// mask_bias: [N, L].
void attention_module(const LayerNormW& ln, const GatedAttentionW& w, int64_t H, int64_t C,
                      const BlockContext& ctx, float* S, int64_t N, int64_t L, int64_t c,
                      bool transposed, const float* mask_bias, const float* bias) {
  if (ctx.fused)
    return attention_module_fused(ln, w, H, C, ctx, S, N, L, c, transposed, mask_bias, bias);
  const int64_t ch = pick_chunk(ctx, N, L * c * 2 * kF + L * 4 * H * C * kF);
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
  const int64_t ch = pick_chunk(ctx, N, L * c * 2 * kF + L * 4 * H * C * kF);
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
}  // namespace

void pair_bias_project(const LayerNormW& ln, const LinearW& lin, const BlockContext& ctx,
                       const float* z, int64_t rows, float* t) {
  const int64_t r = ctx.r, cz = ctx.cfg->c_z, H = lin.w.dim(0);
  if (ctx.fused) {
    // f32 GEMM inputs in every dtype: H (4 or 8) outputs are too few for the bf16 matmul.
    kern::LayerNormLinearArgs a = ln_linear_dims(1, rows * r, cz, H, DType::F32);
    a.x = z, a.x_rs = cz;
    a.gamma = ln.w.f32(), a.beta = ln.b.f32(), a.eps = ctx.cfg->eps_ln;
    a.W = lin.w.f32();
    a.y = t, a.ldy = H;
    Tensor scratch = Tensor::empty({kern::layernorm_linear_scratch_floats(a, ctx.threads)});
    kern::layernorm_linear(a, scratch.f32(), ctx.threads);
    return;
  }
  const int64_t ch = pick_chunk(ctx, rows, r * cz * kF);
  Tensor x = Tensor::empty({ch * r, cz});  // LN(z) of a chunk of rows
  for (int64_t i0 = 0; i0 < rows; i0 += ch) {
    const int64_t n = std::min(ch, rows - i0);
    kern::layernorm(z + i0 * r * cz, cz, x.f32(), cz, n * r, cz, ln.w.f32(), ln.b.f32(),
                    ctx.cfg->eps_ln);
    kern::linear(x.f32(), cz, n * r, cz, lin.w.f32(), nullptr, H, t + i0 * r * H, H);
  }
}

int64_t pair_bias_project_bytes(const BlockContext& ctx, int64_t rows, int64_t H) {
  const int64_t r = ctx.r, cz = ctx.cfg->c_z;
  if (ctx.fused)
    return kern::layernorm_linear_scratch_floats(ln_linear_dims(1, rows * r, cz, H, DType::F32),
                                                 ctx.threads) *
           kF;
  return pick_chunk(ctx, rows, r * cz * kF) * r * cz * kF;
}

void pair_bias_permute(const float* t, int64_t r, int64_t H, bool transposed, float* bias) {
#pragma omp parallel for schedule(static)
  for (int64_t q = 0; q < r; ++q)
    for (int64_t k = 0; k < r; ++k) {
      const float* src = t + (transposed ? k * r + q : q * r + k) * H;
      for (int64_t h = 0; h < H; ++h) bias[(h * r + q) * r + k] = src[h];
    }
}

void attention_rows(const LayerNormW& ln, const GatedAttentionW& w, int64_t H, int64_t C,
                    const BlockContext& ctx, float* S, int64_t N, int64_t L, int64_t c,
                    const float* mask_bias, const float* bias) {
  attention_module(ln, w, H, C, ctx, S, N, L, c, false, mask_bias, bias);
}

int64_t pick_chunk(const BlockContext& ctx, int64_t batch, int64_t bytes_per_item) {
  if (batch <= 0) return 1;
  if (ctx.chunk > 0) return std::min(ctx.chunk, batch);
  const int64_t target = std::max<int64_t>(ctx.chunk_target_bytes, 1);
  return std::clamp<int64_t>(target / std::max<int64_t>(bytes_per_item, 1), 1, batch);
}

void opm_pairs_from_outer(const float* o, int64_t n, int64_t r, int64_t co, float* p) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < r; ++j)
      for (int64_t c = 0; c < co; ++c)
        std::memcpy(p + ((i * r + j) * co + c) * co, o + (i * co + c) * r * co + j * co, co * kF);
}

void opm_outer_from_pairs(const float* p, int64_t n, int64_t r, int64_t co, float* o) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < r; ++j)
      for (int64_t c = 0; c < co; ++c)
        std::memcpy(o + (i * co + c) * r * co + j * co, p + ((i * r + j) * co + c) * co, co * kF);
}

void msa_row_attention(const MsaRowAttentionW& w, const BlockContext& ctx, float* m,
                       const float* z) {
  const EvoformerConfig& cfg = *ctx.cfg;
  Tensor bias = pair_bias_heads(w.ln_z, w.lin_z, ctx, z, false);  // [H_m, r, r]
  attention_module(w.ln_m, w.mha, cfg.no_heads_msa, cfg.c_hidden_msa_att, ctx, m, ctx.s, ctx.r,
                   cfg.c_m, false, ctx.msa_bias, bias.f32());
}

void msa_column_attention(const MsaColumnAttentionW& w, const BlockContext& ctx, float* m) {
  const EvoformerConfig& cfg = *ctx.cfg;
  attention_module(w.ln_m, w.mha, cfg.no_heads_msa, cfg.c_hidden_msa_att, ctx, m, ctx.r, ctx.s,
                   cfg.c_m, true, ctx.msa_bias_t, nullptr);
}

void triangle_attention(const TriangleAttentionW& w, const BlockContext& ctx, bool ending,
                        float* z) {
  const EvoformerConfig& cfg = *ctx.cfg;
  Tensor bias = pair_bias_heads(w.ln, w.lin, ctx, z, ending);  // [H_p, r, r]
  attention_module(w.ln, w.mha, cfg.no_heads_pair, cfg.c_hidden_pair_att, ctx, z, ctx.r, ctx.r,
                   cfg.c_z, ending, ending ? ctx.pair_bias_t : ctx.pair_bias, bias.f32());
}

namespace {
// The fused transition's arguments on x [rows, c] (row_scale: the masked transition's mask).
kern::TransitionArgs transition_args(const TransitionW& w, const BlockContext& ctx, float* x,
                                     int64_t rows, int64_t c, const float* row_scale) {
  kern::TransitionArgs a;
  a.rows = rows, a.c = c, a.hidden = w.l1.w.dim(0);
  a.x = x;
  a.gamma = w.ln.w.f32(), a.beta = w.ln.b.f32(), a.eps = ctx.cfg->eps_ln;
  a.W1 = w.l1.w.f32(), a.b1 = w.l1.b.f32(), a.W2 = w.l2.w.f32(), a.b2 = w.l2.b.f32();
  a.row_scale = row_scale;
  a.dtype = ctx.dtype;
  return a;
}

void transition_fused(const TransitionW& w, const BlockContext& ctx, float* x, int64_t rows,
                      int64_t c, const float* row_scale) {
  kern::TransitionArgs a = transition_args(w, ctx, x, rows, c, row_scale);
  const Tensor w1 = gemm_weights(w.l1.w, ctx.dtype);  // [hidden, c] bf16 (BF16 only)
  const Tensor w2 = gemm_weights(w.l2.w, ctx.dtype);  // [c, hidden]
  a.W1_bf16 = bf16_ptr(w1), a.W2_bf16 = bf16_ptr(w2);
  Tensor scratch = Tensor::empty({kern::transition_scratch_floats(a, ctx.threads)});
  kern::transition(a, scratch.f32(), ctx.threads);
}
}  // namespace

void transition(const TransitionW& w, const BlockContext& ctx, float* x, int64_t rows, int64_t c) {
  if (ctx.fused) return transition_fused(w, ctx, x, rows, c, nullptr);
  const int64_t nc = w.l1.w.dim(0);
  const int64_t ch = pick_chunk(ctx, rows, (c + nc) * kF);
  Tensor t = Tensor::empty({ch, c});   // LN(x) chunk
  Tensor h = Tensor::empty({ch, nc});  // hidden chunk
  for (int64_t r0 = 0; r0 < rows; r0 += ch) {
    const int64_t n = std::min(ch, rows - r0);
    kern::layernorm(x + r0 * c, c, t.f32(), c, n, c, w.ln.w.f32(), w.ln.b.f32(), ctx.cfg->eps_ln);
    kern::linear(t.f32(), c, n, c, w.l1.w.f32(), w.l1.b.f32(), nc, h.f32(), nc);
    kern::relu_inplace(h.f32(), nc, n, nc);
    kern::linear(h.f32(), nc, n, nc, w.l2.w.f32(), w.l2.b.f32(), c, x + r0 * c, c, true);
  }
}

void masked_msa_transition(const TransitionW& w, const BlockContext& ctx, float* m) {
  const int64_t rows = ctx.s * ctx.r, c = ctx.cfg->c_m, nc = w.l1.w.dim(0);
  if (ctx.fused) return transition_fused(w, ctx, m, rows, c, ctx.msa_mask);
  const int64_t ch = pick_chunk(ctx, rows, (c + nc) * kF);
  Tensor t = Tensor::empty({ch, c});   // LN(m) chunk, then the masked update
  Tensor h = Tensor::empty({ch, nc});  // hidden chunk
  for (int64_t r0 = 0; r0 < rows; r0 += ch) {
    const int64_t n = std::min(ch, rows - r0);
    kern::layernorm(m + r0 * c, c, t.f32(), c, n, c, w.ln.w.f32(), w.ln.b.f32(), ctx.cfg->eps_ln);
    kern::linear(t.f32(), c, n, c, w.l1.w.f32(), w.l1.b.f32(), nc, h.f32(), nc);
    kern::relu_inplace(h.f32(), nc, n, nc);
    kern::linear(h.f32(), nc, n, nc, w.l2.w.f32(), w.l2.b.f32(), c, t.f32(), c);
    kern::scale_rows(t.f32(), c, ctx.msa_mask + r0, n, c);
    kern::add_inplace(m + r0 * c, c, t.f32(), c, n, c);
  }
}

void opm_residual(const OuterProductMeanW& w, const EvoformerConfig& cfg, const float* y,
                  const float* norm, int64_t rows, float* z) {
  const int64_t cz = cfg.c_z;
  if (!w.mean_first) {
    const float eps = cfg.eps_opm;
#pragma omp parallel for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      const float inv = 1.f / (norm[row] + eps);
      for (int64_t c = 0; c < cz; ++c) z[row * cz + c] += y[row * cz + c] * inv;
    }
    return;
  }
  const float* b = bias_ptr(w.out);
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < rows; ++row) {
    const float inv = 1.f / std::max(norm[row], 1.f);
    for (int64_t c = 0; c < cz; ++c)
      z[row * cz + c] += y[row * cz + c] * inv + (b != nullptr ? b[c] : 0.f);
  }
}

namespace {
// bf16 products in the outer product mean and the triangle multiplication: fused BF16 on a single
// shard (the shard gathers move f32 and keep f32 products).
bool bf16_products(const BlockContext& ctx, int64_t parts) {
  return ctx.fused && ctx.dtype == DType::BF16 && parts == 1;
}

// opm_pairs_from_outer rounding to bf16: p [(i, j), (c, e)] (bf16) from o [(i, c), (j, e)] (f32).
void opm_pairs_from_outer_bf16(const float* o, int64_t n, int64_t r, int64_t co, uint16_t* p) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < r; ++j)
      for (int64_t c = 0; c < co; ++c)
        kern::f32_to_bf16(o + (i * co + c) * r * co + j * co, p + ((i * r + j) * co + c) * co, co);
}

// The outer product mean of columns [col0, col0+cols) (see outer_product_mean_shard); gather ==
// nullptr means one shard holding every column (cols = r). With bf16 products (bf16_products) a
// and b are stored in bf16, the outer products take bf16 inputs with f32 accumulation, and the
// pairs p are rounded to bf16 for the output Linear (bf16 weights, f32 accumulation); the mask
// counts, the normalisation and the residual add stay f32.
void opm_impl(const OuterProductMeanW& w, const BlockContext& ctx, const float* m, int64_t col0,
              int64_t cols, const float* mask_cols, const ShardGather* gather, float* z) {
  const EvoformerConfig& cfg = *ctx.cfg;
  const int64_t s = ctx.s, r = ctx.r, cm = cfg.c_m, co = cfg.c_hidden_opm, cz = cfg.c_z;
  const int64_t parts = gather != nullptr ? gather->parts : 1;
  const bool bf16 = bf16_products(ctx, parts);
  const DType pt = bf16 ? DType::BF16 : DType::F32;  // storage of a, b and p
  Tensor a = Tensor::empty({s, cols, co}, pt);       // linear_1(LN(m)) * mask
  Tensor b = Tensor::empty({s, cols, co}, pt);       // linear_2(LN(m)) * mask
  {
    const int64_t ch = pick_chunk(ctx, s, cols * (cm + 2 * co) * kF);
    Tensor x = ctx.fused ? Tensor() : Tensor::empty({ch * cols, cm});  // LN(m) chunk (unfused)
    Tensor ab = Tensor::empty({ch * cols, 2 * co});
    const Tensor wb = ctx.fused ? gemm_weights(w.l12.w, ctx.dtype) : Tensor();  // [2*c_o, c_m]
    for (int64_t s0 = 0; s0 < s; s0 += ch) {
      const int64_t n = std::min(ch, s - s0);
      if (ctx.fused) {
        kern::LayerNormLinearArgs la = ln_linear_dims(1, n * cols, cm, 2 * co, ctx.dtype);
        la.x = m + s0 * cols * cm, la.x_rs = cm;
        la.gamma = w.ln.w.f32(), la.beta = w.ln.b.f32(), la.eps = cfg.eps_ln;
        la.W = w.l12.w.f32(), la.bias = bias_ptr(w.l12), la.W_bf16 = bf16_ptr(wb);
        la.y = ab.f32(), la.ldy = 2 * co;
        Tensor scratch = Tensor::empty({kern::layernorm_linear_scratch_floats(la, ctx.threads)});
        kern::layernorm_linear(la, scratch.f32(), ctx.threads);
      } else {
        kern::layernorm(m + s0 * cols * cm, cm, x.f32(), cm, n * cols, cm, w.ln.w.f32(),
                        w.ln.b.f32(), cfg.eps_ln);
        kern::linear(x.f32(), cm, n * cols, cm, w.l12.w.f32(), bias_ptr(w.l12), 2 * co, ab.f32(),
                     2 * co);
      }
      float* abp = ab.f32();
      const float* mask = mask_cols + s0 * cols;
      if (bf16) {
        uint16_t* ap = a.data<uint16_t>() + s0 * cols * co;
        uint16_t* bp = b.data<uint16_t>() + s0 * cols * co;
        kern::scale_rows(abp, 2 * co, mask, n * cols, 2 * co);
#pragma omp parallel for schedule(static)
        for (int64_t row = 0; row < n * cols; ++row) {
          kern::f32_to_bf16(abp + row * 2 * co, ap + row * co, co);
          kern::f32_to_bf16(abp + row * 2 * co + co, bp + row * co, co);
        }
        continue;
      }
      float* ap = a.f32() + s0 * cols * co;
      float* bp = b.f32() + s0 * cols * co;
#pragma omp parallel for schedule(static)
      for (int64_t row = 0; row < n * cols; ++row)
        for (int64_t c = 0; c < co; ++c) {
          ap[row * co + c] = abp[row * 2 * co + c] * mask[row];
          bp[row * co + c] = abp[row * 2 * co + co + c] * mask[row];
        }
    }
  }
  // Every shard's b, shard-major: [parts][s, cols, c_o] (= b itself for one shard).
  if (gather != nullptr && !bf16) {
    Tensor all = Tensor::empty({gather->parts, s, cols, co});
    gather->fn(b.f32(), s * cols * co, all.f32());
    b = all;
  }
  Tensor norm = Tensor::empty({cols, r});  // sum_s mask[s,i] mask[s,j]
  kern::gemm(true, false, cols, r, s, 1.f, ctx.msa_mask + col0, r, ctx.msa_mask, r, 0.f, norm.f32(),
             r);

  const int64_t ch = pick_chunk(ctx, cols, 2 * co * r * co * kF + r * cz * kF);
  const Tensor wo = bf16 ? gemm_weights(w.out.w, DType::BF16) : Tensor();  // [c_z, c_o*c_o] bf16
  Tensor o = Tensor::empty({ch * co, r * co});                             // [(i, c), (j, e)]
  Tensor p = Tensor::empty({ch * r, co * co}, pt);                         // [(i, j), (c, e)]
  Tensor y = Tensor::empty({ch * r, cz});
  const float* out_bias = w.mean_first ? nullptr : bias_ptr(w.out);
  for (int64_t i0 = 0; i0 < cols; i0 += ch) {
    const int64_t n = std::min(ch, cols - i0);
    if (bf16) {
      kern::gemm_typed(DType::BF16, true, false, n * co, r * co, s, 1.f,
                       a.data<uint16_t>() + i0 * co, cols * co, b.data<uint16_t>(), r * co, 0.f,
                       o.f32(), r * co);
      opm_pairs_from_outer_bf16(o.f32(), n, r, co, p.data<uint16_t>());
      float beta = 0.f;
      if (out_bias != nullptr) {
        for (int64_t row = 0; row < n * r; ++row) std::copy_n(out_bias, cz, y.f32() + row * cz);
        beta = 1.f;
      }
      kern::gemm_typed(DType::BF16, false, true, n * r, cz, co * co, 1.f, p.data<uint16_t>(),
                       co * co, wo.data<uint16_t>(), co * co, beta, y.f32(), cz);
    } else {
      const int64_t bw = r / parts * co;  // columns (j, e) of one shard
      for (int64_t q = 0; q < parts; ++q)
        kern::gemm(true, false, n * co, bw, s, 1.f, a.f32() + i0 * co, cols * co,
                   b.f32() + q * s * bw, bw, 0.f, o.f32() + q * bw, r * co);
      opm_pairs_from_outer(o.f32(), n, r, co, p.f32());
      kern::linear(p.f32(), co * co, n * r, co * co, w.out.w.f32(), out_bias, cz, y.f32(), cz);
    }
    opm_residual(w, cfg, y.f32(), norm.f32() + i0 * r, n * r, z + i0 * r * cz);
  }
}
}  // namespace

void outer_product_mean(const OuterProductMeanW& w, const BlockContext& ctx, const float* m,
                        float* z) {
  opm_impl(w, ctx, m, 0, ctx.r, ctx.msa_mask, nullptr, z);
}

void outer_product_mean_shard(const OuterProductMeanW& w, const BlockContext& ctx, const float* m,
                              int64_t col0, int64_t cols, const float* mask_cols,
                              const ShardGather& gather, float* z) {
  FC_CHECK(gather.parts >= 1 && cols * gather.parts == ctx.r);
  opm_impl(w, ctx, m, col0, cols, mask_cols, &gather, z);
}

namespace {
// Automatic channel groups are rounded to the nearest multiple of 16 once pick_chunk allows 8 or
// more: a group's slice of a projection row is then whole 64-byte lines and whole vectors on
// every SIMD target (at s=128, r=256, AF2 dims, groups of 14 took 1.45x the time of groups of 16,
// in the vector tails of the gating).
constexpr int64_t kGroupAlign = 16;

// With several groups, LN_in(z) is kept whole (computed once) when phase 1 then needs at most
// this many chunk targets: 1.5 x bytes(m+z) at the automatic target (bytes(m+z)/8), the room a
// block bound of 2.5 x bytes(m+z) leaves beside the streams. Otherwise each group recomputes it,
// one more pass over z per group (at s=128, r=256, AF2 dims: 8 groups, 3-4 % of the module time).
constexpr int64_t kKeepLnTargets = 12;

// Phase 1 of the triangle multiplication (A, B and their products).
struct TriMulPhase1 {
  int64_t cg = 0;        // channels per group: A_g, B_g [cg, r, r]
  int64_t ch = 0;        // rows of z per chunk: projections [ch*r, 4*cg] (and LN_in(z) [ch*r, c_z])
  bool keep_ln = false;  // LN_in(z) [r*r, c_z] computed once, not per chunk and group
  int64_t bytes = 0;     // workspace besides P
};

// rows: rows of z the shard holds (ctx.r for one shard); parts > 1 adds the gathered right
// projection of a group [parts*cg, rows, r].
TriMulPhase1 tri_mul_phase1(const BlockContext& ctx, int64_t rows, int64_t parts) {
  const int64_t r = ctx.r, rr = rows * r, cz = ctx.cfg->c_z, ct = ctx.cfg->c_hidden_mul;
  const int64_t gathered = parts > 1 ? parts * rr : 0;  // per channel
  TriMulPhase1 p;
  p.cg = pick_chunk(ctx, ct, (2 * rr + gathered) * kF);
  if (ctx.chunk <= 0 && p.cg < ct && p.cg >= kGroupAlign / 2)
    p.cg = std::min(ct, (p.cg + kGroupAlign / 2) / kGroupAlign * kGroupAlign);
  p.ch = pick_chunk(ctx, rows, r * (cz + 4 * p.cg) * kF);
  // A_g, B_g, the projection chunk and, with several groups, the group's rows of w.ab and b.ab.
  const int64_t group = (2 * p.cg * rr + 4 * p.cg * p.ch * r +
                         (p.cg < ct ? 4 * p.cg * (cz + 1) : 0) + p.cg * gathered) *
                        kF;
  if (bf16_products(ctx, parts)) {
    // A_g, B_g in bf16, the projection chunk, the group's f32 rows of w.ab and b.ab and its bf16
    // rows of w.ab, and the LayerNorm-Linear scratch (LN_in(z) per row block, never kept whole).
    int64_t scratch = 0;
    for (const int64_t nc : {p.cg, ct % p.cg})
      if (nc > 0)
        scratch = std::max(scratch,
                           kern::layernorm_linear_scratch_floats(
                               ln_linear_dims(1, p.ch * r, cz, 4 * nc, DType::BF16), ctx.threads));
    p.bytes = 2 * p.cg * rr * 2 +
              (4 * p.cg * p.ch * r + (p.cg < ct ? 4 * p.cg * (cz + 1) : 0) + scratch) * kF +
              gemm_weights_bytes(4 * p.cg * cz, DType::BF16);
    return p;
  }
  p.keep_ln = p.cg < ct && (ct + cz) * rr * kF + group <= kKeepLnTargets * ctx.chunk_target_bytes;
  p.bytes = group + (p.keep_ln ? rows : p.ch) * r * cz * kF;
  return p;
}

// The triangle multiplication on rows of z [rows, r, c_z] with mask [rows, r]. gather == nullptr:
// one shard (rows = r), outgoing or incoming; else the outgoing form with L = b when left_is_b
// (see triangle_multiplication_shard). With bf16 products (bf16_products) the projections come
// from the fused LayerNorm-Linear in bf16, A and B are stored in bf16, the products take bf16
// inputs with f32 accumulation (P stays f32), and LN_out + linear_z is the fused LayerNorm-Linear
// in bf16; gating, masking and the residual add stay f32.
void tri_mul_impl(const TriangleMultiplicationW& w, const BlockContext& ctx, bool outgoing,
                  bool left_is_b, int64_t rows, const float* mask_rows, const ShardGather* gather,
                  float* z) {
  const EvoformerConfig& cfg = *ctx.cfg;
  const int64_t r = ctx.r, cz = cfg.c_z, ct = cfg.c_hidden_mul, rr = rows * r;
  const int64_t parts = gather != nullptr ? gather->parts : 1;
  const float eps = cfg.eps_ln;
  const bool bf16 = bf16_products(ctx, parts);
  Tensor P = Tensor::empty({ct, rows, r});  // triangle products, channel-major
  {
    // Channels in groups of cg: each group projects its rows of w.ab from LN_in(z) (kept whole or
    // recomputed chunk by chunk) and writes its products into P. One group (cg = c_t) is the
    // ungrouped computation; the products per channel do not depend on the grouping.
    const TriMulPhase1 ph = tri_mul_phase1(ctx, rows, parts);
    const int64_t cg = ph.cg, ch = ph.ch;
    const DType abt = bf16 ? DType::BF16 : DType::F32;
    Tensor A = Tensor::empty({cg, rows, r}, abt);  // a[c][i][k] = mask * sigmoid(a_g) * a_p
    Tensor B = Tensor::empty({cg, rows, r}, abt);
    // LN_in(z): all rows or a chunk (bf16: none, the fused kernel normalises per row block).
    Tensor x = bf16 ? Tensor() : Tensor::empty({(ph.keep_ln ? rows : ch) * r, cz});
    Tensor t = Tensor::empty({ch * r, 4 * cg});  // a_p | a_g | b_p | b_g of the group
    // The group's rows of w.ab [4*cg, cz], then of b.ab [4*cg]; only with several groups.
    Tensor wg = cg < ct ? Tensor::empty({4 * cg * (cz + 1)}) : Tensor();
    Tensor wg16 = bf16 ? Tensor::empty({4 * cg, cz}, DType::BF16) : Tensor();  // bf16 of the rows
    // Every shard's right projection of the group, shard-major [parts][cg, rows, r].
    Tensor G = gather != nullptr && !bf16 ? Tensor::empty({parts * cg, rows, r}) : Tensor();
    if (ph.keep_ln)
      kern::layernorm(z, cz, x.f32(), cz, rr, cz, w.ln_in.w.f32(), w.ln_in.b.f32(), eps);
    for (int64_t c0 = 0; c0 < ct; c0 += cg) {
      const int64_t nc = std::min(cg, ct - c0), ld = 4 * nc;
      const float* wp = w.ab.w.f32();
      const float* bp = w.ab.b.f32();
      if (cg < ct) {
        float* wgp = wg.f32();
        for (int64_t part = 0; part < 4; ++part) {
          std::memcpy(wgp + part * nc * cz, wp + (part * ct + c0) * cz, nc * cz * kF);
          std::memcpy(wgp + 4 * nc * cz + part * nc, bp + part * ct + c0, nc * kF);
        }
        wp = wgp;
        bp = wgp + 4 * nc * cz;
      }
      if (bf16) kern::f32_to_bf16(wp, wg16.data<uint16_t>(), ld * cz);
      for (int64_t i0 = 0; i0 < rows; i0 += ch) {
        const int64_t n = std::min(ch, rows - i0);
        if (bf16) {
          kern::LayerNormLinearArgs la = ln_linear_dims(1, n * r, cz, ld, DType::BF16);
          la.x = z + i0 * r * cz, la.x_rs = cz;
          la.gamma = w.ln_in.w.f32(), la.beta = w.ln_in.b.f32(), la.eps = eps;
          la.W = wp, la.bias = bp, la.W_bf16 = wg16.data<uint16_t>();
          la.y = t.f32(), la.ldy = ld;
          Tensor scratch = Tensor::empty({kern::layernorm_linear_scratch_floats(la, ctx.threads)});
          kern::layernorm_linear(la, scratch.f32(), ctx.threads);
        } else {
          const float* xp = x.f32() + (ph.keep_ln ? i0 * r * cz : 0);
          if (!ph.keep_ln)
            kern::layernorm(z + i0 * r * cz, cz, x.f32(), cz, n * r, cz, w.ln_in.w.f32(),
                            w.ln_in.b.f32(), eps);
          kern::linear(xp, cz, n * r, cz, wp, bp, ld, t.f32(), ld);
        }
        float* tp = t.f32();
        const float* mask = mask_rows + i0 * r;
        for (int64_t part = 0; part < 2; ++part) {  // a, then b
          float* proj = tp + 2 * part * nc;         // [n*r, nc] with ld 4*nc
          kern::sigmoid_inplace(proj + nc, ld, n * r, nc);
          kern::mul_inplace(proj, ld, proj + nc, ld, n * r, nc);
          kern::scale_rows(proj, ld, mask, n * r, nc);
          if (bf16)
            kern::transpose_to_bf16(proj, ld, (part ? B : A).data<uint16_t>() + i0 * r, rr, n * r,
                                    nc);
          else
            kern::transpose(proj, ld, (part ? B : A).f32() + i0 * r, rr, n * r, nc);
        }
      }
      if (bf16) {
        // One shard: outgoing P_c = A_c B_c^T (L_c R_c^T from a shard call), incoming A_c^T B_c.
        const bool left_b = gather != nullptr && left_is_b;
        const bool out_form = outgoing || gather != nullptr;
        kern::gemm_batched_typed(
            DType::BF16, nc, !out_form, out_form, r, r, r, 1.f, (left_b ? B : A).data<uint16_t>(),
            r, rr, (left_b ? A : B).data<uint16_t>(), r, rr, 0.f, P.f32() + c0 * rr, r, rr);
      } else if (gather == nullptr) {
        // outgoing: P_c = A_c B_c^T; incoming: P_c = A_c^T B_c.
        kern::gemm_batched(nc, !outgoing, outgoing, r, r, r, 1.f, A.f32(), r, rr, B.f32(), r, rr,
                           0.f, P.f32() + c0 * rr, r, rr);
      } else {
        // P_c[:, shard q's rows] = L_c R_{q,c}^T.
        const float* L = (left_is_b ? B : A).f32();
        gather->fn((left_is_b ? A : B).f32(), nc * rr, G.f32());
        for (int64_t q = 0; q < parts; ++q)
          kern::gemm_batched(nc, false, true, rows, rows, r, 1.f, L, r, rr, G.f32() + q * nc * rr,
                             r, rr, 0.f, P.f32() + c0 * rr + q * rows, r, rr);
      }
    }
  }
  const int64_t ch = pick_chunk(ctx, rows, r * (ct + 3 * cz) * kF);
  Tensor pc = Tensor::empty({ch * r, ct});                        // p rows, channel-last
  Tensor x = ctx.fused ? Tensor() : Tensor::empty({ch * r, cz});  // LN_in(z) chunk (unfused)
  Tensor y = Tensor::empty({ch * r, cz});
  Tensor g = Tensor::empty({ch * r, cz});
  const Tensor wg_b = ctx.fused ? gemm_weights(w.lin_g.w, ctx.dtype) : Tensor();  // [c_z, c_z]
  const Tensor wz_b = bf16 ? gemm_weights(w.lin_z.w, DType::BF16) : Tensor();     // [c_z, c_t]
  for (int64_t i0 = 0; i0 < rows; i0 += ch) {
    const int64_t n = std::min(ch, rows - i0);
    float* pp = pc.f32();
    kern::transpose(P.f32() + i0 * r, rr, pp, ct, ct, n * r);
    if (bf16) {
      kern::LayerNormLinearArgs la = ln_linear_dims(1, n * r, ct, cz, DType::BF16);
      la.x = pp, la.x_rs = ct;
      la.gamma = w.ln_out.w.f32(), la.beta = w.ln_out.b.f32(), la.eps = eps;
      la.W = w.lin_z.w.f32(), la.bias = bias_ptr(w.lin_z), la.W_bf16 = wz_b.data<uint16_t>();
      la.y = y.f32(), la.ldy = cz;
      Tensor scratch = Tensor::empty({kern::layernorm_linear_scratch_floats(la, ctx.threads)});
      kern::layernorm_linear(la, scratch.f32(), ctx.threads);
    } else {
      kern::layernorm(pp, ct, pp, ct, n * r, ct, w.ln_out.w.f32(), w.ln_out.b.f32(), eps);
      kern::linear(pp, ct, n * r, ct, w.lin_z.w.f32(), bias_ptr(w.lin_z), cz, y.f32(), cz);
    }
    float* zr = z + i0 * r * cz;
    if (ctx.fused) {
      kern::LayerNormLinearArgs la = ln_linear_dims(1, n * r, cz, cz, ctx.dtype);
      la.x = zr, la.x_rs = cz;
      la.gamma = w.ln_in.w.f32(), la.beta = w.ln_in.b.f32(), la.eps = eps;
      la.W = w.lin_g.w.f32(), la.bias = bias_ptr(w.lin_g), la.W_bf16 = bf16_ptr(wg_b);
      la.y = g.f32(), la.ldy = cz;
      Tensor scratch = Tensor::empty({kern::layernorm_linear_scratch_floats(la, ctx.threads)});
      kern::layernorm_linear(la, scratch.f32(), ctx.threads);
    } else {
      kern::layernorm(zr, cz, x.f32(), cz, n * r, cz, w.ln_in.w.f32(), w.ln_in.b.f32(), eps);
      kern::linear(x.f32(), cz, n * r, cz, w.lin_g.w.f32(), bias_ptr(w.lin_g), cz, g.f32(), cz);
    }
    kern::sigmoid_mul(y.f32(), cz, g.f32(), cz, n * r, cz);
    kern::add_inplace(zr, cz, y.f32(), cz, n * r, cz);
  }
}
}  // namespace

void triangle_multiplication(const TriangleMultiplicationW& w, const BlockContext& ctx,
                             bool outgoing, float* z) {
  tri_mul_impl(w, ctx, outgoing, false, ctx.r, ctx.pair_mask, nullptr, z);
}

void triangle_multiplication_shard(const TriangleMultiplicationW& w, const BlockContext& ctx,
                                   bool left_is_b, int64_t rows, const float* mask,
                                   const ShardGather& gather, float* z) {
  FC_CHECK(gather.parts >= 1 && rows * gather.parts == ctx.r);
  tri_mul_impl(w, ctx, true, left_is_b, rows, mask, &gather, z);
}

int64_t outer_product_mean_shard_bytes(const BlockContext& ctx, int64_t cols, int parts) {
  const EvoformerConfig& cfg = *ctx.cfg;
  const int64_t s = ctx.s, r = ctx.r, cm = cfg.c_m, cz = cfg.c_z, co = cfg.c_hidden_opm;
  const int64_t ab = 2 * s * cols * co;  // a, b
  const int64_t ch1 = pick_chunk(ctx, s, cols * (cm + 2 * co) * kF);
  const int64_t ch2 = pick_chunk(ctx, cols, 2 * co * r * co * kF + r * cz * kF);
  const int64_t gathered = parts > 1 ? s * r * co : 0;
  // Projection phase: the ab chunk beside LN(m) (unfused) or the fused kernel's scratch.
  const int64_t proj =
      ctx.fused ? ch1 * cols * 2 * co +
                      kern::layernorm_linear_scratch_floats(
                          ln_linear_dims(1, ch1 * cols, cm, 2 * co, ctx.dtype), ctx.threads)
                : ch1 * cols * (cm + 2 * co);
  const int64_t wb = ctx.fused ? gemm_weights_bytes(2 * co * cm, ctx.dtype) : 0;
  if (bf16_products(ctx, parts)) {
    // a, b and the pairs chunk in bf16, beside the bf16 copy of linear_out's weights.
    const int64_t ab_bytes = ab * 2;
    return std::max(ab_bytes + kF * proj + wb,
                    ab_bytes + gemm_weights_bytes(cz * co * co, DType::BF16) +
                        kF * (cols * r + ch2 * (co * r * co + r * cz)) + 2 * ch2 * r * co * co);
  }
  return std::max({kF * (ab + proj) + wb, kF * (ab + gathered),
                   kF * (s * cols * co + (parts > 1 ? gathered : s * cols * co) + cols * r +
                         ch2 * (2 * co * r * co + r * cz))});
}

int64_t triangle_multiplication_shard_bytes(const BlockContext& ctx, int64_t rows, int parts) {
  const int64_t r = ctx.r, ct = ctx.cfg->c_hidden_mul, cz = ctx.cfg->c_z;
  const int64_t ch2 = pick_chunk(ctx, rows, r * (ct + 3 * cz) * kF);
  // Output phase: pc, y, g and LN_in(z) (unfused) or the fused kernel's scratch for lin_g.
  const int64_t out = ctx.fused
                          ? ch2 * r * (ct + 2 * cz) +
                                kern::layernorm_linear_scratch_floats(
                                    ln_linear_dims(1, ch2 * r, cz, cz, ctx.dtype), ctx.threads)
                          : ch2 * r * (ct + 3 * cz);
  int64_t wb = ctx.fused ? gemm_weights_bytes(cz * cz, ctx.dtype) : 0;
  int64_t out_scratch = 0;  // bf16: LN_out + linear_z is a second LayerNorm-Linear call
  if (bf16_products(ctx, parts)) {
    wb += gemm_weights_bytes(cz * ct, DType::BF16);
    out_scratch = kern::layernorm_linear_scratch_floats(
                      ln_linear_dims(1, ch2 * r, ct, cz, DType::BF16), ctx.threads) -
                  kern::layernorm_linear_scratch_floats(
                      ln_linear_dims(1, ch2 * r, cz, cz, DType::BF16), ctx.threads);
  }
  return ct * rows * r * kF + std::max(tri_mul_phase1(ctx, rows, parts).bytes,
                                       (out + std::max<int64_t>(out_scratch, 0)) * kF + wb);
}

int64_t layer_workspace_bytes(const LayerDesc& l, const BlockContext& ctx) {
  const EvoformerConfig& cfg = *ctx.cfg;
  const int64_t s = ctx.s, r = ctx.r, cm = cfg.c_m, cz = cfg.c_z;
  switch (l.kind) {
    case LayerKind::kMsaRowAttention: {
      const int64_t Hm = cfg.no_heads_msa;
      return std::max(
          pair_bias_heads_bytes(ctx, Hm),
          Hm * r * r * kF + attention_module_bytes(Hm, cfg.c_hidden_msa_att, ctx, s, r, cm));
    }
    case LayerKind::kMsaColumnAttention:
      return attention_module_bytes(cfg.no_heads_msa, cfg.c_hidden_msa_att, ctx, r, s, cm);
    case LayerKind::kMsaColumnGlobalAttention:
      return msa_column_global_attention_bytes(ctx);
    case LayerKind::kTriangleAttention: {
      const int64_t Hp = cfg.no_heads_pair;
      return std::max(
          pair_bias_heads_bytes(ctx, Hp),
          Hp * r * r * kF + attention_module_bytes(Hp, cfg.c_hidden_pair_att, ctx, r, r, cz));
    }
    case LayerKind::kTransition:
    case LayerKind::kMaskedTransition: {
      const int64_t c = stream_channels(ctx, l.updates), rows = stream_rows(ctx, l.updates);
      const int64_t nc = cfg.transition_n * c;
      if (ctx.fused) {
        kern::TransitionArgs a;
        a.rows = rows, a.c = c, a.hidden = nc, a.dtype = ctx.dtype;
        return gemm_weights_bytes(2 * nc * c, ctx.dtype) +
               kern::transition_scratch_floats(a, ctx.threads) * kF;
      }
      return pick_chunk(ctx, rows, (c + nc) * kF) * (c + nc) * kF;
    }
    case LayerKind::kSwiGluTransition: {
      const int64_t c = stream_channels(ctx, l.updates);
      return swiglu_transition_bytes(ctx, stream_rows(ctx, l.updates), c, cfg.transition_n * c);
    }
    case LayerKind::kOuterProductMean:
      return outer_product_mean_shard_bytes(ctx, r, 1);
    case LayerKind::kTriangleMultiplication:
      return triangle_multiplication_shard_bytes(ctx, r, 1);
  }
  return 0;
}

namespace {
// The layer module_workspace_bytes / module_chunking mean by `module`: an Evoformer layer by its
// trace name, or "msa_att_col_global" for the ExtraMSA column attention.
const LayerDesc& module_layer(const char* module) {
  const bool global = std::string(module) == "msa_att_col_global";
  const LayerDesc* l =
      global ? find_layer(kExtraMsaBlock, "msa_att_col") : find_layer(kEvoformerBlock, module);
  FC_CHECK_MSG(l != nullptr, std::string("unknown module ") + module);
  return *l;
}
}  // namespace

int64_t module_workspace_bytes(const char* module, const BlockContext& ctx) {
  return layer_workspace_bytes(module_layer(module), ctx);
}

// ---- ExtraMSA: global column attention ----------------------------------------------------------

namespace {
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
}  // namespace

void msa_column_global_attention(const MsaColumnGlobalAttentionW& w, const BlockContext& ctx,
                                 float eps, float* m) {
  const EvoformerConfig& cfg = *ctx.cfg;
  const int64_t s = ctx.s, r = ctx.r, ce = cfg.c_m;
  const int64_t C = cfg.c_hidden_msa_att, hc = cfg.no_heads_msa * C, ld = 2 * C + hc;
  const int64_t ch = pick_chunk(ctx, r, global_attention_item_bytes(cfg, s));
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
#pragma omp parallel for schedule(static)
    for (int64_t row = 0; row < n * s; ++row)
      kern::mul_inplace(gp + row * ld, ld, qp + (row / s) * hc, hc, 1, hc);
    kern::linear(gp, ld, n * s, hc, w.o.w.f32(), bias_ptr(w.o), ce, xp, ce);
    for (int64_t b = 0; b < n; ++b)
      kern::add_inplace(m + (r0 + b) * ce, r * ce, xp + b * s * ce, ce, s, ce);
  }
}

int64_t msa_column_global_attention_bytes(const BlockContext& ctx) {
  const EvoformerConfig& cfg = *ctx.cfg;
  const int64_t item = global_attention_item_bytes(cfg, ctx.s);
  const int64_t ch = pick_chunk(ctx, ctx.r, item);
  return ch * item +
         kern::attention_scratch_floats(global_attention_dims(cfg, ch, ctx.s), ctx.threads) * kF;
}

namespace {
const char* chunk_axis_name(ChunkAxis a) {
  switch (a) {
    case ChunkAxis::kMsaRows:
      return "s (MSA rows)";
    case ChunkAxis::kMsaColumns:
      return "r (MSA columns)";
    case ChunkAxis::kMsaPositions:
      return "s*r (MSA positions)";
    case ChunkAxis::kPairRows:
      return "r (pair rows)";
    case ChunkAxis::kPairColumns:
      return "r (pair columns)";
    case ChunkAxis::kPairPositions:
      return "r*r (pair positions)";
  }
  return "?";
}
}  // namespace

std::vector<ChunkLoop> layer_chunking(const LayerDesc& l, const BlockContext& ctx) {
  const EvoformerConfig& cfg = *ctx.cfg;
  const int64_t s = ctx.s, r = ctx.r, cm = cfg.c_m, cz = cfg.c_z;
  auto attention = [&](int64_t H, int64_t C, int64_t N, int64_t L, int64_t c) {
    return pick_chunk(ctx, N, L * c * 2 * kF + L * 4 * H * C * kF);
  };
  const int64_t bias_rows = pick_chunk(ctx, r, r * cz * kF);  // pair_bias_heads
  const char* axis = chunk_axis_name(l.chunk);
  switch (l.kind) {
    case LayerKind::kMsaRowAttention:
      return {{"r (pair bias rows)", r, bias_rows},
              {axis, s, attention(cfg.no_heads_msa, cfg.c_hidden_msa_att, s, r, cm)}};
    case LayerKind::kMsaColumnAttention:
      return {{axis, r, attention(cfg.no_heads_msa, cfg.c_hidden_msa_att, r, s, cm)}};
    case LayerKind::kMsaColumnGlobalAttention:
      return {{axis, r, pick_chunk(ctx, r, global_attention_item_bytes(cfg, s))}};
    case LayerKind::kTriangleAttention:
      return {{"r (pair bias rows)", r, bias_rows},
              {axis, r, attention(cfg.no_heads_pair, cfg.c_hidden_pair_att, r, r, cz)}};
    case LayerKind::kTransition:
    case LayerKind::kMaskedTransition: {
      const int64_t c = stream_channels(ctx, l.updates), rows = stream_rows(ctx, l.updates);
      return {{axis, rows, pick_chunk(ctx, rows, (c + cfg.transition_n * c) * kF)}};
    }
    case LayerKind::kSwiGluTransition: {
      const int64_t c = stream_channels(ctx, l.updates), rows = stream_rows(ctx, l.updates);
      return {{axis, rows, swiglu_transition_chunk(ctx, rows, c, cfg.transition_n * c)}};
    }
    case LayerKind::kOuterProductMean: {
      const int64_t co = cfg.c_hidden_opm;
      return {{"s (MSA rows, projections)", s, pick_chunk(ctx, s, r * (cm + 2 * co) * kF)},
              {"r (pair rows, outer product)", r,
               pick_chunk(ctx, r, 2 * co * r * co * kF + r * cz * kF)}};
    }
    case LayerKind::kTriangleMultiplication: {
      const int64_t ct = cfg.c_hidden_mul;
      const TriMulPhase1 p = tri_mul_phase1(ctx, r, 1);
      return {{"c_t (channel groups)", ct, p.cg},
              {"r (pair rows, projections)", r, p.ch},
              {"r (pair rows, output)", r, pick_chunk(ctx, r, r * (ct + 3 * cz) * kF)}};
    }
  }
  return {};
}

std::vector<ChunkLoop> module_chunking(const char* module, const BlockContext& ctx) {
  return layer_chunking(module_layer(module), ctx);
}

}  // namespace fc
