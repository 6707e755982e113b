// Backward kernels (see backward.h for the contracts). The row-wise and elementwise ones use
// Highway SIMD, compiled once per x86 target and chosen at run time with HWY_DYNAMIC_DISPATCH, like
// elementwise_hwy.cc; linear_backward and attention_backward are built on kern::gemm (oneDNN) and
// the forward kernels of kernels.h.
#include "kernels/backward.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>

#include "foldcube/status.h"
#include "kernels/convert.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/backward.cc"
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

namespace {
// Partial vectors are loaded zero-filled (LoadPart's default); every kernel below is written so
// that zero tail lanes contribute nothing to its sums.
// Writes v to p[0, count), or adds it to what is there.
HWY_INLINE void Output(D d, V v, float* p, size_t count, bool accumulate) {
  if (accumulate) v = hn::Add(LoadPart(d, p, count), v);
  StorePart(d, v, p, count);
}

// s = sigmoid(g) and ds = s * (1 - s), both from e = exp(-|g|) in (0, 1]: s = 1/(1+e) or e/(1+e),
// ds = e/(1+e)^2. No overflow, no cancellation in 1 - s, full relative accuracy in the tails. NaN
// lanes are kept away from Exp (undefined float->int step on EMU128) and propagate to s and ds.
HWY_INLINE void SigmoidAndSlope(D d, V g, V& s, V& ds) {
  const auto nan = hn::IsNaN(g);
  const V e = hn::Exp(d, hn::Neg(hn::IfThenZeroElse(nan, hn::Abs(g))));
  const V r = hn::Div(hn::Set(d, 1.f), hn::Add(hn::Set(d, 1.f), e));
  const V er = hn::Mul(e, r);
  s = hn::IfThenElse(nan, g, hn::IfThenElse(hn::Lt(g, hn::Zero(d)), er, r));
  ds = hn::IfThenElse(nan, g, hn::Mul(er, r));
}
}  // namespace

// Rows of one fixed block. pg/pb ([n], zeroed by the caller, or nullptr) receive the block's
// partial sums of dy * xhat and dy. Two passes per row (the row stays in L1): the two row sums and
// the partials, then dx.
void LayerNormBackwardRows(const float* x, int64_t ldx, const float* dy, int64_t lddy, int64_t rows,
                           int64_t n, const float* gamma, const float* mean, const float* rstd,
                           float* dx, int64_t lddx, bool accumulate, float* pg, float* pb) {
  const D d;
  const size_t N = hn::Lanes(d);
  const size_t un = static_cast<size_t>(n);
  const V inv_n = hn::Set(d, 1.f / static_cast<float>(n));
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ldx;     // [n]
    const float* dyr = dy + r * lddy;  // [n]
    float* dxr = dx + r * lddx;        // [n]
    const V vmu = hn::Set(d, mean[r]), vrs = hn::Set(d, rstd[r]);
    V sum_g = hn::Zero(d), sum_gx = hn::Zero(d);
    for (size_t i = 0; i < un; i += N) {
      const size_t c = std::min(N, un - i);
      const V vdy = LoadPart(d, dyr + i, c);
      const V xhat = hn::Mul(hn::Sub(LoadPart(d, xr + i, c), vmu), vrs);
      const V g = hn::Mul(vdy, LoadPart(d, gamma + i, c));
      sum_g = hn::Add(sum_g, g);
      sum_gx = hn::MulAdd(g, xhat, sum_gx);
      if (pg) StorePart(d, hn::MulAdd(vdy, xhat, LoadPart(d, pg + i, c)), pg + i, c);
      if (pb) StorePart(d, hn::Add(vdy, LoadPart(d, pb + i, c)), pb + i, c);
    }
    const V a = hn::Mul(hn::SumOfLanes(d, sum_g), inv_n);
    const V b = hn::Mul(hn::SumOfLanes(d, sum_gx), inv_n);
    // dx = rstd * (g - (a + xhat * b)). In place over dy or x is safe: element i is read first.
    for (size_t i = 0; i < un; i += N) {
      const size_t c = std::min(N, un - i);
      const V xhat = hn::Mul(hn::Sub(LoadPart(d, xr + i, c), vmu), vrs);
      const V g = hn::Mul(LoadPart(d, dyr + i, c), LoadPart(d, gamma + i, c));
      Output(d, hn::Mul(vrs, hn::Sub(g, hn::MulAdd(xhat, b, a))), dxr + i, c, accumulate);
    }
  }
}

