// Training forward + exact backward of the transitions, the outer product mean and the triangle
// multiplication (see train.h for the conventions). Each *_train does the arithmetic of the
// inference function in modules.cc with the same kernels, on whole tensors instead of chunks,
// and keeps the state its backward needs; the one exception is the outer product of the outer
// product mean ([r*r, c_o^2]), which both directions rebuild chunk by chunk.
#include <algorithm>
#include <cstring>

#include "foldcube/tensor.h"
#include "kernels/backward.h"
#include "kernels/kernels.h"
#include "model/dropout.h"
#include "model/train.h"

namespace fc {

namespace {
constexpr int64_t kF = sizeof(float);

// A tracked contiguous copy of the floats at p, shaped `shape`.
Tensor copy_of(const float* p, const Shape& shape) {
  Tensor t = Tensor::empty(shape);
  std::memcpy(t.f32(), p, t.nbytes());
  return t;
}

void zero(const Tensor& t) {
  if (t.defined()) std::fill(t.f32(), t.f32() + t.numel(), 0.f);
}
void zero(const LayerNormW& w) {
  zero(w.w);
  zero(w.b);
}
void zero(const LinearW& w) {
  zero(w.w);
  zero(w.b);
}
void zero(const GatedAttentionW& w) {
  zero(w.w_qkvg);
  zero(w.b_qkvg);
  zero(w.o);
}

// dx (+)= LayerNorm backward; dgamma/dbeta accumulate into ln_grad. Allocates the kernel scratch.
void layernorm_backward_into(const float* x, const float* dy, int64_t rows, int64_t n,
                             const LayerNormW& ln, const float* mean, const float* rstd, float* dx,
                             LayerNormW* ln_grad, bool accumulate) {
  // [row blocks * 2 * n] partial dgamma | dbeta sums
  Tensor scratch = Tensor::empty({kern::layernorm_backward_scratch_floats(rows, n)});
  kern::layernorm_backward(x, n, dy, n, rows, n, ln.w.f32(), mean, rstd, dx, n, ln_grad->w.f32(),
                           ln_grad->b.f32(), scratch.f32(), accumulate);
}

// One chunk of the outer product: rows i0 .. i0+n of outer[(i, j), (c, e)] = sum_s a[s,i,c]
// b[s,j,e] into p [n*r, co*co], through o [n*co, r*co] (the GEMM layout [(i, c), (j, e)]). As in
// outer_product_mean (modules.cc).
void outer_chunk(const float* a, const float* b, int64_t s, int64_t r, int64_t co, int64_t i0,
                 int64_t n, float* o, float* p) {
  kern::gemm(true, false, n * co, r * co, s, 1.f, a + i0 * co, r * co, b, r * co, 0.f, o, r * co);
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < r; ++j)
      for (int64_t c = 0; c < co; ++c)
        std::memcpy(p + ((i * r + j) * co + c) * co, o + (i * co + c) * r * co + j * co, co * kF);
}
}  // namespace

void allocate_block_grads(const EvoformerConfig& cfg, BlockWeights* g) {
  allocate_block(cfg, g);
  zero(g->msa_att_row.ln_m);
  zero(g->msa_att_row.ln_z);
  zero(g->msa_att_row.lin_z);
  zero(g->msa_att_row.mha);
  zero(g->msa_att_col.ln_m);
  zero(g->msa_att_col.mha);
  for (const TransitionW* t : {&g->msa_transition, &g->pair_transition}) {
    zero(t->ln);
    zero(t->l1);
    zero(t->l2);
  }
  zero(g->outer_product_mean.ln);
  zero(g->outer_product_mean.l12);
  zero(g->outer_product_mean.out);
  for (const TriangleMultiplicationW* t : {&g->tri_mul_out, &g->tri_mul_in}) {
    zero(t->ln_in);
    zero(t->ab);
    zero(t->ln_out);
    zero(t->lin_z);
    zero(t->lin_g);
  }
  for (const TriangleAttentionW* t : {&g->tri_att_start, &g->tri_att_end}) {
    zero(t->ln);
    zero(t->lin);
    zero(t->mha);
  }
}

