#include "layers/outer_product_mean.h"

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

// opm_pairs_from_outer rounding to bf16: p [(i, j), (c, e)] (bf16) from o [(i, c), (j, e)] (f32),
// c < ca (a's channels), e < co; one strided conversion per (i, c): its r rows of c_o values
// (j, e) go to p's rows (i, j).
void opm_pairs_from_outer_bf16(const float* o, int64_t n, int64_t r, int64_t ca, int64_t co,
                               uint16_t* p) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < ca; ++c)
      kern::f32_to_bf16_rows(o + (i * ca + c) * r * co, co, p + (i * r * ca + c) * co, ca * co, r,
                             co);
}

// opm_outer_from_pairs rounding to bf16: o [(i, c), (j, e)] (bf16) from p [(i, j), (c, e)] (f32),
// one strided conversion per (i, c).
void opm_outer_from_pairs_bf16(const float* p, int64_t n, int64_t r, int64_t ca, int64_t co,
                               uint16_t* o) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < ca; ++c)
      kern::f32_to_bf16_rows(p + (i * r * ca + c) * co, ca * co, o + (i * ca + c) * r * co, co, r,
                             co);
}

// The masked projections a = linear_1(LN(m)) * mask, b = linear_2(LN(m)) * mask of the MSA rows
// m [rows, cols, c_m] with mask [rows, cols] into a, b [rows, cols, c_o] (bf16 when bf16, else
// f32), in chunks of opm_projection_chunk rows (at most rows).
void opm_project(const OuterProductMeanW& w, const BlockContext& ctx, const float* m, int64_t rows,
                 int64_t cols, const float* mask_cols, bool bf16, Tensor* a, Tensor* b) {
  const EvoformerConfig& cfg = *ctx.cfg;
  const int64_t s = rows, cm = cfg.c_m, co = cfg.c_hidden_opm;
  {
    const int64_t ch = std::min(opm_projection_chunk(ctx, cols), rows);
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
        uint16_t* ap = a->data<uint16_t>() + s0 * cols * co;
        uint16_t* bp = b->data<uint16_t>() + s0 * cols * co;
        kern::scale_rows(abp, 2 * co, mask, n * cols, 2 * co);
#pragma omp parallel for schedule(static)
        for (int64_t row = 0; row < n * cols; ++row) {
          kern::f32_to_bf16(abp + row * 2 * co, ap + row * co, co);
          kern::f32_to_bf16(abp + row * 2 * co + co, bp + row * co, co);
        }
        continue;
      }
      float* ap = a->f32() + s0 * cols * co;
      float* bp = b->f32() + s0 * cols * co;
#pragma omp parallel for schedule(static)
      for (int64_t row = 0; row < n * cols; ++row)
        for (int64_t c = 0; c < co; ++c) {
          ap[row * co + c] = abp[row * 2 * co + c] * mask[row];
          bp[row * co + c] = abp[row * 2 * co + co + c] * mask[row];
        }
    }
  }
}

// The scale of one pair's update: 1 / (norm + eps) (AF2) or 1 / max(norm, 1) (AF3,
// w.mean_first), norm the pair's mask count.
float opm_pair_scale(const OuterProductMeanW& w, float eps, float norm) {
  return w.mean_first ? 1.f / std::max(norm, 1.f) : 1.f / (norm + eps);
}

// z += y * opm_pair_scale (+ b, unscaled, when b != nullptr) for `rows` pairs, y [rows, c_z].
void opm_scaled_add(const OuterProductMeanW& w, const EvoformerConfig& cfg, const float* y,
                    const float* norm, int64_t rows, const float* b, float* z) {
  const int64_t cz = cfg.c_z;
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < rows; ++row) {
    const float inv = opm_pair_scale(w, cfg.eps_opm, norm[row]);
    if (b == nullptr)
      for (int64_t c = 0; c < cz; ++c) z[row * cz + c] += y[row * cz + c] * inv;
    else
      for (int64_t c = 0; c < cz; ++c) z[row * cz + c] += y[row * cz + c] * inv + b[c];
  }
}

// The shard form in chunks of sc < s MSA rows (opm_msa_row_chunk; f32 products): per chunk the
// projections a, b [sc, cols, c_o] of its rows, every shard's b [parts, sc, cols, c_o] gathered,
// and its outer products sum_{s in chunk} a (x) b through linear_out added to z, scaled by the
// whole mask count (the bias with the first chunk): linear_out is linear, so the chunks add up to
// the unchunked update up to the summation order. The gathered right projection is never whole.
void opm_msa_chunked(const OuterProductMeanW& w, const BlockContext& ctx, const float* m,
                     int64_t col0, int64_t cols, const float* mask_cols, const ShardGather& gather,
                     int64_t sc, float* z) {
  const EvoformerConfig& cfg = *ctx.cfg;
  const int64_t s = ctx.s, r = ctx.r, cm = cfg.c_m, co = cfg.c_hidden_opm, cz = cfg.c_z;
  const int64_t parts = gather.parts, bw = cols * co;  // bw: columns (j, e) of one shard
  Tensor norm = Tensor::empty({cols, r});              // sum_s mask[s,i] mask[s,j] over every row
  kern::gemm(true, false, cols, r, s, 1.f, ctx.msa_mask + col0, r, ctx.msa_mask, r, 0.f, norm.f32(),
             r);
  const int64_t ch = opm_outer_chunk(ctx, cols);
  Tensor a = Tensor::empty({sc, cols, co});           // linear_1(LN(m)) * mask, this chunk
  Tensor b = Tensor::empty({sc, cols, co});           // linear_2(LN(m)) * mask, this chunk
  Tensor all = Tensor::empty({parts, sc, cols, co});  // every shard's b of this chunk
  Tensor o = Tensor::empty({ch * co, r * co});        // [(i, c), (j, e)]
  Tensor p = Tensor::empty({ch * r, co * co});        // [(i, j), (c, e)]
  Tensor y = Tensor::empty({ch * r, cz});
  for (int64_t s0 = 0; s0 < s; s0 += sc) {
    const int64_t n = std::min(sc, s - s0);
    opm_project(w, ctx, m + s0 * cols * cm, n, cols, mask_cols + s0 * cols, false, &a, &b);
    gather.fn(b.f32(), n * bw, all.f32());  // [parts][n, cols, c_o]
    for (int64_t i0 = 0; i0 < cols; i0 += ch) {
      const int64_t ni = std::min(ch, cols - i0);
      for (int64_t q = 0; q < parts; ++q)
        kern::gemm(true, false, ni * co, bw, n, 1.f, a.f32() + i0 * co, bw, all.f32() + q * n * bw,
                   bw, 0.f, o.f32() + q * bw, r * co);
      opm_pairs_from_outer(o.f32(), ni, r, co, p.f32());
      const bool first = s0 == 0;
      kern::linear(p.f32(), co * co, ni * r, co * co, w.out.w.f32(),
                   first && !w.mean_first ? bias_ptr(w.out) : nullptr, cz, y.f32(), cz);
      opm_scaled_add(w, cfg, y.f32(), norm.f32() + i0 * r, ni * r,
                     first && w.mean_first ? bias_ptr(w.out) : nullptr, z + i0 * r * cz);
    }
  }
}