void SoftmaxBackwardRows(const float* p, int64_t ldp, const float* dp, int64_t lddp, float* dx,
                         int64_t lddx, int64_t rows, int64_t n, bool accumulate) {
  const D d;
  const size_t N = hn::Lanes(d);
  const size_t un = static_cast<size_t>(n);
  for (int64_t r = 0; r < rows; ++r) {
    const float* pr = p + r * ldp;     // [n]
    const float* dpr = dp + r * lddp;  // [n]
    float* dxr = dx + r * lddx;        // [n]
    // Four accumulators: FMA latency (~4 cycles) x two FMA ports.
    V a0 = hn::Zero(d), a1 = hn::Zero(d), a2 = hn::Zero(d), a3 = hn::Zero(d);
    size_t i = 0;
    for (; i + 4 * N <= un; i += 4 * N) {
      a0 = hn::MulAdd(hn::LoadU(d, pr + i), hn::LoadU(d, dpr + i), a0);
      a1 = hn::MulAdd(hn::LoadU(d, pr + i + N), hn::LoadU(d, dpr + i + N), a1);
      a2 = hn::MulAdd(hn::LoadU(d, pr + i + 2 * N), hn::LoadU(d, dpr + i + 2 * N), a2);
      a3 = hn::MulAdd(hn::LoadU(d, pr + i + 3 * N), hn::LoadU(d, dpr + i + 3 * N), a3);
    }
    for (; i < un; i += N) {
      const size_t c = std::min(N, un - i);
      a0 = hn::MulAdd(LoadPart(d, pr + i, c), LoadPart(d, dpr + i, c), a0);
    }
    const V dot = hn::SumOfLanes(d, hn::Add(hn::Add(a0, a1), hn::Add(a2, a3)));
    for (i = 0; i < un; i += N) {
      const size_t c = std::min(N, un - i);
      const V v = hn::Mul(LoadPart(d, pr + i, c), hn::Sub(LoadPart(d, dpr + i, c), dot));
      Output(d, v, dxr + i, c, accumulate);
    }
  }
}

// Attention probabilities from the saved log-sum-exp, per row r of S ([rows, n], logits scaled,
// biases not yet added): s = exp((s + mb) + pb[r] - lse[r]) (the forward's bias order; mb [n] and
// pb rows [n] optional), one pass. A row with lse = -inf (all logits -inf) becomes 0. A row whose
// sum is off 1 by more than kLseRenorm is divided by its sum: lse rounded to float drops log(sum)
// when the logits are huge, e.g. a fully masked row (every logit -1e9, uniform P) has
// lse = -1e9 + log(n) = -1e9 in float. S16 (bf16 products, else nullptr; ld as S) receives the
// bf16 rounding of the result as well.
constexpr float kLseRenorm = 1e-5f;
void ProbsFromLseRows(float* S, int64_t ld, int64_t rows, int64_t n, const float* mb,
                      const float* pb, int64_t ldpb, const float* lse, uint16_t* S16) {
  const D d;
  const size_t N = hn::Lanes(d);
  const size_t un = static_cast<size_t>(n);
  for (int64_t r = 0; r < rows; ++r) {
    float* sr = S + r * ld;                          // [n]
    const float* pr = pb ? pb + r * ldpb : nullptr;  // [n]
    uint16_t* hr = S16 ? S16 + r * ld : nullptr;     // [n]
    if (lse[r] == -std::numeric_limits<float>::infinity()) {
      std::fill(sr, sr + un, 0.f);
      if (hr) std::fill(hr, hr + un, uint16_t{0});
      continue;
    }
    const V vl = hn::Set(d, lse[r]);
    V acc = hn::Zero(d);
    for (size_t i = 0; i < un; i += N) {
      const size_t c = std::min(N, un - i);
      V x = LoadPart(d, sr + i, c);
      if (mb) x = hn::Add(x, LoadPart(d, mb + i, c));
      if (pr) x = hn::Add(x, LoadPart(d, pr + i, c));
      // Tail lanes (zero on load) become lse, so that exp sees 0, and are then masked out.
      const auto valid = hn::FirstN(d, c);
      const V e = hn::IfThenElseZero(valid, hn::Exp(d, hn::Sub(hn::IfThenElse(valid, x, vl), vl)));
      acc = hn::Add(acc, e);
      StorePart(d, e, sr + i, c);
      if (hr) hwy_util::StoreBf16Part(d, e, hr + i, c);
    }
    const float sum = hn::GetLane(hn::SumOfLanes(d, acc));
    if (std::abs(sum - 1.f) > kLseRenorm && sum > 0.f) {
      const V inv = hn::Set(d, 1.f / sum);
      for (size_t i = 0; i < un; i += N) {
        const size_t c = std::min(N, un - i);
        const V e = hn::Mul(LoadPart(d, sr + i, c), inv);
        StorePart(d, e, sr + i, c);
        if (hr) hwy_util::StoreBf16Part(d, e, hr + i, c);
      }
    }
  }
}

