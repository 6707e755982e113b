// Dynamic Axial Parallelism (DAP, inference): one Evoformer stack over the N ranks of a
// communicator, each rank holding ~1/N of m and z. Layouts and communication: docs/dap.md.
//
// Per block (m: MSA stream, z: pair stream, N ranks, sizes padded to multiples of N):
//   m by sequences  [s/N, r, c_m]  row attention (pair bias all-gathered)
//   m by residues   [s, r/N, c_m]  column attention, transition, outer product mean (z rows)
//   z by rows       [r/N, r, c_z]  outer product mean, tri-mul outgoing, tri-att starting
//   z^T by rows     [r/N, r, c_z]  tri-mul incoming, tri-att ending, pair transition
// with 6 all-to-alls (2 for m, 4 for z) and 6 all-gathers (row-attention bias, OPM right
// projection, the two tri-mul right projections, the two tri-att biases) per block.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <utility>
#include <vector>

#include "dist/comm.h"
#include "foldcube/extra_msa.h"
#include "foldcube/model.h"
#include "foldcube/partition.h"
#include "foldcube/status.h"
#include "foldcube/tensor.h"
#include "model/block_table.h"
#include "model/modules.h"

namespace fc {

// Shard sizes of DAP over n ranks: s and r padded up to multiples of n with masked sequences and
// residues (their mask entries are 0, so real positions never see them).
struct DapLayout {
  int n = 1, rank = 0;
  int64_t s = 0, r = 0;          // real sizes
  int64_t s_pad = 0, r_pad = 0;  // multiples of n
  int64_t s_loc = 0, r_loc = 0;  // s_pad / n, r_pad / n
};
DapLayout dap_layout(int64_t s, int64_t r, int n, int rank);

// The contexts of this rank's shards and the padded masks they point into (held in full on every
// rank, as in the forward).
struct DapShards {
  DapLayout l;
  Tensor msa_mask, msa_bias;      // [s_pad, r_pad]
  Tensor msa_bias_t;              // [r_pad, s_pad]
  Tensor msa_mask_cols;           // [s_pad, r_loc] this rank's residue columns of msa_mask
  Tensor pair_mask, pair_mask_t;  // [r_pad, r_pad]
  Tensor pair_bias, pair_bias_t;  // [r_pad, r_pad]
  // m by sequences: s = s_loc, r = r_pad (msa_mask: this rank's sequences)
  BlockContext row;
  // m by residues: s = s_pad, r = r_loc (msa_mask: msa_mask_cols; msa_bias_t: this rank's
  // residues)
  BlockContext col;
  BlockContext full;                      // pair modules and OPM: s = s_pad, r = r_pad, full masks
  const float* msa_bias_rows = nullptr;   // [s_loc, r_pad] this rank's sequences
  const float* pair_bias_rows = nullptr;  // [r_loc, r_pad] this rank's rows of pair_bias
  const float* pair_bias_t_rows = nullptr;  // [r_loc, r_pad] this rank's rows of pair_bias_t
};
// The root runs prepare_inputs on its inputs (then root_check, if given) and shares the result
// with every rank: the layout over the ranks of comm and the padded masks msa [s_pad, r_pad] and
// pair [r_pad, r_pad] (zeros beyond s and r) on every rank, or the root's error on every rank.
Status share_padded_masks(const EvoformerConfig& cfg, const dist::Communicator& comm,
                          const Tensor& m, const Tensor& z, const Tensor& msa_mask,
                          const Tensor& pair_mask, const std::function<Status()>& root_check,
                          DapLayout* layout, Tensor* msa_p, Tensor* pair_p);
// From the padded masks msa [s_pad, r_pad] and pair [r_pad, r_pad] (the same on every rank; held,
// not copied). chunk_target_bytes 0: 1/8 of this rank's shard bytes of m and z as in one process
// (default_chunk_target_bytes), with a floor of 1 MiB instead of 4 MiB so that the work buffers
// keep shrinking with N.
DapShards make_dap_shards(const EvoformerConfig& cfg, const DapLayout& l, Tensor msa_mask,
                          Tensor pair_mask, int64_t chunk, int64_t chunk_target_bytes, int threads);
// Sets the dropout of every context (training mode, the block's key).
void set_dap_dropout(DapShards* sh, bool dropout, uint64_t key);

// ---- Layout changes (all-to-all over comm) and padding, shared by the forward and the training
// executor. Each layout change takes its input by value so that it dies after packing.
// m by sequences [s_loc, r_pad, c] -> m by residues [s_pad, r_loc, c].
Tensor msa_rows_to_cols(Tensor in, const DapLayout& l, const dist::Communicator& comm);
// m by residues [s_pad, r_loc, c] -> m by sequences [s_loc, r_pad, c] (the adjoint of the above).
Tensor msa_cols_to_rows(Tensor in, const DapLayout& l, const dist::Communicator& comm);
// Rows of X [r_loc, r_pad, c] -> rows of X^T [r_loc, r_pad, c] (its own adjoint and inverse).
Tensor pair_transpose(Tensor in, const DapLayout& l, const dist::Communicator& comm);
// out [rows, n*w, c] from n blocks [n, rows, w, c]: block p fills columns p*w .. (p+1)*w.
void join_column_blocks(const float* blocks, int64_t n, int64_t rows, int64_t w, int64_t c,
                        float* out);
// x [rows, cols, c] in the top-left corner of zeros [rows_p, cols_p, c] (x itself when equal).
Tensor pad3(const Tensor& x, int64_t rows_p, int64_t cols_p);
// The top-left [rows, cols, c] corner of x (x itself when nothing is cropped).
Tensor crop3(const Tensor& x, int64_t rows, int64_t cols);

// ---- Shard layouts of the block table's layers (src/model/block_table.h) ----------------------
// Layouts of a stream shard: m by sequences [s_loc, r_pad, c] or by residues [s_pad, r_loc, c];
// z by rows [r_loc, r_pad, c] or by rows of z^T; or the whole padded stream on every rank (the
// layers partitioned by heads, channels or replicated: src/exec/partition.h): m [s_pad, r_pad, c],
// z [r_pad, r_pad, c].
enum class Shard { kMsaBySeq, kMsaByRes, kPairRows, kPairRowsT, kMsaFull, kPairFull };
// The layouts a layer runs in (nullopt: any; pointwise layers stay in the current one): row
// attention needs m by sequences and z by rows (its bias); column attention m by residues; the OPM
// m by residues and z by rows; the triangle layers z by rows, or rows of z^T when transposed.
struct DapLayerLayout {
  std::optional<Shard> m, z;
};
DapLayerLayout dap_layer_layout(const LayerDesc& ly);
// The layouts (m, z) each layer of t runs in, starting from the block-boundary layouts (m by
// sequences, z by rows), each stream restored to them after its last use in the block (the
// executors' all-to-alls follow this sequence).
std::vector<std::pair<Shard, Shard>> dap_block_layouts(const BlockTable& t);
// The last layer of t that updates or reads x (-1: none).
int dap_last_use(const BlockTable& t, Stream x);
// The layout of m at t's block boundaries: by sequences, or by residues (tokens) when m is a
// single representation (LayerDesc::single, the Pairformer's s [1, n, c_s]: shards [1, r_loc, c]).
Shard dap_boundary_m(const BlockTable& t);
// Brings a stream shard *x from layout *how to `want` (an all-to-all when it changes between
// shards, an all-gather to a whole stream, a local copy from a whole stream to a shard; m layouts
// for the MSA stream, z layouts for the pair stream).
void dap_to_layout(Tensor* x, Shard* how, Shard want, const DapLayout& l,
                   const dist::Communicator& comm);

// The streams' shards during a block and their current layouts.
struct DapStreams {
  Tensor m;  // [s_loc, r_pad, c_m] by sequences or [s_pad, r_loc, c_m] by residues
             // (a single stream: [1, r_loc, c_m])
  Shard m_how = Shard::kMsaBySeq;
  Tensor z;  // [r_loc, r_pad, c_z] rows of z or of z^T
  Shard z_how = Shard::kPairRows;
};
// One layer on this rank's shards, in the layouts dap_layer_layout gives; bw: the table's block
// weight struct.
void dap_layer_forward(const LayerDesc& ly, const void* bw, const DapShards& sh,
                       const dist::Communicator& comm, const ShardGather& gather, DapStreams* st);

// Bytes one rank sends per Evoformer block, from the formulas of docs/dap.md (the dist layer's
// counting convention: payload addressed to other ranks).
struct DapBlockVolume {
  int64_t all_to_all_bytes = 0;
  int64_t all_gather_bytes = 0;
  int64_t reduce_scatter_bytes = 0;  // backward only
  int64_t total() const { return all_to_all_bytes + all_gather_bytes + reduce_scatter_bytes; }
};
DapBlockVolume dap_block_volume(const EvoformerConfig& cfg, const DapLayout& l);
// The same for one block's backward under a recompute policy (dap_train_step; without the
// parameter-gradient all-reduce): the reverse all-to-alls and one more of m (the OPM's input is
// rebuilt from the block output), a reduce-scatter for every all-gather
// of the forward, the OPM's and the triangle multiplications' re-gathered right operands, under
// kModule also the re-gathered biases and triangle products, under kBlock the forward once more.
DapBlockVolume dap_block_backward_volume(const EvoformerConfig& cfg, const DapLayout& l,
                                         Recompute policy);

struct DapOptions {
  int64_t chunk = 0;               // as ForwardOptions::chunk
  int64_t chunk_target_bytes = 0;  // 0 = max(1/8 of this rank's shards of m and z, 1 MiB)
  // As ForwardOptions::trace, called on the root with the whole (unpadded) stream after each
  // module. Set it on every rank or on none: each call gathers the stream to the root (on a
  // separate communicator, so DapStats count only the forward's own traffic).
  TraceFn trace;
  // Per-layer partition of each block (include/foldcube/partition.h); empty: pure DAP.
  StackPartition partitions;
  // GEMM input type of the fused layers (ForwardOptions::dtype): BF16 rounds them to bf16 with
  // f32 accumulation on every rank, as one process does (the triangle and outer products too:
  // the gathered operands are bf16 values moved as f32); the collectives carry f32. With
  // partitions, heads / replicated layers run the one-process bf16 layer, channel-parallel
  // transitions too, channel-parallel triangle multiplications and OPMs their training form
  // (f32 products, docs/dap.md).
  DType dtype = DType::F32;
};

struct DapStats {
  dist::CommStats total;        // the whole call: inputs out, blocks, outputs back
  dist::CommStats blocks;       // the Evoformer blocks only
  int64_t peak_bytes = 0;       // tracked peak of this rank during the call (absolute)
  int64_t work_peak_bytes = 0;  // the same above what was live when the call started
  int64_t shard_bytes = 0;      // bytes of this rank's shards of m and z
};

// Forward of the whole stack over comm (a DAP group). The root (rank 0) passes m [s, r, c_m],
// z [r, r, c_z] and the optional masks (undefined = ones); the other ranks pass undefined tensors
// and get everything from the root. Every rank must hold the same stack (dap_share_stack). On
// success the root's m and z hold the outputs and *s_out (if non-null) linear(m[0]) [r, c_s];
// other ranks' m and z are undefined. Invalid inputs give every rank the root's error.
Status dap_forward(const EvoformerStack& stack, const dist::Communicator& comm, Tensor& m,
                   Tensor& z, const Tensor& msa_mask, const Tensor& pair_mask, Tensor* s_out,
                   const DapOptions& opts = {}, DapStats* stats = nullptr);

// The same for the ExtraMSA stack (its block table, kExtraMsaBlock: the global column attention
// runs on m by residues, the masked transition in the current layout; no output s).
Status dap_forward(const ExtraMsaStack& stack, const dist::Communicator& comm, Tensor& m, Tensor& z,
                   const Tensor& msa_mask, const Tensor& pair_mask, const DapOptions& opts = {},
                   DapStats* stats = nullptr);

// The blocks of table t (their weight structs, in order) on this rank's shards, which every rank
// already holds: *m by sequences [s_loc, r_pad, c_m] (nullptr for a pair-only table such as
// kTemplatePairBlock) and *z by rows [r_loc, r_pad, c_z], returned in the same layouts. sh's
// contexts carry the config of the blocks.
void dap_run_blocks(const BlockTable& t, const std::vector<const void*>& blocks,
                    const DapShards& sh, const dist::Communicator& comm, Tensor* m, Tensor* z);

// Makes every rank's *stack a copy of the root's (config and weights broadcast from rank 0).
Status dap_share_stack(const dist::Communicator& comm, EvoformerStack* stack);
Status dap_share_stack(const dist::Communicator& comm, ExtraMsaStack* stack);

}  // namespace fc
