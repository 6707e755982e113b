// One AF2-dims Evoformer block forward: unfused fp32, fused fp32 and fused with bf16 GEMM inputs
// (ForwardOptions::fused, ::dtype), per module and per block, in one process: the modes take turns
// (order rotated every round) so machine load hits all alike; the table reports the minimum and
// the median over the rounds and the ratios of the minima.
// Usage: fused_bench [s] [r] [rounds] [kernels | unfused | fused | bf16]   (default 128 256 5);
// with "kernels", the kernel table at s*r rows instead; with a mode name, that mode alone and no
// table (for a profiler: perf record -g build/fused_bench 128 256 2 fused). Prints /proc/loadavg
// before and after.
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "bench_util.h"
#include "core/rng.h"
#include "foldcube/memory.h"
#include "foldcube/model.h"
#include "foldcube/runtime.h"
#include "kernels/convert.h"
#include "kernels/fused.h"
#include "kernels/kernels.h"
#include "kernels/typed.h"

namespace {
using Clock = std::chrono::steady_clock;
using fc::bench::loadavg;
using fc::bench::median;

// Process CPU time in ms (both threads; less sensitive than wall time to other processes' load).
double cpu_ms() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

}  // namespace

// The kernels alone on the shapes of one block at (s, r): the MSA transition (s*r rows, c_m 256,
// hidden 1024) and the MSA attention projection (s*r rows, 256 -> 1024), fp32 and bf16 GEMM
// inputs, beside the plain GEMM rates of the same product. Minimum of `reps` calls each, the
// dtypes interleaved.
void kernel_table(int64_t rows, int reps) {
  const int64_t c = 256, nh = 1024;
  std::vector<float> x0(rows * c), x(rows * c), y(rows * nh), gamma(c, 1.f), beta(c, 0.f);
  std::vector<float> W1(nh * c), b1(nh, 0.f), W2(c * nh), b2(c, 0.f);
  for (int64_t i = 0; i < rows * c; ++i) x0[i] = fc::uniform_pm1(5, i);
  for (int64_t i = 0; i < nh * c; ++i) W1[i] = W2[i] = 0.0625f * fc::uniform_pm1(6, i);
  std::vector<uint16_t> W1b(nh * c), W2b(c * nh), xb(rows * c);
  fc::kern::f32_to_bf16(W1.data(), W1b.data(), nh * c);
  fc::kern::f32_to_bf16(W2.data(), W2b.data(), nh * c);
  fc::kern::f32_to_bf16(x0.data(), xb.data(), rows * c);
  const int threads = fc::num_threads();
  // MSA row attention on the same rows: rows/256 items of L = 256, 8 heads of 32, q|k|v|g
  // interleaved, pair bias [8, 256, 256].
  const int64_t L = 256, H = 8, C = 32, B = std::max<int64_t>(1, rows / L), ld = 4 * H * C;
  std::vector<float> qkvg0(B * L * ld), qkvg(B * L * ld), mask(B * L, 0.f), pbias(H * L * L);
  for (size_t i = 0; i < qkvg0.size(); ++i) qkvg0[i] = fc::uniform_pm1(7, i);
  for (size_t i = 0; i < pbias.size(); ++i) pbias[i] = fc::uniform_pm1(8, i);
  // Triangle-multiplication products at r = 256: 32 channels of [256, 256] x [256, 256]^T.
  const int64_t tr = 256, tc = 32, trr = tr * tr;
  std::vector<float> ta(tc * trr), tp(tc * trr);
  for (size_t i = 0; i < ta.size(); ++i) ta[i] = fc::uniform_pm1(9, i);
  std::vector<uint16_t> tab(tc * trr);  // bf16 of ta
  fc::kern::f32_to_bf16(ta.data(), tab.data(), tc * trr);
  double best[5][2];  // [transition, ln+linear, gemm, attention, products][dtype]
  for (auto& b : best) b[0] = b[1] = 1e30;
  auto time = [](auto f) {
    const auto t0 = Clock::now();
    f();
    return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
  };
  for (int rep = 0; rep < reps; ++rep)
    for (int d = 0; d < 2; ++d) {
      const fc::DType dt = d ? fc::DType::BF16 : fc::DType::F32;
      fc::kern::TransitionArgs t;
      t.rows = rows, t.c = c, t.hidden = nh, t.x = x.data();
      t.gamma = gamma.data(), t.beta = beta.data();
      t.W1 = W1.data(), t.b1 = b1.data(), t.W2 = W2.data(), t.b2 = b2.data();
      t.dtype = dt, t.W1_bf16 = W1b.data(), t.W2_bf16 = W2b.data();
      std::vector<float> scratch(fc::kern::transition_scratch_floats(t, threads));
      x = x0;
      best[0][d] =
          std::min(best[0][d], time([&] { fc::kern::transition(t, scratch.data(), threads); }));
      fc::kern::LayerNormLinearArgs a;
      a.L = rows, a.in = c, a.out = nh, a.x = x0.data(), a.x_rs = c;
      a.gamma = gamma.data(), a.beta = beta.data(), a.W = W1.data(), a.bias = b1.data();
      a.y = y.data(), a.ldy = nh, a.dtype = dt, a.W_bf16 = W1b.data();
      scratch.resize(fc::kern::layernorm_linear_scratch_floats(a, threads));
      best[1][d] = std::min(best[1][d],
                            time([&] { fc::kern::layernorm_linear(a, scratch.data(), threads); }));
      best[2][d] =
          std::min(best[2][d], time([&] {
                     fc::kern::gemm_typed(dt, false, true, rows, nh, c, 1.f,
                                          d ? static_cast<const void*>(xb.data()) : x0.data(), c,
                                          d ? static_cast<const void*>(W1b.data()) : W1.data(), c,
                                          0.f, y.data(), nh);
                   }));
      fc::kern::AttentionArgs at;
      at.B = B, at.Lq = L, at.Lk = L, at.H = H, at.C = C, at.scale = 1.f / std::sqrt(float(C));
      qkvg = qkvg0;
      float* p = qkvg.data();
      at.q = p, at.k = p + H * C, at.v = p + 2 * H * C, at.gate = p + 3 * H * C, at.o = p;
      at.q_bs = at.k_bs = at.v_bs = at.g_bs = at.o_bs = L * ld;
      at.q_rs = at.k_rs = at.v_rs = at.g_rs = at.o_rs = ld;
      at.mask_bias = mask.data(), at.pair_bias = pbias.data(), at.dtype = dt;
      scratch.resize(fc::kern::attention_scratch_floats(at, threads));
      best[3][d] =
          std::min(best[3][d], time([&] { fc::kern::attention(at, scratch.data(), threads); }));
      const void* tin = d ? static_cast<const void*>(tab.data()) : ta.data();
      best[4][d] =
          std::min(best[4][d], time([&] {
                     fc::kern::gemm_batched_typed(dt, tc, false, true, tr, tr, tr, 1.f, tin, tr,
                                                  trr, tin, tr, trr, 0.f, tp.data(), tr, trr);
                   }));
    }
  const double gf_t = 4.0 * rows * c * nh / 1e9, gf_l = 2.0 * rows * c * nh / 1e9;
  std::printf(
      "\nkernels at %lld rows (min of %d): ms (GFLOP/s)\n\n| kernel | fp32 | bf16 | "
      "bf16/fp32 time |\n|---|---|---|---|\n",
      static_cast<long long>(rows), reps);
  const char* names[5] = {"transition 256->1024->256", "LayerNorm+Linear 256->1024",
                          "GEMM [rows,256]x[256,1024]", "attention L=256, 8x32 heads, pair bias",
                          "32 triangle products 256^3 (gemm_batched_typed)"};
  const double gf[5] = {gf_t, gf_l, gf_l, 4.0 * B * H * L * L * C / 1e9,
                        2.0 * tc * tr * tr * tr / 1e9};
  for (int k = 0; k < 5; ++k)
    std::printf("| %s | %.1f (%.0f) | %.1f (%.0f) | %.3f |\n", names[k], best[k][0],
                gf[k] / (best[k][0] / 1e3), best[k][1], gf[k] / (best[k][1] / 1e3),
                best[k][1] / best[k][0]);
}