// Softmax backward with the row dot products given, dS = p * (dp - dot[r]) per row r
// (dot[r] = rowsum(dp * p) = rowsum(dO * O) for attention): into p in place when ds16 is nullptr;
// else (bf16 products) dS is not stored in f32 but as its bf16 rounding in ds16 (ld as p; the dQ,
// dK products' input) and added into dpb (ld as p; d_pair_bias; nullptr skips it) in the same
// pass: the values of the f32 form followed by f32_to_bf16 and add_inplace.
void SoftmaxBackwardGivenDotRows(float* p, int64_t ldp, const float* dp, int64_t lddp,
                                 const float* dot, int64_t rows, int64_t n, uint16_t* ds16,
                                 float* dpb) {
  const D d;
  const size_t N = hn::Lanes(d);
  const size_t un = static_cast<size_t>(n);
  for (int64_t r = 0; r < rows; ++r) {
    float* pr = p + r * ldp;                            // [n]
    const float* dpr = dp + r * lddp;                   // [n]
    uint16_t* hr = ds16 ? ds16 + r * ldp : nullptr;     // [n]
    float* br = ds16 && dpb ? dpb + r * ldp : nullptr;  // [n]
    const V vd = hn::Set(d, dot[r]);
    for (size_t i = 0; i < un; i += N) {
      const size_t c = std::min(N, un - i);
      const V ds = hn::Mul(LoadPart(d, pr + i, c), hn::Sub(LoadPart(d, dpr + i, c), vd));
      if (!hr) {
        StorePart(d, ds, pr + i, c);
        continue;
      }
      hwy_util::StoreBf16Part(d, ds, hr + i, c);
      if (br) StorePart(d, hn::Add(LoadPart(d, br + i, c), ds), br + i, c);
    }
  }
}

// The elementwise kernels below treat contiguous operands (every ld == n) as one long row.

void SigmoidMulBackwardRows(const float* a, int64_t lda, const float* g, int64_t ldg,
                            const float* dy, int64_t lddy, float* da, int64_t ldda, float* dg,
                            int64_t lddg, int64_t rows, int64_t n, bool accumulate) {
  if (lda == n && ldg == n && lddy == n && (!da || ldda == n) && (!dg || lddg == n))
    n *= std::exchange(rows, 1);
  const D d;
  const size_t N = hn::Lanes(d);
  const size_t un = static_cast<size_t>(n);
  for (int64_t r = 0; r < rows; ++r)
    for (size_t i = 0; i < un; i += N) {
      const size_t c = std::min(N, un - i);
      const V vdy = LoadPart(d, dy + r * lddy + i, c);
      const V va = LoadPart(d, a + r * lda + i, c);
      V s, ds;
      SigmoidAndSlope(d, LoadPart(d, g + r * ldg + i, c), s, ds);
      // Every input is loaded before anything is stored: da, dg may alias the inputs.
      if (da) Output(d, hn::Mul(vdy, s), da + r * ldda + i, c, accumulate);
      if (dg) Output(d, hn::Mul(hn::Mul(vdy, va), ds), dg + r * lddg + i, c, accumulate);
    }
}

void ReluBackwardRows(const float* x, int64_t ldx, const float* dy, int64_t lddy, float* dx,
                      int64_t lddx, int64_t rows, int64_t n, bool accumulate) {
  if (ldx == n && lddy == n && lddx == n) n *= std::exchange(rows, 1);
  const D d;
  const size_t N = hn::Lanes(d);
  const size_t un = static_cast<size_t>(n);
  for (int64_t r = 0; r < rows; ++r)
    for (size_t i = 0; i < un; i += N) {
      const size_t c = std::min(N, un - i);
      const auto pos = hn::Gt(LoadPart(d, x + r * ldx + i, c), hn::Zero(d));
      Output(d, hn::IfThenElseZero(pos, LoadPart(d, dy + r * lddy + i, c)), dx + r * lddx + i, c,
             accumulate);
    }
}

