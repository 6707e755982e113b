// Backward kernels (src/kernels/backward.h), three checks for every kernel:
//  (a) fast vs reference on odd sizes, padded/strided layouts (padding must stay untouched),
//      overwrite and accumulate modes, in place where the contract allows it; the Highway kernels
//      on every SIMD target compiled in and supported by this CPU;
//  (b) the reference against central finite differences of the forward reference, on a scalar loss
//      L = sum(y * probe) with a random probe; every check is then shown able to fail by perturbing
//      one element of the analytic gradient;
//  (c) determinism: repeated runs and different thread counts give bit-identical results (where
//      backward.h promises it), and attention's d_pair_bias sums the batch in order, exactly like
//      separate calls per batch element.
//
// Tolerances. Fast vs ref: the references work in double, the fast kernels in float (GEMM and SIMD
// sums in a different order), so errors are a few float ulps times the reduction length, measured
// against the largest reference value. Measured: <= 1e-6 (attention 2e-7); 2e-5 of max |ref| leaves
// a wide margin while a wrong tail, skipped row or missing term gives O(1e-2) or more.
// Finite differences: step h = 2^-8 on O(1) inputs; truncation error O(h^2) ~ 1e-5 and float
// rounding of the forward outputs ~ 1e-7 / h ~ 3e-5, so |analytic - numeric| <= 1e-2 |numeric| +
// 1e-3 max |numeric| holds with a wide margin and a 5% error in any one element fails.
#include "kernels/backward.h"

#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "core/rng.h"
#include "hwy/targets.h"
#include "kernels/convert.h"
#include "kernels/kernels.h"
#include "test_util.h"

namespace fc {
namespace {

constexpr float kSentinel = 777.25f;  // fills padding; no kernel may write it

// [rows, n] with leading dimension ld = n + pad; elements scale * U[-1, 1) + offset.
struct Mat {
  int64_t rows = 0, n = 0, ld = 0;
  std::vector<float> v;  // [rows, ld]
  Mat() = default;
  Mat(int64_t rows_, int64_t n_, int64_t pad, uint64_t seed, float scale = 1.f, float offset = 0.f)
      : rows(rows_), n(n_), ld(n_ + pad), v(rows_ * (n_ + pad), kSentinel) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < n; ++i) at(r, i) = scale * uniform_pm1(seed, r * n + i) + offset;
  }
  float* data() { return v.data(); }
  const float* data() const { return v.data(); }
  float& at(int64_t r, int64_t i) { return v[r * ld + i]; }
  float at(int64_t r, int64_t i) const { return v[r * ld + i]; }
};

std::vector<float> vec(int64_t n, uint64_t seed, float scale = 1.f, float offset = 0.f) {
  std::vector<float> out(n);
  for (int64_t i = 0; i < n; ++i) out[i] = scale * uniform_pm1(seed, i) + offset;
  return out;
}

// max |got - want| <= tol * max(max |want|, floor) over a strided [rows, n] (NaN anywhere fails).
::testing::AssertionResult NormClose(const float* got, int64_t ldg, const float* want, int64_t ldw,
                                     int64_t rows, int64_t n, double tol, double floor = 0) {
  double scale = floor, err = 0;
  int64_t at_r = 0, at_i = 0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < n; ++i) {
      const double g = got[r * ldg + i], w = want[r * ldw + i];
      if (!std::isfinite(g) || !std::isfinite(w))
        return ::testing::AssertionFailure() << "non-finite at (" << r << ", " << i << ")";
      scale = std::max(scale, std::abs(w));
      if (std::abs(g - w) > err) err = std::abs(g - w), at_r = r, at_i = i;
    }
  if (err <= tol * scale) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "max error " << err << " (" << err / scale << " of max |want| " << scale << ") at ("
         << at_r << ", " << at_i << "): got " << got[at_r * ldg + at_i] << " want "
         << want[at_r * ldw + at_i];
}

::testing::AssertionResult NormClose(const Mat& got, const Mat& want, double tol,
                                     double floor = 0) {
  return NormClose(got.data(), got.ld, want.data(), want.ld, got.rows, got.n, tol, floor);
}

::testing::AssertionResult NormClose(const std::vector<float>& got, const std::vector<float>& want,
                                     double tol) {
  const int64_t n = static_cast<int64_t>(want.size());
  return NormClose(got.data(), n, want.data(), n, 1, n, tol);
}

::testing::AssertionResult PadUntouched(const Mat& m) {
  for (int64_t r = 0; r < m.rows; ++r)
    for (int64_t i = m.n; i < m.ld; ++i)
      if (m.at(r, i) != kSentinel)
        return ::testing::AssertionFailure() << "padding written at (" << r << ", " << i << ")";
  return ::testing::AssertionSuccess();
}

// Same bits and no NaN (two equal NaN outputs are not a pass).
bool BitEqual(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](float x, float y) {
           return !std::isnan(x) && std::memcmp(&x, &y, sizeof(float)) == 0;
         });
}

std::string shape(int64_t rows, int64_t n, int64_t pad) {
  return "rows=" + std::to_string(rows) + " n=" + std::to_string(n) + " pad=" + std::to_string(pad);
}

// Runs body once per Highway target compiled in and supported here, forcing dispatch onto it.
template <class F>
void ForEachTarget(F body) {
  for (int64_t target : hwy::SupportedAndGeneratedTargets()) {
    hwy::SetSupportedTargetsForTest(target);
    SCOPED_TRACE(hwy::TargetName(target));
    body();
  }
  hwy::SetSupportedTargetsForTest(0);
}

// Runs f with OpenMP limited to `threads`, then restores the previous setting.
template <class F>
void WithThreads(int threads, F f) {
  const int prev = omp_get_max_threads();
  omp_set_num_threads(threads);
  f();
  omp_set_num_threads(prev);
}

// ---- finite differences ------------------------------------------------------------------------

constexpr float kStep = 1.f / 256;

// Numeric gradient of loss() with respect to every element of x (central differences, perturbing x
// in place and restoring it). The step actually taken (after float rounding) is used.
std::vector<double> NumericGrad(std::vector<float>& x, const std::function<double()>& loss) {
  std::vector<double> g(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const float x0 = x[i];
    const float xp = x0 + kStep, xm = x0 - kStep;
    x[i] = xp;
    const double lp = loss();
    x[i] = xm;
    const double lm = loss();
    x[i] = x0;
    g[i] = (lp - lm) / (static_cast<double>(xp) - xm);
  }
  return g;
}

