// Training path of the Evoformer block: per-module forward that saves what backward needs, and
// the exact backward, both chunked along the module's batch-like axis. Recompute policies reuse
// these functions unchanged, so gradients do not depend on the policy:
//   none   - every module's state from the forward is kept until backward;
//   module - ("small") only each module's input is kept; backward rebuilds the state one chunk at a
//            time (recompute that chunk, back-propagate it, free it, next chunk);
//   block  - ("large") only the block input is kept; backward re-runs the whole block forward with
//            policy none, then runs the block backward.
//
// Chunk axes (sizes from the BlockContext: ctx.chunk items, or automatic from
// ctx.chunk_target_bytes through pick_chunk; the *_train_chunk functions below give them):
//   attention      batch items: MSA rows (row att.), MSA columns (column att.), pair rows i
//                  (tri. att. start) or columns j (end); the [H, L, L] bias from z is built once
//                  by row blocks of z and its gradient accumulates over the chunks;
//   transitions    rows of the stream;
//   OPM            residue blocks i of the outer product (the rest is [s, r, c_o]-sized);
//   tri. mult.     channel groups for the projections and triangle products (A, B and their
//                  gradients), pair rows i for LN_out, linear_z and the gate.
//
// Conventions for every *_backward below:
//  - the module computed out = in + f(in) in place on its stream; the backward reads the module
//    input (x_in: the caller's copy of the stream before the module) and on entry d_stream holds
//    dL/d out, on exit dL/d in (= dL/d out + J_f^T dL/d out): each chunk first copies what it needs
//    of dL/d out, then ACCUMULATES into its own part of d_stream (and into the other stream's
//    gradient, if the module read it);
//  - a state filled by the forward (policy none) is consumed: the backward frees each chunk's part
//    as soon as that chunk is done; an empty state (policy module) makes the backward recompute
//    each chunk's part from x_in just before it is needed;
//  - parameter gradients ACCUMULATE into `g` (a BlockWeights-shaped gradient struct, zeroed once).
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "foldcube/model.h"
#include "foldcube/tensor.h"
#include "model/block_table.h"
#include "model/common.h"
#include "model/modules.h"
#include "model/weights.h"

