// Block sizes of the AlphaFold2 stages that work on the pair a block of rows at a time, shared by
// the model code and its memory model (src/plan/af2_memory.cc).
#pragma once

#include <algorithm>
#include <cstdint>

namespace fc::af2 {

// Rows of an [r, r, c] fp32 pair tensor per block: about block_bytes per block (0: 4 MiB), at
// least 1, at most r.
inline int64_t pair_block_rows(int64_t r, int64_t c, int64_t block_bytes) {
  const int64_t per_row = std::max<int64_t>(r * c * 4, 1);
  const int64_t target = block_bytes > 0 ? block_bytes : int64_t{4} << 20;
  return std::clamp<int64_t>(target / per_row, 1, std::max<int64_t>(r, 1));
}

// Pair positions per block of the template pointwise attention (queries, keys and values of
// width hc each, and the output projection): 4096, or fewer to keep the three [n, hc] buffers
// within block_bytes when that is given (> 0); at least 1, at most rr.
inline int64_t template_block_positions(int64_t rr, int64_t hc, int64_t block_bytes) {
  const int64_t n = block_bytes > 0 ? block_bytes / std::max<int64_t>(3 * hc * 4, 1) : 4096;
  return std::clamp<int64_t>(std::min<int64_t>(n, 4096), 1, std::max<int64_t>(rr, 1));
}

}  // namespace fc::af2
