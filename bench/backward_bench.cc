// Backward kernels: fast (backward.cc) against the naive references (backward_ref.cc), at
// Evoformer shapes. Bytes processed count every float read and written once; attention reports
// GFLOP/s over its six GEMM-shaped products (QK^T and PV recomputed, then dV, dP, dQ, dK:
// 12 * B * H * Lq * Lk * C flops), with the forward kernel alongside for the backward/forward
// time ratio.
#include <benchmark/benchmark.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "core/rng.h"
#include "foldcube/runtime.h"
#include "kernels/backward.h"
#include "kernels/kernels.h"

namespace fc {
namespace {

std::vector<float> rnd(int64_t n, uint64_t seed, float scale = 1.f) {
  std::vector<float> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = scale * uniform_pm1(seed, i);
  return v;
}

void set_bytes(benchmark::State& state, int64_t floats_moved) {
  state.SetBytesProcessed(state.iterations() * floats_moved * static_cast<int64_t>(sizeof(float)));
}

// Args: rows, in, out. Reads x, dy (and W), writes dx, updates dW.
template <bool kFast>
void BM_LinearBackward(benchmark::State& state) {
  const int64_t rows = state.range(0), in = state.range(1), out = state.range(2);
  const std::vector<float> x = rnd(rows * in, 1), W = rnd(out * in, 2), dy = rnd(rows * out, 3);
  std::vector<float> dx(rows * in), dW(out * in), db(out);
  auto* f = kFast ? kern::linear_backward : kern::ref::linear_backward;
  for (auto _ : state) {
    f(x.data(), in, rows, in, W.data(), out, dy.data(), out, dx.data(), in, dW.data(), db.data(),
      false);
    benchmark::DoNotOptimize(dx.data());
  }
  set_bytes(state, 2 * rows * in + rows * out);
  state.counters["GFLOP/s"] =
      benchmark::Counter(4.0 * rows * in * out * state.iterations(), benchmark::Counter::kIsRate,
                         benchmark::Counter::kIs1000);
}

// Args: rows, n. Reads x, dy; writes dx.
template <bool kFast>
void BM_LayerNormBackward(benchmark::State& state) {
  const int64_t rows = state.range(0), n = state.range(1);
  const std::vector<float> x = rnd(rows * n, 4, 3.f), dy = rnd(rows * n, 5), gamma = rnd(n, 6),
                           beta = rnd(n, 7);
  std::vector<float> y(rows * n), mean(rows), rstd(rows), dx(rows * n), dgamma(n), dbeta(n);
  kern::layernorm(x.data(), n, y.data(), n, rows, n, gamma.data(), beta.data(), 1e-5f, mean.data(),
                  rstd.data());
  std::vector<float> scratch(kern::layernorm_backward_scratch_floats(rows, n));
  auto* f = kFast ? kern::layernorm_backward : kern::ref::layernorm_backward;
  for (auto _ : state) {
    f(x.data(), n, dy.data(), n, rows, n, gamma.data(), mean.data(), rstd.data(), dx.data(), n,
      dgamma.data(), dbeta.data(), scratch.data(), false);
    benchmark::DoNotOptimize(dx.data());
  }
  set_bytes(state, 3 * rows * n);
}

// Args: rows, n. Reads p, dp; writes dx.
template <bool kFast>
void BM_SoftmaxBackward(benchmark::State& state) {
  const int64_t rows = state.range(0), n = state.range(1);
  std::vector<float> p = rnd(rows * n, 8, 8.f);
  kern::softmax_rows(p.data(), n, rows, n);
  const std::vector<float> dp = rnd(rows * n, 9);
  std::vector<float> dx(rows * n);
  auto* f = kFast ? kern::softmax_backward : kern::ref::softmax_backward;
  for (auto _ : state) {
    f(p.data(), n, dp.data(), n, dx.data(), n, rows, n, false);
    benchmark::DoNotOptimize(dx.data());
  }
  set_bytes(state, 3 * rows * n);
}

// Args: rows, n. Reads a, g, dy; writes da, dg.
template <bool kFast>
void BM_SigmoidMulBackward(benchmark::State& state) {
  const int64_t rows = state.range(0), n = state.range(1);
  const std::vector<float> a = rnd(rows * n, 10), g = rnd(rows * n, 11, 4.f),
                           dy = rnd(rows * n, 12);
  std::vector<float> da(rows * n), dg(rows * n);
  auto* f = kFast ? kern::sigmoid_mul_backward : kern::ref::sigmoid_mul_backward;
  for (auto _ : state) {
    f(a.data(), n, g.data(), n, dy.data(), n, da.data(), n, dg.data(), n, rows, n, false);
    benchmark::DoNotOptimize(dg.data());
  }
  set_bytes(state, 5 * rows * n);
}

// Args: rows, n. Reads x, dy; writes dx.
template <bool kFast>
void BM_ReluBackward(benchmark::State& state) {
  const int64_t rows = state.range(0), n = state.range(1);
  const std::vector<float> x = rnd(rows * n, 13), dy = rnd(rows * n, 14);
  std::vector<float> dx(rows * n);
  using Fn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t,
                      int64_t, bool);
  const Fn f =
      kFast ? static_cast<Fn>(kern::relu_backward) : static_cast<Fn>(kern::ref::relu_backward);
  for (auto _ : state) {
    f(x.data(), n, dy.data(), n, dx.data(), n, rows, n, false);
    benchmark::DoNotOptimize(dx.data());
  }
  set_bytes(state, 3 * rows * n);
}

// Attention as the model lays it out: q | k | v | g interleaved in one [B*L, 4*H*C] buffer, the
// gradients dq | dk | dv | dg likewise, with mask bias, pair bias and its gradient.
struct AttnBuffers {
  std::vector<float> qkvg, dqkvg, dout, o, mask, bias, dbias, scratch;
  kern::AttentionArgs a;
  kern::AttentionGrads g;
};

AttnBuffers make_attention(int64_t B, int64_t L, int64_t H, int64_t C) {
  AttnBuffers b;
  const int64_t ld = 4 * H * C;
  b.qkvg = rnd(B * L * ld, 15);
  b.dqkvg.assign(B * L * ld, 0.f);
  b.dout = rnd(B * L * H * C, 16);
  b.o.assign(B * L * H * C, 0.f);
  b.mask.assign(B * L, 0.f);
  b.bias = rnd(H * L * L, 17);
  b.dbias.assign(H * L * L, 0.f);
  kern::AttentionArgs& a = b.a;
  a.B = B, a.Lq = L, a.Lk = L, a.H = H, a.C = C, a.scale = 1.f / std::sqrt(static_cast<float>(C));
  float* p = b.qkvg.data();
  a.q = p, a.k = p + H * C, a.v = p + 2 * H * C, a.gate = p + 3 * H * C;
  a.q_bs = a.k_bs = a.v_bs = a.g_bs = L * ld;
  a.q_rs = a.k_rs = a.v_rs = a.g_rs = ld;
  a.o = b.o.data(), a.o_bs = L * H * C, a.o_rs = H * C;
  a.mask_bias = b.mask.data();
  a.pair_bias = b.bias.data();
  float* d = b.dqkvg.data();
  b.g.d_out = b.dout.data();
  b.g.dq = d, b.g.dk = d + H * C, b.g.dv = d + 2 * H * C, b.g.dgate = d + 3 * H * C;
  b.g.d_pair_bias = b.dbias.data();
  return b;
}

void attention_counters(benchmark::State& state, double flops_per_elem) {
  const double B = state.range(0), L = state.range(1), H = state.range(2), C = state.range(3);
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops_per_elem * B * H * L * L * C * state.iterations(),
                         benchmark::Counter::kIsRate, benchmark::Counter::kIs1000);
}

