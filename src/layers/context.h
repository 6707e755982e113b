// The context every layer unit (src/layers/) runs in, the chunk-size rule they share, and the
// hooks of their sharded forms (DAP: the executor gathers and reduce-scatters, the layers never
// call MPI).
#pragma once

#include <cstdint>
#include <functional>

#include "foldcube/config.h"
#include "foldcube/tensor.h"

namespace fc {

struct BlockTable;
struct ChannelSum;

// What a layer unit reads besides its weights and streams: the shapes, masks and mask biases,
// chunking, threads, dropout and the inference path (fused, dtype).
struct BlockContext {
  const EvoformerConfig* cfg = nullptr;
  // The block type being run: its table gives the layers' dropout (nullptr: kEvoformerBlock).
  const BlockTable* table = nullptr;
  int64_t s = 0, r = 0;
  const float* msa_mask = nullptr;     // [s, r] 0/1
  const float* msa_bias = nullptr;     // [s, r]  inf*(mask-1)
  const float* msa_bias_t = nullptr;   // [r, s]  transpose of msa_bias
  const float* pair_mask = nullptr;    // [r, r] 0/1
  const float* pair_bias = nullptr;    // [r, r]  inf*(pair_mask-1)
  const float* pair_bias_t = nullptr;  // [r, r]  transpose of pair_bias
  int64_t chunk = 0;                   // batch items per chunk; 0 = from chunk_target_bytes
  int64_t chunk_target_bytes = 0;      // automatic chunking: bytes of chunk buffers to aim for
  int threads = 1;
  // Training-mode dropout (training functions only): off when false; masks keyed by dropout_key,
  // which the driver derives from (seed, block index).
  bool dropout = false;
  uint64_t dropout_key = 0;
  // Global index of this context's first batch item: an AF3 per-item dropout mask (one draw per
  // row, column or MSA row) gives local item n the draw of item dropout_item0 + n, so that a
  // DAP shard draws what one process draws for the same rows (0 in one process).
  int64_t dropout_item0 = 0;
  // Global column attention (ExtraMSA): added to each column's mask count before the masked mean.
  float global_eps = 1e-8f;
  // Inference: LayerNorm fused into the following Linear and the fused transition (src/kernels/
  // fused.h) in row blocks, the attention output Linear accumulating into the stream; false runs
  // the unfused reference path (equal within f32 rounding). Training functions ignore it.
  bool fused = true;
  // GEMM input type of the fused projections and transitions (F32 | BF16: bf16 inputs, f32
  // accumulation and storage; see src/kernels/fused.h). BF16 needs fused.
  DType dtype = DType::F32;
  // Training (src/model/train_block.cc): element type of the layer inputs a step keeps for its
  // backward (the saved stream copies, the policy-block input). BF16: before each layer the streams
  // it reads or updates are rounded to bf16 values in place (so the kept copy is exact and a
  // recompute sees the same input); the gradient passes the rounding unchanged (straight-through),
  // and streams, gradients, weights and the layers' own states stay f32.
  DType store = DType::F32;
  // Channel-parallel triangle multiplication (src/exec/partition.h): this process holds
  // cfg->c_hidden_mul of the layer's channels and LN_out's statistics are summed over the ranks
  // through this hook. nullptr: the layer holds every channel.
  const ChannelSum* channel_sum = nullptr;
};

// Batch items per chunk for a module whose chunk buffers take bytes_per_item per item.
int64_t pick_chunk(const BlockContext& ctx, int64_t batch, int64_t bytes_per_item);

// ---- Pieces for sharded execution (Dynamic Axial Parallelism, src/exec/dap.cc) -----------------
// A shard holds some rows (or columns) of a stream; what every shard needs in full is collected by
// a gather hook that the executor provides, so modules never talk to MPI themselves. The plain
// functions above are these pieces with one shard holding everything (bit-identical results).

// Collects every shard's `count` floats, in shard order, into all [parts*count].
struct ShardGather {
  int parts = 1;
  std::function<void(const float* mine, int64_t count, float* all)> fn;
};

// Sums every shard's all [parts*count] block-wise and leaves this shard's block in mine [count]
// (the adjoint of ShardGather: the executor's reduce-scatter).
struct ShardReduce {
  int parts = 1;
  std::function<void(const float* all, int64_t count, float* mine)> fn;
};

// Sums `count` floats element-wise over the ranks that share a channel-split layer, in place on
// every rank (the executor's all-reduce); channels: the layer's channels over all those ranks.
struct ChannelSum {
  int64_t channels = 0;
  std::function<void(float* data, int64_t count)> fn;
};

}  // namespace fc