namespace fc {

// Allocates gradient storage shaped like the weights, zero-filled.
void allocate_block_grads(const EvoformerConfig& cfg, BlockWeights* g);
void allocate_block_grads(const EvoformerConfig& cfg, ExtraMsaBlockWeights* g);

// ---- Chunk sizes (also read by the memory model, src/plan/memory_model.cc) ---------------------
// Attention over N items of L positions, c channels, hc = H*C: items per chunk.
int64_t attention_train_chunk(const BlockContext& ctx, int64_t N, int64_t L, int64_t c, int64_t hc);
// Rows i of z per block of the pair-bias branch (H heads).
int64_t bias_train_chunk(const BlockContext& ctx, int64_t H);
// Transition on [rows, c] with hidden nc: rows per chunk.
int64_t transition_train_chunk(const BlockContext& ctx, int64_t rows, int64_t c, int64_t nc);
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

// ---- Gated attention modules (MSA row / column, triangle start / end) -------------------------
// The attention runs over a stream viewed as N batch items of L positions with c channels
// (transposed modules read columns with strides; see attention_module in modules.cc).
struct AttentionChunk {
  Tensor qkvg;  // [n*L, 4*H*C] q | k | v | g (pre-sigmoid gate) of the chunk's n items
  Tensor og;    // [n*L, H*C]   gated attention output (input of linear_o)
  Tensor lse;   // [n, H, L]     log-sum-exp of the logits per query (saved for the backward)
};
struct AttentionState {
  Tensor bias;                         // [H, L, L] pair/triangle bias (undefined for column att.)
  std::vector<AttentionChunk> chunks;  // in chunk order; empty: the backward recomputes them
};

// st == nullptr: nothing is kept (the forward under policy module).
void msa_row_attention_train(const MsaRowAttentionW& w, const BlockContext& ctx, float* m,
                             const float* z, AttentionState* st);
// m_in [s, r, c_m], z_in [r, r, c_z]: the module's inputs.
void msa_row_attention_backward(const MsaRowAttentionW& w, MsaRowAttentionW* g,
                                const BlockContext& ctx, const float* m_in, const float* z_in,
                                AttentionState* st, float* dm, float* dz);
void msa_column_attention_train(const MsaColumnAttentionW& w, const BlockContext& ctx, float* m,
                                AttentionState* st);
void msa_column_attention_backward(const MsaColumnAttentionW& w, MsaColumnAttentionW* g,
                                   const BlockContext& ctx, const float* m_in, AttentionState* st,
                                   float* dm);
void triangle_attention_train(const TriangleAttentionW& w, const BlockContext& ctx, bool ending,
                              float* z, AttentionState* st);
void triangle_attention_backward(const TriangleAttentionW& w, TriangleAttentionW* g,
                                 const BlockContext& ctx, bool ending, const float* z_in,
                                 AttentionState* st, float* dz);

// ---- Transitions ------------------------------------------------------------------------------
struct TransitionState {
  std::vector<Tensor> h;  // per row chunk [n, n_t*c] relu(linear_1(LN(x))); empty: recomputed
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

// ---- Global column attention (ExtraMSA) -------------------------------------------------------
// m [s, r, c_e] += GlobalAttention(LN(m^T)) per residue column b (see modules.h), chunked over the
// columns. Per column: x = LN(m[:, b]) [s, c_e]; mu = sum_j mask[j] x[j] / (sum_j mask[j] + eps);
// q = mu W_q^T [H*C]; k, v = x W_{k,v}^T [s, C] (one head); o[h] = softmax_j(q_h.k_j / sqrt(C) +
// maskbias[j]) v [H*C]; y[j] = o * sigmoid(x[j] W_g^T + b_g); update = y W_o^T + b_o. No dropout.
struct GlobalAttentionChunk {
  Tensor kvg;  // [n*s, 2C + H*C] k | v | g (pre-sigmoid gate) of the chunk's n columns
  Tensor q;    // [n, H*C] queries (from the masked means)
  Tensor o;    // [n, H*C] attention output before gating
  Tensor lse;  // [n, H]   log-sum-exp of each query's logits
};
struct GlobalAttentionState {
  std::vector<GlobalAttentionChunk> chunks;  // in chunk order; empty: the backward recomputes
};
// Columns per chunk of the training forward and backward.
int64_t global_attention_train_chunk(const BlockContext& ctx);
// st == nullptr: nothing is kept (policy module). eps: ctx.global_eps.
void msa_column_global_attention_train(const MsaColumnGlobalAttentionW& w, const BlockContext& ctx,
                                       float* m, GlobalAttentionState* st);
// m_in [s, r, c_e]: the module input; conventions as above.
void msa_column_global_attention_backward(const MsaColumnGlobalAttentionW& w,
                                          MsaColumnGlobalAttentionW* g, const BlockContext& ctx,
                                          const float* m_in, GlobalAttentionState* st, float* dm);

// ---- Outer product mean -----------------------------------------------------------------------
struct OuterProductMeanState {
  Tensor mean, rstd;  // [s*r]
  Tensor x_ln;        // [s*r, c_m]
  Tensor a, b;        // [s, r, c_o] masked projections
  Tensor norm;        // [r, r]  sum_s mask[s,i] mask[s,j]
  // The outer product [r*r, c_o*c_o] is not kept: backward recomputes it chunk by chunk.
};
// z == nullptr: only the state is built (the recompute of policy module), z is not updated.
void outer_product_mean_train(const OuterProductMeanW& w, const BlockContext& ctx, const float* m,
                              float* z, OuterProductMeanState* st);
// m_in [s, r, c_m]: the module input. dz is only read (the module leaves z's own gradient
// unchanged); dm accumulates.
void outer_product_mean_backward(const OuterProductMeanW& w, OuterProductMeanW* g,
                                 const BlockContext& ctx, const float* m_in,
                                 const OuterProductMeanState& st, const float* dz, float* dm);

// ---- Triangle multiplication ------------------------------------------------------------------
// The saved state is the triangle products only; LN_in(z), the projections, A and B are rebuilt
// group by group in the backward (they are 6 c_t r^2 floats, the products c_t r^2).
struct TriangleMultiplicationState {
  Tensor P;  // [c_t, r, r] triangle products, channel-major; undefined: recomputed
};
void triangle_multiplication_train(const TriangleMultiplicationW& w, const BlockContext& ctx,
                                   bool outgoing, float* z, TriangleMultiplicationState* st);
// z_in [r, r, c_z]: the module input.
void triangle_multiplication_backward(const TriangleMultiplicationW& w, TriangleMultiplicationW* g,
                                      const BlockContext& ctx, bool outgoing, const float* z_in,
                                      TriangleMultiplicationState* st, float* dz);

// ---- Per-layer dispatch over the block table (src/model/block_table.h) -------------------------
// A layer's saved state under policy none (the member of the layer's kind is used).
struct LayerState {
  AttentionState att;
  GlobalAttentionState global;
  TransitionState trans;
  OuterProductMeanState opm;
  TriangleMultiplicationState tri;
};
// The training forward of layer l on m [s, r, c_m], z [r, r, c_z] (`block`: the table's weight
// struct); st == nullptr keeps nothing (policy module).
void layer_train(const LayerDesc& l, const void* block, const BlockContext& ctx, float* m, float* z,
                 LayerState* st);
// Its backward (conventions above): x_in is the layer's input of the stream it updates, read_in
// of the stream it reads (see saved_inputs); st as layer_train filled it, or empty (the layer
// recomputes what it needs chunk by chunk); `grads` is shaped like `block` and accumulates.
void layer_backward(const LayerDesc& l, const void* block, void* grads, const BlockContext& ctx,
                    const float* x_in, const float* read_in, LayerState* st, float* dm, float* dz);

// ---- Stack-level training over a block table (src/model/train_block.cc) ------------------------
// User errors for a policy list of the wrong length or negative chunk settings (nb blocks).
Status check_train_options(const TrainOptions& opts, int nb);
// The training context over prepared inputs: chunking from opts (automatic target:
// default_train_chunk_target_bytes), dropout on when opts.dropout.
BlockContext train_context(const EvoformerConfig& cfg, const StackInputs& in,
                           const TrainOptions& opts);
// One training step over the blocks w (weight structs of table t's type): the forward with
// every layer's training function under each block's policy (m, z updated in place to the
// outputs), then the backward from dL/d outputs grad_out_m, grad_out_z. alloc_grads(b) zero-fills
// grads[b] (the same struct type) just before block b's backward. out gets dL/d input m and z,
// times, activation bytes and the tracked peak (not grad_params: names are the caller's). A layer
// reading a stream that no later layer of its block updates reads the block's output.
// head (the Evoformer's single projection s = linear(m[0]), or nullptr): its backward adds dL/d s's
// share to dm[0] before the blocks' backward; after them (block 0's inputs freed first, so the
// step's peak is the blocks'), its parameter gradients go to head->gw, head->gb (zero when
// head->grad is undefined) and s to out->s. Without a head out->s is undefined.
struct SingleHead {
  const Tensor& w;     // [c_s, c_m]
  const Tensor& b;     // [c_s]
  const Tensor& grad;  // [r, c_s] dL/d s, or undefined (no loss on s)
  Tensor gw, gb;       // out: [c_s, c_m], [c_s] dL/d w, b
};
// Cancelled when cancel_requested() (foldcube/runtime.h) turns true between blocks.
Status train_blocks(const BlockTable& t, const std::vector<const void*>& w,
                    const std::vector<void*>& grads, const std::function<void(int)>& alloc_grads,
                    const BlockContext& ctx, const TrainOptions& opts, Tensor& m, Tensor& z,
                    const Tensor& grad_out_m, const Tensor& grad_out_z, TrainResult* out,
                    SingleHead* head = nullptr);

// ---- Pieces for sharded training (Dynamic Axial Parallelism, src/exec/dap_train.cc) -----------
// Gated attention over S [N, L, c] (batch over N, attention over L) with a given pair bias
// [H, L, L] (or nullptr) and mask_bias [N, L]; `module` (golden trace name) selects the dropout
// mask, which is [L, c] shared over N, so a shard of the N items sees the mask of one process. The
// single-process modules above run the same chunk functions (bit-identical per item).
void attention_rows_train(const LayerNormW& ln, const GatedAttentionW& w, int64_t H, int64_t C,
                          const char* module, const BlockContext& ctx, float* S, int64_t N,
                          int64_t L, int64_t c, const float* mask_bias, const float* bias,
                          AttentionState* st);
// S_in [N, L, c]: the input; dS: dL/d out on entry, dL/d in on exit; dbias [H, L, L] ACCUMULATES
// the bias gradient (nullptr when bias is nullptr). st: as attention_rows_train filled it (its
// chunks are consumed) or empty (recomputed per chunk); st->bias is not used.
void attention_rows_backward(const LayerNormW& ln, const GatedAttentionW& w, LayerNormW* gln,
                             GatedAttentionW* gw, int64_t H, int64_t C, const char* module,
                             const BlockContext& ctx, const float* S_in, float* dS, int64_t N,
                             int64_t L, int64_t c, const float* mask_bias, const float* bias,
                             AttentionState* st, float* dbias);
// Adjoint of pair_bias_permute(transposed = false): dt [r*r, H] with dt[(q, k), h] =
// dbias[h][q][k] for dbias [H, r, r].
void pair_bias_unpermute(const float* dbias, int64_t r, int64_t H, float* dt);
// Backward of pair_bias_project on `rows` rows z [rows, r, c_z] (r = ctx.r): given dt
// [rows*r, H], dz [rows, r, c_z] += dL/dz (LN(z) recomputed by row blocks); the parameter
// gradients of ln and lin accumulate.
void pair_bias_project_backward(const LayerNormW& ln, const LinearW& lin, LayerNormW* gln,
                                LinearW* glin, const BlockContext& ctx, const float* z,
                                int64_t rows, const float* dt, float* dz);

// Sums every shard's all [parts*count] block-wise and leaves this shard's block in mine [count]
// (the adjoint of ShardGather: the executor's reduce-scatter).
struct ShardReduce {
  int parts = 1;
  std::function<void(const float* all, int64_t count, float* mine)> fn;
};

// Outer product mean on a residue-column shard (training): m [s, cols, c_m] holds MSA columns
// [col0, col0+cols) (ctx.s = s, ctx.r = r columns in all, ctx.msa_mask [s, r] in full), mask_cols
// [s, cols] their mask; z [cols, r, c_z] (pair rows col0..) += the update, or nullptr (only the
// state is built). The state holds this shard's part: mean, rstd [s*cols], x_ln [s*cols, c_m],
// a, b [s, cols, c_o], norm [cols, r]; gather collects every shard's b (forward and backward).
void outer_product_mean_shard_train(const OuterProductMeanW& w, const BlockContext& ctx,
                                    const float* m, int64_t col0, int64_t cols,
                                    const float* mask_cols, const ShardGather& gather, float* z,
                                    OuterProductMeanState* st);
// dz [cols, r, c_z] is only read; dm [s, cols, c_m] accumulates. The gradient of every shard's b
// is summed to its shard by reduce (the adjoint of the forward's gather).
void outer_product_mean_shard_backward(const OuterProductMeanW& w, OuterProductMeanW* g,
                                       const BlockContext& ctx, const float* m_in, int64_t cols,
                                       const float* mask_cols, const OuterProductMeanState& st,
                                       const ShardGather& gather, const ShardReduce& reduce,
                                       const float* dz, float* dm);

// Triangle multiplication in outgoing form on a row shard (training), as
// triangle_multiplication_shard: z [rows, r, c_z] holds rows row0.. (r = ctx.r), mask [rows, r];
// p[i, j] = sum_k L[i, k] R[j, k] with L this shard's projection and R every shard's, gathered one
// channel group at a time. left_is_b = false: the outgoing module on z (dropout mask over (j, c),
// shared over the rows); true: the incoming module on z^T (mask^T; its dropout mask, over the
// columns of z, applies per row of z^T). st->P [c_t, rows, r] kept when st is non-null.
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

}  // namespace fc
