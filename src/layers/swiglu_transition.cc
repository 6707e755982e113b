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
// The fused kernel's arguments (weights unset: only the shapes and the GEMM input type matter for
// the scratch size).
kern::TransitionArgs fused_args(const BlockContext& ctx, int64_t rows, int64_t c, int64_t nc) {
  kern::TransitionArgs a;
  a.rows = rows, a.c = c, a.hidden = nc, a.swiglu = true, a.dtype = ctx.dtype;
  return a;
}
}  // namespace

int64_t swiglu_transition_bytes(const BlockContext& ctx, int64_t rows, int64_t c, int64_t nc) {
  if (ctx.fused)  // the scratch and, BF16, the weights' bf16 copies (fc1 | fc2 and fc3)
    return kern::transition_scratch_floats(fused_args(ctx, rows, c, nc), ctx.threads) * kF +
           gemm_weights_bytes(3 * nc * c, ctx.dtype);
  return swiglu_transition_chunk(ctx, rows, c, nc) * (c + 2 * nc) * kF;
}

void swiglu_transition(const SwiGluTransitionW& w, const BlockContext& ctx, float* x, int64_t rows,
                       int64_t c) {
  const int64_t nc = w.fc3.w.dim(1);
  if (ctx.fused) {  // per-thread row blocks: LN, fc1 | fc2, gate and fc3 while in cache
    kern::TransitionArgs a = fused_args(ctx, rows, c, nc);
    a.x = x;
    a.gamma = w.ln.w.f32(), a.beta = w.ln.b.f32(), a.eps = ctx.cfg->eps_ln;
    a.W1 = w.fc12.w.f32(), a.b1 = bias_ptr(w.fc12);
    a.W2 = w.fc3.w.f32(), a.b2 = bias_ptr(w.fc3);
    const Tensor w1 = gemm_weights(w.fc12.w, ctx.dtype);  // [2nc, c] bf16 (BF16 only)
    const Tensor w2 = gemm_weights(w.fc3.w, ctx.dtype);   // [c, nc]
    a.W1_bf16 = bf16_ptr(w1), a.W2_bf16 = bf16_ptr(w2);
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

namespace {
// h [n, 2nc] = fc1 | fc2 of LN(x) (x_ln [n, c]: f32, or bf16 under BF16 storage).
void fc12_train(const BlockContext& ctx, const SwiGluTransitionW& w, const Tensor& x_ln, int64_t n,
                int64_t c, int64_t nc, float* h) {
  if (x_ln.dtype() == DType::BF16)
    train_linear(ctx, x_ln.data<uint16_t>(), c, n, c, w.fc12.w.f32(), bias_ptr(w.fc12), 2 * nc, h,
                 2 * nc);
  else
    train_linear(ctx, x_ln.f32(), c, n, c, w.fc12.w.f32(), bias_ptr(w.fc12), 2 * nc, h, 2 * nc);
}

// u [n, nc] = silu(fc1) * fc2 from h [n, 2nc].
void gate(const Tensor& h, int64_t n, int64_t nc, float* u) {
  for (int64_t i = 0; i < n; ++i)
    std::copy(h.f32() + i * 2 * nc, h.f32() + i * 2 * nc + nc, u + i * nc);
  kern::swiglu(u, nc, h.f32() + nc, 2 * nc, n, nc);
}
}  // namespace

int64_t swiglu_transition_train_chunk(const BlockContext& ctx, int64_t rows, int64_t c,
                                      int64_t nc) {
  // Per row: the kept h and the backward's buffers (LN(x), dLN(x), statistics, u, dh).
  return pick_chunk(ctx, rows, (2 * c + 2 + 2 * nc + nc + 2 * nc) * kF);
}

// BF16 storage (ctx.store): LN(x) is written in bf16 (fc1 | fc2's GEMM input) and h rounded to
// bf16 values once after fc1 | fc2; those values feed the gate and are the kept state (bf16), so
// the backward, kept or recomputed, sees the forward's h. The gate u is rounded to bf16 as fc3's
// GEMM input inside train_linear. Weights stay f32 masters, copied to bf16 per call.
void swiglu_transition_train(const SwiGluTransitionW& w, const BlockContext& ctx, float* x,
                             int64_t rows, int64_t c, TransitionState* st) {
  const int64_t nc = w.fc3.w.dim(1);
  const int64_t ch = swiglu_transition_train_chunk(ctx, rows, c, nc);
  for (int64_t r0 = 0; r0 < rows; r0 += ch) {
    const int64_t n = std::min(ch, rows - r0);
    float* xr = x + r0 * c;
    Tensor h = Tensor::empty({n, 2 * nc});  // fc1 | fc2 of the chunk (kept; bf16 values in BF16)
    {
      Tensor x_ln = Tensor::empty({n, c}, ctx.store);  // LN(x) (bf16 under BF16 storage)
      if (ctx.store == DType::BF16)
        kern::layernorm_bf16(xr, c, x_ln.data<uint16_t>(), c, n, c, w.ln.w.f32(), w.ln.b.f32(),
                             ctx.cfg->eps_ln);
      else
        kern::layernorm(xr, c, x_ln.f32(), c, n, c, w.ln.w.f32(), w.ln.b.f32(), ctx.cfg->eps_ln);
      fc12_train(ctx, w, x_ln, n, c, nc, h.f32());
    }
    round_for_store(ctx, h);
    {
      Tensor u = Tensor::empty({n, nc});  // silu(fc1) * fc2
      gate(h, n, nc, u.f32());
      train_linear(ctx, u.f32(), nc, n, nc, w.fc3.w.f32(), bias_ptr(w.fc3), c, xr, c, true);
    }
    if (st) st->h.push_back(to_store(ctx, std::move(h)));
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
    // LN(x) ([n, c], bf16 under BF16 storage) with its statistics
    NormedRows ln = layernorm_with_stats(xr, n, c, w.ln, ctx.cfg->eps_ln, ctx.store);
    Tensor h;  // [n, 2nc] fc1 | fc2, kept by the forward (widened from bf16) or recomputed
    if (st->h.empty()) {
      h = Tensor::empty({n, 2 * nc});
      fc12_train(ctx, w, ln.y, n, c, nc, h.f32());
      round_for_store(ctx, h);
    } else {
      h = from_store(std::move(st->h[idx]));
    }
    Tensor dh = Tensor::empty({n, 2 * nc});  // dL/d (fc1 | fc2)
    {
      Tensor u = Tensor::empty({n, nc});   // silu(fc1) * fc2
      Tensor du = Tensor::empty({n, nc});  // dL/d u
      gate(h, n, nc, u.f32());
      train_linear_backward(ctx, u.f32(), nc, n, nc, w.fc3.w.f32(), c, dxr, c, du.f32(), nc,
                            g->fc3.w.f32(), bias_ptr(g->fc3));
      kern::swiglu_backward(h.f32(), 2 * nc, h.f32() + nc, 2 * nc, du.f32(), nc, dh.f32(), 2 * nc,
                            dh.f32() + nc, 2 * nc, n, nc);
    }
    h = Tensor();
    Tensor dxln = Tensor::empty({n, c});  // dL/d LN(x)
    if (ln.y.dtype() == DType::BF16)
      train_linear_backward(ctx, ln.y.data<uint16_t>(), c, n, c, w.fc12.w.f32(), 2 * nc, dh.f32(),
                            2 * nc, dxln.f32(), c, g->fc12.w.f32(), bias_ptr(g->fc12));
    else
      train_linear_backward(ctx, ln.y.f32(), c, n, c, w.fc12.w.f32(), 2 * nc, dh.f32(), 2 * nc,
                            dxln.f32(), c, g->fc12.w.f32(), bias_ptr(g->fc12));
    dh = Tensor();
    ln.y = Tensor();
    layernorm_backward_into(xr, dxln.f32(), n, c, w.ln, ln.mean.f32(), ln.rstd.f32(), dxr, &g->ln,
                            true);
  }
  st->h.clear();
}

// The SwiGLU transition (src/layers/swiglu_transition.cc): h [n, 2nc] kept per chunk (bf16 under
// BF16 storage).
void swiglu_train_replay(AllocReplay& S, const BlockContext& ctx, int64_t rows, int64_t c,
                         int64_t nc, bool keep) {
  const int64_t ch = swiglu_transition_train_chunk(ctx, rows, c, nc);
  const bool bf = ctx.store == DType::BF16;
  auto alloc_s = [&](int64_t k) { bf ? S.alloc_bf16(k) : S.alloc(k); };  // the storage type
  auto free_s = [&](int64_t k) { bf ? S.free_bf16(k) : S.free(k); };
  for (int64_t r0 = 0; r0 < rows; r0 += ch) {
    const int64_t n = std::min(ch, rows - r0);
    S.alloc(2 * n * nc);  // h
    alloc_s(n * c);       // x_ln
    train_linear_replay(S, ctx, n, c, 2 * nc, true);
    free_s(n * c);
    S.alloc(n * nc);  // u
    train_linear_replay(S, ctx, n, nc, c);
    S.free(n * nc);
    if (keep)
      to_store_replay(S, ctx, 2 * n * nc);
    else
      S.free(2 * n * nc);
  }
}

void swiglu_backward_replay(AllocReplay& S, const BlockContext& ctx, int64_t rows, int64_t c,
                            int64_t nc, bool kept) {
  const int64_t ch = swiglu_transition_train_chunk(ctx, rows, c, nc);
  const bool bf = ctx.store == DType::BF16;
  auto alloc_s = [&](int64_t k) { bf ? S.alloc_bf16(k) : S.alloc(k); };  // the storage type
  auto free_s = [&](int64_t k) { bf ? S.free_bf16(k) : S.free(k); };
  for (int64_t r0 = 0; r0 < rows; r0 += ch) {
    const int64_t n = std::min(ch, rows - r0);
    alloc_s(n * c);  // x_ln
    S.alloc(2 * n);  // mean, rstd
    if (kept) {
      from_store_replay(S, ctx, 2 * n * nc);  // h widened
    } else {
      S.alloc(2 * n * nc);  // h
      train_linear_replay(S, ctx, n, c, 2 * nc, true);
    }
    S.alloc(2 * n * nc);  // dh
    S.alloc(2 * n * nc);  // u, du
    train_linear_backward_replay(S, ctx, n, nc, c);
    S.free(2 * n * nc);
    S.free(2 * n * nc);  // h
    S.alloc(n * c);      // dxln
    train_linear_backward_replay(S, ctx, n, c, 2 * nc, true, true);
    S.free(2 * n * nc);  // dh
    free_s(n * c);       // x_ln
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
  w.re_mem += 2.0 * rows * c;  // LayerNorm rebuilt per chunk
  if (rb) {
    *rb = LayerWork{};
    rb->chunks = w.chunks;
    rb->gemm.push_back(w.gemm[0]);
    rb->mem = 2.0 * rows * c;
  }
  return w;
}

}  // namespace fc
