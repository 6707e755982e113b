// GEMM, linear and attention: the fast kernels against the naive references, on odd sizes and
// strided (non-contiguous) operands.
#include "kernels/kernels.h"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "core/rng.h"
#include "foldcube/runtime.h"
#include "test_util.h"

namespace fc {
namespace {

std::vector<float> rnd(int64_t n, uint64_t seed) {
  std::vector<float> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = uniform_pm1(seed, i);
  return v;
}

// max |a - b| / max(max |b|, 1) over the first n elements; +Inf on any non-finite value.
double rel_err(const float* a, const float* b, int64_t n) {
  double ref = 1;
  for (int64_t i = 0; i < n; ++i) ref = test::max_nan(ref, std::abs(static_cast<double>(b[i])));
  return test::max_abs_diff(a, b, n) / ref;
}

struct GemmShape {
  int64_t M, N, K;
  bool ta, tb;
};

std::string GemmName(const GemmShape& g) {
  return std::to_string(g.M) + "x" + std::to_string(g.N) + "x" + std::to_string(g.K) +
         (g.ta ? "_ta" : "") + (g.tb ? "_tb" : "");
}
// Test parameters print as their readable name (gtest would print the raw struct bytes).
void PrintTo(const GemmShape& p, std::ostream* os) { *os << GemmName(p); }

class GemmTest : public ::testing::TestWithParam<GemmShape> {};

TEST_P(GemmTest, MatchesReferenceWithPaddedLeadingDims) {
  const auto [M, N, K, ta, tb] = GetParam();
  const int64_t pad = 3;
  const int64_t lda = (ta ? M : K) + pad, ldb = (tb ? K : N) + pad, ldc = N + pad;
  auto A = rnd((ta ? K : M) * lda, 1), B = rnd((tb ? N : K) * ldb, 2), C0 = rnd(M * ldc, 3);
  auto C1 = C0, C2 = C0;
  kern::gemm(ta, tb, M, N, K, 0.7f, A.data(), lda, B.data(), ldb, 0.5f, C1.data(), ldc);
  kern::ref::gemm(ta, tb, M, N, K, 0.7f, A.data(), lda, B.data(), ldb, 0.5f, C2.data(), ldc);
  EXPECT_LT(rel_err(C1.data(), C2.data(), M * ldc), 1e-5);
  for (int64_t i = 0; i < M; ++i)  // padding columns untouched
    for (int64_t j = N; j < ldc; ++j) EXPECT_EQ(C1[i * ldc + j], C0[i * ldc + j]);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, GemmTest,
    ::testing::Values(GemmShape{1, 1, 1, false, false}, GemmShape{7, 13, 5, false, true},
                      GemmShape{17, 3, 33, true, false}, GemmShape{31, 29, 65, true, true},
                      GemmShape{128, 96, 64, false, true}, GemmShape{5, 200, 1, false, false}),
    [](const auto& info) { return GemmName(info.param); });

TEST(Gemm, BatchedMatchesLoop) {
  for (int64_t batch : {1, 3, 16}) {
    const int64_t M = 9, N = 11, K = 13;
    auto A = rnd(batch * M * K, 4), B = rnd(batch * N * K, 5);
    std::vector<float> C1(batch * M * N), C2(batch * M * N);
    kern::gemm_batched(batch, false, true, M, N, K, 1.f, A.data(), K, M * K, B.data(), K, N * K,
                       0.f, C1.data(), N, M * N);
    for (int64_t b = 0; b < batch; ++b)
      kern::ref::gemm(false, true, M, N, K, 1.f, A.data() + b * M * K, K, B.data() + b * N * K, K,
                      0.f, C2.data() + b * M * N, N);
    EXPECT_LT(rel_err(C1.data(), C2.data(), batch * M * N), 1e-5) << batch;
  }
}

TEST(Linear, MatchesReferenceWithBiasAndAccumulate) {
  const int64_t rows = 37, in = 19, out = 23, ldx = 21, ldy = 25;
  auto x = rnd(rows * ldx, 6), W = rnd(out * in, 7), b = rnd(out, 8), y0 = rnd(rows * ldy, 9);
  for (bool acc : {false, true})
    for (const float* bias :
         {static_cast<const float*>(nullptr), static_cast<const float*>(b.data())}) {
      auto y1 = y0, y2 = y0;
      kern::linear(x.data(), ldx, rows, in, W.data(), bias, out, y1.data(), ldy, acc);
      kern::ref::linear(x.data(), ldx, rows, in, W.data(), bias, out, y2.data(), ldy, acc);
      EXPECT_LT(rel_err(y1.data(), y2.data(), rows * ldy), 1e-5) << acc << " " << (bias != nullptr);
    }
}

TEST(Layout, TransposeMulScaleMatchReference) {
  for (auto [rows, cols] :
       std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {3, 70}, {33, 17}, {300, 257}}) {
    const int64_t lds = cols + 3, ldd = rows + 5;
    auto src = rnd(rows * lds, 20);
    std::vector<float> d1(cols * ldd, -3.f), d2(cols * ldd, -3.f);
    kern::transpose(src.data(), lds, d1.data(), ldd, rows, cols);
    kern::ref::transpose(src.data(), lds, d2.data(), ldd, rows, cols);
    EXPECT_EQ(d1, d2) << rows << "x" << cols;  // includes untouched padding
    auto y0 = rnd(rows * lds, 21), x = rnd(rows * lds, 22), sc = rnd(rows, 23);
    auto y1 = y0, y2 = y0;
    kern::mul_inplace(y1.data(), lds, x.data(), lds, rows, cols);
    kern::ref::mul_inplace(y2.data(), lds, x.data(), lds, rows, cols);
    EXPECT_EQ(y1, y2);
    kern::scale_rows(y1.data(), lds, sc.data(), rows, cols);
    kern::ref::scale_rows(y2.data(), lds, sc.data(), rows, cols);
    EXPECT_EQ(y1, y2);
  }
}

struct AttnShape {
  int64_t B, Lq, Lk, H, C;
  bool mask, pair, gate, strided;
};

std::string AttnName(const AttnShape& p) {
  return "B" + std::to_string(p.B) + "_Lq" + std::to_string(p.Lq) + "_Lk" + std::to_string(p.Lk) +
         "_H" + std::to_string(p.H) + "_C" + std::to_string(p.C) + (p.mask ? "_mask" : "") +
         (p.pair ? "_pair" : "") + (p.gate ? "_gate" : "") + (p.strided ? "_strided" : "");
}
// Test parameters print as their readable name (gtest would print the raw struct bytes).
void PrintTo(const AttnShape& p, std::ostream* os) { *os << AttnName(p); }

class AttentionTest : public ::testing::TestWithParam<AttnShape> {};

// Layout as the model uses it: q, k, v, g interleaved in one [B*L, 4*H*C] buffer (strided), or
// each in its own dense [B, L, H*C] buffer.
TEST_P(AttentionTest, MatchesReference) {
  const AttnShape p = GetParam();
  const int64_t hc = p.H * p.C, ld = p.strided ? 4 * hc + 5 : hc;
  auto q = rnd(p.B * p.Lq * ld, 10), k = rnd(p.B * p.Lk * ld, 11), v = rnd(p.B * p.Lk * ld, 12);
  auto g = rnd(p.B * p.Lq * ld, 13);
  std::vector<float> mb(p.B * p.Lk), pb = rnd(p.H * p.Lq * p.Lk, 14);
  for (int64_t i = 0; i < p.B * p.Lk; ++i) mb[i] = (uniform_pm1(15, i) < -0.6f) ? -1e9f : 0.f;
  for (int64_t j = 0; j < p.Lk; ++j) mb[j] = -1e9f;  // batch 0: every key masked
  std::vector<float> o1(p.B * p.Lq * ld, 7.f), o2(p.B * p.Lq * ld, 7.f);
  kern::AttentionArgs a;
  a.B = p.B, a.Lq = p.Lq, a.Lk = p.Lk, a.H = p.H, a.C = p.C;
  a.scale = 1.f / std::sqrt(static_cast<float>(p.C));
  a.q = q.data(), a.q_bs = p.Lq * ld, a.q_rs = ld;
  a.k = k.data(), a.k_bs = p.Lk * ld, a.k_rs = ld;
  a.v = v.data(), a.v_bs = p.Lk * ld, a.v_rs = ld;
  a.mask_bias = p.mask ? mb.data() : nullptr;
  a.pair_bias = p.pair ? pb.data() : nullptr;
  a.gate = p.gate ? g.data() : nullptr, a.g_bs = p.Lq * ld, a.g_rs = ld;
  a.o_bs = p.Lq * ld, a.o_rs = ld;
  const int threads = num_threads();
  std::vector<float> scratch(kern::attention_scratch_floats(a, threads));
  std::vector<float> rscratch(p.Lk);
  a.o = o1.data();
  kern::attention(a, scratch.data(), threads);
  a.o = o2.data();
  kern::ref::attention(a, rscratch.data());
  EXPECT_LT(rel_err(o1.data(), o2.data(), o1.size()), 2e-5);
  for (float x : o1) ASSERT_TRUE(std::isfinite(x));
  for (int64_t i = 0; i < p.B * p.Lq; ++i)  // columns outside [0, hc) untouched
    for (int64_t c = hc; c < ld; ++c) ASSERT_EQ(o1[i * ld + c], 7.f);
}

INSTANTIATE_TEST_SUITE_P(Shapes, AttentionTest,
                         ::testing::Values(AttnShape{1, 1, 1, 1, 1, false, false, false, false},
                                           AttnShape{2, 5, 5, 3, 4, true, true, true, true},
                                           AttnShape{3, 7, 11, 2, 8, true, false, true, false},
                                           AttnShape{4, 17, 17, 4, 32, true, true, false, true},
                                           AttnShape{5, 33, 33, 8, 8, true, true, true, true}),
                         [](const auto& info) { return AttnName(info.param); });

}  // namespace
}  // namespace fc