// ---- Transitions ------------------------------------------------------------------------------
// Saved: rows * (2c + n*c + 2) floats.

void transition_train(const TransitionW& w, const BlockContext& ctx, float* x, int64_t rows,
                      int64_t c, TransitionState* st) {
  *st = TransitionState{};
  const int64_t nc = w.l1.w.dim(0);
  st->x_in = copy_of(x, {rows, c});
  st->mean = Tensor::empty({rows});
  st->rstd = Tensor::empty({rows});
  st->x_ln = Tensor::empty({rows, c});
  st->h = Tensor::empty({rows, nc});
  kern::layernorm(x, c, st->x_ln.f32(), c, rows, c, w.ln.w.f32(), w.ln.b.f32(), ctx.cfg->eps_ln,
                  st->mean.f32(), st->rstd.f32());
  kern::linear(st->x_ln.f32(), c, rows, c, w.l1.w.f32(), w.l1.b.f32(), nc, st->h.f32(), nc);
  kern::relu_inplace(st->h.f32(), nc, rows, nc);
  kern::linear(st->h.f32(), nc, rows, nc, w.l2.w.f32(), w.l2.b.f32(), c, x, c, true);
}

// dL/d out (dx) is fully read by the first linear_backward before anything accumulates into dx,
// so it needs no copy.
void transition_backward(const TransitionW& w, TransitionW* g, const BlockContext& ctx,
                         const TransitionState& st, float* dx, int64_t rows, int64_t c) {
  const int64_t nc = w.l1.w.dim(0);
  Tensor dxln = Tensor::empty({rows, c});  // dL/d LN(x)
  {
    Tensor dh = Tensor::empty({rows, nc});  // dL/d h, then dL/d linear_1 output
    kern::linear_backward(st.h.f32(), nc, rows, nc, w.l2.w.f32(), c, dx, c, dh.f32(), nc,
                          g->l2.w.f32(), g->l2.b.f32());
    kern::relu_backward(st.h.f32(), nc, dh.f32(), nc, dh.f32(), nc, rows, nc);
    kern::linear_backward(st.x_ln.f32(), c, rows, c, w.l1.w.f32(), nc, dh.f32(), nc, dxln.f32(), c,
                          g->l1.w.f32(), g->l1.b.f32());
  }
  layernorm_backward_into(st.x_in.f32(), dxln.f32(), rows, c, w.ln, st.mean.f32(), st.rstd.f32(),
                          dx, &g->ln, true);
}

// ---- Outer product mean -----------------------------------------------------------------------
// Saved: s*r*(2 c_m + 2 c_o + 2) + r*r floats.

