// The outer product mean as one layer unit: inference (fused LayerNorm-Linear projections, bf16
// products when asked), training forward with saved state, exact backward, the residue-column
// shard forms (DAP), chunk and workspace formulas, work estimate and allocation replay.
#pragma once

#include <cstdint>
#include <vector>

#include "foldcube/tensor.h"
#include "layers/context.h"
#include "layers/layer_models.h"
#include "model/weights.h"

namespace fc {

// ---- Spec: a, b = (LN(m) W_12^T + b_12) * mask, [s, r, c_o] each; outer[i, j] = sum_s
// a[s, i] (x) b[s, j] [c_o * c_o]; z[i, j] += (W_out outer[i, j] + b_out) / (norm[i, j] + eps)
// with norm = sum_s mask[s, i] mask[s, j] (AF2), or W_out outer / max(norm, 1) + b_out (AF3,
// mean_first).

// ---- Inference ---------------------------------------------------------------------------------
void outer_product_mean(const OuterProductMeanW& w, const BlockContext& ctx, const float* m,
                        float* z);
// Outer product mean of a residue-column shard: m [s, cols, c_m] holds columns [col0, col0+cols)
// of the MSA stream (s = ctx.s, r = ctx.r columns in all; ctx.msa_mask [s, r] in full), mask_cols
// [s, cols] their mask; z [cols, r, c_z] (pair rows col0..) += the update. gather collects the
// right projection [s, cols, c_o] of every shard (its shards are consecutive column blocks), in
// chunks of opm_msa_row_chunk MSA rows: with more than one chunk the update is summed chunk by
// chunk (not bit-identical to one process; within fp32 rounding) and the gathered projection is
// never whole. With bf16 products (fused bf16) the gathered projection is one process's bf16 b
// [s, r, c_o] (gathered as f32 in row chunks) and the outer products are one process's GEMM on
// this shard's rows.
void outer_product_mean_shard(const OuterProductMeanW& w, const BlockContext& ctx, const float* m,
                              int64_t col0, int64_t cols, const float* mask_cols,
                              const ShardGather& gather, float* z);
// Workspace of the shard form on `cols` of the ctx.r residues with `parts` shards (the
// single-process layer is parts = 1 on all r): in one chunk of MSA rows a, b [s, cols, c_o]
// beside the projection chunk, then a, every shard's b, the mask counts [cols, r] and the
// outer-product chunk; in chunks of sc rows the mask counts, a, b [sc, cols, c_o], every shard's b
// of the chunk and the outer-product chunk, beside the projection chunk; with bf16 products a, b
// in bf16 and, on a shard, every shard's b [s, r, c_o] in bf16 (beside the gather's f32 chunks).
int64_t outer_product_mean_shard_bytes(const BlockContext& ctx, int64_t cols, int parts);
// MSA rows per chunk of the shard form (parts > 1, f32 products): from the chunk target
// ((2 + parts) cols c_o floats per row), but at least min(s, 4 c_z) rows so that repeating
// linear_out per chunk costs at most ~1/4 of the outer products; ctx.chunk when forced; s (one
// chunk) for one shard or bf16 products.
int64_t opm_msa_row_chunk(const BlockContext& ctx, int64_t cols, int64_t parts);
// MSA rows per chunk of the projections on `cols` columns; pair rows i per chunk of the outer
// product on `cols` rows, forward (o, p, y) and backward (o, p, dp, dy).
int64_t opm_projection_chunk(const BlockContext& ctx, int64_t cols);
int64_t opm_outer_chunk(const BlockContext& ctx, int64_t cols);
int64_t opm_outer_backward_chunk(const BlockContext& ctx, int64_t cols);
// Bytes of the outer-product backward's chunk buffers per pair row i.
int64_t opm_outer_backward_item_bytes(const BlockContext& ctx);
// The outer product's two layouts for n rows i of r residues: o [n*c_o, r*c_o] as its GEMM writes
// it ((i, c), (j, e)) and p [n*r, c_o*c_o] ((i, j), (c, e)) as linear_out reads it.
void opm_pairs_from_outer(const float* o, int64_t n, int64_t r, int64_t co, float* p);
void opm_outer_from_pairs(const float* p, int64_t n, int64_t r, int64_t co, float* o);
// The same with ca channels c of a (channel-parallel: fewer than the c_o channels e of b):
// o [n*ca, r*c_o], p [n*r, ca*c_o].
void opm_pairs_from_outer(const float* o, int64_t n, int64_t r, int64_t ca, int64_t co, float* p);
void opm_outer_from_pairs(const float* p, int64_t n, int64_t r, int64_t ca, int64_t co, float* o);
// Channels of a the weights hold: rows of w.l12 beyond b's c_o (c_o, unless the executor gave
// this rank a slice of a's channels: channel-parallel, where the inference form runs the training
// form and the sharded forms are not used).
int64_t opm_a_channels(const OuterProductMeanW& w, const EvoformerConfig& cfg);
// The OPM's residual update of `rows` pairs from y = linear_out.w outer [rows, c_z] (without the
// bias when w.mean_first, else with it) and norm [rows] = sum_s mask[s,i] mask[s,j]: z [rows, c_z]
// += y / (norm + eps_opm) (AF2), or y / max(norm, 1) + linear_out.b (AF3, w.mean_first).
void opm_residual(const OuterProductMeanW& w, const EvoformerConfig& cfg, const float* y,
                  const float* norm, int64_t rows, float* z);

// ---- Training (conventions: src/model/train.h) ------------------------------------------------
// Saved: s*r*(c_m + 2 c_o + 2) + r*r floats (the input m is the caller's).
struct OuterProductMeanState {
  Tensor mean, rstd;  // [s*r]
  // Under BlockContext::store BF16: bf16 values, and in bf16 while kept (opm_state_to_store).
  Tensor x_ln;  // [s*r, c_m]
  Tensor a, b;  // [s, r, c_o] masked projections
  Tensor norm;  // [r, r]  sum_s mask[s,i] mask[s,j]
  // The outer product [r*r, c_o*c_o] is not kept: backward recomputes it chunk by chunk.
};
// The kept state's LN(m), a and b in the storage type (to_store), and back in f32 (from_store),
// with their replays.
void opm_state_to_store(const BlockContext& ctx, OuterProductMeanState* st);
void opm_state_from_store(OuterProductMeanState* st);
void opm_state_to_store_replay(AllocReplay& S, const BlockContext& ctx);
void opm_state_from_store_replay(AllocReplay& S, const BlockContext& ctx);
// z == nullptr: only the state is built (the recompute of policy module), z is not updated.
void outer_product_mean_train(const OuterProductMeanW& w, const BlockContext& ctx, const float* m,
                              float* z, OuterProductMeanState* st);
// m_in [s, r, c_m]: the module input. dz is only read (the module leaves z's own gradient
// unchanged); dm accumulates.
void outer_product_mean_backward(const OuterProductMeanW& w, OuterProductMeanW* g,
                                 const BlockContext& ctx, const float* m_in,
                                 const OuterProductMeanState& st, const float* dz, float* dm);
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

// ---- Models ------------------------------------------------------------------------------------
// Work of the layer; rb: LayerNorm, the masked projections a, b and the mask normaliser (the outer
// product is rebuilt by every backward, counted in re_batched).
LayerWork opm_work(const EvoformerConfig& cfg, int64_t s, int64_t r, const WorkChunks& ch,
                   LayerWork* rb);
// Floats of the training state (OuterProductMeanState).
int64_t opm_state_floats(const BlockContext& ctx);
// The training forward's allocations (z_update: the forward adds into z, else only the state is
// built, the module-policy recompute; keep: the state stays) and the backward's.
void opm_train_replay(AllocReplay& S, const BlockContext& ctx, bool z_update, bool keep);
void opm_backward_replay(AllocReplay& S, const BlockContext& ctx);

}  // namespace fc
