// What a layer unit states for the planner's models: its work by kernel class for the cost model
// (src/plan/cost_model.cc turns it into time with a DeviceProfile's rates) and the replay of its
// training allocations for the memory model (src/plan/memory_model.cc). Each unit's formulas
// live beside the code they describe (src/layers/<unit>.cc).
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>
#include <vector>

#include "kernels/backward.h"
#include "layers/context.h"

namespace fc {

// Work of one module split by kernel class. GEMM terms carry their row count (the M of the
// product, which sets its efficiency).
struct LayerWork {
  std::vector<std::pair<double, double>> gemm;  // (FLOPs, rows)
  // Products with a narrow side (output or reduction width `narrow`, e.g. the triangle
  // projections of a training channel group): (FLOPs, rows, narrow).
  std::vector<std::array<double, 3>> gemm_narrow;
  double batched = 0;                          // FLOPs of batched products
  std::vector<std::pair<double, double>> att;  // (FLOPs of QK^T + PV, key length)
  // Score elements B * H * Lq * Lk of those attentions (softmax inputs): the per-score work
  // (exp, scale, masking; an unfused attention's passes over [B, H, Lq, Lk]) that does not
  // grow with the head width C, unlike the FLOPs.
  double att_scores = 0;
  // Of those, the scores a pair bias is added to (an unfused attention's bias add is its own
  // pass over them: DeviceProfile::attention_bias_score_passes).
  double att_bias_scores = 0;
  double mem = 0;  // elements read + written by memory-bound kernels
  // Forward work the backward re-runs (recomputed LayerNorms, the triangle projections, the OPM
  // outer products; src/model/train.h says what each backward rebuilds).
  std::vector<std::pair<double, double>> re_gemm;
  std::vector<std::array<double, 3>> re_gemm_narrow;
  double re_batched = 0, re_mem = 0;
  // Elements swept through memory far larger than the caches (at stream_gbps), forward and
  // backward: the training triangle multiplication re-reads LN_in(z) per channel group.
  double stream = 0, bwd_stream = 0;
  // Inference: elements of the memory-bound passes that read or write a whole stream in place
  // (the fused kernels' LayerNorm of the stream rows, residual adds into the stream, the triangle
  // multiplication's LN_in(z) per channel group and its channel-major products P), forward, at
  // the memory-bound rate of ws_stream bytes (the stream's size), not of the chunk buffers: their
  // operands come from DRAM whatever the chunk target (kernels in src/kernels/fused.cc).
  double mem_stream = 0, ws_stream = 0;
  double chunks = 0;  // iterations of the module's chunk loops (each pays chunk_overhead_us)
  double ws = 0;      // bytes of the module's chunk buffers (sets its memory-bound passes' rate)
};

// Iterations of a loop over a items in steps of b.
inline int64_t div_ceil(int64_t a, int64_t b) { return (a + b - 1) / std::max<int64_t>(b, 1); }

// FLOPs of the attention products QK^T and PV for B batches of H heads, Lq queries, Lk keys and
// C channels per head: the count the attention rates of a DeviceProfile are measured against.
inline double attention_flops(int64_t B, int64_t H, int64_t Lq, int64_t Lk, int64_t C) {
  return 4.0 * B * H * Lq * Lk * C;
}

// Items per chunk of each loop, as the inference layers or the training
// functions of the units pick them; the GEMM row counts follow.
struct WorkChunks {
  const BlockContext* ctx;
  bool training;
  int64_t operator()(int64_t batch, int64_t bytes_per_item) const {
    return pick_chunk(*ctx, batch, bytes_per_item);
  }
};

// Live and peak bytes of a replayed allocation sequence. alloc / free count elements of the f32
// buffers (elem bytes each: 4, or the element size a scaled prediction assumes); alloc_bf16 /
// free_bf16 the bf16 ones (2 bytes each), so a bf16 training step's kept inputs and its f32
// statistics, states, weights and gradients each count at their own size.
struct AllocReplay {
  int64_t live = 0, peak = 0;
  int64_t elem = 4;
  void alloc(int64_t n) { add(n * elem); }
  void free(int64_t n) { live -= n * elem; }
  void alloc_bf16(int64_t n) { add(2 * n); }
  void free_bf16(int64_t n) { live -= 2 * n; }

 private:
  void add(int64_t bytes) {
    live += bytes;
    peak = std::max(peak, live);
  }
};

// Floats of the LayerNorm backward kernel's scratch on [rows, n].
inline int64_t ln_scratch(int64_t rows, int64_t n) {
  return kern::layernorm_backward_scratch_floats(rows, n);
}

}  // namespace fc
