// The file and input handling of af3_run (src/exec/af3_runner.cc), shared with its DAP form
// (af3_dap_run, src/exec/af3_dap_run.cc).
#pragma once

#include <string>

#include "foldcube/af3.h"
#include "foldcube/io.h"
#include "foldcube/model.h"

namespace fc {

// The spec's weights (file: config from its shapes, checked against spec.stack; none: seeded
// random weights of spec.stack with spec.blocks blocks).
Status af3_load_weights(const Af3RunSpec& spec, TensorFile* w, Af3Config* cfg);
// Seeded random inputs under the golden names for spec.n tokens and spec.n_msa MSA rows.
Status af3_random_inputs(const Af3Config& c, const Af3RunSpec& spec, TensorFile* in);
// An optional F32 input (undefined when absent).
Status af3_optional_input(const TensorFile& f, const std::string& name, Tensor* out);
// dL/d output `x` (s or z) of the given shape: grad.output.x, else probe.x (g non-null), else
// ones (g == nullptr).
Status af3_grad_output(const TensorFile* g, const std::string& x, const Shape& shape, Tensor* out);
// The MSA module's feature [N, n, 36]: input.msa_feat, or built from input.msa and its
// deletion/paired tensors (msa_features); errors name `path`.
Status af3_msa_feat(const TensorFile& in, const std::string& path, Tensor* feat);
// The training options of the spec (policy, chunking, dropout and its seed).
TrainOptions af3_train_options(const Af3RunSpec& spec);
// An output file's metadata for the stack `kind` (pairformer | msa_module).
void af3_output_metadata(const std::string& kind, TensorFile* out);
// out gets grad.param.<name> for every parameter gradient of tr.
void af3_put_grads(const TrainResult& tr, TensorFile* out);

}  // namespace fc
