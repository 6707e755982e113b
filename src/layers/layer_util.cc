#include "layers/layer_util.h"

#include "foldcube/status.h"
#include "kernels/backward.h"
#include "kernels/convert.h"
#include "kernels/kernels.h"
#include "kernels/typed.h"

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

// Fused BF16 (layer_util.h).
bool bf16_fused(const BlockContext& ctx) { return ctx.fused && ctx.dtype == DType::BF16; }

NormedRows normed_rows(const Shape& y_shape, int64_t rows, DType y_type) {
  NormedRows t;
  t.y = Tensor::empty(y_shape, y_type);
  t.mean = Tensor::empty({rows});
  t.rstd = Tensor::empty({rows});
  return t;
}

NormedRows layernorm_with_stats(const float* x, int64_t rows, int64_t n, const LayerNormW& ln,
                                float eps, DType y_type) {
  NormedRows t = normed_rows({rows, n}, rows, y_type);
  if (y_type == DType::BF16)
    kern::layernorm_bf16(x, n, t.y.data<uint16_t>(), n, rows, n, ln.w.f32(), ln.b.f32(), eps,
                         t.mean.f32(), t.rstd.f32());
  else
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

int64_t train_linear_bf16_elems(int64_t rows, int64_t in, int64_t out, bool x_bf16) {
  return out * in + (x_bf16 ? 0 : kern::linear_bf16_scratch(rows, in));
}

int64_t train_linear_backward_bf16_elems(int64_t rows, int64_t in, int64_t out, bool dW,
                                         bool x_bf16) {
  return out * in + kern::linear_backward_bf16_scratch(rows, in, out, dW && !x_bf16);
}

void train_linear(const BlockContext& ctx, const float* x, int64_t ldx, int64_t rows, int64_t in,
                  const float* W, const float* b, int64_t out, float* y, int64_t ldy,
                  bool accumulate) {
  if (ctx.store != DType::BF16)
    return kern::linear(x, ldx, rows, in, W, b, out, y, ldy, accumulate);
  Tensor buf = Tensor::empty({train_linear_bf16_elems(rows, in, out)}, DType::BF16);  // Wb | x
  uint16_t* wb = buf.data<uint16_t>();                                                // [out, in]
  kern::f32_to_bf16(W, wb, out * in);
  kern::linear_bf16(x, ldx, rows, in, wb, b, out, y, ldy, accumulate, wb + out * in);
}

void train_linear(const BlockContext& ctx, const uint16_t* xb, int64_t ldx, int64_t rows,
                  int64_t in, const float* W, const float* b, int64_t out, float* y, int64_t ldy,
                  bool accumulate) {
  FC_CHECK(ctx.store == DType::BF16);
  Tensor wb = Tensor::empty({out, in}, DType::BF16);  // [out, in] bf16(W)
  kern::f32_to_bf16(W, wb.data<uint16_t>(), out * in);
  kern::linear_bf16(xb, ldx, rows, in, wb.data<uint16_t>(), b, out, y, ldy, accumulate);
}

void train_linear_backward(const BlockContext& ctx, const float* x, int64_t ldx, int64_t rows,
                           int64_t in, const float* W, int64_t out, const float* dy, int64_t lddy,
                           float* dx, int64_t lddx, float* dW, float* db, bool accumulate) {
  if (ctx.store != DType::BF16)
    return kern::linear_backward(x, ldx, rows, in, W, out, dy, lddy, dx, lddx, dW, db, accumulate);
  // Wb [out, in] | dy [rows, out] | x [rows, in] (with dW)
  Tensor buf =
      Tensor::empty({train_linear_backward_bf16_elems(rows, in, out, dW != nullptr)}, DType::BF16);
  uint16_t* wb = buf.data<uint16_t>();
  kern::f32_to_bf16(W, wb, out * in);
  kern::linear_backward_bf16(x, ldx, rows, in, wb, out, dy, lddy, dx, lddx, dW, db, accumulate,
                             wb + out * in);
}

void train_linear_backward(const BlockContext& ctx, const uint16_t* xb, int64_t ldx, int64_t rows,
                           int64_t in, const float* W, int64_t out, const float* dy, int64_t lddy,
                           float* dx, int64_t lddx, float* dW, float* db, bool accumulate) {
  FC_CHECK(ctx.store == DType::BF16);
  // Wb [out, in] | dy [rows, out]
  Tensor buf = Tensor::empty({train_linear_backward_bf16_elems(rows, in, out, dW != nullptr, true)},
                             DType::BF16);
  uint16_t* wb = buf.data<uint16_t>();
  kern::f32_to_bf16(W, wb, out * in);
  kern::linear_backward_bf16(xb, ldx, rows, in, wb, out, dy, lddy, dx, lddx, dW, db, accumulate,
                             wb + out * in);
}

void train_linear_replay(AllocReplay& S, const BlockContext& ctx, int64_t rows, int64_t in,
                         int64_t out, bool x_bf16) {
  if (ctx.store != DType::BF16) return;
  S.alloc_bf16(train_linear_bf16_elems(rows, in, out, x_bf16));
  S.free_bf16(train_linear_bf16_elems(rows, in, out, x_bf16));
}

void train_linear_backward_replay(AllocReplay& S, const BlockContext& ctx, int64_t rows, int64_t in,
                                  int64_t out, bool dW, bool x_bf16) {
  if (ctx.store != DType::BF16) return;
  S.alloc_bf16(train_linear_backward_bf16_elems(rows, in, out, dW, x_bf16));
  S.free_bf16(train_linear_backward_bf16_elems(rows, in, out, dW, x_bf16));
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
