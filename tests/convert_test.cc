// Element-type kernels (src/kernels/convert.h): the Highway conversions against the naive
// references on every compiled target (ties, subnormals, Inf, NaN, every 16-bit pattern), the
// Tensor conversions built on them, and the bf16 GEMM against its naive reference.
#include "kernels/convert.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "core/rng.h"
#include "hwy/highway.h"
#include "hwy/targets.h"
#include "kernels/kernels.h"
#include "test_util.h"

namespace fc {
namespace {

uint32_t bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}
float from_bits(uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
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

// f32 inputs that exercise rounding: for every upper half pattern, lower halves at and around the
// bf16 tie (0x8000) and the f16 tie (bit 12), plus pseudo-random patterns. Odd count: tails.
std::vector<float> probe_inputs() {
  std::vector<float> v;
  for (uint32_t hi = 0; hi < 0x10000; hi += 1)
    for (uint32_t lo : {0x0000u, 0x7FFFu, 0x8000u, 0x8001u, 0xFFFFu, 0x1000u, 0x3000u, 0x0FFFu})
      v.push_back(from_bits(hi << 16 | lo));
  for (int64_t i = 0; i < 200001; ++i)
    v.push_back(from_bits(static_cast<uint32_t>(splitmix64(1234 + i))));
  return v;
}

TEST(Convert, NarrowingMatchesReferenceOnEveryTarget) {
  const std::vector<float> x = probe_inputs();
  const int64_t n = static_cast<int64_t>(x.size());
  std::vector<uint16_t> want_b(n), want_h(n), got(n);
  kern::ref::f32_to_bf16(x.data(), want_b.data(), n);
  kern::ref::f32_to_f16(x.data(), want_h.data(), n);
  ForEachTarget([&] {
    for (int64_t len : {n, int64_t{1}, int64_t{7}, int64_t{33}}) {  // tails of every length
      std::fill(got.begin(), got.end(), 0xABCD);
      kern::f32_to_bf16(x.data(), got.data(), len);
      EXPECT_EQ(std::memcmp(got.data(), want_b.data(), 2 * len), 0) << len;
      EXPECT_EQ(got[len % n], len == n ? got[0] : 0xABCD) << "wrote past " << len;
      kern::f32_to_f16(x.data(), got.data(), len);
      EXPECT_EQ(std::memcmp(got.data(), want_h.data(), 2 * len), 0) << len;
    }
  });
}

// round_to_bf16 (the bf16 training's stream rounding) gives the reference's bits out of place and
// in place, tails included.
TEST(Convert, RoundToBf16MatchesReferenceOnEveryTarget) {
  const std::vector<float> x = probe_inputs();
  const int64_t n = static_cast<int64_t>(x.size());
  std::vector<float> want(n), got(n);
  kern::ref::round_to_bf16(x.data(), want.data(), n);
  ForEachTarget([&] {
    for (int64_t len : {n, int64_t{1}, int64_t{7}, int64_t{33}}) {
      std::fill(got.begin(), got.end(), 5.f);
      kern::round_to_bf16(x.data(), got.data(), len);
      EXPECT_EQ(std::memcmp(got.data(), want.data(), 4 * len), 0) << len;
      EXPECT_EQ(got[len % n], len == n ? got[0] : 5.f) << "wrote past " << len;
    }
    got = x;
    kern::round_to_bf16(got.data(), got.data(), n);
    EXPECT_EQ(std::memcmp(got.data(), want.data(), 4 * n), 0);
  });
}

// f32_to_bf16_rows on strided rows (short rows, tails, and enough elements to split across
// threads) gives the reference's bits per row and leaves each destination row's padding alone.
TEST(Convert, F32ToBf16RowsMatchesReferenceOnEveryTarget) {
  const std::vector<float> x = probe_inputs();
  ForEachTarget([&] {
    for (const auto& [rows, n] :
         {std::pair<int64_t, int64_t>{1, 1}, {5, 7}, {300, 32}, {9000, 33}, {40, 1000}}) {
      const int64_t lds = n + 3, ldd = n + 5;
      ASSERT_LE(rows * lds, static_cast<int64_t>(x.size()));
      std::vector<uint16_t> want(rows * ldd, 0xABCD), got(rows * ldd, 0xABCD);
      kern::ref::f32_to_bf16_rows(x.data(), lds, want.data(), ldd, rows, n);
      kern::f32_to_bf16_rows(x.data(), lds, got.data(), ldd, rows, n);
      EXPECT_EQ(got, want) << rows << " x " << n;
      for (int64_t r = 0; r < rows; ++r) {
        std::vector<uint16_t> row(n);
        kern::ref::f32_to_bf16(x.data() + r * lds, row.data(), n);
        ASSERT_EQ(std::memcmp(want.data() + r * ldd, row.data(), 2 * n), 0) << r;
        for (int64_t i = n; i < ldd; ++i) ASSERT_EQ(got[r * ldd + i], 0xABCD) << r << " " << i;
      }
    }
  });
}

TEST(Convert, WideningIsExactAndRoundTripsEveryPattern) {
  std::vector<uint16_t> all(0x10000), back(0x10000);
  for (uint32_t i = 0; i < 0x10000; ++i) all[i] = static_cast<uint16_t>(i);
  std::vector<float> want(0x10000), got(0x10000);
  ForEachTarget([&] {
    kern::ref::bf16_to_f32(all.data(), want.data(), 0x10000);
    kern::bf16_to_f32(all.data(), got.data(), 0x10000);
    EXPECT_EQ(std::memcmp(got.data(), want.data(), 4 * 0x10000), 0);
    kern::f32_to_bf16(got.data(), back.data(), 0x10000);
    for (uint32_t i = 0; i < 0x10000; ++i) {
      const bool nan = (i & 0x7F80) == 0x7F80 && (i & 0x7F);
      if (nan)
        ASSERT_TRUE(std::isnan(got[i]) && (back[i] | 0x40) == (i | 0x40)) << std::hex << i;
      else
        ASSERT_EQ(back[i], i) << std::hex << i;
    }
    kern::ref::f16_to_f32(all.data(), want.data(), 0x10000);
    kern::f16_to_f32(all.data(), got.data(), 0x10000);
    EXPECT_EQ(std::memcmp(got.data(), want.data(), 4 * 0x10000), 0);
    kern::f32_to_f16(got.data(), back.data(), 0x10000);
    for (uint32_t i = 0; i < 0x10000; ++i) {
      const bool nan = (i & 0x7C00) == 0x7C00 && (i & 0x3FF);
      if (nan)
        ASSERT_TRUE(std::isnan(got[i]) && (back[i] | 0x200) == (i | 0x200)) << std::hex << i;
      else
        ASSERT_EQ(back[i], i) << std::hex << i;
    }
  });
}

// Hand-checked cases: ties to even, subnormals, overflow, Inf, NaN, signed zero.
TEST(Convert, RoundingCases) {
  struct Case {
    float x;
    uint16_t bf16, f16;
  };
  const float inf = std::numeric_limits<float>::infinity();
  const Case cases[] = {
      {1.f, 0x3F80, 0x3C00},
      {-0.f, 0x8000, 0x8000},
      {1.f + 0x1p-8f, 0x3F80, 0x3C04},        // bf16 tie -> even (down); f16 exact
      {1.f + 3 * 0x1p-8f, 0x3F82, 0x3C0C},    // bf16 tie -> even (up)
      {1.f + 0x1p-11f, 0x3F80, 0x3C00},       // f16 tie -> even (down)
      {1.f + 3 * 0x1p-11f, 0x3F80, 0x3C02},   // f16 tie -> even (up)
      {0x1p-24f, 0x3380, 0x0001},             // smallest f16 subnormal
      {0x1p-25f, 0x3300, 0x0000},             // f16 tie between 0 and 2^-24 -> 0
      {3 * 0x1p-25f, 0x33C0, 0x0002},         // f16 tie 1.5 ulp -> 2
      {0x1p-14f - 0x1p-25f, 0x3880, 0x0400},  // rounds up into the smallest f16 normal
      {65504.f, 0x4780, 0x7BFF},              // f16 max
      {65520.f, 0x4780, 0x7C00},              // f16 tie at max + half ulp -> Inf
      {65519.99f, 0x4780, 0x7BFF},
      {from_bits(0x7F7FFFFF), 0x7F80, 0x7C00},  // f32 max: bf16 rounds up past its max: Inf
      {from_bits(0x7F7F7FFF), 0x7F7F, 0x7C00},
      {from_bits(0x00000001), 0x0000, 0x0000},  // f32 subnormal: bf16 rounds to 0
      {from_bits(0x00008000), 0x0000, 0x0000},  // tie -> even 0
      {from_bits(0x00018000), 0x0002, 0x0000},  // tie -> even 2
      {from_bits(0x80018001), 0x8002, 0x8000},
      {inf, 0x7F80, 0x7C00},
      {-inf, 0xFF80, 0xFC00},
  };
  for (const Case& c : cases) {
    uint16_t b = 0, h = 0, rb = 0, rh = 0;
    kern::f32_to_bf16(&c.x, &b, 1);
    kern::f32_to_f16(&c.x, &h, 1);
    kern::ref::f32_to_bf16(&c.x, &rb, 1);
    kern::ref::f32_to_f16(&c.x, &rh, 1);
    EXPECT_EQ(b, c.bf16) << std::hexfloat << c.x;
    EXPECT_EQ(h, c.f16) << std::hexfloat << c.x;
    EXPECT_EQ(rb, c.bf16) << std::hexfloat << c.x;
    EXPECT_EQ(rh, c.f16) << std::hexfloat << c.x;
  }
  for (float nan :
       {std::numeric_limits<float>::quiet_NaN(), from_bits(0x7F800001), from_bits(0xFFC12345)}) {
    uint16_t b = 0, h = 0;
    kern::f32_to_bf16(&nan, &b, 1);
    kern::f32_to_f16(&nan, &h, 1);
    float wb, wh;
    kern::bf16_to_f32(&b, &wb, 1);
    kern::f16_to_f32(&h, &wh, 1);
    EXPECT_TRUE(std::isnan(wb) && std::isnan(wh)) << std::hex << bits(nan);
    EXPECT_EQ(b & 0x8000, (bits(nan) >> 16) & 0x8000);
    EXPECT_EQ(h & 0x8000, (bits(nan) >> 16) & 0x8000);
  }
}

TEST(Convert, TensorConversions) {
  // A strided F32 view converted to each type and back, against the kernels element by element.
  Tensor x = Tensor::empty({5, 7});
  for (int64_t i = 0; i < x.numel(); ++i) x.f32()[i] = 300.f * uniform_pm1(9, i);
  x.f32()[3] = std::numeric_limits<float>::quiet_NaN();
  x.f32()[4] = 1e6f;                      // f16 overflow
  const Tensor view = x.transpose(0, 1);  // [7, 5], strided
  for (DType t : {DType::BF16, DType::F16}) {
    SCOPED_TRACE(dtype_name(t));
    const Tensor h = view.to(t), hc = view.contiguous().to(t);
    ASSERT_EQ(h.dtype(), t);
    EXPECT_EQ(h.nbytes(), 2u * 35);
    EXPECT_EQ(std::memcmp(h.data<uint16_t>(), hc.data<uint16_t>(), h.nbytes()), 0);
    std::vector<uint16_t> want(35);
    const Tensor vc = view.contiguous();
    (t == DType::BF16 ? kern::ref::f32_to_bf16 : kern::ref::f32_to_f16)(vc.f32(), want.data(), 35);
    EXPECT_EQ(std::memcmp(h.data<uint16_t>(), want.data(), 70), 0);
    const Tensor back = h.to(DType::F32), back64 = h.to(DType::F64);
    for (int64_t i = 0; i < 35; ++i) {
      const float v = vc.f32()[i], b = back.f32()[i];
      if (std::isnan(v)) {
        EXPECT_TRUE(std::isnan(b) && std::isnan(back64.data<double>()[i]));
        continue;
      }
      EXPECT_EQ(static_cast<double>(b), back64.data<double>()[i]);
      if (std::isinf(b)) continue;  // 1e6 in f16
      EXPECT_LE(std::abs(b - v), std::abs(v) * (t == DType::BF16 ? 0x1p-8 : 0x1p-11)) << i;
    }
    EXPECT_TRUE(std::isinf(back.f32()[4 * 5 + 0]) == (t == DType::F16));  // x[0][4] -> view[4][0]
    // 16-bit to the other 16-bit type: through the exact f32 value.
    const DType other = t == DType::BF16 ? DType::F16 : DType::BF16;
    const Tensor o = h.to(other), o_ref = back.to(other);
    EXPECT_EQ(std::memcmp(o.data<uint16_t>(), o_ref.data<uint16_t>(), 70), 0);
  }
  // F64 rounds once: 1 + 2^-8 + 2^-40 is just above the bf16 tie (F32 rounding alone would land
  // on the tie and round down to 1).
  Tensor d = Tensor::empty({1}, DType::F64);
  d.data<double>()[0] = 1.0 + 0x1p-8 + 0x1p-40;
  EXPECT_EQ(d.to(DType::BF16).data<uint16_t>()[0], 0x3F81);
  EXPECT_EQ(d.to(DType::F32).to(DType::BF16).data<uint16_t>()[0], 0x3F80);
  EXPECT_STREQ(dtype_name(DType::F16), "F16");
  EXPECT_EQ(dtype_size(DType::F16), 2u);
}

TEST(GemmTyped, Bf16MatchesReference) {
  struct Shape {
    int64_t M, N, K;
    bool ta, tb;
    float alpha, beta;
  };
  for (const Shape& s :
       {Shape{1, 1, 1, false, false, 1.f, 0.f}, Shape{7, 13, 5, false, true, 1.f, 0.f},
        Shape{17, 3, 33, true, false, 0.7f, 0.5f}, Shape{64, 48, 256, false, true, 1.f, 1.f},
        Shape{31, 29, 65, true, true, -2.f, 0.25f}}) {
    SCOPED_TRACE(::testing::Message()
                 << s.M << "x" << s.N << "x" << s.K << " ta" << s.ta << " tb" << s.tb);
    const int64_t pad = 3, lda = (s.ta ? s.M : s.K) + pad, ldb = (s.tb ? s.K : s.N) + pad,
                  ldc = s.N + pad;
    const int64_t na = (s.ta ? s.K : s.M) * lda, nb = (s.tb ? s.N : s.K) * ldb;
    std::vector<float> a(na), b(nb), c0(s.M * ldc);  // [rows, ld] each
    for (int64_t i = 0; i < na; ++i) a[i] = uniform_pm1(1, i);
    for (int64_t i = 0; i < nb; ++i) b[i] = uniform_pm1(2, i);
    for (int64_t i = 0; i < s.M * ldc; ++i) c0[i] = uniform_pm1(3, i);
    std::vector<uint16_t> ah(na), bh(nb);  // bf16 [rows, ld]
    kern::f32_to_bf16(a.data(), ah.data(), na);
    kern::f32_to_bf16(b.data(), bh.data(), nb);
    std::vector<float> got = c0, want = c0, f32 = c0;
    kern::gemm_typed(DType::BF16, s.ta, s.tb, s.M, s.N, s.K, s.alpha, ah.data(), lda, bh.data(),
                     ldb, s.beta, got.data(), ldc);
    kern::ref::gemm_bf16(s.ta, s.tb, s.M, s.N, s.K, s.alpha, ah.data(), lda, bh.data(), ldb, s.beta,
                         want.data(), ldc);
    kern::gemm_typed(DType::F32, s.ta, s.tb, s.M, s.N, s.K, s.alpha, a.data(), lda, b.data(), ldb,
                     s.beta, f32.data(), ldc);
    // Against the same bf16 inputs summed in double: only f32 accumulation differs, |error| <=
    // ~K 2^-24 sum_k |a b| (+ the rounding of alpha, beta C). Against f32 inputs: each bf16 input
    // is off by <= 2^-9 relative, so each product by <= 2^-8 (|a| <= 1, |b| <= 1: sum <= K).
    const double tight = (s.K + 4) * 0x1p-24 * s.K * std::abs(s.alpha) + 1e-6;
    const double loose = 0x1p-8 * s.K * std::abs(s.alpha) * 1.01 + tight;
    for (int64_t i = 0; i < s.M; ++i) {
      for (int64_t j = 0; j < s.N; ++j) {
        const int64_t k = i * ldc + j;
        ASSERT_TRUE(std::isfinite(got[k]));
        EXPECT_LE(std::abs(got[k] - want[k]), tight) << i << "," << j;
        EXPECT_LE(std::abs(got[k] - f32[k]), loose) << i << "," << j;
      }
      for (int64_t j = s.N; j < ldc; ++j) EXPECT_EQ(got[i * ldc + j], c0[i * ldc + j]);
    }
  }
}

}  // namespace
}  // namespace fc
