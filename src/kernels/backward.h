// Backward (gradient) kernels for training. Same contract as kernels.h:
//  - operates on caller-owned memory (raw pointers + sizes + leading dimensions, in elements);
//  - never allocates; scratch, where needed, is passed in and its size is given by a
//    *_scratch_floats() function;
//  - row-parallel kernels split rows with OpenMP themselves; called from inside a parallel region
//    they run on the calling thread (nested parallelism is off).
// Gradient conventions:
//  - parameter gradients (dW, db, dgamma, dbeta, d_pair_bias) always ACCUMULATE (+=), so that
//    chunks of a batch and recomputed blocks can sum into one buffer;
//  - input gradients (dx, da, dg, ...) OVERWRITE by default, or add when `accumulate` is true.
// Determinism: every kernel gives bit-identical results for the same inputs and thread count.
// Reductions over rows or over the batch run in a fixed order that does not depend on how work is
// split, so results are also independent of the thread count, except for linear_backward (oneDNN
// GEMM) and attention's d_pair_bias when there are more threads than heads (see below).
// Every kernel has a naive reference in namespace fc::kern::ref (src/kernels/backward_ref.cc); the
// fast ones (src/kernels/backward.cc) are tested against it and the references against finite
// differences (tests/backward_test.cc), and both are benchmarked (bench/backward_bench.cc).
#pragma once

#include <cstdint>

#include "kernels/kernels.h"

