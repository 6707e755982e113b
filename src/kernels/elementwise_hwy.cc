// Row-wise and elementwise kernels with Highway SIMD (see kernels.h for the contracts).
// Every kernel is compiled once per x86 target (SSSE3 ... AVX-512) and chosen at run time with
// HWY_DYNAMIC_DISPATCH. The per-target code works on a block of rows on the calling thread; the
// wrappers at the bottom split rows into one block per OpenMP thread.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <utility>

#include "kernels/kernels.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/elementwise_hwy.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
// Per-target headers: must come after foreach_target.h, which re-includes this file per target.
#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"
#include "kernels/hwy_util-inl.h"

HWY_BEFORE_NAMESPACE();
namespace fc::kern {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

using D = hn::ScalableTag<float>;
using V = hn::Vec<D>;
using hwy_util::LoadPart;
using hwy_util::StorePart;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// x[i] = op(x[i]) for i < n.
template <class Op>
HWY_INLINE void Map1(D d, float* x, size_t n, Op op) {
  const size_t N = hn::Lanes(d);
  size_t i = 0;
  for (; i + N <= n; i += N) hn::StoreU(op(hn::LoadU(d, x + i)), d, x + i);
  if (i < n) StorePart(d, op(LoadPart(d, x + i, n - i, 0.f)), x + i, n - i);
}

// y[i] = op(y[i], x[i]) for i < n.
template <class Op>
HWY_INLINE void Map2(D d, float* y, const float* x, size_t n, Op op) {
  const size_t N = hn::Lanes(d);
  size_t i = 0;
  for (; i + N <= n; i += N) hn::StoreU(op(hn::LoadU(d, y + i), hn::LoadU(d, x + i)), d, y + i);
  if (i < n) {
    const V r = op(LoadPart(d, y + i, n - i, 0.f), LoadPart(d, x + i, n - i, 0.f));
    StorePart(d, r, y + i, n - i);
  }
}

// Sum over i < n of op(x[i]); `fill` must make op contribute 0 in the unused tail lanes.
// Four independent accumulators: an FP add has ~4 cycles of latency and two adders issue per
// cycle, so a single dependency chain would leave them mostly idle.
template <class Op>
HWY_INLINE float SumOf(D d, const float* x, size_t n, float fill, Op op) {
  const size_t N = hn::Lanes(d);
  V a0 = hn::Zero(d), a1 = hn::Zero(d), a2 = hn::Zero(d), a3 = hn::Zero(d);
  size_t i = 0;
  for (; i + 4 * N <= n; i += 4 * N) {
    a0 = op(hn::LoadU(d, x + i), a0);
    a1 = op(hn::LoadU(d, x + i + N), a1);
    a2 = op(hn::LoadU(d, x + i + 2 * N), a2);
    a3 = op(hn::LoadU(d, x + i + 3 * N), a3);
  }
  for (; i + N <= n; i += N) a0 = op(hn::LoadU(d, x + i), a0);
  if (i < n) a1 = op(LoadPart(d, x + i, n - i, fill), a1);
  return hn::GetLane(hn::SumOfLanes(d, hn::Add(hn::Add(a0, a1), hn::Add(a2, a3))));
}

// max over i < n of x[i] (-inf for n == 0). Two accumulators cover the max latency.
HWY_INLINE float MaxOf(D d, const float* x, size_t n) {
  const size_t N = hn::Lanes(d);
  V m0 = hn::Set(d, kNegInf), m1 = m0;
  size_t i = 0;
  for (; i + 2 * N <= n; i += 2 * N) {
    m0 = hn::Max(m0, hn::LoadU(d, x + i));
    m1 = hn::Max(m1, hn::LoadU(d, x + i + N));
  }
  for (; i + N <= n; i += N) m0 = hn::Max(m0, hn::LoadU(d, x + i));
  if (i < n) m1 = hn::Max(m1, LoadPart(d, x + i, n - i, kNegInf));
  // Horizontal max through memory, not MaxOfLanes: on EMU128 that starts from -FLT_MAX, which
  // would turn an all -inf row into a finite max.
  HWY_ALIGN float buf[HWY_MAX_BYTES / sizeof(float)];
  hn::Store(hn::Max(m0, m1), d, buf);
  return *std::max_element(buf, buf + N);
}

// sigmoid(x) = 1/(1+e) for x >= 0 and e/(1+e) for x < 0, with e = exp(-|x|) in (0, 1]: exp never
// overflows and very negative x keep full relative accuracy. NaN stays NaN; it is kept away from
// Exp, whose float->int step is undefined for NaN on the EMU128 target.
HWY_INLINE V Sigmoid(D d, V x) {
  const auto nan = hn::IsNaN(x);
  const V e = hn::Exp(d, hn::Neg(hn::IfThenZeroElse(nan, hn::Abs(x))));
  const V r = hn::Div(hn::Set(d, 1.f), hn::Add(hn::Set(d, 1.f), e));
  const V s = hn::IfThenElse(hn::Lt(x, hn::Zero(d)), hn::Mul(e, r), r);
  return hn::IfThenElse(nan, x, s);
}

// Two-pass statistics in float: the row (n <= a few thousand) stays in L1 between the passes, and
// centring before squaring avoids the cancellation of E[x^2] - E[x]^2 for rows with an offset.
// store(yr, i, count, v) writes the first count lanes of the normalised vector v to element i of
// output row r (f32, or its bf16 rounding).
template <class Out, class Store>
HWY_INLINE void LayerNormRowsTo(const float* x, int64_t ldx, Out* y, int64_t ldy, int64_t rows,
                                int64_t n, const float* gamma, const float* beta, float eps,
                                float* mean, float* rstd, Store store) {
  const D d;
  const size_t N = hn::Lanes(d);
  const size_t un = static_cast<size_t>(n);
  const float inv_n = 1.f / static_cast<float>(n);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ldx;  // [n]
    Out* yr = y + r * ldy;          // [n]
    const float mu =
        inv_n * SumOf(d, xr, un, 0.f, [](V v, V acc) HWY_ATTR { return hn::Add(v, acc); });
    const V vmu = hn::Set(d, mu);
    const float var = inv_n * SumOf(d, xr, un, mu, [vmu](V v, V acc) HWY_ATTR {
                        const V c = hn::Sub(v, vmu);
                        return hn::MulAdd(c, c, acc);
                      });
    const float rs = 1.f / std::sqrt(var + eps);
    if (mean) mean[r] = mu;
    if (rstd) rstd[r] = rs;
    // y = (x - mu) * rs * gamma + beta. In place is safe: element i is read before it is written.
    const V vrs = hn::Set(d, rs);
    size_t i = 0;
    for (; i + N <= un; i += N) {
      const V t = hn::Mul(hn::Sub(hn::LoadU(d, xr + i), vmu), vrs);
      store(yr, i, N, hn::MulAdd(t, hn::LoadU(d, gamma + i), hn::LoadU(d, beta + i)));
    }
    if (i < un) {
      const size_t c = un - i;
      const V t = hn::Mul(hn::Sub(LoadPart(d, xr + i, c, 0.f), vmu), vrs);
      store(yr, i, c, hn::MulAdd(t, LoadPart(d, gamma + i, c, 0.f), LoadPart(d, beta + i, c, 0.f)));
    }
  }
}

