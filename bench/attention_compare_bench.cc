// Side-by-side timing of attention kernels at Evoformer shapes, in one process with interleaved
// repeats (the order alternates every repeat), reporting medians and their ratio:
//   forward: the pre-issue-4 kernel ([64, Lk] logit tiles, kept here as the baseline) vs the
//   flash-style kern::attention;
//   backward: kern::attention_backward without vs with the log-sum-exp saved by the forward.
// Usage: attention_compare_bench [repeats (default 7)] [case name filter]. Check `uptime` first:
// the machine is shared.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>
#include <vector>

#include "core/rng.h"
#include "foldcube/runtime.h"
#include "kernels/backward.h"
#include "kernels/kernels.h"

namespace fc {
namespace {

// ---- baseline: the forward kernel before issue 4 (one [64, Lk] logit tile per thread) ----------
namespace baseline {
constexpr int64_t kQueryTile = 64;

int64_t item_scratch_floats(const kern::AttentionArgs& a) {
  const int64_t qt = std::min(a.Lq, kQueryTile);
  return 2 * a.Lk * a.C + 2 * qt * a.C + qt * a.Lk;
}

void pack(const float* src, int64_t ld, int64_t rows, int64_t C, float* dst) {
  for (int64_t i = 0; i < rows; ++i) std::memcpy(dst + i * C, src + i * ld, C * sizeof(float));
}

void attention_item(const kern::AttentionArgs& a, int64_t b, int64_t h, float* scratch) {
  const int64_t qt = std::min(a.Lq, kQueryTile);
  float* K = scratch;         // [Lk, C]
  float* V = K + a.Lk * a.C;  // [Lk, C]
  float* Q = V + a.Lk * a.C;  // [qt, C]
  float* O = Q + qt * a.C;    // [qt, C]
  float* S = O + qt * a.C;    // [qt, Lk]
  pack(a.k + b * a.k_bs + h * a.C, a.k_rs, a.Lk, a.C, K);
  pack(a.v + b * a.v_bs + h * a.C, a.v_rs, a.Lk, a.C, V);
  const float* mb = a.mask_bias ? a.mask_bias + b * a.Lk : nullptr;
  for (int64_t i0 = 0; i0 < a.Lq; i0 += qt) {
    const int64_t n = std::min(qt, a.Lq - i0);
    pack(a.q + b * a.q_bs + i0 * a.q_rs + h * a.C, a.q_rs, n, a.C, Q);
    kern::gemm(false, true, n, a.Lk, a.C, a.scale, Q, a.C, K, a.C, 0.f, S, a.Lk);
    const float* pb = a.pair_bias ? a.pair_bias + (h * a.Lq + i0) * a.Lk : nullptr;
    for (int64_t i = 0; i < n; ++i) {
      float* row = S + i * a.Lk;  // [Lk]
      if (mb)
        for (int64_t j = 0; j < a.Lk; ++j) row[j] += mb[j];
      if (pb)
        for (int64_t j = 0; j < a.Lk; ++j) row[j] += pb[i * a.Lk + j];
    }
    kern::softmax_rows(S, a.Lk, n, a.Lk);
    kern::gemm(false, false, n, a.C, a.Lk, 1.f, S, a.Lk, V, a.C, 0.f, O, a.C);
    if (a.gate)
      kern::sigmoid_mul(O, a.C, a.gate + b * a.g_bs + i0 * a.g_rs + h * a.C, a.g_rs, n, a.C);
    float* o = a.o + b * a.o_bs + i0 * a.o_rs + h * a.C;
    for (int64_t i = 0; i < n; ++i) std::memcpy(o + i * a.o_rs, O + i * a.C, a.C * sizeof(float));
  }
}

int64_t scratch_floats(const kern::AttentionArgs& a, int threads) {
  return static_cast<int64_t>(std::max(threads, 1)) * item_scratch_floats(a);
}

void attention(const kern::AttentionArgs& a, float* scratch, int threads) {
  const int64_t items = a.B * a.H;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, items)));
  const int64_t per = item_scratch_floats(a);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t it = 0; it < items; ++it)
    attention_item(a, it / a.H, it % a.H,
                   scratch + static_cast<int64_t>(omp_get_thread_num()) * per);
}
}  // namespace baseline

// ---- cases
// ---------------------------------------------------------------------------------------

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

double max_rel_diff(const std::vector<float>& x, const std::vector<float>& y) {
  double mx = 0, ref = 1e-30;
  for (size_t i = 0; i < x.size(); ++i) {
    mx = std::max(mx, static_cast<double>(std::abs(x[i] - y[i])));
    ref = std::max(ref, static_cast<double>(std::abs(y[i])));
  }
  return mx / ref;
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
    // Forward: baseline vs flash-style, each into its own output.
    std::vector<float> o_old(b.o.size());
    std::vector<float> s_old(baseline::scratch_floats(b.a, threads));
    std::vector<float> s_new(kern::attention_scratch_floats(b.a, threads));
    kern::AttentionArgs a_old = b.a;
    a_old.o = o_old.data();
    kern::AttentionArgs a_new = b.a;
    a_new.lse = b.lse.data();
    compare(
        "forward", c.name, reps, [&] { baseline::attention(a_old, s_old.data(), threads); },
        [&] { kern::attention(a_new, s_new.data(), threads); }, "old", "new");
    std::printf("         max |new - old| / max |old| = %.2e\n", max_rel_diff(b.o, o_old));
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
