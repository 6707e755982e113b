// Typed kernels for the bf16 products (src/kernels/typed.h): the rounding transpose gives the
// reference's bits, and the batched bf16 GEMM agrees with its double-accumulated reference within
// f32 accumulation error, independently of the thread count.
#include "kernels/typed.h"

#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
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

// linear_bf16 / linear_backward_bf16 (the bf16 training's Linear) against their naive references,
// with strided x, dy, y, dx, accumulation into y, dx and dW, and odd shapes; the fast kernels use
// no more scratch than their formula gives (a guard element after it stays intact).
// gemm_typed's bias (the bf16 Linear forward's): C = A B^T + bias on every row, against the
// double-accumulated reference within f32 accumulation error, at the Linear shapes (K blocked or
// not, ragged tails), on one thread and two; nothing is written past a row of C. (oneDNN adds the
// bias after the whole K sum; C prefilled with the bias rows and beta 1, linear_bf16's way before,
// gives the same bits only while K is not split into blocks: K <= 256 here.)
TEST(TypedGemm, Bf16BiasMatchesReference) {
  struct Shape {
    int64_t M, N, K;
  };
  for (const Shape s : {Shape{1, 1, 1}, Shape{7, 5, 3}, Shape{97, 512, 128}, Shape{300, 1024, 256},
                        Shape{130, 256, 1024}, Shape{33, 130, 2500}})
    for (int threads : {1, 2}) {
      SCOPED_TRACE(::testing::Message()
                   << s.M << "x" << s.N << "x" << s.K << " threads " << threads);
      const int64_t ldc = s.N + 3;
      std::vector<float> a(s.M * s.K), b(s.N * s.K), bias(s.N);  // A [M, K], B [N, K]
      for (int64_t i = 0; i < s.M * s.K; ++i) a[i] = uniform_pm1(21, i);
      for (int64_t i = 0; i < s.N * s.K; ++i) b[i] = uniform_pm1(22, i);
      for (int64_t i = 0; i < s.N; ++i) bias[i] = 4.f * uniform_pm1(23, i);
      std::vector<uint16_t> ab(a.size()), bb(b.size());
      kern::f32_to_bf16(a.data(), ab.data(), s.M * s.K);
      kern::f32_to_bf16(b.data(), bb.data(), s.N * s.K);
      std::vector<float> got(s.M * ldc, 7.f), want(s.M * ldc, 7.f);  // [M, ldc]
      for (int64_t i = 0; i < s.M; ++i) std::copy(bias.begin(), bias.end(), want.begin() + i * ldc);
      const int prev = omp_get_max_threads();
      omp_set_num_threads(threads);
      kern::gemm_typed(DType::BF16, false, true, s.M, s.N, s.K, 1.f, ab.data(), s.K, bb.data(), s.K,
                       0.f, got.data(), ldc, bias.data());
      omp_set_num_threads(prev);
      kern::ref::gemm_bf16(false, true, s.M, s.N, s.K, 1.f, ab.data(), s.K, bb.data(), s.K, 1.f,
                           want.data(), ldc);
      const double tol = 1e-6 * (4.0 + static_cast<double>(s.K));  // f32 sums of K products
      for (int64_t i = 0; i < s.M; ++i) {
        for (int64_t j = 0; j < s.N; ++j)
          ASSERT_NEAR(got[i * ldc + j], want[i * ldc + j], tol) << i << "," << j;
        for (int64_t j = s.N; j < ldc; ++j) ASSERT_EQ(got[i * ldc + j], 7.f);
      }
    }
}