namespace fc::kern {

// ---- Linear ------------------------------------------------------------------------------------
// Forward (kern::linear): y[rows, out] = x[rows, in] @ W[out, in]^T + b[out]. Given dy [rows, out]:
//   dx[rows, in] = dy @ W            (overwrite, or += when accumulate; dx == nullptr skips it)
//   dW[out, in] += dy^T @ x          (dense, ld = in; nullptr skips it)
//   db[out]     += sum over rows of dy (nullptr skips it; summed in double, column-parallel)
// The products go through kern::gemm (oneDNN): bit-identical for a fixed thread count only.
// dx must not alias dy, x or W.
void linear_backward(const float* x, int64_t ldx, int64_t rows, int64_t in, const float* W,
                     int64_t out, const float* dy, int64_t lddy, float* dx, int64_t lddx, float* dW,
                     float* db, bool accumulate = false);

// ---- LayerNorm ---------------------------------------------------------------------------------
// Forward (kern::layernorm): y = xhat * gamma + beta, xhat = (x - mean) * rstd per row of n, with
// mean/rstd [rows] saved by the forward. Given x, dy:
//   dx = rstd * (g - mean_n(g) - xhat * mean_n(g * xhat)),  g = dy * gamma
//        (overwrite, or += when accumulate; without accumulate dx may alias dy or x)
//   dgamma[n] += sum over rows of dy * xhat,  dbeta[n] += sum over rows of dy  (either may be null)
// Rows go in fixed blocks of 256; each block writes its partial dgamma/dbeta sums (float) to its
// own slot of scratch, and the slots are added in block order, in double, at the end. The split
// depends on rows only, so results do not depend on the thread count.
// Scratch: layernorm_backward_scratch_floats(rows, n) = ceil(rows / 256) * 2n floats (under 1% of
// x), needed only with dgamma or dbeta (otherwise scratch may be nullptr).
int64_t layernorm_backward_scratch_floats(int64_t rows, int64_t n);
void layernorm_backward(const float* x, int64_t ldx, const float* dy, int64_t lddy, int64_t rows,
                        int64_t n, const float* gamma, const float* mean, const float* rstd,
                        float* dx, int64_t lddx, float* dgamma, float* dbeta, float* scratch,
                        bool accumulate = false);

// ---- Row-wise and elementwise ------------------------------------------------------------------
// Every kernel below works on [rows, n] matrices with their own leading dimensions (>= n).

// Forward p = softmax_rows(x). dx = p * (dp - sum_j(dp * p)) per row (overwrite, or += when
// accumulate; without accumulate dx may alias p or dp). Rows of p that are all zero (fully masked
// with -inf) give dx = 0.
void softmax_backward(const float* p, int64_t ldp, const float* dp, int64_t lddp, float* dx,
                      int64_t lddx, int64_t rows, int64_t n, bool accumulate = false);

// Forward y = a * sigmoid(g) (kern::sigmoid_mul, a being the value before gating). Given dy:
//   da = dy * s,  dg = dy * a * s * (1 - s),  s = sigmoid(g)
// (overwrite, or += when accumulate; da or dg may be nullptr to skip it). s * (1 - s) is computed
// as e / (1 + e)^2 with e = exp(-|g|), accurate for any g. Without accumulate da and dg may alias
// dy, a or g (every element is read before it is written).
void sigmoid_mul_backward(const float* a, int64_t lda, const float* g, int64_t ldg, const float* dy,
                          int64_t lddy, float* da, int64_t ldda, float* dg, int64_t lddg,
                          int64_t rows, int64_t n, bool accumulate = false);

// Forward y = max(x, 0). dx = x > 0 ? dy : 0, where x may be the pre-activation or the output
// (both are > 0 at the same places). Overwrite, or += when accumulate; without accumulate dx may
// alias dy or x.
void relu_backward(const float* x, int64_t ldx, const float* dy, int64_t lddy, float* dx,
                   int64_t lddx, int64_t rows, int64_t n, bool accumulate = false);
// The same with x as bf16 bits (the bf16 training's kept ReLU output).
void relu_backward(const uint16_t* x, int64_t ldx, const float* dy, int64_t lddy, float* dx,
                   int64_t lddx, int64_t rows, int64_t n, bool accumulate = false);

// Forward y = silu(a) * b (kern::swiglu, a and b the values before gating). Given dy:
//   da = dy * b * s * (1 + a * (1 - s)),  db = dy * a * s,  s = sigmoid(a)
// Overwrite; da and db must not alias a, b or dy.
void swiglu_backward(const float* a, int64_t lda, const float* b, int64_t ldb, const float* dy,
                     int64_t lddy, float* da, int64_t ldda, float* db, int64_t lddb, int64_t rows,
                     int64_t n);

// ---- Gated multi-head attention ----------------------------------------------------------------
// Backward of kern::attention for the same AttentionArgs (a.o is not read). With
// S = logits, P = softmax(S), O = P V (before gating), sigma = sigmoid(gate):
//   dO = d_out * sigma,  dgate = d_out * O * sigma * (1 - sigma)
//   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dP * P))
//   dQ = scale * dS K,  dK = scale * dS^T Q,  d_pair_bias[h] += sum over b of dS
// The mask bias is a constant (no gradient). With a.bias_logits (no q.k term) q and k are not read
// and dq, dk are not written (skipped as if nullptr).
struct AttentionGrads {
  const float* d_out = nullptr;  // gradient of the gated output, layout of o (o_bs, o_rs)
  float* dq = nullptr;           // layout of q (q_bs, q_rs); overwritten; nullptr skips it
  float* dk = nullptr;           // layout of k; overwritten; nullptr skips it
  float* dv = nullptr;           // layout of v; overwritten; nullptr skips it
  float* dgate = nullptr;        // layout of gate; overwritten; nullptr (or no gate) skips it
  float* d_pair_bias = nullptr;  // [H, Lq, Lk]; ACCUMULATED over the batch; nullptr skips it
  const float* lse = nullptr;    // [B, H, Lq] saved by kern::attention (AttentionArgs::lse) for
                                 // the same inputs, or nullptr: P is then recomputed with a full
                                 // softmax (two more passes over each [tile, Lk] block)
};
// Work item = one (batch, head): K, V (and the dK, dV accumulators) packed densely, then query
// tiles: logits recomputed from q, k and the biases, P = exp(logit - lse) in one pass with the
// saved lse (a row whose float lse lost log(sum), like a fully masked -1e9 row, is renormalised),
// else a full softmax; then O = P V (with a gate), dV += P^T dO, dP = dO V^T,
// dS = P * (dP - D) with D = rowsum(dO * O) when lse and a gate are given (O is at hand), else
// rowsum(dP * P); dQ, dK += , d_pair_bias += dS. With or without lse the results agree to
// rounding (not bit for bit); each path keeps the determinism below. Scratch
// holds [tile, Lk] blocks per thread (plus one [Lq, Lk] slot in the third schedule below). dq, dk,
// dv, dgate come from one item each: bit-identical across runs and thread counts. The sum of
// d_pair_bias over the batch never waits for other threads and is deterministic:
//  - no d_pair_bias: (b, h) items, dynamically scheduled;
//  - when H is a multiple of the thread count, or at least 4x it: heads as tasks; a thread runs all
//    batch elements of its head in order, adding each dS tile straight into d_pair_bias[h]. Every
//    element is summed over b = 0, 1, ... in order: the same bits for every such thread count, and
//    a call on a batch equals, bit for bit, calls on its batch elements one at a time;
//  - otherwise (more threads than heads): each thread a contiguous range of (b, h) items in
//    head-major order; a range that starts inside a head sums that head's part into its slot, the
//    slots being added to d_pair_bias after all ranges, in thread order. Bit-identical for a fixed
//    thread count; across thread counts equal to rounding.
// AttentionArgs::dtype BF16: every product above (the logits, O, dV, dP, dQ, dK) takes bf16-rounded
// inputs (q, k, v, dO, P and dS rounded per tile) with f32 accumulation (gemm_typed); the
// softmax, its backward, the gate and every sum stay f32. The scratch then holds the bf16 copies
// as well. Determinism as in f32.
// Outputs must not alias inputs; dq, dk, dv, dgate may share one buffer (interleaved like
// q | k | v | g) since items write disjoint columns.
// Fully masked key rows (mask bias -1e9 everywhere) give the same uniform softmax as the forward
// and finite gradients.
// Scratch: attention_backward_scratch_floats(a, threads, pair_bias_grad) floats for the same
// threads as the call; pass pair_bias_grad = false only when d_pair_bias will be nullptr.
int64_t attention_backward_scratch_floats(const AttentionArgs& a, int threads,
                                          bool pair_bias_grad = true);
void attention_backward(const AttentionArgs& a, const AttentionGrads& g, float* scratch,
                        int threads);

namespace ref {
void linear_backward(const float* x, int64_t ldx, int64_t rows, int64_t in, const float* W,
                     int64_t out, const float* dy, int64_t lddy, float* dx, int64_t lddx, float* dW,
                     float* db, bool accumulate = false);
// Same signature as the fast kernel; scratch is not used (may be nullptr).
void layernorm_backward(const float* x, int64_t ldx, const float* dy, int64_t lddy, int64_t rows,
                        int64_t n, const float* gamma, const float* mean, const float* rstd,
                        float* dx, int64_t lddx, float* dgamma, float* dbeta, float* scratch,
                        bool accumulate = false);
void softmax_backward(const float* p, int64_t ldp, const float* dp, int64_t lddp, float* dx,
                      int64_t lddx, int64_t rows, int64_t n, bool accumulate = false);
void sigmoid_mul_backward(const float* a, int64_t lda, const float* g, int64_t ldg, const float* dy,
                          int64_t lddy, float* da, int64_t ldda, float* dg, int64_t lddg,
                          int64_t rows, int64_t n, bool accumulate = false);
void relu_backward(const float* x, int64_t ldx, const float* dy, int64_t lddy, float* dx,
                   int64_t lddx, int64_t rows, int64_t n, bool accumulate = false);
void relu_backward(const uint16_t* x, int64_t ldx, const float* dy, int64_t lddy, float* dx,
                   int64_t lddx, int64_t rows, int64_t n, bool accumulate = false);
void swiglu_backward(const float* a, int64_t lda, const float* b, int64_t ldb, const float* dy,
                     int64_t lddy, float* da, int64_t ldda, float* db, int64_t lddb, int64_t rows,
                     int64_t n);
// Naive attention backward, one (b, h) at a time in double: P and dS [Lq, Lk] and dO [Lq, C] of
// one item in scratch of attention_backward_scratch_floats(a) floats. g.lse is ignored: P always
// comes from a full softmax, the exact value the fast kernel's lse path is tested against.
int64_t attention_backward_scratch_floats(const AttentionArgs& a);
void attention_backward(const AttentionArgs& a, const AttentionGrads& g, float* scratch);
}  // namespace ref

}  // namespace fc::kern
