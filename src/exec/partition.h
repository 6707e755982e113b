// Per-layer partitioning over a DAP group (include/foldcube/partition.h, docs/planner.md): the
// layouts a layer runs in under its split, the layout changes to and from whole streams, and the
// layer's forward, training forward and backward under heads / channels / replicated (dap layers
// run the DAP code of dap.cc / dap_train.cc). Model code stays MPI-free: the executor slices the
// layer's weights for this rank, runs the single-process layer on whole streams and sums the
// partial updates (and, backward, the partial input gradients) over the group.
#pragma once

#include <optional>
#include <utility>
#include <vector>

#include "dist/comm.h"
#include "exec/dap.h"
#include "foldcube/partition.h"
#include "model/block_table.h"
#include "model/train.h"

namespace fc {

// Whether layer kind l runs under split s (dap: those with a DAP form; heads: the gated
// attentions with per-head projections; channels: the transitions; replicated: every layer).
bool split_supported(const LayerDesc& l, Split s);
// The named per-block lists resolved against table: nb per-layer split vectors (table order).
// Empty p: empty out (pure DAP). User errors: a count other than 1 or nb, an unknown layer, a
// split the layer does not support.
Status resolve_partition(const BlockTable& table, const StackPartition& p, int nb,
                         std::vector<std::vector<Split>>* out);

// The layouts layer ly runs in under split s, given the streams' current layouts: dap layers
// their DAP layouts (a pointwise layer on a whole stream takes the block-boundary shard); the
// others every stream they use whole (kMsaFull, kPairFull).
DapLayerLayout partition_layer_layout(const LayerDesc& ly, Split s, Shard m_how, Shard z_how);
// The layouts (m, z) each layer of t runs in under splits (as dap_block_layouts).
std::vector<std::pair<Shard, Shard>> partition_block_layouts(const BlockTable& t,
                                                             const std::vector<Split>& splits);

// Layout changes to or from a whole stream: shard -> whole is an all-gather (z^T rows transposed
// back), whole -> shard a local copy of this rank's part. Called by dap_to_layout.
void full_to_layout(Tensor* x, Shard* how, Shard want, const DapLayout& l,
                    const dist::Communicator& comm);

// Inference forward of a heads / channels / replicated layer on the whole padded streams m
// [s_pad, r_pad, c_m], z [r_pad, r_pad, c_z] (those it uses); table: the block type of bw.
void partition_layer_forward(const BlockTable& table, const LayerDesc& ly, const void* bw,
                             const DapShards& sh, const dist::Communicator& comm, Split s, float* m,
                             float* z);
// Training forward and backward of such a layer (conventions of layer_train / layer_backward:
// dm, dz whole gradients, dL/d out on entry, dL/d in on exit; g: this rank's contributions,
// summed over the group by dap_all_reduce_grads).
void partition_layer_train(const BlockTable& table, const LayerDesc& ly, const void* bw,
                           const DapShards& sh, const dist::Communicator& comm, Split s, float* m,
                           float* z, LayerState* st);
void partition_layer_backward(const BlockTable& table, const LayerDesc& ly, const void* bw, void* g,
                              const DapShards& sh, const dist::Communicator& comm, Split s,
                              const float* x_in, const float* read_in, LayerState* st, float* dm,
                              float* dz);

}  // namespace fc
