// The nine Evoformer modules (inference). Each updates its stream in place (residual update
// included) and allocates its intermediates through the tracking allocator, freeing each as soon
// as it is dead. Work is split into chunks along the module's batch-like axis; the chunk size
// comes from the context (0 = automatic) and never changes the result.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "foldcube/config.h"
#include "model/weights.h"

namespace fc {

struct BlockContext {
  const EvoformerConfig* cfg = nullptr;
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
};

// Batch items per chunk for a module whose chunk buffers take bytes_per_item per item.
int64_t pick_chunk(const BlockContext& ctx, int64_t batch, int64_t bytes_per_item);

// m [s, r, c_m], z [r, r, c_z], row-major contiguous.
void msa_row_attention(const MsaRowAttentionW& w, const BlockContext& ctx, float* m,
                       const float* z);
void msa_column_attention(const MsaColumnAttentionW& w, const BlockContext& ctx, float* m);
// x [rows, c] += Transition(x).
void transition(const TransitionW& w, const BlockContext& ctx, float* x, int64_t rows, int64_t c);
void outer_product_mean(const OuterProductMeanW& w, const BlockContext& ctx, const float* m,
                        float* z);
void triangle_multiplication(const TriangleMultiplicationW& w, const BlockContext& ctx,
                             bool outgoing, float* z);
void triangle_attention(const TriangleAttentionW& w, const BlockContext& ctx, bool ending,
                        float* z);

// Peak bytes a module allocates on top of its inputs (the memory model of the inference path;
// tests check it against the tracking allocator). Module names as in the golden traces.
int64_t module_workspace_bytes(const char* module, const BlockContext& ctx);

// The chunk loops a module runs at this context, for reports and plans: each loop's axis, its
// length and the items per chunk (the same formulas the module uses). Names as in
// module_workspace_bytes.
struct ChunkLoop {
  std::string axis;  // e.g. "s" (MSA rows), "r" (residue rows or columns), "c_t" (channels)
  int64_t length = 0;
  int64_t items = 0;  // per chunk; length / items rounded up = number of chunks
};
std::vector<ChunkLoop> module_chunking(const char* module, const BlockContext& ctx);

// ExtraMSA column attention: m [s, r, c_e] += MSAColumnGlobalAttention(m, msa_mask), i.e. global
// attention over the sequences of each residue column (chunked over residues; c_e = cfg.c_m).
// eps is added to each column's mask count before the masked mean (OpenFold: 1e-8). A column
// whose mask is all zero gets a finite (implementation-defined) update.
void msa_column_global_attention(const MsaColumnGlobalAttentionW& w, const BlockContext& ctx,
                                 float eps, float* m);
// Its workspace; module_workspace_bytes("msa_att_col_global") returns the same.
int64_t msa_column_global_attention_bytes(const BlockContext& ctx);

}  // namespace fc
