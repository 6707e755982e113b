// Per-module chunk sizes of the inference path, for reports and plans.
#include "model/common.h"
#include "model/modules.h"
#include "plan/memory_model.h"

namespace fc {

std::vector<ModuleChunk> forward_chunking(const EvoformerConfig& cfg, int64_t s, int64_t r,
                                          int64_t chunk, int64_t chunk_target_bytes, int threads,
                                          bool extra_msa) {
  const BlockContext ctx = shape_context(cfg, s, r, chunk, chunk_target_bytes, threads);
  const char* column = extra_msa ? "msa_att_col_global" : "msa_att_col";
  const char* modules[] = {"msa_att_row",        column,        "msa_transition",
                           "outer_product_mean", "tri_mul_out", "tri_mul_in",
                           "tri_att_start",      "tri_att_end", "pair_transition"};
  std::vector<ModuleChunk> out;
  for (const char* m : modules)
    for (const ChunkLoop& l : module_chunking(m, ctx))
      out.push_back({m, l.axis, l.length, l.items});
  return out;
}

}  // namespace fc
