// Row-wise and elementwise kernels: the Highway versions against the naive references, on every
// SIMD target compiled in and supported by this CPU, on odd sizes (tails), strided rows whose
// padding must stay untouched, in place, with masked softmax rows, and on shapes large enough to
// split rows over OpenMP threads.
//
// Tolerances: the references work in double, the fast kernels in float with a different summation
// order and Highway's Exp (max error 1 ULP). For n <= 1024 and inputs of O(1)-O(10), float
// accumulation and the rounding of x - max before exp give relative errors of a few 1e-7 up to
// ~1e-6, so 1e-5 relative (plus 1e-5 absolute on layernorm outputs, which are O(1) by construction)
// leaves a margin without hiding real bugs such as a wrong tail or a skipped row, which give O(1)
// errors. relu, add and add_bias do the same float operation as the reference and must be exact.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "core/rng.h"
#include "hwy/targets.h"
#include "kernels/convert.h"
#include "kernels/kernels.h"

namespace fc {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kSentinel = 777.25f;  // fills the padding between rows; no kernel may write it

const int64_t kRows[] = {1, 2, 3, 8, 37};
const int64_t kCols[] = {1, 3, 7, 16, 17, 33, 128, 257, 1024};

// [rows, n] with leading dimension ld = n + pad; elements scale * U[-1, 1) + offset.
struct Mat {
  int64_t rows, n, ld;
  std::vector<float> v;  // [rows, ld]
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

// |got - want| <= atol + rtol * |want| everywhere (NaN only where want is NaN); reports the first
// mismatch and the count.
::testing::AssertionResult Close(const float* got, int64_t ldg, const float* want, int64_t ldw,
                                 int64_t rows, int64_t n, double rtol, double atol) {
  int64_t bad = 0, bad_r = 0, bad_i = 0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < n; ++i) {
      const double g = got[r * ldg + i], w = want[r * ldw + i];
      const bool ok = std::isnan(w) ? std::isnan(g) : std::abs(g - w) <= atol + rtol * std::abs(w);
      if (!ok && bad++ == 0) bad_r = r, bad_i = i;
    }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << bad << " mismatches, first at (" << bad_r << ", " << bad_i << "): got "
         << got[bad_r * ldg + bad_i] << " want " << want[bad_r * ldw + bad_i];
}

::testing::AssertionResult Close(const Mat& got, const Mat& want, double rtol, double atol) {
  return Close(got.data(), got.ld, want.data(), want.ld, got.rows, got.n, rtol, atol);
}

::testing::AssertionResult PadUntouched(const Mat& m) {
  for (int64_t r = 0; r < m.rows; ++r)
    for (int64_t i = m.n; i < m.ld; ++i)
      if (m.at(r, i) != kSentinel)
        return ::testing::AssertionFailure() << "padding written at (" << r << ", " << i << ")";
  return ::testing::AssertionSuccess();
}

std::string shape(int64_t rows, int64_t n, int64_t pad) {
  return "rows=" + std::to_string(rows) + " n=" + std::to_string(n) + " pad=" + std::to_string(pad);
}

// Runs body once per Highway target that the kernels were compiled for and this CPU supports,
// forcing the dynamic dispatch onto that target.
template <class F>
void ForEachTarget(F body) {
  for (int64_t target : hwy::SupportedAndGeneratedTargets()) {
    hwy::SetSupportedTargetsForTest(target);
    SCOPED_TRACE(hwy::TargetName(target));
    body();
  }
  hwy::SetSupportedTargetsForTest(0);
}

// ---- layernorm -------------------------------------------------------------------------------

TEST(ElementwiseLayerNorm, MatchesReferenceWithStats) {
  ForEachTarget([] {
    for (int64_t rows : kRows)
      for (int64_t n : kCols)
        for (int64_t pad : {0, 5}) {
          SCOPED_TRACE(shape(rows, n, pad));
          const Mat x(rows, n, pad, 1, 3.f, 5.f);  // values in [2, 8): mean far from 0
          const std::vector<float> gamma = vec(n, 2, 0.5f, 1.f), beta = vec(n, 3);
          Mat y(rows, n, pad + 2, 0), y_ref(rows, n, 0, 0);
          std::vector<float> mean(rows), rstd(rows), mean_ref(rows), rstd_ref(rows);
          kern::layernorm(x.data(), x.ld, y.data(), y.ld, rows, n, gamma.data(), beta.data(), 1e-5f,
                          mean.data(), rstd.data());
          kern::ref::layernorm(x.data(), x.ld, y_ref.data(), y_ref.ld, rows, n, gamma.data(),
                               beta.data(), 1e-5f, mean_ref.data(), rstd_ref.data());
          EXPECT_TRUE(Close(y, y_ref, 1e-5, 1e-5));
          EXPECT_TRUE(Close(mean.data(), 1, mean_ref.data(), 1, 1, rows, 1e-5, 1e-6));
          EXPECT_TRUE(Close(rstd.data(), 1, rstd_ref.data(), 1, 1, rows, 1e-5, 0));
          EXPECT_TRUE(PadUntouched(y));
        }
  });
}

// layernorm_bf16 (the bf16 training's GEMM input): the bits of f32_to_bf16 applied to layernorm's
// output, the same statistics, rows with padding left untouched; and the reference within one
// bf16 rounding of the f32 reference (2^-8 relative, plus the f32 tolerance above).
TEST(ElementwiseLayerNorm, Bf16IsTheRoundingOfF32) {
  ForEachTarget([] {
    for (int64_t rows : kRows)
      for (int64_t n : kCols)
        for (int64_t pad : {0, 5}) {
          SCOPED_TRACE(shape(rows, n, pad));
          const Mat x(rows, n, pad, 7, 3.f, 5.f);
          const std::vector<float> gamma = vec(n, 8, 0.5f, 1.f), beta = vec(n, 9);
          Mat y(rows, n, 0, 0);
          std::vector<float> mean(rows), rstd(rows), mean16(rows), rstd16(rows);
          kern::layernorm(x.data(), x.ld, y.data(), y.ld, rows, n, gamma.data(), beta.data(), 1e-5f,
                          mean.data(), rstd.data());
          std::vector<uint16_t> want(rows * n), got(rows * (n + pad + 1), 0xABCD), ref(rows * n);
          kern::f32_to_bf16(y.data(), want.data(), rows * n);
          const int64_t ldg = n + pad + 1;
          kern::layernorm_bf16(x.data(), x.ld, got.data(), ldg, rows, n, gamma.data(), beta.data(),
                               1e-5f, mean16.data(), rstd16.data());
          for (int64_t r = 0; r < rows; ++r) {
            for (int64_t i = 0; i < n; ++i)
              ASSERT_EQ(got[r * ldg + i], want[r * n + i]) << r << "," << i;
            for (int64_t i = n; i < ldg; ++i) ASSERT_EQ(got[r * ldg + i], 0xABCD);
          }
          EXPECT_EQ(std::memcmp(mean.data(), mean16.data(), rows * sizeof(float)), 0);
          EXPECT_EQ(std::memcmp(rstd.data(), rstd16.data(), rows * sizeof(float)), 0);
          kern::ref::layernorm_bf16(x.data(), x.ld, ref.data(), n, rows, n, gamma.data(),
                                    beta.data(), 1e-5f);
          std::vector<float> fr(rows * n), fg(rows * n);
          kern::bf16_to_f32(ref.data(), fr.data(), rows * n);
          kern::bf16_to_f32(want.data(), fg.data(), rows * n);
          EXPECT_TRUE(Close(fg.data(), n, fr.data(), n, rows, n, 1.0 / 128, 1e-5));
        }
  });
}

TEST(ElementwiseLayerNorm, InPlaceWithoutStats) {
  ForEachTarget([] {
    for (int64_t n : kCols)
      for (int64_t pad : {0, 3}) {
        SCOPED_TRACE(shape(37, n, pad));
        Mat x(37, n, pad, 4, 10.f);  // O(10) values
        const std::vector<float> gamma = vec(n, 5), beta = vec(n, 6);
        Mat y_ref(37, n, 0, 0);
        kern::ref::layernorm(x.data(), x.ld, y_ref.data(), y_ref.ld, 37, n, gamma.data(),
                             beta.data(), 1e-5f);
        kern::layernorm(x.data(), x.ld, x.data(), x.ld, 37, n, gamma.data(), beta.data(), 1e-5f);
        EXPECT_TRUE(Close(x, y_ref, 1e-5, 1e-5));
        EXPECT_TRUE(PadUntouched(x));
      }
  });
}

// ---- softmax ---------------------------------------------------------------------------------

TEST(ElementwiseSoftmax, MatchesReference) {
  ForEachTarget([] {
    for (int64_t rows : kRows)
      for (int64_t n : kCols)
        for (int64_t pad : {0, 5}) {
          SCOPED_TRACE(shape(rows, n, pad));
          Mat x(rows, n, pad, 7, 8.f), x_ref(rows, n, pad, 7, 8.f);
          kern::softmax_rows(x.data(), x.ld, rows, n);
          kern::ref::softmax_rows(x_ref.data(), x_ref.ld, rows, n);
          EXPECT_TRUE(Close(x, x_ref, 1e-5, 0));
          EXPECT_TRUE(PadUntouched(x));
        }
  });
}

TEST(ElementwiseSoftmax, MaskedRows) {
  ForEachTarget([] {
    for (int64_t n : kCols) {
      SCOPED_TRACE("n=" + std::to_string(n));
      Mat x(5, n, 3, 8, 4.f);
      for (int64_t i = 0; i < n; ++i) {
        if (i % 3 == 1) x.at(0, i) = -1e9f;  // row 0: attention mask bias, some keys masked
        x.at(1, i) = -1e9f;                  // row 1: every key masked by a finite bias
        x.at(2, i) = -kInf;                  // row 2: every key masked with -inf
        if (i % 2 == 0) x.at(3, i) = -kInf;  // row 3: some -inf keys
        x.at(4, i) = x.at(4, i) - 1e9f;      // row 4: huge negative offset, ties in float
      }
      Mat x_ref = x;
      kern::softmax_rows(x.data(), x.ld, 5, n);
      kern::ref::softmax_rows(x_ref.data(), x_ref.ld, 5, n);
      EXPECT_TRUE(Close(x, x_ref, 1e-5, 0));
      EXPECT_TRUE(PadUntouched(x));
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t r = 0; r < 5; ++r) ASSERT_FALSE(std::isnan(x.at(r, i))) << r << ", " << i;
        if (i % 3 == 1) {
          EXPECT_EQ(x.at(0, i), 0.f);
        }
        EXPECT_NEAR(x.at(1, i), 1.0 / n, 1e-6);  // uniform, like plain float softmax
        EXPECT_EQ(x.at(2, i), 0.f);              // fully -inf row: zeros, not NaN
        if (i % 2 == 0) {
          EXPECT_EQ(x.at(3, i), 0.f);
        }
      }
      for (int64_t r : {0, 1, 3, 4}) {
        if (r == 3 && n == 1) continue;  // its only key is -inf
        double sum = 0;
        for (int64_t i = 0; i < n; ++i) sum += x.at(r, i);
        EXPECT_NEAR(sum, 1.0, 1e-5) << "row " << r;
      }
    }
  });
}