// |analytic - numeric| <= 1e-2 |numeric| + 1e-3 max |numeric| everywhere (see the file comment).
::testing::AssertionResult GradMatches(const std::vector<float>& analytic,
                                       const std::vector<double>& numeric) {
  if (analytic.size() != numeric.size()) return ::testing::AssertionFailure() << "size mismatch";
  double scale = 1e-6;
  for (double v : numeric) scale = test::max_nan(scale, std::abs(v));
  for (size_t i = 0; i < numeric.size(); ++i)
    if (!std::isfinite(analytic[i]) || !std::isfinite(numeric[i]))
      return ::testing::AssertionFailure() << "non-finite at element " << i;
  for (size_t i = 0; i < numeric.size(); ++i) {
    const double err = std::abs(analytic[i] - numeric[i]);
    if (!(err <= 1e-2 * std::abs(numeric[i]) + 1e-3 * scale))
      return ::testing::AssertionFailure()
             << "element " << i << ": analytic " << analytic[i] << " numeric " << numeric[i]
             << " (max |numeric| " << scale << ")";
  }
  return ::testing::AssertionSuccess();
}

// The gradient check must pass as is and fail once any one element is 5% of the scale off.
void ExpectGradCheck(const std::vector<float>& analytic, const std::vector<double>& numeric,
                     const char* what) {
  SCOPED_TRACE(what);
  EXPECT_TRUE(GradMatches(analytic, numeric));
  double scale = 0;
  size_t at = 0;
  for (size_t i = 0; i < numeric.size(); ++i)
    if (std::abs(numeric[i]) > scale) scale = std::abs(numeric[i]), at = i;
  ASSERT_GT(scale, 1e-3) << "gradient is (almost) zero: the check would prove nothing";
  for (size_t i : {size_t{0}, at, numeric.size() - 1}) {
    std::vector<float> wrong = analytic;
    wrong[i] += static_cast<float>(0.05 * scale);
    EXPECT_FALSE(GradMatches(wrong, numeric)) << "perturbed element " << i << " not detected";
  }
}

// sum(y * probe) in double over a dense vector.
double Dot(const std::vector<float>& y, const std::vector<float>& probe) {
  double s = 0;
  for (size_t i = 0; i < y.size(); ++i) s += static_cast<double>(y[i]) * probe[i];
  return s;
}

// ---- linear ------------------------------------------------------------------------------------

struct LinearShape {
  int64_t rows, in, out;
};

TEST(LinearBackward, MatchesReferencePaddedAndAccumulating) {
  for (const LinearShape s : {LinearShape{1, 1, 1}, {7, 13, 5}, {37, 19, 23}, {1100, 37, 70}})
    for (bool acc : {false, true}) {
      SCOPED_TRACE(shape(s.rows, s.in, s.out) + " acc=" + std::to_string(acc));
      const Mat x(s.rows, s.in, 3, 1), dy(s.rows, s.out, 5, 2);
      const std::vector<float> W = vec(s.out * s.in, 3);
      Mat dx(s.rows, s.in, 4, 4), dx_ref = dx;
      std::vector<float> dW = vec(s.out * s.in, 5), db = vec(s.out, 6), dW_ref = dW, db_ref = db;
      kern::linear_backward(x.data(), x.ld, s.rows, s.in, W.data(), s.out, dy.data(), dy.ld,
                            dx.data(), dx.ld, dW.data(), db.data(), acc);
      kern::ref::linear_backward(x.data(), x.ld, s.rows, s.in, W.data(), s.out, dy.data(), dy.ld,
                                 dx_ref.data(), dx_ref.ld, dW_ref.data(), db_ref.data(), acc);
      EXPECT_TRUE(NormClose(dx, dx_ref, 2e-5));
      EXPECT_TRUE(NormClose(dW, dW_ref, 2e-5));
      EXPECT_TRUE(NormClose(db, db_ref, 2e-5));
      EXPECT_TRUE(PadUntouched(dx));
    }
}

// The bias gradient alone (column sums in double, rows in order, per 64-column task): the
// reference's bits, for widths around the task width, padded rows, and enough elements to split
// across threads.
TEST(LinearBackward, BiasGradientEqualsReferenceBits) {
  for (const auto& [rows, out] :
       {std::pair<int64_t, int64_t>{1, 1}, {5, 7}, {33, 64}, {70, 65}, {3000, 130}, {9, 300}}) {
    SCOPED_TRACE(shape(rows, out, 3));
    const Mat dy(rows, out, 3, 12);
    std::vector<float> db = vec(out, 13), db_ref = db;
    kern::linear_backward(nullptr, 0, rows, 0, nullptr, out, dy.data(), dy.ld, nullptr, 0, nullptr,
                          db.data());
    kern::ref::linear_backward(nullptr, 0, rows, 0, nullptr, out, dy.data(), dy.ld, nullptr, 0,
                               nullptr, db_ref.data());
    EXPECT_TRUE(BitEqual(db, db_ref));
  }
}

TEST(LinearBackward, NullOutputsAreSkipped) {
  const int64_t rows = 9, in = 6, out = 4;
  const Mat x(rows, in, 0, 7), dy(rows, out, 0, 8);
  const std::vector<float> W = vec(out * in, 9);
  Mat dx(rows, in, 2, 10), dx_ref = dx;
  std::vector<float> dW = vec(out * in, 11);
  const std::vector<float> dW_before = dW;
  kern::linear_backward(x.data(), x.ld, rows, in, W.data(), out, dy.data(), dy.ld, nullptr, 0,
                        dW.data(), nullptr);  // dW only
  EXPECT_FALSE(BitEqual(dW, dW_before));
  const std::vector<float> dW_after = dW;
  kern::linear_backward(x.data(), x.ld, rows, in, W.data(), out, dy.data(), dy.ld, dx.data(), dx.ld,
                        nullptr, nullptr);  // dx only
  kern::ref::linear_backward(x.data(), x.ld, rows, in, W.data(), out, dy.data(), dy.ld,
                             dx_ref.data(), dx_ref.ld, nullptr, nullptr);
  EXPECT_TRUE(BitEqual(dW, dW_after));
  EXPECT_TRUE(NormClose(dx, dx_ref, 2e-5));
  EXPECT_TRUE(PadUntouched(dx));
}