void outer_product_mean_train(const OuterProductMeanW& w, const BlockContext& ctx, const float* m,
                              float* z, OuterProductMeanState* st) {
  *st = OuterProductMeanState{};
  const EvoformerConfig& cfg = *ctx.cfg;
  const int64_t s = ctx.s, r = ctx.r, cm = cfg.c_m, co = cfg.c_hidden_opm, cz = cfg.c_z;
  const int64_t sr = s * r;
  st->m_in = copy_of(m, {sr, cm});
  st->mean = Tensor::empty({sr});
  st->rstd = Tensor::empty({sr});
  st->x_ln = Tensor::empty({sr, cm});
  st->a = Tensor::empty({s, r, co});
  st->b = Tensor::empty({s, r, co});
  kern::layernorm(m, cm, st->x_ln.f32(), cm, sr, cm, w.ln.w.f32(), w.ln.b.f32(), cfg.eps_ln,
                  st->mean.f32(), st->rstd.f32());
  {
    Tensor ab = Tensor::empty({sr, 2 * co});  // linear_1 | linear_2, before masking
    kern::linear(st->x_ln.f32(), cm, sr, cm, w.l12.w.f32(), w.l12.b.f32(), 2 * co, ab.f32(),
                 2 * co);
    const float* abp = ab.f32();
    float* ap = st->a.f32();
    float* bp = st->b.f32();
    const float* mask = ctx.msa_mask;
#pragma omp parallel for schedule(static)
    for (int64_t row = 0; row < sr; ++row)
      for (int64_t c = 0; c < co; ++c) {
        ap[row * co + c] = abp[row * 2 * co + c] * mask[row];
        bp[row * co + c] = abp[row * 2 * co + co + c] * mask[row];
      }
  }
  st->norm = Tensor::empty({r, r});
  kern::gemm(true, false, r, r, s, 1.f, ctx.msa_mask, r, ctx.msa_mask, r, 0.f, st->norm.f32(), r);

  const int64_t ch = pick_chunk(ctx, r, 2 * co * r * co * kF + r * cz * kF);
  Tensor o = Tensor::empty({ch * co, r * co});  // [(i, c), (j, e)]
  Tensor p = Tensor::empty({ch * r, co * co});  // [(i, j), (c, e)]
  Tensor y = Tensor::empty({ch * r, cz});       // linear_out(p)
  for (int64_t i0 = 0; i0 < r; i0 += ch) {
    const int64_t n = std::min(ch, r - i0);
    outer_chunk(st->a.f32(), st->b.f32(), s, r, co, i0, n, o.f32(), p.f32());
    kern::linear(p.f32(), co * co, n * r, co * co, w.out.w.f32(), w.out.b.f32(), cz, y.f32(), cz);
    const float* yp = y.f32();
    const float* np = st->norm.f32() + i0 * r;
    float* zp = z + i0 * r * cz;
    const float eps = cfg.eps_opm;
#pragma omp parallel for schedule(static)
    for (int64_t row = 0; row < n * r; ++row) {
      const float inv = 1.f / (np[row] + eps);
      for (int64_t c = 0; c < cz; ++c) zp[row * cz + c] += yp[row * cz + c] * inv;
    }
  }
}

