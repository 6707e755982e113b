// Training path of the Evoformer block: per-module forward that saves what backward needs, and
// the exact backward, both chunked along the module's batch-like axis (each layer unit's own in
// src/layers/<unit>.h; this header states the conventions and the per-layer dispatch). Recompute
// policies reuse these functions unchanged, so gradients do not depend on the policy:
//   none   - every module's state from the forward is kept until backward;
//   module - ("small") only each module's input is kept; backward rebuilds the state one chunk at a
//            time (recompute that chunk, back-propagate it, free it, next chunk);
//   block  - ("large") only the block input is kept; backward re-runs the whole block forward with
//            policy none, then runs the block backward.
//
// Chunk axes (sizes from the BlockContext: ctx.chunk items, or automatic from
// ctx.chunk_target_bytes through pick_chunk; the units' *_train_chunk functions give them):
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

// bf16 storage of the kept stream copies (BlockContext::store; the DAP executor shares them):
// a copy of p [shape] in element type `store` (F32, or BF16: p holds bf16 values already, so
// the copy is exact), and t as f32 (t itself when F32 or undefined, else its widened copy).
Tensor kept_copy(const float* p, const Shape& shape, DType store);
Tensor as_f32(const Tensor& t);

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

}  // namespace fc