// MSA rows per gather of opm_gather_bf16 (its f32 send and receive buffers from the chunk
// target).
int64_t opm_gather_rows(const BlockContext& ctx, int64_t cols, int64_t parts) {
  return pick_chunk(ctx, ctx.s, (1 + parts) * cols * ctx.cfg->c_hidden_opm * kF);
}

// Every shard's right projection b16 [s, cols, c_o] (bf16) as the one-process b [s, r, c_o] in
// bf16 (shard q's columns at q*cols), gathered as f32 in chunks of opm_gather_rows MSA rows (the
// bf16 values convert back exactly). Allocates the result, then the two chunk buffers.
Tensor opm_gather_bf16(const BlockContext& ctx, const ShardGather& gather, const Tensor& b16,
                       int64_t cols) {
  const int64_t s = ctx.s, r = ctx.r, co = ctx.cfg->c_hidden_opm, parts = gather.parts;
  const int64_t bw = cols * co, g = opm_gather_rows(ctx, cols, parts);
  Tensor full = Tensor::empty({s, r, co}, DType::BF16);
  Tensor send = Tensor::empty({g, cols, co});        // this shard's rows of the chunk, f32
  Tensor all = Tensor::empty({parts, g, cols, co});  // every shard's, shard-major
  for (int64_t s0 = 0; s0 < s; s0 += g) {
    const int64_t n = std::min(g, s - s0);
    kern::bf16_to_f32(b16.data<uint16_t>() + s0 * bw, send.f32(), n * bw);
    gather.fn(send.f32(), n * bw, all.f32());
    uint16_t* f = full.data<uint16_t>() + s0 * r * co;
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t q = 0; q < parts; ++q)
      for (int64_t i = 0; i < n; ++i)
        kern::f32_to_bf16(all.f32() + (q * n + i) * bw, f + i * r * co + q * bw, bw);
  }
  return full;
}

// The outer product mean of columns [col0, col0+cols) (see outer_product_mean_shard); gather ==
// nullptr means one shard holding every column (cols = r). With bf16 products (bf16_fused) a
// and b are stored in bf16, the outer products take bf16 inputs with f32 accumulation, and the
// pairs p are rounded to bf16 for the output Linear (bf16 weights, f32 accumulation); the mask
// counts, the normalisation and the residual add stay f32. Sharded with fewer MSA rows per chunk
// than s (opm_msa_row_chunk): opm_msa_chunked.
void opm_impl(const OuterProductMeanW& w, const BlockContext& ctx, const float* m, int64_t col0,
              int64_t cols, const float* mask_cols, const ShardGather* gather, float* z) {
  const EvoformerConfig& cfg = *ctx.cfg;
  const int64_t s = ctx.s, r = ctx.r, co = cfg.c_hidden_opm, cz = cfg.c_z;
  const int64_t parts = gather != nullptr ? gather->parts : 1;
  const int64_t sc = opm_msa_row_chunk(ctx, cols, parts);
  if (sc < s) return opm_msa_chunked(w, ctx, m, col0, cols, mask_cols, *gather, sc, z);
  const bool bf16 = bf16_fused(ctx);
  const DType pt = bf16 ? DType::BF16 : DType::F32;  // storage of a, b and p
  Tensor a = Tensor::empty({s, cols, co}, pt);       // linear_1(LN(m)) * mask
  Tensor b = Tensor::empty({s, cols, co}, pt);       // linear_2(LN(m)) * mask
  opm_project(w, ctx, m, s, cols, mask_cols, bf16, &a, &b);
  // Every shard's b: f32 shard-major [parts][s, cols, c_o], or with bf16 products the
  // one-process b [s, r, c_o] in bf16 (= b itself for one shard).
  if (gather != nullptr && bf16) {
    b = opm_gather_bf16(ctx, *gather, b, cols);
  } else if (gather != nullptr) {
    Tensor all = Tensor::empty({gather->parts, s, cols, co});
    gather->fn(b.f32(), s * cols * co, all.f32());
    b = all;
  }
  Tensor norm = Tensor::empty({cols, r});  // sum_s mask[s,i] mask[s,j]
  kern::gemm(true, false, cols, r, s, 1.f, ctx.msa_mask + col0, r, ctx.msa_mask, r, 0.f, norm.f32(),
             r);

  const int64_t ch = opm_outer_chunk(ctx, cols);
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
      opm_pairs_from_outer_bf16(o.f32(), n, r, co, co, p.data<uint16_t>());
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

// Adjoint of opm_residual for `rows` pairs: dy [rows, c_z] = dL/d (linear_out.w outer
// (+ bias)) from dz; with w.mean_first the unscaled bias's gradient (sum of dz over the rows)
// accumulates into g->out.b here (else linear_backward gives it from dy).
void opm_residual_backward(const OuterProductMeanW& w, const EvoformerConfig& cfg, const float* dz,
                           const float* norm, int64_t rows, float* dy, OuterProductMeanW* g) {
  const int64_t cz = cfg.c_z;
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < rows; ++row) {
    const float inv = opm_pair_scale(w, cfg.eps_opm, norm[row]);
    for (int64_t c = 0; c < cz; ++c) dy[row * cz + c] = dz[row * cz + c] * inv;
  }
  float* gb = bias_ptr(g->out);
  if (!w.mean_first || gb == nullptr) return;
  for (int64_t c = 0; c < cz; ++c) {
    double sum = 0;
    for (int64_t row = 0; row < rows; ++row) sum += dz[row * cz + c];
    gb[c] += static_cast<float>(sum);
  }
}

