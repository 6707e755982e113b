// Training path of the Evoformer block: per-module forward that saves what backward needs, and
// the exact backward. Recompute policies reuse these functions unchanged, so gradients do not
// depend on the policy:
//   none   - every module's state from the forward is kept until backward;
//   module - ("small") only each module's input is kept; backward re-runs that module's training
//            forward to rebuild its state, then runs its backward;
//   block  - ("large") only the block input is kept; backward re-runs the whole block forward with
//            policy none, then runs the block backward.
//
// Conventions for every *_backward below:
//  - the module computed out = in + f(in) in place on its stream; on entry d_stream holds dL/d out,
//    on exit dL/d in (= dL/d out + J_f^T dL/d out): backward first copies what it needs of
//    dL/d out, then ACCUMULATES into d_stream (and into the other stream's gradient, if the module
//    read it);
//  - parameter gradients ACCUMULATE into `g` (a BlockWeights-shaped gradient struct, zeroed once).
#pragma once

#include <cstdint>

#include "foldcube/tensor.h"
#include "model/modules.h"
#include "model/weights.h"

namespace fc {

// Allocates gradient storage shaped like the weights, zero-filled.
void allocate_block_grads(const EvoformerConfig& cfg, BlockWeights* g);

// ---- Gated attention modules (MSA row / column, triangle start / end) -------------------------
// The attention runs over a stream viewed as N batch items of L positions with c channels
// (transposed modules gather columns; see attention_module in modules.cc).
struct AttentionState {
  Tensor x_in;        // [N, L, c]   module input (gathered layout)
  Tensor mean, rstd;  // [N*L]       LayerNorm statistics
  Tensor x_ln;        // [N, L, c]
  Tensor qkvg;        // [N*L, 4*H*C] q | k | v | g (pre-sigmoid gate)
  Tensor og;          // [N*L, H*C]  gated attention output (input of linear_o)
  // Pair/triangle bias branch (undefined for MSA column attention).
  Tensor b_in;            // [r*r, c_z]  the z the bias was computed from
  Tensor b_mean, b_rstd;  // [r*r]
  Tensor b_ln;            // [r*r, c_z]
  Tensor bias;            // [H, L, L]
};

void msa_row_attention_train(const MsaRowAttentionW& w, const BlockContext& ctx, float* m,
                             const float* z, AttentionState* st);
void msa_row_attention_backward(const MsaRowAttentionW& w, MsaRowAttentionW* g,
                                const BlockContext& ctx, const AttentionState& st, float* dm,
                                float* dz);
void msa_column_attention_train(const MsaColumnAttentionW& w, const BlockContext& ctx, float* m,
                                AttentionState* st);
void msa_column_attention_backward(const MsaColumnAttentionW& w, MsaColumnAttentionW* g,
                                   const BlockContext& ctx, const AttentionState& st, float* dm);
void triangle_attention_train(const TriangleAttentionW& w, const BlockContext& ctx, bool ending,
                              float* z, AttentionState* st);
void triangle_attention_backward(const TriangleAttentionW& w, TriangleAttentionW* g,
                                 const BlockContext& ctx, bool ending, const AttentionState& st,
                                 float* dz);

// ---- Transitions ------------------------------------------------------------------------------
struct TransitionState {
  Tensor x_in;        // [rows, c]
  Tensor mean, rstd;  // [rows]
  Tensor x_ln;        // [rows, c]
  Tensor h;           // [rows, n*c]  relu(linear_1(x_ln))
};
void transition_train(const TransitionW& w, const BlockContext& ctx, float* x, int64_t rows,
                      int64_t c, TransitionState* st);
void transition_backward(const TransitionW& w, TransitionW* g, const BlockContext& ctx,
                         const TransitionState& st, float* dx, int64_t rows, int64_t c);

// ---- Outer product mean -----------------------------------------------------------------------
struct OuterProductMeanState {
  Tensor m_in;        // [s*r, c_m]
  Tensor mean, rstd;  // [s*r]
  Tensor x_ln;        // [s*r, c_m]
  Tensor a, b;        // [s, r, c_o] masked projections
  Tensor norm;        // [r, r]  sum_s mask[s,i] mask[s,j]
  // The outer product [r*r, c_o*c_o] is not kept: backward recomputes it chunk by chunk.
};
void outer_product_mean_train(const OuterProductMeanW& w, const BlockContext& ctx, const float* m,
                              float* z, OuterProductMeanState* st);
// dz is only read (the module leaves z's own gradient unchanged); dm accumulates.
void outer_product_mean_backward(const OuterProductMeanW& w, OuterProductMeanW* g,
                                 const BlockContext& ctx, const OuterProductMeanState& st,
                                 const float* dz, float* dm);

// ---- Triangle multiplication ------------------------------------------------------------------
struct TriangleMultiplicationState {
  Tensor z_in;          // [r*r, c_z]
  Tensor mean, rstd;    // [r*r]       LN_in statistics
  Tensor x_ln;          // [r*r, c_z]
  Tensor t;             // [r*r, 4*c_t] a_p | a_g | b_p | b_g (pre-activation)
  Tensor A, B;          // [c_t, r, r] masked gated projections, channel-major
  Tensor p;             // [r*r, c_t]  triangle product, channel-last (LN_out input)
  Tensor mean2, rstd2;  // [r*r]       LN_out statistics
  Tensor p_ln;          // [r*r, c_t]
  Tensor y;             // [r*r, c_z]  linear_z(p_ln), before gating
  Tensor g;             // [r*r, c_z]  linear_g(x_ln), pre-sigmoid
};
void triangle_multiplication_train(const TriangleMultiplicationW& w, const BlockContext& ctx,
                                   bool outgoing, float* z, TriangleMultiplicationState* st);
void triangle_multiplication_backward(const TriangleMultiplicationW& w, TriangleMultiplicationW* g,
                                      const BlockContext& ctx, bool outgoing,
                                      const TriangleMultiplicationState& st, float* dz);

}  // namespace fc
