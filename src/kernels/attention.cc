// Gated multi-head attention with additive biases (see kernels.h for the contract).
// Flash-style, with an online softmax, in Highway SIMD (compiled per x86 target, chosen at run
// time with HWY_DYNAMIC_DISPATCH, like elementwise_hwy.cc). Work item = (batch, head): K is packed
// transposed in 32-key panels and V densely; queries go in tiles of kQueryTile, each in register
// blocks of kRowBlock rows that sweep the keys in tiles of kKeyTile:
//   S = scale Q K^T + mask bias + pair bias (register-blocked FMAs; row max on the way)
//   -> P = exp(S - m'), row sums -> l = l exp(m - m') + sum P, O = O exp(m - m') + P V;
// after the last key tile o = O / l * sigmoid(gate) is written and lse = m + log(l). Per-thread
// scratch holds the packed K, V and small tiles: never [H, Lq, Lk] logits nor a [tile, Lk] block.
// The tile products are our own register-blocked kernels rather than kern::gemm (oneDNN): with
// the bias add, max and rescale fused they measured equal or faster at Evoformer shapes, and avoid
// thousands of small GEMM calls per item (bench/attention_compare_bench.cc).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "foldcube/status.h"
#include "kernels/attention_bf16.h"
#include "kernels/convert.h"
#include "kernels/kernels.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/attention.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
// Per-target headers: must come after foreach_target.h, which re-includes this file per target.
#include "hwy/cache_control.h"
#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"
#include "kernels/hwy_util-inl.h"

#ifndef FC_KERNELS_ATTENTION_LAYOUT_
#define FC_KERNELS_ATTENTION_LAYOUT_
namespace fc::kern {
namespace {
// Tile sizes, chosen by measurement (bench/attention_compare_bench.cc; key tiles of 128 and 512
// measured within noise of 256, and key tiles outside the row blocks 20-35% slower): Q is packed
// 64 rows at a time; a register block of 8 query rows (8 x 2 accumulator vectors) sweeps key
// tiles of 256, so at L <= 256 there is one key tile (no rescale) and at L = 2048 eight; its
// [8, 256] logit tile (8 KiB) stays in L1.
constexpr int64_t kQueryTile = 64;
constexpr int64_t kKeyTile = 256;
constexpr int64_t kRowBlock = 8;
// Every buffer starts on a 64-byte multiple from the slot start, and slots are multiples of 64
// bytes, so all threads see the same alignment (results do not depend on the thread count).
constexpr int64_t kAlignFloats = 16;
// Keys per panel of the packed K^T: two vectors of the widest target (AVX-512).
constexpr int64_t kPanel = 32;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Offsets (in floats) of one thread's buffers. Channels are padded to Cp = round_up(C, 16) and
// keys to round_up(Lk, 32) with zeros, so every inner loop runs on whole vectors (up to 16 lanes);
// K is packed transposed in panels of kPanel keys, KT [Lk / kPanel, C, kPanel]: the logits of a
// row block read one contiguous 4 KiB panel (at C = 32) per 32 keys, sequentially (a plain
// [C, Lk] transpose has a 1-8 KiB stride between the channels; at Lk = 2048 all 32 rows fall on one
// L1 set, measured about 15% slower there).
//   KT [ldk / kPanel, C, kPanel] (K transposed in panels) | V [Lk, Cp] | Q [tq, C] | O [tq, Cp] | S
//   [kRowBlock, ldS] (logits, then P, of one key tile) | m, l [tq] (running row max and sum) |
//   Kd [kPanel, C] (one panel of keys, dense, on its way into KT).
struct Layout {
  int64_t tq, tk, ldS, Cp, ldk, KT, V, Q, O, S, m, l, Kd, total;
};

Layout layout(const AttentionArgs& a) {
  Layout L{};
  L.tq = std::min(a.Lq, kQueryTile);
  L.tk = std::min(a.Lk, kKeyTile);
  L.ldS = round_up(L.tk, 2 * kAlignFloats);
  L.Cp = round_up(a.C, kAlignFloats);
  L.ldk = round_up(a.Lk, kPanel);
  int64_t off = 0;
  auto take = [&off](int64_t floats) {
    const int64_t at = off;
    off += round_up(floats, kAlignFloats);
    return at;
  };
  L.KT = take(a.C * L.ldk);
  L.V = take(a.Lk * L.Cp);
  L.Q = take(L.tq * a.C);
  L.O = take(L.tq * L.Cp);
  L.S = take(kRowBlock * L.ldS);
  L.m = take(L.tq);
  L.l = take(L.tq);
  L.Kd = take(kPanel * a.C);
  L.total = off;
  return L;
}
}  // namespace
}  // namespace fc::kern
#endif  // FC_KERNELS_ATTENTION_LAYOUT_