// One chunk of the outer product: rows i0 .. i0+n of outer[(i, j), (c, e)] = sum_s a[s,i,c]
// b[s,j,e] into p [n*r, co*co], through o [n*co, r*co] (the GEMM layout [(i, c), (j, e)]). As in
// outer_product_mean.
// a [s, r, ca], b [s, r, co]: ca < co when the layer is channel-parallel (opm_a_channels).
void outer_chunk(const float* a, const float* b, int64_t s, int64_t r, int64_t ca, int64_t co,
                 int64_t i0, int64_t n, float* o, float* p) {
  kern::gemm(true, false, n * ca, r * co, s, 1.f, a + i0 * ca, r * ca, b, r * co, 0.f, o, r * co);
  opm_pairs_from_outer(o, n, r, ca, co, p);
}

// bf16 training (ctx.store BF16, one process): a and b as bf16 GEMM inputs, one tracked buffer
// [s*r*ca | s*r*co] (a, b hold bf16 values, so the copy is exact); undefined under F32.
Tensor opm_ab_bf16(const BlockContext& ctx, const Tensor& a, const Tensor& b) {
  if (ctx.store != DType::BF16) return Tensor();
  Tensor t = Tensor::empty({a.numel() + b.numel()}, DType::BF16);
  kern::f32_to_bf16(a.f32(), t.data<uint16_t>(), a.numel());
  kern::f32_to_bf16(b.f32(), t.data<uint16_t>() + a.numel(), b.numel());
  return t;
}

// outer_chunk with the product's inputs from opm_ab_bf16's buffer ab16 (bf16 storage: a [s, r, ca]
// then b [s, r, co]; ca < co when channel-parallel) and the pairs p16 [n*r, ca*co] rounded to
// bf16 for the output Linear.
void outer_chunk_bf16(const Tensor& ab16, int64_t s, int64_t r, int64_t ca, int64_t co, int64_t i0,
                      int64_t n, float* o, uint16_t* p16) {
  const uint16_t* a16 = ab16.data<uint16_t>();  // [s, r, ca]
  const uint16_t* b16 = a16 + s * r * ca;       // [s, r, co]
  kern::gemm_typed(DType::BF16, true, false, n * ca, r * co, s, 1.f, a16 + i0 * ca, r * ca, b16,
                   r * co, 0.f, o, r * co);
  opm_pairs_from_outer_bf16(o, n, r, ca, co, p16);
}

// The shard's outer-product chunk: rows i0 .. i0+n of its columns against every shard's b, into
// o [n*c_o, r*c_o] ([(i, c), (j, e)], shard q's block at columns q*bw). From ab16 (a [s, bw] |
// b_all [parts, s, bw] in bf16) when defined, else from a [s, bw] and b_all in f32; bw = cols*c_o.
void shard_outer_chunk(const Tensor& ab16, const float* a, const Tensor& b_all, int64_t s,
                       int64_t bw, int64_t co, int64_t parts, int64_t i0, int64_t n, float* o) {
  const int64_t ldo = parts * bw;
  for (int64_t q = 0; q < parts; ++q) {
    if (!ab16.defined()) {
      kern::gemm(true, false, n * co, bw, s, 1.f, a + i0 * co, bw, b_all.f32() + q * s * bw, bw,
                 0.f, o + q * bw, ldo);
      continue;
    }
    const uint16_t* a16 = ab16.data<uint16_t>();   // [s, bw]
    const uint16_t* b16 = a16 + (1 + q) * s * bw;  // shard q's b [s, bw]
    kern::gemm_typed(DType::BF16, true, false, n * co, bw, s, 1.f, a16 + i0 * co, bw, b16, bw, 0.f,
                     o + q * bw, ldo);
  }
}

// The bf16 form of the shard's dA, dB products: dO [n*c_o, parts*bw] rounded to bf16, then
// dA[:, i0..] = sum_q B_q dO_q^T and dB_q += A dO_q (bf16 inputs, f32 accumulation), with a, b as
// in shard_outer_chunk; da [s, bw], db_all [parts, s, bw].
void shard_outer_backward_bf16(const Tensor& ab16, const float* dO, int64_t s, int64_t bw,
                               int64_t co, int64_t parts, int64_t i0, int64_t n, float* da,
                               float* db_all) {
  const int64_t ldo = parts * bw;
  Tensor do16 = Tensor::empty({n * co, ldo}, DType::BF16);  // bf16 dO
  kern::f32_to_bf16(dO, do16.data<uint16_t>(), n * co * ldo);
  const uint16_t* a16 = ab16.data<uint16_t>();
  const uint16_t* d16 = do16.data<uint16_t>();
  for (int64_t q = 0; q < parts; ++q) {
    const uint16_t* b16 = a16 + (1 + q) * s * bw;
    kern::gemm_typed(DType::BF16, false, true, s, n * co, bw, 1.f, b16, bw, d16 + q * bw, ldo,
                     q == 0 ? 0.f : 1.f, da + i0 * co, bw);
    kern::gemm_typed(DType::BF16, false, false, s, bw, n * co, 1.f, a16 + i0 * co, bw, d16 + q * bw,
                     ldo, 1.f, db_all + q * s * bw, bw);
  }
}

