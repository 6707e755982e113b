// Pieces shared by the stacks (Evoformer, ExtraMSA) and the training driver: input validation,
// mask preparation, the block context, seeded parameter init.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "foldcube/config.h"
#include "foldcube/io.h"
#include "foldcube/status.h"
#include "foldcube/tensor.h"
#include "model/modules.h"

namespace fc {

std::string block_prefix(int i);  // "blocks.<i>."

// User errors for non-finite values, wrong shape/dtype/contiguity, and masks other than 0/1.
Status check_finite(const std::string& name, const Tensor& t);
Status check_input(const std::string& name, const Tensor& t, const Shape& shape);
Status check_mask(const std::string& name, const Tensor& t, const Shape& shape);

// User error when the weights name a block "blocks.<i>." with i >= cfg.no_blocks.
Status check_block_count(const EvoformerConfig& cfg, const TensorFile& weights);
// User error when the F32 "blocks.*" tensors of `weights` hold fewer bytes than a lower bound of
// the parameters cfg's blocks need (terms every Evoformer and ExtraMSA block has), so a config
// that cannot match the weights (e.g. hostile metadata claiming c_m = 2^20) is refused before the
// loader allocates anything.
Status check_weights_cover_config(const EvoformerConfig& cfg, const TensorFile& weights);
// Copies each named parameter from the file into its view: present, F32, of the view's shape and
// finite, else a user error naming it.
Status load_params(const std::vector<std::pair<std::string, Tensor>>& params,
                   const TensorFile& weights);

// Validated stream inputs and masks plus the mask biases inf*(mask-1) and their transposes.
struct StackInputs {
  int64_t s = 0, r = 0;
  Tensor msa_mask, pair_mask;     // [s, r], [r, r] (all ones when not given)
  Tensor msa_bias, msa_bias_t;    // [s, r], [r, s]
  Tensor pair_bias, pair_bias_t;  // [r, r], [r, r]
};
// m [s, r, c_m] and z [r, r, c_z] F32 contiguous; masks optional (undefined = ones).
Status prepare_inputs(const EvoformerConfig& cfg, const Tensor& m, const Tensor& z,
                      const Tensor& msa_mask, const Tensor& pair_mask, StackInputs* out);
// A context with shapes and chunking but no masks: what the memory and cost models read.
// chunk and chunk_target_bytes as in ForwardOptions (0 = automatic / the default target);
// threads < 1 counts as 1.
BlockContext shape_context(const EvoformerConfig& cfg, int64_t s, int64_t r, int64_t chunk,
                           int64_t chunk_target_bytes, int threads);
// The block context over prepared inputs (which must outlive it). chunk and chunk_target_bytes as
// in ForwardOptions (0 = automatic / the default target).
BlockContext make_context(const EvoformerConfig& cfg, const StackInputs& in, int64_t chunk,
                          int64_t chunk_target_bytes = 0);

// Seeded init of one named parameter: weights U(-a, a) with variance 1/fan_in, LayerNorm weights
// 1 + U(-0.1, 0.1), biases U(-0.1, 0.1). The stream depends on (seed, name) only.
void random_fill(const std::string& name, Tensor t, uint64_t seed);

}  // namespace fc
