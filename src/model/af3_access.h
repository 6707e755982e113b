// What the library's executors (src/exec/af3_dap.cc) read of the AF3 stacks: the trunk config,
// the block weight structs, the validated inputs and the MSA module's embedding backward. Defined
// in af3.cc beside the stacks.
#pragma once

#include <vector>

#include "foldcube/af3.h"
#include "foldcube/model.h"
#include "model/common.h"

namespace fc {

struct Af3Access {
  static const EvoformerConfig& trunk(const PairformerStack& st);
  static const EvoformerConfig& trunk(const MsaModule& st);
  // The blocks' weight structs (PairformerBlockWeights / MsaModuleBlockWeights), in order.
  static std::vector<const void*> blocks(const PairformerStack& st);
  static std::vector<const void*> blocks(const MsaModule& st);
  // The validated inputs as the one-process forward prepares them: the single stream as a one-row
  // MSA (msa_mask [1, n] = mask, pair_mask [n, n] = mask[i] * mask[j]), or the MSA module's
  // embedding m [N, n, c_m] with its masks; user errors name the input tensor.
  static Status pairformer_inputs(const PairformerStack& st, const Tensor& s, const Tensor& z,
                                  const Tensor& mask, StackInputs* in);
  static Status msa_module_inputs(const MsaModule& st, const Tensor& z, const Tensor& emb,
                                  const Tensor& msa_feat, const Tensor& msa_mask,
                                  const Tensor& token_mask, Tensor* m, StackInputs* in);
  // Backward of the MSA module's embedding m = msa_proj(msa_feat) + s_proj(emb) from grad_m
  // [N, n, c_m]: *grad_emb [n, c_s], and out->grad_params gets s_proj.weight, msa_proj.weight.
  static void msa_module_embed_backward(const MsaModule& st, const Tensor& emb,
                                        const Tensor& msa_feat, const Tensor& grad_m,
                                        Tensor* grad_emb, TrainResult* out);
};

}  // namespace fc