// ---- elementwise -----------------------------------------------------------------------------

using Unary = void (*)(float*, int64_t, int64_t, int64_t);
using Binary = void (*)(float*, int64_t, const float*, int64_t, int64_t, int64_t);

void CheckUnary(Unary fast, Unary ref, float scale, double rtol) {
  ForEachTarget([&] {
    for (int64_t rows : kRows)
      for (int64_t n : kCols)
        for (int64_t pad : {0, 5}) {
          SCOPED_TRACE(shape(rows, n, pad));
          Mat x(rows, n, pad, 9, scale), x_ref(rows, n, pad, 9, scale);
          fast(x.data(), x.ld, rows, n);
          ref(x_ref.data(), x_ref.ld, rows, n);
          EXPECT_TRUE(Close(x, x_ref, rtol, 0));
          EXPECT_TRUE(PadUntouched(x));
        }
  });
}

// y (pad_y) op= x (pad_x); pads (0, 0) take the contiguous path, the others the strided one.
void CheckBinary(Binary fast, Binary ref, float scale, double rtol) {
  ForEachTarget([&] {
    for (int64_t rows : kRows)
      for (int64_t n : kCols)
        for (auto [pad_y, pad_x] : {std::pair<int64_t, int64_t>{0, 0}, {0, 4}, {5, 0}, {3, 7}}) {
          SCOPED_TRACE(shape(rows, n, pad_y) + " pad_x=" + std::to_string(pad_x));
          const Mat x(rows, n, pad_x, 10, scale);
          Mat y(rows, n, pad_y, 11, 2.f), y_ref(rows, n, pad_y, 11, 2.f);
          fast(y.data(), y.ld, x.data(), x.ld, rows, n);
          ref(y_ref.data(), y_ref.ld, x.data(), x.ld, rows, n);
          EXPECT_TRUE(Close(y, y_ref, rtol, 0));
          EXPECT_TRUE(PadUntouched(y));
        }
  });
}

