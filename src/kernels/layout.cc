// Transpose and broadcast kernels. Plain loops the compiler vectorises; the transpose is blocked
// so that both the reads and the writes stay within a few cache lines per tile.
#include <algorithm>

#include "kernels/kernels.h"

namespace fc::kern {

namespace {
constexpr int64_t kTile = 32;  // 32x32 floats = 4 KiB per tile, fits L1 with its target
constexpr int64_t kParallelMin = 1 << 15;
}  // namespace

void transpose(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t rows, int64_t cols) {
  const int64_t rt = (rows + kTile - 1) / kTile, ctl = (cols + kTile - 1) / kTile;
#pragma omp parallel for collapse(2) schedule(static) if (rows * cols > kParallelMin)
  for (int64_t bc = 0; bc < ctl; ++bc)
    for (int64_t br = 0; br < rt; ++br) {
      const int64_t r1 = std::min(rows, (br + 1) * kTile), c1 = std::min(cols, (bc + 1) * kTile);
      for (int64_t c = bc * kTile; c < c1; ++c)
        for (int64_t r = br * kTile; r < r1; ++r) dst[c * ldd + r] = src[r * lds + c];
    }
}

void mul_inplace(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t rows, int64_t n) {
#pragma omp parallel for schedule(static) if (rows * n > kParallelMin)
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < n; ++i) y[r * ldy + i] *= x[r * ldx + i];
}

void scale_rows(float* y, int64_t ldy, const float* s, int64_t rows, int64_t n) {
#pragma omp parallel for schedule(static) if (rows * n > kParallelMin)
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < n; ++i) y[r * ldy + i] *= s[r];
}

namespace ref {
void transpose(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
}
void mul_inplace(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < n; ++i) y[r * ldy + i] = y[r * ldy + i] * x[r * ldx + i];
}
void scale_rows(float* y, int64_t ldy, const float* s, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < n; ++i) y[r * ldy + i] = y[r * ldy + i] * s[r];
}
}  // namespace ref

}  // namespace fc::kern
