// Training forward + exact backward of the transitions, the outer product mean and the triangle
// multiplication (see train.h for the conventions and chunk axes). Each *_train does the
// arithmetic of the inference function in modules.cc with the same kernels, chunk by chunk, and
// keeps the state its backward needs.
#include <algorithm>
#include <cstring>

#include "foldcube/status.h"
#include "foldcube/tensor.h"
#include "kernels/backward.h"
#include "kernels/kernels.h"
#include "model/dropout.h"
#include "model/train.h"

namespace fc {

namespace {
constexpr int64_t kF = sizeof(float);

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
  opm_pairs_from_outer(o, n, r, co, p);
}
}  // namespace

namespace {
// Zeroes the layers both block types share (BlockWeights, ExtraMsaBlockWeights).
template <typename W>
void zero_shared_layers(W* g) {
  zero(g->msa_att_row.ln_m);
  zero(g->msa_att_row.ln_z);
  zero(g->msa_att_row.lin_z);
  zero(g->msa_att_row.mha);
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
}  // namespace

void allocate_block_grads(const EvoformerConfig& cfg, BlockWeights* g) {
  allocate_block(cfg, g);
  zero_shared_layers(g);
  zero(g->msa_att_col.ln_m);
  zero(g->msa_att_col.mha);
}

void allocate_block_grads(const EvoformerConfig& cfg, ExtraMsaBlockWeights* g) {
  allocate_extra_msa_block(cfg, g);
  zero_shared_layers(g);
  zero(g->msa_att_col.ln_m);
  zero(g->msa_att_col.q);
  zero(g->msa_att_col.kvg);
  zero(g->msa_att_col.o);
}

// ---- Transitions ------------------------------------------------------------------------------

int64_t transition_train_chunk(const BlockContext& ctx, int64_t rows, int64_t c, int64_t nc) {
  // Per row: the kept hidden row and the backward's buffers (LN(x), dLN(x), dh).
  return pick_chunk(ctx, rows, (2 * c + 2 * nc + 2) * kF);
}

void transition_train(const TransitionW& w, const BlockContext& ctx, float* x, int64_t rows,
                      int64_t c, TransitionState* st, const float* row_mask) {
  const int64_t nc = w.l1.w.dim(0);
  const int64_t ch = transition_train_chunk(ctx, rows, c, nc);
  for (int64_t r0 = 0; r0 < rows; r0 += ch) {
    const int64_t n = std::min(ch, rows - r0);
    float* xr = x + r0 * c;
    Tensor h = Tensor::empty({n, nc});  // relu(linear_1(LN(x))) of the chunk
    {
      Tensor x_ln = Tensor::empty({n, c});
      kern::layernorm(xr, c, x_ln.f32(), c, n, c, w.ln.w.f32(), w.ln.b.f32(), ctx.cfg->eps_ln);
      kern::linear(x_ln.f32(), c, n, c, w.l1.w.f32(), w.l1.b.f32(), nc, h.f32(), nc);
    }
    kern::relu_inplace(h.f32(), nc, n, nc);
    if (row_mask == nullptr) {
      kern::linear(h.f32(), nc, n, nc, w.l2.w.f32(), w.l2.b.f32(), c, xr, c, true);
    } else {
      Tensor u = Tensor::empty({n, c});  // the chunk's update, masked per row
      kern::linear(h.f32(), nc, n, nc, w.l2.w.f32(), w.l2.b.f32(), c, u.f32(), c);
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
  FC_CHECK_MSG(st->h.empty() || static_cast<int64_t>(st->h.size()) == (rows + ch - 1) / ch,
               "transition state was saved with another chunking");
  for (int64_t r0 = 0, idx = 0; r0 < rows; r0 += ch, ++idx) {
    const int64_t n = std::min(ch, rows - r0);
    const float* xr = x_in + r0 * c;
    float* dxr = dx + r0 * c;
    Tensor x_ln = Tensor::empty({n, c});
    Tensor mean = Tensor::empty({n});
    Tensor rstd = Tensor::empty({n});
    kern::layernorm(xr, c, x_ln.f32(), c, n, c, w.ln.w.f32(), w.ln.b.f32(), ctx.cfg->eps_ln,
                    mean.f32(), rstd.f32());
    Tensor h;  // [n, nc] kept by the forward, or recomputed
    if (st->h.empty()) {
      h = Tensor::empty({n, nc});
      kern::linear(x_ln.f32(), c, n, c, w.l1.w.f32(), w.l1.b.f32(), nc, h.f32(), nc);
      kern::relu_inplace(h.f32(), nc, n, nc);
    } else {
      h = std::move(st->h[idx]);
    }
    Tensor dh = Tensor::empty({n, nc});  // dL/d h, then dL/d linear_1 output
    {
      Tensor du;  // [n, c] dL/d the unmasked update (masked form only)
      if (row_mask != nullptr) {
        du = Tensor::empty({n, c});
        std::memcpy(du.f32(), dxr, static_cast<size_t>(n * c) * kF);
        kern::scale_rows(du.f32(), c, row_mask + r0, n, c);
      }
      kern::linear_backward(h.f32(), nc, n, nc, w.l2.w.f32(), c, du.defined() ? du.f32() : dxr, c,
                            dh.f32(), nc, g->l2.w.f32(), g->l2.b.f32());
    }
    kern::relu_backward(h.f32(), nc, dh.f32(), nc, dh.f32(), nc, n, nc);
    h = Tensor();
    Tensor dxln = Tensor::empty({n, c});  // dL/d LN(x)
    kern::linear_backward(x_ln.f32(), c, n, c, w.l1.w.f32(), nc, dh.f32(), nc, dxln.f32(), c,
                          g->l1.w.f32(), g->l1.b.f32());
    dh = Tensor();
    x_ln = Tensor();
    layernorm_backward_into(xr, dxln.f32(), n, c, w.ln, mean.f32(), rstd.f32(), dxr, &g->ln, true);
  }
  st->h.clear();
}

// ---- Outer product mean -----------------------------------------------------------------------
// Saved: s*r*(c_m + 2 c_o + 2) + r*r floats (the input m is the caller's).

namespace {
// The OPM state's LN(m) with its statistics and the masked projections a, b for m [s, cols, c_m]
// (all residues, or a DAP shard's columns) with mask [s, cols].
void opm_projections(const OuterProductMeanW& w, const EvoformerConfig& cfg, const float* m,
                     int64_t s, int64_t cols, const float* mask, OuterProductMeanState* st) {
  const int64_t cm = cfg.c_m, co = cfg.c_hidden_opm, rows = s * cols;
  st->mean = Tensor::empty({rows});
  st->rstd = Tensor::empty({rows});
  st->x_ln = Tensor::empty({rows, cm});
  st->a = Tensor::empty({s, cols, co});
  st->b = Tensor::empty({s, cols, co});
  kern::layernorm(m, cm, st->x_ln.f32(), cm, rows, cm, w.ln.w.f32(), w.ln.b.f32(), cfg.eps_ln,
                  st->mean.f32(), st->rstd.f32());
  Tensor ab = Tensor::empty({rows, 2 * co});  // linear_1 | linear_2, before masking
  kern::linear(st->x_ln.f32(), cm, rows, cm, w.l12.w.f32(), w.l12.b.f32(), 2 * co, ab.f32(),
               2 * co);
  const float* abp = ab.f32();
  float* ap = st->a.f32();
  float* bp = st->b.f32();
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < rows; ++row)
    for (int64_t c = 0; c < co; ++c) {
      ap[row * co + c] = abp[row * 2 * co + c] * mask[row];
      bp[row * co + c] = abp[row * 2 * co + co + c] * mask[row];
    }
}
}  // namespace

void outer_product_mean_train(const OuterProductMeanW& w, const BlockContext& ctx, const float* m,
                              float* z, OuterProductMeanState* st) {
  *st = OuterProductMeanState{};
  const EvoformerConfig& cfg = *ctx.cfg;
  const int64_t s = ctx.s, r = ctx.r, co = cfg.c_hidden_opm, cz = cfg.c_z;
  opm_projections(w, cfg, m, s, r, ctx.msa_mask, st);
  st->norm = Tensor::empty({r, r});
  kern::gemm(true, false, r, r, s, 1.f, ctx.msa_mask, r, ctx.msa_mask, r, 0.f, st->norm.f32(), r);
  if (!z) return;

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
                                 const BlockContext& ctx, const float* m_in,
                                 const OuterProductMeanState& st, const float* dz, float* dm) {
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
        opm_outer_from_pairs(dpp, n, r, co, dop);
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
  layernorm_backward_into(m_in, dxln.f32(), sr, cm, w.ln, st.mean.f32(), st.rstd.f32(), dm, &g->ln,
                          true);
}

// ---- Outer product mean on a residue-column shard (DAP) -----------------------------------------

void outer_product_mean_shard_train(const OuterProductMeanW& w, const BlockContext& ctx,
                                    const float* m, int64_t col0, int64_t cols,
                                    const float* mask_cols, const ShardGather& gather, float* z,
                                    OuterProductMeanState* st) {
  *st = OuterProductMeanState{};
  const EvoformerConfig& cfg = *ctx.cfg;
  const int64_t s = ctx.s, r = ctx.r, co = cfg.c_hidden_opm, cz = cfg.c_z;
  const int64_t sc = s * cols, parts = gather.parts;
  FC_CHECK(parts >= 1 && cols * parts == r);
  opm_projections(w, cfg, m, s, cols, mask_cols, st);
  st->norm = Tensor::empty({cols, r});
  kern::gemm(true, false, cols, r, s, 1.f, ctx.msa_mask + col0, r, ctx.msa_mask, r, 0.f,
             st->norm.f32(), r);
  if (!z) return;
  Tensor b_all = Tensor::empty({parts, s, cols, co});  // every shard's b, shard-major
  gather.fn(st->b.f32(), sc * co, b_all.f32());
  const int64_t ch = pick_chunk(ctx, cols, 2 * co * r * co * kF + r * cz * kF);
  const int64_t bw = cols * co;                 // columns (j, e) of one shard
  Tensor o = Tensor::empty({ch * co, r * co});  // [(i, c), (j, e)]
  Tensor p = Tensor::empty({ch * r, co * co});  // [(i, j), (c, e)]
  Tensor y = Tensor::empty({ch * r, cz});       // linear_out(p)
  for (int64_t i0 = 0; i0 < cols; i0 += ch) {
    const int64_t n = std::min(ch, cols - i0);
    for (int64_t q = 0; q < parts; ++q)
      kern::gemm(true, false, n * co, bw, s, 1.f, st->a.f32() + i0 * co, bw,
                 b_all.f32() + q * s * bw, bw, 0.f, o.f32() + q * bw, r * co);
    const float* op = o.f32();
    float* pp = p.f32();
    opm_pairs_from_outer(op, n, r, co, pp);
    kern::linear(pp, co * co, n * r, co * co, w.out.w.f32(), w.out.b.f32(), cz, y.f32(), cz);
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

void outer_product_mean_shard_backward(const OuterProductMeanW& w, OuterProductMeanW* g,
                                       const BlockContext& ctx, const float* m_in, int64_t cols,
                                       const float* mask_cols, const OuterProductMeanState& st,
                                       const ShardGather& gather, const ShardReduce& reduce,
                                       const float* dz, float* dm) {
  const EvoformerConfig& cfg = *ctx.cfg;
  const int64_t s = ctx.s, r = ctx.r, cm = cfg.c_m, co = cfg.c_hidden_opm, cz = cfg.c_z;
  const int64_t sc = s * cols, parts = gather.parts, bw = cols * co, rco = r * co;
  FC_CHECK(parts >= 1 && cols * parts == r && reduce.parts == parts);
  Tensor dxln = Tensor::empty({sc, cm});  // dL/d LN(m)
  {
    Tensor dab = Tensor::empty({sc, 2 * co});  // dL/d (linear_1 | linear_2), before masking
    {
      Tensor da = Tensor::empty({s, cols, co});  // dL/d a
      Tensor db = Tensor::empty({s, cols, co});  // dL/d b, summed over the shards
      {
        Tensor b_all = Tensor::empty({parts, s, cols, co});  // every shard's b, shard-major
        gather.fn(st.b.f32(), sc * co, b_all.f32());
        Tensor db_all = Tensor::zeros({parts, s, cols, co});  // this shard's part of dL/d b
        const float* ap = st.a.f32();
        const int64_t ch = pick_chunk(ctx, cols, 3 * co * r * co * kF + r * cz * kF);
        Tensor o = Tensor::empty({ch * co, rco});      // outer, then its gradient
        Tensor p = Tensor::empty({ch * r, co * co});   // outer [(i, j), (c, e)]
        Tensor dp = Tensor::empty({ch * r, co * co});  // dL/d outer [(i, j), (c, e)]
        Tensor dy = Tensor::empty({ch * r, cz});       // dL/d linear_out(outer)
        for (int64_t i0 = 0; i0 < cols; i0 += ch) {
          const int64_t n = std::min(ch, cols - i0);
          for (int64_t q = 0; q < parts; ++q)
            kern::gemm(true, false, n * co, bw, s, 1.f, ap + i0 * co, bw, b_all.f32() + q * s * bw,
                       bw, 0.f, o.f32() + q * bw, rco);
          const float* op = o.f32();
          float* pp = p.f32();
          opm_pairs_from_outer(op, n, r, co, pp);
          const float* np = st.norm.f32() + i0 * r;
          const float* dzp = dz + i0 * r * cz;
          float* dyp = dy.f32();
          const float eps = cfg.eps_opm;
#pragma omp parallel for schedule(static)
          for (int64_t row = 0; row < n * r; ++row) {
            const float inv = 1.f / (np[row] + eps);
            for (int64_t c = 0; c < cz; ++c) dyp[row * cz + c] = dzp[row * cz + c] * inv;
          }
          kern::linear_backward(pp, co * co, n * r, co * co, w.out.w.f32(), cz, dyp, cz, dp.f32(),
                                co * co, g->out.w.f32(), g->out.b.f32());
          const float* dpp = dp.f32();
          float* dop = o.f32();
          opm_outer_from_pairs(dpp, n, r, co, dop);
          // outer = A^T B per shard block q of B: dA = sum_q B_q dO_q^T, dB_q += A dO_q.
          for (int64_t q = 0; q < parts; ++q) {
            kern::gemm(false, true, s, n * co, bw, 1.f, b_all.f32() + q * s * bw, bw, dop + q * bw,
                       rco, q == 0 ? 0.f : 1.f, da.f32() + i0 * co, bw);
            kern::gemm(false, false, s, bw, n * co, 1.f, ap + i0 * co, bw, dop + q * bw, rco, 1.f,
                       db_all.f32() + q * s * bw, bw);
          }
        }
        b_all = Tensor();
        o = p = dp = dy = Tensor();
        reduce.fn(db_all.f32(), sc * co, db.f32());
      }
      const float* dap = da.f32();
      const float* dbp = db.f32();
      float* dabp = dab.f32();
#pragma omp parallel for schedule(static)
      for (int64_t row = 0; row < sc; ++row)
        for (int64_t c = 0; c < co; ++c) {
          dabp[row * 2 * co + c] = dap[row * co + c] * mask_cols[row];
          dabp[row * 2 * co + co + c] = dbp[row * co + c] * mask_cols[row];
        }
    }
    kern::linear_backward(st.x_ln.f32(), cm, sc, cm, w.l12.w.f32(), 2 * co, dab.f32(), 2 * co,
                          dxln.f32(), cm, g->l12.w.f32(), g->l12.b.f32());
  }
  layernorm_backward_into(m_in, dxln.f32(), sc, cm, w.ln, st.mean.f32(), st.rstd.f32(), dm, &g->ln,
                          true);
}

// ---- Triangle multiplication ----------------------------------------------------------------
// Saved: the products P, c_t r^2 floats. Phase 1 (projections, A, B, products) runs by channel
// groups of A and B; phase 2 (LN_out, linear_z, the gate, the update) by pair rows i. The
// backward runs phase 2 backward by rows (giving dP), then phase 1 backward by groups.

// Bytes of one projection block of the training triangle multiplication (t and dt), at most.
constexpr int64_t kProjBlockBytes = 2 << 20;

TriMulTrainChunks tri_mul_train_chunks(const BlockContext& ctx) {
  return tri_mul_train_chunks(ctx, ctx.r, 0);
}

TriMulTrainChunks tri_mul_train_chunks(const BlockContext& ctx, int64_t rows, int64_t parts) {
  const int64_t r = ctx.r, cz = ctx.cfg->c_z, ct = ctx.cfg->c_hidden_mul, rr = rows * r;
  TriMulTrainChunks c;
  // Per channel of a group (backward): A, B, dA, dB over the rows' pairs, and with shards every
  // shard's gathered right operand and its gradient.
  c.group = pick_chunk(ctx, ct, (4 + 2 * parts) * rr * kF);
  // Automatic groups round to the nearest multiple of 16 channels once 8 or more fit (as the
  // inference path does): narrower groups run the projections, gates and their gradients on rows of
  // a few floats (perf, (128, 256), AF2 dims, 32 MiB target: groups of 10 -> 16 channels took 7 %
  // fewer cycles per step; the sigmoid kernels fell from 5.7 % of the cycles to under 1 %).
  constexpr int64_t kAlign = 16;
  if (ctx.chunk <= 0 && c.group < ct && c.group >= kAlign / 2)
    c.group = std::min(ct, (c.group + kAlign / 2) / kAlign * kAlign);
  // Per pair row i of a group's projection block: T and its gradient (or the projection's
  // scratch), 4 + 4 floats per channel and pair. The block is swept by several elementwise passes
  // after its GEMM, so it stays cache-sized (kProjBlockBytes) whatever the target: (128, 256), AF2
  // dims, 1 thread, 32 MiB target: blocks of 16 MiB made the module 1.5x slower than at 8 MiB.
  BlockContext pc = ctx;
  pc.chunk_target_bytes = std::min<int64_t>(ctx.chunk_target_bytes, kProjBlockBytes);
  c.proj_rows = pick_chunk(pc, rows, r * 8 * c.group * kF);
  // Per row i (backward): p, LN_out(p), dp (3 c_t), y, gate, du, dy, dg (5 c_z).
  c.rows = pick_chunk(ctx, rows, r * (3 * ct + 5 * cz + 2) * kF);
  return c;
}

namespace {

// One channel group of the training triangle multiplication's input side. The group's rows of
// the fused projection a_p | a_g | b_p | b_g are gathered into one [4*nc, c_z] weight, so each
// block of pair rows is projected by one GEMM of width 4*nc (not four of width nc), and x_ln and
// dx_ln are swept once per group.
struct TriMulGroup {
  int64_t c0 = 0, nc = 0;
  Tensor W;  // [4*group, c_z]; the first 4*nc rows: a_p | a_g | b_p | b_g of channels c0 .. c0+nc
  Tensor b;  // [4*group]; the first 4*nc entries, likewise
  void load(const TriangleMultiplicationW& w, int64_t ct, int64_t first, int64_t count) {
    const int64_t cz = w.ab.w.dim(1);
    c0 = first, nc = count;
    for (int64_t part = 0; part < 4; ++part) {
      std::memcpy(W.f32() + part * nc * cz, w.ab.w.f32() + (part * ct + c0) * cz,
                  static_cast<size_t>(nc * cz) * kF);
      std::memcpy(b.f32() + part * nc, w.ab.b.f32() + part * ct + c0, static_cast<size_t>(nc) * kF);
    }
  }
  // Adds the group's weight gradients gW [4*nc, c_z], gb [4*nc] into the fused gradient g.
  void add_grads(TriangleMultiplicationW* g, int64_t ct, const float* gW, const float* gb) const {
    const int64_t cz = W.dim(1);
    for (int64_t part = 0; part < 4; ++part) {
      const int64_t row0 = part * ct + c0;  // first row of this part in the fused a_p|a_g|b_p|b_g
      kern::add_inplace(g->ab.w.f32() + row0 * cz, cz, gW + part * nc * cz, cz, nc, cz);
      kern::add_inplace(g->ab.b.f32() + row0, nc, gb + part * nc, nc, 1, nc);
    }
  }
};

// T [4*nc, n] (channel-major, ld n) = the group's projections a_p | a_g | b_p | b_g of n pairs
// x [n, c_z]; Y [n, 4*nc] is scratch. Channel-major keeps every elementwise pass below on rows of
// n floats, however narrow the group (row-major rows of a few floats cost more in per-row
// overhead than in arithmetic). oneDNN runs X W^T then a transpose faster than W X^T from
// 16 outputs up, and W X^T faster below (1 thread, 32768 x 128 inputs: 131 vs 45 GFLOP/s at 16
// outputs, 134 vs 110 at 64; 40 vs 64-86 at 4).
void tri_mul_group_project(const TriMulGroup& G, const float* x, int64_t n, int64_t cz, float* Y,
                           float* T) {
  const int64_t n4 = 4 * G.nc;
  if (n4 < 16) {
    for (int64_t o = 0; o < n4; ++o) std::fill(T + o * n, T + (o + 1) * n, G.b.f32()[o]);
    kern::gemm(false, true, n4, n, cz, 1.f, G.W.f32(), cz, x, cz, 1.f, T, n);
    return;
  }
  kern::linear(x, cz, n, cz, G.W.f32(), G.b.f32(), n4, Y, n4);
  kern::transpose(Y, n4, T, n, n, n4);
}

// Copies nc rows of n floats (row strides lds, ldd).
void copy_rows(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t nc, int64_t n) {
  for (int64_t c = 0; c < nc; ++c)
    std::memcpy(dst + c * ldd, src + c * lds, static_cast<size_t>(n) * kF);
}

// A, B [nc, rr] of the group from x_ln [rr, c_z] and the mask [rr] (a = mask * sigmoid(a_g) *
// a_p), in blocks of q pairs through T [4*nc, q] (Y [q, 4*nc]: scratch).
void tri_mul_group_ab(const TriMulGroup& G, const float* x_ln, int64_t rr, int64_t cz,
                      const float* mask, int64_t q, float* Y, float* T, float* A, float* B) {
  const int64_t nc = G.nc;
  for (int64_t p0 = 0; p0 < rr; p0 += q) {
    const int64_t n = std::min(q, rr - p0);
    tri_mul_group_project(G, x_ln + p0 * cz, n, cz, Y, T);
    for (int64_t part = 0; part < 2; ++part) {  // a, then b
      const float* Tp = T + 2 * part * nc * n;  // [nc, n] a_p (b_p)
      float* Tg = T + (2 * part + 1) * nc * n;  // [nc, n] a_g (b_g), sigmoid in place
      float* dst = (part ? B : A) + p0;         // [nc, n] with ld rr
      kern::sigmoid_inplace(Tg, n, nc, n);
      copy_rows(Tp, n, dst, rr, nc, n);
      kern::mul_inplace(dst, rr, Tg, n, nc, n);
      kern::mul_inplace(dst, rr, mask + p0, 0, nc, n);
    }
  }
}

// Backward of the group's projections and gates from dA, dB [nc, rr]: per block of q pairs,
// re-projects T [4*nc, q] (pre-activation), forms dT [4*nc, q] = dL/d T and ACCUMULATES
// dT^T W into dx_ln [rr, c_z] and the weight gradients into gW [4*nc, c_z], gb [4*nc]
// (ones: q floats of 1).
void tri_mul_group_backward(const TriMulGroup& G, const float* x_ln, int64_t rr, int64_t cz,
                            const float* mask, int64_t q, const float* dA, const float* dB,
                            const float* ones, float* T, float* dT, float* dxln, float* gW,
                            float* gb) {
  const int64_t nc = G.nc, n4 = 4 * nc;
  for (int64_t p0 = 0; p0 < rr; p0 += q) {
    const int64_t n = std::min(q, rr - p0);
    tri_mul_group_project(G, x_ln + p0 * cz, n, cz, dT, T);  // dT: scratch until filled below
    // a = mask * sigmoid(a_g) * a_p: da_p = mask*da * sigmoid(a_g),
    // da_g = mask*da * a_p * s(1-s).
    for (int64_t part = 0; part < 2; ++part) {  // a, then b
      const int64_t off = 2 * part * nc * n;
      float* dTp = dT + off;  // [nc, n] dL/d a_p, first dL/d a
      float* dTg = dTp + nc * n;
      copy_rows((part ? dB : dA) + p0, rr, dTp, n, nc, n);
      kern::mul_inplace(dTp, n, mask + p0, 0, nc, n);
      kern::sigmoid_mul_backward(T + off, n, T + off + nc * n, n, dTp, n, dTp, n, dTg, n, nc, n);
    }
    const float* x = x_ln + p0 * cz;
    kern::gemm(true, false, n, cz, n4, 1.f, dT, n, G.W.f32(), cz, 1.f, dxln + p0 * cz, cz);
    kern::gemm(false, false, n4, cz, n, 1.f, dT, n, x, cz, 1.f, gW, cz);
    kern::gemm(false, false, n4, 1, n, 1.f, dT, n, ones, 1, 1.f, gb, 1);
  }
}

// The buffers and steps of phase 1 backward for one channel group at a time, on `rows` pair rows
// of r columns (one process: rows = r; a DAP shard: its rows): rebuild A, B, then (after the
// caller's dA, dB) the projections' backward into dx_ln and the parameter gradients.
struct TriMulGroupBackward {
  TriMulGroup grp;
  Tensor gW, gb;  // [4*group, c_z], [4*group]: dL/d grp.W, grp.b of the group
  Tensor T, dT;   // [4*group, q]: projections of a block of pairs (channel-major), dL/d T
  Tensor ones;    // [q] for the bias gradient's row sums
  Tensor A, B;    // [group, rows, r]: a, b of the group, channel-major
  Tensor dA, dB;  // [group, rows, r]: dL/d a, dL/d b
  int64_t q;
  TriMulGroupBackward(int64_t cg, int64_t cz, int64_t q_, int64_t rows, int64_t r)
      : grp{0, 0, Tensor::empty({4 * cg, cz}), Tensor::empty({4 * cg})},
        gW(Tensor::empty({4 * cg, cz})),
        gb(Tensor::empty({4 * cg})),
        T(Tensor::empty({4 * cg, q_})),
        dT(Tensor::empty({4 * cg, q_})),
        ones(Tensor::full({q_}, 1.f)),
        A(Tensor::empty({cg, rows, r})),
        B(Tensor::empty({cg, rows, r})),
        dA(Tensor::empty({cg, rows, r})),
        dB(Tensor::empty({cg, rows, r})),
        q(q_) {}
  // Loads channels c0 .. c0+nc and rebuilds their A, B from x_ln [rr, c_z] and mask [rr].
  void rebuild(const TriangleMultiplicationW& w, int64_t ct, int64_t c0, int64_t nc,
               const float* x_ln, int64_t rr, const float* mask) {
    grp.load(w, ct, c0, nc);
    tri_mul_group_ab(grp, x_ln, rr, grp.W.dim(1), mask, q, dT.f32(), T.f32(), A.f32(), B.f32());
  }
  // With dA, dB filled: ACCUMULATES into dx_ln [rr, c_z] and the fused gradient g.
  void backward(TriangleMultiplicationW* g, int64_t ct, const float* x_ln, int64_t rr,
                const float* mask, float* dxln) {
    const int64_t cz = grp.W.dim(1), nc = grp.nc;
    std::memset(gW.f32(), 0, static_cast<size_t>(4 * nc * cz) * kF);
    std::memset(gb.f32(), 0, static_cast<size_t>(4 * nc) * kF);
    tri_mul_group_backward(grp, x_ln, rr, cz, mask, q, dA.f32(), dB.f32(), ones.f32(), T.f32(),
                           dT.f32(), dxln, gW.f32(), gb.f32());
    grp.add_grads(g, ct, gW.f32(), gb.f32());
  }
};

// Dropout of the update u [n, r, c_z] of rows i0.. (global row0 + i0..): the mask [r, c_z]
// shared over the rows (one process, and the outgoing shard), or per row of z^T, row j scaled by
// mask[row0 + j] (the incoming shard).
void tri_mul_dropout(float* u, int64_t n, int64_t r, int64_t cz, const Tensor& mask, bool per_row,
                     int64_t grow0) {
  if (!mask.defined()) return;
  if (!per_row) {
    apply_dropout(u, n, r, cz, mask);
    return;
  }
  const float* mp = mask.f32();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < r; ++j)
      for (int64_t c = 0; c < cz; ++c) u[(i * r + j) * cz + c] *= mp[(grow0 + i) * cz + c];
}

// Phase 2 (the output side) on `rows` pair rows i of r columns, ch rows per chunk: from the
// products P [c_t, rows, r] and x_ln = LN_in(z) [rows*r, c_z], z [rows, r, c_z] += dropout(
// sigmoid(linear_g(x_ln)) * linear_z(LN_out(p))). dmask, per_row, row0: as tri_mul_dropout.
void tri_mul_output(const TriangleMultiplicationW& w, const BlockContext& ctx, const float* P,
                    const float* x_ln, int64_t rows, int64_t ch, const Tensor& dmask, bool per_row,
                    int64_t row0, float* z) {
  const int64_t r = ctx.r, rr = rows * r, cz = ctx.cfg->c_z, ct = ctx.cfg->c_hidden_mul;
  const float eps = ctx.cfg->eps_ln;
  Tensor p = Tensor::empty({ch * r, ct});  // products of the rows, channel-last, then LN_out
  Tensor y = Tensor::empty({ch * r, cz});  // linear_z(LN_out(p)), then the update
  Tensor g = Tensor::empty({ch * r, cz});  // linear_g(x_ln), pre-sigmoid
  for (int64_t i0 = 0; i0 < rows; i0 += ch) {
    const int64_t n = std::min(ch, rows - i0);
    float* pp = p.f32();
    kern::transpose(P + i0 * r, rr, pp, ct, ct, n * r);
    kern::layernorm(pp, ct, pp, ct, n * r, ct, w.ln_out.w.f32(), w.ln_out.b.f32(), eps);
    kern::linear(pp, ct, n * r, ct, w.lin_z.w.f32(), w.lin_z.b.f32(), cz, y.f32(), cz);
    kern::linear(x_ln + i0 * r * cz, cz, n * r, cz, w.lin_g.w.f32(), w.lin_g.b.f32(), cz, g.f32(),
                 cz);
    kern::sigmoid_mul(y.f32(), cz, g.f32(), cz, n * r, cz);
    tri_mul_dropout(y.f32(), n, r, cz, dmask, per_row, row0 + i0);
    kern::add_inplace(z + i0 * r * cz, cz, y.f32(), cz, n * r, cz);
  }
}

// Backward of tri_mul_output: from dz (dL/d out, read only), dP [c_t, rows, r] = dL/d P, dxln
// [rows*r, c_z] = the gate branch's dL/d x_ln (overwritten), and the parameter gradients of
// LN_out, linear_z and linear_g ACCUMULATE into g.
void tri_mul_output_backward(const TriangleMultiplicationW& w, TriangleMultiplicationW* g,
                             const BlockContext& ctx, const float* P, const float* x_ln,
                             int64_t rows, int64_t ch, const Tensor& dmask, bool per_row,
                             int64_t row0, const float* dz, float* dP, float* dxln) {
  const int64_t r = ctx.r, rr = rows * r, cz = ctx.cfg->c_z, ct = ctx.cfg->c_hidden_mul;
  const float eps = ctx.cfg->eps_ln;
  Tensor p = Tensor::empty({ch * r, ct});  // products of the rows, channel-last
  Tensor mean2 = Tensor::empty({ch * r});  // LN_out statistics
  Tensor rstd2 = Tensor::empty({ch * r});
  Tensor p_ln = Tensor::empty({ch * r, ct});  // LN_out(p)
  Tensor y = Tensor::empty({ch * r, cz});     // linear_z(p_ln), before gating
  Tensor gt = Tensor::empty({ch * r, cz});    // linear_g(x_ln), pre-sigmoid
  Tensor du = Tensor::empty({ch * r, cz});    // dL/d update (through the dropout mask)
  Tensor dy = Tensor::empty({ch * r, cz});    // dL/d y
  Tensor dg = Tensor::empty({ch * r, cz});    // dL/d gate
  Tensor dp = Tensor::empty({ch * r, ct});    // dL/d p_ln, then (in place) dL/d p
  Tensor scratch = Tensor::empty({kern::layernorm_backward_scratch_floats(ch * r, ct)});
  for (int64_t i0 = 0; i0 < rows; i0 += ch) {
    const int64_t n = std::min(ch, rows - i0), nr = n * r;
    const float* xr = x_ln + i0 * r * cz;
    kern::transpose(P + i0 * r, rr, p.f32(), ct, ct, nr);
    kern::layernorm(p.f32(), ct, p_ln.f32(), ct, nr, ct, w.ln_out.w.f32(), w.ln_out.b.f32(), eps,
                    mean2.f32(), rstd2.f32());
    kern::linear(p_ln.f32(), ct, nr, ct, w.lin_z.w.f32(), w.lin_z.b.f32(), cz, y.f32(), cz);
    kern::linear(xr, cz, nr, cz, w.lin_g.w.f32(), w.lin_g.b.f32(), cz, gt.f32(), cz);
    std::memcpy(du.f32(), dz + i0 * r * cz, static_cast<size_t>(nr * cz) * kF);
    tri_mul_dropout(du.f32(), n, r, cz, dmask, per_row, row0 + i0);
    kern::sigmoid_mul_backward(y.f32(), cz, gt.f32(), cz, du.f32(), cz, dy.f32(), cz, dg.f32(), cz,
                               nr, cz);
    kern::linear_backward(xr, cz, nr, cz, w.lin_g.w.f32(), cz, dg.f32(), cz, dxln + i0 * r * cz, cz,
                          g->lin_g.w.f32(), g->lin_g.b.f32());
    kern::linear_backward(p_ln.f32(), ct, nr, ct, w.lin_z.w.f32(), cz, dy.f32(), cz, dp.f32(), ct,
                          g->lin_z.w.f32(), g->lin_z.b.f32());
    kern::layernorm_backward(p.f32(), ct, dp.f32(), ct, nr, ct, w.ln_out.w.f32(), mean2.f32(),
                             rstd2.f32(), dp.f32(), ct, g->ln_out.w.f32(), g->ln_out.b.f32(),
                             scratch.f32());
    kern::transpose(dp.f32(), ct, dP + i0 * r, rr, nr, ct);
  }
}

// Phase 1: the triangle products P [c_t, r, r] from x_ln = LN_in(z) [r*r, c_z], channel group by
// channel group (outgoing: P_c = A_c B_c^T; incoming: P_c = A_c^T B_c).
Tensor tri_mul_products(const TriangleMultiplicationW& w, const BlockContext& ctx, bool outgoing,
                        const float* x_ln) {
  const int64_t r = ctx.r, rr = r * r, cz = ctx.cfg->c_z, ct = ctx.cfg->c_hidden_mul;
  const TriMulTrainChunks chunks = tri_mul_train_chunks(ctx);
  const int64_t cg = chunks.group, q = chunks.proj_rows * r;
  Tensor P = Tensor::empty({ct, r, r});
  TriMulGroup G{0, 0, Tensor::empty({4 * cg, cz}), Tensor::empty({4 * cg})};
  Tensor T = Tensor::empty({4 * cg, q});  // projections of a block of pairs, channel-major
  Tensor Y = Tensor::empty({q, 4 * cg});  // scratch of the projection
  Tensor A = Tensor::empty({cg, r, r});   // a of the group, channel-major
  Tensor B = Tensor::empty({cg, r, r});
  for (int64_t c0 = 0; c0 < ct; c0 += cg) {
    G.load(w, ct, c0, std::min(cg, ct - c0));
    tri_mul_group_ab(G, x_ln, rr, cz, ctx.pair_mask, q, Y.f32(), T.f32(), A.f32(), B.f32());
    kern::gemm_batched(G.nc, !outgoing, outgoing, r, r, r, 1.f, A.f32(), r, rr, B.f32(), r, rr, 0.f,
                       P.f32() + c0 * rr, r, rr);
  }
  return P;
}

}  // namespace

void triangle_multiplication_train(const TriangleMultiplicationW& w, const BlockContext& ctx,
                                   bool outgoing, float* z, TriangleMultiplicationState* st) {
  const EvoformerConfig& cfg = *ctx.cfg;
  const int64_t r = ctx.r, cz = cfg.c_z, rr = r * r;
  const float eps = cfg.eps_ln;
  Tensor x_ln = Tensor::empty({rr, cz});  // LN_in(z)
  kern::layernorm(z, cz, x_ln.f32(), cz, rr, cz, w.ln_in.w.f32(), w.ln_in.b.f32(), eps);
  Tensor P = tri_mul_products(w, ctx, outgoing, x_ln.f32());
  tri_mul_output(w, ctx, P.f32(), x_ln.f32(), r, tri_mul_train_chunks(ctx).rows,
                 dropout_mask(ctx, outgoing ? "tri_mul_out" : "tri_mul_in", r, cz), false, 0, z);
  if (st) st->P = std::move(P);
}

void triangle_multiplication_backward(const TriangleMultiplicationW& w, TriangleMultiplicationW* g,
                                      const BlockContext& ctx, bool outgoing, const float* z_in,
                                      TriangleMultiplicationState* st, float* dz) {
  const EvoformerConfig& cfg = *ctx.cfg;
  const int64_t r = ctx.r, cz = cfg.c_z, ct = cfg.c_hidden_mul, rr = r * r;
  const float eps = cfg.eps_ln;
  const TriMulTrainChunks chunks = tri_mul_train_chunks(ctx);
  Tensor x_ln = Tensor::empty({rr, cz});  // LN_in(z_in)
  Tensor mean = Tensor::empty({rr});
  Tensor rstd = Tensor::empty({rr});
  kern::layernorm(z_in, cz, x_ln.f32(), cz, rr, cz, w.ln_in.w.f32(), w.ln_in.b.f32(), eps,
                  mean.f32(), rstd.f32());
  Tensor P = st->P.defined() ? std::move(st->P) : tri_mul_products(w, ctx, outgoing, x_ln.f32());
  st->P = Tensor();
  Tensor dxln = Tensor::empty({rr, cz});  // dL/d LN_in(z), both branches
  Tensor dP = Tensor::empty({ct, r, r});  // dL/d triangle products, channel-major
  // Phase 2 backward, by rows i: dP and the gate branch's part of dxln (the dL/d out rows of dz
  // are read before the LN_in backward at the end accumulates into them).
  tri_mul_output_backward(w, g, ctx, P.f32(), x_ln.f32(), r, chunks.rows,
                          dropout_mask(ctx, outgoing ? "tri_mul_out" : "tri_mul_in", r, cz), false,
                          0, dz, dP.f32(), dxln.f32());
  P = Tensor();
  {
    // Phase 1 backward, by channel groups: rebuild the group's A and B, then dA, dB, and
    // (by blocks of pairs) d(projections), accumulating into dxln and the parameter gradients.
    const int64_t cg = chunks.group;
    TriMulGroupBackward gb(cg, cz, chunks.proj_rows * r, r, r);
    for (int64_t c0 = 0; c0 < ct; c0 += cg) {
      const int64_t nc = std::min(cg, ct - c0);
      gb.rebuild(w, ct, c0, nc, x_ln.f32(), rr, ctx.pair_mask);
      const float* A = gb.A.f32();
      const float* B = gb.B.f32();
      float* dA = gb.dA.f32();
      float* dB = gb.dB.f32();
      const float* dPg = dP.f32() + c0 * rr;
      if (outgoing) {  // P_c = A_c B_c^T: dA_c = dP_c B_c, dB_c = dP_c^T A_c
        kern::gemm_batched(nc, false, false, r, r, r, 1.f, dPg, r, rr, B, r, rr, 0.f, dA, r, rr);
        kern::gemm_batched(nc, true, false, r, r, r, 1.f, dPg, r, rr, A, r, rr, 0.f, dB, r, rr);
      } else {  // P_c = A_c^T B_c: dA_c = B_c dP_c^T, dB_c = A_c dP_c
        kern::gemm_batched(nc, false, true, r, r, r, 1.f, B, r, rr, dPg, r, rr, 0.f, dA, r, rr);
        kern::gemm_batched(nc, false, false, r, r, r, 1.f, A, r, rr, dPg, r, rr, 0.f, dB, r, rr);
      }
      gb.backward(g, ct, x_ln.f32(), rr, ctx.pair_mask, dxln.f32());
    }
  }
  dP = Tensor();
  x_ln = Tensor();
  layernorm_backward_into(z_in, dxln.f32(), rr, cz, w.ln_in, mean.f32(), rstd.f32(), dz, &g->ln_in,
                          true);
}

// ---- Triangle multiplication on a row shard (DAP) ----------------------------------------------

namespace {

// P [c_t, rows, r] of the shard: per group, P_c[:, shard q's rows] = L_c R_{q,c}^T.
Tensor tri_mul_shard_products(const TriangleMultiplicationW& w, const BlockContext& ctx,
                              bool left_is_b, int64_t rows, const float* mask,
                              const ShardGather& gather, const float* x_ln) {
  const int64_t r = ctx.r, rr = rows * r, cz = ctx.cfg->c_z, ct = ctx.cfg->c_hidden_mul;
  const int64_t parts = gather.parts;
  const TriMulTrainChunks chunks = tri_mul_train_chunks(ctx, rows, parts);
  const int64_t cg = chunks.group, q = chunks.proj_rows * r;
  Tensor P = Tensor::empty({ct, rows, r});  // products of the shard, channel-major
  TriMulGroup grp{0, 0, Tensor::empty({4 * cg, cz}), Tensor::empty({4 * cg})};
  Tensor T = Tensor::empty({4 * cg, q});    // projections of a block of pairs, channel-major
  Tensor Y = Tensor::empty({q, 4 * cg});    // scratch of the projection
  Tensor A = Tensor::empty({cg, rows, r});  // a, b of the group, channel-major
  Tensor B = Tensor::empty({cg, rows, r});
  Tensor G = Tensor::empty({parts * cg, rows, r});  // every shard's R of the group, shard-major
  for (int64_t c0 = 0; c0 < ct; c0 += cg) {
    grp.load(w, ct, c0, std::min(cg, ct - c0));
    const int64_t nc = grp.nc;
    tri_mul_group_ab(grp, x_ln, rr, cz, mask, q, Y.f32(), T.f32(), A.f32(), B.f32());
    const float* L = (left_is_b ? B : A).f32();
    gather.fn((left_is_b ? A : B).f32(), nc * rr, G.f32());
    for (int64_t k = 0; k < parts; ++k)
      kern::gemm_batched(nc, false, true, rows, rows, r, 1.f, L, r, rr, G.f32() + k * nc * rr, r,
                         rr, 0.f, P.f32() + c0 * rr + k * rows, r, rr);
  }
  return P;
}

}  // namespace

void triangle_multiplication_shard_train(const TriangleMultiplicationW& w, const BlockContext& ctx,
                                         bool left_is_b, int64_t rows, int64_t row0,
                                         const float* mask, const ShardGather& gather, float* z,
                                         TriangleMultiplicationState* st) {
  const EvoformerConfig& cfg = *ctx.cfg;
  const int64_t r = ctx.r, cz = cfg.c_z, rr = rows * r;
  FC_CHECK(gather.parts >= 1 && rows * gather.parts == r);
  const float eps = cfg.eps_ln;
  Tensor x_ln = Tensor::empty({rr, cz});  // LN_in(z) of the shard
  kern::layernorm(z, cz, x_ln.f32(), cz, rr, cz, w.ln_in.w.f32(), w.ln_in.b.f32(), eps);
  Tensor P =
      tri_mul_shard_products(w, ctx, left_is_b, rows, mask, gather, x_ln.f32());  // [c_t, rows, r]
  tri_mul_output(
      w, ctx, P.f32(), x_ln.f32(), rows, tri_mul_train_chunks(ctx, rows, gather.parts).rows,
      dropout_mask(ctx, left_is_b ? "tri_mul_in" : "tri_mul_out", r, cz), left_is_b, row0, z);
  if (st) st->P = std::move(P);
}

void triangle_multiplication_shard_backward(const TriangleMultiplicationW& w,
                                            TriangleMultiplicationW* g, const BlockContext& ctx,
                                            bool left_is_b, int64_t rows, int64_t row0,
                                            const float* mask, const ShardGather& gather,
                                            const ShardReduce& reduce, const float* z_in,
                                            TriangleMultiplicationState* st, float* dz) {
  const EvoformerConfig& cfg = *ctx.cfg;
  const int64_t r = ctx.r, cz = cfg.c_z, ct = cfg.c_hidden_mul, rr = rows * r;
  const int64_t parts = gather.parts;
  FC_CHECK(parts >= 1 && rows * parts == r && reduce.parts == parts);
  const float eps = cfg.eps_ln;
  const TriMulTrainChunks chunks = tri_mul_train_chunks(ctx, rows, parts);
  Tensor x_ln = Tensor::empty({rr, cz});  // LN_in(z_in) of the shard
  Tensor mean = Tensor::empty({rr});
  Tensor rstd = Tensor::empty({rr});
  kern::layernorm(z_in, cz, x_ln.f32(), cz, rr, cz, w.ln_in.w.f32(), w.ln_in.b.f32(), eps,
                  mean.f32(), rstd.f32());
  Tensor P = st->P.defined()
                 ? std::move(st->P)
                 : tri_mul_shard_products(w, ctx, left_is_b, rows, mask, gather, x_ln.f32());
  st->P = Tensor();
  Tensor dxln = Tensor::empty({rr, cz});     // dL/d LN_in(z), both branches
  Tensor dP = Tensor::empty({ct, rows, r});  // dL/d triangle products, channel-major
  tri_mul_output_backward(w, g, ctx, P.f32(), x_ln.f32(), rows, chunks.rows,
                          dropout_mask(ctx, left_is_b ? "tri_mul_in" : "tri_mul_out", r, cz),
                          left_is_b, row0, dz, dP.f32(), dxln.f32());
  P = Tensor();
  {
    // Phase 1 backward by channel groups: rebuild the group's A, B and every shard's R;
    // dL = sum_k dP_k R_k, dR_k = dP_k^T L (reduce-scattered to shard k); then as one process.
    const int64_t cg = chunks.group;
    TriMulGroupBackward gb(cg, cz, chunks.proj_rows * r, rows, r);
    Tensor G = Tensor::empty({parts * cg, rows, r});   // every shard's R, shard-major
    Tensor dG = Tensor::empty({parts * cg, rows, r});  // this shard's part of every dR_k
    for (int64_t c0 = 0; c0 < ct; c0 += cg) {
      const int64_t nc = std::min(cg, ct - c0);
      gb.rebuild(w, ct, c0, nc, x_ln.f32(), rr, mask);
      const float* L = (left_is_b ? gb.B : gb.A).f32();
      float* dL = (left_is_b ? gb.dB : gb.dA).f32();
      float* dR = (left_is_b ? gb.dA : gb.dB).f32();
      gather.fn((left_is_b ? gb.A : gb.B).f32(), nc * rr, G.f32());
      const float* dPg = dP.f32() + c0 * rr;
      for (int64_t k = 0; k < parts; ++k) {
        kern::gemm_batched(nc, false, false, rows, r, rows, 1.f, dPg + k * rows, r, rr,
                           G.f32() + k * nc * rr, r, rr, k == 0 ? 0.f : 1.f, dL, r, rr);
        kern::gemm_batched(nc, true, false, rows, r, rows, 1.f, dPg + k * rows, r, rr, L, r, rr,
                           0.f, dG.f32() + k * nc * rr, r, rr);
      }
      reduce.fn(dG.f32(), nc * rr, dR);
      gb.backward(g, ct, x_ln.f32(), rr, mask, dxln.f32());
    }
  }
  dP = Tensor();
  x_ln = Tensor();
  layernorm_backward_into(z_in, dxln.f32(), rr, cz, w.ln_in, mean.f32(), rstd.f32(), dz, &g->ln_in,
                          true);
}

}  // namespace fc
