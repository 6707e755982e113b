// The cost model's per-module times for any block table (the AF3 Pairformer and MSA-module blocks:
// SwiGLU transitions, single attention with pair bias, pair-weighted averaging, the triangle
// layers), as block_module_costs gives them for the Evoformer and ExtraMSA blocks.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include "foldcube/planner.h"
#include "model/block_table.h"

namespace fc {

// Column col of a calibrated table of (x, rate, rate) rows, x ascending, interpolated in log x and
// clamped at its ends (the profiles' gemm_by_rows, narrow_gemm, mem_by_size, batched_by_rows).
double interpolate_table(const std::vector<std::array<double, 3>>& t, double x, int col);

// Forward (and with training the backward and policy-module rebuild) ms of each layer of t at
// (s, r) (s = 1: the Pairformer's single stream as a one-row MSA), in table order, named by the
// table. Working sets as block_module_costs: the chunk target, at most the layer's one-chunk
// workspace (layer_workspace_bytes).
std::vector<ModuleCost> table_module_costs(const BlockTable& t, const EvoformerConfig& cfg,
                                           int64_t s, int64_t r, int64_t chunk,
                                           int64_t chunk_target_bytes, bool training,
                                           const DeviceProfile& dev);

}  // namespace fc
