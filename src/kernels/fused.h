// Fused kernels: LayerNorm + Linear and the whole transition (LayerNorm -> Linear -> ReLU ->
// Linear -> residual add). Rows are processed in cache-sized row blocks: each thread normalises a
// block of rows into its own scratch and runs the GEMM(s) on it while it is hot, so no normalised
// copy (or hidden activation) of more than one block per thread ever exists.
//
// Contract as kernels.h: caller-owned memory, no allocation (scratch passed in, its size from the
// *_scratch_floats function), parallel over row blocks with OpenMP (on the calling thread inside a
// parallel region). The row blocks are fixed by the shapes alone, so results do not depend on the
// thread count. Per row the arithmetic is the unfused sequence (kern::layernorm, kern::linear,
// kern::relu_inplace, kern::linear accumulating); only the GEMMs' row counts differ, so results
// equal the unfused ones within f32 rounding of the GEMM (tests/fused_test.cc).
#pragma once

#include <cstdint>

namespace fc::kern {

// y[b*L + l, :] = LN(x[b, l, :]) W^T + bias   (accumulate: y += ...), for b < B, l < L.
// Row (b, l) of x lives at x + b*x_bs + l*x_rs (in floats; `in` contiguous floats), so strided
// views (a column of the MSA stream) are read in place. y rows have leading dimension ldy.
struct LayerNormLinearArgs {
  int64_t B = 1, L = 0, in = 0, out = 0;
  const float* x = nullptr;
  int64_t x_bs = 0, x_rs = 0;
  const float* gamma = nullptr;  // [in]
  const float* beta = nullptr;   // [in]
  float eps = 1e-5f;
  const float* W = nullptr;     // [out, in]
  const float* bias = nullptr;  // [out] or nullptr
  float* y = nullptr;
  int64_t ldy = 0;
  bool accumulate = false;
};
// Rows per block (a multiple of 16 at least 16; depends on in and out only).
int64_t layernorm_linear_block_rows(int64_t in, int64_t out);
int64_t layernorm_linear_scratch_floats(const LayerNormLinearArgs& a, int threads);
void layernorm_linear(const LayerNormLinearArgs& a, float* scratch, int threads);

// x[r, :] += (relu(LN(x[r, :]) W1^T + b1) W2^T + b2) * (row_scale ? row_scale[r] : 1), r < rows.
// x [rows, c] contiguous, W1 [hidden, c], W2 [c, hidden]. Without row_scale the second Linear
// accumulates into x directly (kern::linear with accumulate); with it, the update is scaled and
// then added (the ExtraMSA masked transition).
struct TransitionArgs {
  int64_t rows = 0, c = 0, hidden = 0;
  float* x = nullptr;
  const float* gamma = nullptr;  // [c]
  const float* beta = nullptr;   // [c]
  float eps = 1e-5f;
  const float* W1 = nullptr;         // [hidden, c]
  const float* b1 = nullptr;         // [hidden]
  const float* W2 = nullptr;         // [c, hidden]
  const float* b2 = nullptr;         // [c]
  const float* row_scale = nullptr;  // [rows] or nullptr
};
int64_t transition_block_rows(int64_t c, int64_t hidden);
int64_t transition_scratch_floats(const TransitionArgs& a, int threads);
void transition(const TransitionArgs& a, float* scratch, int threads);

namespace ref {
// One row at a time in double (statistics, dot products); scratch: in (c + hidden) floats.
void layernorm_linear(const LayerNormLinearArgs& a, float* scratch);
void transition(const TransitionArgs& a, float* scratch);
}  // namespace ref

}  // namespace fc::kern