TEST(LinearBackward, ReferenceMatchesFiniteDifferences) {
  const int64_t rows = 4, in = 5, out = 3;
  std::vector<float> x = vec(rows * in, 12), W = vec(out * in, 13), b = vec(out, 14);
  const std::vector<float> probe = vec(rows * out, 15);
  auto loss = [&] {
    std::vector<float> y(rows * out);
    kern::ref::linear(x.data(), in, rows, in, W.data(), b.data(), out, y.data(), out);
    return Dot(y, probe);
  };
  std::vector<float> dx(rows * in), dW(out * in, 0.f), db(out, 0.f);
  kern::ref::linear_backward(x.data(), in, rows, in, W.data(), out, probe.data(), out, dx.data(),
                             in, dW.data(), db.data());
  ExpectGradCheck(dx, NumericGrad(x, loss), "dx");
  ExpectGradCheck(dW, NumericGrad(W, loss), "dW");
  ExpectGradCheck(db, NumericGrad(b, loss), "db");
}

TEST(LinearBackward, RepeatedRunsBitIdentical) {
  const int64_t rows = 3000, in = 64, out = 96;
  const Mat x(rows, in, 0, 16), dy(rows, out, 0, 17);
  const std::vector<float> W = vec(out * in, 18);
  std::vector<float> res[2];
  for (auto& r : res) {
    Mat dx(rows, in, 0, 0);
    std::vector<float> dW(out * in, 0.f), db(out, 0.f);
    kern::linear_backward(x.data(), x.ld, rows, in, W.data(), out, dy.data(), dy.ld, dx.data(),
                          dx.ld, dW.data(), db.data());
    r = dx.v;
    r.insert(r.end(), dW.begin(), dW.end());
    r.insert(r.end(), db.begin(), db.end());
  }
  EXPECT_TRUE(BitEqual(res[0], res[1]));
}

// ---- layernorm ---------------------------------------------------------------------------------

// Forward statistics from the reference, then backward (fast or ref) with accumulate flag.
struct LnCase {
  Mat x, dy, dx;
  std::vector<float> gamma, mean, rstd, dgamma, dbeta;
  LnCase(int64_t rows, int64_t n, int64_t pad, uint64_t seed)
      : x(rows, n, pad, seed, 3.f, 5.f),  // mean far from 0
        dy(rows, n, pad + 1, seed + 1),
        dx(rows, n, pad + 2, seed + 2),
        gamma(vec(n, seed + 3, 0.5f, 1.f)),
        mean(rows),
        rstd(rows),
        dgamma(vec(n, seed + 4)),
        dbeta(vec(n, seed + 5)) {
    Mat y(rows, n, 0, 0);
    const std::vector<float> beta = vec(n, seed + 6);
    kern::ref::layernorm(x.data(), x.ld, y.data(), y.ld, rows, n, gamma.data(), beta.data(), 1e-5f,
                         mean.data(), rstd.data());
  }
  template <class F>
  void run(F f, bool acc) {
    std::vector<float> scratch(kern::layernorm_backward_scratch_floats(x.rows, x.n), kSentinel);
    f(x.data(), x.ld, dy.data(), dy.ld, x.rows, x.n, gamma.data(), mean.data(), rstd.data(),
      dx.data(), dx.ld, dgamma.data(), dbeta.data(), scratch.data(), acc);
  }
};

TEST(LayerNormBackward, MatchesReference) {
  ForEachTarget([] {
    for (int64_t rows : {1, 3, 37, 600})
      for (int64_t n : {1, 7, 16, 33, 128, 257})
        for (int64_t pad : {0, 5})
          for (bool acc : {false, true}) {
            SCOPED_TRACE(shape(rows, n, pad) + " acc=" + std::to_string(acc));
            LnCase f(rows, n, pad, 20), r = f;
            f.run(kern::layernorm_backward, acc);
            r.run(kern::ref::layernorm_backward, acc);
            // Floor 1: for n = 1, dx is exactly 0 while the fast kernel leaves rstd (~316 with
            // var = 0) times a sub-ulp residual (FMA contraction of dy * gamma - mean(g)).
            EXPECT_TRUE(NormClose(f.dx, r.dx, 2e-5, 1.0));
            EXPECT_TRUE(NormClose(f.dgamma, r.dgamma, 2e-5));
            EXPECT_TRUE(NormClose(f.dbeta, r.dbeta, 2e-5));
            EXPECT_TRUE(PadUntouched(f.dx));
          }
  });
}

TEST(LayerNormBackward, InPlaceOverDyAndNullParams) {
  for (int64_t n : {7, 128}) {
    LnCase r(300, n, 3, 30);
    r.run(kern::ref::layernorm_backward, false);
    // dx written over dy, no dgamma/dbeta (then no scratch is needed).
    LnCase f(300, n, 3, 30);
    kern::layernorm_backward(f.x.data(), f.x.ld, f.dy.data(), f.dy.ld, 300, n, f.gamma.data(),
                             f.mean.data(), f.rstd.data(), f.dy.data(), f.dy.ld, nullptr, nullptr,
                             nullptr);
    EXPECT_TRUE(NormClose(f.dy.data(), f.dy.ld, r.dx.data(), r.dx.ld, 300, n, 2e-5));
    EXPECT_TRUE(PadUntouched(f.dy));
  }
}

TEST(LayerNormBackward, ReferenceMatchesFiniteDifferences) {
  const int64_t rows = 3, n = 6;
  std::vector<float> x = vec(rows * n, 40, 2.f, 1.f), gamma = vec(n, 41, 0.5f, 1.f),
                     beta = vec(n, 42);
  const std::vector<float> probe = vec(rows * n, 43);
  auto loss = [&] {
    std::vector<float> y(rows * n);
    kern::ref::layernorm(x.data(), n, y.data(), n, rows, n, gamma.data(), beta.data(), 1e-5f);
    return Dot(y, probe);
  };
  std::vector<float> mean(rows), rstd(rows), y(rows * n);
  kern::ref::layernorm(x.data(), n, y.data(), n, rows, n, gamma.data(), beta.data(), 1e-5f,
                       mean.data(), rstd.data());
  std::vector<float> dx(rows * n), dgamma(n, 0.f), dbeta(n, 0.f);
  kern::ref::layernorm_backward(x.data(), n, probe.data(), n, rows, n, gamma.data(), mean.data(),
                                rstd.data(), dx.data(), n, dgamma.data(), dbeta.data(), nullptr);
  ExpectGradCheck(dx, NumericGrad(x, loss), "dx");
  ExpectGradCheck(dgamma, NumericGrad(gamma, loss), "dgamma");
  ExpectGradCheck(dbeta, NumericGrad(beta, loss), "dbeta");
}

