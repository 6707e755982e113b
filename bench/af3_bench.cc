// One AF3-dims Pairformer block forward (Boltz-2: c_s 384, c_z 128, 16 single heads, 4 pair heads
// of 32) beside one AF2-dims Evoformer block at s = 1 (its pair stack is the same five modules),
// per module, in one process: the two stacks take turns every round so machine load hits both
// alike. Reports minimum (median) ms, the Pairformer block over the Evoformer block's pair-stack
// time (issue 17's target: <= 1.3 at n = 512), the Pairformer forward's tracked peak above its
// inputs as a multiple of bytes(z + s) (target <= 2.5), and the same-run SGEMM rate.
// Usage: af3_bench [n] [rounds]   (default 512 3). Prints /proc/loadavg before and after.
// Also times every module by process CPU time: with OMP_NUM_THREADS=1 that is the work itself,
// nearly independent of other processes on the machine (the ratio to quote under load).
// Quiet-machine rerun: OMP_WAIT_POLICY=passive build/af3_bench 512 3; under load:
// OMP_NUM_THREADS=1 OMP_WAIT_POLICY=passive build/af3_bench 512 2.
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "bench_util.h"
#include "core/rng.h"
#include "foldcube/af3.h"
#include "foldcube/memory.h"
#include "foldcube/model.h"
#include "foldcube/runtime.h"
#include "kernels/kernels.h"

namespace {
using Clock = std::chrono::steady_clock;
using fc::bench::loadavg;
using fc::bench::median;

double ms_since(Clock::time_point t) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t).count();
}

// Process CPU time, ms (all threads).
double cpu_ms() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

double minimum(const std::vector<double>& v) {
  return v.empty() ? 0 : *std::min_element(v.begin(), v.end());
}

fc::Tensor random_tensor(const fc::Shape& shape, uint64_t seed) {
  fc::Tensor t = fc::Tensor::empty(shape);  // shape as given
  float* p = t.f32();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = fc::uniform_pm1(seed, i);
  return t;
}

// SGEMM [n, n] x [n, n] rate in GFLOP/s, best of 3.
double sgemm_rate(int64_t n) {
  std::vector<float> a(n * n), b(n * n), c(n * n);  // [n, n] each
  for (int64_t i = 0; i < n * n; ++i) a[i] = b[i] = fc::uniform_pm1(9, i);
  double best = 1e30;
  for (int rep = 0; rep < 4; ++rep) {
    const auto t0 = Clock::now();
    fc::kern::gemm(false, false, n, n, n, 1.f, a.data(), n, b.data(), n, 0.f, c.data(), n);
    if (rep > 0) best = std::min(best, ms_since(t0));
  }
  return 2.0 * n * n * n / (best * 1e6);
}

const char* const kPairModules[] = {"tri_mul_out", "tri_mul_in", "tri_att_start", "tri_att_end",
                                    "pair_transition"};
}  // namespace

