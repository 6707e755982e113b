#include "layers/layer_norm_linear.h"

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
}  // namespace

// ---- Inference ---------------------------------------------------------------------------------

int64_t pair_bias_chunk(const BlockContext& ctx, int64_t rows) {
  return pick_chunk(ctx, rows, ctx.r * ctx.cfg->c_z * kF);
}

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
  const int64_t ch = pair_bias_chunk(ctx, rows);
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
  return pair_bias_chunk(ctx, rows) * r * cz * kF;
}

void pair_bias_permute(const float* t, int64_t r, int64_t H, bool transposed, float* bias) {
#pragma omp parallel for schedule(static)
  for (int64_t q = 0; q < r; ++q)
    for (int64_t k = 0; k < r; ++k) {
      const float* src = t + (transposed ? k * r + q : q * r + k) * H;
      for (int64_t h = 0; h < H; ++h) bias[(h * r + q) * r + k] = src[h];
    }
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

// ---- Training ----------------------------------------------------------------------------------

int64_t bias_train_chunk(const BlockContext& ctx, int64_t H) {
  return pick_chunk(ctx, ctx.r, bias_train_row_bytes(ctx, H));
}

int64_t bias_train_row_bytes(const BlockContext& ctx, int64_t H) {
  // Per row of z: LN(z) and its gradient, the bias rows and their gradient.
  return ctx.r * (2 * ctx.cfg->c_z + 2 * H + 2) * kF;
}

// Bias branch forward: bias[h][q][k] = (LN(z) W^T)[q, k, h] (or [k, q, h] when transposed), by
// blocks of rows of z.
Tensor pair_bias_train(const LayerNormW& ln, const LinearW& lin, const BlockContext& ctx,
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
void pair_bias_backward(const LayerNormW& ln, const LinearW& lin, LayerNormW* gln, LinearW* glin,
                        const BlockContext& ctx, bool transposed, const float* z,
                        const float* dbias, float* dz) {
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

// ---- Models ------------------------------------------------------------------------------------

// bias_forward: bias [H, r, r] stays; LN and projection of a row block are transient.
void pair_bias_train_replay(AllocReplay& S, const BlockContext& ctx, int64_t H) {
  const int64_t r = ctx.r, cz = ctx.cfg->c_z, rows = bias_train_chunk(ctx, H) * r;
  S.alloc(H * r * r);
  S.alloc(rows * (cz + H));
  S.free(rows * (cz + H));
}

}  // namespace fc