void outer_product_mean_backward(const OuterProductMeanW& w, OuterProductMeanW* g,
                                 const BlockContext& ctx, const OuterProductMeanState& st,
                                 const float* dz, float* dm) {
  const EvoformerConfig& cfg = *ctx.cfg;
  const int64_t s = ctx.s, r = ctx.r, cm = cfg.c_m, co = cfg.c_hidden_opm, cz = cfg.c_z;
  const int64_t sr = s * r, rco = r * co;
  Tensor dxln = Tensor::empty({sr, cm});  // dL/d LN(m)
  {
    Tensor dab = Tensor::empty({sr, 2 * co});  // dL/d (linear_1 | linear_2), before masking
    {
      Tensor da = Tensor::empty({s, r, co});  // dL/d a
      Tensor db = Tensor::zeros({s, r, co});  // dL/d b (summed over the chunks of i)
      const float* ap = st.a.f32();
      const float* bp = st.b.f32();
      const int64_t ch = pick_chunk(ctx, r, 3 * co * r * co * kF + r * cz * kF);
      Tensor o = Tensor::empty({ch * co, rco});      // outer, then its gradient, [(i, c), (j, e)]
      Tensor p = Tensor::empty({ch * r, co * co});   // outer [(i, j), (c, e)]
      Tensor dp = Tensor::empty({ch * r, co * co});  // dL/d outer [(i, j), (c, e)]
      Tensor dy = Tensor::empty({ch * r, cz});       // dL/d linear_out(outer)
      for (int64_t i0 = 0; i0 < r; i0 += ch) {
        const int64_t n = std::min(ch, r - i0);
        outer_chunk(ap, bp, s, r, co, i0, n, o.f32(), p.f32());
        const float* np = st.norm.f32() + i0 * r;
        const float* dzp = dz + i0 * r * cz;
        float* dyp = dy.f32();
        const float eps = cfg.eps_opm;
#pragma omp parallel for schedule(static)
        for (int64_t row = 0; row < n * r; ++row) {
          const float inv = 1.f / (np[row] + eps);
          for (int64_t c = 0; c < cz; ++c) dyp[row * cz + c] = dzp[row * cz + c] * inv;
        }
        kern::linear_backward(p.f32(), co * co, n * r, co * co, w.out.w.f32(), cz, dyp, cz,
                              dp.f32(), co * co, g->out.w.f32(), g->out.b.f32());
        const float* dpp = dp.f32();
        float* dop = o.f32();
#pragma omp parallel for collapse(2) schedule(static)
        for (int64_t i = 0; i < n; ++i)
          for (int64_t j = 0; j < r; ++j)
            for (int64_t c = 0; c < co; ++c)
              std::memcpy(dop + (i * co + c) * rco + j * co, dpp + ((i * r + j) * co + c) * co,
                          co * kF);
        // outer = A^T B with A = a, B = b viewed [s, r*c_o]: dA = B dO^T, dB += A dO.
        kern::gemm(false, true, s, n * co, rco, 1.f, bp, rco, dop, rco, 0.f, da.f32() + i0 * co,
                   rco);
        kern::gemm(false, false, s, rco, n * co, 1.f, ap + i0 * co, rco, dop, rco, 1.f, db.f32(),
                   rco);
      }
      const float* dap = da.f32();
      const float* dbp = db.f32();
      float* dabp = dab.f32();
      const float* mask = ctx.msa_mask;
#pragma omp parallel for schedule(static)
      for (int64_t row = 0; row < sr; ++row)
        for (int64_t c = 0; c < co; ++c) {
          dabp[row * 2 * co + c] = dap[row * co + c] * mask[row];
          dabp[row * 2 * co + co + c] = dbp[row * co + c] * mask[row];
        }
    }
    kern::linear_backward(st.x_ln.f32(), cm, sr, cm, w.l12.w.f32(), 2 * co, dab.f32(), 2 * co,
                          dxln.f32(), cm, g->l12.w.f32(), g->l12.b.f32());
  }
  layernorm_backward_into(st.m_in.f32(), dxln.f32(), sr, cm, w.ln, st.mean.f32(), st.rstd.f32(), dm,
                          &g->ln, true);
}

// ---- Triangle multiplication ------------------------------------------------------------------
// Saved: r*r*(4 c_z + 8 c_t + 4) floats.

