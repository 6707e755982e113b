// The nine Evoformer modules (inference). Each updates its stream in place (residual update
// included) and allocates its intermediates through the tracking allocator, freeing each as soon
// as it is dead. Work is split into chunks along the module's batch-like axis; the chunk size
// comes from the context (0 = automatic) and never changes the result.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "foldcube/config.h"
#include "model/weights.h"

namespace fc {

struct BlockTable;

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
  // Global column attention (ExtraMSA): added to each column's mask count before the masked mean.
  float global_eps = 1e-8f;
  // Inference: LayerNorm fused into the following Linear and the fused transition (src/kernels/
  // fused.h) in row blocks, the attention output Linear accumulating into the stream; false runs
  // the unfused reference path (equal within f32 rounding). Training functions ignore it.
  bool fused = true;
  // GEMM input type of the fused projections and transitions (F32 | BF16: bf16 inputs, f32
  // accumulation and storage; see src/kernels/fused.h). BF16 needs fused.
  DType dtype = DType::F32;
};

// Batch items per chunk for a module whose chunk buffers take bytes_per_item per item.
int64_t pick_chunk(const BlockContext& ctx, int64_t batch, int64_t bytes_per_item);

// The outer product's two layouts for n rows i of r residues: o [n*c_o, r*c_o] as its GEMM writes
// it ((i, c), (j, e)) and p [n*r, c_o*c_o] ((i, j), (c, e)) as linear_out reads it.
void opm_pairs_from_outer(const float* o, int64_t n, int64_t r, int64_t co, float* p);
void opm_outer_from_pairs(const float* p, int64_t n, int64_t r, int64_t co, float* o);
// The OPM's residual update of `rows` pairs from y = linear_out.w outer [rows, c_z] (without the
// bias when w.mean_first, else with it) and norm [rows] = sum_s mask[s,i] mask[s,j]: z [rows, c_z]
// += y / (norm + eps_opm) (AF2), or y / max(norm, 1) + linear_out.b (AF3, w.mean_first).
void opm_residual(const OuterProductMeanW& w, const EvoformerConfig& cfg, const float* y,
                  const float* norm, int64_t rows, float* z);

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

// ---- Pieces for sharded execution (Dynamic Axial Parallelism, src/exec/dap.cc) -----------------
// A shard holds some rows (or columns) of a stream; what every shard needs in full is collected by
// a gather hook that the executor provides, so modules never talk to MPI themselves. The plain
// functions above are these pieces with one shard holding everything (bit-identical results).

// Collects every shard's `count` floats, in shard order, into all [parts*count].
struct ShardGather {
  int parts = 1;
  std::function<void(const float* mine, int64_t count, float* all)> fn;
};

// Pair-bias projection of `rows` rows of a pair stream z [rows, r, c_z] (r = ctx.r):
// t [rows*r, H] with t[(q, k), h] = (LN(z) W^T)[q, k, h].
void pair_bias_project(const LayerNormW& ln, const LinearW& lin, const BlockContext& ctx,
                       const float* z, int64_t rows, float* t);
// Its workspace on `rows` rows with H = lin.w.dim(0) heads.
int64_t pair_bias_project_bytes(const BlockContext& ctx, int64_t rows, int64_t H);
// bias [H, r, r] from t [r*r, H]: bias[h][q][k] = t[(q, k), h], or t[(k, q), h] when transposed.
void pair_bias_permute(const float* t, int64_t r, int64_t H, bool transposed, float* bias);
// S [N, L, c] += GatedAttention(LN(S)) batched over N, attention over L; mask_bias [N, L] (per
// key), bias [H, L, L] shared over the batch (or nullptr).
void attention_rows(const LayerNormW& ln, const GatedAttentionW& w, int64_t H, int64_t C,
                    const BlockContext& ctx, float* S, int64_t N, int64_t L, int64_t c,
                    const float* mask_bias, const float* bias);
// Outer product mean of a residue-column shard: m [s, cols, c_m] holds columns [col0, col0+cols)
// of the MSA stream (s = ctx.s, r = ctx.r columns in all; ctx.msa_mask [s, r] in full), mask_cols
// [s, cols] their mask; z [cols, r, c_z] (pair rows col0..) += the update. gather collects the
// right projection [s, cols, c_o] of every shard (its shards are consecutive column blocks).
void outer_product_mean_shard(const OuterProductMeanW& w, const BlockContext& ctx, const float* m,
                              int64_t col0, int64_t cols, const float* mask_cols,
                              const ShardGather& gather, float* z);
// Triangle multiplication in outgoing form on a row shard: z [rows, r, c_z] (r = ctx.r) with mask
// [rows, r]; p[i, j] = sum_k L[i, k] R[j, k] where L is the shard's own projection and R is
// gathered from all shards (consecutive row blocks of `rows`). L = a, R = b is the outgoing
// module on z; L = b, R = a is the incoming module on z^T (with mask^T).
void triangle_multiplication_shard(const TriangleMultiplicationW& w, const BlockContext& ctx,
                                   bool left_is_b, int64_t rows, const float* mask,
                                   const ShardGather& gather, float* z);

// Workspaces of the shard forms on `cols` (`rows`) of the ctx.r residues with `parts` shards (the
// single-process modules are parts = 1 on all r): outer_product_mean_shard keeps a, b
// [s, cols, c_o] beside the projection chunk, then a, every shard's b, the mask counts [cols, r]
// and the outer-product chunk; triangle_multiplication_shard keeps the products [c_t, rows, r]
// beside phase 1 (A, B, LN_in(z), the projection chunk, a group's weights and the gathered right
// operand) or the output chunk.
int64_t outer_product_mean_shard_bytes(const BlockContext& ctx, int64_t cols, int parts);
int64_t triangle_multiplication_shard_bytes(const BlockContext& ctx, int64_t rows, int parts);

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

// ExtraMSA transition: m [s*r, c_m] += Transition(m) * msa_mask (one mask value per row). Its chunk
// buffers are those of transition(), and so is its workspace.
void masked_msa_transition(const TransitionW& w, const BlockContext& ctx, float* m);

}  // namespace fc
