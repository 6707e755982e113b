// Analytic memory model of the training step and the inference forward (the plan layer's first
// piece), public and checked: every entry validates its arguments and returns a Status. Byte
// counts are exact for the tracked allocator (tests/train_memory_test.cc and
// tests/train_peak_test.cc check them against it). The library's own callers use the unchecked
// forms in src/plan/memory_model.h.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "foldcube/config.h"
#include "foldcube/model.h"

namespace fc {

// Arguments of the memory-model queries below. validate() is called by every public entry: a
// user error naming the argument, never undefined behaviour, for any field values.
struct MemoryQuery {
  EvoformerConfig cfg;   // model dims (cfg.validate())
  int64_t s = 0, r = 0;  // sequences and residues, >= 1
  int64_t blocks = 1;    // blocks of the stack, >= 1
  // Training recompute policy: empty (none), one entry for every block, or one per block.
  std::vector<Recompute> policy;
  int threads = 1;         // kernel scratch is per thread, >= 1
  int64_t elem_bytes = 4;  // 4 for fp32; 2 predicts a bf16/fp16 engine with the same plan
  int64_t chunk = 0;       // items per chunk as in TrainOptions / ForwardOptions, >= 0 (0 = auto)
  int64_t chunk_target_bytes = 0;  // automatic chunking target, >= 0 (0 = the default)
  // The training queries model ExtraMsaStack::train_step (c_m holds c_e) instead of the
  // Evoformer's.
  bool extra_msa = false;
  // Training queries: TrainOptions::dtype of the step (F32, or BF16: the kept layer inputs in
  // bf16 at 2 bytes per element, statistics, states, weights and gradients at elem_bytes).
  DType dtype = DType::F32;

  Status validate() const;
};

// Training chunking (chunk and chunk_target_bytes) is a parameter of every function below: the
// chunk sizes change both the kept state (policy none keeps per-chunk states) and the transients.
// Byte counts are exact for the tracked allocator. Predictions for elem_bytes != 4 keep the fp32
// plan (same chunk sizes) and scale every buffer.

// Bytes block `block` (in [0, blocks)) keeps from its forward for its backward under its policy.
Status block_activation_bytes(const MemoryQuery& q, int64_t block, int64_t* out);
// Activation bytes of the stack: sum over the blocks.
Status stack_activation_bytes(const MemoryQuery& q, int64_t* out);
// Peak of EvoformerStack::train_step, or ExtraMsaStack::train_step (TrainResult::peak_bytes:
// tracked bytes above those live before the step) without dropout: the activations, the dm/dz
// copies, the per-block parameter-gradient structs (alive until the end of the step), the recompute
// states and the transient buffers of whichever module chunk is running at the peak. It replays the
// step's allocation sequence.
Status stack_step_peak_bytes(const MemoryQuery& q, int64_t* out);

// ---- Inference memory plan ---------------------------------------------------------------------
// Tracked bytes EvoformerStack::forward allocates at its peak above what was live before it, at
// (s, r) with q's chunking (as in ForwardOptions; policy, blocks and elem_bytes unused): the mask
// buffers plus the largest module workspace, or the output s.
Status forward_peak_bytes(const MemoryQuery& q, bool masks_given, int64_t* out);

struct InferencePlan {
  int64_t chunk_target_bytes = 0;    // pass as ForwardOptions::chunk_target_bytes
  int64_t predicted_peak_bytes = 0;  // base_bytes + forward peak
};
// The default chunking if its predicted tracked peak (base_bytes, i.e. weights and inputs already
// live, plus the forward's own peak) fits in budget_bytes, else the coarsest finer chunking that
// fits. A user error naming the smallest feasible budget when even the finest chunking does not
// fit, or naming the bad argument (cfg, s, r >= 1, base_bytes >= 0, threads >= 1).
// dtype: ForwardOptions::dtype of the forward (F32 or BF16).
Status plan_inference(const EvoformerConfig& cfg, int64_t s, int64_t r, bool masks_given,
                      int64_t base_bytes, int64_t budget_bytes, int threads, InferencePlan* out,
                      DType dtype = DType::F32);

// The chunk loops of each module of EvoformerStack::forward (or ExtraMsaStack::forward when
// extra_msa) at (s, r) with q's chunking: module name as in the golden traces, the loop's axis,
// its length and the items per chunk the module will use.
struct ModuleChunk {
  std::string module, axis;
  int64_t length = 0, items = 0;
};
Status forward_chunking(const MemoryQuery& q, bool extra_msa, std::vector<ModuleChunk>* out);

// Parses "6GiB", "512MiB", "40GB", "1.5G", "1000000" (bytes). GB/MB/KB are decimal, GiB/MiB/KiB
// and bare G/M/K binary.
Status parse_bytes(const std::string& text, int64_t* out);

}  // namespace fc