void triangle_multiplication_train(const TriangleMultiplicationW& w, const BlockContext& ctx,
                                   bool outgoing, float* z, TriangleMultiplicationState* st) {
  *st = TriangleMultiplicationState{};
  const EvoformerConfig& cfg = *ctx.cfg;
  const int64_t r = ctx.r, cz = cfg.c_z, ct = cfg.c_hidden_mul, rr = r * r;
  const float eps = cfg.eps_ln;
  st->z_in = copy_of(z, {rr, cz});
  st->mean = Tensor::empty({rr});
  st->rstd = Tensor::empty({rr});
  st->x_ln = Tensor::empty({rr, cz});
  st->t = Tensor::empty({rr, 4 * ct});
  st->A = Tensor::empty({ct, r, r});
  st->B = Tensor::empty({ct, r, r});
  kern::layernorm(z, cz, st->x_ln.f32(), cz, rr, cz, w.ln_in.w.f32(), w.ln_in.b.f32(), eps,
                  st->mean.f32(), st->rstd.f32());
  kern::linear(st->x_ln.f32(), cz, rr, cz, w.ab.w.f32(), w.ab.b.f32(), 4 * ct, st->t.f32(), 4 * ct);
  {
    Tensor t = st->t.clone();  // [rr, 4*ct] gated in place, as in the inference path
    float* tp = t.f32();
    for (int64_t part = 0; part < 2; ++part) {  // a, then b
      float* proj = tp + 2 * part * ct;         // [rr, ct] with ld 4*ct
      kern::sigmoid_inplace(proj + ct, 4 * ct, rr, ct);
      kern::mul_inplace(proj, 4 * ct, proj + ct, 4 * ct, rr, ct);
      kern::scale_rows(proj, 4 * ct, ctx.pair_mask, rr, ct);
      kern::transpose(proj, 4 * ct, (part ? st->B : st->A).f32(), rr, rr, ct);
    }
  }
  st->p = Tensor::empty({rr, ct});
  {
    Tensor P = Tensor::empty({ct, r, r});  // triangle products, channel-major
    // outgoing: P_c = A_c B_c^T; incoming: P_c = A_c^T B_c.
    kern::gemm_batched(ct, !outgoing, outgoing, r, r, r, 1.f, st->A.f32(), r, rr, st->B.f32(), r,
                       rr, 0.f, P.f32(), r, rr);
    kern::transpose(P.f32(), rr, st->p.f32(), ct, ct, rr);
  }
  st->mean2 = Tensor::empty({rr});
  st->rstd2 = Tensor::empty({rr});
  st->p_ln = Tensor::empty({rr, ct});
  st->y = Tensor::empty({rr, cz});
  st->g = Tensor::empty({rr, cz});
  kern::layernorm(st->p.f32(), ct, st->p_ln.f32(), ct, rr, ct, w.ln_out.w.f32(), w.ln_out.b.f32(),
                  eps, st->mean2.f32(), st->rstd2.f32());
  kern::linear(st->p_ln.f32(), ct, rr, ct, w.lin_z.w.f32(), w.lin_z.b.f32(), cz, st->y.f32(), cz);
  kern::linear(st->x_ln.f32(), cz, rr, cz, w.lin_g.w.f32(), w.lin_g.b.f32(), cz, st->g.f32(), cz);
  Tensor u = st->y.clone();  // [rr, cz] the update y * sigmoid(g)
  kern::sigmoid_mul(u.f32(), cz, st->g.f32(), cz, rr, cz);
  apply_dropout(u.f32(), r, r, cz,
                dropout_mask(ctx, outgoing ? "tri_mul_out" : "tri_mul_in", r, cz));
  kern::add_inplace(z, cz, u.f32(), cz, rr, cz);
}