TEST(ElementwiseSigmoid, MulMatchesReference) {
  CheckBinary(kern::sigmoid_mul, kern::ref::sigmoid_mul, 12.f, 1e-5);
}

TEST(ElementwiseSigmoid, InPlaceMatchesReference) {
  CheckUnary(kern::sigmoid_inplace, kern::ref::sigmoid_inplace, 12.f, 1e-5);
}

// Very negative inputs keep their relative accuracy (exp(-x) would overflow), infinities saturate,
// NaN propagates.
TEST(ElementwiseSigmoid, ExtremeInputs) {
  const std::vector<float> in = {-kInf, -1e9f,  -200.f,  -100.f,
                                 -87.f, -30.f,  -1e-30f, -0.f,
                                 0.f,   1e-30f, 30.f,    87.f,
                                 100.f, 1e9f,   kInf,    std::numeric_limits<float>::quiet_NaN()};
  const int64_t n = static_cast<int64_t>(in.size());
  ForEachTarget([&] {
    std::vector<float> x = in, x_ref = in;
    kern::sigmoid_inplace(x.data(), n, 1, n);
    kern::ref::sigmoid_inplace(x_ref.data(), n, 1, n);
    // 1e-44 absolute: results below ~1e-38 are subnormal and carry fewer significant bits.
    EXPECT_TRUE(Close(x.data(), n, x_ref.data(), n, 1, n, 1e-5, 1e-44));
  });
}

