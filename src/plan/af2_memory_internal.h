// Pieces of the whole-model memory model (src/plan/af2_memory.cc) that the sharded model's
// replay (src/plan/af2_dap_memory.cc) shares.
#pragma once

#include <cstdint>

#include "foldcube/alphafold.h"

namespace fc {

// One pass's copies of the features (pass_features): none when the recycling axis has length 1,
// and none of a feature with one element (its pass is then a contiguous view).
int64_t af2_pass_feature_bytes(const AlphaFoldConfig& cfg, const AlphaFoldDims& d);

}  // namespace fc