// dL/d out (dz) is fully read by sigmoid_mul_backward before anything accumulates into dz, so it
// needs no copy (with dropout, the masked copy du is read instead).
void triangle_multiplication_backward(const TriangleMultiplicationW& w, TriangleMultiplicationW* g,
                                      const BlockContext& ctx, bool outgoing,
                                      const TriangleMultiplicationState& st, float* dz) {
  const EvoformerConfig& cfg = *ctx.cfg;
  const int64_t r = ctx.r, cz = cfg.c_z, ct = cfg.c_hidden_mul, rr = r * r;
  Tensor du;  // [rr, cz] dL/d update through the dropout mask (training mode only)
  const Tensor mask = dropout_mask(ctx, outgoing ? "tri_mul_out" : "tri_mul_in", r, cz);
  if (mask.defined()) {
    du = Tensor::empty({rr, cz});
    std::memcpy(du.f32(), dz, du.nbytes());
    apply_dropout(du.f32(), r, r, cz, mask);
  }
  const float* dupd = mask.defined() ? du.f32() : dz;
  Tensor dxln = Tensor::empty({rr, cz});  // dL/d LN_in(z), both branches
  Tensor dP = Tensor::empty({ct, r, r});  // dL/d triangle products, channel-major
  {
    Tensor dy = Tensor::empty({rr, cz});  // dL/d y (linear_z output, before gating)
    {
      Tensor dg = Tensor::empty({rr, cz});  // dL/d g (pre-sigmoid gate)
      kern::sigmoid_mul_backward(st.y.f32(), cz, st.g.f32(), cz, dupd, cz, dy.f32(), cz, dg.f32(),
                                 cz, rr, cz);
      kern::linear_backward(st.x_ln.f32(), cz, rr, cz, w.lin_g.w.f32(), cz, dg.f32(), cz,
                            dxln.f32(), cz, g->lin_g.w.f32(), g->lin_g.b.f32());
    }
    Tensor dp = Tensor::empty({rr, ct});  // dL/d p_ln, then (in place) dL/d p
    kern::linear_backward(st.p_ln.f32(), ct, rr, ct, w.lin_z.w.f32(), cz, dy.f32(), cz, dp.f32(),
                          ct, g->lin_z.w.f32(), g->lin_z.b.f32());
    dy = Tensor();
    layernorm_backward_into(st.p.f32(), dp.f32(), rr, ct, w.ln_out, st.mean2.f32(), st.rstd2.f32(),
                            dp.f32(), &g->ln_out, false);
    kern::transpose(dp.f32(), ct, dP.f32(), rr, rr, ct);
  }
  Tensor dt = Tensor::empty({rr, 4 * ct});  // dL/d t: a_p | a_g | b_p | b_g
  {
    Tensor dA = Tensor::empty({ct, r, r});  // dL/d A, channel-major
    Tensor dB = Tensor::empty({ct, r, r});
    const float* Ap = st.A.f32();
    const float* Bp = st.B.f32();
    if (outgoing) {  // P_c = A_c B_c^T: dA_c = dP_c B_c, dB_c = dP_c^T A_c
      kern::gemm_batched(ct, false, false, r, r, r, 1.f, dP.f32(), r, rr, Bp, r, rr, 0.f, dA.f32(),
                         r, rr);
      kern::gemm_batched(ct, true, false, r, r, r, 1.f, dP.f32(), r, rr, Ap, r, rr, 0.f, dB.f32(),
                         r, rr);
    } else {  // P_c = A_c^T B_c: dA_c = B_c dP_c^T, dB_c = A_c dP_c
      kern::gemm_batched(ct, false, true, r, r, r, 1.f, Bp, r, rr, dP.f32(), r, rr, 0.f, dA.f32(),
                         r, rr);
      kern::gemm_batched(ct, false, false, r, r, r, 1.f, Ap, r, rr, dP.f32(), r, rr, 0.f, dB.f32(),
                         r, rr);
    }
    dP = Tensor();
    // a = mask * sigmoid(a_g) * a_p: da_p = mask*da * sigmoid(a_g), da_g = mask*da * a_p * s(1-s).
    const float* tp = st.t.f32();
    float* dtp = dt.f32();
    for (int64_t part = 0; part < 2; ++part) {  // a, then b
      const int64_t off = 2 * part * ct;
      kern::transpose((part ? dB : dA).f32(), rr, dtp + off, 4 * ct, ct, rr);
      kern::scale_rows(dtp + off, 4 * ct, ctx.pair_mask, rr, ct);
      kern::sigmoid_mul_backward(tp + off, 4 * ct, tp + off + ct, 4 * ct, dtp + off, 4 * ct,
                                 dtp + off, 4 * ct, dtp + off + ct, 4 * ct, rr, ct);
    }
  }
  kern::linear_backward(st.x_ln.f32(), cz, rr, cz, w.ab.w.f32(), 4 * ct, dt.f32(), 4 * ct,
                        dxln.f32(), cz, g->ab.w.f32(), g->ab.b.f32(), true);
  dt = Tensor();
  layernorm_backward_into(st.z_in.f32(), dxln.f32(), rr, cz, w.ln_in, st.mean.f32(), st.rstd.f32(),
                          dz, &g->ln_in, true);
}

}  // namespace fc
