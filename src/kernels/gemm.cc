// GEMM through oneDNN's dnnl_sgemm (chosen over OpenBLAS by measurement: docs/gemm.md).
#include <dnnl.h>
#include <omp.h>

#include "foldcube/status.h"
#include "kernels/kernels.h"

namespace fc::kern {

void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
          int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == 0.f ? 0.f : beta * C[i * ldc + j];
    return;
  }
  dnnl_status_t st = dnnl_sgemm(trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', M, N, K, alpha, A, lda, B,
                                ldb, beta, C, ldc);
  FC_CHECK_MSG(st == dnnl_success, "dnnl_sgemm failed");
}

void gemm_batched(int64_t batch, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
                  float alpha, const float* A, int64_t lda, int64_t stride_a, const float* B,
                  int64_t ldb, int64_t stride_b, float beta, float* C, int64_t ldc,
                  int64_t stride_c) {
  // A batch at least as large as the thread count keeps every core busy with one
  // single-threaded product each (no per-call threading overhead on small matrices).
  const int threads = omp_get_max_threads();
  if (batch >= threads && !omp_in_parallel()) {
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t b = 0; b < batch; ++b)
      gemm(trans_a, trans_b, M, N, K, alpha, A + b * stride_a, lda, B + b * stride_b, ldb, beta,
           C + b * stride_c, ldc);
  } else {
    for (int64_t b = 0; b < batch; ++b)
      gemm(trans_a, trans_b, M, N, K, alpha, A + b * stride_a, lda, B + b * stride_b, ldb, beta,
           C + b * stride_c, ldc);
  }
}

void linear(const float* x, int64_t ldx, int64_t rows, int64_t in, const float* W, const float* b,
            int64_t out, float* y, int64_t ldy, bool accumulate) {
  float beta = accumulate ? 1.f : 0.f;
  if (b != nullptr) {
    if (!accumulate) {
#pragma omp parallel for schedule(static) if (rows * out > (1 << 16))
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t o = 0; o < out; ++o) y[r * ldy + o] = b[o];
    } else {
      add_bias_rows(y, ldy, b, rows, out);
    }
    beta = 1.f;
  }
  gemm(false, true, rows, out, in, 1.f, x, ldx, W, in, beta, y, ldy);
}

namespace ref {

void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
          int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      double acc = 0.0;
      for (int64_t k = 0; k < K; ++k) {
        float a = trans_a ? A[k * lda + i] : A[i * lda + k];
        float bv = trans_b ? B[j * ldb + k] : B[k * ldb + j];
        acc += static_cast<double>(a) * bv;
      }
      float prev = beta == 0.f ? 0.f : beta * C[i * ldc + j];
      C[i * ldc + j] = static_cast<float>(alpha * acc) + prev;
    }
}

void linear(const float* x, int64_t ldx, int64_t rows, int64_t in, const float* W, const float* b,
            int64_t out, float* y, int64_t ldy, bool accumulate) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < out; ++o) {
      double acc = b ? b[o] : 0.0;
      for (int64_t i = 0; i < in; ++i) acc += static_cast<double>(x[r * ldx + i]) * W[o * in + i];
      y[r * ldy + o] = static_cast<float>(acc) + (accumulate ? y[r * ldy + o] : 0.f);
    }
}

}  // namespace ref
}  // namespace fc::kern