// ReluBackwardRows with x given as bf16 bits (widened exactly before the comparison).
void ReluBackwardBf16Rows(const uint16_t* x, int64_t ldx, const float* dy, int64_t lddy, float* dx,
                          int64_t lddx, int64_t rows, int64_t n, bool accumulate) {
  if (ldx == n && lddy == n && lddx == n) n *= std::exchange(rows, 1);
  const D d;
  const hn::RebindToUnsigned<D> du;
  const hn::Rebind<uint16_t, D> dh;
  const size_t N = hn::Lanes(d);
  const size_t un = static_cast<size_t>(n);
  for (int64_t r = 0; r < rows; ++r)
    for (size_t i = 0; i < un; i += N) {
      const size_t c = std::min(N, un - i);
      const V xv = hn::BitCast(
          d, hn::ShiftLeft<16>(hn::PromoteTo(du, LoadPart(dh, x + r * ldx + i, c, uint16_t{0}))));
      const auto pos = hn::Gt(xv, hn::Zero(d));
      Output(d, hn::IfThenElseZero(pos, LoadPart(d, dy + r * lddy + i, c)), dx + r * lddx + i, c,
             accumulate);
    }
}

}  // namespace HWY_NAMESPACE
}  // namespace fc::kern
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace fc::kern {

HWY_EXPORT(LayerNormBackwardRows);
HWY_EXPORT(SoftmaxBackwardRows);
HWY_EXPORT(SigmoidMulBackwardRows);
HWY_EXPORT(ReluBackwardRows);
HWY_EXPORT(ReluBackwardBf16Rows);
HWY_EXPORT(ProbsFromLseRows);
HWY_EXPORT(SoftmaxBackwardGivenDotRows);

namespace {
// Below this many elements a fork/join (~1-2 us) costs more than it saves.
constexpr int64_t kParallelMinElems = int64_t{1} << 15;

// Calls f(r0, r1) on disjoint row blocks covering [0, rows): one block per thread for large
// matrices, a single block on the calling thread otherwise or inside a parallel region. (Same
// policy as elementwise_hwy.cc; rows are independent, so the split never changes results.)
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

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// sums[j] += sum over rows of y[r, j], in double. Columns go in chunks of kColChunk, one chunk per
// task, rows in order within a chunk: the result does not depend on the thread count.
constexpr int64_t kColChunk = 64;
void column_sums(const float* y, int64_t ld, int64_t rows, int64_t n, float* sums) {
  const int64_t chunks = ceil_div(n, kColChunk);
  const bool par = chunks > 1 && rows * n >= kParallelMinElems && !omp_in_parallel();
#pragma omp parallel for schedule(static) if (par)
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const int64_t c0 = ch * kColChunk, w = std::min(kColChunk, n - c0);
    double acc[kColChunk] = {};
    for (int64_t r = 0; r < rows; ++r) {
      const float* yr = y + r * ld + c0;  // [w]
      for (int64_t j = 0; j < w; ++j) acc[j] += yr[j];
    }
    for (int64_t j = 0; j < w; ++j) sums[c0 + j] = static_cast<float>(sums[c0 + j] + acc[j]);
  }
}

// Row blocks of layernorm_backward: large enough that the partial slots are < 1% of x, small
// enough to give every thread several blocks at Evoformer shapes (s*r or r*r rows).
constexpr int64_t kLnRowBlock = 256;
}  // namespace

// ---- linear ------------------------------------------------------------------------------------

void linear_backward(const float* x, int64_t ldx, int64_t rows, int64_t in, const float* W,
                     int64_t out, const float* dy, int64_t lddy, float* dx, int64_t lddx, float* dW,
                     float* db, bool accumulate) {
  // dx[rows, in] = dy[rows, out] @ W[out, in]
  if (dx) gemm(false, false, rows, in, out, 1.f, dy, lddy, W, in, accumulate ? 1.f : 0.f, dx, lddx);
  // dW[out, in] += dy^T[out, rows] @ x[rows, in]
  if (dW) gemm(true, false, out, in, rows, 1.f, dy, lddy, x, ldx, 1.f, dW, in);
  if (db) column_sums(dy, lddy, rows, out, db);
}

// ---- layernorm ---------------------------------------------------------------------------------

int64_t layernorm_backward_scratch_floats(int64_t rows, int64_t n) {
  return ceil_div(std::max<int64_t>(rows, 0), kLnRowBlock) * 2 * n;
}

void layernorm_backward(const float* x, int64_t ldx, const float* dy, int64_t lddy, int64_t rows,
                        int64_t n, const float* gamma, const float* mean, const float* rstd,
                        float* dx, int64_t lddx, float* dgamma, float* dbeta, float* scratch,
                        bool accumulate) {
  if (rows <= 0 || n <= 0) return;
  const bool params = dgamma != nullptr || dbeta != nullptr;
  FC_CHECK(!params || scratch != nullptr);
  const int64_t blocks = ceil_div(rows, kLnRowBlock);
  const bool par = blocks > 1 && rows * n >= kParallelMinElems && !omp_in_parallel();
#pragma omp parallel for schedule(static) if (par)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t r0 = blk * kLnRowBlock, r1 = std::min(rows, r0 + kLnRowBlock);
    float* pg = params ? scratch + blk * 2 * n : nullptr;  // [2, n]: dgamma | dbeta partials
    if (pg) std::fill(pg, pg + 2 * n, 0.f);
    HWY_DYNAMIC_DISPATCH(LayerNormBackwardRows)
    (x + r0 * ldx, ldx, dy + r0 * lddy, lddy, r1 - r0, n, gamma, mean + r0, rstd + r0,
     dx + r0 * lddx, lddx, accumulate, dgamma ? pg : nullptr, dbeta ? pg + n : nullptr);
  }
  if (!params) return;
  // Blocks in order, in double: fixed and independent of the thread count.
  for (int64_t i = 0; i < n; ++i) {
    double sg = 0, sb = 0;
    for (int64_t blk = 0; blk < blocks; ++blk) {
      sg += scratch[blk * 2 * n + i];
      sb += scratch[blk * 2 * n + n + i];
    }
    if (dgamma) dgamma[i] = static_cast<float>(dgamma[i] + sg);
    if (dbeta) dbeta[i] = static_cast<float>(dbeta[i] + sb);
  }
}

