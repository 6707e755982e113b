// Gated multi-head attention with additive biases (see kernels.h for the contract).
// This version materialises one [Lq, Lk] logit tile per (batch, head) work item in per-thread
// scratch; the fused online-softmax kernel that never materialises logits comes with chunking.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "foldcube/status.h"
#include "kernels/kernels.h"

namespace fc::kern {

int64_t attention_scratch_floats(const AttentionArgs& a, int threads) {
  return static_cast<int64_t>(std::max(threads, 1)) * a.Lq * a.Lk;
}

namespace {
// One (b, h) item: logits in s [Lq, Lk], then o = softmax(s) v, then gating.
void attention_item(const AttentionArgs& a, int64_t b, int64_t h, float* s) {
  const float* q = a.q + b * a.q_bs + h * a.C;
  const float* k = a.k + b * a.k_bs + h * a.C;
  const float* v = a.v + b * a.v_bs + h * a.C;
  float* o = a.o + b * a.o_bs + h * a.C;
  gemm(false, true, a.Lq, a.Lk, a.C, a.scale, q, a.q_rs, k, a.k_rs, 0.f, s, a.Lk);
  const float* mb = a.mask_bias ? a.mask_bias + b * a.Lk : nullptr;
  const float* pb = a.pair_bias ? a.pair_bias + h * a.Lq * a.Lk : nullptr;
  if (mb || pb) {
    for (int64_t i = 0; i < a.Lq; ++i) {
      float* row = s + i * a.Lk;  // [Lk]
      if (mb)
        for (int64_t j = 0; j < a.Lk; ++j) row[j] += mb[j];
      if (pb) {
        const float* prow = pb + i * a.Lk;
        for (int64_t j = 0; j < a.Lk; ++j) row[j] += prow[j];
      }
    }
  }
  softmax_rows(s, a.Lk, a.Lq, a.Lk);
  gemm(false, false, a.Lq, a.C, a.Lk, 1.f, s, a.Lk, v, a.v_rs, 0.f, o, a.o_rs);
  if (a.gate) sigmoid_mul(o, a.o_rs, a.gate + b * a.g_bs + h * a.C, a.g_rs, a.Lq, a.C);
}
}  // namespace

void attention(const AttentionArgs& a, float* scratch, int threads) {
  const int64_t items = a.B * a.H;
  if (items == 0 || a.Lq == 0) return;
  FC_CHECK(a.Lk > 0 && a.C > 0);
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, items)));
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t it = 0; it < items; ++it) {
    float* s = scratch + static_cast<int64_t>(omp_get_thread_num()) * a.Lq * a.Lk;
    attention_item(a, it / a.H, it % a.H, s);
  }
}

namespace ref {
void attention(const AttentionArgs& a, float* scratch) {
  float* logit = scratch;  // [Lk]
  for (int64_t b = 0; b < a.B; ++b)
    for (int64_t h = 0; h < a.H; ++h)
      for (int64_t i = 0; i < a.Lq; ++i) {
        const float* q = a.q + b * a.q_bs + i * a.q_rs + h * a.C;
        double mx = -INFINITY;
        for (int64_t j = 0; j < a.Lk; ++j) {
          const float* k = a.k + b * a.k_bs + j * a.k_rs + h * a.C;
          double dot = 0.0;
          for (int64_t c = 0; c < a.C; ++c) dot += static_cast<double>(q[c]) * k[c];
          float x = static_cast<float>(dot * a.scale);
          if (a.mask_bias) x += a.mask_bias[b * a.Lk + j];
          if (a.pair_bias) x += a.pair_bias[(h * a.Lq + i) * a.Lk + j];
          logit[j] = x;
          mx = std::max<double>(mx, x);
        }
        double sum = 0.0;
        for (int64_t j = 0; j < a.Lk; ++j) sum += std::exp(logit[j] - mx);
        float* o = a.o + b * a.o_bs + i * a.o_rs + h * a.C;
        for (int64_t c = 0; c < a.C; ++c) {
          double acc = 0.0;
          for (int64_t j = 0; j < a.Lk; ++j)
            acc += std::exp(logit[j] - mx) / sum * a.v[b * a.v_bs + j * a.v_rs + h * a.C + c];
          double g = 1.0;
          if (a.gate) g = 1.0 / (1.0 + std::exp(-static_cast<double>(a.gate[b * a.g_bs + i * a.g_rs + h * a.C + c])));
          o[c] = static_cast<float>(acc * g);
        }
      }
}
}  // namespace ref
}  // namespace fc::kern