// The OPM state's LN(m) with its statistics and the masked projections a [s, cols, ca], b
// [s, cols, co] for m [s, cols, c_m] (all residues, or a DAP shard's columns) with mask
// [s, cols]; ca = opm_a_channels. LN(m), a and b rounded to bf16 values under ctx.store BF16
// before they are used.
void opm_projections(const OuterProductMeanW& w, const BlockContext& ctx, const float* m, int64_t s,
                     int64_t cols, const float* mask, OuterProductMeanState* st) {
  const EvoformerConfig& cfg = *ctx.cfg;
  const int64_t cm = cfg.c_m, co = cfg.c_hidden_opm, ca = opm_a_channels(w, cfg), rows = s * cols;
  const int64_t cab = ca + co;
  st->mean = Tensor::empty({rows});
  st->rstd = Tensor::empty({rows});
  st->x_ln = Tensor::empty({rows, cm});
  st->a = Tensor::empty({s, cols, ca});
  st->b = Tensor::empty({s, cols, co});
  kern::layernorm(m, cm, st->x_ln.f32(), cm, rows, cm, w.ln.w.f32(), w.ln.b.f32(), cfg.eps_ln,
                  st->mean.f32(), st->rstd.f32());
  round_for_store(ctx, st->x_ln);
  Tensor ab = Tensor::empty({rows, cab});  // linear_1 | linear_2, before masking
  train_linear(ctx, st->x_ln.f32(), cm, rows, cm, w.l12.w.f32(), bias_ptr(w.l12), cab, ab.f32(),
               cab);
  const float* abp = ab.f32();
  float* ap = st->a.f32();
  float* bp = st->b.f32();
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < rows; ++row) {
    for (int64_t c = 0; c < ca; ++c) ap[row * ca + c] = abp[row * cab + c] * mask[row];
    for (int64_t c = 0; c < co; ++c) bp[row * co + c] = abp[row * cab + ca + c] * mask[row];
  }
  round_for_store(ctx, st->a);
  round_for_store(ctx, st->b);
}
}  // namespace

// ---- Inference ---------------------------------------------------------------------------------

int64_t opm_projection_chunk(const BlockContext& ctx, int64_t cols) {
  const int64_t cm = ctx.cfg->c_m, co = ctx.cfg->c_hidden_opm;
  return pick_chunk(ctx, ctx.s, cols * (cm + 2 * co) * kF);
}

int64_t opm_msa_row_chunk(const BlockContext& ctx, int64_t cols, int64_t parts) {
  const int64_t s = ctx.s, co = ctx.cfg->c_hidden_opm, cz = ctx.cfg->c_z;
  if (parts <= 1 || bf16_fused(ctx) || s <= 0) return s;
  if (ctx.chunk > 0) return std::min(ctx.chunk, s);
  // Each chunk after the first repeats linear_out ((c_o^2 c_z) per pair against (c_o^2 rows) for
  // the products): at least kOpmRowsPerZChannel * c_z rows keep that under 1/4 of the products.
  constexpr int64_t kOpmRowsPerZChannel = 4;
  const int64_t fewest = std::min(s, kOpmRowsPerZChannel * cz);
  return std::max(fewest, pick_chunk(ctx, s, (2 + parts) * cols * co * kF));
}

int64_t opm_outer_chunk(const BlockContext& ctx, int64_t cols) {
  const int64_t r = ctx.r, co = ctx.cfg->c_hidden_opm, cz = ctx.cfg->c_z;
  return pick_chunk(ctx, cols, 2 * co * r * co * kF + r * cz * kF);
}

int64_t opm_outer_backward_chunk(const BlockContext& ctx, int64_t cols) {
  return pick_chunk(ctx, cols, opm_outer_backward_item_bytes(ctx));
}

int64_t opm_outer_backward_item_bytes(const BlockContext& ctx) {
  const int64_t r = ctx.r, co = ctx.cfg->c_hidden_opm, cz = ctx.cfg->c_z;
  return 3 * co * r * co * kF + r * cz * kF;
}

void opm_pairs_from_outer(const float* o, int64_t n, int64_t r, int64_t ca, int64_t co, float* p) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < r; ++j)
      for (int64_t c = 0; c < ca; ++c)
        std::memcpy(p + ((i * r + j) * ca + c) * co, o + (i * ca + c) * r * co + j * co, co * kF);
}

void opm_outer_from_pairs(const float* p, int64_t n, int64_t r, int64_t ca, int64_t co, float* o) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < r; ++j)
      for (int64_t c = 0; c < ca; ++c)
        std::memcpy(o + (i * ca + c) * r * co + j * co, p + ((i * r + j) * ca + c) * co, co * kF);
}

void opm_pairs_from_outer(const float* o, int64_t n, int64_t r, int64_t co, float* p) {
  opm_pairs_from_outer(o, n, r, co, co, p);
}

void opm_outer_from_pairs(const float* p, int64_t n, int64_t r, int64_t co, float* o) {
  opm_outer_from_pairs(p, n, r, co, co, o);
}

int64_t opm_a_channels(const OuterProductMeanW& w, const EvoformerConfig& cfg) {
  return w.l12.w.dim(0) - cfg.c_hidden_opm;
}

void opm_residual(const OuterProductMeanW& w, const EvoformerConfig& cfg, const float* y,
                  const float* norm, int64_t rows, float* z) {
  opm_scaled_add(w, cfg, y, norm, rows, w.mean_first ? bias_ptr(w.out) : nullptr, z);
}

void outer_product_mean(const OuterProductMeanW& w, const BlockContext& ctx, const float* m,
                        float* z) {
  if (opm_a_channels(w, *ctx.cfg) != ctx.cfg->c_hidden_opm) {  // channel-parallel: training form
    // In the bf16 forward under bf16 storage, which rounds where opm_impl's bf16 products do
    // (LN(m), a, b and the pairs as GEMM inputs).
    BlockContext c = ctx;
    if (bf16_fused(ctx)) c.store = DType::BF16;
    OuterProductMeanState st;
    return outer_product_mean_train(w, c, m, z, &st);
  }
  opm_impl(w, ctx, m, 0, ctx.r, ctx.msa_mask, nullptr, z);
}

void outer_product_mean_shard(const OuterProductMeanW& w, const BlockContext& ctx, const float* m,
                              int64_t col0, int64_t cols, const float* mask_cols,
                              const ShardGather& gather, float* z) {
  FC_CHECK(gather.parts >= 1 && cols * gather.parts == ctx.r);
  opm_impl(w, ctx, m, col0, cols, mask_cols, &gather, z);
}

