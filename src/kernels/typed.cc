// Typed layout and batched-GEMM kernels (contracts in typed.h) with their naive references.
#include "kernels/typed.h"

#include <omp.h>

#include <algorithm>

#include "foldcube/status.h"
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

namespace ref {

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
