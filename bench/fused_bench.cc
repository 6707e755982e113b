// One AF2-dims Evoformer block forward, fused vs unfused (ForwardOptions::fused), per module and
// per block, in one process: the two modes alternate (ABBA order per round) so machine load hits
// both alike; the table reports the minimum and the median over the rounds and their ratio.
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

  std::vector<std::string> order;                       // modules in run order
  std::map<std::string, std::vector<double>> times[2];  // [mode][module] ms per round
  std::vector<double> block[2];
  for (int round = 0; round < rounds + 1; ++round) {  // round 0: warm-up
    for (int k = 0; k < 2; ++k) {
      const int mode = (round % 2 == 0) ? k : 1 - k;
      fc::ForwardOptions opts;
      opts.fused = mode == 1;
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
      "\n| module | unfused min ms | fused min ms | fused/unfused (min) | unfused median | "
      "fused median | fused/unfused (median) |\n|---|---|---|---|---|---|---|\n");
  auto row = [&](const std::string& name, const std::vector<double>& u,
                 const std::vector<double>& f) {
    const double um = *std::min_element(u.begin(), u.end()),
                 fm = *std::min_element(f.begin(), f.end());
    std::printf("| %s | %.1f | %.1f | %.3f | %.1f | %.1f | %.3f |\n", name.c_str(), um, fm, fm / um,
                median(u), median(f), median(f) / median(u));
  };
  for (const std::string& mod : order) row(mod, times[0][mod], times[1][mod]);
  row("block", block[0], block[1]);
  std::printf("\nload average after: %s\n", loadavg().c_str());
  return 0;
}
