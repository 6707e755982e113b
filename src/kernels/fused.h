// Fused kernels: LayerNorm + Linear, the whole transition (LayerNorm -> Linear -> ReLU ->
// Linear -> residual add) and the triangle multiplication's projection and output phases. Rows are
// processed in cache-sized row blocks: each thread normalises a block of rows into its own scratch
// and runs the GEMM(s) on it while it is hot, so no normalised copy (or hidden activation) of more
// than one block per thread ever exists.
//
// Contract as kernels.h: caller-owned memory, no allocation (scratch passed in, its size from the
// *_scratch_floats function), parallel over row blocks with OpenMP (on the calling thread inside a
// parallel region). The row blocks are fixed by the shapes alone, so results do not depend on the
// thread count. Per row the arithmetic is the unfused sequence (kern::layernorm, kern::linear,
// kern::relu_inplace, kern::linear accumulating); only the GEMMs' row counts differ, so results
// equal the unfused ones within f32 rounding of the GEMM (tests/fused_test.cc).
//
// GEMM input type (`dtype`): F32, or BF16 — the normalised rows (and the transition's hidden
// activation) are rounded to bf16 in the block and multiplied by bf16 weights (W_bf16: the
// caller's bf16 copy of W) with f32 accumulation and f32 output (kern::gemm_typed, oneDNN
// matmul, single-threaded per block as the f32 GEMM); LayerNorm statistics, bias, ReLU and the
// residual add stay f32. Scratch per thread: the f32 block plus its bf16 copy.
#pragma once

#include <cstdint>

#include "foldcube/tensor.h"

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
  DType dtype = DType::F32;          // GEMM inputs: F32 or BF16
  const uint16_t* W_bf16 = nullptr;  // [out, in] bf16 bits of W (dtype BF16; W unused then)
};
// Rows per block (a multiple of 16 at least 16; depends on the shape and dtype only).
int64_t layernorm_linear_block_rows(int64_t in, int64_t out, DType dtype = DType::F32);
int64_t layernorm_linear_scratch_floats(const LayerNormLinearArgs& a, int threads);
void layernorm_linear(const LayerNormLinearArgs& a, float* scratch, int threads);

// y[b, l, :] += x[b*L + l, :] W^T + bias for b < B, l < L: a Linear whose output is a residual
// update of rows that may be strided (row (b, l) of y at y + b*y_bs + l*y_rs; x rows with leading
// dimension ldx). With strided rows each row block's product goes to per-thread scratch and is
// then added, so a GEMM never writes rows that are a power-of-two stride apart (an MSA column:
// 256 KiB at r=256), whose cache-set conflicts made that 2.5x slower; contiguous rows (y_rs = out,
// y_bs = L*out) get the bias added and the product accumulated in place (the scratch formula
// still counts the update slot). BF16: the block's x rows are rounded to bf16 in the slot and
// multiplied by W_bf16 with f32 accumulation (bias and the residual add f32).
struct LinearResidualArgs {
  int64_t B = 1, L = 0, in = 0, out = 0;
  const float* x = nullptr;
  int64_t ldx = 0;
  const float* W = nullptr;     // [out, in]
  const float* bias = nullptr;  // [out] or nullptr
  float* y = nullptr;
  int64_t y_bs = 0, y_rs = 0;
  DType dtype = DType::F32;          // GEMM inputs: F32 or BF16
  const uint16_t* W_bf16 = nullptr;  // [out, in] bf16 bits of W (dtype BF16; W unused then)
};
int64_t linear_residual_scratch_floats(const LinearResidualArgs& a, int threads);
void linear_residual(const LinearResidualArgs& a, float* scratch, int threads);

// x[r, :] += (relu(LN(x[r, :]) W1^T + b1) W2^T + b2) * (row_scale ? row_scale[r] : 1), r < rows.
// x [rows, c] contiguous, W1 [hidden, c], W2 [c, hidden]. Without row_scale the second Linear
// accumulates into x directly (kern::linear with accumulate); with it, the update is scaled and
// then added (the ExtraMSA masked transition).
// swiglu (AF3's SwiGLU transition): W1 [2 * hidden, c] holds fc1 then fc2 (b1 [2 * hidden]),
// and silu(fc1) * fc2 (kern::swiglu, f32) replaces the ReLU; with BF16 the gate is rounded to
// bf16 as the second Linear's input, as the ReLU's hidden is.
struct TransitionArgs {
  int64_t rows = 0, c = 0, hidden = 0;
  float* x = nullptr;
  const float* gamma = nullptr;  // [c]
  const float* beta = nullptr;   // [c]
  float eps = 1e-5f;
  const float* W1 = nullptr;          // [hidden, c]
  const float* b1 = nullptr;          // [hidden]
  const float* W2 = nullptr;          // [c, hidden]
  const float* b2 = nullptr;          // [c]
  const float* row_scale = nullptr;   // [rows] or nullptr
  bool swiglu = false;                // SwiGLU instead of ReLU (see above)
  DType dtype = DType::F32;           // GEMM inputs: F32 or BF16
  const uint16_t* W1_bf16 = nullptr;  // [hidden, c] (dtype BF16; W1, W2 unused then)
  const uint16_t* W2_bf16 = nullptr;  // [c, hidden]
};
int64_t transition_block_rows(int64_t c, int64_t hidden, DType dtype = DType::F32);
int64_t transition_scratch_floats(const TransitionArgs& a, int threads);
void transition(const TransitionArgs& a, float* scratch, int threads);

