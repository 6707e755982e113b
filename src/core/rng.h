// Small deterministic counter-based RNG (splitmix64): value i of stream `seed` is a pure function
// of (seed, i), so results do not depend on thread count or call order.
#pragma once

#include <cstdint>

namespace fc {

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Uniform in [-1, 1).
inline float uniform_pm1(uint64_t seed, uint64_t i) {
  const uint64_t bits =
      splitmix64(splitmix64(seed) ^ (i * 0xd1b54a32d192ed03ull)) >> 40;  // 24 bits
  return static_cast<float>(bits) * (2.0f / 16777216.0f) - 1.0f;
}

}  // namespace fc
