// Element-type kernels: conversions between f32 and the 16-bit types, and the GEMM entry point
// that takes its input element type. bf16 and f16 values travel as their raw bits (uint16_t).
//
// Conversions to 16 bits round to nearest, ties to even (IEEE default), keep the sign of zeros,
// map overflow to +-Inf (bf16: above its max 0x7F7F plus half an ulp; f16: from 65520 up), produce
// subnormals where the format has them (f16 below 2^-14; bf16 shares f32's range), and keep NaN a
// NaN (quiet, the top payload bits kept). Widening to f32 is exact. The fast versions (Highway,
// every x86 target, src/kernels/convert_hwy.cc) give the same bits as the naive references
// (kern::ref, src/kernels/convert_ref.cc) for every input; tests/convert_test.cc checks it.
// Contract as kernels.h: caller-owned memory, no allocation, parallel over the elements with
// OpenMP for large n (on the calling thread inside a parallel region).
#pragma once

#include <cstdint>

#include "foldcube/tensor.h"

namespace fc::kern {

void f32_to_bf16(const float* src, uint16_t* dst, int64_t n);
void bf16_to_f32(const uint16_t* src, float* dst, int64_t n);
void f32_to_f16(const float* src, uint16_t* dst, int64_t n);
void f16_to_f32(const uint16_t* src, float* dst, int64_t n);
// dst[i] = bf16_to_f32(f32_to_bf16(src[i])): the value rounded to bf16, kept in f32 storage (the
// bf16 training's stream rounding); src == dst allowed.
void round_to_bf16(const float* src, float* dst, int64_t n);
// f32_to_bf16 on `rows` rows of n elements with their own leading dimensions: dst [rows, ldd]
// row i = bf16(src [rows, lds] row i); the elements past n of each dst row are not written. One
// call for many short rows (a layout change with the rounding, e.g. the outer product mean's
// pairs or the attention backward's packed K, V, Q). Parallel over the rows when large.
void f32_to_bf16_rows(const float* src, int64_t lds, uint16_t* dst, int64_t ldd, int64_t rows,
                      int64_t n);

// Row-major C[M,N] (f32) = alpha * op(A) op(B) + beta * C with A and B of element type `ab`
// (F32: kern::gemm; BF16: oneDNN matmul with f32 accumulation; F16 is not supported, FC_CHECK).
// Shapes and leading dimensions as kern::gemm (in elements of `ab`). The bf16 path keeps one
// oneDNN matmul primitive per distinct call shape and thread count in a per-thread cache; it may
// be called from several threads at once (inside an OpenMP region each call runs on its calling
// thread, as kern::gemm does). bias (BF16 with beta 0 only, else FC_CHECK): C = alpha op(A) op(B)
// + bias[N] on every row, added by oneDNN after the product: the bits of beta 1 on C prefilled
// with the bias rows, without writing and reading C twice.
void gemm_typed(DType ab, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                const void* A, int64_t lda, const void* B, int64_t ldb, float beta, float* C,
                int64_t ldc, const float* bias = nullptr);

namespace ref {
// Naive one-element-at-a-time conversions (the definitions the fast ones are tested against):
// rounding by comparing the distances to the two neighbours in double.
void f32_to_bf16(const float* src, uint16_t* dst, int64_t n);
void bf16_to_f32(const uint16_t* src, float* dst, int64_t n);
void f32_to_f16(const float* src, uint16_t* dst, int64_t n);
void f16_to_f32(const uint16_t* src, float* dst, int64_t n);
void round_to_bf16(const float* src, float* dst, int64_t n);
void f32_to_bf16_rows(const float* src, int64_t lds, uint16_t* dst, int64_t ldd, int64_t rows,
                      int64_t n);
// f64 to f32 rounding to odd: a following round-to-nearest-even to bf16 or f16 then equals the
// direct rounding of the double (the intermediate keeps more than two extra bits).
float f64_to_f32_round_odd(double x);
// C = alpha * op(A) op(B) + beta * C with bf16 inputs, accumulated in double.
void gemm_bf16(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
               const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb, float beta, float* C,
               int64_t ldc);
}  // namespace ref

}  // namespace fc::kern