void LayerNormRows(const float* x, int64_t ldx, float* y, int64_t ldy, int64_t rows, int64_t n,
                   const float* gamma, const float* beta, float eps, float* mean, float* rstd) {
  LayerNormRowsTo(x, ldx, y, ldy, rows, n, gamma, beta, eps, mean, rstd,
                  [](float* yr, size_t i, size_t count, V v)
                      HWY_ATTR { StorePart(D(), v, yr + i, count); });
}

// LayerNormRows writing the bf16 rounding of each output (hwy_util::Bf16Bits: kern::f32_to_bf16's).
void LayerNormRowsBf16(const float* x, int64_t ldx, uint16_t* y, int64_t ldy, int64_t rows,
                       int64_t n, const float* gamma, const float* beta, float eps, float* mean,
                       float* rstd) {
  LayerNormRowsTo(x, ldx, y, ldy, rows, n, gamma, beta, eps, mean, rstd,
                  [](uint16_t* yr, size_t i, size_t count, V v) HWY_ATTR {
                    const hn::RebindToUnsigned<D> du;
                    const hn::RebindToSigned<D> di;
                    const hn::Rebind<uint16_t, D> dh;
                    const auto b = hwy_util::Bf16Bits(du, hn::BitCast(du, v));
                    const auto h = hn::DemoteTo(dh, hn::BitCast(di, b));  // values fit in 16 bits
                    if (count == hn::Lanes(dh)) return hn::StoreU(h, dh, yr + i);
                    HWY_ALIGN uint16_t buf[HWY_MAX_BYTES / sizeof(float)];
                    hn::Store(h, dh, buf);
                    std::copy_n(buf, count, yr + i);
                  });
}