// Args: B, L, H, C. dtype: AttentionArgs::dtype (BF16: the bf16 training step's products).
template <bool kFast>
void attention_backward_bench(benchmark::State& state, DType dtype) {
  AttnBuffers b = make_attention(state.range(0), state.range(1), state.range(2), state.range(3));
  b.a.dtype = dtype;
  const int threads = num_threads();
  b.scratch.resize(kFast ? kern::attention_backward_scratch_floats(b.a, threads)
                         : kern::ref::attention_backward_scratch_floats(b.a));
  for (auto _ : state) {
    if (kFast)
      kern::attention_backward(b.a, b.g, b.scratch.data(), threads);
    else
      kern::ref::attention_backward(b.a, b.g, b.scratch.data());
    benchmark::DoNotOptimize(b.dqkvg.data());
  }
  attention_counters(state, 12.0);
}

template <bool kFast>
void BM_AttentionBackward(benchmark::State& state) {
  attention_backward_bench<kFast>(state, DType::F32);
}

void BM_AttentionBackwardBf16(benchmark::State& state) {
  attention_backward_bench<true>(state, DType::BF16);
}

// The forward kernel at the same shapes, for the backward/forward time ratio.
void BM_AttentionForward(benchmark::State& state) {
  AttnBuffers b = make_attention(state.range(0), state.range(1), state.range(2), state.range(3));
  const int threads = num_threads();
  b.scratch.resize(kern::attention_scratch_floats(b.a, threads));
  for (auto _ : state) {
    kern::attention(b.a, b.scratch.data(), threads);
    benchmark::DoNotOptimize(b.o.data());
  }
  attention_counters(state, 4.0);
}

