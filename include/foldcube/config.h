// Model configuration (AlphaFold2 model_1 Evoformer defaults).
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include "foldcube/status.h"

namespace fc {

struct EvoformerConfig {
  int64_t c_m = 256;              // MSA channels
  int64_t c_z = 128;              // pair channels
  int64_t c_hidden_msa_att = 32;  // per-head channels, MSA row/column attention
  int64_t no_heads_msa = 8;
  int64_t c_hidden_pair_att = 32;  // per-head channels, triangle attention
  int64_t no_heads_pair = 4;
  int64_t c_hidden_opm = 32;   // outer product mean hidden
  int64_t c_hidden_mul = 128;  // triangle multiplication hidden
  int64_t transition_n = 4;    // transition expansion factor
  int64_t no_blocks = 48;
  int64_t c_s = 384;           // single representation channels (stack's final linear)
  float inf = 1e9f;            // attention mask bias magnitude
  float eps_ln = 1e-5f;        // LayerNorm eps
  float eps_opm = 1e-3f;       // OuterProductMean eps
  float msa_dropout = 0.15f;   // training: after MSA row attention (row-wise shared mask)
  float pair_dropout = 0.25f;  // training: after triangle mult./attention (row- or column-wise)

  // User error when any size is non-positive or absurd.
  Status validate() const;
  std::string to_json() const;
  // Keys as in the golden metadata / OpenFold kwargs; unknown keys are ignored, known keys with
  // bad values are errors. Missing keys keep their current value.
  Status update_from_json(const std::string& json_text);
  static Status from_json_file(const std::string& path, EvoformerConfig* out);
  // From safetensors metadata (golden files store each size as its own key).
  static Status from_metadata(const std::map<std::string, std::string>& md, EvoformerConfig* out);
};

}  // namespace fc