int64_t outer_product_mean_shard_bytes(const BlockContext& ctx, int64_t cols, int parts) {
  const EvoformerConfig& cfg = *ctx.cfg;
  const int64_t s = ctx.s, r = ctx.r, cm = cfg.c_m, cz = cfg.c_z, co = cfg.c_hidden_opm;
  const int64_t ab = 2 * s * cols * co;  // a, b
  const int64_t ch1 = opm_projection_chunk(ctx, cols);
  const int64_t ch2 = opm_outer_chunk(ctx, cols);
  const int64_t gathered = parts > 1 ? s * r * co : 0;
  // Projection phase (opm_project) on chunks of n MSA rows: the ab chunk beside LN(m) (unfused) or
  // the fused kernel's scratch.
  auto projection = [&](int64_t n) {
    return ctx.fused ? n * cols * 2 * co +
                           kern::layernorm_linear_scratch_floats(
                               ln_linear_dims(1, n * cols, cm, 2 * co, ctx.dtype), ctx.threads)
                     : n * cols * (cm + 2 * co);
  };
  const int64_t proj = projection(ch1);
  const int64_t wb = ctx.fused ? gemm_weights_bytes(2 * co * cm, ctx.dtype) : 0;
  const int64_t sc = opm_msa_row_chunk(ctx, cols, parts);
  if (sc < s)  // everything of opm_msa_chunked is alive while a chunk is projected
    return kF * (cols * r + (2 + parts) * sc * cols * co + ch2 * (2 * co * r * co + r * cz) +
                 projection(std::min(ch1, sc))) +
           wb;
  if (bf16_fused(ctx)) {
    // a, b and the pairs chunk in bf16, beside the bf16 copy of linear_out's weights; on a shard
    // b is every shard's [s, r, c_o] (opm_gather_bf16: made beside this shard's b and the gather's
    // f32 chunk buffers).
    const int64_t ab_bytes = ab * 2;
    const int64_t b_all = parts > 1 ? 2 * s * r * co : 0;
    const int64_t gather =
        parts > 1 ? b_all + kF * (1 + parts) * opm_gather_rows(ctx, cols, parts) * cols * co : 0;
    const int64_t outer = (parts > 1 ? ab_bytes / 2 + b_all : ab_bytes) +
                          gemm_weights_bytes(cz * co * co, DType::BF16) +
                          kF * (cols * r + ch2 * (co * r * co + r * cz)) + 2 * ch2 * r * co * co;
    return std::max({ab_bytes + kF * proj + wb, ab_bytes + gather, outer});
  }
  return std::max({kF * (ab + proj) + wb, kF * (ab + gathered),
                   kF * (s * cols * co + (parts > 1 ? gathered : s * cols * co) + cols * r +
                         ch2 * (2 * co * r * co + r * cz))});
}

// ---- Training ----------------------------------------------------------------------------------

void outer_product_mean_train(const OuterProductMeanW& w, const BlockContext& ctx, const float* m,
                              float* z, OuterProductMeanState* st) {
  *st = OuterProductMeanState{};
  const EvoformerConfig& cfg = *ctx.cfg;
  const int64_t s = ctx.s, r = ctx.r, co = cfg.c_hidden_opm, cz = cfg.c_z;
  const int64_t ca = opm_a_channels(w, cfg);
  opm_projections(w, ctx, m, s, r, ctx.msa_mask, st);
  st->norm = Tensor::empty({r, r});
  kern::gemm(true, false, r, r, s, 1.f, ctx.msa_mask, r, ctx.msa_mask, r, 0.f, st->norm.f32(), r);
  if (!z) return;

  const int64_t ch = opm_outer_chunk(ctx, r);
  const Tensor ab16 = opm_ab_bf16(ctx, st->a, st->b);  // [s*r*(ca + co)] bf16 (BF16 only)
  const bool bf = ab16.defined();
  Tensor o = Tensor::empty({ch * ca, r * co});  // [(i, c), (j, e)]
  // [(i, j), (c, e)], in bf16 (the Linear's input, written by the transpose) under BF16
  Tensor p = Tensor::empty({ch * r, ca * co}, bf ? DType::BF16 : DType::F32);
  Tensor y = Tensor::empty({ch * r, cz});  // linear_out(p)
  const float* bias = w.mean_first ? nullptr : bias_ptr(w.out);
  for (int64_t i0 = 0; i0 < r; i0 += ch) {
    const int64_t n = std::min(ch, r - i0);
    if (bf) {
      outer_chunk_bf16(ab16, s, r, ca, co, i0, n, o.f32(), p.data<uint16_t>());
      train_linear(ctx, p.data<uint16_t>(), ca * co, n * r, ca * co, w.out.w.f32(), bias, cz,
                   y.f32(), cz);
    } else {
      outer_chunk(st->a.f32(), st->b.f32(), s, r, ca, co, i0, n, o.f32(), p.f32());
      train_linear(ctx, p.f32(), ca * co, n * r, ca * co, w.out.w.f32(), bias, cz, y.f32(), cz);
    }
    opm_residual(w, cfg, y.f32(), st->norm.f32() + i0 * r, n * r, z + i0 * r * cz);
  }
}

void opm_state_to_store(const BlockContext& ctx, OuterProductMeanState* st) {
  st->x_ln = to_store(ctx, std::move(st->x_ln));
  st->a = to_store(ctx, std::move(st->a));
  st->b = to_store(ctx, std::move(st->b));
}

void opm_state_from_store(OuterProductMeanState* st) {
  st->x_ln = from_store(std::move(st->x_ln));
  st->a = from_store(std::move(st->a));
  st->b = from_store(std::move(st->b));
}

// bf16 storage runs in one process with every channel: a has c_o channels (opm_a_channels).
void opm_state_to_store_replay(AllocReplay& S, const BlockContext& ctx) {
  const int64_t sr = ctx.s * ctx.r, co = ctx.cfg->c_hidden_opm;
  to_store_replay(S, ctx, sr * ctx.cfg->c_m);
  to_store_replay(S, ctx, sr * co);
  to_store_replay(S, ctx, sr * co);
}