// Fixed row blocks summed in fixed order: bit-identical across runs and thread counts.
TEST(LayerNormBackward, DeterministicAcrossRunsAndThreadCounts) {
  std::vector<float> res[3];
  for (int t = 0; t < 3; ++t)
    WithThreads(t == 0 ? 1 : 2, [&] {
      LnCase c(2050, 128, 0, 50);
      c.run(kern::layernorm_backward, false);
      res[t] = c.dx.v;
      res[t].insert(res[t].end(), c.dgamma.begin(), c.dgamma.end());
      res[t].insert(res[t].end(), c.dbeta.begin(), c.dbeta.end());
    });
  EXPECT_TRUE(BitEqual(res[1], res[2]));
  EXPECT_TRUE(BitEqual(res[0], res[1]));
}

// ---- softmax -----------------------------------------------------------------------------------

// p = softmax of random rows; row 0 fully masked with -inf (p = 0), row 1 with -1e9 (uniform).
Mat SoftmaxProbs(int64_t rows, int64_t n, int64_t pad, uint64_t seed) {
  Mat p(rows, n, pad, seed, 4.f);
  for (int64_t i = 0; i < n; ++i) {
    if (rows > 0) p.at(0, i) = -std::numeric_limits<float>::infinity();
    if (rows > 1) p.at(1, i) = -1e9f;
    if (rows > 2 && i % 3 == 1) p.at(2, i) = -1e9f;
  }
  kern::ref::softmax_rows(p.data(), p.ld, rows, n);
  return p;
}

TEST(SoftmaxBackward, MatchesReference) {
  ForEachTarget([] {
    for (int64_t rows : {1, 3, 37, 300})
      for (int64_t n : {1, 3, 7, 16, 17, 33, 257})
        for (int64_t pad : {0, 5})
          for (bool acc : {false, true}) {
            SCOPED_TRACE(shape(rows, n, pad) + " acc=" + std::to_string(acc));
            const Mat p = SoftmaxProbs(rows, n, pad, 60), dp(rows, n, pad + 1, 61, 3.f);
            Mat dx(rows, n, pad + 2, 62), dx_ref = dx;
            kern::softmax_backward(p.data(), p.ld, dp.data(), dp.ld, dx.data(), dx.ld, rows, n,
                                   acc);
            kern::ref::softmax_backward(p.data(), p.ld, dp.data(), dp.ld, dx_ref.data(), dx_ref.ld,
                                        rows, n, acc);
            EXPECT_TRUE(NormClose(dx, dx_ref, 2e-5));
            EXPECT_TRUE(PadUntouched(dx));
            if (!acc) {
              for (int64_t i = 0; i < n; ++i) ASSERT_EQ(dx.at(0, i), 0.f);  // -inf row
            }
          }
  });
}

TEST(SoftmaxBackward, InPlaceOverPAndDp) {
  const int64_t rows = 37, n = 33;
  const Mat p = SoftmaxProbs(rows, n, 2, 63), dp(rows, n, 2, 64, 3.f);
  Mat want(rows, n, 0, 0);
  kern::ref::softmax_backward(p.data(), p.ld, dp.data(), dp.ld, want.data(), want.ld, rows, n);
  Mat over_p = p, over_dp = dp;
  kern::softmax_backward(over_p.data(), p.ld, dp.data(), dp.ld, over_p.data(), p.ld, rows, n);
  kern::softmax_backward(p.data(), p.ld, over_dp.data(), dp.ld, over_dp.data(), dp.ld, rows, n);
  EXPECT_TRUE(NormClose(over_p, want, 2e-5));
  EXPECT_TRUE(NormClose(over_dp, want, 2e-5));
}

TEST(SoftmaxBackward, ReferenceMatchesFiniteDifferences) {
  const int64_t rows = 3, n = 7;
  std::vector<float> x = vec(rows * n, 65, 2.f);
  const std::vector<float> probe = vec(rows * n, 66);
  auto loss = [&] {
    std::vector<float> y = x;
    kern::ref::softmax_rows(y.data(), n, rows, n);
    return Dot(y, probe);
  };
  std::vector<float> p = x, dx(rows * n);
  kern::ref::softmax_rows(p.data(), n, rows, n);
  kern::ref::softmax_backward(p.data(), n, probe.data(), n, dx.data(), n, rows, n);
  ExpectGradCheck(dx, NumericGrad(x, loss), "dx");
}

// ---- sigmoid gating ----------------------------------------------------------------------------

TEST(SigmoidMulBackward, MatchesReference) {
  ForEachTarget([] {
    for (int64_t rows : {1, 5, 260})
      for (int64_t n : {1, 7, 16, 33, 257})
        // Input and output pads: (0, 0) takes the contiguous path, the others the strided one.
        for (auto [pad, pad_out] : {std::pair<int64_t, int64_t>{0, 0}, {0, 3}, {3, 0}, {2, 5}})
          for (bool acc : {false, true}) {
            SCOPED_TRACE(shape(rows, n, pad) + " pad_out=" + std::to_string(pad_out) +
                         " acc=" + std::to_string(acc));
            const Mat a(rows, n, pad, 70, 2.f), g(rows, n, pad, 71, 12.f), dy(rows, n, pad, 72);
            Mat da(rows, n, pad_out, 73), dg(rows, n, pad_out, 74), da_ref = da, dg_ref = dg;
            kern::sigmoid_mul_backward(a.data(), a.ld, g.data(), g.ld, dy.data(), dy.ld, da.data(),
                                       da.ld, dg.data(), dg.ld, rows, n, acc);
            kern::ref::sigmoid_mul_backward(a.data(), a.ld, g.data(), g.ld, dy.data(), dy.ld,
                                            da_ref.data(), da_ref.ld, dg_ref.data(), dg_ref.ld,
                                            rows, n, acc);
            EXPECT_TRUE(NormClose(da, da_ref, 2e-5));
            EXPECT_TRUE(NormClose(dg, dg_ref, 2e-5));
            EXPECT_TRUE(PadUntouched(da));
            EXPECT_TRUE(PadUntouched(dg));
          }
  });
}

