#include "model/af2/confidence.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace fc::af2 {
namespace {

// p [n] = softmax(x [n]).
void softmax(const float* x, int64_t n, float* p) {
  float mx = -INFINITY;
  for (int64_t b = 0; b < n; ++b) mx = std::max(mx, x[b]);
  double sum = 0;
  for (int64_t b = 0; b < n; ++b) sum += p[b] = std::exp(x[b] - mx);
  const float inv = static_cast<float>(1.0 / sum);
  for (int64_t b = 0; b < n; ++b) p[b] *= inv;
}

}  // namespace

void plddt_from_logits(const float* logits, int64_t r, int64_t bins, float* plddt) {
  std::vector<float> p(bins);  // [bins]
  for (int64_t i = 0; i < r; ++i) {
    softmax(logits + i * bins, bins, p.data());
    double acc = 0;
    for (int64_t b = 0; b < bins; ++b) acc += p[b] * (b + 0.5) / static_cast<double>(bins);
    plddt[i] = static_cast<float>(100.0 * acc);
  }
}

void aligned_error_centres(int64_t bins, float max_bin, float* centres) {
  const double step = bins > 2 ? static_cast<double>(max_bin) / (bins - 2) : 0.0;
  for (int64_t b = 0; b < bins; ++b) centres[b] = static_cast<float>(step * b + step / 2);
}

void predicted_aligned_error(const float* tm_logits, int64_t r, int64_t bins, float max_bin,
                             float* probs, float* pae, float* max_pae) {
  aligned_error_positions(tm_logits, r * r, bins, max_bin, probs, pae);
  if (max_pae) {
    std::vector<float> c(bins);  // [bins] centres
    aligned_error_centres(bins, max_bin, c.data());
    *max_pae = c[bins - 1];
  }
}

void aligned_error_positions(const float* tm_logits, int64_t n, int64_t bins, float max_bin,
                             float* probs, float* pae) {
  std::vector<float> c(bins), p(bins);  // [bins] centres, [bins] probabilities
  aligned_error_centres(bins, max_bin, c.data());
  for (int64_t ij = 0; ij < n; ++ij) {
    softmax(tm_logits + ij * bins, bins, p.data());
    double acc = 0;
    for (int64_t b = 0; b < bins; ++b) acc += static_cast<double>(p[b]) * c[b];
    pae[ij] = static_cast<float>(acc);
    if (probs) std::copy(p.begin(), p.end(), probs + ij * bins);
  }
}

float predicted_tm_score(const float* tm_logits, const float* w, int64_t r, int64_t bins,
                         float max_bin) {
  return predicted_tm_rows(tm_logits, w, r, r, r, bins, max_bin);
}

float predicted_tm_rows(const float* tm_logits, const float* w, int64_t rows, int64_t r, int64_t ld,
                        int64_t bins, float max_bin) {
  std::vector<float> c(bins), p(bins);  // [bins] centres, [bins] probabilities
  aligned_error_centres(bins, max_bin, c.data());
  const double d0 = 1.24 * std::cbrt(static_cast<double>(std::max<int64_t>(r, 19)) - 15.0) - 1.8;
  std::vector<double> f(bins);  // [bins] TM-score term of each bin
  for (int64_t b = 0; b < bins; ++b) f[b] = 1.0 / (1.0 + (c[b] / d0) * (c[b] / d0));
  double wsum = 0;
  for (int64_t j = 0; j < r; ++j) wsum += w ? w[j] : 1.0;
  double best = 0;
  for (int64_t i = 0; i < rows; ++i) {
    double row = 0;
    for (int64_t j = 0; j < r; ++j) {
      softmax(tm_logits + (i * ld + j) * bins, bins, p.data());
      double tm = 0;
      for (int64_t b = 0; b < bins; ++b) tm += p[b] * f[b];
      row += (w ? w[j] : 1.0) / (wsum + 1e-8) * tm;
    }
    best = std::max(best, row);
  }
  return static_cast<float>(best);
}

}  // namespace fc::af2