void opm_state_from_store_replay(AllocReplay& S, const BlockContext& ctx) {
  const int64_t sr = ctx.s * ctx.r, co = ctx.cfg->c_hidden_opm;
  from_store_replay(S, ctx, sr * ctx.cfg->c_m);
  from_store_replay(S, ctx, sr * co);
  from_store_replay(S, ctx, sr * co);
}

void outer_product_mean_backward(const OuterProductMeanW& w, OuterProductMeanW* g,
                                 const BlockContext& ctx, const float* m_in,
                                 const OuterProductMeanState& st, const float* dz, float* dm) {
  const EvoformerConfig& cfg = *ctx.cfg;
  const int64_t s = ctx.s, r = ctx.r, cm = cfg.c_m, co = cfg.c_hidden_opm, cz = cfg.c_z;
  const int64_t ca = opm_a_channels(w, cfg), cab = ca + co;
  const int64_t sr = s * r, rco = r * co, rca = r * ca;
  Tensor dxln = Tensor::empty({sr, cm});  // dL/d LN(m)
  {
    Tensor dab = Tensor::empty({sr, cab});  // dL/d (linear_1 | linear_2), before masking
    {
      Tensor da = Tensor::empty({s, r, ca});  // dL/d a
      Tensor db = Tensor::zeros({s, r, co});  // dL/d b (summed over the chunks of i)
      const float* ap = st.a.f32();
      const float* bp = st.b.f32();
      const int64_t ch = opm_outer_backward_chunk(ctx, r);
      const bool bf = ctx.store == DType::BF16;
      Tensor o = Tensor::empty({ch * ca, rco});  // outer, then (f32) its gradient, [(i, c), (j, e)]
      // outer [(i, j), (c, e)], in bf16 under BF16 (the output Linear's x)
      Tensor p = Tensor::empty({ch * r, ca * co}, bf ? DType::BF16 : DType::F32);
      Tensor dp = Tensor::empty({ch * r, ca * co});      // dL/d outer [(i, j), (c, e)]
      Tensor dy = Tensor::empty({ch * r, cz});           // dL/d linear_out(outer)
      const Tensor ab16 = opm_ab_bf16(ctx, st.a, st.b);  // [s*r*(ca + co)] bf16 (BF16 only)
      float* db_out = w.mean_first ? nullptr : bias_ptr(g->out);
      for (int64_t i0 = 0; i0 < r; i0 += ch) {
        const int64_t n = std::min(ch, r - i0);
        float* dyp = dy.f32();
        // outer = A^T B with A = a [s, r*ca], B = b [s, r*c_o]: dA = B dO^T, dB += A dO.
        if (bf) {
          outer_chunk_bf16(ab16, s, r, ca, co, i0, n, o.f32(), p.data<uint16_t>());
          opm_residual_backward(w, cfg, dz + i0 * r * cz, st.norm.f32() + i0 * r, n * r, dyp, g);
          train_linear_backward(ctx, p.data<uint16_t>(), ca * co, n * r, ca * co, w.out.w.f32(), cz,
                                dyp, cz, dp.f32(), ca * co, g->out.w.f32(), db_out);
          const uint16_t* a16 = ab16.data<uint16_t>();              // [s, r, ca]
          const uint16_t* b16 = a16 + sr * ca;                      // [s, r, co]
          Tensor do16 = Tensor::empty({n * ca, rco}, DType::BF16);  // bf16 dO [(i, c), (j, e)]
          opm_outer_from_pairs_bf16(dp.f32(), n, r, ca, co, do16.data<uint16_t>());
          kern::gemm_typed(DType::BF16, false, true, s, n * ca, rco, 1.f, b16, rco,
                           do16.data<uint16_t>(), rco, 0.f, da.f32() + i0 * ca, rca);
          kern::gemm_typed(DType::BF16, false, false, s, rco, n * ca, 1.f, a16 + i0 * ca, rca,
                           do16.data<uint16_t>(), rco, 1.f, db.f32(), rco);
          continue;
        }
        outer_chunk(ap, bp, s, r, ca, co, i0, n, o.f32(), p.f32());
        opm_residual_backward(w, cfg, dz + i0 * r * cz, st.norm.f32() + i0 * r, n * r, dyp, g);
        train_linear_backward(ctx, p.f32(), ca * co, n * r, ca * co, w.out.w.f32(), cz, dyp, cz,
                              dp.f32(), ca * co, g->out.w.f32(), db_out);
        const float* dpp = dp.f32();
        float* dop = o.f32();
        opm_outer_from_pairs(dpp, n, r, ca, co, dop);
        kern::gemm(false, true, s, n * ca, rco, 1.f, bp, rco, dop, rco, 0.f, da.f32() + i0 * ca,
                   rca);
        kern::gemm(false, false, s, rco, n * ca, 1.f, ap + i0 * ca, rca, dop, rco, 1.f, db.f32(),
                   rco);
      }
      const float* dap = da.f32();
      const float* dbp = db.f32();
      float* dabp = dab.f32();
      const float* mask = ctx.msa_mask;
#pragma omp parallel for schedule(static)
      for (int64_t row = 0; row < sr; ++row) {
        for (int64_t c = 0; c < ca; ++c) dabp[row * cab + c] = dap[row * ca + c] * mask[row];
        for (int64_t c = 0; c < co; ++c) dabp[row * cab + ca + c] = dbp[row * co + c] * mask[row];
      }
    }
    train_linear_backward(ctx, st.x_ln.f32(), cm, sr, cm, w.l12.w.f32(), cab, dab.f32(), cab,
                          dxln.f32(), cm, g->l12.w.f32(), bias_ptr(g->l12));
  }
  layernorm_backward_into(m_in, dxln.f32(), sr, cm, w.ln, st.mean.f32(), st.rstd.f32(), dm, &g->ln,
                          true);
}

