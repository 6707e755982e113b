// One AF2-dims Evoformer block forward: unfused fp32, fused fp32 and fused with bf16 GEMM inputs
// (ForwardOptions::fused, ::dtype), per module and per block, in one process: the modes take turns
// (order rotated every round) so machine load hits all alike; the table reports the minimum and
// the median over the rounds and the ratios of the minima.
// Usage: fused_bench [s] [r] [rounds]   (default 128 256 5); prints /proc/loadavg before and after.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "core/rng.h"
#include "foldcube/model.h"
#include "foldcube/runtime.h"

namespace {
using Clock = std::chrono::steady_clock;

std::string loadavg() {
  std::ifstream f("/proc/loadavg");
  std::string a, b, c;
  f >> a >> b >> c;
  return a + " " + b + " " + c;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}
}  // namespace

int main(int argc, char** argv) {
  const int64_t s = argc > 1 ? std::atoll(argv[1]) : 128, r = argc > 2 ? std::atoll(argv[2]) : 256;
  const int rounds = argc > 3 ? std::atoi(argv[3]) : 5;
  fc::EvoformerConfig cfg;  // AF2 model_1 dims
  cfg.no_blocks = 1;
  const fc::EvoformerStack stack = fc::EvoformerStack::random(cfg, 1);
  fc::Tensor m0 = fc::Tensor::empty({s, r, cfg.c_m}), z0 = fc::Tensor::empty({r, r, cfg.c_z});
  for (int64_t i = 0; i < m0.numel(); ++i) m0.f32()[i] = fc::uniform_pm1(2, i);
  for (int64_t i = 0; i < z0.numel(); ++i) z0.f32()[i] = fc::uniform_pm1(3, i);
  std::printf(
      "fused_bench: one Evoformer block, AF2 dims, s=%lld r=%lld, %d thread(s), %d rounds\n",
      static_cast<long long>(s), static_cast<long long>(r), fc::num_threads(), rounds);
  std::printf("load average before: %s\n", loadavg().c_str());

  // Modes: unfused fp32, fused fp32, fused with bf16 GEMM inputs.
  constexpr int kModes = 3;
  const char* names[kModes] = {"unfused fp32", "fused fp32", "fused bf16"};
  std::vector<std::string> order;                            // modules in run order
  std::map<std::string, std::vector<double>> times[kModes];  // [mode][module] ms per round
  std::vector<double> block[kModes];
  for (int round = 0; round < rounds + 1; ++round) {  // round 0: warm-up
    for (int k = 0; k < kModes; ++k) {
      const int mode = (round + k) % kModes;  // rotate the order every round
      fc::ForwardOptions opts;
      opts.fused = mode != 0;
      opts.dtype = mode == 2 ? fc::DType::BF16 : fc::DType::F32;
      Clock::time_point mark;
      opts.trace = [&](int, const std::string& module, const std::string&, const fc::Tensor&) {
        const auto now = Clock::now();
        if (round > 0)
          times[mode][module].push_back(
              std::chrono::duration<double, std::milli>(now - mark).count());
        if (round == 1 && mode == 0) order.push_back(module);
        mark = now;
      };
      fc::Tensor m = m0.clone(), z = z0.clone();
      const auto t0 = Clock::now();
      mark = t0;
      if (!stack.forward(m, z, fc::Tensor(), fc::Tensor(), nullptr, opts).ok()) return 1;
      if (round > 0)
        block[mode].push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
    }
  }
  std::printf(
      "\nminimum (median) ms over the rounds\n\n| module | %s | %s | %s | fused/unfused | "
      "bf16/fp32 fused | bf16 fused/unfused |\n|---|---|---|---|---|---|---|\n",
      names[0], names[1], names[2]);
  auto row = [&](const std::string& name, const std::vector<double>* v) {
    double mn[kModes], md[kModes];
    for (int k = 0; k < kModes; ++k) {
      mn[k] = *std::min_element(v[k].begin(), v[k].end());
      md[k] = median(v[k]);
    }
    std::printf("| %s | %.1f (%.1f) | %.1f (%.1f) | %.1f (%.1f) | %.3f | %.3f | %.3f |\n",
                name.c_str(), mn[0], md[0], mn[1], md[1], mn[2], md[2], mn[1] / mn[0],
                mn[2] / mn[1], mn[2] / mn[0]);
  };
  for (const std::string& mod : order) {
    const std::vector<double> v[kModes] = {times[0][mod], times[1][mod], times[2][mod]};
    row(mod, v);
  }
  row("block", block);
  std::printf("\nload average after: %s\n", loadavg().c_str());
  return 0;
}