// Extreme gates keep full relative accuracy (s * (1 - s) never cancels); NaN propagates; null
// outputs are skipped; da may be written over dy.
TEST(SigmoidMulBackward, ExtremeGatesNullOutputsInPlace) {
  const float kInf = std::numeric_limits<float>::infinity();
  const std::vector<float> g = {-kInf, -1e9f, -100.f, -87.f, -30.f, -1e-30f, 0.f,  1e-30f,
                                20.f,  30.f,  87.f,   100.f, 1e9f,  kInf,    -3.f, 5.f};
  const int64_t n = static_cast<int64_t>(g.size());
  const std::vector<float> a = vec(n, 75, 1.f, 2.f), dy = vec(n, 76, 1.f, 2.f);
  ForEachTarget([&] {
    std::vector<float> da(n), dg(n), da_ref(n), dg_ref(n);
    kern::sigmoid_mul_backward(a.data(), n, g.data(), n, dy.data(), n, da.data(), n, dg.data(), n,
                               1, n);
    kern::ref::sigmoid_mul_backward(a.data(), n, g.data(), n, dy.data(), n, da_ref.data(), n,
                                    dg_ref.data(), n, 1, n);
    for (int64_t i = 0; i < n; ++i) {
      // 1e-44 absolute: results below ~1e-38 are subnormal and carry fewer significant bits.
      EXPECT_NEAR(da[i], da_ref[i], 1e-5 * std::abs(da_ref[i]) + 1e-44) << "g=" << g[i];
      EXPECT_NEAR(dg[i], dg_ref[i], 1e-5 * std::abs(dg_ref[i]) + 1e-44) << "g=" << g[i];
    }
    EXPECT_GT(dg[11], 0.f);  // g = 100: s * (1 - s) = 3.7e-44, not 0
    std::vector<float> nan_g = g;
    nan_g[3] = std::numeric_limits<float>::quiet_NaN();
    std::vector<float> dy_over = dy, dg_only(n, kSentinel);
    kern::sigmoid_mul_backward(a.data(), n, nan_g.data(), n, dy_over.data(), n, dy_over.data(), n,
                               nullptr, 0, 1, n);
    kern::sigmoid_mul_backward(a.data(), n, nan_g.data(), n, dy.data(), n, nullptr, 0,
                               dg_only.data(), n, 1, n);
    for (int64_t i = 0; i < n; ++i) {
      if (i == 3) {
        EXPECT_TRUE(std::isnan(dy_over[i]) && std::isnan(dg_only[i]));
        continue;
      }
      EXPECT_EQ(dy_over[i], da[i]) << i;
      EXPECT_EQ(dg_only[i], dg[i]) << i;
    }
  });
}

TEST(SigmoidMulBackward, ReferenceMatchesFiniteDifferences) {
  const int64_t rows = 3, n = 5;
  std::vector<float> a = vec(rows * n, 77, 2.f), g = vec(rows * n, 78, 3.f);
  const std::vector<float> probe = vec(rows * n, 79);
  auto loss = [&] {
    std::vector<float> y = a;
    kern::ref::sigmoid_mul(y.data(), n, g.data(), n, rows, n);
    return Dot(y, probe);
  };
  std::vector<float> da(rows * n), dg(rows * n);
  kern::ref::sigmoid_mul_backward(a.data(), n, g.data(), n, probe.data(), n, da.data(), n,
                                  dg.data(), n, rows, n);
  ExpectGradCheck(da, NumericGrad(a, loss), "da");
  ExpectGradCheck(dg, NumericGrad(g, loss), "dg");
}

// ---- relu --------------------------------------------------------------------------------------

TEST(ReluBackward, MatchesReferenceExactly) {
  ForEachTarget([] {
    for (int64_t rows : {1, 3, 37, 300})
      for (int64_t n : {1, 7, 16, 33, 257})
        for (int64_t pad : {0, 3})
          for (bool acc : {false, true}) {
            SCOPED_TRACE(shape(rows, n, pad) + " acc=" + std::to_string(acc));
            Mat x(rows, n, pad, 80);
            x.at(0, 0) = 0.f;  // the kink: gradient 0
            if (n > 1) x.at(0, 1) = -0.f;
            if (n > 2) x.at(0, 2) = std::numeric_limits<float>::quiet_NaN();
            const Mat dy(rows, n, pad, 81);
            Mat dx(rows, n, acc ? pad : pad + 2, 82), dx_ref = dx;  // contiguous and strided
            kern::relu_backward(x.data(), x.ld, dy.data(), dy.ld, dx.data(), dx.ld, rows, n, acc);
            kern::ref::relu_backward(x.data(), x.ld, dy.data(), dy.ld, dx_ref.data(), dx_ref.ld,
                                     rows, n, acc);
            EXPECT_TRUE(BitEqual(dx.v, dx_ref.v));
            EXPECT_TRUE(PadUntouched(dx));
          }
  });
}

// The bf16-x form (the bf16 training's kept ReLU output) equals the f32 form on the widened x,
// and its reference, bit for bit.
TEST(ReluBackward, Bf16InputMatchesF32AndReference) {
  ForEachTarget([] {
    for (int64_t rows : {1, 3, 37, 300})
      for (int64_t n : {1, 7, 16, 33, 257})
        for (bool acc : {false, true}) {
          SCOPED_TRACE(shape(rows, n, 0) + " acc=" + std::to_string(acc));
          Mat x(rows, n, 0, 83);
          x.at(0, 0) = 0.f;
          if (n > 1) x.at(0, 1) = -0.f;
          if (n > 2) x.at(0, 2) = std::numeric_limits<float>::quiet_NaN();
          if (n > 3) x.at(0, 3) = 1e-40f;  // rounds to a bf16 subnormal, still > 0
          std::vector<uint16_t> xb(rows * n);
          kern::f32_to_bf16(x.data(), xb.data(), rows * n);
          Mat xw(rows, n, 0, 0);
          kern::bf16_to_f32(xb.data(), xw.data(), rows * n);
          const Mat dy(rows, n, 0, 84);
          Mat dx(rows, n, 0, 85), dx_f32 = dx, dx_ref = dx;
          kern::relu_backward(xb.data(), n, dy.data(), n, dx.data(), n, rows, n, acc);
          kern::relu_backward(xw.data(), n, dy.data(), n, dx_f32.data(), n, rows, n, acc);
          kern::ref::relu_backward(xb.data(), n, dy.data(), n, dx_ref.data(), n, rows, n, acc);
          EXPECT_TRUE(BitEqual(dx.v, dx_f32.v));
          EXPECT_TRUE(BitEqual(dx.v, dx_ref.v));
        }
  });
}