void outer_product_mean_shard_train(const OuterProductMeanW& w, const BlockContext& ctx,
                                    const float* m, int64_t col0, int64_t cols,
                                    const float* mask_cols, const ShardGather& gather, float* z,
                                    OuterProductMeanState* st) {
  *st = OuterProductMeanState{};
  const EvoformerConfig& cfg = *ctx.cfg;
  const int64_t s = ctx.s, r = ctx.r, co = cfg.c_hidden_opm, cz = cfg.c_z;
  const int64_t sc = s * cols, parts = gather.parts;
  FC_CHECK(parts >= 1 && cols * parts == r);
  opm_projections(w, ctx, m, s, cols, mask_cols, st);
  st->norm = Tensor::empty({cols, r});
  kern::gemm(true, false, cols, r, s, 1.f, ctx.msa_mask + col0, r, ctx.msa_mask, r, 0.f,
             st->norm.f32(), r);
  if (!z) return;
  Tensor b_all = Tensor::empty({parts, s, cols, co});  // every shard's b, shard-major
  gather.fn(st->b.f32(), sc * co, b_all.f32());
  // bf16 training: a | every shard's b as the products' bf16 inputs [s*cols*co*(1 + parts)]
  Tensor ab16 = opm_ab_bf16(ctx, st->a, b_all);
  if (ab16.defined()) b_all = Tensor();
  const int64_t ch = opm_outer_chunk(ctx, cols);
  const int64_t bw = cols * co;                 // columns (j, e) of one shard
  Tensor o = Tensor::empty({ch * co, r * co});  // [(i, c), (j, e)]
  Tensor p = Tensor::empty({ch * r, co * co});  // [(i, j), (c, e)]
  Tensor y = Tensor::empty({ch * r, cz});       // linear_out(p)
  for (int64_t i0 = 0; i0 < cols; i0 += ch) {
    const int64_t n = std::min(ch, cols - i0);
    shard_outer_chunk(ab16, st->a.f32(), b_all, s, bw, co, parts, i0, n, o.f32());
    const float* op = o.f32();
    float* pp = p.f32();
    opm_pairs_from_outer(op, n, r, co, pp);
    train_linear(ctx, pp, co * co, n * r, co * co, w.out.w.f32(),
                 w.mean_first ? nullptr : bias_ptr(w.out), cz, y.f32(), cz);
    opm_residual(w, cfg, y.f32(), st->norm.f32() + i0 * r, n * r, z + i0 * r * cz);
  }
}

void outer_product_mean_shard_backward(const OuterProductMeanW& w, OuterProductMeanW* g,
                                       const BlockContext& ctx, const float* m_in, int64_t cols,
                                       const float* mask_cols, const OuterProductMeanState& st,
                                       const ShardGather& gather, const ShardReduce& reduce,
                                       const float* dz, float* dm) {
  const EvoformerConfig& cfg = *ctx.cfg;
  const int64_t s = ctx.s, r = ctx.r, cm = cfg.c_m, co = cfg.c_hidden_opm, cz = cfg.c_z;
  const int64_t sc = s * cols, parts = gather.parts, bw = cols * co, rco = r * co;
  FC_CHECK(parts >= 1 && cols * parts == r && reduce.parts == parts);
  Tensor dxln = Tensor::empty({sc, cm});  // dL/d LN(m)
  {
    Tensor dab = Tensor::empty({sc, 2 * co});  // dL/d (linear_1 | linear_2), before masking
    {
      Tensor da = Tensor::empty({s, cols, co});  // dL/d a
      Tensor db = Tensor::empty({s, cols, co});  // dL/d b, summed over the shards
      {
        Tensor b_all = Tensor::empty({parts, s, cols, co});  // every shard's b, shard-major
        gather.fn(st.b.f32(), sc * co, b_all.f32());
        // bf16 training: a | every shard's b, bf16 [s*cols*co*(1 + parts)]
        Tensor ab16 = opm_ab_bf16(ctx, st.a, b_all);
        if (ab16.defined()) b_all = Tensor();
        Tensor db_all = Tensor::zeros({parts, s, cols, co});  // this shard's part of dL/d b
        const float* ap = st.a.f32();
        const int64_t ch = opm_outer_backward_chunk(ctx, cols);
        Tensor o = Tensor::empty({ch * co, rco});      // outer, then its gradient
        Tensor p = Tensor::empty({ch * r, co * co});   // outer [(i, j), (c, e)]
        Tensor dp = Tensor::empty({ch * r, co * co});  // dL/d outer [(i, j), (c, e)]
        Tensor dy = Tensor::empty({ch * r, cz});       // dL/d linear_out(outer)
        for (int64_t i0 = 0; i0 < cols; i0 += ch) {
          const int64_t n = std::min(ch, cols - i0);
          shard_outer_chunk(ab16, ap, b_all, s, bw, co, parts, i0, n, o.f32());
          const float* op = o.f32();
          float* pp = p.f32();
          opm_pairs_from_outer(op, n, r, co, pp);
          float* dyp = dy.f32();
          opm_residual_backward(w, cfg, dz + i0 * r * cz, st.norm.f32() + i0 * r, n * r, dyp, g);
          train_linear_backward(ctx, pp, co * co, n * r, co * co, w.out.w.f32(), cz, dyp, cz,
                                dp.f32(), co * co, g->out.w.f32(),
                                w.mean_first ? nullptr : bias_ptr(g->out));
          const float* dpp = dp.f32();
          float* dop = o.f32();
          opm_outer_from_pairs(dpp, n, r, co, dop);
          // outer = A^T B per shard block q of B: dA = sum_q B_q dO_q^T, dB_q += A dO_q.
          if (ab16.defined()) {
            shard_outer_backward_bf16(ab16, dop, s, bw, co, parts, i0, n, da.f32(), db_all.f32());
            continue;
          }
          for (int64_t q = 0; q < parts; ++q) {
            kern::gemm(false, true, s, n * co, bw, 1.f, b_all.f32() + q * s * bw, bw, dop + q * bw,
                       rco, q == 0 ? 0.f : 1.f, da.f32() + i0 * co, bw);
            kern::gemm(false, false, s, bw, n * co, 1.f, ap + i0 * co, bw, dop + q * bw, rco, 1.f,
                       db_all.f32() + q * s * bw, bw);
          }
        }
        b_all = Tensor();
        o = p = dp = dy = Tensor();
        reduce.fn(db_all.f32(), sc * co, db.f32());
      }
      const float* dap = da.f32();
      const float* dbp = db.f32();
      float* dabp = dab.f32();
#pragma omp parallel for schedule(static)
      for (int64_t row = 0; row < sc; ++row)
        for (int64_t c = 0; c < co; ++c) {
          dabp[row * 2 * co + c] = dap[row * co + c] * mask_cols[row];
          dabp[row * 2 * co + co + c] = dbp[row * co + c] * mask_cols[row];
        }
    }
    train_linear_backward(ctx, st.x_ln.f32(), cm, sc, cm, w.l12.w.f32(), 2 * co, dab.f32(), 2 * co,
                          dxln.f32(), cm, g->l12.w.f32(), bias_ptr(g->l12));
  }
  layernorm_backward_into(m_in, dxln.f32(), sc, cm, w.ln, st.mean.f32(), st.rstd.f32(), dm, &g->ln,
                          true);
}

