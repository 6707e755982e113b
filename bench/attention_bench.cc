// Attention kernel: fast (flash-style, src/kernels/attention.cc) vs the naive reference, at the
// shapes of MSA row attention (B=s items of L=r, 8 heads x 32) and triangle attention (4 heads x
// 32): chunks, and whole Evoformer module calls (BM_AttentionEvoformer). The old-vs-new and
// backward with-vs-without-lse comparisons are in attention_compare_bench.cc.
#include <benchmark/benchmark.h>

#include <cmath>
#include <vector>

#include "core/rng.h"
#include "foldcube/runtime.h"
#include "kernels/kernels.h"

namespace {

struct Buffers {
  std::vector<float> qkvg, mask, bias, scratch;
  fc::kern::AttentionArgs a;
};

// Layout as in the model: q | k | v | g interleaved in one [B*L, 4*H*C] buffer.
Buffers make(int64_t B, int64_t L, int64_t H, int64_t C, bool ref, bool pair = true,
             bool mask_gate = true) {
  Buffers b;
  const int64_t ld = 4 * H * C;
  b.qkvg.resize(B * L * ld);
  for (size_t i = 0; i < b.qkvg.size(); ++i) b.qkvg[i] = fc::uniform_pm1(1, i);
  b.mask.assign(B * L, 0.f);  // [B, L]
  b.bias.resize(H * L * L);   // [H, L, L]
  for (size_t i = 0; i < b.bias.size(); ++i) b.bias[i] = fc::uniform_pm1(2, i);
  fc::kern::AttentionArgs& a = b.a;
  a.B = B, a.Lq = L, a.Lk = L, a.H = H, a.C = C, a.scale = 1.f / std::sqrt(static_cast<float>(C));
  float* p = b.qkvg.data();
  a.q = p, a.k = p + H * C, a.v = p + 2 * H * C, a.gate = p + 3 * H * C, a.o = p;
  a.q_bs = a.k_bs = a.v_bs = a.g_bs = a.o_bs = L * ld;
  a.q_rs = a.k_rs = a.v_rs = a.g_rs = a.o_rs = ld;
  a.mask_bias = mask_gate ? b.mask.data() : nullptr;
  a.pair_bias = pair ? b.bias.data() : nullptr;
  if (!mask_gate) a.gate = nullptr;
  b.scratch.resize(ref ? L : fc::kern::attention_scratch_floats(a, fc::num_threads()));
  return b;
}

void BM_Attention(benchmark::State& st) {
  const int64_t B = st.range(0), L = st.range(1), H = st.range(2), C = st.range(3);
  Buffers b = make(B, L, H, C, false);
  for (auto _ : st) fc::kern::attention(b.a, b.scratch.data(), fc::num_threads());
  st.counters["GFLOP/s"] =
      benchmark::Counter(4.0 * B * H * L * L * C * st.iterations(), benchmark::Counter::kIsRate,
                         benchmark::Counter::kIs1000);
}

void BM_AttentionReference(benchmark::State& st) {
  const int64_t B = st.range(0), L = st.range(1), H = st.range(2), C = st.range(3);
  Buffers b = make(B, L, H, C, true);
  for (auto _ : st) fc::kern::ref::attention(b.a, b.scratch.data());
  st.counters["GFLOP/s"] =
      benchmark::Counter(4.0 * B * H * L * L * C * st.iterations(), benchmark::Counter::kIsRate,
                         benchmark::Counter::kIs1000);
}

BENCHMARK(BM_Attention)
    ->Args({16, 256, 8, 32})
    ->Args({16, 256, 4, 32})
    ->Args({32, 128, 8, 32})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
// Args: B, L, H, C, pair bias (0/1), mask and gate (0/1), bf16 products (0/1, optional). Whole
// module calls at r = 256 residues, s = 128 sequences: MSA row attention (pair bias), MSA column
// attention, triangle attention, and a long sequence (8 rows of 2048 residues, pair bias only), in
// fp32 and with bf16 products. Output into a separate buffer.
void BM_AttentionEvoformer(benchmark::State& st) {
  const int64_t B = st.range(0), L = st.range(1), H = st.range(2), C = st.range(3);
  Buffers b = make(B, L, H, C, false, st.range(4) != 0, st.range(5) != 0);
  std::vector<float> o(B * L * H * C);  // [B*L, H*C]
  b.a.o = o.data(), b.a.o_bs = L * H * C, b.a.o_rs = H * C;
  if (st.range(6) != 0) b.a.dtype = fc::DType::BF16;
  for (auto _ : st) fc::kern::attention(b.a, b.scratch.data(), fc::num_threads());
  st.counters["GFLOP/s"] =
      benchmark::Counter(4.0 * B * H * L * L * C * st.iterations(), benchmark::Counter::kIsRate,
                         benchmark::Counter::kIs1000);
}
BENCHMARK(BM_AttentionEvoformer)
    ->Args({128, 256, 8, 32, 1, 1, 0})
    ->Args({128, 256, 8, 32, 1, 1, 1})
    ->Args({256, 128, 8, 32, 0, 1, 0})
    ->Args({256, 128, 8, 32, 0, 1, 1})
    ->Args({256, 256, 4, 32, 1, 1, 0})
    ->Args({256, 256, 4, 32, 1, 1, 1})
    ->Args({8, 2048, 4, 32, 1, 0, 0})
    ->Args({8, 2048, 4, 32, 1, 0, 1})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

BENCHMARK(BM_AttentionReference)
    ->Args({1, 256, 8, 32})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

void BM_GemmBatched(benchmark::State& st) {
  // Triangle multiplication: c_t products of r x r x r.
  const int64_t batch = st.range(0), n = st.range(1);
  std::vector<float> A(batch * n * n, 0.5f), B(batch * n * n, 0.25f), C(batch * n * n);
  for (auto _ : st)
    fc::kern::gemm_batched(batch, false, true, n, n, n, 1.f, A.data(), n, n * n, B.data(), n, n * n,
                           0.f, C.data(), n, n * n);
  st.counters["GFLOP/s"] =
      benchmark::Counter(2.0 * batch * n * n * n * st.iterations(), benchmark::Counter::kIsRate,
                         benchmark::Counter::kIs1000);
}
BENCHMARK(BM_GemmBatched)
    ->Args({128, 256})
    ->Args({128, 128})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace

int main(int argc, char** argv) {
  fc::set_num_threads(0);
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  return 0;
}
