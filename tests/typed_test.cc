// Typed kernels for the bf16 products (src/kernels/typed.h): the rounding transpose gives the
// reference's bits, and the batched bf16 GEMM agrees with its double-accumulated reference within
// f32 accumulation error, independently of the thread count.
#include "kernels/typed.h"

#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "core/rng.h"
#include "kernels/convert.h"

namespace fc {
namespace {

TEST(TypedTranspose, Bf16BitsMatchReferenceAndPaddingUntouched) {
  struct Shape {
    int64_t rows, cols;
  };
  for (const Shape s : {Shape{1, 1}, Shape{33, 70}, Shape{300, 129}, Shape{64, 32}}) {
    SCOPED_TRACE(::testing::Message() << s.rows << "x" << s.cols);
    const int64_t lds = s.cols + 5, ldd = s.rows + 3;
    std::vector<float> src(s.rows * lds);  // [rows, lds]
    for (int64_t i = 0; i < s.rows * lds; ++i) src[i] = 3.f * uniform_pm1(7, i);
    std::vector<uint16_t> got(s.cols * ldd, 0xABCD), want(s.cols * ldd, 0xABCD);  // [cols, ldd]
    kern::transpose_to_bf16(src.data(), lds, got.data(), ldd, s.rows, s.cols);
    kern::ref::transpose_to_bf16(src.data(), lds, want.data(), ldd, s.rows, s.cols);
    EXPECT_EQ(got, want);
    for (int64_t c = 0; c < s.cols; ++c)
      for (int64_t r = s.rows; r < ldd; ++r) ASSERT_EQ(got[c * ldd + r], 0xABCD);
  }
}

struct BatchCase {
  int64_t batch, M, N, K;
  bool ta, tb;
};
std::string BatchName(const BatchCase& c) {
  return "b" + std::to_string(c.batch) + "_" + std::to_string(c.M) + "x" + std::to_string(c.N) +
         "x" + std::to_string(c.K) + (c.ta ? "_ta" : "") + (c.tb ? "_tb" : "");
}
void PrintTo(const BatchCase& c, std::ostream* os) { *os << BatchName(c); }

class TypedGemmBatched : public ::testing::TestWithParam<BatchCase> {};

TEST_P(TypedGemmBatched, Bf16MatchesReferenceAndThreadCounts) {
  const BatchCase c = GetParam();
  const int64_t lda = c.ta ? c.M : c.K, ldb = c.tb ? c.K : c.N, ldc = c.N;
  const int64_t sa = (c.ta ? c.K : c.M) * lda + 2, sb = (c.tb ? c.N : c.K) * ldb + 2,
                sc = c.M * ldc + 1;  // strides with gaps between the items
  std::vector<float> a(c.batch * sa), b(c.batch * sb);
  for (size_t i = 0; i < a.size(); ++i) a[i] = uniform_pm1(11, i);
  for (size_t i = 0; i < b.size(); ++i) b[i] = uniform_pm1(12, i);
  std::vector<uint16_t> ah(a.size()), bh(b.size());  // bf16 of a, b
  kern::f32_to_bf16(a.data(), ah.data(), a.size());
  kern::f32_to_bf16(b.data(), bh.data(), b.size());
  std::vector<float> c0(c.batch * sc);
  for (size_t i = 0; i < c0.size(); ++i) c0[i] = uniform_pm1(13, i);
  std::vector<float> want = c0;
  kern::ref::gemm_batched_typed(DType::BF16, c.batch, c.ta, c.tb, c.M, c.N, c.K, 0.5f, ah.data(),
                                lda, sa, bh.data(), ldb, sb, 0.25f, want.data(), ldc, sc);
  // f32 accumulation of K products of magnitude <= 0.5: |error| <= ~K 2^-24 * 0.5 K.
  const double tol = (c.K + 4) * 0x1p-24 * c.K + 1e-6;
  std::vector<std::vector<float>> got;
  const int saved = omp_get_max_threads();
  for (int threads : {1, 2}) {
    omp_set_num_threads(threads);
    std::vector<float> y = c0;
    kern::gemm_batched_typed(DType::BF16, c.batch, c.ta, c.tb, c.M, c.N, c.K, 0.5f, ah.data(), lda,
                             sa, bh.data(), ldb, sb, 0.25f, y.data(), ldc, sc);
    for (size_t i = 0; i < y.size(); ++i)
      ASSERT_LE(std::abs(y[i] - want[i]), tol) << "threads " << threads << " at " << i;
    got.push_back(y);
  }
  omp_set_num_threads(saved);
  if (c.batch >= 2) {  // each product single-threaded on its thread in both runs
    EXPECT_EQ(std::memcmp(got[0].data(), got[1].data(), got[0].size() * sizeof(float)), 0);
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, TypedGemmBatched,
                         ::testing::Values(BatchCase{1, 7, 5, 3, false, true},
                                           BatchCase{3, 40, 40, 40, false, true},
                                           BatchCase{5, 33, 33, 33, true, false},
                                           BatchCase{4, 16, 24, 64, false, false},
                                           BatchCase{2, 9, 17, 31, true, true}),
                         [](const auto& info) { return BatchName(info.param); });

}  // namespace
}  // namespace fc