// ---- row-wise and elementwise ------------------------------------------------------------------

void softmax_backward(const float* p, int64_t ldp, const float* dp, int64_t lddp, float* dx,
                      int64_t lddx, int64_t rows, int64_t n, bool accumulate) {
  for_row_blocks(rows, n, [&](int64_t r0, int64_t r1) {
    HWY_DYNAMIC_DISPATCH(SoftmaxBackwardRows)
    (p + r0 * ldp, ldp, dp + r0 * lddp, lddp, dx + r0 * lddx, lddx, r1 - r0, n, accumulate);
  });
}

void sigmoid_mul_backward(const float* a, int64_t lda, const float* g, int64_t ldg, const float* dy,
                          int64_t lddy, float* da, int64_t ldda, float* dg, int64_t lddg,
                          int64_t rows, int64_t n, bool accumulate) {
  if (!da && !dg) return;
  for_row_blocks(rows, n, [&](int64_t r0, int64_t r1) {
    HWY_DYNAMIC_DISPATCH(SigmoidMulBackwardRows)
    (a + r0 * lda, lda, g + r0 * ldg, ldg, dy + r0 * lddy, lddy, da ? da + r0 * ldda : nullptr,
     ldda, dg ? dg + r0 * lddg : nullptr, lddg, r1 - r0, n, accumulate);
  });
}

void relu_backward(const float* x, int64_t ldx, const float* dy, int64_t lddy, float* dx,
                   int64_t lddx, int64_t rows, int64_t n, bool accumulate) {
  for_row_blocks(rows, n, [&](int64_t r0, int64_t r1) {
    HWY_DYNAMIC_DISPATCH(ReluBackwardRows)
    (x + r0 * ldx, ldx, dy + r0 * lddy, lddy, dx + r0 * lddx, lddx, r1 - r0, n, accumulate);
  });
}

void relu_backward(const uint16_t* x, int64_t ldx, const float* dy, int64_t lddy, float* dx,
                   int64_t lddx, int64_t rows, int64_t n, bool accumulate) {
  for_row_blocks(rows, n, [&](int64_t r0, int64_t r1) {
    HWY_DYNAMIC_DISPATCH(ReluBackwardBf16Rows)
    (x + r0 * ldx, ldx, dy + r0 * lddy, lddy, dx + r0 * lddx, lddx, r1 - r0, n, accumulate);
  });
}

// ---- attention ---------------------------------------------------------------------------------

namespace {
// Queries per tile, as in the forward: the [tile, Lk] blocks stay in L2 between the products.
constexpr int64_t kQueryTile = 64;
// Every scratch buffer starts on a 64-byte multiple from the slot start, and slots are multiples
// of 64 bytes, so all threads see the same alignment (and GEMM code paths) for the same item.
constexpr int64_t kAlignFloats = 16;

// Schedules (see backward.h): no d_pair_bias: (b, h) items, dynamic; kHeads: heads as tasks, each
// running its batch elements in order; kRanges: contiguous ranges of (b, h) items in head-major
// order, one per thread, with a partial-sum slot for a range that starts inside a head.
enum class Schedule { kItems, kHeads, kRanges };

Schedule schedule(const AttentionArgs& a, int threads, bool pair_grad) {
  if (!pair_grad) return Schedule::kItems;
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(threads, a.B * a.H));
  return a.H % nt == 0 || a.H >= 4 * nt ? Schedule::kHeads : Schedule::kRanges;
}

// kRanges: thread t of nt runs items [range_begin(items, t, nt), range_begin(items, t + 1, nt)).
int64_t range_begin(int64_t items, int t, int nt) { return items * t / nt; }

// Offsets (in floats) of one thread's buffers:
//   K, V, dK, dV [Lk, C] | Q, dO, O [qt, C] (O doubles as the dQ tile) | dP [qt, Lk] |
//   S [qt, Lk]: logits -> P -> dS of the current tile | Dr [qt] rowsum(dO * O) (lse path) |
//   slot [Lq, Lk] (kRanges only) | BF16 only, bf16 elements in float slots: K16, V16 [Lk, C],
//   Q16, dO16 [qt, C], P16 [qt, Lk] (the products' inputs rounded to bf16).
struct BwdLayout {
  int64_t qt, K, V, dK, dV, Q, dO, O, dP, S, Dr, slot, K16, V16, Q16, dO16, P16, total;
};

