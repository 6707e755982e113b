// Strict integer fields of untrusted plan / profile JSON. nlohmann's get<int>() on a float value
// converts with a static_cast, which is undefined behaviour out of range (a fuzzing finding:
// "memory_bytes": 2.5e132); these accept a JSON integer, or an integral float, within T's range,
// and throw std::out_of_range naming the key otherwise (the callers turn exceptions into Status).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>

namespace fc {

template <typename T>
T json_int(const nlohmann::json& v, const char* key) {
  constexpr T lo = std::numeric_limits<T>::min(), hi = std::numeric_limits<T>::max();
  const std::string bad = std::string("'") + key + "' must be an integer in [" +
                          std::to_string(lo) + ", " + std::to_string(hi) + "]";
  if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    if (u > static_cast<uint64_t>(hi)) throw std::out_of_range(bad);
    return static_cast<T>(u);
  }
  if (v.is_number_integer()) {
    const int64_t i = v.get<int64_t>();
    if (i < static_cast<int64_t>(lo) || i > static_cast<int64_t>(hi)) throw std::out_of_range(bad);
    return static_cast<T>(i);
  }
  if (v.is_number_float()) {
    const double d = v.get<double>();
    // hi + 1 is a power of two, exact in double; lo is -(hi + 1).
    if (!(d >= static_cast<double>(lo) && d < -static_cast<double>(lo)) || d != std::trunc(d))
      throw std::out_of_range(bad);
    return static_cast<T>(d);
  }
  throw std::out_of_range(bad);
}

// The field `key` of object j, or def when absent.
template <typename T>
T json_int(const nlohmann::json& j, const char* key, T def) {
  const auto it = j.find(key);
  return it == j.end() ? def : json_int<T>(*it, key);
}

}  // namespace fc
