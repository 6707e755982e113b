// Typed layout and batched-GEMM kernels (contracts in typed.h) with their naive references.
#include "kernels/typed.h"

#include <omp.h>

#include <algorithm>

#include "foldcube/status.h"
#include "kernels/backward.h"
#include "kernels/convert.h"
#include "kernels/kernels.h"

namespace fc::kern {

namespace {
constexpr int64_t kTile = 32;  // 32x32 floats in, 32x32 bf16 out: both fit L1 with the target
constexpr int64_t kParallelMin = 1 << 15;

// Bytes of one element of a GEMM input type.
int64_t elem_bytes(DType ab) { return ab == DType::BF16 ? 2 : 4; }
}  // namespace

void transpose_to_bf16(const float* src, int64_t lds, uint16_t* dst, int64_t ldd, int64_t rows,
                       int64_t cols) {
  const int64_t rt = (rows + kTile - 1) / kTile, ctl = (cols + kTile - 1) / kTile;
#pragma omp parallel for collapse(2) schedule(static) if (rows * cols > kParallelMin)
  for (int64_t bc = 0; bc < ctl; ++bc)
    for (int64_t br = 0; br < rt; ++br) {
      const int64_t r0 = br * kTile, c0 = bc * kTile;
      const int64_t nr = std::min(rows, r0 + kTile) - r0, nc = std::min(cols, c0 + kTile) - c0;
      uint16_t tile[kTile * kTile];  // [nr, nc] the rounded source tile, rows of kTile
      for (int64_t r = 0; r < nr; ++r) f32_to_bf16(src + (r0 + r) * lds + c0, tile + r * kTile, nc);
      for (int64_t c = 0; c < nc; ++c)
        for (int64_t r = 0; r < nr; ++r) dst[(c0 + c) * ldd + r0 + r] = tile[r * kTile + c];
    }
}

void gemm_batched_typed(DType ab, int64_t batch, bool trans_a, bool trans_b, int64_t M, int64_t N,
                        int64_t K, float alpha, const void* A, int64_t lda, int64_t stride_a,
                        const void* B, int64_t ldb, int64_t stride_b, float beta, float* C,
                        int64_t ldc, int64_t stride_c) {
  FC_CHECK(ab == DType::F32 || ab == DType::BF16);
  const int64_t eb = elem_bytes(ab);
  const char* a = static_cast<const char*>(A);
  const char* b = static_cast<const char*>(B);
  auto one = [&](int64_t i) {
    gemm_typed(ab, trans_a, trans_b, M, N, K, alpha, a + i * stride_a * eb, lda,
               b + i * stride_b * eb, ldb, beta, C + i * stride_c, ldc);
  };
  const int threads = omp_get_max_threads();
  if (batch >= threads && threads > 1 && !omp_in_parallel()) {
#pragma omp parallel num_threads(threads)
    {
      omp_set_num_threads(1);  // this implicit task's nested regions (oneDNN's) get one thread
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < batch; ++i) one(i);
    }
  } else {
    for (int64_t i = 0; i < batch; ++i) one(i);
  }
}

namespace {
// dst [rows, n] (dense) = bf16(src [rows, n], leading dimension ld).
void rows_to_bf16(const float* src, int64_t ld, int64_t rows, int64_t n, uint16_t* dst) {
  if (ld == n) return f32_to_bf16(src, dst, rows * n);
  f32_to_bf16_rows(src, ld, dst, n, rows, n);
}
}  // namespace

int64_t linear_bf16_scratch(int64_t rows, int64_t in) { return rows * in; }

int64_t linear_backward_bf16_scratch(int64_t rows, int64_t in, int64_t out, bool dW) {
  return rows * out + (dW ? rows * in : 0);
}

void linear_bf16(const uint16_t* xb, int64_t ldx, int64_t rows, int64_t in, const uint16_t* Wb,
                 const float* b, int64_t out, float* y, int64_t ldy, bool accumulate) {
  if (b != nullptr && !accumulate)  // the bias as the product's (the bits of y = b, then y +=)
    return gemm_typed(DType::BF16, false, true, rows, out, in, 1.f, xb, ldx, Wb, in, 0.f, y, ldy,
                      b);
  if (b != nullptr) add_bias_rows(y, ldy, b, rows, out);
  gemm_typed(DType::BF16, false, true, rows, out, in, 1.f, xb, ldx, Wb, in,
             accumulate || b != nullptr ? 1.f : 0.f, y, ldy);
}

void linear_bf16(const float* x, int64_t ldx, int64_t rows, int64_t in, const uint16_t* Wb,
                 const float* b, int64_t out, float* y, int64_t ldy, bool accumulate,
                 uint16_t* scratch) {
  rows_to_bf16(x, ldx, rows, in, scratch);
  linear_bf16(scratch, in, rows, in, Wb, b, out, y, ldy, accumulate);
}

