// Private pieces the planner's cost model (cost_model.cc) and its calibration (calibrate.cc)
// share.
#pragma once

#include <cstdint>

namespace fc {

// FLOPs of the attention products QK^T and PV for B batches of H heads, Lq queries, Lk keys and
// C channels per head: the count the attention rates of a DeviceProfile are measured against.
inline double attention_flops(int64_t B, int64_t H, int64_t Lq, int64_t Lk, int64_t C) {
  return 4.0 * B * H * Lq * Lk * C;
}

}  // namespace fc