TEST(ReluBackward, ReferenceMatchesFiniteDifferences) {
  const int64_t rows = 3, n = 6;
  std::vector<float> x = vec(rows * n, 83, 2.f);
  for (float& v : x)
    if (std::abs(v) < 0.05f) v = 0.5f;  // stay off the kink by more than the step
  const std::vector<float> probe = vec(rows * n, 84);
  auto loss = [&] {
    std::vector<float> y = x;
    kern::ref::relu_inplace(y.data(), n, rows, n);
    return Dot(y, probe);
  };
  std::vector<float> dx(rows * n);
  kern::ref::relu_backward(x.data(), n, probe.data(), n, dx.data(), n, rows, n);
  ExpectGradCheck(dx, NumericGrad(x, loss), "dx");
}

// Row-independent kernels: thread count and repetition never change a bit.
TEST(ElementwiseBackward, DeterministicAcrossThreadCounts) {
  const int64_t rows = 600, n = 130;
  const Mat p = SoftmaxProbs(rows, n, 1, 85), a(rows, n, 1, 86), g(rows, n, 1, 87, 4.f),
            dy(rows, n, 1, 88);
  std::vector<float> res[3];
  for (int t = 0; t < 3; ++t)
    WithThreads(t == 0 ? 1 : 2, [&] {
      Mat s(rows, n, 1, 0), da(rows, n, 1, 0), dg(rows, n, 1, 0), r(rows, n, 1, 0);
      kern::softmax_backward(p.data(), p.ld, dy.data(), dy.ld, s.data(), s.ld, rows, n);
      kern::sigmoid_mul_backward(a.data(), a.ld, g.data(), g.ld, dy.data(), dy.ld, da.data(), da.ld,
                                 dg.data(), dg.ld, rows, n);
      kern::relu_backward(a.data(), a.ld, dy.data(), dy.ld, r.data(), r.ld, rows, n);
      for (const Mat* m : {&s, &da, &dg, &r}) res[t].insert(res[t].end(), m->v.begin(), m->v.end());
    });
  EXPECT_TRUE(BitEqual(res[0], res[1]));
  EXPECT_TRUE(BitEqual(res[1], res[2]));
}

// ---- attention ---------------------------------------------------------------------------------

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

// Inputs q | k | v | g interleaved in one [B*L, 4*H*C + 5] buffer (strided, as the model lays them
// out) or each dense; gradients in buffers of the same layout, padding columns set to kSentinel.
// Batch 0 has every key masked (-1e9), other batches ~20% masked keys.
struct AttnCase {
  AttnShape p;
  int64_t hc, ld;
  std::vector<float> q, k, v, g, mb, pb, dout;
  kern::AttentionArgs a;

  explicit AttnCase(const AttnShape& s, uint64_t seed = 100, bool full_mask = true)
      : p(s), hc(s.H * s.C), ld(s.strided ? 4 * s.H * s.C + 5 : s.H * s.C) {
    const int64_t L = std::max(s.Lq, s.Lk);
    q = vec(s.B * L * ld, seed), k = vec(s.B * L * ld, seed + 1), v = vec(s.B * L * ld, seed + 2);
    g = vec(s.B * L * ld, seed + 3, 2.f), pb = vec(s.H * s.Lq * s.Lk, seed + 4);
    dout = vec(s.B * L * ld, seed + 5);
    mb.assign(s.B * s.Lk, 0.f);
    for (int64_t i = 0; i < s.B * s.Lk; ++i)
      if (uniform_pm1(seed + 6, i) < -0.6f) mb[i] = -1e9f;
    for (int64_t j = 0; j < s.Lk; ++j) mb[j] = full_mask ? -1e9f : 0.f;
    a.B = s.B, a.Lq = s.Lq, a.Lk = s.Lk, a.H = s.H, a.C = s.C;
    a.scale = 1.f / std::sqrt(static_cast<float>(s.C));
    bind();
  }
  AttnCase(const AttnCase& o)
      : p(o.p),
        hc(o.hc),
        ld(o.ld),
        q(o.q),
        k(o.k),
        v(o.v),
        g(o.g),
        mb(o.mb),
        pb(o.pb),
        dout(o.dout),
        a(o.a) {
    bind();
  }
  // (Re)points the args at this object's buffers; batch stride covers max(Lq, Lk) rows.
  void bind() {
    const int64_t bs = std::max(p.Lq, p.Lk) * ld;
    a.q = q.data(), a.q_bs = bs, a.q_rs = ld;
    a.k = k.data(), a.k_bs = bs, a.k_rs = ld;
    a.v = v.data(), a.v_bs = bs, a.v_rs = ld;
    a.gate = p.gate ? g.data() : nullptr, a.g_bs = bs, a.g_rs = ld;
    a.o_bs = bs, a.o_rs = ld;
    a.mask_bias = p.mask ? mb.data() : nullptr;
    a.pair_bias = p.pair ? pb.data() : nullptr;
  }
  int64_t bsize() const { return p.B * std::max(p.Lq, p.Lk) * ld; }
};

// Gradients: dq | dk | dv | dgate in one buffer when strided (disjoint columns), else separate;
// d_pair_bias starts from random values (it accumulates).
struct AttnGrads {
  std::vector<float> dq, dk, dv, dg, dpb;
  kern::AttentionGrads gr;
  AttnGrads(const AttnCase& c, bool with_pair_grad = true) {
    const int64_t n = c.bsize();
    dq.assign(n, kSentinel), dk = dq, dv = dq, dg = dq;
    dpb = vec(c.p.H * c.p.Lq * c.p.Lk, 7);
    gr.d_out = c.dout.data();
    if (c.p.strided) {  // one interleaved buffer: dq at column 0, dk at hc, dv at 2hc, dg at 3hc
      gr.dq = dq.data(), gr.dk = dq.data() + c.hc, gr.dv = dq.data() + 2 * c.hc;
      gr.dgate = dq.data() + 3 * c.hc;
    } else {
      gr.dq = dq.data(), gr.dk = dk.data(), gr.dv = dv.data(), gr.dgate = dg.data();
    }
    gr.d_pair_bias = with_pair_grad ? dpb.data() : nullptr;
  }
  std::vector<float> all() const {
    std::vector<float> r = dq;
    for (const auto* x : {&dk, &dv, &dg, &dpb}) r.insert(r.end(), x->begin(), x->end());
    return r;
  }
};

void RunFast(const AttnCase& c, AttnGrads& g, int threads) {
  std::vector<float> scratch(
      kern::attention_backward_scratch_floats(c.a, threads, g.gr.d_pair_bias != nullptr));
  kern::attention_backward(c.a, g.gr, scratch.data(), threads);
}