int main(int argc, char** argv) {
  const int64_t s = argc > 1 ? std::atoll(argv[1]) : 128, r = argc > 2 ? std::atoll(argv[2]) : 256;
  const int rounds = argc > 3 ? std::atoi(argv[3]) : 5;
  if (argc > 4 && std::string(argv[4]) == "kernels") {
    std::printf("load average before: %s\n", loadavg().c_str());
    kernel_table(s * r, rounds);
    std::printf("\nload average after: %s\n", loadavg().c_str());
    return 0;
  }
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
  const char* mode_args[kModes] = {"unfused", "fused", "bf16"};
  int only = -1;  // a single mode to run (profiling), else all
  for (int k = 0; argc > 4 && k < kModes; ++k)
    if (std::string(argv[4]) == mode_args[k]) only = k;
  std::vector<std::string> order;                            // modules in run order
  std::map<std::string, std::vector<double>> times[kModes];  // [mode][module] ms per round
  std::map<std::string, std::vector<double>> cpu[kModes];    // [mode][module] process CPU ms
  std::vector<double> block[kModes], block_cpu[kModes];
  int64_t peak[kModes] = {0, 0, 0};  // tracked bytes above the inputs during the forward
  for (int round = 0; round < rounds + 1; ++round) {  // round 0: warm-up
    for (int k = 0; k < kModes; ++k) {
      const int mode = (round + k) % kModes;  // rotate the order every round
      if (only >= 0 && mode != only) continue;
      fc::ForwardOptions opts;
      opts.fused = mode != 0;
      opts.dtype = mode == 2 ? fc::DType::BF16 : fc::DType::F32;
      Clock::time_point mark;
      double cpu_mark = 0;
      opts.trace = [&](int, const std::string& module, const std::string&, const fc::Tensor&) {
        const auto now = Clock::now();
        if (round > 0)
          times[mode][module].push_back(
              std::chrono::duration<double, std::milli>(now - mark).count());
        if (round == 1 && mode == 0) order.push_back(module);
        const double c = cpu_ms();
        if (round > 0) cpu[mode][module].push_back(c - cpu_mark);
        mark = now;
        cpu_mark = c;
      };
      fc::Tensor m = m0.clone(), z = z0.clone();
      fc::MemoryScope scope;
      const double c0 = cpu_ms();
      const auto t0 = Clock::now();
      mark = t0;
      cpu_mark = c0;
      if (!stack.forward(m, z, fc::Tensor(), fc::Tensor(), nullptr, opts).ok()) return 1;
      peak[mode] = std::max(peak[mode], scope.peak() - scope.start_live());
      if (round > 0) {
        block[mode].push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
        block_cpu[mode].push_back(cpu_ms() - c0);
      }
    }
  }
  if (only >= 0) {
    std::printf("%s: block %.1f ms (min), process CPU %.1f ms\nload average after: %s\n",
                names[only], *std::min_element(block[only].begin(), block[only].end()),
                *std::min_element(block_cpu[only].begin(), block_cpu[only].end()),
                loadavg().c_str());
    return 0;
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
  row("block, process CPU ms", block_cpu);
  std::printf(
      "\nprocess CPU ms per module (both threads; robust under load), minimum (median)\n\n| module "
      "| %s | %s | %s | fused/unfused | bf16/fp32 fused | bf16 fused/unfused |\n"
      "|---|---|---|---|---|---|---|\n",
      names[0], names[1], names[2]);
  for (const std::string& mod : order) {
    const std::vector<double> v[kModes] = {cpu[0][mod], cpu[1][mod], cpu[2][mod]};
    row(mod, v);
  }
  row("block", block_cpu);
  const double mz = static_cast<double>(m0.nbytes() + z0.nbytes());
  std::printf(
      "\ntracked forward workspace above m, z (MiB; x bytes(m+z)): %s %.1f (%.2f), %s %.1f "
      "(%.2f), %s %.1f (%.2f)\n",
      names[0], peak[0] / 1048576.0, peak[0] / mz, names[1], peak[1] / 1048576.0, peak[1] / mz,
      names[2], peak[2] / 1048576.0, peak[2] / mz);
  std::printf("\nload average after: %s\n", loadavg().c_str());
  return 0;
}
