// The AF2 transition as one layer unit: x += linear_2(relu(linear_1(LN(x)))) on the rows of a
// stream, chunked over rows, with its masked ExtraMSA form; inference (fused or reference path),
// training forward with saved state and exact backward, chunk and workspace formulas, and the
// work and allocation replay the planner's models use.
#pragma once

#include <cstdint>
#include <vector>

#include "foldcube/tensor.h"
#include "layers/context.h"
#include "layers/layer_models.h"
#include "model/weights.h"

namespace fc {

// ---- Spec: LN -> linear_1 (c -> nc = transition_n * c, bias) -> ReLU -> linear_2 (nc -> c, bias)
// -> residual add, on the rows of a stream (MSA positions or pairs). The ExtraMSA block's masked
// form multiplies each row's update by its MSA mask.

// ---- Inference -------------------------------------------------------------------------------
// x [rows, c] += Transition(x).
void transition(const TransitionW& w, const BlockContext& ctx, float* x, int64_t rows, int64_t c);
// ExtraMSA transition: m [s*r, c_m] += Transition(m) * msa_mask (one mask value per row). Its chunk
// buffers are those of transition(), and so is its workspace.
void masked_msa_transition(const TransitionW& w, const BlockContext& ctx, float* m);
// Rows per chunk of the unfused path: LN(x) [ch, c] and the hidden chunk [ch, nc].
int64_t transition_chunk(const BlockContext& ctx, int64_t rows, int64_t c, int64_t nc);
// Peak bytes either form allocates on x [rows, c] (fused: the kernel's scratch and the bf16 weight
// copies; unfused: the chunk buffers).
int64_t transition_bytes(const BlockContext& ctx, int64_t rows, int64_t c, int64_t nc);

// ---- Training (conventions: src/model/train.h) ------------------------------------------------
struct TransitionState {
  // per row chunk [n, n_t*c] relu(linear_1(LN(x))) (bf16 values, kept in bf16, under
  // BlockContext::store BF16); empty: recomputed
  std::vector<Tensor> h;
};
// row_mask [rows] (or nullptr): the update of row i is multiplied by row_mask[i] (the ExtraMSA
// block's masked MSA transition, ctx.msa_mask); the masked forms take one more [n, c] buffer per
// chunk (the update, resp. its masked gradient).
void transition_train(const TransitionW& w, const BlockContext& ctx, float* x, int64_t rows,
                      int64_t c, TransitionState* st, const float* row_mask = nullptr);
// x_in [rows, c]: the module input.
void transition_backward(const TransitionW& w, TransitionW* g, const BlockContext& ctx,
                         const float* x_in, TransitionState* st, float* dx, int64_t rows, int64_t c,
                         const float* row_mask = nullptr);
// Transition on [rows, c] with hidden nc: rows per chunk.
int64_t transition_train_chunk(const BlockContext& ctx, int64_t rows, int64_t c, int64_t nc);
// Bytes of its chunk buffers per row.
int64_t transition_train_row_bytes(int64_t c, int64_t nc);

// ---- Models ------------------------------------------------------------------------------------
// Work of a transition on [rows, c] with hidden n*c (inference, or training with ch.training);
// rb (training, may be null) receives what its backward rebuilds under policy module.
LayerWork transition_work(int64_t rows, int64_t c, int64_t n, const WorkChunks& ch, LayerWork* rb);
// The training forward's allocations (keep: the state stays, policy none) and the backward's
// (kept: the forward's state is live); masked: the ExtraMSA MSA transition.
void transition_train_replay(AllocReplay& S, const BlockContext& ctx, int64_t rows, int64_t c,
                             int64_t nc, bool keep, bool masked);
void transition_backward_replay(AllocReplay& S, const BlockContext& ctx, int64_t rows, int64_t c,
                                int64_t nc, bool kept, bool masked);

}  // namespace fc