TEST(TypedLinear, Bf16ForwardAndBackwardMatchReference) {
  struct Dims {
    int64_t rows, in, out;
  };
  constexpr uint16_t kGuard = 0xABCD;
  for (const Dims d : {Dims{1, 3, 2}, Dims{37, 20, 9}, Dims{130, 64, 48}}) {
    SCOPED_TRACE(::testing::Message() << d.rows << "x" << d.in << "->" << d.out);
    const int64_t ldx = d.in + 3, ldy = d.out + 2, K = std::max(d.in, d.rows);
    std::vector<float> x(d.rows * ldx), W(d.out * d.in), b(d.out), dy(d.rows * ldy);
    for (size_t i = 0; i < x.size(); ++i) x[i] = uniform_pm1(21, i);
    for (size_t i = 0; i < W.size(); ++i) W[i] = uniform_pm1(22, i);
    for (size_t i = 0; i < b.size(); ++i) b[i] = uniform_pm1(23, i);
    for (size_t i = 0; i < dy.size(); ++i) dy[i] = uniform_pm1(24, i);
    std::vector<uint16_t> Wb(W.size());  // [out, in] bf16
    kern::f32_to_bf16(W.data(), Wb.data(), static_cast<int64_t>(W.size()));
    // f32 accumulation of K products of magnitude <= 1 against double accumulation
    const double tol = (K + 4) * 0x1p-24 * K + 1e-6;
    for (bool acc : {false, true}) {
      SCOPED_TRACE(acc ? "accumulate" : "overwrite");
      std::vector<float> y0(d.rows * ldy);  // [rows, ldy]
      for (size_t i = 0; i < y0.size(); ++i) y0[i] = uniform_pm1(25, i);
      std::vector<float> y = y0, yr = y0;
      std::vector<uint16_t> sc(kern::linear_bf16_scratch(d.rows, d.in) + 1, kGuard);
      kern::linear_bf16(x.data(), ldx, d.rows, d.in, Wb.data(), b.data(), d.out, y.data(), ldy, acc,
                        sc.data());
      EXPECT_EQ(sc.back(), kGuard);
      kern::ref::linear_bf16(x.data(), ldx, d.rows, d.in, Wb.data(), b.data(), d.out, yr.data(),
                             ldy, acc, sc.data());
      for (int64_t r = 0; r < d.rows; ++r)
        for (int64_t o = 0; o < ldy; ++o)
          ASSERT_LE(std::abs(y[r * ldy + o] - yr[r * ldy + o]), tol) << r << "," << o;

      const int64_t lddx = d.in + 1;
      std::vector<float> dx0(d.rows * lddx), dW0(W.size()), db0(d.out);
      for (size_t i = 0; i < dx0.size(); ++i) dx0[i] = uniform_pm1(26, i);
      for (size_t i = 0; i < dW0.size(); ++i) dW0[i] = uniform_pm1(27, i);
      for (size_t i = 0; i < db0.size(); ++i) db0[i] = uniform_pm1(28, i);
      std::vector<float> dx = dx0, dW = dW0, db = db0, dxr = dx0, dWr = dW0, dbr = db0;
      std::vector<uint16_t> sb(kern::linear_backward_bf16_scratch(d.rows, d.in, d.out, true) + 1,
                               kGuard);
      kern::linear_backward_bf16(x.data(), ldx, d.rows, d.in, Wb.data(), d.out, dy.data(), ldy,
                                 dx.data(), lddx, dW.data(), db.data(), acc, sb.data());
      EXPECT_EQ(sb.back(), kGuard);
      kern::ref::linear_backward_bf16(x.data(), ldx, d.rows, d.in, Wb.data(), d.out, dy.data(), ldy,
                                      dxr.data(), lddx, dWr.data(), dbr.data(), acc, sb.data());
      for (size_t i = 0; i < dx.size(); ++i) ASSERT_LE(std::abs(dx[i] - dxr[i]), tol) << i;
      for (size_t i = 0; i < dW.size(); ++i) ASSERT_LE(std::abs(dW[i] - dWr[i]), tol) << i;
      for (size_t i = 0; i < db.size(); ++i) ASSERT_LE(std::abs(db[i] - dbr[i]), 1e-5) << i;
      // dx alone needs only dy's rounding
      std::vector<uint16_t> s1(kern::linear_backward_bf16_scratch(d.rows, d.in, d.out, false) + 1,
                               kGuard);
      kern::linear_backward_bf16(x.data(), ldx, d.rows, d.in, Wb.data(), d.out, dy.data(), ldy,
                                 dx.data(), lddx, nullptr, nullptr, false, s1.data());
      EXPECT_EQ(s1.back(), kGuard);
    }
  }
}

