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

}  // namespace hwy_util
}  // namespace HWY_NAMESPACE
}  // namespace fc::kern
HWY_AFTER_NAMESPACE();

#endif  // FC_KERNELS_HWY_UTIL_INL_H_
