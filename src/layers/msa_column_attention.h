// MSA column attention as a spec over the gated-attention unit (layers/gated_attention.h): the
// items are the r residue columns of m [s, r, c_m], attention over the s sequences, no pair
// bias, key mask ctx.msa_bias_t; H = no_heads_msa heads of c_hidden_msa_att. Inference,
// training forward and backward, workspace.
#pragma once

#include <cstdint>
#include <vector>

#include "foldcube/tensor.h"
#include "layers/context.h"
#include "layers/gated_attention.h"
#include "layers/layer_models.h"
#include "model/weights.h"

namespace fc {

// m [s, r, c_m] += MSAColumnAttention(m).
void msa_column_attention(const MsaColumnAttentionW& w, const BlockContext& ctx, float* m);
// Its peak bytes.
int64_t msa_column_attention_bytes(const BlockContext& ctx);

// ---- Training (conventions: src/model/train.h) ------------------------------------------------
void msa_column_attention_train(const MsaColumnAttentionW& w, const BlockContext& ctx, float* m,
                                AttentionState* st);
void msa_column_attention_backward(const MsaColumnAttentionW& w, MsaColumnAttentionW* g,
                                   const BlockContext& ctx, const float* m_in, AttentionState* st,
                                   float* dm);

}  // namespace fc
