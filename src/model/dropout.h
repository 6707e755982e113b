// AF2 training-mode dropout of layer updates. OpenFold's DropoutRowwise / DropoutColumnwise share
// one mask along the rows or the columns of the updated stream; the block table
// (src/model/block_table.cc) gives each layer's rate and shared axis. In the batch-major layout the
// training functions use ([N, L, c], see layers/gated_attention.cc) every dropped update has a mask
// [L, c] shared over N (a layer whose mask is shared over columns, tri_att_end, runs batch-major
// over the columns, so the same [L, c] mask applies). Mask entries are 0 or 1/(1-p), from a
// counter-based RNG keyed by (ctx.dropout_key, module, element), so a recompute reproduces the
// forward's mask exactly.
#pragma once

#include <cstdint>

#include "foldcube/tensor.h"
#include "model/modules.h"

namespace fc {

// The mask [L, c] for `module` (golden trace name) of the context's block table, or an undefined
// tensor when dropout is off or the module has no dropout. For a Boltz (AF3) layer
// (DropoutShare kPerRow / kPerColumn) the mask is indexed by the layer's batch items instead:
// mask[l, :] is the draw of global item item0 + l (see dropout_per_item), the same draw on every
// DAP shard that holds that item.
Tensor dropout_mask(const BlockContext& ctx, const char* module, int64_t L, int64_t c,
                    int64_t item0 = 0);

// The dropout key of block b of a training step seeded by `seed` (BlockContext::dropout_key): the
// one-process and the DAP drivers draw the same masks from it.
uint64_t block_dropout_key(uint64_t seed, int b);

// True when `module`'s dropout (Boltz, AF3) is one draw per batch item of the layer's chunk axis
// (per row i of z for tri_mul_out/in and tri_att_start, per column j for tri_att_end, per MSA row
// for the pair-weighted averaging), shared over the item's positions and channels.
bool dropout_per_item(const BlockContext& ctx, const char* module);

// u[n, l, :] *= mask[l, :] for n < N (forward on the update, backward on its gradient).
void apply_dropout(float* u, int64_t N, int64_t L, int64_t c, const Tensor& mask);

// Per-item dropout: u[b, :] (item_elems floats each) *= mask[n0 + b, 0] for b < n, mask from
// dropout_mask(ctx, module, N, 1).
void apply_item_dropout(float* u, int64_t n0, int64_t n, int64_t item_elems, const Tensor& mask);

}  // namespace fc