void RunRef(const AttnCase& c, AttnGrads& g) {
  std::vector<float> scratch(kern::ref::attention_backward_scratch_floats(c.a));
  kern::ref::attention_backward(c.a, g.gr, scratch.data());
}

class AttentionBackwardTest : public ::testing::TestWithParam<AttnShape> {};

TEST_P(AttentionBackwardTest, MatchesReference) {
  const AttnCase c(GetParam());
  AttnGrads f(c), r(c);
  RunFast(c, f, 2);
  RunRef(c, r);
  // Compare each gradient on its [B * rows, H*C] block; every other column must be untouched.
  const int64_t L = std::max(c.p.Lq, c.p.Lk);
  const std::vector<float>* bufs[4] = {&f.dq, &f.dk, &f.dv, &f.dg};
  const float* fp[4] = {f.gr.dq, f.gr.dk, f.gr.dv, f.gr.dgate};
  const float* rp[4] = {r.gr.dq, r.gr.dk, r.gr.dv, r.gr.dgate};
  const int64_t used_rows[4] = {c.p.Lq, c.p.Lk, c.p.Lk, c.p.Lq};
  for (int t = 0; t < 4; ++t) {
    if (t == 3 && !c.p.gate) continue;
    SCOPED_TRACE("gradient " + std::to_string(t));
    for (int64_t b = 0; b < c.p.B; ++b)
      EXPECT_TRUE(NormClose(fp[t] + b * L * c.ld, c.ld, rp[t] + b * L * c.ld, c.ld, used_rows[t],
                            c.hc, 2e-5))
          << "batch " << b;
  }
  EXPECT_TRUE(NormClose(f.dpb, r.dpb, 2e-5));
  // Untouched: padding columns, rows past Lq / Lk, and dgate without a gate.
  std::vector<float> touched(c.bsize(), 0.f);
  const int64_t ntouch = c.p.strided ? (c.p.gate ? 4 : 3) : 1;
  for (int64_t b = 0; b < c.p.B; ++b)
    for (int64_t i = 0; i < L; ++i)
      for (int64_t t = 0; t < ntouch; ++t) {
        const int64_t lim = t == 0 || t == 3 ? c.p.Lq : c.p.Lk;
        if (i < lim)
          for (int64_t col = 0; col < c.hc; ++col) touched[(b * L + i) * c.ld + t * c.hc + col] = 1;
      }
  for (int64_t i = 0; i < c.bsize(); ++i) {
    if (touched[i] == 0.f) {
      ASSERT_EQ(f.dq[i], kSentinel) << "dq buffer element " << i << " written";
    }
    ASSERT_FALSE(std::isnan(f.dq[i]));
  }
  for (const auto* buf : bufs)
    for (float x : *buf) ASSERT_FALSE(std::isnan(x));
  if (!c.p.strided && !c.p.gate) {
    for (float x : f.dg) ASSERT_EQ(x, kSentinel);
  }
}

