// Row-wise and elementwise kernels: Highway versions (fast) against the naive references (ref),
// at Evoformer shapes. Bytes processed count every float read and written once (for layernorm:
// x read, y written; gamma/beta are L1-resident and not counted).
#include <benchmark/benchmark.h>

#include <cstdint>
#include <vector>

#include "core/rng.h"
#include "kernels/convert.h"
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

// f32 -> bf16 (kHalf false) or f16 and back, n elements (6 bytes per element each way).
template <bool kFast, bool kHalf>
void Convert(benchmark::State& state) {
  const int64_t n = state.range(0);
  const std::vector<float> x = rnd(n, 4, 100.f);
  std::vector<uint16_t> h(n);  // [n] 16-bit patterns
  std::vector<float> y(n);     // [n]
  auto* narrow = kHalf ? (kFast ? kern::f32_to_f16 : kern::ref::f32_to_f16)
                       : (kFast ? kern::f32_to_bf16 : kern::ref::f32_to_bf16);
  auto* widen = kHalf ? (kFast ? kern::f16_to_f32 : kern::ref::f16_to_f32)
                      : (kFast ? kern::bf16_to_f32 : kern::ref::bf16_to_f32);
  for (auto _ : state) {
    narrow(x.data(), h.data(), n);
    widen(h.data(), y.data(), n);
    benchmark::DoNotOptimize(y.data());
  }
  state.SetBytesProcessed(state.iterations() * n * 12);
}
template <bool kFast>
void BM_ConvertBf16(benchmark::State& state) {
  Convert<kFast, false>(state);
}
template <bool kFast>
void BM_ConvertF16(benchmark::State& state) {
  Convert<kFast, true>(state);
}

// Args: rows, n.
template <bool kFast>
void BM_LayerNorm(benchmark::State& state) {
  const int64_t rows = state.range(0), n = state.range(1);
  const std::vector<float> x = rnd(rows * n, 1, 3.f), gamma = rnd(n, 2), beta = rnd(n, 3);
  std::vector<float> y(rows * n), mean(rows), rstd(rows);
  auto* f = kFast ? kern::layernorm : kern::ref::layernorm;
  for (auto _ : state) {
    f(x.data(), n, y.data(), n, rows, n, gamma.data(), beta.data(), 1e-5f, mean.data(),
      rstd.data());
    benchmark::DoNotOptimize(y.data());
  }
  set_bytes(state, 2 * rows * n);
}

template <bool kFast>
void BM_Softmax(benchmark::State& state) {
  const int64_t rows = state.range(0), n = state.range(1);
  const std::vector<float> x0 = rnd(rows * n, 4, 8.f);
  std::vector<float> x = x0;
  auto* f = kFast ? kern::softmax_rows : kern::ref::softmax_rows;
  for (auto _ : state) {
    f(x.data(), n, rows, n);  // in place: inputs drift towards uniform rows, cost does not change
    benchmark::DoNotOptimize(x.data());
  }
  set_bytes(state, 2 * rows * n);
}

template <bool kFast>
void BM_SigmoidMul(benchmark::State& state) {
  const int64_t rows = state.range(0), n = state.range(1);
  const std::vector<float> g = rnd(rows * n, 5, 4.f), y0 = rnd(rows * n, 6);
  std::vector<float> y(rows * n);
  auto* f = kFast ? kern::sigmoid_mul : kern::ref::sigmoid_mul;
  for (auto _ : state) {
    state.PauseTiming();  // repeated y *= sigmoid(g) would reach (slow) subnormals
    y = y0;
    state.ResumeTiming();
    f(y.data(), n, g.data(), n, rows, n);
    benchmark::DoNotOptimize(y.data());
  }
  set_bytes(state, 3 * rows * n);
}

template <bool kFast>
void BM_Relu(benchmark::State& state) {
  const int64_t rows = state.range(0), n = state.range(1);
  std::vector<float> x = rnd(rows * n, 7);
  auto* f = kFast ? kern::relu_inplace : kern::ref::relu_inplace;
  for (auto _ : state) {
    f(x.data(), n, rows, n);
    benchmark::DoNotOptimize(x.data());
  }
  set_bytes(state, 2 * rows * n);
}

template <bool kFast>
void BM_Add(benchmark::State& state) {
  const int64_t rows = state.range(0), n = state.range(1);
  const std::vector<float> x = rnd(rows * n, 8, 1e-3f);
  std::vector<float> y = rnd(rows * n, 9);
  auto* f = kFast ? kern::add_inplace : kern::ref::add_inplace;
  for (auto _ : state) {
    f(y.data(), n, x.data(), n, rows, n);
    benchmark::DoNotOptimize(y.data());
  }
  set_bytes(state, 3 * rows * n);
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

// Shapes (r = 256 residues, s = 128 sequences): MSA activations [s*r, c_m=256], pair activations
// [r*r, c_z=128], one row of pair attention logits [H=8 * r, r].
FC_BENCH_PAIR(BM_LayerNorm, Args({32768, 256})->Args({65536, 128}));
FC_BENCH_PAIR(BM_Softmax, Args({8 * 256, 256}));
FC_BENCH_PAIR(BM_SigmoidMul, Args({65536, 128}));
FC_BENCH_PAIR(BM_Relu, Args({65536, 128}));
FC_BENCH_PAIR(BM_Add, Args({65536, 128}));
FC_BENCH_PAIR(BM_ConvertBf16, Arg(65536 * 128));  // one pair activation [r*r, c_z]
FC_BENCH_PAIR(BM_ConvertF16, Arg(65536 * 128));

}  // namespace
}  // namespace fc

BENCHMARK_MAIN();
