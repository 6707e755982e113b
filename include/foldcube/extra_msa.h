// The AlphaFold2 ExtraMSA stack (inference and training): OpenFold ExtraMSAStack / ExtraMSABlock.
// Each block is an Evoformer block with two differences: the MSA column attention is global
// column attention (one shared key/value head, queries from the masked mean over sequences), and
// the MSA transition's update is multiplied by msa_mask. The stack has no single-representation
// output. The config is an EvoformerConfig whose c_m holds the extra-MSA channels c_e (c_s is
// unused).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "foldcube/config.h"
#include "foldcube/io.h"
#include "foldcube/model.h"
#include "foldcube/status.h"
#include "foldcube/tensor.h"

namespace fc {

struct ExtraMsaBlockWeights;  // src/model/weights.h

class ExtraMsaStack {
 public:
  // Added to each column's mask count in the global attention's masked mean (OpenFold's `eps`).
  static constexpr float kDefaultGlobalEps = 1e-8f;

  ExtraMsaStack();
  ~ExtraMsaStack();
  ExtraMsaStack(ExtraMsaStack&&) noexcept;
  ExtraMsaStack& operator=(ExtraMsaStack&&) noexcept;

  // Weights under OpenFold ExtraMSAStack state_dict names (blocks.<i>.…). Every tensor must be
  // present, F32, finite and of the shape the config implies; otherwise a user error naming it.
  // The global-attention eps comes from the file metadata (`constants.global_attention_eps`, else
  // the `config` kwarg `eps`) when present, else kDefaultGlobalEps. Metadata asking for a
  // variant this engine does not implement (`opm_first`) is a user error.
  static Status load(const EvoformerConfig& cfg, const TensorFile& weights, ExtraMsaStack* out);
  // Seeded random weights scaled so that activations stay O(1) (benchmarks, memory tests).
  static ExtraMsaStack random(const EvoformerConfig& cfg, uint64_t seed);

  // m [s, r, c_e] and z [r, r, c_z] (contiguous F32) are updated in place to the stack output.
  // msa_mask [s, r], pair_mask [r, r]: undefined tensors mean all ones. opts.trace is called
  // after each module with the golden trace names ("msa_att_col" for the global attention).
  Status forward(Tensor& m, Tensor& z, const Tensor& msa_mask, const Tensor& pair_mask,
                 const ForwardOptions& opts = {}) const;

  // One training step as EvoformerStack::train_step (no output.s): forward with m, z updated in
  // place to the outputs, then the exact backward of L with dL/d output.m = grad_out_m and
  // dL/d output.z = grad_out_z; out->grad_params lists every block parameter.
  Status train_step(Tensor& m, Tensor& z, const Tensor& msa_mask, const Tensor& pair_mask,
                    const Tensor& grad_out_m, const Tensor& grad_out_z, const TrainOptions& opts,
                    TrainResult* out) const;

  const EvoformerConfig& config() const { return cfg_; }
  float global_eps() const { return eps_global_; }
  int64_t param_bytes() const;
  // Writes the weights under their state_dict names.
  void export_weights(TensorFile* out) const;

 private:
  friend struct StackAccess;  // the library's executors read the block parameters
  EvoformerConfig cfg_;
  float eps_global_ = kDefaultGlobalEps;
  std::vector<std::unique_ptr<ExtraMsaBlockWeights>> blocks_;
};

}  // namespace fc
