// Naive references for the row-wise and elementwise kernels (see kernels.h for the contracts).
// Plain loops, statistics and exponentials in double: obviously correct, not fast. The fast
// versions in elementwise_hwy.cc are tested against these.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/convert.h"
#include "kernels/kernels.h"

namespace fc::kern::ref {

namespace {
double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
}  // namespace

void layernorm(const float* x, int64_t ldx, float* y, int64_t ldy, int64_t rows, int64_t n,
               const float* gamma, const float* beta, float eps, float* mean, float* rstd) {
  if (n <= 0) return;
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ldx;  // [n]
    float* yr = y + r * ldy;        // [n]
    double sum = 0;
    for (int64_t i = 0; i < n; ++i) sum += xr[i];
    const double mu = sum / static_cast<double>(n);
    double ss = 0;
    for (int64_t i = 0; i < n; ++i) ss += (xr[i] - mu) * (xr[i] - mu);
    const double var = ss / static_cast<double>(n);  // biased
    const double rs = 1.0 / std::sqrt(var + static_cast<double>(eps));
    for (int64_t i = 0; i < n; ++i)
      yr[i] = static_cast<float>((xr[i] - mu) * rs * gamma[i] + beta[i]);
    if (mean) mean[r] = static_cast<float>(mu);
    if (rstd) rstd[r] = static_cast<float>(rs);
  }
}

void layernorm_bf16(const float* x, int64_t ldx, uint16_t* y, int64_t ldy, int64_t rows, int64_t n,
                    const float* gamma, const float* beta, float eps, float* mean, float* rstd) {
  std::vector<float> row(static_cast<size_t>(std::max<int64_t>(n, 0)));  // [n] one f32 row
  for (int64_t r = 0; r < rows; ++r) {
    ref::layernorm(x + r * ldx, ldx, row.data(), n, 1, n, gamma, beta, eps,
                   mean ? mean + r : nullptr, rstd ? rstd + r : nullptr);
    ref::f32_to_bf16(row.data(), y + r * ldy, n);
  }
}

void softmax_rows(float* x, int64_t ld, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
    float* xr = x + r * ld;  // [n]
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < n; ++i) mx = std::max(mx, xr[i]);
    if (mx == -std::numeric_limits<float>::infinity()) {
      std::fill(xr, xr + n, 0.f);
      continue;
    }
    double sum = 0;
    for (int64_t i = 0; i < n; ++i) sum += std::exp(static_cast<double>(xr[i]) - mx);
    for (int64_t i = 0; i < n; ++i)
      xr[i] = static_cast<float>(std::exp(static_cast<double>(xr[i]) - mx) / sum);
  }
}

void sigmoid_mul(float* y, int64_t ldy, const float* g, int64_t ldg, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < n; ++i)
      y[r * ldy + i] = static_cast<float>(y[r * ldy + i] * sigmoid(g[r * ldg + i]));
}

void sigmoid_inplace(float* x, int64_t ld, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < n; ++i) x[r * ld + i] = static_cast<float>(sigmoid(x[r * ld + i]));
}

void relu_inplace(float* x, int64_t ld, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < n; ++i) x[r * ld + i] = x[r * ld + i] > 0.f ? x[r * ld + i] : 0.f;
}

void add_inplace(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < n; ++i) y[r * ldy + i] += x[r * ldx + i];
}

void add_bias_rows(float* y, int64_t ldy, const float* bias, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < n; ++i) y[r * ldy + i] += bias[i];
}

}  // namespace fc::kern::ref
