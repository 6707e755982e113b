// Per-module chunk sizes of the inference path, for reports and plans.
#include "model/block_table.h"
#include "model/common.h"
#include "model/modules.h"
#include "plan/memory_model.h"

namespace fc {

std::vector<ModuleChunk> forward_chunking(const EvoformerConfig& cfg, int64_t s, int64_t r,
                                          int64_t chunk, int64_t chunk_target_bytes, int threads,
                                          bool extra_msa) {
  const BlockContext ctx = shape_context(cfg, s, r, chunk, chunk_target_bytes, threads);
  std::vector<ModuleChunk> out;
  for (const LayerDesc& l : extra_msa ? kExtraMsaBlock : kEvoformerBlock) {
    const std::string name =
        l.kind == LayerKind::kMsaColumnGlobalAttention ? "msa_att_col_global" : l.name;
    for (const ChunkLoop& c : layer_chunking(l, ctx))
      out.push_back({name, c.axis, c.length, c.items});
  }
  return out;
}

}  // namespace fc
