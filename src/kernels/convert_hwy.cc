// f32 <-> bf16 / f16 conversions with Highway (contracts in convert.h). Integer lane arithmetic
// only (plus one exact float add / subtract for f16 subnormals), so every x86 target, with or
// without F16C, rounds the same way; Highway 1.0's own bf16 demotion truncates.
#include <omp.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "kernels/convert.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/convert_hwy.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
// Per-target headers: must come after foreach_target.h, which re-includes this file per target.
#include "hwy/highway.h"
#include "kernels/hwy_util-inl.h"

HWY_BEFORE_NAMESPACE();
namespace fc::kern {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
using hwy_util::Convert;
using hwy_util::LoadF32Bits;
using hwy_util::NarrowRows;

using D = hn::ScalableTag<float>;
using DU = hn::RebindToUnsigned<D>;  // u32 lanes
using DI = hn::RebindToSigned<D>;    // i32 lanes
using DH = hn::Rebind<uint16_t, D>;  // u16, same lane count
using VU = hn::Vec<DU>;

// u32 lanes holding f32 bits -> u32 lanes holding bf16 bits (hwy_util-inl.h).
HWY_INLINE VU Bf16Bits(VU u) { return hwy_util::Bf16Bits(DU(), u); }

// u32 lanes holding f32 bits -> u32 lanes holding f16 bits (round to nearest even).
HWY_INLINE VU F16Bits(VU u) {
  const D d;
  const DU du;
  const DI di;
  const VU sign = hn::And(u, hn::Set(du, 0x80000000u));
  const VU a = hn::Xor(u, sign);  // |x|
  const auto ai = hn::BitCast(di, a);
  // >= 65536 (or Inf, NaN): Inf, or a quiet NaN with the top payload bits.
  const auto is_nan = hn::RebindMask(du, hn::Gt(ai, hn::Set(di, 0x7F800000)));
  const VU nan = hn::Or(hn::Set(du, 0x7E00), hn::And(hn::ShiftRight<13>(a), hn::Set(du, 0x3FF)));
  const VU big = hn::IfThenElse(is_nan, nan, hn::Set(du, 0x7C00));
  // Below 2^-14 (f16 subnormals and zero): adding 0.5f aligns the f16 ulp 2^-24 with the f32 ulp,
  // and the float add rounds to nearest even; the result's low bits are the f16 mantissa.
  const VU sub = hn::Sub(hn::BitCast(du, hn::Add(hn::BitCast(d, a), hn::Set(d, 0.5f))),
                         hn::Set(du, 0x3F000000));
  // Normal: rebias the exponent and round the 13 dropped bits to nearest even.
  const VU odd = hn::And(hn::ShiftRight<13>(a), hn::Set(du, 1));
  const VU normal = hn::ShiftRight<13>(
      hn::Add(hn::Add(a, hn::Set(du, 0xC8000FFFu)), odd));  // (15-127)<<23 + 0xFFF
  const auto is_big = hn::RebindMask(du, hn::Gt(ai, hn::Set(di, 0x477FFFFF)));
  const auto is_sub = hn::RebindMask(du, hn::Lt(ai, hn::Set(di, 0x38800000)));
  const VU mag = hn::IfThenElse(is_big, big, hn::IfThenElse(is_sub, sub, normal));
  return hn::Or(mag, hn::ShiftRight<16>(sign));
}

// u32 lanes holding f16 bits -> u32 lanes holding f32 bits (exact; NaN quiet, payload kept).
HWY_INLINE VU F16ToF32Bits(VU h) {
  const D d;
  const DU du;
  const VU shifted_exp = hn::Set(du, 0x7C00u << 13);
  VU o = hn::ShiftLeft<13>(hn::And(h, hn::Set(du, 0x7FFF)));
  const VU exp = hn::And(o, shifted_exp);
  o = hn::Add(o, hn::Set(du, (127u - 15u) << 23));
  const auto infnan = hn::Eq(exp, shifted_exp);
  const VU special = hn::Add(o, hn::Set(du, (128u - 16u) << 23));
  const auto nan = hn::And(infnan, hn::Ne(hn::And(h, hn::Set(du, 0x3FF)), hn::Zero(du)));
  const VU special_q = hn::IfThenElse(nan, hn::Or(special, hn::Set(du, 0x00400000)), special);
  // Zero / subnormal: 2^-14 (1 + m/1024) - 2^-14, exact.
  const VU sub = hn::BitCast(
      du, hn::Sub(hn::BitCast(d, hn::Add(o, hn::Set(du, 1u << 23))), hn::Set(d, 6.103515625e-05f)));
  o = hn::IfThenElse(infnan, special_q, hn::IfThenElse(hn::Eq(exp, hn::Zero(du)), sub, o));
  return hn::Or(o, hn::ShiftLeft<16>(hn::And(h, hn::Set(du, 0x8000))));
}

// Stores the first count u32 lanes of r, as f32 bits, to dst + i.
HWY_INLINE void StoreF32Bits(VU r, float* dst, size_t i, size_t count) {
  const D d;
  const auto f = hn::BitCast(d, r);
  if (count == hn::Lanes(d)) return hn::StoreU(f, d, dst + i);
  HWY_ALIGN float buf[HWY_MAX_BYTES / sizeof(float)];
  hn::Store(f, d, buf);
  std::copy_n(buf, count, dst + i);
}

template <class Op>
HWY_INLINE void WidenRows(const uint16_t* src, float* dst, size_t n, Op op) {
  const D d;
  const DU du;
  const DH dh;
  Convert(
      n,
      [&](size_t i, size_t count) {
        if (count == hn::Lanes(d)) return hn::PromoteTo(du, hn::LoadU(dh, src + i));
        HWY_ALIGN uint16_t buf[HWY_MAX_BYTES / sizeof(float)] = {};
        std::copy_n(src + i, count, buf);
        return hn::PromoteTo(du, hn::Load(dh, buf));
      },
      [&](size_t i, size_t count, VU r) { StoreF32Bits(r, dst, i, count); }, op);
}

void F32ToBf16(const float* src, uint16_t* dst, size_t n) { NarrowRows(src, dst, n, Bf16Bits); }
void F32ToBf16Rows(const float* src, size_t lds, uint16_t* dst, size_t ldd, size_t rows, size_t n) {
  for (size_t r = 0; r < rows; ++r) NarrowRows(src + r * lds, dst + r * ldd, n, Bf16Bits);
}
void F32ToF16(const float* src, uint16_t* dst, size_t n) { NarrowRows(src, dst, n, F16Bits); }
void Bf16ToF32(const uint16_t* src, float* dst, size_t n) {
  WidenRows(src, dst, n, [](VU h) { return hn::ShiftLeft<16>(h); });
}
void F16ToF32(const uint16_t* src, float* dst, size_t n) { WidenRows(src, dst, n, F16ToF32Bits); }

// dst = bf16(src) widened back: the low 16 bits of the rounded pattern cleared (src == dst
// allowed).
void RoundToBf16(const float* src, float* dst, size_t n) {
  Convert(
      n, [&](size_t i, size_t count) { return LoadF32Bits(src, i, count); },
      [&](size_t i, size_t count, VU r) { StoreF32Bits(r, dst, i, count); },
      [](VU u) { return hn::ShiftLeft<16>(Bf16Bits(u)); });
}

}  // namespace HWY_NAMESPACE
}  // namespace fc::kern
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace fc::kern {

HWY_EXPORT(F32ToBf16);
HWY_EXPORT(F32ToBf16Rows);
HWY_EXPORT(F32ToF16);
HWY_EXPORT(Bf16ToF32);
HWY_EXPORT(F16ToF32);
HWY_EXPORT(RoundToBf16);

namespace {
// Calls f(begin, end) on pieces of [0, n): one per OpenMP thread for large n (a conversion moves
// 6 bytes per element; below ~1 MiB a single thread is faster than waking the others).
template <class F>
void for_pieces(int64_t n, F f) {
  constexpr int64_t kSerial = int64_t{1} << 18;
  if (n <= kSerial || omp_in_parallel()) {
    if (n > 0) f(0, n);
    return;
  }
  const int64_t pieces = std::min<int64_t>(omp_get_max_threads(), n / (kSerial / 4));
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < pieces; ++p) f(n * p / pieces, n * (p + 1) / pieces);
}
}  // namespace

