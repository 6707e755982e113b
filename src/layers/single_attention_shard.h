// The AF3 single attention with pair bias (Boltz AttentionPairBias, the Pairformer's `attention`)
// on a token shard of the single stream, for Dynamic Axial Parallelism (src/exec/dap.cc): the
// shard's tokens are the queries, the keys and values come from every token. Model code: the
// executor supplies the collectives as hooks (ShardGather, ShardReduce), nothing here calls MPI.
//
// Per shard (r tokens in all = ctx.r, this shard's `rows` consecutive tokens):
//   x = LN(s) [rows, c]                      local
//   X = gather(x) [r, c]                     all-gather of LN(s) (c floats per token)
//   q | g from x, k | v from X               the fused q|k|v|g weight's row blocks
//   bias [H, rows, r] = LN(z) W_z^T          from the shard's own rows of z: no communication
//   s += linear_o(sigmoid(g) * softmax(q k^T / sqrt(C) + key_bias + bias) v)
// The single-process layer is the MSA row attention unit on a one-row MSA (src/model/modules.cc);
// this form computes the same function (equal to f32 rounding), also in bf16: the inference's
// bf16 GEMM inputs (ctx.dtype, fused) and the training's bf16 storage (ctx.store: rounded LN(s),
// q | k | v | g and og, bf16 products and gradient GEMMs), as that unit rounds.
#pragma once

#include <cstdint>

#include "model/modules.h"
#include "model/train.h"
#include "model/weights.h"

namespace fc {

// s [rows, c] += the attention update of this shard's tokens; z [rows, r, c_z] the same rows of the
// pair stream (r = ctx.r, c = ctx.cfg->c_m); key_bias [r] (masked tokens -1e6); H heads of C
// channels. gather collects every shard's LN(s) (consecutive blocks of `rows` tokens). Not
// chunked: the buffers are [rows, 2HC], [r, 2HC] and the bias [H, rows, r] (H / c_z of the z
// shard).
void single_attention_shard(const MsaRowAttentionW& w, const BlockContext& ctx, int64_t H,
                            int64_t C, float* s, int64_t rows, const float* z,
                            const float* key_bias, const ShardGather& gather);

// Backward (conventions of train.h): s_in [rows, c], z_in [rows, r, c_z] the layer's input shards;
// ds holds dL/d out on entry and dL/d s_in on exit; dz [rows, r, c_z] += the bias branch's
// gradient; g accumulates this shard's part of the parameter gradients (the caller sums them over
// the shards). Nothing is kept from the forward: the state is recomputed (one all-gather of LN(s)),
// and the k | v gradients of every token [r, 2HC] are summed to their shards by reduce (the
// adjoint of the gather, moved before the k | v projection's backward, so that each token's
// summed gradient is what its products take, as in one process).
void single_attention_shard_backward(const MsaRowAttentionW& w, MsaRowAttentionW* g,
                                     const BlockContext& ctx, int64_t H, int64_t C,
                                     const float* s_in, int64_t rows, const float* z_in,
                                     const float* key_bias, const ShardGather& gather,
                                     const ShardReduce& reduce, float* ds, float* dz);

}  // namespace fc