BwdLayout bwd_layout(const AttentionArgs& a, Schedule sched) {
  BwdLayout L{};
  L.qt = std::min(a.Lq, kQueryTile);
  int64_t off = 0;
  auto take = [&off](int64_t floats) {
    const int64_t at = off;
    off += ceil_div(floats, kAlignFloats) * kAlignFloats;
    return at;
  };
  L.K = take(a.Lk * a.C);
  L.V = take(a.Lk * a.C);
  L.dK = take(a.Lk * a.C);
  L.dV = take(a.Lk * a.C);
  L.Q = take(L.qt * a.C);
  L.dO = take(L.qt * a.C);
  L.O = take(L.qt * a.C);
  L.dP = take(L.qt * a.Lk);
  L.S = take(L.qt * a.Lk);
  L.Dr = take(L.qt);
  L.slot = take(sched == Schedule::kRanges ? a.Lq * a.Lk : 0);
  const bool bf = a.dtype == DType::BF16;
  auto take16 = [&](int64_t elems) { return take(bf ? ceil_div(elems, 2) : 0); };
  L.K16 = take16(a.Lk * a.C);
  L.V16 = take16(a.Lk * a.C);
  L.Q16 = take16(L.qt * a.C);
  L.dO16 = take16(L.qt * a.C);
  L.P16 = take16(L.qt * a.Lk);
  L.total = off;
  return L;
}

// Dense [rows, C] <-> strided rows. Dense operands keep GEMM loads off power-of-two strides (a
// 4 KiB row stride maps every row to the same L1 sets).
void pack(const float* src, int64_t ld, int64_t rows, int64_t C, float* dst) {
  for (int64_t i = 0; i < rows; ++i) std::memcpy(dst + i * C, src + i * ld, C * sizeof(float));
}
void unpack(const float* src, int64_t rows, int64_t C, float* dst, int64_t ld) {
  for (int64_t i = 0; i < rows; ++i) std::memcpy(dst + i * ld, src + i * C, C * sizeof(float));
}

