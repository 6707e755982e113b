// bf16 tile products of the attention kernel (contracts in attention_bf16.h). The AVX512-BF16
// versions carry their own target attribute and run only when native() says the CPU has the
// instructions; the portable versions widen the bf16 halves to f32 and multiply-add in the same
// pair order.
#include "kernels/attention_bf16.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstring>

namespace fc::kern::bf16dot {

namespace {
constexpr int kMaxRows = 8;

// The f32 value of the bf16 in the lower (hi = false) or upper half of a pair.
float half_f32(uint32_t u, bool hi) {
  const uint32_t b = hi ? (u & 0xFFFF0000u) : (u << 16);
  float x;
  std::memcpy(&x, &b, 4);
  return x;
}
// Sum of the two products of a pair with a pair.
float pair_dot(uint32_t a, uint32_t b) {
  return half_f32(a, false) * half_f32(b, false) + half_f32(a, true) * half_f32(b, true);
}
// Nearest-even bf16 bits of a finite f32.
uint16_t round_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

#define FC_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))

FC_BF16_TARGET void logits_native(const uint32_t* Q, int64_t cq, int R, const uint32_t* KP,
                                  int64_t ldk, int64_t w, float* S, int64_t ldS) {
  for (int64_t j = 0; j < w; j += 32) {
    __m512 acc0[kMaxRows], acc1[kMaxRows];
    for (int r = 0; r < R; ++r) acc0[r] = _mm512_setzero_ps(), acc1[r] = _mm512_setzero_ps();
    for (int64_t p = 0; p < cq; ++p) {
      const __m512bh k0 = (__m512bh)_mm512_loadu_si512(KP + p * ldk + j);
      const __m512bh k1 = (__m512bh)_mm512_loadu_si512(KP + p * ldk + j + 16);
      for (int r = 0; r < R; ++r) {
        const __m512bh q = (__m512bh)_mm512_set1_epi32(static_cast<int>(Q[r * cq + p]));
        acc0[r] = _mm512_dpbf16_ps(acc0[r], q, k0);
        acc1[r] = _mm512_dpbf16_ps(acc1[r], q, k1);
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm512_storeu_ps(S + r * ldS + j, acc0[r]);
      _mm512_storeu_ps(S + r * ldS + j + 16, acc1[r]);
    }
  }
}

FC_BF16_TARGET void probs_native(float* S, int64_t ldS, int R, int64_t w) {
  for (int r = 0; r < R; ++r) {
    float* s = S + r * ldS;
    uint16_t* out = reinterpret_cast<uint16_t*>(s);
    for (int64_t j = 0; j < w; j += 32) {  // the store lands behind every later load
      const __m512 a = _mm512_loadu_ps(s + j), b = _mm512_loadu_ps(s + j + 16);
      _mm512_storeu_si512(out + j, (__m512i)_mm512_cvtne2ps_pbh(b, a));
    }
  }
}

template <int NV>
FC_BF16_TARGET void pv_native_cols(const uint32_t* P, int64_t ldP, int R, int64_t pairs,
                                   const uint32_t* VP, int64_t Cp, const float* alpha, bool first,
                                   float* O) {
  __m512 acc[kMaxRows][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v)
      acc[r][v] =
          first ? _mm512_setzero_ps()
                : _mm512_mul_ps(_mm512_loadu_ps(O + r * Cp + v * 16), _mm512_set1_ps(alpha[r]));
  for (int64_t q = 0; q < pairs; ++q) {
    __m512bh vv[NV];
    for (int v = 0; v < NV; ++v) vv[v] = (__m512bh)_mm512_loadu_si512(VP + q * Cp + v * 16);
    for (int r = 0; r < R; ++r) {
      const __m512bh p = (__m512bh)_mm512_set1_epi32(static_cast<int>(P[r * ldP + q]));
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], p, vv[v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(O + r * Cp + v * 16, acc[r][v]);
}

FC_BF16_TARGET void pv_native(const uint32_t* P, int64_t ldP, int R, int64_t pairs,
                              const uint32_t* VP, int64_t Cp, const float* alpha, bool first,
                              float* O) {
  int64_t c = 0;
  for (; c + 32 <= Cp; c += 32)
    pv_native_cols<2>(P, ldP, R, pairs, VP + c, Cp, alpha, first, O + c);
  for (; c < Cp; c += 16) pv_native_cols<1>(P, ldP, R, pairs, VP + c, Cp, alpha, first, O + c);
}
}  // namespace

std::atomic<bool> g_portable{false};

bool native() {
  static const bool has = __builtin_cpu_supports("avx512bf16") != 0;
  return has && !g_portable.load(std::memory_order_relaxed);
}

void force_portable(bool on) { g_portable.store(on, std::memory_order_relaxed); }

void logits(const uint32_t* Q, int64_t cq, int R, const uint32_t* KP, int64_t ldk, int64_t w,
            float* S, int64_t ldS) {
  if (native()) return logits_native(Q, cq, R, KP, ldk, w, S, ldS);
  const int64_t wr = (w + 31) / 32 * 32;
  for (int r = 0; r < R; ++r)
    for (int64_t j = 0; j < wr; ++j) {
      float acc = 0.f;
      for (int64_t p = 0; p < cq; ++p) {
        acc += pair_dot(Q[r * cq + p], KP[p * ldk + j]);
      }
      S[r * ldS + j] = acc;
    }
}

void probs_to_bf16(float* S, int64_t ldS, int R, int64_t w) {
  if (native()) return probs_native(S, ldS, R, w);
  const int64_t wr = (w + 31) / 32 * 32;
  for (int r = 0; r < R; ++r) {
    float* s = S + r * ldS;
    uint16_t* out = reinterpret_cast<uint16_t*>(s);
    for (int64_t j = 0; j < wr; ++j) {
      const uint16_t b = round_bf16(s[j]);  // read before the write two bytes per element behind
      std::memcpy(out + j, &b, 2);
    }
  }
}

void pv(const float* S, int64_t ldS, int R, int64_t w, const uint32_t* VP, int64_t Cp,
        const float* alpha, bool first, float* O) {
  const uint32_t* P = reinterpret_cast<const uint32_t*>(S);  // [R, ldS] pairs of bf16 p
  const int64_t pairs = (w + 1) / 2;
  if (native()) return pv_native(P, ldS, R, pairs, VP, Cp, alpha, first, O);
  for (int r = 0; r < R; ++r)
    for (int64_t c = 0; c < Cp; ++c) {
      float acc = first ? 0.f : O[r * Cp + c] * alpha[r];
      for (int64_t q = 0; q < pairs; ++q) {
        acc += pair_dot(P[r * ldS + q], VP[q * Cp + c]);
      }
      O[r * Cp + c] = acc;
    }
}

}  // namespace fc::kern::bf16dot