// Three passes per row: max, exp(x - max) written in place while summing, scale by 1/sum.
void SoftmaxRows(float* x, int64_t ld, int64_t rows, int64_t n) {
  const D d;
  const size_t N = hn::Lanes(d);
  const size_t un = static_cast<size_t>(n);
  for (int64_t r = 0; r < rows; ++r) {
    float* xr = x + r * ld;  // [n]
    const float mx = MaxOf(d, xr, un);
    if (mx == kNegInf) {  // fully masked row: x - mx would be -inf - -inf = NaN
      std::fill(xr, xr + un, 0.f);
      continue;
    }
    const V vmx = hn::Set(d, mx);
    // One accumulator is enough here: Exp is ~20 dependent instructions per vector, so the add
    // chain is never the bottleneck. Tail lanes are filled with -inf, whose exp is 0.
    V acc = hn::Zero(d);
    size_t i = 0;
    for (; i + N <= un; i += N) {
      const V e = hn::Exp(d, hn::Sub(hn::LoadU(d, xr + i), vmx));
      acc = hn::Add(acc, e);
      hn::StoreU(e, d, xr + i);
    }
    if (i < un) {
      const V e = hn::Exp(d, hn::Sub(LoadPart(d, xr + i, un - i, kNegInf), vmx));
      acc = hn::Add(acc, e);
      StorePart(d, e, xr + i, un - i);
    }
    const V inv = hn::Set(d, 1.f / hn::GetLane(hn::SumOfLanes(d, acc)));  // sum >= 1 (max term)
    Map1(d, xr, un, [inv](V v) HWY_ATTR { return hn::Mul(v, inv); });
  }
}

// The elementwise kernels below treat contiguous rows (ld == n) as one long row, so a narrow
// matrix (say n = 17) does not pay a tail per row.

void SigmoidMulRows(float* y, int64_t ldy, const float* g, int64_t ldg, int64_t rows, int64_t n) {
  if (ldy == n && ldg == n) n *= std::exchange(rows, 1);
  const D d;
  for (int64_t r = 0; r < rows; ++r)
    Map2(d, y + r * ldy, g + r * ldg, static_cast<size_t>(n),
         [d](V vy, V vg) HWY_ATTR { return hn::Mul(vy, Sigmoid(d, vg)); });
}

// a = a * sigmoid(a) * b (SwiGLU: silu(fc1) * fc2).
void SiluMulRows(float* a, int64_t lda, const float* b, int64_t ldb, int64_t rows, int64_t n) {
  if (lda == n && ldb == n) n *= std::exchange(rows, 1);
  const D d;
  for (int64_t r = 0; r < rows; ++r)
    Map2(d, a + r * lda, b + r * ldb, static_cast<size_t>(n),
         [d](V va, V vb) HWY_ATTR { return hn::Mul(hn::Mul(va, Sigmoid(d, va)), vb); });
}

void SigmoidRows(float* x, int64_t ld, int64_t rows, int64_t n) {
  if (ld == n) n *= std::exchange(rows, 1);
  const D d;
  for (int64_t r = 0; r < rows; ++r)
    Map1(d, x + r * ld, static_cast<size_t>(n), [d](V v) HWY_ATTR { return Sigmoid(d, v); });
}

void ReluRows(float* x, int64_t ld, int64_t rows, int64_t n) {
  if (ld == n) n *= std::exchange(rows, 1);
  const D d;
  for (int64_t r = 0; r < rows; ++r)
    Map1(d, x + r * ld, static_cast<size_t>(n),
         [d](V v) HWY_ATTR { return hn::Max(v, hn::Zero(d)); });
}

void AddRows(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t rows, int64_t n) {
  if (ldy == n && ldx == n) n *= std::exchange(rows, 1);
  const D d;
  for (int64_t r = 0; r < rows; ++r)
    Map2(d, y + r * ldy, x + r * ldx, static_cast<size_t>(n),
         [](V a, V b) HWY_ATTR { return hn::Add(a, b); });
}

