// The training-step memory model. It replays the allocation sequence of src/model/train_*.cc
// tensor by tensor on a counter of live elements (floats of the fp32 engine), chunk by chunk with
// the chunk sizes the training functions pick (the *_train_chunk functions of src/model/train.h);
// bytes = elements * elem_bytes. Kernel scratch comes from the kernels' own *_scratch_floats
// functions, so the model stays exact when those change. Dropout masks are not modelled.
#include "plan/memory_model.h"

#include <algorithm>

#include "kernels/backward.h"
#include "kernels/kernels.h"
#include "model/block_table.h"
#include "model/common.h"
#include "model/modules.h"
#include "model/train.h"

namespace fc {

namespace {

// Live and peak element counts of a replayed allocation sequence.
struct Sim {
  int64_t live = 0, peak = 0;
  void alloc(int64_t n) {
    live += n;
    peak = std::max(peak, live);
  }
  void free(int64_t n) { live -= n; }
};

int64_t ln_scratch(int64_t rows, int64_t n) {
  return kern::layernorm_backward_scratch_floats(rows, n);
}

// One gated-attention module (train_attention.cc): N items of L positions with c channels, H heads
// of C; `bias`: with the pair-bias branch from z; `transposed`: the items are columns.
struct AttnDims {
  int64_t N, L, c, H, C;
  bool bias, transposed;
};

kern::AttentionArgs attention_dims(const AttnDims& d, int64_t n) {
  kern::AttentionArgs a;
  a.B = n, a.Lq = d.L, a.Lk = d.L, a.H = d.H, a.C = d.C;
  return a;
}

// bias_forward: bias [H, r, r] stays; LN and projection of a row block are transient.
void bias_fwd(Sim& S, const BlockContext& ctx, int64_t H) {
  const int64_t r = ctx.r, cz = ctx.cfg->c_z, rows = bias_train_chunk(ctx, H) * r;
  S.alloc(H * r * r);
  S.alloc(rows * (cz + H));
  S.free(rows * (cz + H));
}

// Forward of an attention module; keep: the chunk states (q|k|v|g, og, lse) and the bias stay
// (policy none).
void attention_fwd(Sim& S, const BlockContext& ctx, const AttnDims& d, bool keep) {
  const int64_t hc = d.H * d.C, ch = attention_train_chunk(ctx, d.N, d.L, d.c, hc);
  if (d.bias) bias_fwd(S, ctx, d.H);
  for (int64_t n0 = 0; n0 < d.N; n0 += ch) {
    const int64_t n = std::min(ch, d.N - n0), rows = n * d.L;
    const int64_t scratch = kern::attention_scratch_floats(attention_dims(d, n), ctx.threads);
    S.alloc(rows * d.c);             // x_ln
    S.alloc(rows * (5 * hc + d.H));  // qkvg, og, lse
    S.alloc(scratch);
    S.free(scratch);
    S.free(rows * d.c);
    S.alloc(rows * d.c);  // u
    S.free(rows * d.c);
    if (!keep) S.free(rows * (5 * hc + d.H));
  }
  if (d.bias && !keep) S.free(d.H * ctx.r * ctx.r);
}

// Backward of an attention module; kept: the forward's state is live (and is freed chunk by
// chunk), else each chunk's state is recomputed.
void attention_bwd(Sim& S, const BlockContext& ctx, const AttnDims& d, bool kept) {
  const int64_t hc = d.H * d.C, ch = attention_train_chunk(ctx, d.N, d.L, d.c, hc);
  const int64_t r = ctx.r, rr = r * r, cz = ctx.cfg->c_z;
  if (d.bias) {
    if (!kept) bias_fwd(S, ctx, d.H);
    S.alloc(d.H * rr);  // dbias
  }
  for (int64_t n0 = 0; n0 < d.N; n0 += ch) {
    const int64_t n = std::min(ch, d.N - n0), rows = n * d.L;
    const kern::AttentionArgs a = attention_dims(d, n);
    S.alloc(rows * d.c + 2 * rows);  // x_ln, mean, rstd
    if (!kept) {
      const int64_t scratch = kern::attention_scratch_floats(a, ctx.threads);
      S.alloc(rows * (5 * hc + d.H));  // qkvg, og, lse
      S.alloc(scratch);
      S.free(scratch);
    }
    S.alloc(rows * d.c);     // du
    S.alloc(rows * hc);      // dog
    S.free(rows * hc);       // og
    S.alloc(rows * 4 * hc);  // dqkvg
    const int64_t scratch = kern::attention_backward_scratch_floats(a, ctx.threads, d.bias);
    S.alloc(scratch);
    S.free(scratch);
    S.free(rows * (d.H + hc));           // lse, dog
    S.alloc(rows * d.c);                 // dln
    S.free(rows * 8 * hc + rows * d.c);  // dqkvg, qkvg, x_ln
    const int64_t x = d.transposed ? rows * d.c : 0;
    S.alloc(x + ln_scratch(rows, d.c));
    S.free(x + ln_scratch(rows, d.c));
    S.free(2 * rows * d.c + 2 * rows);  // du, dln, mean, rstd
  }
  if (d.bias) {
    S.free(d.H * rr);  // bias
    const int64_t rows = bias_train_chunk(ctx, d.H) * r;
    const int64_t bwd = rows * (2 * cz + 2 + d.H) + ln_scratch(rows, cz);
    S.alloc(bwd);
    S.free(bwd);
    S.free(d.H * rr);  // dbias
  }
}

// masked: the ExtraMSA MSA transition (its update, resp. the update's gradient, in a buffer).
void transition_fwd(Sim& S, const BlockContext& ctx, int64_t rows, int64_t c, int64_t nc, bool keep,
                    bool masked) {
  const int64_t ch = transition_train_chunk(ctx, rows, c, nc);
  for (int64_t r0 = 0; r0 < rows; r0 += ch) {
    const int64_t n = std::min(ch, rows - r0);
    S.alloc(n * nc);  // h
    S.alloc(n * c);   // x_ln
    S.free(n * c);
    if (masked) {
      S.alloc(n * c);  // u
      S.free(n * c);
    }
    if (!keep) S.free(n * nc);
  }
}

void transition_bwd(Sim& S, const BlockContext& ctx, int64_t rows, int64_t c, int64_t nc, bool kept,
                    bool masked) {
  const int64_t ch = transition_train_chunk(ctx, rows, c, nc);
  for (int64_t r0 = 0; r0 < rows; r0 += ch) {
    const int64_t n = std::min(ch, rows - r0);
    S.alloc(n * c + 2 * n);      // x_ln, mean, rstd
    if (!kept) S.alloc(n * nc);  // h
    S.alloc(n * nc);             // dh
    if (masked) {
      S.alloc(n * c);  // du
      S.free(n * c);
    }
    S.free(n * nc);          // h
    S.alloc(n * c);          // dxln
    S.free(n * nc + n * c);  // dh, x_ln
    S.alloc(ln_scratch(n, c));
    S.free(ln_scratch(n, c));
    S.free(n * c + 2 * n);  // dxln, mean, rstd
  }
}

// The global column attention (train_extra_msa.cc): n columns per chunk.
struct GlobalDims {
  int64_t s, ce, H, C, hc, ld;
};
GlobalDims global_dims(const BlockContext& ctx) {
  const EvoformerConfig& c = *ctx.cfg;
  const int64_t H = c.no_heads_msa, C = c.c_hidden_msa_att;
  return {ctx.s, c.c_m, H, C, H * C, 2 * C + H * C};
}
kern::AttentionArgs global_attention_dims(const GlobalDims& d, int64_t n) {
  kern::AttentionArgs a;
  a.B = n, a.Lq = d.H, a.Lk = d.s, a.H = 1, a.C = d.C;
  return a;
}
int64_t global_state(const GlobalDims& d, int64_t n) {
  return n * d.s * d.ld + 2 * n * d.hc + n * d.H;  // kvg, q, o, lse
}
// chunk_state: the means (transient), q, kvg, o, lse and the attention scratch (transient).
void global_chunk_state(Sim& S, const BlockContext& ctx, const GlobalDims& d, int64_t n) {
  const int64_t scratch = kern::attention_scratch_floats(global_attention_dims(d, n), ctx.threads);
  S.alloc(n * d.ce);  // mu
  S.alloc(n * d.hc);  // q
  S.free(n * d.ce);
  S.alloc(n * d.s * d.ld + n * d.hc + n * d.H);  // kvg, o, lse
  S.alloc(scratch);
  S.free(scratch);
}

void global_fwd(Sim& S, const BlockContext& ctx, bool keep) {
  const GlobalDims d = global_dims(ctx);
  const int64_t ch = global_attention_train_chunk(ctx);
  for (int64_t r0 = 0; r0 < ctx.r; r0 += ch) {
    const int64_t n = std::min(ch, ctx.r - r0), rows = n * d.s;
    S.alloc(rows * d.ce);  // x
    global_chunk_state(S, ctx, d, n);
    S.free(rows * d.ce);
    S.alloc(rows * (d.hc + d.ce));  // y, u
    S.free(rows * (d.hc + d.ce));
    if (!keep) S.free(global_state(d, n));
  }
}

void global_bwd(Sim& S, const BlockContext& ctx, bool kept) {
  const GlobalDims d = global_dims(ctx);
  const int64_t ch = global_attention_train_chunk(ctx);
  for (int64_t r0 = 0; r0 < ctx.r; r0 += ch) {
    const int64_t n = std::min(ch, ctx.r - r0), rows = n * d.s;
    S.alloc(rows * d.ce + 2 * rows);  // x, mean, rstd
    if (!kept) global_chunk_state(S, ctx, d, n);
    S.alloc(n * d.ce);              // mu
    S.alloc(rows * d.hc);           // dy
    S.alloc(rows * (d.ce + d.hc));  // du, y
    S.free(rows * (d.ce + d.hc));
    S.alloc(rows * d.ld + n * d.hc);  // dkvg, dout
    S.free(rows * d.hc);              // dy
    S.alloc(n * d.hc);                // dq
    const int64_t scratch =
        kern::attention_backward_scratch_floats(global_attention_dims(d, n), ctx.threads, false);
    S.alloc(scratch);
    S.free(scratch);
    S.free(2 * n * d.hc + n * d.H);         // dout, o, lse
    S.alloc(n * d.ce);                      // dmu
    S.free(2 * n * d.hc + n * d.ce);        // dq, q, mu
    S.alloc(rows * d.ce);                   // dxln
    S.free(2 * rows * d.ld + rows * d.ce);  // dkvg, kvg, x
    S.free(n * d.ce);                       // dmu
    S.alloc(ln_scratch(d.s, d.ce));
    S.free(ln_scratch(d.s, d.ce) + rows * d.ce + 2 * rows);  // scratch, dxln, mean, rstd
  }
}

int64_t opm_state(const BlockContext& ctx) {
  const int64_t sr = ctx.s * ctx.r;
  return sr * (2 + ctx.cfg->c_m + 2 * ctx.cfg->c_hidden_opm) + ctx.r * ctx.r;
}

// z_update: the forward adds into z (else only the state is built, the module-policy recompute).
void opm_fwd(Sim& S, const BlockContext& ctx, bool z_update, bool keep) {
  const EvoformerConfig& cfg = *ctx.cfg;
  const int64_t s = ctx.s, r = ctx.r, sr = s * r, co = cfg.c_hidden_opm, cz = cfg.c_z;
  const int64_t kF = sizeof(float);
  S.alloc(sr * (2 + cfg.c_m + 2 * co));  // mean, rstd, x_ln, a, b
  S.alloc(2 * sr * co);                  // ab
  S.free(2 * sr * co);
  S.alloc(r * r);  // norm
  if (z_update) {
    const int64_t ch = pick_chunk(ctx, r, 2 * co * r * co * kF + r * cz * kF);
    const int64_t chunk = ch * r * (2 * co * co + cz);  // o, p, y
    S.alloc(chunk);
    S.free(chunk);
  }
  if (!keep) S.free(opm_state(ctx));
}

void opm_bwd(Sim& S, const BlockContext& ctx) {
  const EvoformerConfig& cfg = *ctx.cfg;
  const int64_t s = ctx.s, r = ctx.r, sr = s * r, cm = cfg.c_m, co = cfg.c_hidden_opm;
  const int64_t cz = cfg.c_z, kF = sizeof(float);
  S.alloc(sr * cm);      // dxln
  S.alloc(2 * sr * co);  // dab
  const int64_t ch = pick_chunk(ctx, r, 3 * co * r * co * kF + r * cz * kF);
  const int64_t inner = 2 * sr * co + ch * r * (3 * co * co + cz);  // da, db; o, p, dp, dy
  S.alloc(inner);
  S.free(inner);
  S.free(2 * sr * co);
  S.alloc(ln_scratch(sr, cm));
  S.free(ln_scratch(sr, cm));
  S.free(sr * cm);
}

// Weights of one channel group of the triangle multiplication (gathered W, b).
int64_t tri_mul_group_w(const BlockContext& ctx, int64_t cg) {
  return 4 * cg * ctx.cfg->c_z + 4 * cg;
}

// tri_mul_products: P [c_t, r, r] stays; the group's weights, a block of its projections, A and
// B are transient.
void tri_mul_products(Sim& S, const BlockContext& ctx) {
  const int64_t r = ctx.r, rr = r * r, ct = ctx.cfg->c_hidden_mul;
  const TriMulTrainChunks c = tri_mul_train_chunks(ctx);
  const int64_t tmp = tri_mul_group_w(ctx, c.group) + 2 * c.proj_rows * r * 4 * c.group +
                      2 * c.group * rr;  // G.W, G.b, T, Y, A, B
  S.alloc(ct * rr);
  S.alloc(tmp);
  S.free(tmp);
}

void tri_mul_fwd(Sim& S, const BlockContext& ctx, bool keep) {
  const int64_t r = ctx.r, rr = r * r, cz = ctx.cfg->c_z, ct = ctx.cfg->c_hidden_mul;
  const int64_t rows = tri_mul_train_chunks(ctx).rows * r;
  S.alloc(rr * cz);  // x_ln
  tri_mul_products(S, ctx);
  S.alloc(rows * (ct + 2 * cz));  // p, y, g
  S.free(rows * (ct + 2 * cz));
  S.free(rr * cz);
  if (!keep) S.free(ct * rr);
}

void tri_mul_bwd(Sim& S, const BlockContext& ctx, bool kept) {
  const int64_t r = ctx.r, rr = r * r, cz = ctx.cfg->c_z, ct = ctx.cfg->c_hidden_mul;
  const TriMulTrainChunks chunks = tri_mul_train_chunks(ctx);
  const int64_t rows = chunks.rows * r;
  S.alloc(rr * cz + 2 * rr);  // x_ln, mean, rstd
  if (!kept) tri_mul_products(S, ctx);
  S.alloc(rr * cz + ct * rr);  // dxln, dP
  const int64_t phase2 = rows * (3 * ct + 2 + 5 * cz) + ln_scratch(rows, ct);
  S.alloc(phase2);
  S.free(phase2);
  S.free(ct * rr);  // P
  const int64_t cg = chunks.group;
  const int64_t q = chunks.proj_rows * r;
  const int64_t phase1 = 2 * tri_mul_group_w(ctx, cg) + 2 * q * 4 * cg + q +
                         4 * cg * rr;  // G.W, G.b, gW, gb, T, dT, ones, A, B, dA, dB
  S.alloc(phase1);
  S.free(phase1);
  S.free(ct * rr + rr * cz);  // dP, x_ln
  S.alloc(ln_scratch(rr, cz));
  S.free(ln_scratch(rr, cz));
  S.free(rr * cz + 2 * rr);  // dxln, mean, rstd
}

// The context the training step builds, as far as the model reads it.
BlockContext model_context(const EvoformerConfig& cfg, int64_t s, int64_t r, int threads,
                           int64_t chunk, int64_t chunk_target_bytes) {
  return shape_context(
      cfg, s, r, chunk,
      chunk_target_bytes > 0 ? chunk_target_bytes : default_train_chunk_target_bytes(cfg, s, r),
      threads);
}

// The attention dimensions of an attention layer.
AttnDims attn_dims(const LayerDesc& l, const BlockContext& ctx) {
  const EvoformerConfig& c = *ctx.cfg;
  const int64_t s = ctx.s, r = ctx.r;
  const int64_t Hm = c.no_heads_msa, Cm = c.c_hidden_msa_att;
  const int64_t Hp = c.no_heads_pair, Cp = c.c_hidden_pair_att;
  switch (l.kind) {
    case LayerKind::kMsaRowAttention:
      return {s, r, c.c_m, Hm, Cm, true, false};
    case LayerKind::kMsaColumnAttention:
      return {r, s, c.c_m, Hm, Cm, false, true};
    case LayerKind::kTriangleAttention:
      return {r, r, c.c_z, Hp, Cp, true, l.transposed};
    default:
      FC_CHECK_MSG(false, std::string(l.name) + " is not an attention layer");
  }
  return {};
}

int64_t stream_elems(const BlockContext& ctx, Stream st) {
  return stream_rows(ctx, st) * stream_channels(ctx, st);
}

// The training forward of one layer (layer_train in train_block.cc).
void layer_fwd(Sim& S, const BlockContext& ctx, const LayerDesc& l, bool keep) {
  switch (l.kind) {
    case LayerKind::kMsaRowAttention:
    case LayerKind::kMsaColumnAttention:
    case LayerKind::kTriangleAttention:
      return attention_fwd(S, ctx, attn_dims(l, ctx), keep);
    case LayerKind::kTransition:
    case LayerKind::kMaskedTransition: {
      const int64_t c = stream_channels(ctx, l.updates);
      return transition_fwd(S, ctx, stream_rows(ctx, l.updates), c, ctx.cfg->transition_n * c, keep,
                            l.kind == LayerKind::kMaskedTransition);
    }
    case LayerKind::kOuterProductMean:
      return opm_fwd(S, ctx, true, keep);
    case LayerKind::kTriangleMultiplication:
      return tri_mul_fwd(S, ctx, keep);
    case LayerKind::kMsaColumnGlobalAttention:
      return global_fwd(S, ctx, keep);
  }
  FC_CHECK_MSG(false, std::string("layer ") + l.name + " has no training path");
}

// The backward of one layer (layer_backward); kept: its state from the forward is live.
void layer_bwd(Sim& S, const BlockContext& ctx, const LayerDesc& l, bool kept) {
  switch (l.kind) {
    case LayerKind::kMsaRowAttention:
    case LayerKind::kMsaColumnAttention:
    case LayerKind::kTriangleAttention:
      return attention_bwd(S, ctx, attn_dims(l, ctx), kept);
    case LayerKind::kTransition:
    case LayerKind::kMaskedTransition: {
      const int64_t c = stream_channels(ctx, l.updates);
      return transition_bwd(S, ctx, stream_rows(ctx, l.updates), c, ctx.cfg->transition_n * c, kept,
                            l.kind == LayerKind::kMaskedTransition);
    }
    case LayerKind::kOuterProductMean:
      if (!kept) opm_fwd(S, ctx, false, true);
      opm_bwd(S, ctx);
      S.free(opm_state(ctx));
      return;
    case LayerKind::kTriangleMultiplication:
      return tri_mul_bwd(S, ctx, kept);
    case LayerKind::kMsaColumnGlobalAttention:
      return global_bwd(S, ctx, kept);
  }
  FC_CHECK_MSG(false, std::string("layer ") + l.name + " has no training path");
}

// block_forward (train_block.cc): layer inputs copied under none and module, states kept under
// none, the block input copied under block.
void block_fwd(Sim& S, const BlockTable& t, const BlockContext& ctx, Recompute policy) {
  if (policy == Recompute::kBlock)
    S.alloc(stream_elems(ctx, Stream::kM) + stream_elems(ctx, Stream::kZ));
  for (int i = 0; i < t.count; ++i) {
    const LayerDesc& l = t.layers[i];
    if (policy != Recompute::kBlock) {
      const SavedInputs in = saved_inputs(t, i);
      if (in.updated) S.alloc(stream_elems(ctx, l.updates));
      if (in.read) S.alloc(stream_elems(ctx, l.reads));
    }
    layer_fwd(S, ctx, l, policy == Recompute::kNone);
  }
}

// block_backward. input_held: the block's input m (its first saved copy, or m0) stays alive after
// the backward (the driver holds it as the previous block's m_out), else it is freed with the
// state.
void block_bwd(Sim& S, const BlockTable& t, const BlockContext& ctx, Recompute policy,
               bool input_held) {
  const int64_t m = stream_elems(ctx, Stream::kM), z = stream_elems(ctx, Stream::kZ);
  if (policy == Recompute::kBlock) {
    S.alloc(m);  // the clone of m0 (z0 is reused in place)
    block_fwd(S, t, ctx, Recompute::kNone);
    block_bwd(S, t, ctx, Recompute::kNone, false);
    S.free(m + z);
    if (!input_held) S.free(m);
    return;
  }
  const int held = input_held ? block_input_m_layer(t) : -1;
  for (int i = t.count - 1; i >= 0; --i) {
    const LayerDesc& l = t.layers[i];
    layer_bwd(S, ctx, l, policy == Recompute::kNone);
    const SavedInputs in = saved_inputs(t, i);
    auto held_m = [&](Stream st) { return i == held && st == Stream::kM; };
    if (in.updated && !held_m(l.updates)) S.free(stream_elems(ctx, l.updates));
    if (in.read && !held_m(l.reads)) S.free(stream_elems(ctx, l.reads));
  }
}

// Elements of one layer's parameter-gradient struct (allocate_block in src/model/weights.cc: the
// fused storage, including the q, k, v parts of b_qkvg).
int64_t layer_param_elems(const EvoformerConfig& c, const LayerDesc& l) {
  auto ln = [](int64_t n) { return 2 * n; };
  auto lin = [](int64_t out, int64_t in, bool bias) { return out * in + (bias ? out : 0); };
  auto mha = [&](int64_t H, int64_t C, int64_t cin) {
    return lin(4 * H * C, cin, true) + lin(cin, H * C, true);
  };
  const int64_t cm = c.c_m, cz = c.c_z, co = c.c_hidden_opm, ct = c.c_hidden_mul;
  switch (l.kind) {
    case LayerKind::kMsaRowAttention:
      return ln(cm) + ln(cz) + lin(c.no_heads_msa, cz, false) +
             mha(c.no_heads_msa, c.c_hidden_msa_att, cm);
    case LayerKind::kMsaColumnAttention:
      return ln(cm) + mha(c.no_heads_msa, c.c_hidden_msa_att, cm);
    case LayerKind::kTransition:
    case LayerKind::kMaskedTransition: {
      const int64_t ch = l.updates == Stream::kM ? cm : cz;
      return ln(ch) + lin(c.transition_n * ch, ch, true) + lin(ch, c.transition_n * ch, true);
    }
    case LayerKind::kOuterProductMean:
      return ln(cm) + lin(2 * co, cm, true) + lin(cz, co * co, true);
    case LayerKind::kTriangleMultiplication:
      return ln(cz) + lin(4 * ct, cz, true) + ln(ct) + lin(cz, ct, true) + lin(cz, cz, true);
    case LayerKind::kTriangleAttention:
      return ln(cz) + lin(c.no_heads_pair, cz, false) +
             mha(c.no_heads_pair, c.c_hidden_pair_att, cz);
    case LayerKind::kMsaColumnGlobalAttention: {
      const int64_t hc = c.no_heads_msa * c.c_hidden_msa_att, ld = 2 * c.c_hidden_msa_att + hc;
      return ln(cm) + lin(hc, cm, false) + lin(ld, cm, true) + lin(cm, hc, true);
    }
  }
  FC_CHECK_MSG(false, std::string("layer ") + l.name + " has no training path");
  return 0;
}

int64_t block_param_elems(const EvoformerConfig& c, const BlockTable& t) {
  int64_t n = 0;
  for (const LayerDesc& l : t) n += layer_param_elems(c, l);
  return n;
}

// allocate_block_grads: an ExtraMSA block's gradient struct is built from an Evoformer block's
// (allocate_extra_msa_block), whose MSA column attention lives until the global one is allocated.
void alloc_block_grads(Sim& S, const EvoformerConfig& c, const BlockTable& t) {
  if (&t != &kExtraMsaBlock) return S.alloc(block_param_elems(c, t));
  const int64_t evo = block_param_elems(c, kEvoformerBlock);
  const int64_t col = layer_param_elems(c, *find_layer(kEvoformerBlock, "msa_att_col"));
  S.alloc(evo);
  S.alloc(layer_param_elems(c, *find_layer(kExtraMsaBlock, "msa_att_col")));
  S.free(col);
}

const BlockTable& stack_table(bool extra_msa) {
  return extra_msa ? kExtraMsaBlock : kEvoformerBlock;
}

Recompute policy_of(const std::vector<Recompute>& policy, int64_t b) {
  if (policy.empty()) return Recompute::kNone;
  FC_CHECK_MSG(policy.size() == 1 || b < static_cast<int64_t>(policy.size()),
               "recompute policy list shorter than the stack");
  return policy.size() == 1 ? policy[0] : policy[b];
}

}  // namespace

int64_t block_activation_bytes(const EvoformerConfig& cfg, int64_t s, int64_t r, Recompute policy,
                               int64_t elem_bytes, int64_t chunk, int64_t chunk_target_bytes,
                               bool extra_msa) {
  Sim S;
  block_fwd(S, stack_table(extra_msa), model_context(cfg, s, r, 1, chunk, chunk_target_bytes),
            policy);
  return S.live * elem_bytes;
}

int64_t stack_activation_bytes(const EvoformerConfig& cfg, int64_t s, int64_t r, int64_t blocks,
                               const std::vector<Recompute>& policy, int64_t elem_bytes,
                               int64_t chunk, int64_t chunk_target_bytes, bool extra_msa) {
  int64_t total = 0;
  for (int64_t b = 0; b < blocks; ++b)
    total += block_activation_bytes(cfg, s, r, policy_of(policy, b), elem_bytes, chunk,
                                    chunk_target_bytes, extra_msa);
  return total;
}

int64_t stack_step_peak_bytes(const EvoformerConfig& cfg, int64_t s, int64_t r, int64_t blocks,
                              const std::vector<Recompute>& policy, int threads, int64_t elem_bytes,
                              int64_t chunk, int64_t chunk_target_bytes, bool extra_msa) {
  const BlockContext ctx = model_context(cfg, s, r, threads, chunk, chunk_target_bytes);
  const BlockTable& t = stack_table(extra_msa);
  const int64_t m = s * r * cfg.c_m, z = r * r * cfg.c_z;
  Sim S;
  // Forward: the blocks' kept memory piles up.
  for (int64_t b = 0; b < blocks; ++b) block_fwd(S, t, ctx, policy_of(policy, b));
  // Backward (train_blocks in train_block.cc): the dm, dz copies; per block, from the last, its
  // parameter-gradient struct (alive until the end of the step), then its backward. The driver
  // holds block b's input m as m_out until block b - 1 is done, block 0's until the end of the
  // loop.
  S.alloc(m + z);
  for (int64_t b = blocks - 1; b >= 0; --b) {
    alloc_block_grads(S, cfg, t);
    block_bwd(S, t, ctx, policy_of(policy, b), true);
    if (b + 1 < blocks) S.free(m);
  }
  S.free(m);
  // The Evoformer's single projection after the blocks: its parameter gradients and output.s.
  if (!extra_msa) S.alloc(cfg.c_s * cfg.c_m + cfg.c_s + r * cfg.c_s);
  return S.peak * elem_bytes;
}

// ---- Checked public entries (include/foldcube/plan.h) ------------------------------------------

Status MemoryQuery::validate() const {
  FC_RETURN_IF_ERROR(cfg.validate());
  if (s < 1 || r < 1) return Status::InvalidArgument("memory model: s and r must be >= 1");
  if (blocks < 1) return Status::InvalidArgument("memory model: blocks must be >= 1");
  if (!policy.empty() && policy.size() != 1 && static_cast<int64_t>(policy.size()) != blocks)
    return Status::InvalidArgument("memory model: " + std::to_string(policy.size()) +
                                   " recompute policies for " + std::to_string(blocks) +
                                   " blocks (give 0, 1 or one per block)");
  for (Recompute p : policy)
    if (p != Recompute::kNone && p != Recompute::kModule && p != Recompute::kBlock)
      return Status::InvalidArgument("memory model: unknown recompute policy");
  if (threads < 1) return Status::InvalidArgument("memory model: threads must be >= 1");
  if (elem_bytes != 1 && elem_bytes != 2 && elem_bytes != 4 && elem_bytes != 8)
    return Status::InvalidArgument("memory model: elem_bytes must be 1, 2, 4 or 8");
  if (chunk < 0 || chunk_target_bytes < 0)
    return Status::InvalidArgument("memory model: chunk and chunk_target_bytes must be >= 0");
  // Every count below stays far from int64 overflow: the largest buffer (elements) times the
  // element size, the blocks and a small factor must fit.
  const double widest =
      std::max<double>({static_cast<double>(cfg.c_m), double(cfg.c_z),
                        double(cfg.c_hidden_opm) * cfg.c_hidden_opm, double(cfg.c_hidden_mul) * 4,
                        double(cfg.transition_n) * cfg.c_m, double(cfg.transition_n) * cfg.c_z});
  const double elems = (double(s) * r + double(r) * r) * widest;
  if (elems * elem_bytes * blocks * 64 > 9e18)
    return Status::InvalidArgument("memory model: shape (s=" + std::to_string(s) +
                                   ", r=" + std::to_string(r) + ") too large to count in bytes");
  return Status::OK();
}

Status block_activation_bytes(const MemoryQuery& q, int64_t block, int64_t* out) {
  FC_RETURN_IF_ERROR(q.validate());
  if (block < 0 || block >= q.blocks)
    return Status::InvalidArgument("memory model: block " + std::to_string(block) +
                                   " outside [0, " + std::to_string(q.blocks) + ")");
  *out = block_activation_bytes(q.cfg, q.s, q.r, policy_of(q.policy, block), q.elem_bytes, q.chunk,
                                q.chunk_target_bytes, q.extra_msa);
  return Status::OK();
}

Status stack_activation_bytes(const MemoryQuery& q, int64_t* out) {
  FC_RETURN_IF_ERROR(q.validate());
  *out = stack_activation_bytes(q.cfg, q.s, q.r, q.blocks, q.policy, q.elem_bytes, q.chunk,
                                q.chunk_target_bytes, q.extra_msa);
  return Status::OK();
}

Status stack_step_peak_bytes(const MemoryQuery& q, int64_t* out) {
  FC_RETURN_IF_ERROR(q.validate());
  *out = stack_step_peak_bytes(q.cfg, q.s, q.r, q.blocks, q.policy, q.threads, q.elem_bytes,
                               q.chunk, q.chunk_target_bytes, q.extra_msa);
  return Status::OK();
}

Status forward_peak_bytes(const MemoryQuery& q, bool masks_given, int64_t* out) {
  FC_RETURN_IF_ERROR(q.validate());
  *out = forward_peak_bytes(q.cfg, q.s, q.r, masks_given, q.chunk, q.chunk_target_bytes, q.threads);
  return Status::OK();
}

Status forward_chunking(const MemoryQuery& q, bool extra_msa, std::vector<ModuleChunk>* out) {
  FC_RETURN_IF_ERROR(q.validate());
  *out = forward_chunking(q.cfg, q.s, q.r, q.chunk, q.chunk_target_bytes, q.threads, extra_msa);
  return Status::OK();
}

}  // namespace fc