// ---- Models ------------------------------------------------------------------------------------

// rb: LayerNorm, the masked projections a, b and the mask normaliser (the outer product is rebuilt
// by every backward, counted in re_batched).
LayerWork opm_work(const EvoformerConfig& cfg, int64_t s, int64_t r, const WorkChunks& ch,
                   LayerWork* rb) {
  const int64_t cm = cfg.c_m, co = cfg.c_hidden_opm, cz = cfg.c_z;
  LayerWork w;
  // Training chunks only the outer product (residue blocks i); the projections run whole.
  const int64_t c1 = ch.training ? s : opm_projection_chunk(*ch.ctx, r);
  const int64_t c2 = opm_outer_chunk(*ch.ctx, r);
  w.chunks += div_ceil(s, c1) + div_ceil(r, c2);
  const double sr = static_cast<double>(s) * r, rr = static_cast<double>(r) * r;
  w.gemm.push_back({2 * sr * cm * 2 * co, static_cast<double>(c1 * r)});
  w.gemm.push_back({2 * rr * s, static_cast<double>(r)});  // mask normaliser
  w.batched += 2 * rr * co * co * s;                       // outer products (K = s)
  w.gemm.push_back({2 * rr * co * co * cz, static_cast<double>(c2 * r)});
  w.mem += 2 * sr * cm + 4 * sr * co + 2 * rr * co * co + 3 * rr * cz;
  w.re_batched += 2 * rr * co * co * s;  // the outer product is rebuilt chunk by chunk
  if (!ch.training) {  // the LayerNorm of m's rows and the residual add into z: whole streams
    w.mem -= 2 * sr * cm + 3 * rr * cz;
    w.mem_stream += 2 * sr * cm + 3 * rr * cz;
    w.ws_stream = std::max(sr * cm, rr * cz) * sizeof(float);
  }
  if (rb) {
    *rb = LayerWork{};
    rb->gemm = {w.gemm[0], w.gemm[1]};
    rb->mem = 2 * sr * cm + 4 * sr * co;
  }
  return w;
}

int64_t opm_state_floats(const BlockContext& ctx) {
  const int64_t sr = ctx.s * ctx.r;
  return sr * (2 + ctx.cfg->c_m + 2 * ctx.cfg->c_hidden_opm) + ctx.r * ctx.r;
}

// z_update: the forward adds into z (else only the state is built, the module-policy recompute).
void opm_train_replay(AllocReplay& S, const BlockContext& ctx, bool z_update, bool keep) {
  const EvoformerConfig& cfg = *ctx.cfg;
  const int64_t s = ctx.s, r = ctx.r, sr = s * r, co = cfg.c_hidden_opm, cz = cfg.c_z;
  S.alloc(sr * (2 + cfg.c_m + 2 * co));  // mean, rstd, x_ln, a, b
  S.alloc(2 * sr * co);                  // ab
  train_linear_replay(S, ctx, sr, cfg.c_m, 2 * co);
  S.free(2 * sr * co);
  S.alloc(r * r);  // norm
  if (z_update) {
    const bool bf16 = ctx.store == DType::BF16;
    if (bf16) S.alloc_bf16(2 * sr * co);  // ab16
    const int64_t ch = opm_outer_chunk(ctx, r);
    const int64_t chunk = ch * r * ((bf16 ? 1 : 2) * co * co + cz);  // o, p (f32), y
    S.alloc(chunk);
    if (bf16) S.alloc_bf16(ch * r * co * co);  // p (bf16)
    for (int64_t i0 = 0; i0 < r; i0 += ch)
      train_linear_replay(S, ctx, std::min(ch, r - i0) * r, co * co, cz, bf16);
    S.free(chunk);
    if (bf16) S.free_bf16(ch * r * co * co);
    if (bf16) S.free_bf16(2 * sr * co);
  }
  if (!keep) S.free(opm_state_floats(ctx));
}

void opm_backward_replay(AllocReplay& S, const BlockContext& ctx) {
  const EvoformerConfig& cfg = *ctx.cfg;
  const int64_t s = ctx.s, r = ctx.r, sr = s * r, cm = cfg.c_m, co = cfg.c_hidden_opm;
  const int64_t cz = cfg.c_z;
  S.alloc(sr * cm);      // dxln
  S.alloc(2 * sr * co);  // dab
  const int64_t ch = opm_outer_backward_chunk(ctx, r);
  const bool bf16 = ctx.store == DType::BF16;
  // da, db; o, p (f32), dp, dy
  const int64_t inner = 2 * sr * co + ch * r * ((bf16 ? 2 : 3) * co * co + cz);
  S.alloc(inner);
  if (bf16) {
    S.alloc_bf16(ch * r * co * co + 2 * sr * co);  // p (bf16), ab16
    for (int64_t i0 = 0; i0 < r; i0 += ch) {
      const int64_t n = std::min(ch, r - i0);
      train_linear_backward_replay(S, ctx, n * r, co * co, cz, true, true);
      S.alloc_bf16(n * co * r * co);  // do16
      S.free_bf16(n * co * r * co);
    }
    S.free_bf16(ch * r * co * co + 2 * sr * co);
  }
  S.free(inner);
  train_linear_backward_replay(S, ctx, sr, cm, 2 * co);
  S.free(2 * sr * co);
  S.alloc(ln_scratch(sr, cm));
  S.free(ln_scratch(sr, cm));
  S.free(sr * cm);
}

}  // namespace fc
