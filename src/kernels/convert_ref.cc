// Naive references of the element-type kernels (convert.h): one element at a time, rounding
// decided by comparing the distances to the two neighbouring 16-bit values in double.
#include <cmath>
#include <cstring>

#include "kernels/convert.h"

namespace fc::kern::ref {

namespace {

uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

float float_of(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

// Magnitude of a bf16 / f16 bit pattern without its sign, for patterns up to the Inf pattern,
// which stands for the next power of two past the largest finite value (unbounded exponent).
double bf16_magnitude(uint16_t h) {
  if (h == 0x7F80) return std::ldexp(1.0, 128);
  return static_cast<double>(float_of(static_cast<uint32_t>(h) << 16));
}
double f16_magnitude(uint16_t h) {
  const int e = (h >> 10) & 0x1F, m = h & 0x3FF;
  return e == 0 ? std::ldexp(m, -24) : std::ldexp(1024 + m, e - 25);
}

// The pattern in [0, inf] nearest to x >= 0 (finite), ties to the even pattern; magnitudes grow
// with the pattern.
template <class Mag>
uint16_t round_magnitude(double x, uint16_t inf, Mag mag) {
  if (x >= mag(inf)) return inf;
  uint16_t lo = 0, hi = inf;  // mag(lo) <= x < mag(hi)
  while (hi - lo > 1) {
    const uint16_t mid = static_cast<uint16_t>((lo + hi) / 2);
    (mag(mid) <= x ? lo : hi) = mid;
  }
  const double below = x - mag(lo), above = mag(hi) - x;
  if (below < above) return lo;
  if (above < below) return hi;
  return (lo & 1) ? hi : lo;
}

}  // namespace

void f32_to_bf16(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float x = src[i];
    const uint16_t sign = static_cast<uint16_t>((bits_of(x) >> 16) & 0x8000);
    if (std::isnan(x)) {
      dst[i] = static_cast<uint16_t>((bits_of(x) >> 16) | 0x40);
    } else if (std::isinf(x)) {
      dst[i] = sign | 0x7F80;
    } else {
      dst[i] = sign | round_magnitude(std::fabs(static_cast<double>(x)), 0x7F80, bf16_magnitude);
    }
  }
}

void bf16_to_f32(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = float_of(static_cast<uint32_t>(src[i]) << 16);
}

void round_to_bf16(const float* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint16_t h = 0;
    f32_to_bf16(&src[i], &h, 1);
    bf16_to_f32(&h, &dst[i], 1);
  }
}

void f32_to_bf16_rows(const float* src, int64_t lds, uint16_t* dst, int64_t ldd, int64_t rows,
                      int64_t n) {
  for (int64_t r = 0; r < rows; ++r) f32_to_bf16(src + r * lds, dst + r * ldd, n);
}

void f32_to_f16(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float x = src[i];
    const uint32_t u = bits_of(x);
    const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000);
    if (std::isnan(x)) {
      dst[i] = sign | 0x7E00 | ((u >> 13) & 0x3FF);
    } else if (std::isinf(x)) {
      dst[i] = sign | 0x7C00;
    } else {
      dst[i] = sign | round_magnitude(std::fabs(static_cast<double>(x)), 0x7C00, f16_magnitude);
    }
  }
}

void f16_to_f32(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t h = src[i];
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
    const uint32_t e = (h >> 10) & 0x1F, m = h & 0x3FF;
    if (e == 0x1F) {  // Inf, or NaN made quiet with the payload kept
      dst[i] = float_of(sign | 0x7F800000 | (m << 13) | (m != 0 ? 0x00400000 : 0));
    } else {
      const float mag = static_cast<float>(f16_magnitude(h & 0x7FFF));  // exact in f32
      dst[i] = sign ? -mag : mag;
    }
  }
}

float f64_to_f32_round_odd(double x) {
  float f = static_cast<float>(x);
  if (std::isnan(x) || static_cast<double>(f) == x) return f;
  if (std::fabs(static_cast<double>(f)) > std::fabs(x))  // rounded away from zero: step back
    f = std::nextafter(f, 0.f);
  return float_of(bits_of(f) | 1);
}

void gemm_bf16(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
               const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb, float beta, float* C,
               int64_t ldc) {
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      double acc = 0.0;
      for (int64_t k = 0; k < K; ++k) {
        float a, b;
        bf16_to_f32(trans_a ? &A[k * lda + i] : &A[i * lda + k], &a, 1);
        bf16_to_f32(trans_b ? &B[j * ldb + k] : &B[k * ldb + j], &b, 1);
        acc += static_cast<double>(a) * b;
      }
      const float prev = beta == 0.f ? 0.f : beta * C[i * ldc + j];
      C[i * ldc + j] = static_cast<float>(alpha * acc) + prev;
    }
}

}  // namespace fc::kern::ref