// The triangle multiplication's projection phase on one channel group, per row block: for the
// `rows` pairs p of x [rows, in] (ld ldx; with gamma, x is normalised per row block in the
// thread's scratch first, LN(x) = kern::layernorm), t[p, :] = x[p, :] W^T + bias
// with W [4*nc, in] the group's rows a_p | a_g | b_p | b_g, then
//   A[c * ld_ab + p] = (t[p, c] * sigmoid(t[p, nc + c])) * mask[p]              (a, c < nc)
//   B[c * ld_ab + p] = (t[p, 2nc + c] * sigmoid(t[p, 3nc + c])) * mask[p]       (b)
// written channel-major. Per row the arithmetic is the unfused sequence (kern::linear,
// sigmoid_inplace, mul_inplace, scale_rows, transpose); the block [rows of a block, 4*nc] stays in
// the thread's scratch (cache) between them.
// BF16: the block's (normalised) rows are rounded to bf16 in the slot and multiplied by W_bf16 with
// f32 accumulation (as layernorm_linear); the gate, mask and LayerNorm statistics stay f32, and A,
// B are written as bf16 (A_bf16, B_bf16; rounded in the transpose, kern::transpose_to_bf16) for
// the bf16 products.
struct GatedProjectionArgs {
  int64_t rows = 0, in = 0, nc = 0;
  const float* x = nullptr;  // [rows, in], leading dimension ldx
  int64_t ldx = 0;
  const float* gamma = nullptr;  // [in] LayerNorm of x, or nullptr (x already normalised)
  const float* beta = nullptr;   // [in]
  float eps = 1e-5f;
  const float* W = nullptr;     // [4*nc, in]
  const float* bias = nullptr;  // [4*nc] or nullptr
  const float* mask = nullptr;  // [rows]
  float* A = nullptr;           // [nc, ld_ab] (columns 0 .. rows-1 written; F32)
  float* B = nullptr;           // [nc, ld_ab] (F32)
  int64_t ld_ab = 0;
  DType dtype = DType::F32;          // GEMM inputs and A, B storage: F32 or BF16
  const uint16_t* W_bf16 = nullptr;  // [4*nc, in] bf16 bits of W (BF16; W unused then)
  uint16_t* A_bf16 = nullptr;        // [nc, ld_ab] bf16 bits (BF16; A, B unused then)
  uint16_t* B_bf16 = nullptr;        // [nc, ld_ab]
};
int64_t gated_projection_scratch_floats(const GatedProjectionArgs& a, int threads);
void gated_projection(const GatedProjectionArgs& a, float* scratch, int threads);

// The triangle multiplication's output phase, per row block: for the `rows` pairs p,
//   y = LN_p(P[:, p]) Wp^T + bp,  g = LN_z(z[p, :]) Wg^T + bg,  z[p, :] += y * sigmoid(g)
// with P channel-major [cp, ldp] (column p: the pair's cp products) and z [rows, cz] contiguous.
// Per row the arithmetic is the unfused sequence (kern::transpose, layernorm, linear, layernorm,
// linear, sigmoid_mul, add_inplace) on the thread's scratch block. BF16: both normalised blocks
// are rounded to bf16 in the slot and multiplied by Wp_bf16 / Wg_bf16 with f32 accumulation (as
// layernorm_linear); the statistics, biases, gate and residual add stay f32.
struct GatedOutputArgs {
  int64_t rows = 0, cp = 0, cz = 0;
  const float* P = nullptr;  // [cp, ldp]
  int64_t ldp = 0;
  const float* gamma_p = nullptr;  // [cp] LN_out
  const float* beta_p = nullptr;
  const float* Wp = nullptr;       // [cz, cp] linear_z
  const float* bp = nullptr;       // [cz] or nullptr
  float* z = nullptr;              // [rows, cz]
  const float* gamma_z = nullptr;  // [cz] LN_in
  const float* beta_z = nullptr;
  const float* Wg = nullptr;  // [cz, cz] linear_g
  const float* bg = nullptr;  // [cz] or nullptr
  float eps = 1e-5f;
  DType dtype = DType::F32;           // GEMM inputs: F32 or BF16
  const uint16_t* Wp_bf16 = nullptr;  // [cz, cp] bf16 bits of Wp (dtype BF16; Wp unused then)
  const uint16_t* Wg_bf16 = nullptr;  // [cz, cz] bf16 bits of Wg (dtype BF16; Wg unused then)
};
int64_t gated_output_scratch_floats(const GatedOutputArgs& a, int threads);
void gated_output(const GatedOutputArgs& a, float* scratch, int threads);

namespace ref {
// One row at a time in double (statistics, dot products); with BF16 the normalised row (and the
// hidden row) is rounded to bf16 (kern::ref::f32_to_bf16) and multiplied by W_bf16 in double
// (kern::ref::gemm_bf16). Scratch: 2 * in (2 * (c + hidden), SwiGLU 2 * (c + 2 * hidden))
// floats; linear_residual: out + in floats with BF16, none with F32.
void layernorm_linear(const LayerNormLinearArgs& a, float* scratch);
void linear_residual(const LinearResidualArgs& a, float* scratch = nullptr);  // BF16: in floats
void transition(const TransitionArgs& a, float* scratch);
// One row at a time in double (dot products), sigmoid in double; scratch: in floats (LN row),
// plus in / 2 + 1 with BF16 (the row's bf16; A and B rounded to bf16 from the double result).
void gated_projection(const GatedProjectionArgs& a, float* scratch);
// One row at a time; scratch: cp + 3 * cz floats, plus max(cp, cz) / 2 + 1 with BF16.
void gated_output(const GatedOutputArgs& a, float* scratch);
}  // namespace ref

}  // namespace fc::kern
