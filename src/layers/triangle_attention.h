// Triangle attention (starting node: items are the rows i of z, attention over k; ending node:
// items are the columns j, read with strides) as a spec over the gated-attention unit
// (layers/gated_attention.h) with its pair bias from LayerNorm+Linear on z
// (layers/layer_norm_linear.h, transposed for the ending node); H = no_heads_pair heads of
// c_hidden_pair_att. Inference, training forward and backward, workspace.
#pragma once

#include <cstdint>
#include <vector>

#include "foldcube/tensor.h"
#include "layers/context.h"
#include "layers/gated_attention.h"
#include "layers/layer_models.h"
#include "layers/layer_norm_linear.h"
#include "model/weights.h"

namespace fc {

// z [r, r, c_z] += TriangleAttention(z); ending: the ending-node form.
void triangle_attention(const TriangleAttentionW& w, const BlockContext& ctx, bool ending,
                        float* z);
// Its peak bytes: the pair-bias heads, then the bias beside the attention.
int64_t triangle_attention_bytes(const BlockContext& ctx);

// ---- Training (conventions: src/model/train.h) ------------------------------------------------
void triangle_attention_train(const TriangleAttentionW& w, const BlockContext& ctx, bool ending,
                              float* z, AttentionState* st);
void triangle_attention_backward(const TriangleAttentionW& w, TriangleAttentionW* g,
                                 const BlockContext& ctx, bool ending, const float* z_in,
                                 AttentionState* st, float* dz);

}  // namespace fc
