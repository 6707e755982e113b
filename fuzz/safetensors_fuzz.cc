// Fuzz target: a whole safetensors file (header length, header JSON, offsets, data) through
// parse_safetensors_bytes, then what the CLI does with an accepted file: the config from its
// metadata, the config inferred from its tensors, and (for small configs) loading the stack.
#include <string_view>

#include "foldcube/config.h"
#include "foldcube/io.h"
#include "foldcube/model.h"
#include "fuzz_util.h"

namespace {

// Loading allocates the whole stack before matching tensors; only configs whose parameters could
// fit in a fuzz input are worth the time.
bool small(const fc::EvoformerConfig& c) {
  return c.validate().ok() && c.c_m <= 64 && c.c_z <= 64 && c.c_s <= 64 && c.no_blocks <= 2 &&
         c.c_hidden_msa_att * c.no_heads_msa <= 64 && c.c_hidden_pair_att * c.no_heads_pair <= 64 &&
         c.c_hidden_opm <= 16 && c.c_hidden_mul <= 64 && c.transition_n <= 4;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  fc::TensorFile f;
  const fc::Status st = fc::parse_safetensors_bytes(bytes, "fuzz", &f);
  if (!st.ok()) {
    FUZZ_CHECK(fc::fuzz::one_line(st.message()));
    FUZZ_CHECK(f.names.empty() && f.tensors.empty());  // output untouched on error
    return 0;
  }
  // An accepted file is coherent: every name has a tensor, and the tensors tile the data.
  FUZZ_CHECK(f.names.size() == f.tensors.size());
  uint64_t total = 0;
  for (const std::string& n : f.names) {
    const fc::Tensor& t = f.tensors.at(n);
    FUZZ_CHECK(t.defined());
    total += t.nbytes();
  }
  FUZZ_CHECK(total <= size);

  fc::EvoformerConfig md_cfg, shape_cfg;
  const fc::Status md = fc::EvoformerConfig::from_metadata(f.metadata, &md_cfg);
  if (md.ok()) FUZZ_CHECK(md_cfg.validate().ok());
  const fc::Status inferred = fc::infer_config_from_weights(f, &shape_cfg);
  for (const fc::EvoformerConfig* c : {&md_cfg, &shape_cfg}) {
    if (!small(*c)) continue;
    fc::EvoformerStack stack;
    const fc::Status load = fc::EvoformerStack::load(*c, f, &stack);
    if (!load.ok()) FUZZ_CHECK(fc::fuzz::one_line(load.message()));
  }
  (void)inferred;
  return 0;
}
