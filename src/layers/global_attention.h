// Global column attention (the ExtraMSA block's MSA column attention) as one layer unit:
// inference chunked over residue columns, training forward with saved chunk states, exact
// backward, chunk and workspace formulas, work estimate and allocation replay.
#pragma once

#include <cstdint>
#include <vector>

#include "foldcube/tensor.h"
#include "layers/context.h"
#include "layers/layer_models.h"
#include "model/weights.h"

namespace fc {

// ---- Spec: per residue column b, x = LN(m[:, b]) [s, c_e]; H queries (one per head) from the
// masked mean of x (linear_q, no bias); one shared key/value head and the gate from one
// projection kvg [2C + H*C, c_e] with a bias; gated output, linear_o with bias; no pair bias, no
// dropout (the ExtraMSA block's msa_att_col).

// ---- Inference ---------------------------------------------------------------------------------
// ExtraMSA column attention: m [s, r, c_e] += MSAColumnGlobalAttention(m, msa_mask), i.e. global
// attention over the sequences of each residue column (chunked over residues; c_e = cfg.c_m).
// eps is added to each column's mask count before the masked mean (OpenFold: 1e-8). A column
// whose mask is all zero gets a finite (implementation-defined) update.
void msa_column_global_attention(const MsaColumnGlobalAttentionW& w, const BlockContext& ctx,
                                 float eps, float* m);
// Its workspace; module_workspace_bytes("msa_att_col_global") returns the same.
int64_t msa_column_global_attention_bytes(const BlockContext& ctx);
// Residue columns per chunk of the inference form.
int64_t global_attention_chunk(const BlockContext& ctx);

// ---- Training (conventions: src/model/train.h) ------------------------------------------------
// m [s, r, c_e] += GlobalAttention(LN(m^T)) per residue column b (see above), chunked over the
// columns. Per column: x = LN(m[:, b]) [s, c_e]; mu = sum_j mask[j] x[j] / (sum_j mask[j] + eps);
// q = mu W_q^T [H*C]; k, v = x W_{k,v}^T [s, C] (one head); o[h] = softmax_j(q_h.k_j / sqrt(C) +
// maskbias[j]) v [H*C]; y[j] = o * sigmoid(x[j] W_g^T + b_g); update = y W_o^T + b_o. No dropout.
struct GlobalAttentionChunk {
  Tensor kvg;  // [n*s, 2C + H*C] k | v | g (pre-sigmoid gate) of the chunk's n columns
  Tensor q;    // [n, H*C] queries (from the masked means)
  Tensor o;    // [n, H*C] attention output before gating
  Tensor lse;  // [n, H]   log-sum-exp of each query's logits
};
struct GlobalAttentionState {
  std::vector<GlobalAttentionChunk> chunks;  // in chunk order; empty: the backward recomputes
};
// Columns per chunk of the training forward and backward.
int64_t global_attention_train_chunk(const BlockContext& ctx);
// Bytes of its chunk buffers per residue column.
int64_t global_attention_train_item_bytes(const BlockContext& ctx);
// st == nullptr: nothing is kept (policy module). eps: ctx.global_eps.
void msa_column_global_attention_train(const MsaColumnGlobalAttentionW& w, const BlockContext& ctx,
                                       float* m, GlobalAttentionState* st);
// m_in [s, r, c_e]: the module input; conventions as above.
void msa_column_global_attention_backward(const MsaColumnGlobalAttentionW& w,
                                          MsaColumnGlobalAttentionW* g, const BlockContext& ctx,
                                          const float* m_in, GlobalAttentionState* st, float* dm);

// ---- Models ------------------------------------------------------------------------------------
// Work of the layer, chunked over columns: per column the k | v | g projection
// [s, c_e] x [c_e, 2C + HC], the query of the masked mean, the attention of H queries over s keys
// with one head, the gating and linear_o. rb: LN, means, q, k | v | g and the attention, not the
// gating nor linear_o.
LayerWork global_attention_work(const EvoformerConfig& cfg, int64_t s, int64_t r,
                                const WorkChunks& ch, LayerWork* rb);
// The training forward's allocations (keep: the chunk states stay) and the backward's (kept: the
// forward's state is live).
void global_attention_train_replay(AllocReplay& S, const BlockContext& ctx, bool keep);
void global_attention_backward_replay(AllocReplay& S, const BlockContext& ctx, bool kept);

}  // namespace fc
