#include "layers/swiglu_transition.h"

#include <algorithm>

#include "foldcube/status.h"
#include "kernels/backward.h"
#include "kernels/fused.h"
#include "kernels/kernels.h"
#include "layers/layer_util.h"

namespace fc {

namespace {
constexpr int64_t kF = sizeof(float);
}  // namespace

int64_t swiglu_transition_chunk(const BlockContext& ctx, int64_t rows, int64_t c, int64_t nc) {
  return pick_chunk(ctx, rows, (c + 2 * nc) * kF);
}

namespace {
// The fused kernel's arguments (weights unset: only the shapes matter for the scratch size).
kern::TransitionArgs fused_args(int64_t rows, int64_t c, int64_t nc) {
  kern::TransitionArgs a;
  a.rows = rows, a.c = c, a.hidden = nc, a.swiglu = true;
  return a;
}
}  // namespace

int64_t swiglu_transition_bytes(const BlockContext& ctx, int64_t rows, int64_t c, int64_t nc) {
  if (ctx.fused) return kern::transition_scratch_floats(fused_args(rows, c, nc), ctx.threads) * kF;
  return swiglu_transition_chunk(ctx, rows, c, nc) * (c + 2 * nc) * kF;
}

void swiglu_transition(const SwiGluTransitionW& w, const BlockContext& ctx, float* x, int64_t rows,
                       int64_t c) {
  const int64_t nc = w.fc3.w.dim(1);
  if (ctx.fused) {  // per-thread row blocks: LN, fc1 | fc2, gate and fc3 while in cache
    kern::TransitionArgs a = fused_args(rows, c, nc);
    a.x = x;
    a.gamma = w.ln.w.f32(), a.beta = w.ln.b.f32(), a.eps = ctx.cfg->eps_ln;
    a.W1 = w.fc12.w.f32(), a.b1 = bias_ptr(w.fc12);
    a.W2 = w.fc3.w.f32(), a.b2 = bias_ptr(w.fc3);
    Tensor scratch = Tensor::empty({kern::transition_scratch_floats(a, ctx.threads)});
    kern::transition(a, scratch.f32(), ctx.threads);
    return;
  }
  const int64_t ch = swiglu_transition_chunk(ctx, rows, c, nc);
  Tensor t = Tensor::empty({ch, c});       // LN(x) of the chunk, then the update
  Tensor h = Tensor::empty({ch, 2 * nc});  // fc1 | fc2; the gate overwrites fc1's half
  for (int64_t r0 = 0; r0 < rows; r0 += ch) {
    const int64_t n = std::min(ch, rows - r0);
    float* xr = x + r0 * c;
    kern::layernorm(xr, c, t.f32(), c, n, c, w.ln.w.f32(), w.ln.b.f32(), ctx.cfg->eps_ln);
    kern::linear(t.f32(), c, n, c, w.fc12.w.f32(), bias_ptr(w.fc12), 2 * nc, h.f32(), 2 * nc);
    kern::swiglu(h.f32(), 2 * nc, h.f32() + nc, 2 * nc, n, nc);
    kern::linear(h.f32(), 2 * nc, n, nc, w.fc3.w.f32(), bias_ptr(w.fc3), c, t.f32(), c);
    kern::add_inplace(xr, c, t.f32(), c, n, c);
  }
}

int64_t swiglu_transition_train_chunk(const BlockContext& ctx, int64_t rows, int64_t c,
                                      int64_t nc) {
  // Per row: the kept h and the backward's buffers (LN(x), dLN(x), statistics, u, dh).
  return pick_chunk(ctx, rows, (2 * c + 2 + 2 * nc + nc + 2 * nc) * kF);
}

void swiglu_transition_train(const SwiGluTransitionW& w, const BlockContext& ctx, float* x,
                             int64_t rows, int64_t c, TransitionState* st) {
  const int64_t nc = w.fc3.w.dim(1);
  const int64_t ch = swiglu_transition_train_chunk(ctx, rows, c, nc);
  for (int64_t r0 = 0; r0 < rows; r0 += ch) {
    const int64_t n = std::min(ch, rows - r0);
    float* xr = x + r0 * c;
    Tensor h = Tensor::empty({n, 2 * nc});  // fc1 | fc2 of the chunk (kept)
    {
      Tensor x_ln = Tensor::empty({n, c});
      kern::layernorm(xr, c, x_ln.f32(), c, n, c, w.ln.w.f32(), w.ln.b.f32(), ctx.cfg->eps_ln);
      kern::linear(x_ln.f32(), c, n, c, w.fc12.w.f32(), bias_ptr(w.fc12), 2 * nc, h.f32(), 2 * nc);
    }
    {
      Tensor u = Tensor::empty({n, nc});  // silu(fc1) * fc2
      for (int64_t i = 0; i < n; ++i)
        std::copy(h.f32() + i * 2 * nc, h.f32() + i * 2 * nc + nc, u.f32() + i * nc);
      kern::swiglu(u.f32(), nc, h.f32() + nc, 2 * nc, n, nc);
      kern::linear(u.f32(), nc, n, nc, w.fc3.w.f32(), bias_ptr(w.fc3), c, xr, c, true);
    }
    if (st) st->h.push_back(std::move(h));
  }
}

void swiglu_transition_backward(const SwiGluTransitionW& w, SwiGluTransitionW* g,
                                const BlockContext& ctx, const float* x_in, TransitionState* st,
                                float* dx, int64_t rows, int64_t c) {
  const int64_t nc = w.fc3.w.dim(1);
  const int64_t ch = swiglu_transition_train_chunk(ctx, rows, c, nc);
  FC_CHECK_MSG(st->h.empty() || static_cast<int64_t>(st->h.size()) == (rows + ch - 1) / ch,
               "transition state was saved with another chunking");
  for (int64_t r0 = 0, idx = 0; r0 < rows; r0 += ch, ++idx) {
    const int64_t n = std::min(ch, rows - r0);
    const float* xr = x_in + r0 * c;
    float* dxr = dx + r0 * c;
    NormedRows ln = layernorm_with_stats(xr, n, c, w.ln, ctx.cfg->eps_ln);
    Tensor h;  // [n, 2nc] fc1 | fc2, kept by the forward or recomputed
    if (st->h.empty()) {
      h = Tensor::empty({n, 2 * nc});
      kern::linear(ln.y.f32(), c, n, c, w.fc12.w.f32(), bias_ptr(w.fc12), 2 * nc, h.f32(), 2 * nc);
    } else {
      h = std::move(st->h[idx]);
    }
    Tensor dh = Tensor::empty({n, 2 * nc});  // dL/d (fc1 | fc2)
    {
      Tensor u = Tensor::empty({n, nc});  // silu(fc1) * fc2, then dL/d u
      for (int64_t i = 0; i < n; ++i)
        std::copy(h.f32() + i * 2 * nc, h.f32() + i * 2 * nc + nc, u.f32() + i * nc);
      kern::swiglu(u.f32(), nc, h.f32() + nc, 2 * nc, n, nc);
      Tensor du = Tensor::empty({n, nc});
      kern::linear_backward(u.f32(), nc, n, nc, w.fc3.w.f32(), c, dxr, c, du.f32(), nc,
                            g->fc3.w.f32(), bias_ptr(g->fc3));
      kern::swiglu_backward(h.f32(), 2 * nc, h.f32() + nc, 2 * nc, du.f32(), nc, dh.f32(), 2 * nc,
                            dh.f32() + nc, 2 * nc, n, nc);
    }
    h = Tensor();
    Tensor dxln = Tensor::empty({n, c});  // dL/d LN(x)
    kern::linear_backward(ln.y.f32(), c, n, c, w.fc12.w.f32(), 2 * nc, dh.f32(), 2 * nc, dxln.f32(),
                          c, g->fc12.w.f32(), bias_ptr(g->fc12));
    dh = Tensor();
    ln.y = Tensor();
    layernorm_backward_into(xr, dxln.f32(), n, c, w.ln, ln.mean.f32(), ln.rstd.f32(), dxr, &g->ln,
                            true);
  }
  st->h.clear();
}

// The SwiGLU transition (src/layers/swiglu_transition.cc): h [n, 2nc] kept per chunk.
void swiglu_train_replay(AllocReplay& S, const BlockContext& ctx, int64_t rows, int64_t c,
                         int64_t nc, bool keep) {
  const int64_t ch = swiglu_transition_train_chunk(ctx, rows, c, nc);
  for (int64_t r0 = 0; r0 < rows; r0 += ch) {
    const int64_t n = std::min(ch, rows - r0);
    S.alloc(2 * n * nc);  // h
    S.alloc(n * c);       // x_ln
    S.free(n * c);
    S.alloc(n * nc);  // u
    S.free(n * nc);
    if (!keep) S.free(2 * n * nc);
  }
}

void swiglu_backward_replay(AllocReplay& S, const BlockContext& ctx, int64_t rows, int64_t c,
                            int64_t nc, bool kept) {
  const int64_t ch = swiglu_transition_train_chunk(ctx, rows, c, nc);
  for (int64_t r0 = 0; r0 < rows; r0 += ch) {
    const int64_t n = std::min(ch, rows - r0);
    S.alloc(n * c + 2 * n);          // x_ln, mean, rstd
    if (!kept) S.alloc(2 * n * nc);  // h
    S.alloc(2 * n * nc);             // dh
    S.alloc(2 * n * nc);             // u, du
    S.free(2 * n * nc);
    S.free(2 * n * nc);          // h
    S.alloc(n * c);              // dxln
    S.free(2 * n * nc + n * c);  // dh, x_ln
    S.alloc(ln_scratch(n, c));
    S.free(ln_scratch(n, c));
    S.free(n * c + 2 * n);  // dxln, mean, rstd
  }
}

// ---- Models ------------------------------------------------------------------------------------

LayerWork swiglu_transition_work(int64_t rows, int64_t c, int64_t nc, const WorkChunks& ch,
                                 LayerWork* rb) {
  LayerWork w;
  const int64_t k = ch.training ? swiglu_transition_train_chunk(*ch.ctx, rows, c, nc)
                                : swiglu_transition_chunk(*ch.ctx, rows, c, nc);
  w.gemm.push_back({4.0 * rows * c * nc, static_cast<double>(k)});  // fc1 | fc2
  w.gemm.push_back({2.0 * rows * nc * c, static_cast<double>(k)});  // fc3
  w.chunks += div_ceil(rows, k);
  w.mem += 2.0 * rows * c + 3.0 * rows * nc;  // LayerNorm; silu(a) * b reads 2 nc, writes nc
  // Training: fc1 is copied out of h into u (reads and writes nc) before the gate, in the forward
  // and again in the backward's rebuild of u; with it the backward's 2 x mem + re_mem is its
  // passes (LN statistics 2c; u rebuilt 5nc; swiglu_backward reads a, b, du, writes da, db: 5nc;
  // LayerNorm backward 4c). The fused inference kernel gates in cache, without the copy.
  if (ch.training) w.mem += 2.0 * rows * nc;
  w.re_mem += 2.0 * rows * c;                 // LayerNorm rebuilt per chunk
  if (rb) {
    *rb = LayerWork{};
    rb->chunks = w.chunks;
    rb->gemm.push_back(w.gemm[0]);
    rb->mem = 2.0 * rows * c;
  }
  return w;
}

}  // namespace fc
