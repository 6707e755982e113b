// Dynamic Axial Parallelism for training (backward): the sharded training forward and the adjoint
// backward of the Evoformer modules, in the layouts of the DAP forward (src/exec/dap.h,
// docs/dap.md). The adjoint of every collective of the forward is used in the backward:
//   all-gather of a projection of local rows  ->  reduce-scatter of its gradient to those rows;
//   all-to-all layout change                  ->  the reverse all-to-all.
// Parameter gradients accumulate this rank's shard contributions; the caller sums them over the
// DAP group (dap_all_reduce_grads).
//
// Modules: the pair-biased attention modules (MSA row attention, triangle attention starting and
// ending node; bias all-gathered forward, its gradient reduce-scattered backward), the outer
// product mean and the triangle multiplications (right operand all-gathered, its gradient
// reduce-scattered), and the modules that need no communication on their shard (MSA column
// attention, transitions: the single-process training functions on the shard's context).
#pragma once

#include <cstdint>
#include <vector>

#include "dist/comm.h"
#include "exec/dap.h"
#include "exec/partition.h"
#include "foldcube/tensor.h"
#include "model/modules.h"
#include "model/train.h"
#include "model/weights.h"

namespace fc {

// MSA row attention on m by sequences [s_loc, r_pad, c_m], the bias projected from z by rows
// [r_loc, r_pad, c_z] and all-gathered. st == nullptr: nothing kept (policy module).
void dap_msa_row_attention_train(const MsaRowAttentionW& w, const DapShards& sh,
                                 const dist::Communicator& comm, float* m, const float* z,
                                 AttentionState* st);
// m_in, z_in: the module's input shards; dm, dz: dL/d out on entry, dL/d in on exit (dz gets the
// bias branch's gradient of this rank's rows, reduce-scattered from every rank's bias gradient).
void dap_msa_row_attention_backward(const MsaRowAttentionW& w, MsaRowAttentionW* g,
                                    const DapShards& sh, const dist::Communicator& comm,
                                    const float* m_in, const float* z_in, AttentionState* st,
                                    float* dm, float* dz);
// Triangle attention on z by rows (starting node) or z^T by rows (ending node), [r_loc, r_pad,
// c_z]; the bias all-gathered from the same rows.
void dap_triangle_attention_train(const TriangleAttentionW& w, const DapShards& sh,
                                  const dist::Communicator& comm, bool ending, float* z,
                                  AttentionState* st);
void dap_triangle_attention_backward(const TriangleAttentionW& w, TriangleAttentionW* g,
                                     const DapShards& sh, const dist::Communicator& comm,
                                     bool ending, const float* z_in, AttentionState* st, float* dz);

// Outer product mean from m by residues [s_pad, r_loc, c_m] into z by rows [r_loc, r_pad, c_z]
// (this rank's residues are its pair rows); the right projection b is all-gathered, its gradient
// reduce-scattered. z == nullptr: only the state is built (the recompute of policy module).
void dap_outer_product_mean_train(const OuterProductMeanW& w, const DapShards& sh,
                                  const dist::Communicator& comm, const float* m, float* z,
                                  OuterProductMeanState* st);
// dz is only read; dm accumulates.
void dap_outer_product_mean_backward(const OuterProductMeanW& w, OuterProductMeanW* g,
                                     const DapShards& sh, const dist::Communicator& comm,
                                     const float* m_in, const OuterProductMeanState& st,
                                     const float* dz, float* dm);

// Triangle multiplication outgoing on z by rows (ending = false) or incoming on z^T by rows
// (ending = true), [r_loc, r_pad, c_z]; the right operand gathered per channel group, its
// gradient reduce-scattered per group. st == nullptr: nothing kept.
void dap_triangle_multiplication_train(const TriangleMultiplicationW& w, const DapShards& sh,
                                       const dist::Communicator& comm, bool incoming, float* z,
                                       TriangleMultiplicationState* st);
void dap_triangle_multiplication_backward(const TriangleMultiplicationW& w,
                                          TriangleMultiplicationW* g, const DapShards& sh,
                                          const dist::Communicator& comm, bool incoming,
                                          const float* z_in, TriangleMultiplicationState* st,
                                          float* dz);

// ---- The block level, shared by the stack drivers (Evoformer, ExtraMSA, AF3: src/exec/af3_dap.cc)
// What a sharded block keeps from its forward for its backward (shards).
struct DapBlockState {
  Recompute policy = Recompute::kNone;
  // kNone and kModule, per layer: the copies of saved_inputs, in the layouts the layer ran in
  // (dap_block_layouts). A read stream that is not copied (the OPM's m, the single attention's z)
  // is rebuilt in the backward from the block output.
  std::vector<Tensor> in_updated, in_read;
  // kNone: the layers' saved states.
  std::vector<LayerState> layers;
  // kBlock: the block input in the block-boundary layouts (m: dap_boundary_m, z: rows; a whole
  // input stream is kept as this rank's shard, and gathered again by the recompute).
  Tensor m0, z0;
  // Per layer: its partition (empty: pure DAP).
  std::vector<Split> splits;
  // The layouts (m, z) the block's input came in and its output left in (the block boundary, or
  // with partitions the layouts carried from the previous block and into the next).
  BlockLayouts in{Shard::kMsaBySeq, Shard::kPairRows}, out{Shard::kMsaBySeq, Shard::kPairRows};
};
// The sharded block forward over the block table: mr and zr in the layouts `in` (nullptr: the
// block boundary, m dap_boundary_m(t) and z [r_loc, r_pad, c_z] by rows), out in the layouts
// `out` (nullptr: the boundary; with partitions the next block's entry layouts,
// partition_exit_layouts); each layer in its layouts (partition_block_layouts), its inputs copied
// as saved_inputs says. splits: per layer, or empty (pure DAP).
void dap_block_forward(const BlockTable& t, const void* w, const DapShards& sh,
                       const dist::Communicator& comm, Tensor& mr, Tensor& zr, Recompute policy,
                       const std::vector<Split>& splits, DapBlockState* st,
                       const BlockLayouts* in = nullptr, const BlockLayouts* out = nullptr);
// The sharded block backward: dmr, dzr hold dL/d block output on entry (layouts st->out) and dL/d
// block input on exit (layouts st->in); m_out, z_out: the block's output (layouts st->out; the
// next block's kept input, or the stack output), from which a read input that was not copied is
// rebuilt (z_out may be undefined when no layer reads the block's output z: reads_block_output).
// Before each layer (last first) the gradients are brought to the layouts it ran in, each
// all-to-all the adjoint of the forward's; each layer's inputs are freed after its backward.
void dap_block_backward(const BlockTable& t, const void* w, void* g, const DapShards& sh,
                        const dist::Communicator& comm, DapBlockState* st, const Tensor& m_out,
                        const Tensor& z_out, Tensor& dmr, Tensor& dzr);

// Padded [rows_p, cols_p, c] copy of x [rows, cols, c] on the root (x undefined elsewhere),
// scattered by rows: this rank's [rows_p / n, cols_p, c].
Tensor scatter_rows(const Tensor& x, int64_t rows_p, int64_t cols_p, int64_t c,
                    const dist::Communicator& comm);
// Row shards [rows_p / n, cols_p, c] gathered to the root and cropped to [rows, cols, c]
// (undefined elsewhere).
Tensor gather_rows(const Tensor& mine, int64_t rows, int64_t cols, const dist::Communicator& comm);

// Sums every parameter gradient of g over comm (in place).
void dap_all_reduce_grads(const dist::Communicator& comm, BlockWeights* g);
void dap_all_reduce_grads(const dist::Communicator& comm, ExtraMsaBlockWeights* g);

struct DapTrainStats {
  dist::CommStats forward;       // the blocks' forward
  dist::CommStats backward;      // the blocks' backward (block recompute included), without the
                                 // parameter-gradient all-reduce
  dist::CommStats grad_reduce;   // the parameter-gradient all-reduce over the DAP group
  int64_t activation_bytes = 0;  // tracked bytes this rank keeps from forward for backward
  int64_t peak_bytes = 0;        // tracked peak of this rank during the step above its start
  int64_t shard_bytes = 0;       // this rank's shards of m and z
};

// One training step of the whole stack over comm (a DAP group), the layouts of dap_forward.
// The root passes m, z, the masks (undefined = ones) and grad_out_m [s, r, c_m], grad_out_z
// [r, r, c_z]; the others pass undefined tensors. Every rank must hold the same stack
// (dap_share_stack) and options. On success the root's m, z hold the outputs and its *out the
// input gradients and the parameter gradients (summed over the group; every rank's *out holds
// the parameter gradients). Recompute policies, chunking and dropout as in
// EvoformerStack::train_step (same masks as one process). Invalid inputs give every rank the
// root's error.
Status dap_train_step(const EvoformerStack& stack, const dist::Communicator& comm, Tensor& m,
                      Tensor& z, const Tensor& msa_mask, const Tensor& pair_mask,
                      const Tensor& grad_out_m, const Tensor& grad_out_z, const TrainOptions& opts,
                      DapTrainStats* stats, TrainResult* out);
// The same with a per-layer partition of each block (include/foldcube/partition.h; empty: pure
// DAP, as above). A bad partition is a user error on every rank.
Status dap_train_step(const EvoformerStack& stack, const dist::Communicator& comm, Tensor& m,
                      Tensor& z, const Tensor& msa_mask, const Tensor& pair_mask,
                      const Tensor& grad_out_m, const Tensor& grad_out_z, const TrainOptions& opts,
                      const StackPartition& partitions, DapTrainStats* stats, TrainResult* out);
// The same for the ExtraMSA stack (ExtraMsaStack::train_step over DAP; no output s).
Status dap_train_step(const ExtraMsaStack& stack, const dist::Communicator& comm, Tensor& m,
                      Tensor& z, const Tensor& msa_mask, const Tensor& pair_mask,
                      const Tensor& grad_out_m, const Tensor& grad_out_z, const TrainOptions& opts,
                      DapTrainStats* stats, TrainResult* out);
Status dap_train_step(const ExtraMsaStack& stack, const dist::Communicator& comm, Tensor& m,
                      Tensor& z, const Tensor& msa_mask, const Tensor& pair_mask,
                      const Tensor& grad_out_m, const Tensor& grad_out_z, const TrainOptions& opts,
                      const StackPartition& partitions, DapTrainStats* stats, TrainResult* out);

}  // namespace fc