void linear_backward_bf16(const uint16_t* xb, int64_t ldx, int64_t rows, int64_t in,
                          const uint16_t* Wb, int64_t out, const float* dy, int64_t lddy, float* dx,
                          int64_t lddx, float* dW, float* db, bool accumulate, uint16_t* scratch) {
  if (db)
    linear_backward(nullptr, ldx, rows, in, nullptr, out, dy, lddy, nullptr, lddx, nullptr, db);
  if (!dx && !dW) return;
  uint16_t* dyb = scratch;  // [rows, out]
  rows_to_bf16(dy, lddy, rows, out, dyb);
  if (dx)
    gemm_typed(DType::BF16, false, false, rows, in, out, 1.f, dyb, out, Wb, in,
               accumulate ? 1.f : 0.f, dx, lddx);
  if (dW) gemm_typed(DType::BF16, true, false, out, in, rows, 1.f, dyb, out, xb, ldx, 1.f, dW, in);
}

void linear_backward_bf16(const float* x, int64_t ldx, int64_t rows, int64_t in, const uint16_t* Wb,
                          int64_t out, const float* dy, int64_t lddy, float* dx, int64_t lddx,
                          float* dW, float* db, bool accumulate, uint16_t* scratch) {
  uint16_t* xb = scratch + rows * out;  // [rows, in] (with dW)
  if (dW) rows_to_bf16(x, ldx, rows, in, xb);
  linear_backward_bf16(xb, in, rows, in, Wb, out, dy, lddy, dx, lddx, dW, db, accumulate, scratch);
}

namespace ref {

void linear_bf16(const uint16_t* xb, int64_t ldx, int64_t rows, int64_t in, const uint16_t* Wb,
                 const float* b, int64_t out, float* y, int64_t ldy, bool accumulate) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < out; ++o) {
      float acc = 0.f;
      ref::gemm_bf16(false, true, 1, 1, in, 1.f, xb + r * ldx, ldx, Wb + o * in, in, 0.f, &acc, 1);
      y[r * ldy + o] = (b ? b[o] : 0.f) + acc + (accumulate ? y[r * ldy + o] : 0.f);
    }
}

void linear_bf16(const float* x, int64_t ldx, int64_t rows, int64_t in, const uint16_t* Wb,
                 const float* b, int64_t out, float* y, int64_t ldy, bool accumulate,
                 uint16_t* scratch) {
  for (int64_t r = 0; r < rows; ++r) ref::f32_to_bf16(x + r * ldx, scratch + r * in, in);
  ref::linear_bf16(scratch, in, rows, in, Wb, b, out, y, ldy, accumulate);
}

void linear_backward_bf16(const uint16_t* xb, int64_t ldx, int64_t rows, int64_t in,
                          const uint16_t* Wb, int64_t out, const float* dy, int64_t lddy, float* dx,
                          int64_t lddx, float* dW, float* db, bool accumulate, uint16_t* scratch) {
  if (db)
    ref::linear_backward(nullptr, ldx, rows, in, nullptr, out, dy, lddy, nullptr, lddx, nullptr,
                         db);
  uint16_t* dyb = scratch;
  for (int64_t r = 0; r < rows; ++r) ref::f32_to_bf16(dy + r * lddy, dyb + r * out, out);
  if (dx)
    ref::gemm_bf16(false, false, rows, in, out, 1.f, dyb, out, Wb, in, accumulate ? 1.f : 0.f, dx,
                   lddx);
  if (dW) ref::gemm_bf16(true, false, out, in, rows, 1.f, dyb, out, xb, ldx, 1.f, dW, in);
}

void linear_backward_bf16(const float* x, int64_t ldx, int64_t rows, int64_t in, const uint16_t* Wb,
                          int64_t out, const float* dy, int64_t lddy, float* dx, int64_t lddx,
                          float* dW, float* db, bool accumulate, uint16_t* scratch) {
  uint16_t* xb = scratch + rows * out;
  if (dW)
    for (int64_t r = 0; r < rows; ++r) ref::f32_to_bf16(x + r * ldx, xb + r * in, in);
  ref::linear_backward_bf16(xb, in, rows, in, Wb, out, dy, lddy, dx, lddx, dW, db, accumulate,
                            scratch);
}

void transpose_to_bf16(const float* src, int64_t lds, uint16_t* dst, int64_t ldd, int64_t rows,
                       int64_t cols) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) ref::f32_to_bf16(src + r * lds + c, dst + c * ldd + r, 1);
}

void gemm_batched_typed(DType ab, int64_t batch, bool trans_a, bool trans_b, int64_t M, int64_t N,
                        int64_t K, float alpha, const void* A, int64_t lda, int64_t stride_a,
                        const void* B, int64_t ldb, int64_t stride_b, float beta, float* C,
                        int64_t ldc, int64_t stride_c) {
  FC_CHECK(ab == DType::BF16);
  const uint16_t* a = static_cast<const uint16_t*>(A);
  const uint16_t* b = static_cast<const uint16_t*>(B);
  for (int64_t i = 0; i < batch; ++i)
    ref::gemm_bf16(trans_a, trans_b, M, N, K, alpha, a + i * stride_a, lda, b + i * stride_b, ldb,
                   beta, C + i * stride_c, ldc);
}

}  // namespace ref
}  // namespace fc::kern
