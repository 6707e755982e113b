#include "layers/layer_util.h"

#include "kernels/backward.h"
#include "kernels/convert.h"
#include "kernels/kernels.h"

namespace fc {

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

// bf16 products in the outer product mean and the triangle multiplication: fused BF16 on a single
// shard (the shard gathers move f32 and keep f32 products).
bool bf16_products(const BlockContext& ctx, int64_t parts) {
  return ctx.fused && ctx.dtype == DType::BF16 && parts == 1;
}

NormedRows normed_rows(const Shape& y_shape, int64_t rows) {
  NormedRows t;
  t.y = Tensor::empty(y_shape);
  t.mean = Tensor::empty({rows});
  t.rstd = Tensor::empty({rows});
  return t;
}

NormedRows layernorm_with_stats(const float* x, int64_t rows, int64_t n, const LayerNormW& ln,
                                float eps) {
  NormedRows t = normed_rows({rows, n}, rows);
  kern::layernorm(x, n, t.y.f32(), n, rows, n, ln.w.f32(), ln.b.f32(), eps, t.mean.f32(),
                  t.rstd.f32());
  return t;
}

void round_for_store(const BlockContext& ctx, Tensor& t) {
  if (ctx.store == DType::BF16) kern::round_to_bf16(t.f32(), t.f32(), t.numel());
}

Tensor to_store(const BlockContext& ctx, Tensor t) {
  if (ctx.store != DType::BF16) return t;
  Tensor b = Tensor::empty(t.shape(), DType::BF16);
  kern::f32_to_bf16(t.f32(), b.data<uint16_t>(), t.numel());
  return b;
}

Tensor from_store(Tensor t) {
  if (t.dtype() != DType::BF16) return t;
  Tensor f = Tensor::empty(t.shape());
  kern::bf16_to_f32(t.data<uint16_t>(), f.f32(), t.numel());
  return f;
}

void to_store_replay(AllocReplay& S, const BlockContext& ctx, int64_t n) {
  if (ctx.store != DType::BF16) return;
  S.alloc_bf16(n);
  S.free(n);
}

void from_store_replay(AllocReplay& S, const BlockContext& ctx, int64_t n) {
  if (ctx.store != DType::BF16) return;
  S.alloc(n);
  S.free_bf16(n);
}

// dx (+)= LayerNorm backward; dgamma/dbeta accumulate into ln_grad. Allocates the kernel scratch.
void layernorm_backward_into(const float* x, const float* dy, int64_t rows, int64_t n,
                             const LayerNormW& ln, const float* mean, const float* rstd, float* dx,
                             LayerNormW* ln_grad, bool accumulate) {
  // [row blocks * 2 * n] partial dgamma | dbeta sums
  Tensor scratch = Tensor::empty({kern::layernorm_backward_scratch_floats(rows, n)});
  kern::layernorm_backward(x, n, dy, n, rows, n, ln.w.f32(), mean, rstd, dx, n, ln_grad->w.f32(),
                           ln_grad->b.f32(), scratch.f32(), accumulate);
}

}  // namespace fc
