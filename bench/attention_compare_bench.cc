// Side-by-side timing of the attention kernels at Evoformer shapes, in one process with
// interleaved repeats (the order alternates every repeat), reporting medians and their ratio:
// kern::attention without vs with the lse output, and kern::attention_backward without vs with
// the lse saved by the forward. The pre-issue-4 forward kernel was timed against the flash-style
// one by this harness up to commit 5e439f5 (docs/benchmarks.md has the table).
// Usage: attention_compare_bench [repeats (default 7)] [case name filter]. Check `uptime` first:
// the machine is shared; run with OMP_WAIT_POLICY=passive so that the CPU-time column counts work
// only.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <string>
#include <vector>

#include "core/rng.h"
#include "foldcube/runtime.h"
#include "kernels/backward.h"
#include "kernels/kernels.h"

namespace fc {
namespace {

// ---- cases -------------------------------------------------------------------------------

struct Case {
  const char* name;
  int64_t B, L, H, C;
  bool mask, pair, gate;
};

// Evoformer shapes (r = 256 residues, s = 128 sequences, one full module call), and a long one.
const Case kCases[] = {
    {"msa_row  B=128 L=256 H=8", 128, 256, 8, 32, true, true, true},
    {"msa_col  B=256 L=128 H=8", 256, 128, 8, 32, true, false, true},
    {"triangle B=256 L=256 H=4", 256, 256, 4, 32, true, true, true},
    {"long     B=8 L=2048 H=4", 8, 2048, 4, 32, false, true, false},
};

// q | k | v | g interleaved in one [B*L, 4*H*C] buffer as the modules lay them out; o, d_out
// [B*L, H*C]; ~20% of keys masked with -1e9.
struct Buffers {
  std::vector<float> qkvg, mask, bias, o, lse, dout, dqkvg, dbias;
  kern::AttentionArgs a;
  kern::AttentionGrads g;
};

Buffers make(const Case& c) {
  Buffers b;
  const int64_t hc = c.H * c.C, ld = 4 * hc, rows = c.B * c.L;
  b.qkvg.resize(rows * ld);  // [B*L, 4*H*C]
  for (int64_t i = 0; i < rows * ld; ++i) b.qkvg[i] = uniform_pm1(1, i);
  b.mask.resize(rows);  // [B, L]
  for (int64_t i = 0; i < rows; ++i) b.mask[i] = uniform_pm1(2, i) < -0.6f ? -1e9f : 0.f;
  b.bias.resize(c.H * c.L * c.L);  // [H, L, L]
  for (int64_t i = 0; i < c.H * c.L * c.L; ++i) b.bias[i] = uniform_pm1(3, i);
  b.o.assign(rows * hc, 0.f);          // [B*L, H*C]
  b.lse.assign(c.B * c.H * c.L, 0.f);  // [B, H, L]
  b.dout.resize(rows * hc);            // [B*L, H*C]
  for (int64_t i = 0; i < rows * hc; ++i) b.dout[i] = uniform_pm1(4, i);
  b.dqkvg.assign(rows * ld, 0.f);        // [B*L, 4*H*C]
  b.dbias.assign(c.H * c.L * c.L, 0.f);  // [H, L, L]
  kern::AttentionArgs& a = b.a;
  a.B = c.B, a.Lq = c.L, a.Lk = c.L, a.H = c.H, a.C = c.C;
  a.scale = 1.f / std::sqrt(static_cast<float>(c.C));
  float* p = b.qkvg.data();
  a.q = p, a.k = p + hc, a.v = p + 2 * hc;
  a.gate = c.gate ? p + 3 * hc : nullptr;
  a.q_bs = a.k_bs = a.v_bs = a.g_bs = c.L * ld;
  a.q_rs = a.k_rs = a.v_rs = a.g_rs = ld;
  a.o = b.o.data(), a.o_bs = c.L * hc, a.o_rs = hc;
  a.mask_bias = c.mask ? b.mask.data() : nullptr;
  a.pair_bias = c.pair ? b.bias.data() : nullptr;
  float* d = b.dqkvg.data();
  b.g.d_out = b.dout.data();
  b.g.dq = d, b.g.dk = d + hc, b.g.dv = d + 2 * hc, b.g.dgate = c.gate ? d + 3 * hc : nullptr;
  b.g.d_pair_bias = c.pair ? b.dbias.data() : nullptr;
  return b;
}

struct Times {
  double wall, cpu;  // ms
};

double cpu_ms() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

// Wall time, and the CPU time of the whole process (all threads), which stays meaningful when
// other jobs share the cores (run with OMP_WAIT_POLICY=passive so idle threads do not spin).
template <class F>
Times time_ms(F f) {
  const double c0 = cpu_ms();
  const auto t0 = std::chrono::steady_clock::now();
  f();
  const double wall =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  return {wall, cpu_ms() - c0};
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Runs f0 and f1 `reps` times each after one warm-up, alternating which goes first; prints the
// medians and t0 / t1.
template <class F0, class F1>
void compare(const char* what, const char* name, int reps, F0 f0, F1 f1, const char* n0,
             const char* n1) {
  f0(), f1();
  std::vector<double> w0, w1, c0, c1;
  for (int r = 0; r < reps; ++r) {
    Times t0, t1;
    if (r % 2 == 0) {
      t0 = time_ms(f0), t1 = time_ms(f1);
    } else {
      t1 = time_ms(f1), t0 = time_ms(f0);
    }
    w0.push_back(t0.wall), w1.push_back(t1.wall), c0.push_back(t0.cpu), c1.push_back(t1.cpu);
  }
  std::printf(
      "%-8s %-26s wall: %s %8.2f  %s %8.2f ms  ratio %.3f | cpu: %s %8.2f  %s %8.2f ms  "
      "ratio %.3f\n",
      what, name, n0, median(w0), n1, median(w1), median(w0) / median(w1), n0, median(c0), n1,
      median(c1), median(c0) / median(c1));
  std::fflush(stdout);
}

}  // namespace
}  // namespace fc

int main(int argc, char** argv) {
  using namespace fc;
  set_num_threads(0);
  const int reps = argc > 1 ? std::atoi(argv[1]) : 7;
  const std::string filter = argc > 2 ? argv[2] : "";
  const int threads = num_threads();
  std::printf("threads %d, %d interleaved repeats, medians\n", threads, reps);
  for (const Case& c : kCases) {
    if (!filter.empty() && std::string(c.name).find(filter) == std::string::npos) continue;
    Buffers b = make(c);
    // Forward without vs with the lse output.
    std::vector<float> s_fwd(kern::attention_scratch_floats(b.a, threads));
    kern::AttentionArgs a_lse = b.a;
    a_lse.lse = b.lse.data();
    compare(
        "forward", c.name, reps, [&] { kern::attention(b.a, s_fwd.data(), threads); },
        [&] { kern::attention(a_lse, s_fwd.data(), threads); }, "no-lse", "lse");
    // Backward: without vs with the saved lse (from the forward above).
    const bool pair_grad = b.g.d_pair_bias != nullptr;
    std::vector<float> s_bwd(kern::attention_backward_scratch_floats(b.a, threads, pair_grad));
    kern::AttentionGrads g_lse = b.g;
    g_lse.lse = b.lse.data();
    compare(
        "backward", c.name, reps,
        [&] { kern::attention_backward(b.a, b.g, s_bwd.data(), threads); },
        [&] { kern::attention_backward(b.a, g_lse, s_bwd.data(), threads); }, "no-lse", "lse");
  }
  return 0;
}