// The bf16-x forms (x rounded by its producer) give the f32-x forms' bits on xb = bf16(x), and
// their references agree with the f32-x references; the backward's scratch holds dy alone.
TEST(TypedLinear, Bf16InputFormsEqualF32InputForms) {
  constexpr uint16_t kGuard = 0xABCD;
  for (const int64_t rows : {1, 37, 130}) {
    const int64_t in = 20, out = 9, ldx = in + 3, ldy = out + 2;
    SCOPED_TRACE(rows);
    std::vector<float> x(rows * ldx), W(out * in), b(out), dy(rows * ldy);
    for (size_t i = 0; i < x.size(); ++i) x[i] = uniform_pm1(31, i);
    for (size_t i = 0; i < W.size(); ++i) W[i] = uniform_pm1(32, i);
    for (size_t i = 0; i < b.size(); ++i) b[i] = uniform_pm1(33, i);
    for (size_t i = 0; i < dy.size(); ++i) dy[i] = uniform_pm1(34, i);
    std::vector<uint16_t> Wb(W.size()), xb(rows * ldx, 0);  // xb: [rows, ldx] bf16(x)
    kern::f32_to_bf16(W.data(), Wb.data(), static_cast<int64_t>(W.size()));
    kern::f32_to_bf16(x.data(), xb.data(), static_cast<int64_t>(x.size()));
    for (bool acc : {false, true}) {
      std::vector<float> y0(rows * ldy);
      for (size_t i = 0; i < y0.size(); ++i) y0[i] = uniform_pm1(35, i);
      std::vector<float> y = y0, y16 = y0, yr = y0, yr16 = y0;
      std::vector<uint16_t> sc(kern::linear_bf16_scratch(rows, in));
      kern::linear_bf16(x.data(), ldx, rows, in, Wb.data(), b.data(), out, y.data(), ldy, acc,
                        sc.data());
      kern::linear_bf16(xb.data(), ldx, rows, in, Wb.data(), b.data(), out, y16.data(), ldy, acc);
      EXPECT_EQ(std::memcmp(y.data(), y16.data(), y.size() * sizeof(float)), 0);
      kern::ref::linear_bf16(x.data(), ldx, rows, in, Wb.data(), b.data(), out, yr.data(), ldy, acc,
                             sc.data());
      kern::ref::linear_bf16(xb.data(), ldx, rows, in, Wb.data(), b.data(), out, yr16.data(), ldy,
                             acc);
      EXPECT_EQ(std::memcmp(yr.data(), yr16.data(), yr.size() * sizeof(float)), 0);

      std::vector<float> dx(rows * in), dW(W.size()), db(out);
      for (size_t i = 0; i < dW.size(); ++i) dW[i] = uniform_pm1(36, i);
      std::vector<float> dx16 = dx, dW16 = dW, db16 = db, dxr = dx, dWr = dW, dbr = db;
      std::vector<uint16_t> sb(kern::linear_backward_bf16_scratch(rows, in, out, true));
      std::vector<uint16_t> sb16(kern::linear_backward_bf16_scratch(rows, in, out, false) + 1,
                                 kGuard);
      kern::linear_backward_bf16(x.data(), ldx, rows, in, Wb.data(), out, dy.data(), ldy, dx.data(),
                                 in, dW.data(), db.data(), acc, sb.data());
      kern::linear_backward_bf16(xb.data(), ldx, rows, in, Wb.data(), out, dy.data(), ldy,
                                 dx16.data(), in, dW16.data(), db16.data(), acc, sb16.data());
      EXPECT_EQ(sb16.back(), kGuard);
      EXPECT_EQ(std::memcmp(dx.data(), dx16.data(), dx.size() * sizeof(float)), 0);
      EXPECT_EQ(std::memcmp(dW.data(), dW16.data(), dW.size() * sizeof(float)), 0);
      EXPECT_EQ(std::memcmp(db.data(), db16.data(), db.size() * sizeof(float)), 0);
      kern::ref::linear_backward_bf16(xb.data(), ldx, rows, in, Wb.data(), out, dy.data(), ldy,
                                      dxr.data(), in, dWr.data(), dbr.data(), acc, sb16.data());
      const double tol = (in + rows + 4) * 0x1p-24 * (in + rows) + 1e-6;
      for (size_t i = 0; i < dx.size(); ++i) ASSERT_LE(std::abs(dx16[i] - dxr[i]), tol) << i;
      for (size_t i = 0; i < dW.size(); ++i) ASSERT_LE(std::abs(dW16[i] - dWr[i]), tol) << i;
    }
  }
}

}  // namespace
}  // namespace fc
