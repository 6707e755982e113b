// Gated multi-head attention with additive biases (see kernels.h for the contract).
// Work item = (batch, head); per item K and V are packed densely, then queries go in tiles of
// kQueryTile: logits [tile, Lk] -> biases -> softmax -> P V -> gate. Per-thread scratch holds one
// item's tiles, never the [H, Lq, Lk] logits. (The online-softmax kernel with a saved log-sum-exp
// for backward comes with issue 4.)
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "foldcube/status.h"
#include "kernels/kernels.h"

namespace fc::kern {

namespace {
// Queries per tile: the [kQueryTile, Lk] logit tile stays in L2 between the two products.
constexpr int64_t kQueryTile = 64;

int64_t item_scratch_floats(const AttentionArgs& a) {
  const int64_t qt = std::min(a.Lq, kQueryTile);
  return 2 * a.Lk * a.C + 2 * qt * a.C + qt * a.Lk;
}

// Copies rows [rows, C] from a strided source into a dense [rows, C] buffer. Dense operands keep
// GEMM loads off power-of-two strides (a 4 KiB row stride maps every row to the same L1 sets).
void pack(const float* src, int64_t ld, int64_t rows, int64_t C, float* dst) {
  for (int64_t i = 0; i < rows; ++i) std::memcpy(dst + i * C, src + i * ld, C * sizeof(float));
}

// One (b, h) item. Scratch layout: K [Lk, C] | V [Lk, C] | Q tile [qt, C] | O tile [qt, C] |
// logits [qt, Lk].
void attention_item(const AttentionArgs& a, int64_t b, int64_t h, float* scratch) {
  const int64_t qt = std::min(a.Lq, kQueryTile);
  float* K = scratch;
  float* V = K + a.Lk * a.C;
  float* Q = V + a.Lk * a.C;
  float* O = Q + qt * a.C;
  float* S = O + qt * a.C;
  pack(a.k + b * a.k_bs + h * a.C, a.k_rs, a.Lk, a.C, K);
  pack(a.v + b * a.v_bs + h * a.C, a.v_rs, a.Lk, a.C, V);
  const float* mb = a.mask_bias ? a.mask_bias + b * a.Lk : nullptr;
  for (int64_t i0 = 0; i0 < a.Lq; i0 += qt) {
    const int64_t n = std::min(qt, a.Lq - i0);
    pack(a.q + b * a.q_bs + i0 * a.q_rs + h * a.C, a.q_rs, n, a.C, Q);
    gemm(false, true, n, a.Lk, a.C, a.scale, Q, a.C, K, a.C, 0.f, S, a.Lk);
    const float* pb = a.pair_bias ? a.pair_bias + (h * a.Lq + i0) * a.Lk : nullptr;
    for (int64_t i = 0; i < n; ++i) {
      float* row = S + i * a.Lk;  // [Lk]
      if (mb)
        for (int64_t j = 0; j < a.Lk; ++j) row[j] += mb[j];
      if (pb)
        for (int64_t j = 0; j < a.Lk; ++j) row[j] += pb[i * a.Lk + j];
    }
    softmax_rows(S, a.Lk, n, a.Lk);
    gemm(false, false, n, a.C, a.Lk, 1.f, S, a.Lk, V, a.C, 0.f, O, a.C);
    if (a.gate) sigmoid_mul(O, a.C, a.gate + b * a.g_bs + i0 * a.g_rs + h * a.C, a.g_rs, n, a.C);
    float* o = a.o + b * a.o_bs + i0 * a.o_rs + h * a.C;
    for (int64_t i = 0; i < n; ++i) std::memcpy(o + i * a.o_rs, O + i * a.C, a.C * sizeof(float));
  }
}
}  // namespace

int64_t attention_scratch_floats(const AttentionArgs& a, int threads) {
  return static_cast<int64_t>(std::max(threads, 1)) * item_scratch_floats(a);
}

void attention(const AttentionArgs& a, float* scratch, int threads) {
  const int64_t items = a.B * a.H;
  if (items == 0 || a.Lq == 0) return;
  FC_CHECK(a.Lk > 0 && a.C > 0);
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, items)));
  const int64_t per = item_scratch_floats(a);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t it = 0; it < items; ++it)
    attention_item(a, it / a.H, it % a.H,
                   scratch + static_cast<int64_t>(omp_get_thread_num()) * per);
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
          if (a.gate)
            g = 1.0 / (1.0 + std::exp(-static_cast<double>(
                                 a.gate[b * a.g_bs + i * a.g_rs + h * a.C + c])));
          o[c] = static_cast<float>(acc * g);
        }
      }
}
}  // namespace ref
}  // namespace fc::kern
