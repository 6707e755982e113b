// The AF2/AF3 layers for inference: each layer unit (src/layers/, one header per layer) updates
// its stream in place (residual update included) and allocates its intermediates through the
// tracking allocator, freeing each as soon as it is dead. Work is split into chunks along the
// layer's batch-like axis; the chunk size comes from the context (0 = automatic) and never
// changes the result. This header gathers the units and the per-module reports over them.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "foldcube/config.h"
#include "layers/context.h"
#include "layers/gated_attention.h"
#include "layers/global_attention.h"
#include "layers/layer_norm_linear.h"
#include "layers/msa_column_attention.h"
#include "layers/outer_product_mean.h"
#include "layers/transition.h"
#include "layers/triangle_attention.h"
#include "layers/triangle_multiplication.h"
#include "model/weights.h"

namespace fc {

// Peak bytes a module allocates on top of its inputs (the memory model of the inference path;
// tests check it against the tracking allocator). Module names as in the golden traces.
int64_t module_workspace_bytes(const char* module, const BlockContext& ctx);

// The chunk loops a module runs at this context, for reports and plans: each loop's axis, its
// length and the items per chunk (the same formulas the module uses). Names as in
// module_workspace_bytes.
struct ChunkLoop {
  std::string axis;  // e.g. "s" (MSA rows), "r" (residue rows or columns), "c_t" (channels)
  int64_t length = 0;
  int64_t items = 0;  // per chunk; length / items rounded up = number of chunks
};
std::vector<ChunkLoop> module_chunking(const char* module, const BlockContext& ctx);

}  // namespace fc
