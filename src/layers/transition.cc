#include "layers/transition.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "foldcube/status.h"
#include "foldcube/tensor.h"
#include "kernels/backward.h"
#include "kernels/convert.h"
#include "kernels/fused.h"
#include "kernels/kernels.h"
#include "kernels/typed.h"
#include "layers/layer_util.h"
#include "model/dropout.h"

namespace fc {

namespace {
constexpr int64_t kF = sizeof(float);
}  // namespace

// ---- Inference ---------------------------------------------------------------------------------

namespace {
// The fused transition's arguments on x [rows, c] (row_scale: the masked transition's mask).
kern::TransitionArgs transition_args(const TransitionW& w, const BlockContext& ctx, float* x,
                                     int64_t rows, int64_t c, const float* row_scale) {
  kern::TransitionArgs a;
  a.rows = rows, a.c = c, a.hidden = w.l1.w.dim(0);
  a.x = x;
  a.gamma = w.ln.w.f32(), a.beta = w.ln.b.f32(), a.eps = ctx.cfg->eps_ln;
  a.W1 = w.l1.w.f32(), a.b1 = w.l1.b.f32(), a.W2 = w.l2.w.f32(), a.b2 = w.l2.b.f32();
  a.row_scale = row_scale;
  a.dtype = ctx.dtype;
  return a;
}

void transition_fused(const TransitionW& w, const BlockContext& ctx, float* x, int64_t rows,
                      int64_t c, const float* row_scale) {
  kern::TransitionArgs a = transition_args(w, ctx, x, rows, c, row_scale);
  const Tensor w1 = gemm_weights(w.l1.w, ctx.dtype);  // [hidden, c] bf16 (BF16 only)
  const Tensor w2 = gemm_weights(w.l2.w, ctx.dtype);  // [c, hidden]
  a.W1_bf16 = bf16_ptr(w1), a.W2_bf16 = bf16_ptr(w2);
  Tensor scratch = Tensor::empty({kern::transition_scratch_floats(a, ctx.threads)});
  kern::transition(a, scratch.f32(), ctx.threads);
}

// Both forms on x [rows, c]: fused, or the reference path by row chunks; row_mask [rows] (or
// nullptr) scales each row's update (the masked form adds it after the scaling, the plain form
// accumulates linear_2 into x).
void transition_rows(const TransitionW& w, const BlockContext& ctx, float* x, int64_t rows,
                     int64_t c, const float* row_mask) {
  if (ctx.fused) return transition_fused(w, ctx, x, rows, c, row_mask);
  const int64_t nc = w.l1.w.dim(0);
  const int64_t ch = transition_chunk(ctx, rows, c, nc);
  Tensor t = Tensor::empty({ch, c});   // LN(x) chunk, then the masked update
  Tensor h = Tensor::empty({ch, nc});  // hidden chunk
  for (int64_t r0 = 0; r0 < rows; r0 += ch) {
    const int64_t n = std::min(ch, rows - r0);
    kern::layernorm(x + r0 * c, c, t.f32(), c, n, c, w.ln.w.f32(), w.ln.b.f32(), ctx.cfg->eps_ln);
    kern::linear(t.f32(), c, n, c, w.l1.w.f32(), w.l1.b.f32(), nc, h.f32(), nc);
    kern::relu_inplace(h.f32(), nc, n, nc);
    if (row_mask == nullptr) {
      kern::linear(h.f32(), nc, n, nc, w.l2.w.f32(), w.l2.b.f32(), c, x + r0 * c, c, true);
      continue;
    }
    kern::linear(h.f32(), nc, n, nc, w.l2.w.f32(), w.l2.b.f32(), c, t.f32(), c);
    kern::scale_rows(t.f32(), c, row_mask + r0, n, c);
    kern::add_inplace(x + r0 * c, c, t.f32(), c, n, c);
  }
}
}  // namespace

void transition(const TransitionW& w, const BlockContext& ctx, float* x, int64_t rows, int64_t c) {
  transition_rows(w, ctx, x, rows, c, nullptr);
}

void masked_msa_transition(const TransitionW& w, const BlockContext& ctx, float* m) {
  transition_rows(w, ctx, m, ctx.s * ctx.r, ctx.cfg->c_m, ctx.msa_mask);
}

int64_t transition_chunk(const BlockContext& ctx, int64_t rows, int64_t c, int64_t nc) {
  return pick_chunk(ctx, rows, (c + nc) * kF);
}

int64_t transition_bytes(const BlockContext& ctx, int64_t rows, int64_t c, int64_t nc) {
  if (ctx.fused) {
    kern::TransitionArgs a;
    a.rows = rows, a.c = c, a.hidden = nc, a.dtype = ctx.dtype;
    return gemm_weights_bytes(2 * nc * c, ctx.dtype) +
           kern::transition_scratch_floats(a, ctx.threads) * kF;
  }
  return transition_chunk(ctx, rows, c, nc) * (c + nc) * kF;
}

// ---- Training ----------------------------------------------------------------------------------

int64_t transition_train_chunk(const BlockContext& ctx, int64_t rows, int64_t c, int64_t nc) {
  return pick_chunk(ctx, rows, transition_train_row_bytes(c, nc));
}

int64_t transition_train_row_bytes(int64_t c, int64_t nc) {
  // Per row: the kept hidden row and the backward's buffers (LN(x), dLN(x), dh).
  return (2 * c + 2 * nc + 2) * kF;
}

// BF16 storage: LN(x) is written in bf16 by the LayerNorm (the GEMM's input), and the hidden h
// rounded to bf16 once after the ReLU; that bf16 h is linear_2's input and the kept state, and the
// backward reads it as it is (dW_2's input, the ReLU mask). Same values as rounding f32 copies.
void transition_train(const TransitionW& w, const BlockContext& ctx, float* x, int64_t rows,
                      int64_t c, TransitionState* st, const float* row_mask) {
  const int64_t nc = w.l1.w.dim(0);
  const int64_t ch = transition_train_chunk(ctx, rows, c, nc);
  const bool bf = ctx.store == DType::BF16;
  const float eps = ctx.cfg->eps_ln;
  for (int64_t r0 = 0; r0 < rows; r0 += ch) {
    const int64_t n = std::min(ch, rows - r0);
    float* xr = x + r0 * c;
    Tensor h = Tensor::empty({n, nc});  // relu(linear_1(LN(x))) of the chunk
    if (bf) {
      Tensor x_ln = Tensor::empty({n, c}, DType::BF16);  // bf16(LN(x))
      kern::layernorm_bf16(xr, c, x_ln.data<uint16_t>(), c, n, c, w.ln.w.f32(), w.ln.b.f32(), eps);
      train_linear(ctx, x_ln.data<uint16_t>(), c, n, c, w.l1.w.f32(), w.l1.b.f32(), nc, h.f32(),
                   nc);
    } else {
      Tensor x_ln = Tensor::empty({n, c});
      kern::layernorm(xr, c, x_ln.f32(), c, n, c, w.ln.w.f32(), w.ln.b.f32(), eps);
      train_linear(ctx, x_ln.f32(), c, n, c, w.l1.w.f32(), w.l1.b.f32(), nc, h.f32(), nc);
    }
    kern::relu_inplace(h.f32(), nc, n, nc);
    if (bf) {
      Tensor hb = Tensor::empty({n, nc}, DType::BF16);  // bf16(h)
      kern::f32_to_bf16(h.f32(), hb.data<uint16_t>(), n * nc);
      h = std::move(hb);
    }
    auto linear_2 = [&](float* y, bool accumulate) {
      if (bf)
        train_linear(ctx, h.data<uint16_t>(), nc, n, nc, w.l2.w.f32(), w.l2.b.f32(), c, y, c,
                     accumulate);
      else
        train_linear(ctx, h.f32(), nc, n, nc, w.l2.w.f32(), w.l2.b.f32(), c, y, c, accumulate);
    };
    if (row_mask == nullptr) {
      linear_2(xr, true);
    } else {
      Tensor u = Tensor::empty({n, c});  // the chunk's update, masked per row
      linear_2(u.f32(), false);
      kern::scale_rows(u.f32(), c, row_mask + r0, n, c);
      kern::add_inplace(xr, c, u.f32(), c, n, c);
    }
    if (st) st->h.push_back(std::move(h));
  }
}

// dL/d out (the chunk's rows of dx) is fully read by the first linear_backward before anything
// accumulates into them, so it needs no copy.
void transition_backward(const TransitionW& w, TransitionW* g, const BlockContext& ctx,
                         const float* x_in, TransitionState* st, float* dx, int64_t rows, int64_t c,
                         const float* row_mask) {
  const int64_t nc = w.l1.w.dim(0);
  const int64_t ch = transition_train_chunk(ctx, rows, c, nc);
  const bool bf = ctx.store == DType::BF16;
  FC_CHECK_MSG(st->h.empty() || static_cast<int64_t>(st->h.size()) == (rows + ch - 1) / ch,
               "transition state was saved with another chunking");
  for (int64_t r0 = 0, idx = 0; r0 < rows; r0 += ch, ++idx) {
    const int64_t n = std::min(ch, rows - r0);
    const float* xr = x_in + r0 * c;
    float* dxr = dx + r0 * c;
    // LN(x) ([n, c], bf16 under BF16 storage) with its statistics
    NormedRows ln = layernorm_with_stats(xr, n, c, w.ln, ctx.cfg->eps_ln, ctx.store);
    Tensor h;  // [n, nc] kept by the forward, or recomputed (bf16 under BF16 storage)
    if (!st->h.empty()) {
      h = std::move(st->h[idx]);
    } else {
      h = Tensor::empty({n, nc});
      if (bf)
        train_linear(ctx, ln.y.data<uint16_t>(), c, n, c, w.l1.w.f32(), w.l1.b.f32(), nc, h.f32(),
                     nc);
      else
        train_linear(ctx, ln.y.f32(), c, n, c, w.l1.w.f32(), w.l1.b.f32(), nc, h.f32(), nc);
      kern::relu_inplace(h.f32(), nc, n, nc);
      if (bf) {
        Tensor hb = Tensor::empty({n, nc}, DType::BF16);
        kern::f32_to_bf16(h.f32(), hb.data<uint16_t>(), n * nc);
        h = std::move(hb);
      }
    }
    Tensor dh = Tensor::empty({n, nc});  // dL/d h, then dL/d linear_1 output
    {
      Tensor du;  // [n, c] dL/d the unmasked update (masked form only)
      if (row_mask != nullptr) {
        du = Tensor::empty({n, c});
        std::memcpy(du.f32(), dxr, static_cast<size_t>(n * c) * kF);
        kern::scale_rows(du.f32(), c, row_mask + r0, n, c);
      }
      const float* dy = du.defined() ? du.f32() : dxr;
      if (bf)
        train_linear_backward(ctx, h.data<uint16_t>(), nc, n, nc, w.l2.w.f32(), c, dy, c, dh.f32(),
                              nc, g->l2.w.f32(), g->l2.b.f32());
      else
        train_linear_backward(ctx, h.f32(), nc, n, nc, w.l2.w.f32(), c, dy, c, dh.f32(), nc,
                              g->l2.w.f32(), g->l2.b.f32());
    }
    if (bf)
      kern::relu_backward(h.data<uint16_t>(), nc, dh.f32(), nc, dh.f32(), nc, n, nc);
    else
      kern::relu_backward(h.f32(), nc, dh.f32(), nc, dh.f32(), nc, n, nc);
    h = Tensor();
    Tensor dxln = Tensor::empty({n, c});  // dL/d LN(x)
    if (bf)
      train_linear_backward(ctx, ln.y.data<uint16_t>(), c, n, c, w.l1.w.f32(), nc, dh.f32(), nc,
                            dxln.f32(), c, g->l1.w.f32(), g->l1.b.f32());
    else
      train_linear_backward(ctx, ln.y.f32(), c, n, c, w.l1.w.f32(), nc, dh.f32(), nc, dxln.f32(), c,
                            g->l1.w.f32(), g->l1.b.f32());
    dh = Tensor();
    ln.y = Tensor();
    layernorm_backward_into(xr, dxln.f32(), n, c, w.ln, ln.mean.f32(), ln.rstd.f32(), dxr, &g->ln,
                            true);
  }
  st->h.clear();
}

// ---- Models ------------------------------------------------------------------------------------

// rb: LayerNorm, linear_1 and ReLU (the hidden h), not linear_2.
LayerWork transition_work(int64_t rows, int64_t c, int64_t n, const WorkChunks& ch, LayerWork* rb) {
  LayerWork w;
  const int64_t k = ch.training ? transition_train_chunk(*ch.ctx, rows, c, n * c)
                                : transition_chunk(*ch.ctx, rows, c, n * c);
  w.gemm.push_back({4.0 * rows * c * n * c, static_cast<double>(k)});
  w.chunks += div_ceil(rows, k);
  w.mem += 2.0 * rows * c + 2.0 * rows * n * c;  // LayerNorm, ReLU
  w.re_mem += 2.0 * rows * c;                    // LayerNorm rebuilt per chunk
  if (!ch.training) {  // the fused transition normalises the stream rows (ReLU: its row block)
    w.mem -= 2.0 * rows * c;
    w.mem_stream += 2.0 * rows * c;
    w.ws_stream = static_cast<double>(rows) * c * sizeof(float);
  }
  if (rb) {
    *rb = LayerWork{};
    rb->chunks = w.chunks;
    rb->gemm.push_back({2.0 * rows * c * n * c, static_cast<double>(k)});
    rb->mem = w.mem;
  }
  return w;
}

// masked: the ExtraMSA MSA transition (its update, resp. the update's gradient, in a buffer).
void transition_train_replay(AllocReplay& S, const BlockContext& ctx, int64_t rows, int64_t c,
                             int64_t nc, bool keep, bool masked) {
  const int64_t ch = transition_train_chunk(ctx, rows, c, nc);
  const bool bf = ctx.store == DType::BF16;
  for (int64_t r0 = 0; r0 < rows; r0 += ch) {
    const int64_t n = std::min(ch, rows - r0);
    S.alloc(n * nc);  // h
    if (bf) {
      S.alloc_bf16(n * c);  // x_ln
      train_linear_replay(S, ctx, n, c, nc, true);
      S.free_bf16(n * c);
      S.alloc_bf16(n * nc);  // bf16(h)
      S.free(n * nc);
    } else {
      S.alloc(n * c);  // x_ln
      train_linear_replay(S, ctx, n, c, nc);
      S.free(n * c);
    }
    if (masked) S.alloc(n * c);  // u
    train_linear_replay(S, ctx, n, nc, c, bf);
    if (masked) S.free(n * c);
    if (!keep) {
      if (bf)
        S.free_bf16(n * nc);
      else
        S.free(n * nc);
    }
  }
}

void transition_backward_replay(AllocReplay& S, const BlockContext& ctx, int64_t rows, int64_t c,
                                int64_t nc, bool kept, bool masked) {
  const int64_t ch = transition_train_chunk(ctx, rows, c, nc);
  const bool bf = ctx.store == DType::BF16;
  // x_ln and h in the storage type (bf16 under BF16)
  auto alloc_s = [&](int64_t k) { bf ? S.alloc_bf16(k) : S.alloc(k); };
  auto free_s = [&](int64_t k) { bf ? S.free_bf16(k) : S.free(k); };
  for (int64_t r0 = 0; r0 < rows; r0 += ch) {
    const int64_t n = std::min(ch, rows - r0);
    alloc_s(n * c);  // x_ln
    S.alloc(2 * n);  // mean, rstd
    if (!kept) {
      S.alloc(n * nc);  // h
      train_linear_replay(S, ctx, n, c, nc, bf);
      if (bf) {
        S.alloc_bf16(n * nc);  // bf16(h)
        S.free(n * nc);
      }
    }
    S.alloc(n * nc);             // dh
    if (masked) S.alloc(n * c);  // du
    train_linear_backward_replay(S, ctx, n, nc, c, true, bf);
    if (masked) S.free(n * c);
    free_s(n * nc);  // h
    S.alloc(n * c);  // dxln
    train_linear_backward_replay(S, ctx, n, c, nc, true, bf);
    S.free(n * nc);  // dh
    free_s(n * c);   // x_ln
    S.alloc(ln_scratch(n, c));
    S.free(ln_scratch(n, c));
    S.free(n * c + 2 * n);  // dxln, mean, rstd
  }
}

}  // namespace fc