int main(int argc, char** argv) {
  const int64_t n = argc > 1 ? std::atoll(argv[1]) : 512;
  const int rounds = argc > 2 ? std::atoi(argv[2]) : 3;
  if (n < 8 || rounds < 1) {
    std::fprintf(stderr, "usage: af3_bench [n >= 8] [rounds >= 1]\n");
    return 2;
  }
  std::printf("af3_bench: n = %lld tokens, %d rounds, %d threads\nload average before: %s\n",
              static_cast<long long>(n), rounds, fc::num_threads(), loadavg().c_str());
  const double gflops = sgemm_rate(1024);
  std::printf("SGEMM n=1024 (same run): %.1f GFLOP/s\n", gflops);

  fc::Af3Config acfg;  // Boltz-2 / AF3 dims
  acfg.no_blocks = 1;
  const fc::PairformerStack pairformer = fc::PairformerStack::random(acfg, 1);
  fc::EvoformerConfig ecfg;  // AF2 model_1 dims
  ecfg.no_blocks = 1;
  const fc::EvoformerStack evoformer = fc::EvoformerStack::random(ecfg, 2);
  const fc::Tensor s0 = random_tensor({n, acfg.c_s}, 3);      // [n, c_s]
  const fc::Tensor z0 = random_tensor({n, n, acfg.c_z}, 4);   // [n, n, c_z]
  const fc::Tensor m0 = random_tensor({1, n, ecfg.c_m}, 5);   // [1, n, c_m]
  const fc::Tensor ez0 = random_tensor({n, n, ecfg.c_z}, 6);  // [n, n, c_z]

  std::map<std::string, std::vector<double>> pf_ms, ev_ms;    // module -> ms per round
  std::map<std::string, std::vector<double>> pf_cpu, ev_cpu;  // module -> CPU ms per round
  std::vector<std::string> pf_order, ev_order;
  std::vector<double> pf_block, ev_block, ev_pair, pf_block_cpu, ev_pair_cpu;
  int64_t pf_peak = 0;
  for (int round = 0; round <= rounds; ++round) {  // round 0: warm-up
    for (int k = 0; k < 2; ++k) {
      const bool run_pf = (round + k) % 2 == 0;  // alternate which stack goes first
      auto& times = run_pf ? pf_ms : ev_ms;
      auto& cpu = run_pf ? pf_cpu : ev_cpu;
      auto& order = run_pf ? pf_order : ev_order;
      fc::ForwardOptions opts;
      Clock::time_point mark;
      double cpu_mark = 0;
      opts.trace = [&](int, const std::string& module, const std::string&, const fc::Tensor&) {
        if (round > 0) times[module].push_back(ms_since(mark));
        if (round > 0) cpu[module].push_back(cpu_ms() - cpu_mark);
        if (round == 1) order.push_back(module);
        mark = Clock::now();
        cpu_mark = cpu_ms();
      };
      fc::Status st;
      const auto t0 = Clock::now();
      const double c0 = cpu_ms();
      mark = t0;
      cpu_mark = c0;
      if (run_pf) {
        fc::Tensor s = s0.clone(), z = z0.clone();
        fc::MemoryScope scope;
        st = pairformer.forward(s, z, fc::Tensor(), opts);
        pf_peak = std::max(pf_peak, scope.peak() - scope.start_live());
        if (round > 0) pf_block.push_back(ms_since(t0)), pf_block_cpu.push_back(cpu_ms() - c0);
      } else {
        fc::Tensor m = m0.clone(), z = ez0.clone();
        st = evoformer.forward(m, z, fc::Tensor(), fc::Tensor(), nullptr, opts);
        if (round > 0) ev_block.push_back(ms_since(t0));
      }
      if (!st.ok()) {
        std::fprintf(stderr, "af3_bench: %s\n", st.ToString().c_str());
        return 1;
      }
    }
  }
  for (int r = 0; r < rounds; ++r) {
    double sum = 0, sum_cpu = 0;
    for (const char* mod : kPairModules) sum += ev_ms[mod].at(r), sum_cpu += ev_cpu[mod].at(r);
    ev_pair.push_back(sum);
    ev_pair_cpu.push_back(sum_cpu);
  }

  std::printf(
      "\nminimum (median) ms over %d rounds; process CPU ms (minimum)\n\n"
      "| Pairformer module | ms | CPU ms |\n|---|---|---|\n",
      rounds);
  for (const std::string& mod : pf_order)
    std::printf("| %s | %.1f (%.1f) | %.1f |\n", mod.c_str(), minimum(pf_ms[mod]),
                median(pf_ms[mod]), minimum(pf_cpu[mod]));
  std::printf(
      "| **block** | %.1f (%.1f) | %.1f |\n\n| Evoformer module (s = 1) | ms | CPU ms |\n"
      "|---|---|---|\n",
      minimum(pf_block), median(pf_block), minimum(pf_block_cpu));
  for (const std::string& mod : ev_order)
    std::printf("| %s | %.1f (%.1f) | %.1f |\n", mod.c_str(), minimum(ev_ms[mod]),
                median(ev_ms[mod]), minimum(ev_cpu[mod]));
  std::printf(
      "| block | %.1f (%.1f) | |\n| **pair stack** (the five pair modules) | %.1f (%.1f) | %.1f "
      "|\n",
      minimum(ev_block), median(ev_block), minimum(ev_pair), median(ev_pair), minimum(ev_pair_cpu));
  std::printf("\nPairformer block / Evoformer pair stack by process CPU time: %.2f (%d threads)\n",
              minimum(pf_block_cpu) / minimum(ev_pair_cpu), fc::num_threads());
  const double zs_bytes = 4.0 * (n * n * acfg.c_z + n * acfg.c_s);
  std::printf(
      "\nPairformer block / Evoformer pair stack (minima): %.2f (target <= 1.3)\n"
      "Pairformer forward tracked peak: work %.1f MiB above s and z, with them %.1f MiB = "
      "%.2f x bytes(z + s) (target <= 2.5)\n48 blocks at this rate: %.1f s\n"
      "load average after: %s\n",
      minimum(pf_block) / minimum(ev_pair), pf_peak / 1048576.0, (pf_peak + zs_bytes) / 1048576.0,
      (pf_peak + zs_bytes) / zs_bytes, 48 * minimum(pf_block) / 1e3, loadavg().c_str());
  return 0;
}
