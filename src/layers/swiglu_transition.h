// The AF3 (Boltz) SwiGLU transition as one reusable layer: x += fc3(silu(fc1(LN(x))) * fc2(LN(x))),
// chunked over the rows of the stream, with its training forward, exact backward and workspace
// formula. AF3 uses it for the single, pair and MSA streams (no biases; a bias is used where the
// weights define one).
#pragma once

#include <cstdint>

#include "layers/layer_models.h"
#include "model/modules.h"
#include "model/train.h"
#include "model/weights.h"

namespace fc {

// x [rows, c] += SwiGluTransition(x); hidden nc = w.fc3.w.dim(1).
void swiglu_transition(const SwiGluTransitionW& w, const BlockContext& ctx, float* x, int64_t rows,
                       int64_t c);
// Inference: with ctx.fused (the default) the fused kernel (kern::transition with swiglu) over
// per-thread row blocks, with GEMM inputs of ctx.dtype (BF16: LN(x), the gate and the weights
// rounded, f32 accumulation); otherwise the reference path over row chunks of LN(x) [ch, c] and the
// fc1 | fc2 output [ch, 2nc] (the gated product overwrites the fc1 half). Rows per chunk of the
// reference path, and the peak bytes either path allocates:
int64_t swiglu_transition_chunk(const BlockContext& ctx, int64_t rows, int64_t c, int64_t nc);
int64_t swiglu_transition_bytes(const BlockContext& ctx, int64_t rows, int64_t c, int64_t nc);

// Training: the state keeps, per row chunk, h [n, 2nc] = fc1 | fc2 outputs (before the gate);
// st == nullptr keeps nothing (the backward then recomputes h per chunk). Under BF16 storage
// (ctx.store) as the AF2 transition: bf16 GEMM inputs (LN(x), the gate, dL/d outputs, weights
// copied per call), h rounded to bf16 values before the gate and kept in bf16. Rows per chunk:
int64_t swiglu_transition_train_chunk(const BlockContext& ctx, int64_t rows, int64_t c, int64_t nc);
void swiglu_transition_train(const SwiGluTransitionW& w, const BlockContext& ctx, float* x,
                             int64_t rows, int64_t c, TransitionState* st);
// Conventions of train.h: x_in [rows, c] the module input; dx holds dL/d out on entry, dL/d in on
// exit; g accumulates the parameter gradients; st as the forward left it (consumed) or empty.
void swiglu_transition_backward(const SwiGluTransitionW& w, SwiGluTransitionW* g,
                                const BlockContext& ctx, const float* x_in, TransitionState* st,
                                float* dx, int64_t rows, int64_t c);

// Work for the cost model (src/plan/cost_model.cc): fc1 | fc2 (4 rows c nc FLOPs) and fc3 (2 rows
// nc c) on chunks of the inference or training row count, LayerNorm and the gate as memory passes;
// rb (training, may be null): what the backward rebuilds when nothing was kept (LN, fc1 | fc2).
LayerWork swiglu_transition_work(int64_t rows, int64_t c, int64_t nc, const WorkChunks& ch,
                                 LayerWork* rb);

// The training forward's allocations (keep: the state stays, policy none) and the backward's
// (kept: the forward's state is live), for the memory model.
// The SwiGLU transition (src/layers/swiglu_transition.cc): h [n, 2nc] kept per chunk.
void swiglu_train_replay(AllocReplay& S, const BlockContext& ctx, int64_t rows, int64_t c,
                         int64_t nc, bool keep);
void swiglu_backward_replay(AllocReplay& S, const BlockContext& ctx, int64_t rows, int64_t c,
                            int64_t nc, bool kept);

}  // namespace fc
