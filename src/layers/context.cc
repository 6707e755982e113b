#include "layers/context.h"

#include <algorithm>

namespace fc {

int64_t pick_chunk(const BlockContext& ctx, int64_t batch, int64_t bytes_per_item) {
  if (batch <= 0) return 1;
  if (ctx.chunk > 0) return std::min(ctx.chunk, batch);
  const int64_t target = std::max<int64_t>(ctx.chunk_target_bytes, 1);
  return std::clamp<int64_t>(target / std::max<int64_t>(bytes_per_item, 1), 1, batch);
}

}  // namespace fc