// One (b, h) item on the calling thread; dS is added into dpb [Lq, Lk] (d_pair_bias[h] or a
// slot) unless dpb is nullptr.
void attention_backward_item(const AttentionArgs& a, const AttentionGrads& g, int64_t b, int64_t h,
                             const BwdLayout& L, float* dpb, float* ws) {
  const int64_t Lq = a.Lq, Lk = a.Lk, C = a.C;
  float* K = ws + L.K;    // [Lk, C]
  float* V = ws + L.V;    // [Lk, C]
  float* dK = ws + L.dK;  // [Lk, C]
  float* dV = ws + L.dV;  // [Lk, C]
  float* Q = ws + L.Q;    // [qt, C]
  float* dO = ws + L.dO;  // [qt, C]
  float* O = ws + L.O;    // [qt, C]
  float* dP = ws + L.dP;  // [qt, Lk]
  float* Dr = ws + L.Dr;  // [qt]
  // BF16: every product takes bf16 inputs (f32 accumulation): the f32 operand X is rounded into
  // X16 just before its products, and mm(X, ...) picks X16 when the path is bf16.
  const bool bf = a.dtype == DType::BF16;
  auto b16 = [&](int64_t off) { return reinterpret_cast<uint16_t*>(ws + off); };
  uint16_t* K16 = b16(L.K16);    // [Lk, C]
  uint16_t* V16 = b16(L.V16);    // [Lk, C]
  uint16_t* Q16 = b16(L.Q16);    // [qt, C]
  uint16_t* dO16 = b16(L.dO16);  // [qt, C]
  uint16_t* P16 = b16(L.P16);    // [qt, Lk]
  auto to16 = [&](const float* x, uint16_t* x16, int64_t n) {
    if (bf) f32_to_bf16(x, x16, n);
  };
  auto mm = [&](bool ta, bool tb, int64_t M, int64_t N, int64_t Kd, float alpha, const float* A,
                const uint16_t* A16, int64_t lda, const float* B, const uint16_t* B16, int64_t ldb,
                float beta, float* Cm, int64_t ldc) {
    if (bf)
      gemm_typed(DType::BF16, ta, tb, M, N, Kd, alpha, A16, lda, B16, ldb, beta, Cm, ldc);
    else
      gemm(ta, tb, M, N, Kd, alpha, A, lda, B, ldb, beta, Cm, ldc);
  };
  // Logits with a q.k term; else bias only (no K, Q, dq, dk).
  // BF16 packs K, V and Q straight from the strided q|k|v|g rows to K16, V16, Q16 (the f32 copies
  // are not read there).
  const bool qk = !a.bias_logits;
  auto pack_in = [&](const float* src, int64_t ld, int64_t rows, float* dst, uint16_t* dst16) {
    if (bf)
      f32_to_bf16_rows(src, ld, dst16, C, rows, C);
    else
      pack(src, ld, rows, C, dst);
  };
  if (qk) pack_in(a.k + b * a.k_bs + h * C, a.k_rs, Lk, K, K16);
  pack_in(a.v + b * a.v_bs + h * C, a.v_rs, Lk, V, V16);
  std::fill(dK, dK + Lk * C, 0.f);
  std::fill(dV, dV + Lk * C, 0.f);
  const float* mb = a.mask_bias ? a.mask_bias + b * Lk : nullptr;   // [Lk]
  const float* lse = g.lse ? g.lse + (b * a.H + h) * Lq : nullptr;  // [Lq]
  float* dq = qk ? g.dq : nullptr;
  float* dk = qk ? g.dk : nullptr;
  const bool need_ds = dq || dk || dpb;
  for (int64_t i0 = 0; i0 < Lq; i0 += L.qt) {
    const int64_t n = std::min(L.qt, Lq - i0);
    float* P = ws + L.S;  // [n, Lk]
    // Recompute P: in one pass from the saved lse, else with a full softmax as the forward
    // reference does.
    if (qk) {
      pack_in(a.q + b * a.q_bs + i0 * a.q_rs + h * C, a.q_rs, n, Q, Q16);
      mm(false, true, n, Lk, C, a.scale, Q, Q16, C, K, K16, C, 0.f, P, Lk);
    } else {
      std::fill(P, P + n * Lk, 0.f);
    }
    const float* pb = a.pair_bias ? a.pair_bias + (h * Lq + i0) * Lk : nullptr;  // [n, Lk]
    if (lse) {  // P16 written with P
      HWY_DYNAMIC_DISPATCH(ProbsFromLseRows)
      (P, Lk, n, Lk, mb, pb, Lk, lse + i0, bf ? P16 : nullptr);
    } else {
      if (mb) add_bias_rows(P, Lk, mb, n, Lk);
      if (pb) add_inplace(P, Lk, pb, Lk, n, Lk);
      softmax_rows(P, Lk, n, Lk);
      to16(P, P16, n * Lk);
    }
    // Gating: dO = d_out * sigmoid(gate), dgate from O = P V recomputed.
    const float* dout = g.d_out + b * a.o_bs + i0 * a.o_rs + h * C;
    if (a.gate) {
      mm(false, false, n, C, Lk, 1.f, P, P16, Lk, V, V16, C, 0.f, O, C);
      const int64_t go = b * a.g_bs + i0 * a.g_rs + h * C;
      sigmoid_mul_backward(O, C, a.gate + go, a.g_rs, dout, a.o_rs, dO, C,
                           g.dgate ? g.dgate + go : nullptr, a.g_rs, n, C);
      if (lse)  // rowsum(dP * P) = rowsum(dO * O): C terms instead of Lk
        for (int64_t i = 0; i < n; ++i) {
          float acc = 0.f;
          for (int64_t c = 0; c < C; ++c) acc += dO[i * C + c] * O[i * C + c];
          Dr[i] = acc;
        }
    } else {
      pack(dout, a.o_rs, n, C, dO);
    }
    to16(dO, dO16, n * C);
    if (g.dv) mm(true, false, Lk, C, n, 1.f, P, P16, Lk, dO, dO16, C, 1.f, dV, C);  // dV += P^T dO
    if (!need_ds) continue;
    mm(false, true, n, Lk, C, 1.f, dO, dO16, C, V, V16, C, 0.f, dP, Lk);  // dP = dO V^T
    // dS: BF16 with the lse and a gate writes only P16 <- bf16(dS) and adds dS into dpb in the
    // same pass; otherwise P <- dS (f32), then its rounding and the dpb add.
    const bool ds_fused = bf && lse && a.gate;
    if (ds_fused) {
      HWY_DYNAMIC_DISPATCH(SoftmaxBackwardGivenDotRows)
      (P, Lk, dP, Lk, Dr, n, Lk, P16, dpb ? dpb + i0 * Lk : nullptr);
    } else {
      if (lse && a.gate)
        HWY_DYNAMIC_DISPATCH(SoftmaxBackwardGivenDotRows)
        (P, Lk, dP, Lk, Dr, n, Lk, nullptr, nullptr);
      else
        softmax_backward(P, Lk, dP, Lk, P, Lk, n, Lk);
      to16(P, P16, n * Lk);
    }
    if (dq) {  // dQ = scale dS K
      mm(false, false, n, C, Lk, a.scale, P, P16, Lk, K, K16, C, 0.f, O, C);
      unpack(O, n, C, dq + b * a.q_bs + i0 * a.q_rs + h * C, a.q_rs);
    }
    if (dk)  // dK += scale dS^T Q
      mm(true, false, Lk, C, n, a.scale, P, P16, Lk, Q, Q16, C, 1.f, dK, C);
    if (dpb && !ds_fused) add_inplace(dpb + i0 * Lk, Lk, P, Lk, n, Lk);
  }
  if (dk) unpack(dK, Lk, C, dk + b * a.k_bs + h * C, a.k_rs);
  if (g.dv) unpack(dV, Lk, C, g.dv + b * a.v_bs + h * C, a.v_rs);
}
}  // namespace

