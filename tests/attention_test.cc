// Flash-style attention (src/kernels/attention.cc) and its backward with a saved log-sum-exp
// (src/kernels/backward.cc): the fast kernels against the naive references (fc::kern::ref) on
// shapes that are not multiples of the 64 x 128 tiles or of any SIMD width, every bias / gate
// combination, the strided layouts of the modules (q | k | v | g interleaved, o written over q),
// fully masked (-1e9) and -inf rows, lse values, and determinism across thread counts. The
// forward runs on every Highway target compiled in and supported by this CPU (lane counts 4, 8,
// 16 exercise different tails).
//
// Tolerance: 1e-5 of the largest reference value (measured errors are ~1e-6: float sums over at
// most a few hundred terms against double references); a wrong tail, a missed rescale or a skipped
// bias gives errors of 1e-2 or more.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "core/rng.h"
#include "hwy/targets.h"
#include "kernels/attention_bf16.h"
#include "kernels/backward.h"
#include "kernels/kernels.h"

namespace fc {
namespace {

constexpr float kSentinel = 777.25f;  // fills padding; no kernel may write it
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr double kTol = 1e-5;

std::vector<float> vec(int64_t n, uint64_t seed, float scale = 1.f) {
  std::vector<float> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = scale * uniform_pm1(seed, i);
  return v;
}

template <class F>
void ForEachTarget(F body) {
  for (int64_t target : hwy::SupportedAndGeneratedTargets()) {
    hwy::SetSupportedTargetsForTest(target);
    SCOPED_TRACE(hwy::TargetName(target));
    body();
  }
  hwy::SetSupportedTargetsForTest(0);
}

// max |got - want| <= tol * max(max |want|, 1) over the listed elements; NaN anywhere fails, and
// infinities must match exactly.
::testing::AssertionResult Close(const std::vector<float>& got, const std::vector<float>& want,
                                 double tol = kTol) {
  if (got.size() != want.size()) return ::testing::AssertionFailure() << "size mismatch";
  double scale = 1, err = 0;
  size_t at = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (std::isnan(got[i]) || std::isnan(want[i]))
      return ::testing::AssertionFailure() << "NaN at " << i;
    if (std::isinf(got[i]) || std::isinf(want[i])) {
      if (got[i] != want[i])
        return ::testing::AssertionFailure() << "at " << i << ": " << got[i] << " vs " << want[i];
      continue;
    }
    scale = std::max(scale, static_cast<double>(std::abs(want[i])));
    const double e = std::abs(static_cast<double>(got[i]) - want[i]);
    if (e > err) err = e, at = i;
  }
  if (err <= tol * scale) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "max error " << err << " (" << err / scale << " of max |want|) at " << at << ": got "
         << got[at] << " want " << want[at];
}

// Same bits and no NaN (-inf is a legitimate lse of a row whose keys are all -inf).
bool BitEqual(const std::vector<float>& a, const std::vector<float>& b) {
  for (float x : a)
    if (std::isnan(x)) return false;
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

struct Shape {
  int64_t B, Lq, Lk, H, C;
  bool mask, pair, gate, strided;
};

std::string Name(const Shape& p) {
  return "B" + std::to_string(p.B) + "_Lq" + std::to_string(p.Lq) + "_Lk" + std::to_string(p.Lk) +
         "_H" + std::to_string(p.H) + "_C" + std::to_string(p.C) + (p.mask ? "_mask" : "") +
         (p.pair ? "_pair" : "") + (p.gate ? "_gate" : "") + (p.strided ? "_strided" : "");
}
// Test parameters print as their readable name (gtest would print the raw struct bytes).
void PrintTo(const Shape& p, std::ostream* os) { *os << Name(p); }

// Inputs as the modules lay them out: strided, q | k | v | g interleaved in one
// [B * L, 4*H*C + 3] buffer (L = max(Lq, Lk)); or each in its own dense [B, L, H*C] buffer.
// Output o and d_out: [B * L, H*C + 2] (strided) or [B * L, H*C]; padding holds kSentinel.
// Mask: batch 0 has every key masked with -1e9 (uniform softmax), others ~20% of keys.
struct Case {
  Shape p;
  int64_t hc, ld, ldo, L;
  std::vector<float> q, k, v, g, mb, pb, dout;
  kern::AttentionArgs a;

  explicit Case(const Shape& s, uint64_t seed = 300)
      : p(s),
        hc(s.H * s.C),
        ld(s.strided ? 4 * s.H * s.C + 3 : s.H * s.C),
        ldo(s.strided ? s.H * s.C + 2 : s.H * s.C),
        L(std::max(s.Lq, s.Lk)) {
    q = vec(s.B * L * ld, seed, 2.f), k = vec(s.B * L * ld, seed + 1, 2.f);
    v = vec(s.B * L * ld, seed + 2), g = vec(s.B * L * ld, seed + 3, 3.f);
    pb = vec(s.H * s.Lq * s.Lk, seed + 4, 2.f);
    dout = vec(s.B * L * ldo, seed + 5);
    mb.assign(s.B * s.Lk, 0.f);
    for (int64_t i = 0; i < s.B * s.Lk; ++i)
      if (uniform_pm1(seed + 6, i) < -0.6f) mb[i] = -1e9f;
    for (int64_t j = 0; j < s.Lk; ++j) mb[j] = -1e9f;
    a.B = s.B, a.Lq = s.Lq, a.Lk = s.Lk, a.H = s.H, a.C = s.C;
    a.scale = 1.f / std::sqrt(static_cast<float>(s.C));
    Bind();
  }
  Case(const Case& o) : Case(o.p) {
    q = o.q, k = o.k, v = o.v, g = o.g, mb = o.mb, pb = o.pb, dout = o.dout;
    Bind();
  }
  void Bind() {
    const int64_t bs = L * ld;
    a.q = q.data(), a.q_bs = bs, a.q_rs = ld;
    a.k = k.data(), a.k_bs = bs, a.k_rs = ld;
    a.v = v.data(), a.v_bs = bs, a.v_rs = ld;
    if (p.strided) a.k = q.data() + hc, a.v = q.data() + 2 * hc;  // one interleaved buffer
    a.gate = p.gate ? (p.strided ? q.data() + 3 * hc : g.data()) : nullptr;
    a.g_bs = bs, a.g_rs = ld;
    a.o_bs = L * ldo, a.o_rs = ldo;
    a.mask_bias = p.mask ? mb.data() : nullptr;
    a.pair_bias = p.pair ? pb.data() : nullptr;
  }
  std::vector<float> NewOut() const { return std::vector<float>(p.B * L * ldo, kSentinel); }
  std::vector<float> NewLse() const { return std::vector<float>(p.B * p.H * p.Lq, kSentinel); }
};

// Runs the fast (threads > 0) or the reference (threads == 0) forward; returns o, fills lse.
std::vector<float> Forward(const Case& c, int threads, std::vector<float>* lse = nullptr) {
  std::vector<float> o = c.NewOut();
  kern::AttentionArgs a = c.a;
  a.o = o.data();
  if (lse) *lse = c.NewLse(), a.lse = lse->data();
  if (threads > 0) {
    std::vector<float> scratch(kern::attention_scratch_floats(a, threads));
    kern::attention(a, scratch.data(), threads);
  } else {
    std::vector<float> scratch(c.p.Lk);
    kern::ref::attention(a, scratch.data());
  }
  return o;
}

// Every element outside the [B, Lq, H*C] output block still holds kSentinel.
::testing::AssertionResult OutsideUntouched(const Case& c, const std::vector<float>& o) {
  for (int64_t b = 0; b < c.p.B; ++b)
    for (int64_t i = 0; i < c.L; ++i)
      for (int64_t col = 0; col < c.ldo; ++col)
        if ((i >= c.p.Lq || col >= c.hc) && o[(b * c.L + i) * c.ldo + col] != kSentinel)
          return ::testing::AssertionFailure() << "written at " << b << ", " << i << ", " << col;
  return ::testing::AssertionSuccess();
}

class AttentionForward : public ::testing::TestWithParam<Shape> {};

TEST_P(AttentionForward, MatchesReferenceWithLse) {
  const Case c(GetParam());
  std::vector<float> lse_ref;
  const std::vector<float> o_ref = Forward(c, 0, &lse_ref);
  ForEachTarget([&] {
    std::vector<float> lse;
    const std::vector<float> o = Forward(c, 2, &lse);
    EXPECT_TRUE(Close(o, o_ref));
    EXPECT_TRUE(Close(lse, lse_ref));
    EXPECT_TRUE(OutsideUntouched(c, o));
    EXPECT_TRUE(BitEqual(Forward(c, 2), o));  // lse output changes nothing
  });
  // Batch 0 is fully masked: its lse is the -1e9 bias (log Lk is below float resolution there).
  if (c.p.mask) {
    for (int64_t i = 0; i < c.p.Lq; ++i) EXPECT_NEAR(lse_ref[i], -1e9f, 64.f);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, AttentionForward,
    ::testing::Values(Shape{1, 1, 1, 1, 1, false, false, false, false},  // Lk = 1
                      Shape{2, 3, 1, 2, 5, true, true, true, true},      // Lk = 1, masked
                      Shape{2, 5, 7, 3, 4, true, true, true, true},      // Lk < any tile
                      Shape{3, 9, 11, 2, 8, true, false, true, false},
                      Shape{2, 70, 33, 2, 17, true, true, false, true},     // two query tiles
                      Shape{2, 33, 129, 2, 16, false, true, true, false},   // 128 + 1 keys
                      Shape{2, 67, 300, 1, 33, true, true, true, true},     // 3 key tiles, odd C
                      Shape{1, 130, 257, 2, 32, true, false, false, true},  // 3 x 3 tiles
                      Shape{3, 64, 256, 4, 32, true, true, true, true},     // exact tiles
                      Shape{2, 19, 45, 3, 3, false, false, true, false},
                      Shape{2, 13, 40, 2, 100, true, true, true, true}),  // C: 2-vector + 1-vector
    [](const auto& info) { return Name(info.param); });

// The forward gives the same bits for every thread count (one item per thread, fixed order).
TEST(AttentionForwardDeterminism, ThreadCountIndependent) {
  const Case c(Shape{3, 70, 140, 3, 32, true, true, true, true});
  std::vector<float> lse1, lse;
  const std::vector<float> o1 = Forward(c, 1, &lse1);
  for (int t : {2, 3, 5}) {
    EXPECT_TRUE(BitEqual(Forward(c, t, &lse), o1)) << t;
    EXPECT_TRUE(BitEqual(lse, lse1)) << t;
  }
}

// The modules write o over q (same strides): each query tile is read before it is written.
TEST(AttentionForwardInPlace, OutputOverQ) {
  const Shape s{2, 150, 150, 2, 32, true, true, true, true};
  Case c(s);
  const std::vector<float> o_ref = Forward(c, 0);
  std::vector<float> buf = c.q;  // q | k | v | g; o goes into the q columns
  kern::AttentionArgs a = c.a;
  a.q = buf.data(), a.k = buf.data() + c.hc, a.v = buf.data() + 2 * c.hc;
  a.gate = buf.data() + 3 * c.hc;
  a.o = buf.data(), a.o_bs = a.q_bs, a.o_rs = a.q_rs;
  std::vector<float> scratch(kern::attention_scratch_floats(a, 2));
  kern::attention(a, scratch.data(), 2);
  std::vector<float> got, want;
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t i = 0; i < s.Lq; ++i)
      for (int64_t col = 0; col < c.hc; ++col) {
        got.push_back(buf[(b * c.L + i) * c.ld + col]);
        want.push_back(o_ref[(b * c.L + i) * c.ldo + col]);
      }
  EXPECT_TRUE(Close(got, want));
}

// Rows whose logits are all -inf (mask -inf on every key of batch 1; pair bias -inf on a whole
// query row of head 0) give o = 0 and lse = -inf, never NaN; rows with some -inf keys are normal.
TEST(AttentionForwardInf, NegInfRowsGiveZeros) {
  const Shape s{3, 20, 150, 2, 8, true, true, true, false};
  Case c(s);
  for (int64_t j = 0; j < s.Lk; ++j) c.mb[s.Lk + j] = -kInf;                   // batch 1: all keys
  for (int64_t j = 0; j < s.Lk; j += 3) c.mb[2 * s.Lk + j] = -kInf;            // batch 2: some keys
  for (int64_t j = 0; j < s.Lk; ++j) c.pb[(0 * s.Lq + 5) * s.Lk + j] = -kInf;  // head 0, query 5
  std::vector<float> lse_ref;
  const std::vector<float> o_ref = Forward(c, 0, &lse_ref);
  ForEachTarget([&] {
    std::vector<float> lse;
    const std::vector<float> o = Forward(c, 2, &lse);
    EXPECT_TRUE(Close(o, o_ref));
    EXPECT_TRUE(Close(lse, lse_ref));
    for (int64_t i = 0; i < s.Lq; ++i)
      for (int64_t col = 0; col < c.hc; ++col) ASSERT_EQ(o[(1 * c.L + i) * c.ldo + col], 0.f);
    for (int64_t h = 0; h < s.H; ++h)
      for (int64_t i = 0; i < s.Lq; ++i) EXPECT_EQ(lse[(1 * s.H + h) * s.Lq + i], -kInf);
    for (int64_t b : {0, 2}) {
      EXPECT_EQ(lse[(b * s.H + 0) * s.Lq + 5], -kInf);
      for (int64_t col = 0; col < s.C; ++col) EXPECT_EQ(o[(b * c.L + 5) * c.ldo + col], 0.f);
    }
    for (float x : o) ASSERT_FALSE(std::isnan(x));
  });
}

// ---- bf16 products -----------------------------------------------------------------------------

// ||x - ref|| / ||ref|| over the [B, Lq, H*C] output block.
double NormwiseErr(const Case& c, const std::vector<float>& got, const std::vector<float>& want) {
  double num = 0, den = 0;
  for (int64_t b = 0; b < c.p.B; ++b)
    for (int64_t i = 0; i < c.p.Lq; ++i)
      for (int64_t col = 0; col < c.hc; ++col) {
        const double g = got[(b * c.L + i) * c.ldo + col], w = want[(b * c.L + i) * c.ldo + col];
        num += (g - w) * (g - w), den += w * w;
      }
  return std::sqrt(num / std::max(den, 1e-300));
}

class AttentionForwardBf16 : public ::testing::TestWithParam<Shape> {};

// dtype BF16, on the AVX512-BF16 path (where the CPU has it) and the portable one, on every
// Highway target (the bf16 packing of q, k and v is compiled per target): o within a normwise 4e-3
// of the reference that rounds q, k and v to bf16 (the kernel also rounds the probabilities: 2^-9
// relative each), lse within 1e-3 absolute (same bf16 logits, f32 sums); nothing written outside
// o's block; the same bits for 1 and 3 threads.
TEST_P(AttentionForwardBf16, MatchesBf16ReferenceOnBothPaths) {
  Case c(GetParam());
  c.a.dtype = DType::BF16;
  std::vector<float> lse_ref;
  const std::vector<float> o_ref = Forward(c, 0, &lse_ref);
  for (bool portable : {false, true}) {
    kern::bf16dot::force_portable(portable);
    ForEachTarget([&] {
      std::vector<float> lse;
      const std::vector<float> o = Forward(c, 2, &lse);
      EXPECT_LT(NormwiseErr(c, o, o_ref), 4e-3) << "portable " << portable;
      for (size_t i = 0; i < lse.size(); ++i)
        ASSERT_NEAR(lse[i], lse_ref[i], 1e-3 * std::max(1.f, std::abs(lse_ref[i])))
            << i << " portable " << portable;
      EXPECT_TRUE(OutsideUntouched(c, o));
      EXPECT_TRUE(BitEqual(Forward(c, 1), o)) << "portable " << portable;
      EXPECT_TRUE(BitEqual(Forward(c, 3), o)) << "portable " << portable;
    });
  }
  kern::bf16dot::force_portable(false);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, AttentionForwardBf16,
    ::testing::Values(Shape{1, 1, 1, 1, 1, false, false, false, false},     // Lk = 1, C = 1
                      Shape{2, 5, 7, 3, 4, true, true, true, true},         // Lk < any tile
                      Shape{2, 70, 33, 2, 17, true, true, false, true},     // odd C, odd Lk
                      Shape{2, 67, 300, 1, 33, true, true, true, true},     // 2 key tiles, odd C
                      Shape{1, 130, 513, 2, 32, true, false, false, true},  // 3 key tiles, odd
                      Shape{3, 64, 256, 4, 32, true, true, true, true},     // exact tiles
                      Shape{2, 13, 40, 2, 100, true, true, true, true}),  // C: 2-vector + 1-vector
    [](const auto& info) { return Name(info.param); });

// Fully masked rows in bf16: o = 0 and lse = -inf, never NaN.
TEST(AttentionForwardBf16Inf, NegInfRowsGiveZeros) {
  const Shape s{2, 20, 150, 2, 8, true, false, true, false};
  Case c(s);
  c.a.dtype = DType::BF16;
  for (int64_t j = 0; j < s.Lk; ++j) c.mb[s.Lk + j] = -kInf;  // batch 1: all keys
  std::vector<float> lse;
  const std::vector<float> o = Forward(c, 2, &lse);
  for (int64_t i = 0; i < s.Lq; ++i)
    for (int64_t col = 0; col < c.hc; ++col) ASSERT_EQ(o[(1 * c.L + i) * c.ldo + col], 0.f);
  for (int64_t i = 0; i < s.H * s.Lq; ++i) EXPECT_EQ(lse[s.H * s.Lq + i], -kInf);
  for (float x : o) ASSERT_FALSE(std::isnan(x));
}

// ---- backward ----------------------------------------------------------------------------------

// Gradient buffers, each [B * L, ld] like the inputs (the kernels write dq, dk, dv, dgate with the
// strides of q, k, v, gate), filled with kSentinel; d_pair_bias [H, Lq, Lk] starts from random
// values (it accumulates).
struct Grads {
  std::vector<float> dq, dk, dv, dg, dpb;
  kern::AttentionGrads gr;
  Grads(const Case& c, bool pair_grad) {
    dq.assign(c.p.B * c.L * c.ld, kSentinel), dk = dq, dv = dq, dg = dq;
    dpb = vec(c.p.H * c.p.Lq * c.p.Lk, 9);
    gr.d_out = c.dout.data();
    gr.dq = dq.data(), gr.dk = dk.data(), gr.dv = dv.data(), gr.dgate = dg.data();
    gr.d_pair_bias = pair_grad ? dpb.data() : nullptr;
  }
  // The [B, rows, H*C] block of x that the kernel writes for an input at column offset col0.
  static std::vector<float> Block(const Case& c, const std::vector<float>& x, int64_t rows,
                                  int64_t col0) {
    std::vector<float> out;
    for (int64_t b = 0; b < c.p.B; ++b)
      for (int64_t i = 0; i < rows; ++i) {
        const float* r = x.data() + (b * c.L + i) * c.ld + col0;  // [H*C]
        out.insert(out.end(), r, r + c.hc);
      }
    return out;
  }
  // Column offsets of q, k, v, gate in their buffers (interleaved when strided).
  std::vector<float> All(const Case& c) const {
    const int64_t s = c.p.strided ? c.hc : 0;
    std::vector<float> r = Block(c, dq, c.p.Lq, 0);
    for (auto [x, rows, col] : {std::tuple{&dk, c.p.Lk, s}, std::tuple{&dv, c.p.Lk, 2 * s},
                                std::tuple{&dg, c.p.gate ? c.p.Lq : 0, 3 * s}}) {
      const std::vector<float> blk = Block(c, *x, rows, col);
      r.insert(r.end(), blk.begin(), blk.end());
    }
    if (gr.d_pair_bias) r.insert(r.end(), dpb.begin(), dpb.end());
    return r;
  }
};

// Runs the fast (threads > 0) or reference (threads == 0) backward, with lse or without (nullptr).
// With strided inputs the gradient pointers carry the column offsets of k, v, gate.
void Backward(const Case& c, Grads& g, int threads, const float* lse) {
  const int64_t s = c.p.strided ? c.hc : 0;
  g.gr.dk = g.dk.data() + s, g.gr.dv = g.dv.data() + 2 * s, g.gr.dgate = g.dg.data() + 3 * s;
  g.gr.lse = lse;
  if (threads > 0) {
    std::vector<float> scratch(
        kern::attention_backward_scratch_floats(c.a, threads, g.gr.d_pair_bias != nullptr));
    kern::attention_backward(c.a, g.gr, scratch.data(), threads);
  } else {
    std::vector<float> scratch(kern::ref::attention_backward_scratch_floats(c.a));
    kern::ref::attention_backward(c.a, g.gr, scratch.data());
  }
}

// Every element of the gradient buffers outside the written blocks still holds kSentinel.
::testing::AssertionResult GradsOutsideUntouched(const Case& c, const Grads& g) {
  const int64_t s = c.p.strided ? c.hc : 0;
  const std::vector<float>* bufs[4] = {&g.dq, &g.dk, &g.dv, &g.dg};
  const int64_t rows[4] = {c.p.Lq, c.p.Lk, c.p.Lk, c.p.gate ? c.p.Lq : 0};
  for (int t = 0; t < 4; ++t)
    for (int64_t b = 0; b < c.p.B; ++b)
      for (int64_t i = 0; i < c.L; ++i)
        for (int64_t col = 0; col < c.ld; ++col) {
          const bool inside = i < rows[t] && col >= t * s && col < t * s + c.hc;
          const float x = (*bufs[t])[(b * c.L + i) * c.ld + col];
          if (!inside && x != kSentinel)
            return ::testing::AssertionFailure()
                   << "gradient " << t << " written at " << b << ", " << i << ", " << col;
          if (inside && !std::isfinite(x))
            return ::testing::AssertionFailure()
                   << "gradient " << t << " not finite at " << b << ", " << i << ", " << col;
        }
  return ::testing::AssertionSuccess();
}

class AttentionBackwardLse : public ::testing::TestWithParam<Shape> {};

// Fast without lse, fast with the lse of the fast forward, both against the reference.
TEST_P(AttentionBackwardLse, MatchesReference) {
  const Case c(GetParam());
  std::vector<float> lse;
  Forward(c, 2, &lse);
  for (bool pair_grad : {true, false}) {
    SCOPED_TRACE(pair_grad ? "d_pair_bias" : "no d_pair_bias");
    Grads r(c, pair_grad), f(c, pair_grad), fl(c, pair_grad);
    Backward(c, r, 0, nullptr);
    Backward(c, f, 2, nullptr);
    ForEachTarget([&] {
      Grads t(c, pair_grad);
      Backward(c, t, 2, lse.data());
      EXPECT_TRUE(Close(t.All(c), r.All(c)));
      EXPECT_TRUE(GradsOutsideUntouched(c, t));
    });
    EXPECT_TRUE(Close(f.All(c), r.All(c)));
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, AttentionBackwardLse,
                         ::testing::Values(Shape{1, 1, 1, 1, 1, false, false, false, false},
                                           Shape{2, 3, 1, 2, 5, true, true, true, true},
                                           Shape{2, 5, 7, 3, 4, true, true, true, true},
                                           Shape{3, 9, 11, 2, 8, true, false, true, false},
                                           Shape{2, 70, 33, 2, 17, true, true, false, true},
                                           Shape{2, 67, 300, 1, 33, true, true, true, true},
                                           Shape{2, 19, 45, 3, 3, false, false, true, false},
                                           Shape{4, 20, 12, 1, 8, true, true, true,
                                                 false}),  // range schedule
                         [](const auto& info) { return Name(info.param); });

// With lse: bit-identical across runs and thread counts for dq, dk, dv, dgate, and for
// d_pair_bias under the heads-as-tasks schedule (H = 4 with 1, 2, 4 threads); under the range
// schedule (7 threads > 4 heads, or H = 3 with 2 threads) d_pair_bias equals to rounding.
TEST(AttentionBackwardLseDeterminism, ThreadCountIndependent) {
  for (int64_t H : {3, 4}) {
    SCOPED_TRACE("H=" + std::to_string(H));
    const Case c(Shape{5, 70, 140, H, 16, true, true, true, true});
    std::vector<float> lse;
    Forward(c, 2, &lse);
    Grads t1(c, true), t2(c, true), t2b(c, true), t4(c, true), t7(c, true);
    Backward(c, t1, 1, lse.data());
    Backward(c, t2, 2, lse.data());
    Backward(c, t2b, 2, lse.data());
    Backward(c, t4, 4, lse.data());
    Backward(c, t7, 7, lse.data());
    EXPECT_TRUE(BitEqual(t2.All(c), t2b.All(c)));
    for (const Grads* t : {&t1, &t4, &t7}) {
      for (auto m : {&Grads::dq, &Grads::dk, &Grads::dv, &Grads::dg})
        EXPECT_TRUE(BitEqual(t->*m, t2.*m));
      if (H == 4 && t != &t7) {
        EXPECT_TRUE(BitEqual(t->dpb, t2.dpb));
      } else {
        EXPECT_TRUE(Close(t->dpb, t2.dpb, 1e-6));
      }
    }
  }
}

// Fully masked (-1e9) rows: the float lse drops log(Lk), and the backward must still see the
// uniform softmax of the forward. -inf rows (lse = -inf): P = 0, finite gradients.
TEST(AttentionBackwardLseMasked, FullyMaskedAndNegInfRows) {
  const Shape s{3, 20, 150, 2, 8, true, true, true, false};
  Case c(s);
  std::fill(c.mb.begin(), c.mb.begin() + 2 * s.Lk, -1e9f);                     // batches 0, 1
  for (int64_t j = 0; j < s.Lk; j += 2) c.mb[2 * s.Lk + j] = -kInf;            // batch 2: some
  for (int64_t j = 0; j < s.Lk; ++j) c.pb[(1 * s.Lq + 4) * s.Lk + j] = -kInf;  // head 1, query 4
  std::vector<float> lse;
  Forward(c, 2, &lse);
  EXPECT_EQ(lse[(2 * s.H + 1) * s.Lq + 4], -kInf);
  Grads r(c, true), f(c, true);
  Backward(c, r, 0, nullptr);
  Backward(c, f, 2, lse.data());
  EXPECT_TRUE(Close(f.All(c), r.All(c)));
  EXPECT_TRUE(GradsOutsideUntouched(c, f));
}

}  // namespace
}  // namespace fc
