// Helpers shared by the benchmark programs: the load average and medians printed beside timings.
#pragma once

#include <algorithm>
#include <fstream>
#include <string>
#include <vector>

namespace fc::bench {

// The three load averages of /proc/loadavg, as printed beside every timing.
inline std::string loadavg() {
  std::ifstream f("/proc/loadavg");
  std::string a, b, c;
  f >> a >> b >> c;
  return a + " " + b + " " + c;
}

inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

}  // namespace fc::bench
