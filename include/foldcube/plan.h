// Analytic memory model of the training step (the plan layer's first piece). Byte counts are
// exact for the tracked allocator (tests/train_memory_test.cc and tests/train_peak_test.cc check
// them against it). Predictions for elem_bytes != 4 keep the fp32 plan (same chunk sizes) and
// scale every buffer, i.e. they describe a bf16/fp16 engine with the same allocation sequence.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "foldcube/config.h"
#include "foldcube/model.h"

namespace fc {

// Training chunking (TrainOptions::chunk and chunk_target_bytes; 0 = automatic / the default
// target) is a parameter of every function below: the chunk sizes change both the kept state
// (policy none keeps per-chunk states) and the transients.

// Bytes one block keeps from its forward for its backward under `policy`, at (s, r), for
// elements of `elem_bytes` bytes (4 for fp32; 2 predicts a bf16/fp16 engine with the same plan).
int64_t block_activation_bytes(const EvoformerConfig& cfg, int64_t s, int64_t r, Recompute policy,
                               int64_t elem_bytes = 4, int64_t chunk = 0,
                               int64_t chunk_target_bytes = 0);

// Activation bytes of a stack: sum over blocks (policy: one entry per block, or one for all).
int64_t stack_activation_bytes(const EvoformerConfig& cfg, int64_t s, int64_t r, int64_t blocks,
                               const std::vector<Recompute>& policy, int64_t elem_bytes = 4,
                               int64_t chunk = 0, int64_t chunk_target_bytes = 0);

// Peak of EvoformerStack::train_step (TrainResult::peak_bytes: tracked bytes above those live
// before the step) without dropout, with `threads` threads (kernel scratch is per thread) and the
// given chunking: the activations, the dm/dz copies, the per-block parameter-gradient structs
// (alive until the end of the step), the recompute states and the transient buffers of whichever
// module chunk is running at the peak. It replays the step's allocation sequence.
int64_t stack_step_peak_bytes(const EvoformerConfig& cfg, int64_t s, int64_t r, int64_t blocks,
                              const std::vector<Recompute>& policy, int threads,
                              int64_t elem_bytes = 4, int64_t chunk = 0,
                              int64_t chunk_target_bytes = 0);

// ---- Inference memory plan ---------------------------------------------------------------------
// Tracked bytes EvoformerStack::forward allocates at its peak above what was live before it, at
// (s, r) with the given chunking (chunk / chunk_target_bytes as in ForwardOptions; 0 = default):
// the mask buffers plus the largest module workspace (module_workspace_bytes), or the output s.
int64_t forward_peak_bytes(const EvoformerConfig& cfg, int64_t s, int64_t r, bool masks_given,
                           int64_t chunk, int64_t chunk_target_bytes, int threads);

struct InferencePlan {
  int64_t chunk_target_bytes = 0;    // pass as ForwardOptions::chunk_target_bytes
  int64_t predicted_peak_bytes = 0;  // base_bytes + forward_peak_bytes
};
// The default chunking if its predicted tracked peak (base_bytes, i.e. weights and inputs already
// live, plus the forward's own peak) fits in budget_bytes, else the coarsest finer chunking that
// fits. A user error naming the smallest
// feasible budget when even the finest chunking does not fit.
Status plan_inference(const EvoformerConfig& cfg, int64_t s, int64_t r, bool masks_given,
                      int64_t base_bytes, int64_t budget_bytes, int threads, InferencePlan* out);

// The chunk loops of each module of EvoformerStack::forward (or ExtraMsaStack::forward when
// extra_msa) at (s, r) with the given chunking (as forward_peak_bytes): module name as in the
// golden traces, the loop's axis, its length and the items per chunk the module will use.
struct ModuleChunk {
  std::string module, axis;
  int64_t length = 0, items = 0;
};
std::vector<ModuleChunk> forward_chunking(const EvoformerConfig& cfg, int64_t s, int64_t r,
                                          int64_t chunk, int64_t chunk_target_bytes, int threads,
                                          bool extra_msa = false);

// Parses "6GiB", "512MiB", "40GB", "1.5G", "1000000" (bytes). GB/MB/KB are decimal, GiB/MiB/KiB
// and bare G/M/K binary.
Status parse_bytes(const std::string& text, int64_t* out);

}  // namespace fc
