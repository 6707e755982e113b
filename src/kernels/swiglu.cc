// The SwiGLU gate's backward (AF3 transitions) and the naive references of the gate and its
// backward (the forward gate, vectorised, is kern::swiglu in elementwise_hwy.cc). Row-parallel
// loops in float; the references compute in double, one element at a time.
#include <cmath>

#include "kernels/backward.h"
#include "kernels/kernels.h"

namespace fc::kern {

namespace {
inline float sigmoidf(float x) { return 1.f / (1.f + std::exp(-x)); }
}  // namespace

void swiglu_backward(const float* a, int64_t lda, const float* b, int64_t ldb, const float* dy,
                     int64_t lddy, float* da, int64_t ldda, float* db, int64_t lddb, int64_t rows,
                     int64_t n) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* ar = a + r * lda;
    const float* br = b + r * ldb;
    const float* dyr = dy + r * lddy;
    float* dar = da + r * ldda;
    float* dbr = db + r * lddb;
    for (int64_t j = 0; j < n; ++j) {
      const float s = sigmoidf(ar[j]);
      dar[j] = dyr[j] * br[j] * s * (1.f + ar[j] * (1.f - s));
      dbr[j] = dyr[j] * ar[j] * s;
    }
  }
}

namespace ref {
namespace {
double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
}  // namespace

void swiglu(float* a, int64_t lda, const float* b, int64_t ldb, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < n; ++j) {
      const double x = a[r * lda + j];
      a[r * lda + j] = static_cast<float>(x * sigmoid(x) * b[r * ldb + j]);
    }
}

void swiglu_backward(const float* a, int64_t lda, const float* b, int64_t ldb, const float* dy,
                     int64_t lddy, float* da, int64_t ldda, float* db, int64_t lddb, int64_t rows,
                     int64_t n) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < n; ++j) {
      const double x = a[r * lda + j], y = b[r * ldb + j], g = dy[r * lddy + j];
      const double s = sigmoid(x);
      da[r * ldda + j] = static_cast<float>(g * y * s * (1.0 + x * (1.0 - s)));
      db[r * lddb + j] = static_cast<float>(g * x * s);
    }
}
}  // namespace ref

}  // namespace fc::kern