HWY_BEFORE_NAMESPACE();
namespace fc::kern {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

using D = hn::ScalableTag<float>;
using V = hn::Vec<D>;
using hwy_util::LoadPart;
using hwy_util::StorePart;

namespace {
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Horizontal max through memory, not MaxOfLanes: on EMU128 that starts from -FLT_MAX, which would
// turn an all -inf row into a finite max.
HWY_INLINE float MaxLane(D d, V v) {
  HWY_ALIGN float buf[HWY_MAX_BYTES / sizeof(float)];
  hn::Store(v, d, buf);
  return *std::max_element(buf, buf + hn::Lanes(d));
}

// sigmoid(x) = 1/(1+e) for x >= 0 and e/(1+e) for x < 0, e = exp(-|x|) (as in elementwise_hwy.cc).
HWY_INLINE V Sigmoid(D d, V x) {
  const auto nan = hn::IsNaN(x);
  const V e = hn::Exp(d, hn::Neg(hn::IfThenZeroElse(nan, hn::Abs(x))));
  const V r = hn::Div(hn::Set(d, 1.f), hn::Add(hn::Set(d, 1.f), e));
  const V s = hn::IfThenElse(hn::Lt(x, hn::Zero(d)), hn::Mul(e, r), r);
  return hn::IfThenElse(nan, x, s);
}

// exp(x) for x <= 0 on the bf16 path, whose probabilities are rounded to bf16 (2^-9 relative)
// right after: 2^n 2^f with n = round(x log2 e) and a degree-4 polynomial for 2^f on [-1/2, 1/2]
// (relative error 2.7e-6, plus up to 5e-6 from rounding x log2 e), under half the instructions of
// hn::Exp. Below -86.5 (and -inf) gives 0 (exp < 3e-38 there); NaN stays NaN.
HWY_INLINE V ExpNonPositiveBf16(D d, V x) {
  const hn::RebindToSigned<D> di;
  const V t = hn::Mul(x, hn::Set(d, 1.44269504f));
  const V n = hn::Round(t);
  const V f = hn::Sub(t, n);
  V p = hn::MulAdd(hn::Set(d, 0.009570102f), f, hn::Set(d, 0.05591786f));
  p = hn::MulAdd(p, f, hn::Set(d, 0.24024744f));
  p = hn::MulAdd(p, f, hn::Set(d, 0.69312179f));
  p = hn::MulAdd(p, f, hn::Set(d, 0.99999928f));
  const auto scaled = hn::Add(hn::BitCast(di, p), hn::ShiftLeft<23>(hn::ConvertTo(di, n)));
  return hn::IfThenZeroElse(hn::Lt(x, hn::Set(d, -86.5f)), hn::BitCast(d, scaled));
}

template <bool kBf16>
HWY_INLINE V ExpShifted(D d, V x) {
  if constexpr (kBf16) return ExpNonPositiveBf16(d, x);
  return hn::Exp(d, x);
}

// s[j] = exp(s[j] - shift) for j < w (shift >= every s[j]); returns the sum. Exp of -inf (or
// below -104, -86.5 in bf16) is 0.
template <bool kBf16>
HWY_INLINE float ExpAndSum(D d, float* s, size_t w, float shift) {
  const size_t N = hn::Lanes(d);
  const V vs = hn::Set(d, shift);
  V a0 = hn::Zero(d), a1 = hn::Zero(d);
  size_t j = 0;
  for (; j + 2 * N <= w; j += 2 * N) {
    const V e0 = ExpShifted<kBf16>(d, hn::Sub(hn::LoadU(d, s + j), vs));
    const V e1 = ExpShifted<kBf16>(d, hn::Sub(hn::LoadU(d, s + j + N), vs));
    hn::StoreU(e0, d, s + j);
    hn::StoreU(e1, d, s + j + N);
    a0 = hn::Add(a0, e0);
    a1 = hn::Add(a1, e1);
  }
  for (; j < w; j += N) {
    const size_t c = std::min(N, w - j);
    const V e = ExpShifted<kBf16>(d, hn::Sub(LoadPart(d, s + j, c, kNegInf), vs));
    StorePart(d, e, s + j, c);
    a0 = hn::Add(a0, e);
  }
  return hn::GetLane(hn::SumOfLanes(d, hn::Add(a0, a1)));
}

// out[c] = x[c] * f (* sigmoid(g[c]) when g is non-null) for c < n.
HWY_INLINE void OutputRow(D d, const float* x, float f, const float* g, float* out, size_t n) {
  const size_t N = hn::Lanes(d);
  const V vf = hn::Set(d, f);
  for (size_t c = 0; c < n; c += N) {
    const size_t k = std::min(N, n - c);
    V y = hn::Mul(LoadPart(d, x + c, k, 0.f), vf);
    if (g) y = hn::Mul(y, Sigmoid(d, LoadPart(d, g + c, k, 0.f)));
    StorePart(d, y, out + c, k);
  }
}

// s = scale acc + mb + pb for R rows of 2N keys (acc0: the first N), lanes >= valid set to -inf;
// stored to S rows (ld ldS) and folded into the running row maxima mx[R].
template <int R, bool kMask, bool kPair>
HWY_INLINE void StoreLogits(D d, const V* acc0, const V* acc1, float scale, const float* mb,
                            const float* pb, int64_t ldpb, size_t valid, float* S, int64_t ldS,
                            V* mx) {
  const size_t N = hn::Lanes(d);
  const V vs = hn::Set(d, scale);
  const bool full = valid == 2 * N;
  const size_t c0 = std::min(valid, N), c1 = valid - c0;
  V b0 = hn::Zero(d), b1 = hn::Zero(d);
  if (kMask) {
    b0 = full ? hn::LoadU(d, mb) : LoadPart(d, mb, c0, 0.f);
    b1 = full ? hn::LoadU(d, mb + N) : LoadPart(d, mb + N, c1, 0.f);
  }
  const auto m0 = hn::FirstN(d, c0), m1 = hn::FirstN(d, c1);
  const V ninf = hn::Set(d, kNegInf);
  for (int r = 0; r < R; ++r) {
    V x0 = hn::Mul(acc0[r], vs), x1 = hn::Mul(acc1[r], vs);
    if (kMask) x0 = hn::Add(x0, b0), x1 = hn::Add(x1, b1);
    if (kPair) {
      const float* p = pb + r * ldpb;
      x0 = hn::Add(x0, full ? hn::LoadU(d, p) : LoadPart(d, p, c0, 0.f));
      x1 = hn::Add(x1, full ? hn::LoadU(d, p + N) : LoadPart(d, p + N, c1, 0.f));
    }
    if (!full) x0 = hn::IfThenElse(m0, x0, ninf), x1 = hn::IfThenElse(m1, x1, ninf);
    hn::StoreU(x0, d, S + r * ldS);
    hn::StoreU(x1, d, S + r * ldS + N);
    mx[r] = hn::Max(mx[r], hn::Max(x0, x1));
  }
}

// Logits of R query rows (Q [R, C] dense, ld C) against the 2N keys starting at KT (in a panel:
// channel c of key j at KT[c * kPanel + j]): s = scale q.k + mb + pb, lanes >= valid set to -inf;
// stored to S rows (ld ldS) and folded into the running row maxima mx[R].
template <int R, bool kMask, bool kPair>
HWY_INLINE void LogitsBlock(D d, const float* Q, int64_t C, const float* KT, float scale,
                            const float* mb, const float* pb, int64_t ldpb, size_t valid, float* S,
                            int64_t ldS, V* mx) {
  const size_t N = hn::Lanes(d);
  V acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) acc0[r] = hn::Zero(d), acc1[r] = hn::Zero(d);
  for (int64_t c = 0; c < C; ++c) {
    const V k0 = hn::LoadU(d, KT + c * kPanel), k1 = hn::LoadU(d, KT + c * kPanel + N);
    for (int r = 0; r < R; ++r) {
      const V q = hn::Set(d, Q[r * C + c]);
      acc0[r] = hn::MulAdd(q, k0, acc0[r]);
      acc1[r] = hn::MulAdd(q, k1, acc1[r]);
    }
  }
  StoreLogits<R, kMask, kPair>(d, acc0, acc1, scale, mb, pb, ldpb, valid, S, ldS, mx);
}

// Logits of R rows without a q.k term (AttentionArgs::bias_logits): s = mb + pb, as
// LogitsBlock with zero products.
template <int R, bool kMask, bool kPair>
HWY_INLINE void BiasOnlyBlock(D d, const float* mb, const float* pb, int64_t ldpb, size_t valid,
                              float* S, int64_t ldS, V* mx) {
  V zero[R];
  for (int r = 0; r < R; ++r) zero[r] = hn::Zero(d);
  StoreLogits<R, kMask, kPair>(d, zero, zero, 1.f, mb, pb, ldpb, valid, S, ldS, mx);
}

// BiasOnlyBlock over key tile [0, w) (mb, pb offset to the tile).
template <int R, bool kMask, bool kPair>
HWY_INLINE void BiasOnlyLogits(D d, const AttentionArgs& a, const Layout& L, const float* mb,
                               const float* pb, int64_t w, float* S, V* mx) {
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  for (int64_t j = 0; j < w; j += 2 * N)
    BiasOnlyBlock<R, kMask, kPair>(d, kMask ? mb + j : nullptr, kPair ? pb + j : nullptr, a.Lk,
                                   static_cast<size_t>(std::min(2 * N, w - j)), S + j, L.ldS, mx);
}

// Logits of R rows from the raw dot products already in S (the bf16 path's bf16dot::logits).
template <int R, bool kMask, bool kPair>
HWY_INLINE void BiasBlock(D d, float scale, const float* mb, const float* pb, int64_t ldpb,
                          size_t valid, float* S, int64_t ldS, V* mx) {
  const size_t N = hn::Lanes(d);
  V acc0[R], acc1[R];
  for (int r = 0; r < R; ++r)
    acc0[r] = hn::LoadU(d, S + r * ldS), acc1[r] = hn::LoadU(d, S + r * ldS + N);
  StoreLogits<R, kMask, kPair>(d, acc0, acc1, scale, mb, pb, ldpb, valid, S, ldS, mx);
}

// O rows [R, NV*N channels] = alpha[r] * O (or 0 when first) + P[R, w] V[w, NV*N channels].
template <int R, int NV>
HWY_INLINE void PvBlock(D d, const float* P, int64_t ldS, int64_t w, const float* Vp, int64_t Cp,
                        const float* alpha, bool first, float* O) {
  const size_t N = hn::Lanes(d);
  V acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v)
      acc[r][v] =
          first ? hn::Zero(d) : hn::Mul(hn::LoadU(d, O + r * Cp + v * N), hn::Set(d, alpha[r]));
  for (int64_t j = 0; j < w; ++j) {
    V vv[NV];
    for (int v = 0; v < NV; ++v) vv[v] = hn::LoadU(d, Vp + j * Cp + v * N);
    for (int r = 0; r < R; ++r) {
      const V p = hn::Set(d, P[r * ldS + j]);
      for (int v = 0; v < NV; ++v) acc[r][v] = hn::MulAdd(p, vv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) hn::StoreU(acc[r][v], d, O + r * Cp + v * N);
}

// Online softmax update of R rows after their logits of key tile [0, w) are in S: P = exp(S - m')
// in place, l = l exp(m - m') + sum P, m = m'; alpha[r] = exp(m - m'), the factor on O (0 when
// first).
template <int R, bool kBf16>
HWY_INLINE void SoftmaxUpdate(D d, const Layout& L, int64_t w, bool first, const V* mx, float* S,
                              float* m, float* l, float* alpha) {
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  const size_t wp = static_cast<size_t>(round_up(w, 2 * N));
  for (int r = 0; r < R; ++r) {
    const float m_new = first ? MaxLane(d, mx[r]) : std::max(m[r], MaxLane(d, mx[r]));
    // A row whose max is still -inf has only -inf logits: shift 0 keeps exp(-inf - 0) = 0
    // instead of NaN, and the row ends with l = 0 (output 0).
    const float shift = m_new == kNegInf ? 0.f : m_new;
    const float sum = ExpAndSum<kBf16>(d, S + r * L.ldS, wp, shift);  // lanes past w: exp(-inf) = 0
    alpha[r] = first ? 0.f : std::exp(m[r] - shift);                  // m[r] = -inf: 0
    l[r] = first ? sum : l[r] * alpha[r] + sum;
    m[r] = m_new;
  }
}

// Rows [0, R) of a query block against key tile [0, w) (pointers already offset): logits, online
// softmax update of m, l, and O.
template <int R, bool kMask, bool kPair>
HWY_INLINE void RowBlock(D d, const AttentionArgs& a, const Layout& L, const float* Q,
                         const float* KT, const float* Vp, const float* mb, const float* pb,
                         int64_t w, bool first, float* S, float* m, float* l, float* O) {
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  V mx[R];
  for (int r = 0; r < R; ++r) mx[r] = hn::Set(d, kNegInf);
  if (a.bias_logits) BiasOnlyLogits<R, kMask, kPair>(d, a, L, mb, pb, w, S, mx);
  for (int64_t j = 0; !a.bias_logits && j < w; j += 2 * N)
    LogitsBlock<R, kMask, kPair>(d, Q, a.C, KT + (j - j % kPanel) * a.C + j % kPanel, a.scale,
                                 kMask ? mb + j : nullptr, kPair ? pb + j : nullptr, a.Lk,
                                 static_cast<size_t>(std::min(2 * N, w - j)), S + j, L.ldS, mx);
  float alpha[R];
  SoftmaxUpdate<R, false>(d, L, w, first, mx, S, m, l, alpha);
  int64_t c = 0;
  for (; c + 2 * N <= L.Cp; c += 2 * N)
    PvBlock<R, 2>(d, S, L.ldS, w, Vp + c, L.Cp, alpha, first, O + c);
  for (; c < L.Cp; c += N) PvBlock<R, 1>(d, S, L.ldS, w, Vp + c, L.Cp, alpha, first, O + c);
}

// RowBlock with bf16 products (AttentionArgs::dtype BF16): Q32 [R, cq], KP [cq, ldk] and VP
// [Lk/2, Cp] as packed in AttentionItem (attention_bf16.h), pointers offset to the key tile.
template <int R, bool kMask, bool kPair>
HWY_INLINE void RowBlockBf16(D d, const AttentionArgs& a, const Layout& L, const uint32_t* Q32,
                             int64_t cq, const uint32_t* KP, const uint32_t* VP, const float* mb,
                             const float* pb, int64_t w, bool first, float* S, float* m, float* l,
                             float* O) {
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  if (!a.bias_logits) bf16dot::logits(Q32, cq, R, KP, L.ldk, w, S, L.ldS);
  V mx[R];
  for (int r = 0; r < R; ++r) mx[r] = hn::Set(d, kNegInf);
  if (a.bias_logits) BiasOnlyLogits<R, kMask, kPair>(d, a, L, mb, pb, w, S, mx);
  for (int64_t j = 0; !a.bias_logits && j < w; j += 2 * N)
    BiasBlock<R, kMask, kPair>(d, a.scale, kMask ? mb + j : nullptr, kPair ? pb + j : nullptr, a.Lk,
                               static_cast<size_t>(std::min(2 * N, w - j)), S + j, L.ldS, mx);
  float alpha[R];
  SoftmaxUpdate<R, true>(d, L, w, first, mx, S, m, l, alpha);
  bf16dot::probs_to_bf16(S, L.ldS, R, w);
  bf16dot::pv(S, L.ldS, R, w, VP, L.Cp, alpha, first, O);
}

// Query rows [0, n) of a tile against every key tile.
template <bool kMask, bool kPair, bool kBf16>
void QueryTile(D d, const AttentionArgs& a, const Layout& L, int64_t n, const float* Q,
               const float* KT, const float* Vp, const float* mb, const float* pb, float* S,
               float* m, float* l, float* O) {
  const int64_t C = a.C, Lk = a.Lk;
  // Row blocks outside, key tiles inside: each block streams its R pair-bias rows sequentially
  // (prefetch-friendly when [H, Lq, Lk] is far larger than the caches), while the packed K and V
  // stay in L2.
  auto block = [&](auto rows, int64_t r) {
    constexpr int R = decltype(rows)::value;
    for (int64_t j0 = 0; j0 < Lk; j0 += L.tk) {
      const float* mbt = kMask ? mb + j0 : nullptr;
      const float* pbt = kPair ? pb + r * Lk + j0 : nullptr;
      const int64_t w = std::min(L.tk, Lk - j0);
      if constexpr (kBf16) {  // the buffers hold the packed bf16 pairs (AttentionItem)
        const int64_t cq = (C + 1) / 2;
        RowBlockBf16<R, kMask, kPair>(d, a, L, reinterpret_cast<const uint32_t*>(Q) + r * cq, cq,
                                      reinterpret_cast<const uint32_t*>(KT) + j0,
                                      reinterpret_cast<const uint32_t*>(Vp) + j0 / 2 * L.Cp, mbt,
                                      pbt, w, j0 == 0, S, m + r, l + r, O + r * L.Cp);
      } else {
        RowBlock<R, kMask, kPair>(d, a, L, Q + r * C, KT + j0 * C, Vp + j0 * L.Cp, mbt, pbt, w,
                                  j0 == 0, S, m + r, l + r, O + r * L.Cp);
      }
    }
  };
  int64_t r = 0;
  for (; r + kRowBlock <= n; r += kRowBlock)
    block(std::integral_constant<int, static_cast<int>(kRowBlock)>(), r);
  for (; r + 4 <= n; r += 4) block(std::integral_constant<int, 4>(), r);
  for (; r < n; ++r) block(std::integral_constant<int, 1>(), r);
}

// QueryTile for the item's masks: with a mask bias, a pair bias, both or neither.
template <bool kBf16>
void QueryTileAny(D d, const AttentionArgs& a, const Layout& L, int64_t n, const float* Q,
                  const float* KT, const float* Vp, const float* mb, const float* pb, float* S,
                  float* m, float* l, float* O) {
  if (mb && pb)
    QueryTile<true, true, kBf16>(d, a, L, n, Q, KT, Vp, mb, pb, S, m, l, O);
  else if (mb)
    QueryTile<true, false, kBf16>(d, a, L, n, Q, KT, Vp, mb, pb, S, m, l, O);
  else if (pb)
    QueryTile<false, true, kBf16>(d, a, L, n, Q, KT, Vp, mb, pb, S, m, l, O);
  else
    QueryTile<false, false, kBf16>(d, a, L, n, Q, KT, Vp, mb, pb, S, m, l, O);
}

// Prefetches row j + kAhead of a strided matrix (rows of n floats, ld floats apart) when j + kAhead
// < rows. An item reads C channels of rows that sit 4 KiB apart in the models' q|k|v|g buffers, a
// page per row, which the hardware prefetchers do not follow: measured 20 % of the bf16 kernel's
// time stalled on these loads before.
constexpr int64_t kAhead = 8;
HWY_INLINE void PrefetchRow(const float* base, int64_t ld, int64_t j, int64_t rows, int64_t n) {
  if (j + kAhead >= rows) return;
  const float* p = base + (j + kAhead) * ld;
  for (int64_t c = 0; c < n; c += 16) hwy::Prefetch(p + c);
  hwy::Prefetch(p + n - 1);
}

// dst = the C floats of x rounded to bf16, in order (as uint16), then a zero upper half for an odd
// C: one row of pairs of attention_bf16.h. Inline per target: the packing runs once per key, value
// and query row of every item, too often for a dispatched call.
HWY_INLINE void RowToPairs(const float* x, int64_t C, uint32_t* dst) {
  const D d;
  const hn::RebindToUnsigned<D> du;
  const hn::RebindToSigned<D> di;
  const hn::Rebind<uint16_t, D> dh;
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  uint16_t* out = reinterpret_cast<uint16_t*>(dst);  // [2 * ceil(C/2)]
  for (int64_t c = 0; c < C; c += N) {
    const size_t k = static_cast<size_t>(std::min(N, C - c));
    const auto r = hwy_util::Bf16Bits(du, hn::BitCast(du, LoadPart(d, x + c, k, 0.f)));
    const auto h = hn::DemoteTo(dh, hn::BitCast(di, r));  // values fit in 16 bits
    if (k == hn::Lanes(d)) {
      hn::StoreU(h, dh, out + c);
    } else {
      HWY_ALIGN uint16_t buf[HWY_MAX_BYTES / sizeof(float)];
      hn::Store(h, dh, buf);
      std::copy_n(buf, k, out + c);
    }
  }
  if (C % 2) out[C] = 0;
}

// The item's K and V packed as bf16 pairs (attention_bf16.h) into the KT and V buffers: KP
// [cq, ldk] (keys past Lk zero), VP [ceil(Lk/2), Cp] (channels past C and a missing last key
// zero). tmp: cq uint32 (the Kd buffer).
void PackKvBf16(const AttentionArgs& a, int64_t b, int64_t h, const Layout& L, uint32_t* KP,
                uint32_t* VP, uint32_t* tmp) {
  const D d;
  const hn::RebindToUnsigned<D> du;
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  const int64_t Lk = a.Lk, C = a.C, cq = (C + 1) / 2;
  const float* k = a.bias_logits ? nullptr : a.k + b * a.k_bs + h * C;  // no keys: no KP
  for (int64_t j = 0; k && j < L.ldk; ++j) {
    PrefetchRow(k, a.k_rs, j, Lk, C);
    if (j < Lk) RowToPairs(k + j * a.k_rs, C, tmp);
    for (int64_t p = 0; p < cq; ++p) KP[p * L.ldk + j] = j < Lk ? tmp[p] : 0u;
  }
  // Pair (key 2q, key 2q + 1) of channel c: the bf16 bits of the first in the lower half. Cp is a
  // multiple of 16, so whole vectors on every target; channels past C load as 0.
  const float* v = a.v + b * a.v_bs + h * C;
  for (int64_t q = 0; q < (Lk + 1) / 2; ++q) {
    const float* lo = v + 2 * q * a.v_rs;
    const float* hi = 2 * q + 1 < Lk ? lo + a.v_rs : nullptr;
    PrefetchRow(v, a.v_rs, 2 * q, Lk, C);
    PrefetchRow(v, a.v_rs, 2 * q + 1, Lk, C);
    for (int64_t c = 0; c < L.Cp; c += N) {
      const size_t n = static_cast<size_t>(std::clamp<int64_t>(C - c, 0, N));
      const auto rl = hwy_util::Bf16Bits(du, hn::BitCast(du, LoadPart(d, lo + c, n, 0.f)));
      const auto rh =
          hi ? hwy_util::Bf16Bits(du, hn::BitCast(du, LoadPart(d, hi + c, n, 0.f))) : hn::Zero(du);
      hn::StoreU(hn::Or(rl, hn::ShiftLeft<16>(rh)), du, VP + q * L.Cp + c);
    }
  }
}
}  // namespace

// One (b, h) item on the calling thread, with the buffers of L in ws.
void AttentionItem(const AttentionArgs& a, int64_t b, int64_t h, const Layout& L, float* ws) {
  const D d;
  const int64_t Lq = a.Lq, Lk = a.Lk, C = a.C;
  float* KT = ws + L.KT;  // [ldk / kPanel, C, kPanel] zero-padded keys
  float* Vp = ws + L.V;   // [Lk, Cp] zero-padded channels
  float* Q = ws + L.Q;    // [tq, C]
  float* O = ws + L.O;    // [tq, Cp] unnormalised output rows
  float* S = ws + L.S;    // [kRowBlock, ldS] logits, then P, of one row block and key tile
  float* m = ws + L.m;    // [tq] running row max
  float* l = ws + L.l;    // [tq] running row sum of exp(logit - m)
  float* Kd = ws + L.Kd;  // [kPanel, C]
  const bool bf16 = a.dtype == DType::BF16;
  const int64_t cq = (C + 1) / 2;
  uint32_t* Q32 = reinterpret_cast<uint32_t*>(Q);  // bf16: [tq, cq] query pairs
  if (bf16)
    PackKvBf16(a, b, h, L, reinterpret_cast<uint32_t*>(KT), reinterpret_cast<uint32_t*>(Vp),
               reinterpret_cast<uint32_t*>(Kd));
  // Each panel's keys are copied densely (row by row, like the V rows), then transposed from L1.
  const float* k = a.bias_logits ? nullptr : a.k + b * a.k_bs + h * C;  // no keys: KT unused
  for (int64_t j0 = 0; !bf16 && k && j0 < L.ldk; j0 += kPanel) {
    const int64_t nj = std::min(kPanel, Lk - j0);
    for (int64_t j = 0; j < nj; ++j) {
      PrefetchRow(k, a.k_rs, j0 + j, Lk, C);
      std::memcpy(Kd + j * C, k + (j0 + j) * a.k_rs, C * sizeof(float));
    }
    std::fill(Kd + nj * C, Kd + kPanel * C, 0.f);
    float* kt = KT + j0 * C;  // [C, kPanel]
    for (int64_t c = 0; c < C; ++c)
      for (int64_t j = 0; j < kPanel; ++j) kt[c * kPanel + j] = Kd[j * C + c];
  }
  const float* v = a.v + b * a.v_bs + h * C;
  for (int64_t j = 0; !bf16 && j < Lk; ++j) {
    PrefetchRow(v, a.v_rs, j, Lk, C);
    std::memcpy(Vp + j * L.Cp, v + j * a.v_rs, C * sizeof(float));
    std::fill(Vp + j * L.Cp + C, Vp + (j + 1) * L.Cp, 0.f);
  }
  const float* mb = a.mask_bias ? a.mask_bias + b * Lk : nullptr;  // [Lk]
  for (int64_t i0 = 0; i0 < Lq; i0 += L.tq) {
    const int64_t n = std::min(L.tq, Lq - i0);
    const float* q = a.bias_logits ? nullptr : a.q + b * a.q_bs + i0 * a.q_rs + h * C;
    for (int64_t i = 0; q && i < n; ++i) {
      PrefetchRow(q, a.q_rs, i, n, C);
      if (bf16)
        RowToPairs(q + i * a.q_rs, C, Q32 + i * cq);
      else
        std::memcpy(Q + i * C, q + i * a.q_rs, C * sizeof(float));
    }
    const float* pb = a.pair_bias ? a.pair_bias + (h * Lq + i0) * Lk : nullptr;  // [n, Lk]
    if (bf16)
      QueryTileAny<true>(d, a, L, n, Q, KT, Vp, mb, pb, S, m, l, O);
    else
      QueryTileAny<false>(d, a, L, n, Q, KT, Vp, mb, pb, S, m, l, O);
    // The query tile was packed above, so o may alias q (in-place modules).
    float* o = a.o + b * a.o_bs + i0 * a.o_rs + h * C;
    const float* g = a.gate ? a.gate + b * a.g_bs + i0 * a.g_rs + h * C : nullptr;
    float* lse = a.lse ? a.lse + (b * a.H + h) * Lq + i0 : nullptr;  // [n]
    for (int64_t i = 0; i < n; ++i) {
      if (g) PrefetchRow(g, a.g_rs, i, n, C);
      PrefetchRow(o, a.o_rs, i, n, C);
      OutputRow(d, O + i * L.Cp, l[i] > 0.f ? 1.f / l[i] : 0.f, g ? g + i * a.g_rs : nullptr,
                o + i * a.o_rs, static_cast<size_t>(C));
      if (lse) lse[i] = l[i] > 0.f ? m[i] + std::log(l[i]) : kNegInf;
    }
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace fc::kern
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace fc::kern {

HWY_EXPORT(AttentionItem);

int64_t attention_scratch_floats(const AttentionArgs& a, int threads) {
  return static_cast<int64_t>(std::max(threads, 1)) * layout(a).total;
}

void attention(const AttentionArgs& a, float* scratch, int threads) {
  const int64_t items = a.B * a.H;
  if (items == 0 || a.Lq == 0) return;
  FC_CHECK(a.Lk > 0 && a.C > 0);
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, items)));
  const Layout L = layout(a);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t it = 0; it < items; ++it) HWY_DYNAMIC_DISPATCH(AttentionItem)
  (a, it / a.H, it % a.H, L, scratch + static_cast<int64_t>(omp_get_thread_num()) * L.total);
}

