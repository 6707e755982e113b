// GEMM candidates side by side on the shapes the Evoformer uses: oneDNN dnnl_sgemm (what
// kern::gemm uses), OpenBLAS cblas_sgemm, the naive reference on a small shape, and the bf16-input
// product (kern::gemm_typed, oneDNN matmul, f32 accumulation and output).
// OpenBLAS honours OPENBLAS_CORETYPE from the environment (Haswell on our machines caps it at
// AVX2); run with `env -u OPENBLAS_CORETYPE` to see its AVX-512 kernels.
#include <benchmark/benchmark.h>
#include <cblas.h>

#include <vector>

#include "kernels/convert.h"
#include "kernels/kernels.h"

namespace {

// {M, N, K}: 2048^3 (peak), linear layers of MSA (s*r = 32768 rows) and pair (r*r = 65536
// rows) stacks, attention logits and PV products, triangle-multiplication products.
void Shapes(benchmark::internal::Benchmark* b) {
  for (auto s : std::vector<std::vector<int64_t>>{{2048, 2048, 2048},
                                                  {32768, 1024, 256},
                                                  {32768, 256, 1024},
                                                  {65536, 512, 128},
                                                  {256, 256, 32},
                                                  {256, 32, 256},
                                                  {256, 256, 256}})
    b->Args(s);
}

void run(benchmark::State& st, int lib) {
  const int64_t M = st.range(0), N = st.range(1), K = st.range(2);
  std::vector<float> A(M * K, 0.5f), B(N * K, 0.25f), C(M * N);
  for (auto _ : st) {
    if (lib == 0)
      fc::kern::gemm(false, true, M, N, K, 1.f, A.data(), K, B.data(), K, 0.f, C.data(), N);
    else if (lib == 1)
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, K, 1.f, A.data(), K, B.data(), K,
                  0.f, C.data(), N);
    else
      fc::kern::ref::gemm(false, true, M, N, K, 1.f, A.data(), K, B.data(), K, 0.f, C.data(), N);
    benchmark::DoNotOptimize(C.data());
  }
  st.counters["GFLOP/s"] = benchmark::Counter(
      2.0 * M * N * K * st.iterations(), benchmark::Counter::kIsRate, benchmark::Counter::kIs1000);
}

// C = A B^T with bf16 A [M, K] and B [N, K], f32 C [M, N].
void BM_Bf16gemm_oneDNN(benchmark::State& st) {
  const int64_t M = st.range(0), N = st.range(1), K = st.range(2);
  std::vector<float> A(M * K, 0.5f), B(N * K, 0.25f), C(M * N);
  std::vector<uint16_t> Ah(M * K), Bh(N * K);
  fc::kern::f32_to_bf16(A.data(), Ah.data(), M * K);
  fc::kern::f32_to_bf16(B.data(), Bh.data(), N * K);
  for (auto _ : st) {
    fc::kern::gemm_typed(fc::DType::BF16, false, true, M, N, K, 1.f, Ah.data(), K, Bh.data(), K,
                         0.f, C.data(), N);
    benchmark::DoNotOptimize(C.data());
  }
  st.counters["GFLOP/s"] = benchmark::Counter(
      2.0 * M * N * K * st.iterations(), benchmark::Counter::kIsRate, benchmark::Counter::kIs1000);
}

void BM_Sgemm_oneDNN(benchmark::State& st) { run(st, 0); }
void BM_Sgemm_OpenBLAS(benchmark::State& st) { run(st, 1); }
void BM_Sgemm_Reference(benchmark::State& st) { run(st, 2); }

BENCHMARK(BM_Sgemm_oneDNN)->Apply(Shapes)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Bf16gemm_oneDNN)->Apply(Shapes)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Sgemm_OpenBLAS)->Apply(Shapes)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Sgemm_Reference)->Args({256, 256, 32})->UseRealTime()->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
