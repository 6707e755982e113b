// Pieces of the whole-model memory model (src/plan/af2_memory.cc) that the sharded model's
// replay (src/plan/af2_dap_memory.cc) shares.
#pragma once

#include <algorithm>
#include <cstdint>

#include "foldcube/alphafold.h"

namespace fc {

// Live bytes of a replayed allocation sequence, with the peak of the whole replay and of the
// current stage.
struct Af2Replay {
  int64_t live = 0, peak = 0, stage_peak = 0, entry = 0;
  void alloc(int64_t b) {
    live += b;
    note(live);
  }
  void free(int64_t b) { live -= b; }
  void transient(int64_t b) { note(live + b); }  // allocated and freed again
  void begin() { entry = stage_peak = live; }
  void note(int64_t v) {
    peak = std::max(peak, v);
    stage_peak = std::max(stage_peak, v);
  }
};

// Bytes of the structure module's per-layer outputs (sm.frames ... sm.states) at r residues.
int64_t af2_sm_output_bytes(const AlphaFoldConfig& cfg, int64_t r);
// The largest transient of one structure-module layer at r residues: IPA (its projections, then
// the scores with `o_pair` bytes of o_pair work beside them), the transition or the angle ResNet.
int64_t af2_sm_layer_bytes(const AlphaFoldConfig& cfg, int64_t r, int64_t o_pair);
// The pLDDT head at r residues: its hidden layers come and go, the logits and pLDDT stay.
void af2_plddt_head(const AlphaFoldConfig& cfg, int64_t r, Af2Replay* m);

// One pass's copies of the features (pass_features): none when the recycling axis has length 1,
// and none of a feature with one element (its pass is then a contiguous view).
int64_t af2_pass_feature_bytes(const AlphaFoldConfig& cfg, const AlphaFoldDims& d);
// The copy pad_residues makes of every feature the model reads at d.r residues, all R passes.
int64_t af2_padded_feature_bytes(const AlphaFoldConfig& cfg, const AlphaFoldDims& d);

}  // namespace fc
