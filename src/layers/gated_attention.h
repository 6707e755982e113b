// Gated attention (with optional pair bias) as one layer unit: the attention core every attention
// layer runs (inference fused or reference path, training forward with saved chunk states, exact
// backward, chunk loops over the batch-like axis, workspace formula, work estimate and allocation
// replay) and its MSA-row form with pair bias; MSA column attention and triangle attention are
// specs over the same core (layers/msa_column_attention.h, layers/triangle_attention.h).
#pragma once

#include <cstdint>
#include <vector>

#include "foldcube/tensor.h"
#include "layers/context.h"
#include "layers/layer_models.h"
#include "layers/layer_norm_linear.h"
#include "model/weights.h"

namespace fc {

// ---- Spec: S += linear_o(sigmoid(g) * softmax(q k^T / sqrt(C) + mask_bias + bias) v) with
// q | k | v | g = LN(S) W_qkvg^T (+ b_qkvg: AF2 has no q/k/v bias, a gate bias; AF3 single
// attention a query bias), H heads of C channels, over a stream viewed as N items of L positions
// with c channels (transposed: the items are columns, read with strides); linear_o's bias
// optional (AF3 triangle attention has none). The optional pair bias [H, L, L] comes from
// LayerNorm+Linear on z (layers/layer_norm_linear.h). MSA row attention, MSA column attention,
// triangle attention, AF3 single attention and pair-weighted averaging are this layer.

// ---- Inference ---------------------------------------------------------------------------------
// Items per chunk of the attention over N items of L positions with c channels: the normalised
// input and update chunks [ch, L, c] (unfused) or q|k|v|g [ch*L, 4*H*C].
int64_t attention_chunk(const BlockContext& ctx, int64_t H, int64_t C, int64_t N, int64_t L,
                        int64_t c);
// Attention module over a stream S viewed as [N, L, c] (batch over N, attention over L), or, when
// transposed, S viewed as [L, N, c] with batch over N = dim 1. bias: [H, L, L] or nullptr.
// mask_bias: [N, L].
void attention_module(const LayerNormW& ln, const GatedAttentionW& w, int64_t H, int64_t C,
                      const BlockContext& ctx, float* S, int64_t N, int64_t L, int64_t c,
                      bool transposed, const float* mask_bias, const float* bias);
// Its peak bytes (fused or unfused path as ctx says).
int64_t attention_module_bytes(int64_t H, int64_t C, const BlockContext& ctx, int64_t N, int64_t L,
                               int64_t c);
// S [N, L, c] += GatedAttention(LN(S)) batched over N, attention over L; mask_bias [N, L] (per
// key), bias [H, L, L] shared over the batch (or nullptr).
void attention_rows(const LayerNormW& ln, const GatedAttentionW& w, int64_t H, int64_t C,
                    const BlockContext& ctx, float* S, int64_t N, int64_t L, int64_t c,
                    const float* mask_bias, const float* bias);
// m [s, r, c_m], z [r, r, c_z], row-major contiguous.
void msa_row_attention(const MsaRowAttentionW& w, const BlockContext& ctx, float* m,
                       const float* z);
// Its peak bytes: the pair-bias heads, then the bias beside the attention.
int64_t msa_row_attention_bytes(const BlockContext& ctx);

// ---- Training (conventions: src/model/train.h) ------------------------------------------------
// Attention over N items of L positions, c channels, hc = H*C: items per chunk.
int64_t attention_train_chunk(const BlockContext& ctx, int64_t N, int64_t L, int64_t c, int64_t hc);
// Bytes of its chunk buffers per item (N items: the whole axis in one chunk).
int64_t attention_train_item_bytes(int64_t L, int64_t c, int64_t hc);
// The attention runs over a stream viewed as N batch items of L positions with c channels
// (transposed layers read columns with strides, as attention_module does).
struct AttentionChunk {
  // Under BlockContext::store BF16: qkvg rounded to bf16 values (f32 storage while in use, kept
  // in bf16, layer_util.h), og a bf16 tensor from the start (linear_o's input, read as it is).
  Tensor qkvg;  // [n*L, 4*H*C] q | k | v | g (pre-sigmoid gate) of the chunk's n items (q | k
                // not written under GatedAttentionW::bias_logits)
  Tensor og;    // [n*L, H*C]   gated attention output (input of linear_o)
  Tensor lse;   // [n, H, L]     log-sum-exp of the logits per query (saved for the backward)
};
struct AttentionState {
  Tensor bias;                         // [H, L, L] pair/triangle bias (undefined for column att.)
  std::vector<AttentionChunk> chunks;  // in chunk order; empty: the backward recomputes them
};

// The attention module's view of its stream S: N items of L positions with c channels; S is
// [N, L, c] itself, or (transposed) [L, N, c].
struct AttentionView {
  int64_t N, L, c;
  bool transposed;
  // Offset of item n, its row stride (floats).
  int64_t item(int64_t n) const { return transposed ? n * c : n * L * c; }
  int64_t row_stride() const { return transposed ? N * c : c; }
};
// The module's weights and shapes as the chunk functions need them.
struct GatedAttentionSpec {
  const char* module;  // golden trace name (dropout key)
  const LayerNormW& ln;
  const GatedAttentionW& w;
  int64_t H, C;
  AttentionView v;
  const float* mask_bias;  // [N, L]
};
// The training forward over all chunks: S += update; chunk states appended to `keep` when
// non-null. The layers' *_train functions and the shard forms call it.
void attention_layer_train(const GatedAttentionSpec& at, const BlockContext& ctx, float* S,
                           const float* bias, std::vector<AttentionChunk>* keep);
// Backward over all chunks (conventions above); kept: the forward's chunk states (consumed) or
// empty (recomputed one by one); dbias [H, L, L] accumulates the bias gradient when non-null.
void attention_layer_backward(const GatedAttentionSpec& at, LayerNormW* gln, GatedAttentionW* gw,
                              const BlockContext& ctx, const float* S_in, float* dS,
                              const float* bias, std::vector<AttentionChunk>* kept, float* dbias);
// st == nullptr: nothing is kept (the forward under policy module).
void msa_row_attention_train(const MsaRowAttentionW& w, const BlockContext& ctx, float* m,
                             const float* z, AttentionState* st);
// m_in [s, r, c_m], z_in [r, r, c_z]: the module's inputs.
void msa_row_attention_backward(const MsaRowAttentionW& w, MsaRowAttentionW* g,
                                const BlockContext& ctx, const float* m_in, const float* z_in,
                                AttentionState* st, float* dm, float* dz);
// Gated attention over S [N, L, c] (batch over N, attention over L) with a given pair bias
// [H, L, L] (or nullptr) and mask_bias [N, L]; `module` (golden trace name) selects the dropout
// mask, which is [L, c] shared over N, so a shard of the N items sees the mask of one process. The
// single-process modules above run the same chunk functions (bit-identical per item).
void attention_rows_train(const LayerNormW& ln, const GatedAttentionW& w, int64_t H, int64_t C,
                          const char* module, const BlockContext& ctx, float* S, int64_t N,
                          int64_t L, int64_t c, const float* mask_bias, const float* bias,
                          AttentionState* st);
// S_in [N, L, c]: the input; dS: dL/d out on entry, dL/d in on exit; dbias [H, L, L] ACCUMULATES
// the bias gradient (nullptr when bias is nullptr). st: as attention_rows_train filled it (its
// chunks are consumed) or empty (recomputed per chunk); st->bias is not used.
void attention_rows_backward(const LayerNormW& ln, const GatedAttentionW& w, LayerNormW* gln,
                             GatedAttentionW* gw, int64_t H, int64_t C, const char* module,
                             const BlockContext& ctx, const float* S_in, float* dS, int64_t N,
                             int64_t L, int64_t c, const float* mask_bias, const float* bias,
                             AttentionState* st, float* dbias);

// ---- Models ------------------------------------------------------------------------------------
// Work of an attention layer over N items of L positions (bias: with the pair-bias branch on r
// rows of z with c_z channels); rb (training, may be null) receives the work the backward rebuilds
// under policy module: the bias branch and per chunk LN, q|k|v|g and the attention (og, lse), not
// the output projection nor the residual add.
// qk = false: bias-only logits (GatedAttentionW::bias_logits): the v | g projection and the P.V
// product only.
LayerWork attention_work(int64_t N, int64_t L, int64_t c, int64_t H, int64_t C, bool bias,
                         int64_t r, int64_t cz, const WorkChunks& ch, LayerWork* rb,
                         bool qk = true);
// One gated-attention layer as the memory model sees it: N items of L positions with c channels, H
// heads of C; `bias`: with the pair-bias branch from z; `transposed`: the items are columns.
struct AttentionDims {
  int64_t N, L, c, H, C;
  bool bias, transposed;
  bool bias_logits = false;  // GatedAttentionW::bias_logits: only v | g are projected
};
// The training forward's allocations (keep: the chunk states and the bias stay, policy none) and
// the backward's (kept: the forward's state is live and freed chunk by chunk, else recomputed).
void attention_train_replay(AllocReplay& S, const BlockContext& ctx, const AttentionDims& d,
                            bool keep);
void attention_backward_replay(AllocReplay& S, const BlockContext& ctx, const AttentionDims& d,
                               bool kept);

}  // namespace fc
