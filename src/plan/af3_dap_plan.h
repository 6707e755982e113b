// Per-rank memory estimate of the AF3 stacks under DAP (`run --stack pairformer|msa_module --dap N
// --memory-budget X`): a decomposition of each rank's tracked peak, not an exact replay.
#pragma once

#include <cstdint>

#include "foldcube/af3.h"
#include "foldcube/status.h"

namespace fc {

struct Af3DapPlanRequest {
  Af3PlanRequest q;  // the stack, shapes, mode, policy, chunking and budget (per rank)
  int ranks = 1;
  // Rank 0's caller tensors: the streams it scatters (released then, the outputs gathered into
  // their place at the end) and what it holds through the call (masks, features, dL/d outputs).
  int64_t root_stream_bytes = 0, root_held_bytes = 0;
};
struct Af3DapPlan {
  // One row as Af3Plan's (inference) or one per candidate policy (training). peak_bytes: rank 0's
  // tracked peak during the stack call, everything live included (weights, root tensors); fits:
  // peak_bytes <= the budget. chunk_target_bytes: the per-rank chunk target.
  std::vector<Af3PlanRow> rows;
  int chosen = -1;
  int64_t least_bytes = 0;  // the smallest budget any row (any chunk target) meets
};
// Rank 0's peak = weights + root_held_bytes + the larger of (root_stream_bytes (training: twice,
// the outputs and the input gradients) + the MSA module's embedding m + its shards of m and z +
// the replicated part R, while the inputs are scattered and the results gathered) and (1.06 x W,
// while the blocks run), where W = the one-process plan's work (af3_plan, at N x the rank's chunk
// target) / N, with the parameter gradients (every rank holds them) whole, + R, and R = what every
// rank holds in full: the padded masks and biases [s_p, r_p], [r_p, r_p], the gathered attention
// bias and its permuted copy [H, r_p, r_p] (H: the triangle attention's and the PWA's heads; the
// single attention's bias is the shard's rows), the triangle multiplication's gathered right
// operands and their gradients [2 x group, r_p, r_p], one chunk buffer of the rank's target, and
// in the bf16 forward the bf16 copies of the largest SwiGLU transition's weights
// (at small shapes the one-process work is below N targets, and its 1/N undercounts the rank's).
// Inference lowers the rank's chunk target (bisection) until the peak fits; training takes the
// least recompute that fits.
Status af3_dap_plan(const Af3DapPlanRequest& req, Af3DapPlan* out);

}  // namespace fc
