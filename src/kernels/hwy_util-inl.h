// Per-target Highway helpers shared by the SIMD kernels (elementwise_hwy.cc, backward.cc,
// attention.cc). Include after hwy/highway.h from a file that foreach_target.h re-includes per
// target; the guard toggles per target, as Highway's -inl.h convention requires.
#if defined(FC_KERNELS_HWY_UTIL_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef FC_KERNELS_HWY_UTIL_INL_H_
#undef FC_KERNELS_HWY_UTIL_INL_H_
#else
#define FC_KERNELS_HWY_UTIL_INL_H_
#endif

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

}  // namespace hwy_util
}  // namespace HWY_NAMESPACE
}  // namespace fc::kern
HWY_AFTER_NAMESPACE();

#endif  // FC_KERNELS_HWY_UTIL_INL_H_