// Registers the fast and the ref version with the same arguments. Wall time (UseRealTime), since
// the fast kernels run on all OpenMP threads and CPU time would count only the main one.
#define FC_BENCH_PAIR(bm, args)        \
  BENCHMARK_TEMPLATE(bm, true)         \
      ->Name(#bm "/fast")              \
      ->args->UseRealTime()            \
      ->Unit(benchmark::kMicrosecond); \
  BENCHMARK_TEMPLATE(bm, false)        \
      ->Name(#bm "/ref")               \
      ->args->UseRealTime()            \
      ->Unit(benchmark::kMicrosecond)

// Shapes (r = 256 residues, s = 128 sequences): pair activations [r*r, c_z = 128] (the linear one a
// 4096-row chunk, since the reference is O(rows * in * out) in double), MSA activations
// [s*r, c_m = 256], one row of pair attention logits [H = 8 * r, r]; attention at MSA row attention
// (8 heads x 32) on one MSA row for the fast/ref pair, then at full chunks.
FC_BENCH_PAIR(BM_LinearBackward, Args({4096, 128, 128}));
FC_BENCH_PAIR(BM_LayerNormBackward, Args({32768, 256})->Args({65536, 128}));
FC_BENCH_PAIR(BM_SoftmaxBackward, Args({8 * 256, 256}));
FC_BENCH_PAIR(BM_SigmoidMulBackward, Args({65536, 128}));
FC_BENCH_PAIR(BM_ReluBackward, Args({65536, 128}));
FC_BENCH_PAIR(BM_AttentionBackward, Args({1, 256, 8, 32}));

BENCHMARK_TEMPLATE(BM_LinearBackward, true)
    ->Name("BM_LinearBackward/fast")
    ->Args({16384, 512, 128})  // pair transition, second linear: 4 c_z -> c_z
    ->Args({32768, 256, 256})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_AttentionBackward, true)
    ->Name("BM_AttentionBackward/fast")
    ->Args({16, 256, 8, 32})  // MSA row attention chunk
    ->Args({16, 256, 4, 32})  // triangle attention chunk
    ->Args({32, 128, 8, 32})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_AttentionBackwardBf16)
    ->Args({16, 256, 8, 32})
    ->Args({16, 256, 4, 32})
    ->Args({32, 128, 8, 32})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_AttentionForward)
    ->Args({1, 256, 8, 32})
    ->Args({16, 256, 8, 32})
    ->Args({16, 256, 4, 32})
    ->Args({32, 128, 8, 32})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace fc

int main(int argc, char** argv) {
  fc::set_num_threads(0);
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  return 0;
}