TEST(ElementwiseRelu, MatchesReferenceExactly) {
  CheckUnary(kern::relu_inplace, kern::ref::relu_inplace, 1.f, 0);
}

TEST(ElementwiseAdd, MatchesReferenceExactly) {
  CheckBinary(kern::add_inplace, kern::ref::add_inplace, 1.f, 0);
}

TEST(ElementwiseAdd, BiasRowsMatchesReferenceExactly) {
  ForEachTarget([] {
    for (int64_t rows : kRows)
      for (int64_t n : kCols)
        for (int64_t pad : {0, 5}) {
          SCOPED_TRACE(shape(rows, n, pad));
          const std::vector<float> bias = vec(n, 12);
          Mat y(rows, n, pad, 13), y_ref(rows, n, pad, 13);
          kern::add_bias_rows(y.data(), y.ld, bias.data(), rows, n);
          kern::ref::add_bias_rows(y_ref.data(), y_ref.ld, bias.data(), rows, n);
          EXPECT_TRUE(Close(y, y_ref, 0, 0));
          EXPECT_TRUE(PadUntouched(y));
        }
  });
}

// ---- threading -------------------------------------------------------------------------------

// Big enough (rows * n >= 2^15) that the kernels split rows over threads. Each row's result must
// be bit-identical to a single-row call, so results never depend on the thread count.
TEST(ElementwiseThreads, LargeShapesMatchReferenceAndRowByRow) {
  const int64_t rows = 2048, n = 257, pad = 3;
  const Mat x(rows, n, pad, 14, 4.f, 1.f);
  const std::vector<float> gamma = vec(n, 15, 0.5f, 1.f), beta = vec(n, 16);

  Mat ln(rows, n, pad, 0), ln_rows(rows, n, pad, 0), ln_ref(rows, n, pad, 0);
  kern::layernorm(x.data(), x.ld, ln.data(), ln.ld, rows, n, gamma.data(), beta.data(), 1e-5f);
  kern::ref::layernorm(x.data(), x.ld, ln_ref.data(), ln_ref.ld, rows, n, gamma.data(), beta.data(),
                       1e-5f);
  for (int64_t r = 0; r < rows; ++r)
    kern::layernorm(x.data() + r * x.ld, x.ld, ln_rows.data() + r * ln_rows.ld, ln_rows.ld, 1, n,
                    gamma.data(), beta.data(), 1e-5f);
  EXPECT_TRUE(Close(ln, ln_ref, 1e-5, 1e-5));
  EXPECT_TRUE(Close(ln, ln_rows, 0, 0));
  EXPECT_TRUE(PadUntouched(ln));

  Mat sm = x, sm_rows = x, sm_ref = x;
  kern::softmax_rows(sm.data(), sm.ld, rows, n);
  kern::ref::softmax_rows(sm_ref.data(), sm_ref.ld, rows, n);
  for (int64_t r = 0; r < rows; ++r)
    kern::softmax_rows(sm_rows.data() + r * sm_rows.ld, sm_rows.ld, 1, n);
  EXPECT_TRUE(Close(sm, sm_ref, 1e-5, 0));
  EXPECT_TRUE(Close(sm, sm_rows, 0, 0));
  EXPECT_TRUE(PadUntouched(sm));

  Mat sg = x, sg_ref = x;
  kern::sigmoid_mul(sg.data(), sg.ld, ln.data(), ln.ld, rows, n);
  kern::ref::sigmoid_mul(sg_ref.data(), sg_ref.ld, ln.data(), ln.ld, rows, n);
  EXPECT_TRUE(Close(sg, sg_ref, 1e-5, 0));
  kern::sigmoid_inplace(sg.data(), sg.ld, rows, n);
  kern::ref::sigmoid_inplace(sg_ref.data(), sg_ref.ld, rows, n);
  EXPECT_TRUE(Close(sg, sg_ref, 1e-5, 1e-7));
  EXPECT_TRUE(PadUntouched(sg));

  Mat el = x, el_ref = x;
  kern::relu_inplace(el.data(), el.ld, rows, n);
  kern::ref::relu_inplace(el_ref.data(), el_ref.ld, rows, n);
  kern::add_inplace(el.data(), el.ld, x.data(), x.ld, rows, n);
  kern::ref::add_inplace(el_ref.data(), el_ref.ld, x.data(), x.ld, rows, n);
  kern::add_bias_rows(el.data(), el.ld, beta.data(), rows, n);
  kern::ref::add_bias_rows(el_ref.data(), el_ref.ld, beta.data(), rows, n);
  EXPECT_TRUE(Close(el, el_ref, 0, 0));
  EXPECT_TRUE(PadUntouched(el));

  // Contiguous (pad 0) large shapes take the flattened elementwise path in every thread block.
  const Mat xc(rows, n, 0, 17, 6.f);
  Mat yc(rows, n, 0, 18), yc_ref(rows, n, 0, 18);
  kern::sigmoid_mul(yc.data(), n, xc.data(), n, rows, n);
  kern::ref::sigmoid_mul(yc_ref.data(), n, xc.data(), n, rows, n);
  EXPECT_TRUE(Close(yc, yc_ref, 1e-5, 0));
}

// Called from inside a parallel region (as attention does), a kernel runs on the calling thread
// over just the rows it was given.
TEST(ElementwiseThreads, InsideParallelRegion) {
  const int64_t slices = 8, rows = 256, n = 128;  // each slice alone is above the threshold
  Mat x(slices * rows, n, 0, 19, 8.f), x_ref = x;
#pragma omp parallel for schedule(static)
  for (int64_t s = 0; s < slices; ++s) kern::softmax_rows(x.data() + s * rows * n, n, rows, n);
  kern::ref::softmax_rows(x_ref.data(), n, slices * rows, n);
  EXPECT_TRUE(Close(x, x_ref, 1e-5, 0));
}

}  // namespace
}  // namespace fc
