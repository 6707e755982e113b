// Per-target Highway helpers shared by the SIMD kernels (elementwise_hwy.cc, backward.cc,
// attention.cc, convert_hwy.cc). Include after hwy/highway.h from a file that foreach_target.h
// re-includes per target; the guard toggles per target, as Highway's -inl.h convention requires.
#if defined(FC_KERNELS_HWY_UTIL_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef FC_KERNELS_HWY_UTIL_INL_H_
#undef FC_KERNELS_HWY_UTIL_INL_H_
#else
#define FC_KERNELS_HWY_UTIL_INL_H_
#endif

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace fc::kern {
namespace HWY_NAMESPACE {
namespace hwy_util {
namespace hn = hwy::HWY_NAMESPACE;

// Loads count <= Lanes elements, the other lanes set to fill. A partial vector goes through a
// stack copy, so no load touches memory past the row and tails see the same vector arithmetic
// as the body.
template <class D>
HWY_INLINE hn::Vec<D> LoadPart(D d, const hn::TFromD<D>* p, size_t count, hn::TFromD<D> fill = 0) {
  if (count == hn::Lanes(d)) return hn::LoadU(d, p);
  HWY_ALIGN hn::TFromD<D> buf[HWY_MAX_BYTES / sizeof(hn::TFromD<D>)];
  for (size_t i = 0; i < hn::Lanes(d); ++i) buf[i] = i < count ? p[i] : fill;
  return hn::Load(d, buf);
}

// Stores the first count <= Lanes lanes of v; never writes past p + count.
template <class D>
HWY_INLINE void StorePart(D d, hn::Vec<D> v, hn::TFromD<D>* p, size_t count) {
  if (count == hn::Lanes(d)) return hn::StoreU(v, d, p);
  HWY_ALIGN hn::TFromD<D> buf[HWY_MAX_BYTES / sizeof(hn::TFromD<D>)];
  hn::Store(v, d, buf);
  for (size_t i = 0; i < count; ++i) p[i] = buf[i];
}

// u32 lanes holding f32 bits -> u32 lanes holding bf16 bits in their low half (round to nearest
// even; NaN stays a quiet NaN). The one rounding of every SIMD bf16 conversion (convert_hwy.cc,
// attention.cc), so all targets round alike.
template <class DU>
HWY_INLINE hn::Vec<DU> Bf16Bits(DU du, hn::Vec<DU> u) {
  const hn::RebindToSigned<DU> di;
  const auto lsb = hn::And(hn::ShiftRight<16>(u), hn::Set(du, 1));
  const auto rounded = hn::ShiftRight<16>(hn::Add(hn::Add(u, hn::Set(du, 0x7FFF)), lsb));
  const auto mag = hn::And(u, hn::Set(du, 0x7FFFFFFF));
  const auto nan = hn::RebindMask(du, hn::Gt(hn::BitCast(di, mag), hn::Set(di, 0x7F800000)));
  return hn::IfThenElse(nan, hn::Or(hn::ShiftRight<16>(u), hn::Set(du, 0x40)), rounded);
}

// Stores the bf16 rounding (Bf16Bits) of the first count <= Lanes lanes of the f32 vector v to p;
// never writes past p + count.
template <class D>
HWY_INLINE void StoreBf16Part(D d, hn::Vec<D> v, uint16_t* p, size_t count) {
  const hn::RebindToUnsigned<D> du;
  const hn::RebindToSigned<D> di;
  const hn::Rebind<uint16_t, D> dh;
  const auto h = hn::DemoteTo(dh, hn::BitCast(di, Bf16Bits(du, hn::BitCast(du, v))));
  if (count == hn::Lanes(d)) return hn::StoreU(h, dh, p);
  HWY_ALIGN uint16_t buf[HWY_MAX_BYTES / sizeof(float)];
  hn::Store(h, dh, buf);
  std::copy_n(buf, count, p);
}

// Runs store(i, count, op(load(i, count))) over n elements in vectors of f32 lanes: full vectors
// from memory, the tail (count < Lanes) zero-padded so it sees the same lane arithmetic.
template <class Load, class Store, class Op>
HWY_INLINE void Convert(size_t n, Load load, Store store, Op op) {
  const size_t N = hn::Lanes(hn::ScalableTag<float>());
  size_t i = 0;
  for (; i + N <= n; i += N) store(i, N, op(load(i, N)));
  if (i < n) store(i, n - i, op(load(i, n - i)));
}

// count (<= one vector) f32 values from src + i as u32 lanes; a partial vector zero-padded.
HWY_INLINE hn::Vec<hn::ScalableTag<uint32_t>> LoadF32Bits(const float* src, size_t i,
                                                          size_t count) {
  const hn::ScalableTag<float> d;
  const hn::RebindToUnsigned<decltype(d)> du;
  if (count == hn::Lanes(d)) return hn::BitCast(du, hn::LoadU(d, src + i));
  HWY_ALIGN float buf[HWY_MAX_BYTES / sizeof(float)] = {};
  std::copy_n(src + i, count, buf);
  return hn::BitCast(du, hn::Load(d, buf));
}

// dst[i] = the low 16 bits of op(f32 bits of src[i]) for i < n: op maps u32 lanes of f32 bits to
// u32 lanes whose values fit in 16 bits (Bf16Bits, an f16 rounding). Never reads past src + n
// nor writes past dst + n. The one narrowing loop of kern::f32_to_bf16 / f32_to_f16 and the
// attention kernel's bf16 packing.
template <class Op>
HWY_INLINE void NarrowRows(const float* src, uint16_t* dst, size_t n, Op op) {
  const hn::ScalableTag<float> d;
  const hn::RebindToSigned<decltype(d)> di;
  const hn::Rebind<uint16_t, decltype(d)> dh;
  Convert(
      n, [&](size_t i, size_t count) { return LoadF32Bits(src, i, count); },
      [&](size_t i, size_t count, hn::Vec<hn::ScalableTag<uint32_t>> r) {
        const auto h = hn::DemoteTo(dh, hn::BitCast(di, r));  // values fit in 16 bits
        if (count == hn::Lanes(d)) return hn::StoreU(h, dh, dst + i);
        HWY_ALIGN uint16_t buf[HWY_MAX_BYTES / sizeof(float)];
        hn::Store(h, dh, buf);
        std::copy_n(buf, count, dst + i);
      },
      op);
}

}  // namespace hwy_util
}  // namespace HWY_NAMESPACE
}  // namespace fc::kern
HWY_AFTER_NAMESPACE();

#endif  // FC_KERNELS_HWY_UTIL_INL_H_
