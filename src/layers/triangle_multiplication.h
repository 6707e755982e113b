// The triangle multiplication (outgoing and incoming) as one layer unit: inference by channel
// groups (fused LayerNorm-Linear, bf16 products when asked), training forward keeping the
// products, exact backward, the row-shard forms (DAP), chunk and workspace formulas, work
// estimates and allocation replay.
#pragma once

#include <cstdint>
#include <vector>

#include "foldcube/tensor.h"
#include "layers/context.h"
#include "layers/layer_models.h"
#include "model/weights.h"

namespace fc {

// ---- Spec: LN_in(z) -> a_p | a_g | b_p | b_g (fused storage w.ab [4 c_t, c_z], biases optional:
// AF3 has none) -> a = a_p * sigmoid(a_g) * mask, b likewise; outgoing p[i, j] = sum_k a[i, k]
// b[j, k], incoming p[i, j] = sum_k a[k, i] b[k, j]; z += sigmoid(LN_in(z) W_g^T + b_g) *
// (LN_out(p) W_z^T + b_z). Phase 1 (projections, products) runs by channel groups, phase 2 (the
// output side) by pair rows. Channel-parallel (ctx.channel_sum set): the weights hold this rank's
// c_t = cfg.c_hidden_mul channels (a, b, LN_out, the columns of linear_z), LN_out's statistics
// are summed over the ranks through the hook, and the update is this rank's partial sum of
// linear_z (the inference form runs the training form).

// ---- Inference ---------------------------------------------------------------------------------
void triangle_multiplication(const TriangleMultiplicationW& w, const BlockContext& ctx,
                             bool outgoing, float* z);
// Triangle multiplication in outgoing form on a row shard: z [rows, r, c_z] (r = ctx.r) with mask
// [rows, r]; p[i, j] = sum_k L[i, k] R[j, k] where L is the shard's own projection and R is
// gathered from all shards (consecutive row blocks of `rows`). L = a, R = b is the outgoing
// module on z; L = b, R = a is the incoming module on z^T (with mask^T).
void triangle_multiplication_shard(const TriangleMultiplicationW& w, const BlockContext& ctx,
                                   bool left_is_b, int64_t rows, const float* mask,
                                   const ShardGather& gather, float* z);
// Workspace of the shard form on `rows` of the ctx.r rows with `parts` shards (the
// single-process layer is parts = 1 on all r): the products [c_t, rows, r] beside phase 1 (A, B,
// LN_in(z), the projection chunk, a group's weights and the gathered right operand) or the
// output chunk.
int64_t triangle_multiplication_shard_bytes(const BlockContext& ctx, int64_t rows, int parts);
// Phase 1 of the triangle multiplication (A, B and their products).
struct TriMulPhase1 {
  int64_t cg = 0;        // channels per group: A_g, B_g [cg, r, r]
  int64_t ch = 0;        // rows of z per chunk: projections [ch*r, 4*cg] (and LN_in(z) [ch*r, c_z])
  bool keep_ln = false;  // LN_in(z) [r*r, c_z] computed once, not per chunk and group
  int64_t bytes = 0;     // workspace besides P
};
// Phase 1's plan on `rows` rows of z (ctx.r for one shard); parts > 1 adds the gathered right
// projection of a group [parts*cg, rows, r].
TriMulPhase1 tri_mul_phase1(const BlockContext& ctx, int64_t rows, int64_t parts);
// Pair rows per chunk of the output side (pc, y, g and LN_in(z) or the fused kernel's scratch).
int64_t tri_mul_output_chunk(const BlockContext& ctx, int64_t rows);

// ---- Training (conventions: src/model/train.h) ------------------------------------------------
// Triangle multiplication: channels per group (A, B and their gradients, products), pair rows i
// per block of a group's projections (t, dt), and pair rows i per chunk of the output side
// (LN_out, linear_z, gate).
struct TriMulTrainChunks {
  int64_t group = 0, proj_rows = 0, rows = 0;
};
TriMulTrainChunks tri_mul_train_chunks(const BlockContext& ctx);
// The same for a shard of `rows` of the r rows whose right operand is gathered from `parts` shards
// (DAP, triangle_multiplication_shard_*); parts = 0: one process (nothing gathered).
TriMulTrainChunks tri_mul_train_chunks(const BlockContext& ctx, int64_t rows, int64_t parts);
// Bytes of the largest of these chunk buffers when each loop runs in one chunk (one process).
int64_t tri_mul_train_whole_bytes(const BlockContext& ctx);
// The saved state is the triangle products only; LN_in(z), the projections, A and B are rebuilt
// group by group in the backward (they are 6 c_t r^2 floats, the products c_t r^2).
struct TriangleMultiplicationState {
  // [c_t, r, r] triangle products, channel-major (bf16 values, kept in bf16, under
  // BlockContext::store BF16); undefined: recomputed
  Tensor P;
};
void triangle_multiplication_train(const TriangleMultiplicationW& w, const BlockContext& ctx,
                                   bool outgoing, float* z, TriangleMultiplicationState* st);
// z_in [r, r, c_z]: the module input.
void triangle_multiplication_backward(const TriangleMultiplicationW& w, TriangleMultiplicationW* g,
                                      const BlockContext& ctx, bool outgoing, const float* z_in,
                                      TriangleMultiplicationState* st, float* dz);
// Triangle multiplication in outgoing form on a row shard (training), as
// triangle_multiplication_shard: z [rows, r, c_z] holds rows row0.. (r = ctx.r), mask [rows, r];
// p[i, j] = sum_k L[i, k] R[j, k] with L this shard's projection and R every shard's, gathered one
// channel group at a time. left_is_b = false: the outgoing module on z (dropout mask over (j, c),
// shared over the rows); true: the incoming module on z^T (mask^T; its dropout mask, over the
// columns of z, applies per row of z^T). AF3's per-row masks (one draw per global row i of z)
// apply per row on z and shared over the rows on z^T. st->P [c_t, rows, r] kept when st is
// non-null.
void triangle_multiplication_shard_train(const TriangleMultiplicationW& w, const BlockContext& ctx,
                                         bool left_is_b, int64_t rows, int64_t row0,
                                         const float* mask, const ShardGather& gather, float* z,
                                         TriangleMultiplicationState* st);
// z_in [rows, r, c_z]: the module input; dz: dL/d out on entry, dL/d in on exit. R's gradient of
// every shard is summed to its shard by reduce (adjoint of the gather), per channel group.
void triangle_multiplication_shard_backward(const TriangleMultiplicationW& w,
                                            TriangleMultiplicationW* g, const BlockContext& ctx,
                                            bool left_is_b, int64_t rows, int64_t row0,
                                            const float* mask, const ShardGather& gather,
                                            const ShardReduce& reduce, const float* z_in,
                                            TriangleMultiplicationState* st, float* dz);

// ---- Models ------------------------------------------------------------------------------------
// Work of the inference layer: the input projections by row chunks (all channels), the products,
// the output side by row chunks.
LayerWork trimul_work(const EvoformerConfig& cfg, int64_t r, const WorkChunks& ch);
// Work of the training layer (channel groups as tri_mul_train_chunks picks them); rb: LN_in(z) and
// the products P (projections, gating, batched products), not the output side.
LayerWork trimul_train_work(const EvoformerConfig& cfg, int64_t r, const BlockContext& ctx,
                            LayerWork* rb);
// The training forward's allocations (keep: P stays) and the backward's (kept: P is live).
void tri_mul_train_replay(AllocReplay& S, const BlockContext& ctx, bool keep);
void tri_mul_backward_replay(AllocReplay& S, const BlockContext& ctx, bool kept);

}  // namespace fc
