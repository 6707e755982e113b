// LayerNorm+Linear as one layer unit: the pair-bias projection of the attention layers with pair
// bias (MSA row attention, triangle attention, AF3 single attention and pair-weighted averaging),
// t = LN(z) W^T chunked over rows of z; inference (fused LayerNorm-Linear kernel or reference
// path), training forward and exact backward, its shard forms (DAP: a block of rows, the
// permutation apart) and its workspace, chunk and allocation-replay formulas. The fused
// LayerNorm-Linear inside other layers (q|k|v|g, the OPM and triangle projections) is the kernel
// kern::layernorm_linear (src/kernels/fused.h), called by those layers.
#pragma once

#include <cstdint>
#include <vector>

#include "foldcube/tensor.h"
#include "layers/context.h"
#include "layers/layer_models.h"
#include "model/weights.h"

namespace fc {

// ---- Spec: t = LN(z) W^T with W [H, c_z] and no bias: one value per pair and head, permuted
// into bias [H, r, r] (bias[h][q][k] = t[(q, k), h], or t[(k, q), h] for the ending-node /
// transposed form).

// ---- Inference ---------------------------------------------------------------------------------
// Pair-bias projection of `rows` rows of a pair stream z [rows, r, c_z] (r = ctx.r):
// t [rows*r, H] with t[(q, k), h] = (LN(z) W^T)[q, k, h].
void pair_bias_project(const LayerNormW& ln, const LinearW& lin, const BlockContext& ctx,
                       const float* z, int64_t rows, float* t);
// Its workspace on `rows` rows with H = lin.w.dim(0) heads.
int64_t pair_bias_project_bytes(const BlockContext& ctx, int64_t rows, int64_t H);
// bias [H, r, r] from t [r*r, H]: bias[h][q][k] = t[(q, k), h], or t[(k, q), h] when transposed.
void pair_bias_permute(const float* t, int64_t r, int64_t H, bool transposed, float* bias);
// Rows of z per chunk of pair_bias_project's unfused path (LN(z) of the chunk [ch*r, c_z]).
int64_t pair_bias_chunk(const BlockContext& ctx, int64_t rows);
// bias [H, r, r] from the pair stream: bias[h][q][k] = (LN(z) W^T)[q, k, h] (or [k, q, h] when
// transposed). Allocates t [r*r, H] plus an LN chunk.
Tensor pair_bias_heads(const LayerNormW& ln, const LinearW& lin, const BlockContext& ctx,
                       const float* z, bool transposed);
// Its peak bytes: bias and t, beside pair_bias_project's workspace on all r rows.
int64_t pair_bias_heads_bytes(const BlockContext& ctx, int64_t H);

// ---- Training ----------------------------------------------------------------------------------
// Rows i of z per block of the pair-bias branch (H heads).
int64_t bias_train_chunk(const BlockContext& ctx, int64_t H);
// Bytes of its block buffers per row of z.
int64_t bias_train_row_bytes(const BlockContext& ctx, int64_t H);
// The training forward of pair_bias_heads by blocks of bias_train_chunk rows of z.
Tensor pair_bias_train(const LayerNormW& ln, const LinearW& lin, const BlockContext& ctx,
                       const float* z, bool transposed);
// Bias branch backward, by blocks of rows of z: dz += d(bias)/dz^T dbias (LN(z) recomputed);
// parameter gradients accumulate.
void pair_bias_backward(const LayerNormW& ln, const LinearW& lin, LayerNormW* gln, LinearW* glin,
                        const BlockContext& ctx, bool transposed, const float* z,
                        const float* dbias, float* dz);
// Adjoint of pair_bias_permute(transposed = false): dt [r*r, H] with dt[(q, k), h] =
// dbias[h][q][k] for dbias [H, r, r].
void pair_bias_unpermute(const float* dbias, int64_t r, int64_t H, float* dt);
// Backward of pair_bias_project on `rows` rows z [rows, r, c_z] (r = ctx.r): given dt
// [rows*r, H], dz [rows, r, c_z] += dL/dz (LN(z) recomputed by row blocks); the parameter
// gradients of ln and lin accumulate.
void pair_bias_project_backward(const LayerNormW& ln, const LinearW& lin, LayerNormW* gln,
                                LinearW* glin, const BlockContext& ctx, const float* z,
                                int64_t rows, const float* dt, float* dz);

// ---- Models ------------------------------------------------------------------------------------
// The training forward's allocations: bias [H, r, r] stays; a row block's LN and projection are
// transient.
void pair_bias_train_replay(AllocReplay& S, const BlockContext& ctx, int64_t H);

}  // namespace fc
