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
// attentions with per-head projections; channels: the transitions, the triangle multiplications
// and the outer product mean; replicated: every layer).
bool split_supported(const LayerDesc& l, Split s);
// The named per-block lists resolved against table: nb per-layer split vectors (table order).
// Empty p: empty out (pure DAP). User errors: a count other than 1 or nb, an unknown layer, a
// split the layer does not support.
Status resolve_partition(const BlockTable& table, const StackPartition& p, int nb,
                         std::vector<std::vector<Split>>* out);
// The same for a group of `ranks` ranks (cfg.no_blocks blocks), which also refuses a
// channel-parallel triangle multiplication with fewer channels than ranks (every rank takes part
// in its LayerNorm's sums).
Status resolve_partition(const BlockTable& table, const StackPartition& p,
                         const EvoformerConfig& cfg, int ranks,
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

// Where a heads / channels layer leaves the stream it updates: x (the whole stream's tensor, the
// one the layer's float pointer points into) and its layout how; want: a shard layout (the
// ranks' partial updates are summed by a reduce-scatter straight into this rank's part, *x and
// *how change) or a whole layout (an all-reduce; *x stays whole).
struct ReduceTo {
  Tensor* x = nullptr;
  Shard* how = nullptr;
  Shard want = Shard::kPairFull;
};
// Whether split s sums partial updates over the ranks (heads, channels).
bool partition_reduces(Split s);
// Layouts (m, z) of the streams at a block's edge.
using BlockLayouts = std::pair<Shard, Shard>;
// The layouts the first layers of a block using m and z take under splits (a pointwise DAP layer:
// the block-boundary shard; an unused stream: the boundary). All-dap lists: the boundary.
BlockLayouts partition_entry_layouts(const BlockTable& t, const std::vector<Split>& splits);
// Where block b of a partitioned forward (inference and training) leaves its streams after their
// last use (blocks: the per-block lists): the entry layouts of block b + 1, so that a layout
// carries from one block into the next and only layouts that differ are changed; the block
// boundary after the last block. The training backward carries the gradients the same way in
// reverse; a policy-block block keeps its input as boundary shards (a whole stream sliced: no
// communication) and its recompute gathers it again.
BlockLayouts partition_exit_layouts(const BlockTable& t,
                                    const std::vector<std::vector<Split>>& blocks, int b);
// The layout in which the stream layer i of t updates is next needed (splits: the block's list):
// that of the next layer of the block that uses it (a pointwise DAP layer: the block-boundary
// shard), or after its last use the block's exit layout (exit; nullptr: the block boundary).
Shard partition_next_layout(const BlockTable& t, const std::vector<Split>& splits, int i,
                            const BlockLayouts* exit = nullptr);
// The ReduceTo of layer i: its updated stream, want = partition_next_layout for heads / channels
// (always a shard or a whole layout, which the executor would otherwise reach by a slice).
ReduceTo partition_reduce_to(const BlockTable& t, const std::vector<Split>& splits, int i,
                             Tensor* m, Tensor* z, Shard* m_how, Shard* z_how,
                             const BlockLayouts* exit = nullptr);

// Inference forward of a heads / channels / replicated layer on the whole padded streams m
// [s_pad, r_pad, c_m], z [r_pad, r_pad, c_z] (those it uses); table: the block type of bw. rt:
// how a heads / channels layer sums its partial updates (nullptr: all-reduce, whole).
void partition_layer_forward(const BlockTable& table, const LayerDesc& ly, const void* bw,
                             const DapShards& sh, const dist::Communicator& comm, Split s, float* m,
                             float* z, const ReduceTo* rt = nullptr);
// Training forward and backward of such a layer (conventions of layer_train / layer_backward:
// dm, dz whole gradients, dL/d out on entry, dL/d in on exit; g: this rank's contributions,
// summed over the group by dap_all_reduce_grads). The forward's rt as above (the adjoint of the
// slice and of the reduce-scatter is the all-gather of dL/d out the executor makes).
void partition_layer_train(const BlockTable& table, const LayerDesc& ly, const void* bw,
                           const DapShards& sh, const dist::Communicator& comm, Split s, float* m,
                           float* z, LayerState* st, const ReduceTo* rt = nullptr);
// rt_m, rt_z: where the partial gradients dL/d m, dL/d z of a heads / channels layer go (as
// the forward's rt; nullptr: all-reduce, whole).
void partition_layer_backward(const BlockTable& table, const LayerDesc& ly, const void* bw, void* g,
                              const DapShards& sh, const dist::Communicator& comm, Split s,
                              const float* x_in, const float* read_in, LayerState* st, float* dm,
                              float* dz, const ReduceTo* rt_m = nullptr,
                              const ReduceTo* rt_z = nullptr);
// The layout the backward next needs the gradient of stream x in, before layer i of t (layouts:
// partition_block_layouts): that of the nearest earlier layer using x, or the layout the block's
// input came in (entry; nullptr: the block boundary).
Shard partition_prev_layout(const BlockTable& t,
                            const std::vector<std::pair<Shard, Shard>>& layouts, int i, Stream x,
                            const BlockLayouts* entry = nullptr);
// The backward's ReduceTo of stream x's gradient dx (layout *how) at layer i: want =
// partition_prev_layout when layer i is heads / channels and uses x, else whole (all-reduce).
ReduceTo partition_grad_reduce_to(const BlockTable& t, const std::vector<Split>& splits,
                                  const std::vector<std::pair<Shard, Shard>>& layouts, int i,
                                  Stream x, Tensor* dx, Shard* how,
                                  const BlockLayouts* entry = nullptr);

}  // namespace fc