// AttentionArgs::dtype BF16 (the bf16 training step): every product takes bf16-rounded inputs with
// f32 accumulation. Against the f32 reference normwise within a few bf16 roundings (2^-8 each),
// and the per-item gradients identical for 1 and 2 threads.
TEST_P(AttentionBackwardTest, Bf16NearReferenceAndThreadIndependent) {
  AttnCase c(GetParam());
  AttnGrads r(c);
  RunRef(c, r);
  c.a.dtype = DType::BF16;
  AttnGrads f1(c), f2(c);
  RunFast(c, f1, 1);
  RunFast(c, f2, 2);
  const int64_t L = std::max(c.p.Lq, c.p.Lk);
  const float* fp[4] = {f2.gr.dq, f2.gr.dk, f2.gr.dv, f2.gr.dgate};
  const float* rp[4] = {r.gr.dq, r.gr.dk, r.gr.dv, r.gr.dgate};
  const int64_t used_rows[4] = {c.p.Lq, c.p.Lk, c.p.Lk, c.p.Lq};
  for (int t = 0; t < 4; ++t) {
    if (t == 3 && !c.p.gate) continue;
    SCOPED_TRACE("gradient " + std::to_string(t));
    for (int64_t b = 1; b < c.p.B; ++b)  // batch 0 is fully masked: uniform P, tiny gradients
      EXPECT_TRUE(NormClose(fp[t] + b * L * c.ld, c.ld, rp[t] + b * L * c.ld, c.ld, used_rows[t],
                            c.hc, 3e-2))
          << "batch " << b;
  }
  EXPECT_TRUE(NormClose(f2.dpb, r.dpb, 3e-2));
  for (const auto* x : {&f1.dq, &f1.dk, &f1.dv, &f1.dg}) {
    const std::vector<float>& y = x == &f1.dq   ? f2.dq
                                  : x == &f1.dk ? f2.dk
                                  : x == &f1.dv ? f2.dv
                                                : f2.dg;
    EXPECT_EQ(std::memcmp(x->data(), y.data(), x->size() * sizeof(float)), 0);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, AttentionBackwardTest,
    ::testing::Values(AttnShape{1, 1, 1, 1, 1, false, false, false, false},
                      AttnShape{2, 5, 5, 3, 4, true, true, true, true},
                      AttnShape{3, 7, 11, 2, 8, true, false, true, false},
                      AttnShape{2, 70, 33, 2, 8, true, true, true, true},  // two query tiles
                      AttnShape{4, 17, 17, 4, 32, true, true, false, true},
                      AttnShape{3, 33, 33, 8, 8, false, true, true, false},
                      AttnShape{1, 130, 9, 1, 5, true, true, true, true},    // one item, 3 tiles
                      AttnShape{4, 20, 12, 1, 8, true, true, true, false}),  // range schedule
    [](const auto& info) { return AttnName(info.param); });

// Skipped outputs stay untouched; the others match a full run bit for bit.
TEST(AttentionBackward, NullOutputsAreSkipped) {
  const AttnCase c(AttnShape{2, 9, 7, 2, 4, true, true, true, false});
  AttnGrads full(c), part(c);
  RunFast(c, full, 2);
  part.gr.dk = nullptr, part.gr.dgate = nullptr, part.gr.d_pair_bias = nullptr;
  RunFast(c, part, 2);
  EXPECT_TRUE(BitEqual(part.dq, full.dq));
  EXPECT_TRUE(BitEqual(part.dv, full.dv));
  for (float x : part.dk) ASSERT_EQ(x, kSentinel);
  for (float x : part.dg) ASSERT_EQ(x, kSentinel);
  EXPECT_TRUE(BitEqual(part.dpb, AttnGrads(c).dpb));
}

TEST(AttentionBackward, ReferenceMatchesFiniteDifferences) {
  // No fully masked batch here: its float logits are all exactly -1e9, so the float forward is
  // flat in q, k and pair_bias while the analytic (PyTorch-style) gradient is not.
  const AttnShape s{2, 3, 4, 2, 3, true, true, true, false};
  AttnCase c(s, 200, /*full_mask=*/false);
  c.mb[1] = -1e9f;  // one masked key
  const int64_t L = std::max(s.Lq, s.Lk);
  auto loss = [&] {
    std::vector<float> o(c.bsize(), 0.f), scratch(s.Lk);
    kern::AttentionArgs a = c.a;
    a.o = o.data();
    kern::ref::attention(a, scratch.data());
    double l = 0;  // only rows < Lq hold outputs
    for (int64_t b = 0; b < s.B; ++b)
      for (int64_t i = 0; i < s.Lq * c.ld; ++i)
        l += static_cast<double>(o[b * L * c.ld + i]) * c.dout[b * L * c.ld + i];
    return l;
  };
  AttnGrads r(c);
  std::fill(r.dpb.begin(), r.dpb.end(), 0.f);
  RunRef(c, r);
  // Inputs rows beyond Lq (q, g) or Lk (k, v) are unused: their gradient is zero on both sides,
  // and the unwritten analytic entries (kSentinel) are zeroed before comparing.
  auto used = [&](std::vector<float> grad, int64_t rows) {
    for (int64_t b = 0; b < s.B; ++b)
      for (int64_t i = rows; i < L; ++i)
        for (int64_t col = 0; col < c.ld; ++col) grad[(b * L + i) * c.ld + col] = 0.f;
    return grad;
  };
  ExpectGradCheck(used(r.dq, s.Lq), NumericGrad(c.q, loss), "dq");
  ExpectGradCheck(used(r.dk, s.Lk), NumericGrad(c.k, loss), "dk");
  ExpectGradCheck(used(r.dv, s.Lk), NumericGrad(c.v, loss), "dv");
  ExpectGradCheck(used(r.dg, s.Lq), NumericGrad(c.g, loss), "dgate");
  ExpectGradCheck(r.dpb, NumericGrad(c.pb, loss), "d_pair_bias");
}

// Repeated runs are bit-identical. Across thread counts dq, dk, dv, dgate are too (one item each)
// and so is d_pair_bias under the heads-as-tasks schedule (H = 4 here with 1, 2, 4 threads), which
// also equals, bit for bit, one call per batch element accumulating d_pair_bias across the calls.
// The range schedule (H = 3 with 2, 4, 7 threads, H = 4 with 7; ranges starting inside a head sum
// into slots) gives a d_pair_bias equal to the reference and to the other thread counts to
// rounding.
TEST(AttentionBackward, DeterministicAndAccumulatesOverBatch) {
  for (int64_t H : {3, 4}) {
    SCOPED_TRACE("H=" + std::to_string(H));
    const AttnShape s{5, 40, 40, H, 16, true, true, true, true};
    const AttnCase c(s);
    AttnGrads t1(c), t2(c), t2b(c), t4(c), t7(c), r(c);
    const int max_threads = omp_get_max_threads();
    RunFast(c, t1, 1);  // inactive parallel region: nested kernels must still stay serial
    EXPECT_EQ(omp_get_max_threads(), max_threads);  // and the caller's setting is left alone
    RunFast(c, t2, 2);
    RunFast(c, t2b, 2);
    RunFast(c, t4, 4);  // more threads than cores
    RunFast(c, t7, 7);
    RunRef(c, r);
    EXPECT_TRUE(BitEqual(t2.all(), t2b.all()));
    for (const AttnGrads* t : {&t1, &t4, &t7}) {
      EXPECT_TRUE(BitEqual(t->dq, t2.dq));  // dq | dk | dv | dgate interleaved
      if (H == 4 && t != &t7) {             // 7 threads > 4 heads: range schedule
        EXPECT_TRUE(BitEqual(t->dpb, t2.dpb));
      } else {
        EXPECT_TRUE(NormClose(t->dpb, t2.dpb, 1e-6));
      }
      EXPECT_TRUE(NormClose(t->dpb, r.dpb, 2e-5));
    }
    // One call per batch element, d_pair_bias accumulating across calls in b order.
    AttnGrads per(c);
    for (int64_t b = 0; b < s.B; ++b) {
      AttnCase cb = c;
      kern::AttentionArgs& a = cb.a;
      const int64_t off = b * a.q_bs;  // all batch strides are equal here
      a.B = 1;
      a.q += off, a.k += off, a.v += off, a.gate += off;
      a.mask_bias += b * s.Lk;
      kern::AttentionGrads gb;  // interleaved like t2's: dq | dk | dv | dgate
      gb.d_out = c.dout.data() + off;
      gb.dq = per.dq.data() + off, gb.dk = gb.dq + c.hc, gb.dv = gb.dq + 2 * c.hc;
      gb.dgate = gb.dq + 3 * c.hc;
      gb.d_pair_bias = per.dpb.data();
      std::vector<float> scratch(kern::attention_backward_scratch_floats(a, 2));
      kern::attention_backward(a, gb, scratch.data(), 2);
    }
    EXPECT_TRUE(BitEqual(per.dq, t2.dq));
    if (H == 4) {
      EXPECT_TRUE(BitEqual(per.dpb, t2.dpb));
    } else {
      EXPECT_TRUE(NormClose(per.dpb, t2.dpb, 1e-6));
    }
  }
}

// Every key of every batch masked: uniform probabilities as in the forward, finite gradients.
TEST(AttentionBackward, FullyMaskedIsFinite) {
  AttnCase c(AttnShape{2, 6, 6, 2, 4, true, true, true, false});
  std::fill(c.mb.begin(), c.mb.end(), -1e9f);
  AttnGrads f(c), r(c);
  RunFast(c, f, 2);
  RunRef(c, r);
  for (float x : f.all()) ASSERT_TRUE(std::isfinite(x) || x == kSentinel);
  EXPECT_TRUE(NormClose(f.dpb, r.dpb, 2e-5));
  EXPECT_TRUE(NormClose(f.dq, r.dq, 2e-5));
}

}  // namespace
}  // namespace fc
