// Typed layout and batched-GEMM kernels for the bf16 compute path (the triangle multiplication's
// products, the outer product mean): a transpose that rounds to bf16 on the way, and a batched
// GEMM with bf16 inputs and f32 accumulation.
// Contract as kernels.h: caller-owned memory, no allocation, parallel with OpenMP (on the calling
// thread inside a parallel region). Rounding is kern::f32_to_bf16's (nearest, ties to even), so
// the fast and the naive versions give the same bits (transpose) or agree within f32 rounding of
// the accumulation (GEMM; tests/typed_test.cc).
#pragma once

#include <cstdint>

#include "foldcube/tensor.h"

namespace fc::kern {

// dst[c * ldd + r] = bf16(src[r * lds + c]) for a [rows, cols] f32 source (cache-blocked).
void transpose_to_bf16(const float* src, int64_t lds, uint16_t* dst, int64_t ldd, int64_t rows,
                       int64_t cols);

// gemm_typed on `batch` products: product b uses A + b*stride_a, B + b*stride_b (strides in
// elements of `ab`) and C + b*stride_c. Parallel over the batch (each product single-threaded on
// its thread, so results do not depend on the thread count) when the batch is at least the thread
// count; otherwise the products run one after another, each with the threads available.
void gemm_batched_typed(DType ab, int64_t batch, bool trans_a, bool trans_b, int64_t M, int64_t N,
                        int64_t K, float alpha, const void* A, int64_t lda, int64_t stride_a,
                        const void* B, int64_t ldb, int64_t stride_b, float beta, float* C,
                        int64_t ldc, int64_t stride_c);

// ---- Linear with bf16 GEMM inputs (the bf16 training step) -------------------------------------
// kern::linear and kern::linear_backward with the operands of every product rounded to bf16 and
// f32 accumulation (gemm_typed BF16); storage, bias and db stay f32. Wb [out, in] is the bf16
// copy of W (made by the caller, once per module call). The roundings of x and dy go to caller
// scratch (bf16 elements): linear_bf16_scratch for the forward, linear_backward_bf16_scratch for
// the backward (dy [rows, out], then x [rows, in] when dW is wanted).
int64_t linear_bf16_scratch(int64_t rows, int64_t in);
int64_t linear_backward_bf16_scratch(int64_t rows, int64_t in, int64_t out, bool dW);
// y[rows, out] = bf16(x) @ Wb^T + b (+ y when accumulate); bias may be nullptr.
void linear_bf16(const float* x, int64_t ldx, int64_t rows, int64_t in, const uint16_t* Wb,
                 const float* b, int64_t out, float* y, int64_t ldy, bool accumulate,
                 uint16_t* scratch);
// dx (+)= bf16(dy) @ Wb, dW += bf16(dy)^T @ bf16(x), db += column sums of dy (f32, as
// kern::linear_backward); any of dx, dW, db may be nullptr. dx must not alias dy, x.
void linear_backward_bf16(const float* x, int64_t ldx, int64_t rows, int64_t in, const uint16_t* Wb,
                          int64_t out, const float* dy, int64_t lddy, float* dx, int64_t lddx,
                          float* dW, float* db, bool accumulate, uint16_t* scratch);

// The same two with x given in bf16 (xb [rows, in], leading dimension ldx): a producer that
// writes the bf16 copy itself (LayerNorm, ReLU, the attention output) saves the rounding pass.
// The backward's scratch holds dy only: linear_backward_bf16_scratch(rows, in, out, false).
// Equal bits to the f32-x forms on xb = bf16(x).
void linear_bf16(const uint16_t* xb, int64_t ldx, int64_t rows, int64_t in, const uint16_t* Wb,
                 const float* b, int64_t out, float* y, int64_t ldy, bool accumulate);
void linear_backward_bf16(const uint16_t* xb, int64_t ldx, int64_t rows, int64_t in,
                          const uint16_t* Wb, int64_t out, const float* dy, int64_t lddy, float* dx,
                          int64_t lddx, float* dW, float* db, bool accumulate, uint16_t* scratch);

namespace ref {
// Naive forms of the four above (ref::gemm_bf16, double accumulation); scratch as the fast ones.
void linear_bf16(const float* x, int64_t ldx, int64_t rows, int64_t in, const uint16_t* Wb,
                 const float* b, int64_t out, float* y, int64_t ldy, bool accumulate,
                 uint16_t* scratch);
void linear_backward_bf16(const float* x, int64_t ldx, int64_t rows, int64_t in, const uint16_t* Wb,
                          int64_t out, const float* dy, int64_t lddy, float* dx, int64_t lddx,
                          float* dW, float* db, bool accumulate, uint16_t* scratch);
void linear_bf16(const uint16_t* xb, int64_t ldx, int64_t rows, int64_t in, const uint16_t* Wb,
                 const float* b, int64_t out, float* y, int64_t ldy, bool accumulate);
void linear_backward_bf16(const uint16_t* xb, int64_t ldx, int64_t rows, int64_t in,
                          const uint16_t* Wb, int64_t out, const float* dy, int64_t lddy, float* dx,
                          int64_t lddx, float* dW, float* db, bool accumulate, uint16_t* scratch);
void transpose_to_bf16(const float* src, int64_t lds, uint16_t* dst, int64_t ldd, int64_t rows,
                       int64_t cols);
// BF16 inputs only: kern::ref::gemm_bf16 per product (double accumulation).
void gemm_batched_typed(DType ab, int64_t batch, bool trans_a, bool trans_b, int64_t M, int64_t N,
                        int64_t K, float alpha, const void* A, int64_t lda, int64_t stride_a,
                        const void* B, int64_t ldb, int64_t stride_b, float beta, float* C,
                        int64_t ldc, int64_t stride_c);
}  // namespace ref

}  // namespace fc::kern