namespace ref {
void attention(const AttentionArgs& a, float* scratch) {
  float* logit = scratch;  // [Lk]
  // An input as the products see it: its bf16 rounding with BF16.
  auto in = [&](float x) -> double {
    if (a.dtype != DType::BF16) return x;
    uint16_t hb;
    ref::f32_to_bf16(&x, &hb, 1);
    float y;
    ref::bf16_to_f32(&hb, &y, 1);
    return y;
  };
  for (int64_t b = 0; b < a.B; ++b)
    for (int64_t h = 0; h < a.H; ++h)
      for (int64_t i = 0; i < a.Lq; ++i) {
        double mx = -INFINITY;
        for (int64_t j = 0; j < a.Lk; ++j) {
          double dot = 0.0;
          for (int64_t c = 0; !a.bias_logits && c < a.C; ++c)
            dot += in(a.q[b * a.q_bs + i * a.q_rs + h * a.C + c]) *
                   in(a.k[b * a.k_bs + j * a.k_rs + h * a.C + c]);
          float x = a.bias_logits ? 0.f : static_cast<float>(dot * a.scale);
          if (a.mask_bias) x += a.mask_bias[b * a.Lk + j];
          if (a.pair_bias) x += a.pair_bias[(h * a.Lq + i) * a.Lk + j];
          logit[j] = x;
          mx = std::max<double>(mx, x);
        }
        float* o = a.o + b * a.o_bs + i * a.o_rs + h * a.C;
        float* lse = a.lse ? a.lse + (b * a.H + h) * a.Lq + i : nullptr;
        if (mx == -INFINITY) {  // every logit -inf: zero output, lse -inf
          std::fill(o, o + a.C, 0.f);
          if (lse) *lse = -INFINITY;
          continue;
        }
        double sum = 0.0;
        for (int64_t j = 0; j < a.Lk; ++j) sum += std::exp(logit[j] - mx);
        if (lse) *lse = static_cast<float>(mx + std::log(sum));
        for (int64_t c = 0; c < a.C; ++c) {
          double acc = 0.0;
          for (int64_t j = 0; j < a.Lk; ++j)
            acc += std::exp(logit[j] - mx) / sum * in(a.v[b * a.v_bs + j * a.v_rs + h * a.C + c]);
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
#endif  // HWY_ONCE