void AddBiasRows(float* y, int64_t ldy, const float* bias, int64_t rows, int64_t n) {
  const D d;
  for (int64_t r = 0; r < rows; ++r)
    Map2(d, y + r * ldy, bias, static_cast<size_t>(n),
         [](V a, V b) HWY_ATTR { return hn::Add(a, b); });
}

}  // namespace HWY_NAMESPACE
}  // namespace fc::kern
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace fc::kern {

HWY_EXPORT(LayerNormRows);
HWY_EXPORT(LayerNormRowsBf16);
HWY_EXPORT(SoftmaxRows);
HWY_EXPORT(SigmoidMulRows);
HWY_EXPORT(SiluMulRows);
HWY_EXPORT(SigmoidRows);
HWY_EXPORT(ReluRows);
HWY_EXPORT(AddRows);
HWY_EXPORT(AddBiasRows);

namespace {
// Below this many elements a fork/join (~1-2 us) costs more than it saves.
constexpr int64_t kParallelMinElems = int64_t{1} << 15;

// Calls f(r0, r1) on disjoint row blocks covering [0, rows): one block per thread for large
// matrices, a single block on the calling thread otherwise or inside a parallel region.
template <class F>
void for_row_blocks(int64_t rows, int64_t n, F f) {
  if (rows <= 0 || n <= 0) return;
  int64_t blocks = 1;
  if (rows > 1 && rows * n >= kParallelMinElems && !omp_in_parallel())
    blocks = std::min<int64_t>(rows, omp_get_max_threads());
  if (blocks == 1) {
    f(int64_t{0}, rows);
    return;
  }
#pragma omp parallel for schedule(static) num_threads(static_cast <int>(blocks))
  for (int64_t b = 0; b < blocks; ++b) f(rows * b / blocks, rows * (b + 1) / blocks);
}
}  // namespace

void layernorm(const float* x, int64_t ldx, float* y, int64_t ldy, int64_t rows, int64_t n,
               const float* gamma, const float* beta, float eps, float* mean, float* rstd) {
  for_row_blocks(rows, n, [&](int64_t r0, int64_t r1) {
    HWY_DYNAMIC_DISPATCH(LayerNormRows)
    (x + r0 * ldx, ldx, y + r0 * ldy, ldy, r1 - r0, n, gamma, beta, eps, mean ? mean + r0 : nullptr,
     rstd ? rstd + r0 : nullptr);
  });
}

void layernorm_bf16(const float* x, int64_t ldx, uint16_t* y, int64_t ldy, int64_t rows, int64_t n,
                    const float* gamma, const float* beta, float eps, float* mean, float* rstd) {
  for_row_blocks(rows, n, [&](int64_t r0, int64_t r1) {
    HWY_DYNAMIC_DISPATCH(LayerNormRowsBf16)
    (x + r0 * ldx, ldx, y + r0 * ldy, ldy, r1 - r0, n, gamma, beta, eps, mean ? mean + r0 : nullptr,
     rstd ? rstd + r0 : nullptr);
  });
}

void softmax_rows(float* x, int64_t ld, int64_t rows, int64_t n) {
  for_row_blocks(rows, n, [&](int64_t r0, int64_t r1) {
    HWY_DYNAMIC_DISPATCH(SoftmaxRows)(x + r0 * ld, ld, r1 - r0, n);
  });
}

void sigmoid_mul(float* y, int64_t ldy, const float* g, int64_t ldg, int64_t rows, int64_t n) {
  for_row_blocks(rows, n, [&](int64_t r0, int64_t r1) {
    HWY_DYNAMIC_DISPATCH(SigmoidMulRows)(y + r0 * ldy, ldy, g + r0 * ldg, ldg, r1 - r0, n);
  });
}

void swiglu(float* a, int64_t lda, const float* b, int64_t ldb, int64_t rows, int64_t n) {
  for_row_blocks(rows, n, [&](int64_t r0, int64_t r1) {
    HWY_DYNAMIC_DISPATCH(SiluMulRows)(a + r0 * lda, lda, b + r0 * ldb, ldb, r1 - r0, n);
  });
}

void sigmoid_inplace(float* x, int64_t ld, int64_t rows, int64_t n) {
  for_row_blocks(rows, n, [&](int64_t r0, int64_t r1) {
    HWY_DYNAMIC_DISPATCH(SigmoidRows)(x + r0 * ld, ld, r1 - r0, n);
  });
}

void relu_inplace(float* x, int64_t ld, int64_t rows, int64_t n) {
  for_row_blocks(rows, n, [&](int64_t r0, int64_t r1) {
    HWY_DYNAMIC_DISPATCH(ReluRows)(x + r0 * ld, ld, r1 - r0, n);
  });
}

void add_inplace(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t rows, int64_t n) {
  for_row_blocks(rows, n, [&](int64_t r0, int64_t r1) {
    HWY_DYNAMIC_DISPATCH(AddRows)(y + r0 * ldy, ldy, x + r0 * ldx, ldx, r1 - r0, n);
  });
}

void add_bias_rows(float* y, int64_t ldy, const float* bias, int64_t rows, int64_t n) {
  for_row_blocks(rows, n, [&](int64_t r0, int64_t r1) {
    HWY_DYNAMIC_DISPATCH(AddBiasRows)(y + r0 * ldy, ldy, bias, r1 - r0, n);
  });
}

}  // namespace fc::kern
#endif  // HWY_ONCE