void f32_to_bf16(const float* src, uint16_t* dst, int64_t n) {
  for_pieces(n, [&](int64_t a, int64_t b) {
    HWY_DYNAMIC_DISPATCH(F32ToBf16)(src + a, dst + a, static_cast<size_t>(b - a));
  });
}
void f32_to_bf16_rows(const float* src, int64_t lds, uint16_t* dst, int64_t ldd, int64_t rows,
                      int64_t n) {
  if (rows <= 0 || n <= 0) return;
  for_pieces(rows * n, [&](int64_t a, int64_t b) {
    // Rows [a/n, b/n): adjacent pieces share a boundary, so each row falls in exactly one.
    const int64_t r0 = a / n, r1 = b / n;
    HWY_DYNAMIC_DISPATCH(F32ToBf16Rows)
    (src + r0 * lds, static_cast<size_t>(lds), dst + r0 * ldd, static_cast<size_t>(ldd),
     static_cast<size_t>(r1 - r0), static_cast<size_t>(n));
  });
}
void bf16_to_f32(const uint16_t* src, float* dst, int64_t n) {
  for_pieces(n, [&](int64_t a, int64_t b) {
    HWY_DYNAMIC_DISPATCH(Bf16ToF32)(src + a, dst + a, static_cast<size_t>(b - a));
  });
}
void f32_to_f16(const float* src, uint16_t* dst, int64_t n) {
  for_pieces(n, [&](int64_t a, int64_t b) {
    HWY_DYNAMIC_DISPATCH(F32ToF16)(src + a, dst + a, static_cast<size_t>(b - a));
  });
}
void f16_to_f32(const uint16_t* src, float* dst, int64_t n) {
  for_pieces(n, [&](int64_t a, int64_t b) {
    HWY_DYNAMIC_DISPATCH(F16ToF32)(src + a, dst + a, static_cast<size_t>(b - a));
  });
}
void round_to_bf16(const float* src, float* dst, int64_t n) {
  for_pieces(n, [&](int64_t a, int64_t b) {
    HWY_DYNAMIC_DISPATCH(RoundToBf16)(src + a, dst + a, static_cast<size_t>(b - a));
  });
}

}  // namespace fc::kern
#endif  // HWY_ONCE
