// Compute kernels. Contract for every kernel here:
//  - operates on caller-owned memory (raw pointers + sizes + leading dimensions, in elements);
//  - never allocates; scratch, where needed, is passed in and its size is given by a
//  *_scratch_floats()
//    function;
//  - row-parallel kernels split rows with OpenMP themselves; called from inside a parallel region
//    they run on the calling thread (nested parallelism is off).
// Every kernel has a naive reference in namespace fc::kern::ref with the same signature; the fast
// one is tested against it (tests/kernels_test.cc) and benchmarked (bench/kernels_bench.cc).
#pragma once

#include <cstdint>

#include "foldcube/tensor.h"

namespace fc::kern {

// ---- GEMM (oneDNN dnnl_sgemm; see docs/gemm.md) ----------------------------------------------
// Row-major C[M,N] = alpha * op(A) op(B) + beta * C, op(X) = X or X^T.
// A is [M,K] (lda >= K) or, if trans_a, [K,M] (lda >= M); B is [K,N] or, if trans_b, [N,K].
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
          int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

// Batched: batch b uses A + b*stride_a, B + b*stride_b, C + b*stride_c. Parallel over the batch
// when it is large enough, each product single-threaded; otherwise products run one at a time.
void gemm_batched(int64_t batch, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
                  float alpha, const float* A, int64_t lda, int64_t stride_a, const float* B,
                  int64_t ldb, int64_t stride_b, float beta, float* C, int64_t ldc,
                  int64_t stride_c);

// Linear layer, PyTorch convention: y[rows, out] = x[rows, in] @ W[out, in]^T (+ b[out]).
// bias may be nullptr. accumulate=true adds into y instead of overwriting it.
void linear(const float* x, int64_t ldx, int64_t rows, int64_t in, const float* W, const float* b,
            int64_t out, float* y, int64_t ldy, bool accumulate = false);

// ---- Row-wise and elementwise kernels --------------------------------------------------------
// Every kernel below works on a [rows, n] matrix with leading dimension ld >= n.

// y = (x - mean) * rstd * gamma + beta over each row of n; biased variance; in place allowed
// (x == y, ldx == ldy). mean/rstd ([rows]) receive the statistics when non-null.
void layernorm(const float* x, int64_t ldx, float* y, int64_t ldy, int64_t rows, int64_t n,
               const float* gamma, const float* beta, float eps, float* mean = nullptr,
               float* rstd = nullptr);

// layernorm writing the bf16 rounding (kern::f32_to_bf16's) of each output, y [rows, n] bf16
// with leading dimension ldy: the same bits as layernorm followed by f32_to_bf16 (the bf16
// training's GEMM input straight from the LayerNorm).
void layernorm_bf16(const float* x, int64_t ldx, uint16_t* y, int64_t ldy, int64_t rows, int64_t n,
                    const float* gamma, const float* beta, float eps, float* mean = nullptr,
                    float* rstd = nullptr);

// In-place softmax over each row. A row whose max is -inf yields zeros (never NaN).
void softmax_rows(float* x, int64_t ld, int64_t rows, int64_t n);

// y *= sigmoid(g), elementwise.
void sigmoid_mul(float* y, int64_t ldy, const float* g, int64_t ldg, int64_t rows, int64_t n);

// x = sigmoid(x), in place.
void sigmoid_inplace(float* x, int64_t ld, int64_t rows, int64_t n);

// x = max(x, 0), in place.
void relu_inplace(float* x, int64_t ld, int64_t rows, int64_t n);

// SwiGLU gating (AF3 transitions): a = silu(a) * b = a * sigmoid(a) * b, in place on a
// (src/kernels/swiglu.cc).
void swiglu(float* a, int64_t lda, const float* b, int64_t ldb, int64_t rows, int64_t n);

// y += x (residual update).
void add_inplace(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t rows, int64_t n);

// y[r, :] += bias[:] for every row.
void add_bias_rows(float* y, int64_t ldy, const float* bias, int64_t rows, int64_t n);

// ---- Layout and broadcast kernels (src/kernels/layout.cc) ---------------------------------------
// dst[c * ldd + r] = src[r * lds + c] for a [rows, cols] source (cache-blocked, parallel).
void transpose(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t rows, int64_t cols);
// y *= x, elementwise.
void mul_inplace(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t rows, int64_t n);
// y[r, :] *= s[r] for every row.
void scale_rows(float* y, int64_t ldy, const float* s, int64_t rows, int64_t n);

// ---- Gated multi-head attention with additive biases ------------------------------------------
// For every batch b, head h, query i, key j (channel index h*C + c, "head-major"):
//   logit[i,j] = scale * q[b,i,h,:]·k[b,j,h,:] + mask_bias[b,j] + pair_bias[h,i,j]
//   o[b,i,h,:] = softmax_j(logit[i,:]) @ v[b,:,h,:]       (then, with a gate: o *= sigmoid(gate))
// Element (b, i, h*C+c) of X lives at X[b*X_bs + i*X_rs + h*C + c] for X in q, k, v, o, gate.
// mask_bias: [B, Lk] contiguous or nullptr; pair_bias: [H, Lq, Lk] contiguous or nullptr.
// gate (or nullptr) holds pre-sigmoid values g; the kernel multiplies o by sigmoid(g).
// A row whose logits are all -inf gives o = 0 (never NaN) and lse = -inf; a row of finite mask
// biases (OpenFold's -1e9 on every key) gives the softmax of its logits, uniform when they round to
// the same float. o may alias q (same strides): each query tile is read before it is written.
struct AttentionArgs {
  int64_t B = 0, Lq = 0, Lk = 0, H = 0, C = 0;
  float scale = 1.f;
  const float* q = nullptr;
  int64_t q_bs = 0, q_rs = 0;
  const float* k = nullptr;
  int64_t k_bs = 0, k_rs = 0;
  const float* v = nullptr;
  int64_t v_bs = 0, v_rs = 0;
  const float* mask_bias = nullptr;
  const float* pair_bias = nullptr;
  const float* gate = nullptr;
  int64_t g_bs = 0, g_rs = 0;
  float* o = nullptr;
  int64_t o_bs = 0, o_rs = 0;
  float* lse = nullptr;  // [B, H, Lq] natural-log sum-exp of the logits per query, written when
                         // non-null (saved for attention_backward, see backward.h)
  // Inputs of the two products: F32, or BF16 — q, k, v and the (unnormalised) probabilities are
  // rounded to bf16 and multiplied with f32 accumulation (src/kernels/attention_bf16.h); the
  // biases, the softmax statistics, the gate and o stay f32. Same scratch in both.
  DType dtype = DType::F32;
  // Bias-only logits (AF3 pair-weighted averaging, which has no query or key projection): logits
  // = mask_bias + pair_bias; q, k and scale are not read (q and k may be null). The backward
  // (backward.h) then writes no dq, dk.
  bool bias_logits = false;
};
// Flash-style kernel: query tiles sweep key tiles with an online softmax, so neither [H, Lq, Lk]
// nor a [query tile, Lk] block is ever formed. Results are bit-identical across runs and thread
// counts. Scratch: attention_scratch_floats(args, threads) floats (per thread: one item's packed
// K and V, about 2 * Lk * C floats, plus tiles of a few thousand floats).
int64_t attention_scratch_floats(const AttentionArgs& a, int threads);
void attention(const AttentionArgs& a, float* scratch, int threads);

namespace ref {
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
          int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);
void linear(const float* x, int64_t ldx, int64_t rows, int64_t in, const float* W, const float* b,
            int64_t out, float* y, int64_t ldy, bool accumulate = false);
void layernorm(const float* x, int64_t ldx, float* y, int64_t ldy, int64_t rows, int64_t n,
               const float* gamma, const float* beta, float eps, float* mean = nullptr,
               float* rstd = nullptr);
// ref::layernorm rounded to bf16 by ref::f32_to_bf16.
void layernorm_bf16(const float* x, int64_t ldx, uint16_t* y, int64_t ldy, int64_t rows, int64_t n,
                    const float* gamma, const float* beta, float eps, float* mean = nullptr,
                    float* rstd = nullptr);
void softmax_rows(float* x, int64_t ld, int64_t rows, int64_t n);
void sigmoid_mul(float* y, int64_t ldy, const float* g, int64_t ldg, int64_t rows, int64_t n);
void sigmoid_inplace(float* x, int64_t ld, int64_t rows, int64_t n);
void relu_inplace(float* x, int64_t ld, int64_t rows, int64_t n);
void swiglu(float* a, int64_t lda, const float* b, int64_t ldb, int64_t rows, int64_t n);
void add_inplace(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t rows, int64_t n);
void add_bias_rows(float* y, int64_t ldy, const float* bias, int64_t rows, int64_t n);
void transpose(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t rows, int64_t cols);
void mul_inplace(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t rows, int64_t n);
void scale_rows(float* y, int64_t ldy, const float* s, int64_t rows, int64_t n);
// Naive attention in double: one [Lk] logit row at a time in scratch of Lk floats; writes lse
// (rounded to float) when a.lse is non-null. BF16: q, k and v are rounded to bf16 (the
// probabilities are not).
void attention(const AttentionArgs& a, float* scratch);
}  // namespace ref

}  // namespace fc::kern