int64_t attention_backward_scratch_floats(const AttentionArgs& a, int threads,
                                          bool pair_bias_grad) {
  const Schedule sched = schedule(a, threads, pair_bias_grad);
  return static_cast<int64_t>(std::max(threads, 1)) * bwd_layout(a, sched).total;
}

void attention_backward(const AttentionArgs& a, const AttentionGrads& g, float* scratch,
                        int threads) {
  const int64_t items = a.B * a.H;
  if (items == 0 || a.C == 0) return;
  FC_CHECK(g.d_out != nullptr);
  FC_CHECK(a.Lq == 0 || a.Lk > 0);
  const Schedule sched = schedule(a, threads, g.d_pair_bias != nullptr);
  const BwdLayout L = bwd_layout(a, sched);
  const int64_t head = a.Lq * a.Lk;
  const int64_t tasks = sched == Schedule::kHeads ? a.H : items;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, tasks)));
#pragma omp parallel num_threads(nt)
  {
    // Nested kernels (GEMM, row kernels) run on this thread also when nt == 1, where the region is
    // inactive and they would otherwise go parallel: per-item results then never depend on the
    // thread count. This sets the ICV of this region's implicit task only.
    omp_set_num_threads(1);
    const int t = omp_get_thread_num(), team = omp_get_num_threads();
    float* ws = scratch + static_cast<int64_t>(t) * L.total;
    if (sched == Schedule::kItems) {
#pragma omp for schedule(dynamic, 1)
      for (int64_t it = 0; it < items; ++it)
        attention_backward_item(a, g, it % a.B, it / a.B, L, nullptr, ws);
    } else if (sched == Schedule::kHeads) {
      // The thread owns d_pair_bias[h] and adds the batch elements in order.
#pragma omp for schedule(dynamic, 1)
      for (int64_t h = 0; h < a.H; ++h)
        for (int64_t b = 0; b < a.B; ++b)
          attention_backward_item(a, g, b, h, L, g.d_pair_bias + h * head, ws);
    } else {
      // A head whose b = 0 lies in this range is added straight into d_pair_bias, by this range
      // alone, in b order; later ranges reaching into it start mid-way. A range that starts
      // mid-way (b > 0) sums that first head into its slot instead; the slots are added after all
      // ranges, in thread order, so the result depends on the ranges, i.e. on the thread count.
      const int64_t i0 = range_begin(items, t, team), i1 = range_begin(items, t + 1, team);
      float* slot = ws + L.slot;  // [Lq, Lk]
      const bool mid = i0 < i1 && i0 % a.B != 0;
      if (mid) std::fill(slot, slot + head, 0.f);
      for (int64_t it = i0; it < i1; ++it) {
        const int64_t h = it / a.B, b = it % a.B;
        float* dpb = mid && h == i0 / a.B ? slot : g.d_pair_bias + h * head;
        attention_backward_item(a, g, b, h, L, dpb, ws);
      }
#pragma omp barrier
      const int64_t tiles = a.Lq == 0 ? 0 : ceil_div(a.Lq, L.qt);
#pragma omp for schedule(static)
      for (int64_t task = 0; task < a.H * tiles; ++task) {  // (head, query tile)
        const int64_t h = task / tiles, r0 = task % tiles * L.qt;
        const int64_t rows = std::min(L.qt, a.Lq - r0);
        for (int u = 0; u < team; ++u) {
          const int64_t u0 = range_begin(items, u, team), u1 = range_begin(items, u + 1, team);
          if (u0 < u1 && u0 % a.B != 0 && u0 / a.B == h)
            add_inplace(g.d_pair_bias + h * head + r0 * a.Lk, a.Lk,
                        scratch + u * L.total + L.slot + r0 * a.Lk, a.Lk, rows, a.Lk);
        }
      }
    }
  }
}

}  // namespace fc::kern
#endif  // HWY_ONCE
