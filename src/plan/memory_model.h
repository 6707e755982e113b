// The unchecked memory-model functions behind include/foldcube/plan.h, for the library's own
// callers (planner search, executors, app, tests), which pass arguments that satisfy
// MemoryQuery::validate(); a policy list of the wrong size is a bug (FC_CHECK). Contracts as in
// plan.h.
#pragma once

#include <cstdint>
#include <vector>

#include "foldcube/plan.h"

namespace fc {

// extra_msa: the ExtraMSA stack (ExtraMsaStack::train_step), else the Evoformer's. store:
// TrainOptions::dtype (BF16: the kept layer inputs count 2 bytes per element, everything else
// elem_bytes).
int64_t block_activation_bytes(const EvoformerConfig& cfg, int64_t s, int64_t r, Recompute policy,
                               int64_t elem_bytes = 4, int64_t chunk = 0,
                               int64_t chunk_target_bytes = 0, bool extra_msa = false,
                               DType store = DType::F32);
// policy: empty, one entry, or `blocks` entries.
int64_t stack_activation_bytes(const EvoformerConfig& cfg, int64_t s, int64_t r, int64_t blocks,
                               const std::vector<Recompute>& policy, int64_t elem_bytes = 4,
                               int64_t chunk = 0, int64_t chunk_target_bytes = 0,
                               bool extra_msa = false, DType store = DType::F32);
int64_t stack_step_peak_bytes(const EvoformerConfig& cfg, int64_t s, int64_t r, int64_t blocks,
                              const std::vector<Recompute>& policy, int threads,
                              int64_t elem_bytes = 4, int64_t chunk = 0,
                              int64_t chunk_target_bytes = 0, bool extra_msa = false,
                              DType store = DType::F32);
// The same over any block table whose weights and streams cfg describes (the functions above
// take kExtraMsaBlock when extra_msa, else kEvoformerBlock): kEvoformerBlock (with
// EvoformerStack::train_step's single projection), kExtraMsaBlock (c_m holds c_e), the AF3
// stacks' kPairformerBlock (s = 1, cfg.c_m = c_s) and kMsaModuleBlock (see af3_trunk_config).
struct BlockTable;
int64_t block_activation_bytes(const BlockTable& t, const EvoformerConfig& cfg, int64_t s,
                               int64_t r, Recompute policy, int64_t elem_bytes, int64_t chunk,
                               int64_t chunk_target_bytes, DType store = DType::F32);
int64_t stack_activation_bytes(const BlockTable& t, const EvoformerConfig& cfg, int64_t s,
                               int64_t r, int64_t blocks, const std::vector<Recompute>& policy,
                               int64_t elem_bytes, int64_t chunk, int64_t chunk_target_bytes,
                               DType store = DType::F32);
int64_t stack_step_peak_bytes(const BlockTable& t, const EvoformerConfig& cfg, int64_t s, int64_t r,
                              int64_t blocks, const std::vector<Recompute>& policy, int threads,
                              int64_t elem_bytes, int64_t chunk, int64_t chunk_target_bytes,
                              DType store = DType::F32);
// One layer's training forward (keep: its state stays) and backward (kept: that state is live)
// as the step replays them, in bytes above the live bytes at the call (peak, and live after):
// what layer_train / layer_backward (src/model/train.h) allocate for these options.
struct LayerReplayBytes {
  int64_t peak = 0, live = 0;
};
struct BlockContext;
struct LayerDesc;
LayerReplayBytes layer_train_replay_bytes(const BlockContext& ctx, const LayerDesc& l, bool keep);
LayerReplayBytes layer_backward_replay_bytes(const BlockContext& ctx, const LayerDesc& l,
                                             bool kept);
// The backward of one block of the stack's table under `policy` (its kept state from its
// forward live, then its gradient struct, then block_bwd as train_blocks runs it): the peak above
// its gradient struct, i.e. the kept state and the backward's transients. last: the stack's last
// block, whose outputs are f32; else they are the next block's kept inputs (bf16 under BF16
// storage, which the backward widens). With F32 storage both are the same.
int64_t block_backward_peak_bytes(const EvoformerConfig& cfg, int64_t s, int64_t r,
                                  Recompute policy, int threads, int64_t elem_bytes, int64_t chunk,
                                  int64_t chunk_target_bytes, bool extra_msa, DType store,
                                  bool last);
// Elements of one block's parameter (or parameter-gradient) struct of table t.
int64_t block_param_elems(const EvoformerConfig& cfg, const BlockTable& t);
// Largest workspace of table t's layers in a forward at (s, r) with these options (dtype:
// ForwardOptions::dtype; BF16 stores some products' inputs in bf16).
int64_t stack_workspace_bytes(const BlockTable& t, const EvoformerConfig& cfg, int64_t s, int64_t r,
                              int64_t chunk, int64_t chunk_target_bytes, int threads,
                              DType dtype = DType::F32);
int64_t forward_peak_bytes(const EvoformerConfig& cfg, int64_t s, int64_t r, bool masks_given,
                           int64_t chunk, int64_t chunk_target_bytes, int threads,
                           DType dtype = DType::F32);
// The same for ExtraMsaStack::forward (its block table; no output s).
int64_t extra_msa_forward_peak_bytes(const EvoformerConfig& cfg, int64_t s, int64_t r,
                                     bool masks_given, int64_t chunk, int64_t chunk_target_bytes,
                                     int threads, DType dtype = DType::F32);
std::vector<ModuleChunk> forward_chunking(const EvoformerConfig& cfg, int64_t s, int64_t r,
                                          int64_t chunk, int64_t chunk_target_bytes, int threads,
                                          bool extra_msa = false);

}  // namespace fc
