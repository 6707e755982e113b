#include "layers/triangle_multiplication.h"

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

// Automatic channel groups are rounded to the nearest multiple of 16 once pick_chunk allows 8 or
// more: a group's slice of a projection row is then whole 64-byte lines and whole vectors on
// every SIMD target (at s=128, r=256, AF2 dims, groups of 14 took 1.45x the time of groups of 16,
// in the vector tails of the gating).
constexpr int64_t kGroupAlign = 16;

// With several groups, LN_in(z) is kept whole (computed once) when phase 1 then needs at most
// this many chunk targets: 1.5 x bytes(m+z) at the automatic target (bytes(m+z)/8), the room a
// block bound of 2.5 x bytes(m+z) leaves beside the streams. Otherwise each group recomputes it,
// one more pass over z per group (at s=128, r=256, AF2 dims: 8 groups, 3-4 % of the module time).
constexpr int64_t kKeepLnTargets = 12;
}  // namespace

// ---- Inference ---------------------------------------------------------------------------------

namespace {
// The fused path (ctx.fused): the projections of a channel group go through
// kern::gated_projection, with bf16 GEMM inputs and bf16 A, B under bf16 products
// (bf16_fused), and the output phase through kern::gated_output with GEMM inputs of ctx.dtype.
// Both per row block.
DType projection_dtype(const BlockContext& ctx) {
  return bf16_fused(ctx) ? DType::BF16 : DType::F32;
}
// Their sizes (what the scratch formulas read); the caller sets the pointers.
kern::GatedProjectionArgs gated_projection_dims(int64_t pairs, int64_t cz, int64_t nc,
                                                DType dtype) {
  // A placeholder gamma: the rows are normalised in the kernel (the scratch formula counts the
  // normalised block); the caller sets the real LayerNorm weights with the other pointers.
  static const float kPlaceholder = 1.f;
  kern::GatedProjectionArgs a;
  a.rows = pairs, a.in = cz, a.nc = nc, a.gamma = &kPlaceholder, a.dtype = dtype;
  return a;
}
// Floats of the group's projection buffer t: a chunk of ch rows [ch*r, 4*cg] (unfused), or the
// fused kernel's scratch for the widest of the groups (cg, and a last group of ct % cg).
int64_t projection_floats(const BlockContext& ctx, int64_t cg, int64_t ch) {
  const int64_t r = ctx.r, ct = ctx.cfg->c_hidden_mul, cz = ctx.cfg->c_z;
  if (!ctx.fused) return ch * r * 4 * cg;
  int64_t floats = 0;
  for (const int64_t nc : {cg, ct % cg})
    if (nc > 0)
      floats = std::max(
          floats, kern::gated_projection_scratch_floats(
                      gated_projection_dims(ch * r, cz, nc, projection_dtype(ctx)), ctx.threads));
  return floats;
}
kern::GatedOutputArgs gated_output_dims(int64_t pairs, int64_t ct, int64_t cz, DType dtype) {
  kern::GatedOutputArgs a;
  a.rows = pairs, a.cp = ct, a.cz = cz, a.dtype = dtype;
  return a;
}
}  // namespace

// rows: rows of z the shard holds (ctx.r for one shard); parts > 1 adds the gathered right
// projection of a group [parts*cg, rows, r].
TriMulPhase1 tri_mul_phase1(const BlockContext& ctx, int64_t rows, int64_t parts) {
  const int64_t r = ctx.r, rr = rows * r, cz = ctx.cfg->c_z, ct = ctx.cfg->c_hidden_mul;
  const int64_t gathered = parts > 1 ? parts * rr : 0;  // per channel
  // A_g, B_g per channel: bf16 with bf16 products, so twice the channels fit the same target
  // (half the groups: LN_in(z) and the GEMM's input rows are swept once per group, and the
  // group's projection GEMM is twice as wide).
  const bool bf16 = bf16_fused(ctx);
  // bf16 products on a shard: the f32 copy of this shard's right projection sent to the gather
  // and every shard's in bf16, per channel.
  const int64_t shard16 = bf16 && parts > 1 ? rr * kF + gathered * 2 : 0;
  TriMulPhase1 p;
  p.cg = pick_chunk(ctx, ct, 2 * rr * (bf16 ? 2 : kF) + gathered * kF + shard16);
  if (ctx.chunk <= 0 && p.cg < ct && p.cg >= kGroupAlign / 2)
    p.cg = std::min(ct, (p.cg + kGroupAlign / 2) / kGroupAlign * kGroupAlign);
  p.ch = pick_chunk(ctx, rows, r * (cz + 4 * p.cg) * kF);
  // A_g, B_g (bf16 with bf16 products), the projection chunk (or the fused kernel's scratch), with
  // several groups the group's rows of w.ab and b.ab, the gathered right projections of the group,
  // with bf16 products the bf16 rows of w.ab, and on a shard the gather's f32 send buffer and the
  // group's gathered projections in bf16.
  p.bytes = 2 * p.cg * rr * (bf16 ? 2 : kF) + p.cg * shard16 +
            (projection_floats(ctx, p.cg, p.ch) + (p.cg < ct ? 4 * p.cg * (cz + 1) : 0) +
             p.cg * gathered) *
                kF +
            gemm_weights_bytes(4 * p.cg * cz, projection_dtype(ctx));
  if (ctx.fused) return p;  // LN_in(z) per row block inside kern::gated_projection
  p.keep_ln = p.cg < ct && (ct + cz) * rr * kF + p.bytes <= kKeepLnTargets * ctx.chunk_target_bytes;
  p.bytes += (p.keep_ln ? rows : p.ch) * r * cz * kF;
  return p;
}

int64_t tri_mul_output_chunk(const BlockContext& ctx, int64_t rows) {
  const int64_t r = ctx.r, ct = ctx.cfg->c_hidden_mul, cz = ctx.cfg->c_z;
  return pick_chunk(ctx, rows, r * (ct + 3 * cz) * kF);
}

namespace {
// The triangle multiplication on rows of z [rows, r, c_z] with mask [rows, r]. gather == nullptr:
// one shard (rows = r), outgoing or incoming; else the outgoing form with L = b when left_is_b
// (see triangle_multiplication_shard). Fused (ctx.fused), the projection phase is
// kern::gated_projection per channel group and the output phase kern::gated_output with GEMM
// inputs of ctx.dtype. With bf16 products (bf16_fused) the projections take bf16 GEMM inputs,
// A and B are stored in bf16 and the products take bf16 inputs with f32 accumulation (P stays
// f32; on a shard every shard's right operand, gathered as f32, is multiplied as one
// channel-major [r, r] operand per channel, the one-process product's shape but for the rows);
// gating, masking and the residual add stay f32.
void tri_mul_impl(const TriangleMultiplicationW& w, const BlockContext& ctx, bool outgoing,
                  bool left_is_b, int64_t rows, const float* mask_rows, const ShardGather* gather,
                  float* z) {
  const EvoformerConfig& cfg = *ctx.cfg;
  const int64_t r = ctx.r, cz = cfg.c_z, ct = cfg.c_hidden_mul, rr = rows * r;
  const int64_t parts = gather != nullptr ? gather->parts : 1;
  const float eps = cfg.eps_ln;
  const bool bf16 = bf16_fused(ctx);
  Tensor P = Tensor::empty({ct, rows, r});  // triangle products, channel-major
  {
    // Channels in groups of cg: each group projects its rows of w.ab from LN_in(z) (kept whole or
    // recomputed chunk by chunk) and writes its products into P. One group (cg = c_t) is the
    // ungrouped computation; the products per channel do not depend on the grouping.
    const TriMulPhase1 ph = tri_mul_phase1(ctx, rows, parts);
    const int64_t cg = ph.cg, ch = ph.ch;
    const DType abt = bf16 ? DType::BF16 : DType::F32;
    Tensor A = Tensor::empty({cg, rows, r}, abt);  // a[c][i][k] = mask * sigmoid(a_g) * a_p
    Tensor B = Tensor::empty({cg, rows, r}, abt);
    // LN_in(z), unfused only: all rows or a chunk (fused, the kernel normalises per row block).
    Tensor x = ctx.fused ? Tensor() : Tensor::empty({(ph.keep_ln ? rows : ch) * r, cz});
    // a_p | a_g | b_p | b_g of the group: a chunk [ch*r, 4*cg], or (fused) the fused kernel's
    // per-thread row blocks.
    Tensor t = Tensor::empty({projection_floats(ctx, cg, ch)});
    // The group's rows of w.ab [4*cg, cz], then of b.ab [4*cg]; only with several groups.
    Tensor wg = cg < ct ? Tensor::empty({4 * cg * (cz + 1)}) : Tensor();
    Tensor wg16 = bf16 ? Tensor::empty({4 * cg, cz}, DType::BF16) : Tensor();  // bf16 of the rows
    // Every shard's right projection of the group, shard-major [parts][cg, rows, r] (f32: the
    // gathers move f32).
    Tensor G = gather != nullptr ? Tensor::empty({parts * cg, rows, r}) : Tensor();
    // bf16 products on a shard: this shard's right projection widened to f32 for the gather
    // [cg, rows, r], and every shard's, back in bf16 and channel-major [cg, r, r] (the one-process
    // B_c: row j of shard q at q*rows + j).
    const bool shard16 = bf16 && gather != nullptr;
    Tensor S = shard16 ? Tensor::empty({cg, rows, r}) : Tensor();
    Tensor R16 = shard16 ? Tensor::empty({cg, r, r}, DType::BF16) : Tensor();
    if (ph.keep_ln)
      kern::layernorm(z, cz, x.f32(), cz, rr, cz, w.ln_in.w.f32(), w.ln_in.b.f32(), eps);
    for (int64_t c0 = 0; c0 < ct; c0 += cg) {
      const int64_t nc = std::min(cg, ct - c0), ld = 4 * nc;
      const float* wp = w.ab.w.f32();
      const float* bp = w.ab.b.f32();
      if (cg < ct) {
        float* wgp = wg.f32();
        for (int64_t part = 0; part < 4; ++part) {
          std::memcpy(wgp + part * nc * cz, wp + (part * ct + c0) * cz, nc * cz * kF);
          std::memcpy(wgp + 4 * nc * cz + part * nc, bp + part * ct + c0, nc * kF);
        }
        wp = wgp;
        bp = wgp + 4 * nc * cz;
      }
      if (bf16) kern::f32_to_bf16(wp, wg16.data<uint16_t>(), ld * cz);
      for (int64_t i0 = 0; i0 < rows; i0 += ch) {
        const int64_t n = std::min(ch, rows - i0);
        if (ctx.fused) {
          kern::GatedProjectionArgs ga = gated_projection_dims(n * r, cz, nc, abt);
          ga.x = z + i0 * r * cz, ga.ldx = cz;
          ga.gamma = w.ln_in.w.f32(), ga.beta = w.ln_in.b.f32(), ga.eps = eps;
          ga.W = wp, ga.bias = bp, ga.W_bf16 = bf16_ptr(wg16), ga.mask = mask_rows + i0 * r;
          if (bf16)
            ga.A_bf16 = A.data<uint16_t>() + i0 * r, ga.B_bf16 = B.data<uint16_t>() + i0 * r;
          else
            ga.A = A.f32() + i0 * r, ga.B = B.f32() + i0 * r;
          ga.ld_ab = rr;
          kern::gated_projection(ga, t.f32(), ctx.threads);
          continue;
        }
        // Unfused reference path (f32).
        const float* xp = x.f32() + (ph.keep_ln ? i0 * r * cz : 0);
        if (!ph.keep_ln)
          kern::layernorm(z + i0 * r * cz, cz, x.f32(), cz, n * r, cz, w.ln_in.w.f32(),
                          w.ln_in.b.f32(), eps);
        kern::linear(xp, cz, n * r, cz, wp, bp, ld, t.f32(), ld);
        float* tp = t.f32();
        const float* mask = mask_rows + i0 * r;
        for (int64_t part = 0; part < 2; ++part) {  // a, then b
          float* proj = tp + 2 * part * nc;         // [n*r, nc] with ld 4*nc
          kern::sigmoid_inplace(proj + nc, ld, n * r, nc);
          kern::mul_inplace(proj, ld, proj + nc, ld, n * r, nc);
          kern::scale_rows(proj, ld, mask, n * r, nc);
          kern::transpose(proj, ld, (part ? B : A).f32() + i0 * r, rr, n * r, nc);
        }
      }
      if (shard16) {
        // P_c = L_c R_c^T over every shard's rows of R, with the bf16 values one process
        // multiplies: R's bf16 values move as f32 and are converted back (exactly).
        kern::bf16_to_f32((left_is_b ? A : B).data<uint16_t>(), S.f32(), nc * rr);
        gather->fn(S.f32(), nc * rr, G.f32());
        uint16_t* r16 = R16.data<uint16_t>();
        for (int64_t q = 0; q < parts; ++q)
          for (int64_t c = 0; c < nc; ++c)
            kern::f32_to_bf16(G.f32() + (q * nc + c) * rr, r16 + c * r * r + q * rr, rr);
        kern::gemm_batched_typed(DType::BF16, nc, false, true, rows, r, r, 1.f,
                                 (left_is_b ? B : A).data<uint16_t>(), r, rr, r16, r, r * r, 0.f,
                                 P.f32() + c0 * rr, r, rr);
      } else if (bf16) {
        // One shard: outgoing P_c = A_c B_c^T, incoming A_c^T B_c.
        kern::gemm_batched_typed(DType::BF16, nc, !outgoing, outgoing, r, r, r, 1.f,
                                 A.data<uint16_t>(), r, rr, B.data<uint16_t>(), r, rr, 0.f,
                                 P.f32() + c0 * rr, r, rr);
      } else if (gather == nullptr) {
        // outgoing: P_c = A_c B_c^T; incoming: P_c = A_c^T B_c.
        kern::gemm_batched(nc, !outgoing, outgoing, r, r, r, 1.f, A.f32(), r, rr, B.f32(), r, rr,
                           0.f, P.f32() + c0 * rr, r, rr);
      } else {
        // P_c[:, shard q's rows] = L_c R_{q,c}^T.
        const float* L = (left_is_b ? B : A).f32();
        gather->fn((left_is_b ? A : B).f32(), nc * rr, G.f32());
        for (int64_t q = 0; q < parts; ++q)
          kern::gemm_batched(nc, false, true, rows, rows, r, 1.f, L, r, rr, G.f32() + q * nc * rr,
                             r, rr, 0.f, P.f32() + c0 * rr + q * rows, r, rr);
      }
    }
  }
  const int64_t ch = tri_mul_output_chunk(ctx, rows);
  if (ctx.fused) {
    // LN_out, linear_z, the gate from LN_in(z) and the residual add per row block of pairs, with
    // GEMM inputs of ctx.dtype; chunks of ch rows bound the kernel's scratch.
    const Tensor wz_b = gemm_weights(w.lin_z.w, ctx.dtype);  // [c_z, c_t] bf16 (BF16 only)
    const Tensor wg_b = gemm_weights(w.lin_g.w, ctx.dtype);  // [c_z, c_z] bf16 (BF16 only)
    kern::GatedOutputArgs go = gated_output_dims(ch * r, ct, cz, ctx.dtype);
    Tensor scratch = Tensor::empty({kern::gated_output_scratch_floats(go, ctx.threads)});
    go.ldp = rr;
    go.gamma_p = w.ln_out.w.f32(), go.beta_p = w.ln_out.b.f32();
    go.Wp = w.lin_z.w.f32(), go.bp = bias_ptr(w.lin_z), go.Wp_bf16 = bf16_ptr(wz_b);
    go.gamma_z = w.ln_in.w.f32(), go.beta_z = w.ln_in.b.f32();
    go.Wg = w.lin_g.w.f32(), go.bg = bias_ptr(w.lin_g), go.Wg_bf16 = bf16_ptr(wg_b);
    go.eps = eps;
    for (int64_t i0 = 0; i0 < rows; i0 += ch) {
      go.rows = std::min(ch, rows - i0) * r;
      go.P = P.f32() + i0 * r, go.z = z + i0 * r * cz;
      kern::gated_output(go, scratch.f32(), ctx.threads);
    }
    return;
  }
  // Unfused reference path (f32).
  Tensor pc = Tensor::empty({ch * r, ct});  // p rows, channel-last
  Tensor x = Tensor::empty({ch * r, cz});   // LN_in(z) chunk
  Tensor y = Tensor::empty({ch * r, cz});
  Tensor g = Tensor::empty({ch * r, cz});
  for (int64_t i0 = 0; i0 < rows; i0 += ch) {
    const int64_t n = std::min(ch, rows - i0);
    float* pp = pc.f32();
    kern::transpose(P.f32() + i0 * r, rr, pp, ct, ct, n * r);
    kern::layernorm(pp, ct, pp, ct, n * r, ct, w.ln_out.w.f32(), w.ln_out.b.f32(), eps);
    kern::linear(pp, ct, n * r, ct, w.lin_z.w.f32(), bias_ptr(w.lin_z), cz, y.f32(), cz);
    float* zr = z + i0 * r * cz;
    kern::layernorm(zr, cz, x.f32(), cz, n * r, cz, w.ln_in.w.f32(), w.ln_in.b.f32(), eps);
    kern::linear(x.f32(), cz, n * r, cz, w.lin_g.w.f32(), bias_ptr(w.lin_g), cz, g.f32(), cz);
    kern::sigmoid_mul(y.f32(), cz, g.f32(), cz, n * r, cz);
    kern::add_inplace(zr, cz, y.f32(), cz, n * r, cz);
  }
}
}  // namespace

void triangle_multiplication(const TriangleMultiplicationW& w, const BlockContext& ctx,
                             bool outgoing, float* z) {
  // Channel-parallel: the training forward (no dropout outside training), which takes the hook;
  // in the bf16 forward under bf16 storage, which rounds where the fused bf16 forward does (LN_in,
  // A and B, LN_out(P) and the weights as GEMM inputs; P stays f32: tri_mul_products).
  if (ctx.channel_sum) {
    BlockContext c = ctx;
    if (bf16_fused(ctx)) c.store = DType::BF16;
    return triangle_multiplication_train(w, c, outgoing, z, nullptr);
  }
  tri_mul_impl(w, ctx, outgoing, false, ctx.r, ctx.pair_mask, nullptr, z);
}

void triangle_multiplication_shard(const TriangleMultiplicationW& w, const BlockContext& ctx,
                                   bool left_is_b, int64_t rows, const float* mask,
                                   const ShardGather& gather, float* z) {
  FC_CHECK(gather.parts >= 1 && rows * gather.parts == ctx.r);
  tri_mul_impl(w, ctx, true, left_is_b, rows, mask, &gather, z);
}

int64_t triangle_multiplication_shard_bytes(const BlockContext& ctx, int64_t rows, int parts) {
  const int64_t r = ctx.r, ct = ctx.cfg->c_hidden_mul, cz = ctx.cfg->c_z;
  const int64_t ch2 = tri_mul_output_chunk(ctx, rows);
  const int64_t phase1 = tri_mul_phase1(ctx, rows, parts).bytes;
  if (ctx.fused)  // output phase: the GEMM-input weights and kern::gated_output's scratch
    return ct * rows * r * kF +
           std::max(phase1, gemm_weights_bytes(cz * ct, ctx.dtype) +
                                gemm_weights_bytes(cz * cz, ctx.dtype) +
                                kern::gated_output_scratch_floats(
                                    gated_output_dims(ch2 * r, ct, cz, ctx.dtype), ctx.threads) *
                                    kF);
  // Unfused output phase: pc, LN_in(z), y and g chunks.
  return ct * rows * r * kF + std::max(phase1, ch2 * r * (ct + 3 * cz) * kF);
}

// ---- Training ----------------------------------------------------------------------------------
// Saved: the products P, c_t r^2 floats. Phase 1 (projections, A, B, products) runs by channel
// groups of A and B; phase 2 (LN_out, linear_z, the gate, the update) by pair rows i. The
// backward runs phase 2 backward by rows (giving dP), then phase 1 backward by groups.

// Bytes of one projection block of the training triangle multiplication (t and dt), at most.
constexpr int64_t kProjBlockBytes = 2 << 20;

namespace {
// Per channel of a group (backward): A, B, dA, dB over the rr pairs of the rows, and with shards
// every shard's gathered right operand and its gradient.
int64_t tri_mul_group_item_bytes(int64_t rr, int64_t parts) { return (4 + 2 * parts) * rr * kF; }
// Per pair row i of a group's projection block: T and its gradient (or the projection's scratch),
// 4 + 4 floats per channel and pair.
int64_t tri_mul_proj_row_bytes(int64_t r, int64_t group) { return r * 8 * group * kF; }
// Per row i (backward): p, LN_out(p), dp (3 c_t), y, gate, du, dy, dg (5 c_z).
int64_t tri_mul_output_row_bytes(int64_t r, int64_t ct, int64_t cz) {
  return r * (3 * ct + 5 * cz + 2) * kF;
}
}  // namespace

TriMulTrainChunks tri_mul_train_chunks(const BlockContext& ctx) {
  return tri_mul_train_chunks(ctx, ctx.r, 0);
}

TriMulTrainChunks tri_mul_train_chunks(const BlockContext& ctx, int64_t rows, int64_t parts) {
  const int64_t r = ctx.r, cz = ctx.cfg->c_z, ct = ctx.cfg->c_hidden_mul, rr = rows * r;
  TriMulTrainChunks c;
  c.group = pick_chunk(ctx, ct, tri_mul_group_item_bytes(rr, parts));
  // Automatic groups round to the nearest multiple of 16 channels once 8 or more fit (as the
  // inference path does): narrower groups run the projections, gates and their gradients on rows of
  // a few floats (perf, (128, 256), AF2 dims, 32 MiB target: groups of 10 -> 16 channels took 7 %
  // fewer cycles per step; the sigmoid kernels fell from 5.7 % of the cycles to under 1 %).
  constexpr int64_t kAlign = 16;
  if (ctx.chunk <= 0 && c.group < ct && c.group >= kAlign / 2)
    c.group = std::min(ct, (c.group + kAlign / 2) / kAlign * kAlign);
  // A group's projection block is swept by several elementwise passes after its GEMM, so it stays
  // cache-sized (kProjBlockBytes) whatever the target: (128, 256), AF2 dims, 1 thread, 32 MiB
  // target: blocks of 16 MiB made the module 1.5x slower than at 8 MiB.
  BlockContext pc = ctx;
  pc.chunk_target_bytes = std::min<int64_t>(ctx.chunk_target_bytes, kProjBlockBytes);
  c.proj_rows = pick_chunk(pc, rows, tri_mul_proj_row_bytes(r, c.group));
  c.rows = pick_chunk(ctx, rows, tri_mul_output_row_bytes(r, ct, cz));
  return c;
}

int64_t tri_mul_train_whole_bytes(const BlockContext& ctx) {
  const int64_t r = ctx.r, ct = ctx.cfg->c_hidden_mul, cz = ctx.cfg->c_z;
  return std::max({ct * tri_mul_group_item_bytes(r * r, 0), r * tri_mul_proj_row_bytes(r, ct),
                   r * tri_mul_output_row_bytes(r, ct, cz)});
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
  // bf16 training: W's bf16 rounding [4*group, c_z] (in a caller's buffer), the projections' GEMM
  // input; nullptr under F32.
  uint16_t* Wb = nullptr;
  void load(const TriangleMultiplicationW& w, int64_t ct, int64_t first, int64_t count) {
    const int64_t cz = w.ab.w.dim(1);
    c0 = first, nc = count;
    for (int64_t part = 0; part < 4; ++part) {
      std::memcpy(W.f32() + part * nc * cz, w.ab.w.f32() + (part * ct + c0) * cz,
                  static_cast<size_t>(nc * cz) * kF);
      std::memcpy(b.f32() + part * nc, w.ab.b.f32() + part * ct + c0, static_cast<size_t>(nc) * kF);
    }
    if (Wb) kern::f32_to_bf16(W.f32(), Wb, 4 * nc * cz);
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
// outputs, 134 vs 110 at 64; 40 vs 64-86 at 4). oneDNN's bf16 matmul runs W X^T faster at every
// width (1 thread, 4096 x 128 inputs: 1.0 vs 1.7 ms at 64 outputs with the transpose, 2.1 vs 4.1
// at 128; the same bits), so the bf16 form writes T directly and leaves Y unused.
// x16 (bf16 training, else nullptr): x rounded to bf16, with G.Wb the GEMM's inputs.
void tri_mul_group_project(const TriMulGroup& G, const float* x, const uint16_t* x16, int64_t n,
                           int64_t cz, float* Y, float* T) {
  const int64_t n4 = 4 * G.nc;
  if (x16) {
    for (int64_t o = 0; o < n4; ++o) std::fill(T + o * n, T + (o + 1) * n, G.b.f32()[o]);
    kern::gemm_typed(DType::BF16, false, true, n4, n, cz, 1.f, G.Wb, cz, x16, cz, 1.f, T, n);
    return;
  }
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
void tri_mul_group_ab(const TriMulGroup& G, const float* x_ln, const uint16_t* x16, int64_t rr,
                      int64_t cz, const float* mask, int64_t q, float* Y, float* T, float* A,
                      float* B) {
  const int64_t nc = G.nc;
  for (int64_t p0 = 0; p0 < rr; p0 += q) {
    const int64_t n = std::min(q, rr - p0);
    tri_mul_group_project(G, x_ln + p0 * cz, x16 ? x16 + p0 * cz : nullptr, n, cz, Y, T);
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
// x16, dT16 (bf16 training, else nullptr): x_ln rounded to bf16 and scratch [4*nc, q] for dT's
// rounding; the products with dT then take bf16 inputs.
void tri_mul_group_backward(const TriMulGroup& G, const float* x_ln, const uint16_t* x16,
                            int64_t rr, int64_t cz, const float* mask, int64_t q, const float* dA,
                            const float* dB, const float* ones, float* T, float* dT, uint16_t* dT16,
                            float* dxln, float* gW, float* gb) {
  const int64_t nc = G.nc, n4 = 4 * nc;
  for (int64_t p0 = 0; p0 < rr; p0 += q) {
    const int64_t n = std::min(q, rr - p0);
    // dT: scratch until filled below
    tri_mul_group_project(G, x_ln + p0 * cz, x16 ? x16 + p0 * cz : nullptr, n, cz, dT, T);
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
    if (x16) {
      const DType bf = DType::BF16;
      kern::f32_to_bf16(dT, dT16, n4 * n);
      kern::gemm_typed(bf, true, false, n, cz, n4, 1.f, dT16, n, G.Wb, cz, 1.f, dxln + p0 * cz, cz);
      kern::gemm_typed(bf, false, false, n4, cz, n, 1.f, dT16, n, x16 + p0 * cz, cz, 1.f, gW, cz);
    } else {
      kern::gemm(true, false, n, cz, n4, 1.f, dT, n, G.W.f32(), cz, 1.f, dxln + p0 * cz, cz);
      kern::gemm(false, false, n4, cz, n, 1.f, dT, n, x, cz, 1.f, gW, cz);
    }
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
  // bf16 training (one process, set_bf16): A | B | dP of the group rounded to bf16
  // ([3, group, rows, r]), grp.Wb [4*group, c_z] and dT16 [4*group, q] in one buffer, with x16
  // [rows*r, c_z] = LN_in(z) rounded to bf16 (the caller's); undefined / nullptr otherwise.
  Tensor AB16;
  const uint16_t* x16 = nullptr;
  uint16_t* dT16 = nullptr;
  void set_bf16(const uint16_t* x_ln16) {
    const int64_t cg = A.dim(0), rr = A.dim(1) * A.dim(2), cz = grp.W.dim(1);
    AB16 = Tensor::empty({bf16_elems(cg, rr, cz, q)}, DType::BF16);
    grp.Wb = AB16.data<uint16_t>() + 3 * cg * rr;
    dT16 = grp.Wb + 4 * cg * cz;
    x16 = x_ln16;
  }
  static int64_t bf16_elems(int64_t cg, int64_t rr, int64_t cz, int64_t q) {
    return 3 * cg * rr + 4 * cg * cz + 4 * cg * q;
  }
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
    tri_mul_group_ab(grp, x_ln, x16, rr, grp.W.dim(1), mask, q, dT.f32(), T.f32(), A.f32(),
                     B.f32());
  }
  // With dA, dB filled: ACCUMULATES into dx_ln [rr, c_z] and the fused gradient g.
  void backward(TriangleMultiplicationW* g, int64_t ct, const float* x_ln, int64_t rr,
                const float* mask, float* dxln) {
    const int64_t cz = grp.W.dim(1), nc = grp.nc;
    std::memset(gW.f32(), 0, static_cast<size_t>(4 * nc * cz) * kF);
    std::memset(gb.f32(), 0, static_cast<size_t>(4 * nc) * kF);
    tri_mul_group_backward(grp, x_ln, x16, rr, cz, mask, q, dA.f32(), dB.f32(), ones.f32(), T.f32(),
                           dT.f32(), dT16, dxln, gW.f32(), gb.f32());
    grp.add_grads(g, ct, gW.f32(), gb.f32());
  }
};

// bf16 GEMM inputs in the training step (BlockContext::store BF16; one process and the DAP row
// shard; the channel-parallel form runs F32).
bool bf16_train(const BlockContext& ctx) { return ctx.store == DType::BF16; }

// LN_in(z) [rr, c_z] rounded to bf16 under bf16 training (a tracked tensor), else undefined.
Tensor ln_in_bf16(const BlockContext& ctx, const Tensor& x_ln) {
  if (!bf16_train(ctx)) return Tensor();
  Tensor t = Tensor::empty(x_ln.shape(), DType::BF16);
  kern::f32_to_bf16(x_ln.f32(), t.data<uint16_t>(), x_ln.numel());
  return t;
}

// Dropout of the update u [n, r, c_z] of rows i0.. (global row0 + i0..): the mask [r, c_z]
// shared over the rows (one process, and the outgoing shard), or per row, row j scaled by
// mask[row0 + j] (the incoming shard of z^T; AF3's one draw per row of z).
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

// ---- Channel-parallel LN_out (ctx.channel_sum) --------------------------------------------------
// This rank holds ct = cfg.c_hidden_mul of the C = channel_sum->channels channels of P; LN_out
// normalises each pair over all C, so its statistics are sums over the ranks.

// Pairs per block of the channel-major passes below (a block's sums stay in cache).
constexpr int64_t kStatPairs = 1024;

// stats [2, rr] = mean | rstd over all C channels of each pair of P [ct, rr] (two summed passes:
// the sums, then the squared deviations from the mean).
void tri_mul_split_stats(const BlockContext& ctx, const float* P, int64_t rr, float* stats) {
  const ChannelSum& cs = *ctx.channel_sum;
  const int64_t ct = ctx.cfg->c_hidden_mul;
  const double inv = 1.0 / static_cast<double>(cs.channels);
  float* mean = stats;
  float* rstd = stats + rr;
  for (int pass = 0; pass < 2; ++pass) {
    float* acc = pass == 0 ? mean : rstd;
#pragma omp parallel for schedule(static)
    for (int64_t p0 = 0; p0 < rr; p0 += kStatPairs) {
      const int64_t n = std::min(kStatPairs, rr - p0);
      double sum[kStatPairs] = {};
      for (int64_t c = 0; c < ct; ++c) {
        const float* row = P + c * rr + p0;
        if (pass == 0)
          for (int64_t q = 0; q < n; ++q) sum[q] += row[q];
        else
          for (int64_t q = 0; q < n; ++q) {
            const double d = row[q] - static_cast<double>(mean[p0 + q]);
            sum[q] += d * d;
          }
      }
      for (int64_t q = 0; q < n; ++q) acc[p0 + q] = static_cast<float>(sum[q]);
    }
    cs.fn(acc, rr);
    if (pass == 0)
      for (int64_t q = 0; q < rr; ++q) mean[q] = static_cast<float>(mean[q] * inv);
  }
  const double eps = ctx.cfg->eps_ln;
  for (int64_t q = 0; q < rr; ++q)
    rstd[q] = static_cast<float>(1.0 / std::sqrt(rstd[q] * inv + eps));
}

// p [n, ct] (pairs pair0.. in rows) = LN_out(p) with the statistics stats [2, rr].
void tri_mul_split_normalize(float* p, int64_t n, int64_t ct, const float* stats, int64_t rr,
                             int64_t pair0, const LayerNormW& ln) {
  const float* g = ln.w.f32();
  const float* b = ln.b.f32();
#pragma omp parallel for schedule(static)
  for (int64_t q = 0; q < n; ++q) {
    const float mu = stats[pair0 + q], rs = stats[rr + pair0 + q];
    float* row = p + q * ct;
    for (int64_t c = 0; c < ct; ++c) row[c] = (row[c] - mu) * rs * g[c] + b[c];
  }
}

// First part of LN_out's backward on n pairs pair0..: from p [n, ct] (the products), dp [n, ct]
// = dL/d LN_out(p) (overwritten by dL/d x_hat = dp * gamma), ACCUMULATES this rank's gamma and
// beta gradients and writes the pairs' sums of dL/d x_hat and dL/d x_hat * x_hat into
// sums [2, rr] (summed over the ranks before tri_mul_split_ln_backward).
void tri_mul_split_ln_grads(const float* p, float* dp, int64_t n, int64_t ct, const float* stats,
                            int64_t rr, int64_t pair0, const LayerNormW& ln, LayerNormW* g,
                            float* sums) {
  const float* gamma = ln.w.f32();
  float* gw = g->w.f32();
  float* gb = g->b.f32();
  for (int64_t q = 0; q < n; ++q) {
    const float mu = stats[pair0 + q], rs = stats[rr + pair0 + q];
    const float* pr = p + q * ct;
    const float* dr = dp + q * ct;
    for (int64_t c = 0; c < ct; ++c) {
      gw[c] += dr[c] * (pr[c] - mu) * rs;
      gb[c] += dr[c];
    }
  }
#pragma omp parallel for schedule(static)
  for (int64_t q = 0; q < n; ++q) {
    const float mu = stats[pair0 + q], rs = stats[rr + pair0 + q];
    const float* pr = p + q * ct;
    float* dr = dp + q * ct;
    double s1 = 0, s2 = 0;
    for (int64_t c = 0; c < ct; ++c) {
      dr[c] *= gamma[c];
      s1 += dr[c];
      s2 += static_cast<double>(dr[c]) * (pr[c] - mu) * rs;
    }
    sums[pair0 + q] = static_cast<float>(s1);
    sums[rr + pair0 + q] = static_cast<float>(s2);
  }
}

// Second part: dP [ct, rr] (channel-major dL/d x_hat on entry) = dL/d P, with sums [2, rr]
// summed over the ranks: rstd * (dx_hat - mean_C(dx_hat) - x_hat * mean_C(dx_hat * x_hat)).
void tri_mul_split_ln_backward(const float* P, float* dP, int64_t ct, int64_t channels,
                               const float* stats, const float* sums, int64_t rr) {
  const float inv = 1.f / static_cast<float>(channels);
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < ct; ++c)
    for (int64_t q = 0; q < rr; ++q) {
      const float rs = stats[rr + q], xh = (P[c * rr + q] - stats[q]) * rs;
      float& d = dP[c * rr + q];
      d = rs * (d - sums[q] * inv - xh * sums[rr + q] * inv);
    }
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
  // Channel-parallel: LN_out's mean | rstd over every rank's channels.
  Tensor stats = ctx.channel_sum ? Tensor::empty({2, rr}) : Tensor();
  if (ctx.channel_sum) tri_mul_split_stats(ctx, P, rr, stats.f32());
  for (int64_t i0 = 0; i0 < rows; i0 += ch) {
    const int64_t n = std::min(ch, rows - i0);
    float* pp = p.f32();
    kern::transpose(P + i0 * r, rr, pp, ct, ct, n * r);
    if (ctx.channel_sum)
      tri_mul_split_normalize(pp, n * r, ct, stats.f32(), rr, i0 * r, w.ln_out);
    else
      kern::layernorm(pp, ct, pp, ct, n * r, ct, w.ln_out.w.f32(), w.ln_out.b.f32(), eps);
    train_linear(ctx, pp, ct, n * r, ct, w.lin_z.w.f32(), bias_ptr(w.lin_z), cz, y.f32(), cz);
    train_linear(ctx, x_ln + i0 * r * cz, cz, n * r, cz, w.lin_g.w.f32(), bias_ptr(w.lin_g), cz,
                 g.f32(), cz);
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
  // Channel-parallel: LN_out's statistics and the pairs' sums of its backward (src above).
  const ChannelSum* cs = ctx.channel_sum;
  Tensor stats = cs ? Tensor::empty({2, rr}) : Tensor();  // mean | rstd
  Tensor sums = cs ? Tensor::empty({2, rr}) : Tensor();   // sum dx_hat | sum dx_hat * x_hat
  if (cs) tri_mul_split_stats(ctx, P, rr, stats.f32());
  for (int64_t i0 = 0; i0 < rows; i0 += ch) {
    const int64_t n = std::min(ch, rows - i0), nr = n * r;
    const float* xr = x_ln + i0 * r * cz;
    kern::transpose(P + i0 * r, rr, p.f32(), ct, ct, nr);
    if (cs) {
      std::memcpy(p_ln.f32(), p.f32(), static_cast<size_t>(nr * ct) * kF);
      tri_mul_split_normalize(p_ln.f32(), nr, ct, stats.f32(), rr, i0 * r, w.ln_out);
    } else {
      kern::layernorm(p.f32(), ct, p_ln.f32(), ct, nr, ct, w.ln_out.w.f32(), w.ln_out.b.f32(), eps,
                      mean2.f32(), rstd2.f32());
    }
    train_linear(ctx, p_ln.f32(), ct, nr, ct, w.lin_z.w.f32(), bias_ptr(w.lin_z), cz, y.f32(), cz);
    train_linear(ctx, xr, cz, nr, cz, w.lin_g.w.f32(), bias_ptr(w.lin_g), cz, gt.f32(), cz);
    std::memcpy(du.f32(), dz + i0 * r * cz, static_cast<size_t>(nr * cz) * kF);
    tri_mul_dropout(du.f32(), n, r, cz, dmask, per_row, row0 + i0);
    kern::sigmoid_mul_backward(y.f32(), cz, gt.f32(), cz, du.f32(), cz, dy.f32(), cz, dg.f32(), cz,
                               nr, cz);
    train_linear_backward(ctx, xr, cz, nr, cz, w.lin_g.w.f32(), cz, dg.f32(), cz,
                          dxln + i0 * r * cz, cz, g->lin_g.w.f32(), bias_ptr(g->lin_g));
    train_linear_backward(ctx, p_ln.f32(), ct, nr, ct, w.lin_z.w.f32(), cz, dy.f32(), cz, dp.f32(),
                          ct, g->lin_z.w.f32(), bias_ptr(g->lin_z));
    if (cs)
      tri_mul_split_ln_grads(p.f32(), dp.f32(), nr, ct, stats.f32(), rr, i0 * r, w.ln_out,
                             &g->ln_out, sums.f32());
    else
      kern::layernorm_backward(p.f32(), ct, dp.f32(), ct, nr, ct, w.ln_out.w.f32(), mean2.f32(),
                               rstd2.f32(), dp.f32(), ct, g->ln_out.w.f32(), g->ln_out.b.f32(),
                               scratch.f32());
    kern::transpose(dp.f32(), ct, dP + i0 * r, rr, nr, ct);
  }
  if (!cs) return;
  cs->fn(sums.f32(), 2 * rr);
  tri_mul_split_ln_backward(P, dP, ct, cs->channels, stats.f32(), sums.f32(), rr);
}

// Phase 1: the triangle products P [c_t, r, r] from x_ln = LN_in(z) [r*r, c_z], channel group by
// channel group (outgoing: P_c = A_c B_c^T; incoming: P_c = A_c^T B_c).
// x16: x_ln rounded to bf16 under bf16 training (the projections' GEMM input), else nullptr.
Tensor tri_mul_products(const TriangleMultiplicationW& w, const BlockContext& ctx, bool outgoing,
                        const float* x_ln, const uint16_t* x16) {
  const int64_t r = ctx.r, rr = r * r, cz = ctx.cfg->c_z, ct = ctx.cfg->c_hidden_mul;
  const TriMulTrainChunks chunks = tri_mul_train_chunks(ctx);
  const int64_t cg = chunks.group, q = chunks.proj_rows * r;
  Tensor P = Tensor::empty({ct, r, r});
  TriMulGroup G{0, 0, Tensor::empty({4 * cg, cz}), Tensor::empty({4 * cg})};
  Tensor T = Tensor::empty({4 * cg, q});  // projections of a block of pairs, channel-major
  Tensor Y = Tensor::empty({q, 4 * cg});  // scratch of the projection
  Tensor A = Tensor::empty({cg, r, r});   // a of the group, channel-major
  Tensor B = Tensor::empty({cg, r, r});
  // bf16 training: A | B rounded to bf16, the products' inputs ([2, cg, r, r]), and G.Wb
  // [4*cg, c_z]
  Tensor AB16 = x16 ? Tensor::empty({2 * cg * rr + 4 * cg * cz}, DType::BF16) : Tensor();
  if (x16) G.Wb = AB16.data<uint16_t>() + 2 * cg * rr;
  for (int64_t c0 = 0; c0 < ct; c0 += cg) {
    G.load(w, ct, c0, std::min(cg, ct - c0));
    tri_mul_group_ab(G, x_ln, x16, rr, cz, ctx.pair_mask, q, Y.f32(), T.f32(), A.f32(), B.f32());
    if (!AB16.defined()) {
      kern::gemm_batched(G.nc, !outgoing, outgoing, r, r, r, 1.f, A.f32(), r, rr, B.f32(), r, rr,
                         0.f, P.f32() + c0 * rr, r, rr);
      continue;
    }
    uint16_t* a16 = AB16.data<uint16_t>();  // [nc, r, r]
    uint16_t* b16 = a16 + cg * rr;          // [nc, r, r]
    kern::f32_to_bf16(A.f32(), a16, G.nc * rr);
    kern::f32_to_bf16(B.f32(), b16, G.nc * rr);
    kern::gemm_batched_typed(DType::BF16, G.nc, !outgoing, outgoing, r, r, r, 1.f, a16, r, rr, b16,
                             r, rr, 0.f, P.f32() + c0 * rr, r, rr);
  }
  // Kept for the backward in training (bf16 values under bf16 storage); the bf16 forward of a
  // channel-parallel layer (bf16_fused) gives LN_out the f32 products, as kern::gated_output does.
  if (!bf16_fused(ctx)) round_for_store(ctx, P);
  return P;
}

// dA, dB of the group's nc channels from dPg [nc, r, r] with bf16 inputs (gb.AB16 defined):
// outgoing P_c = A_c B_c^T: dA_c = dP_c B_c, dB_c = dP_c^T A_c; incoming P_c = A_c^T B_c:
// dA_c = B_c dP_c^T, dB_c = A_c dP_c.
void products_backward_bf16(TriMulGroupBackward& gb, bool outgoing, int64_t nc, int64_t r,
                            const float* dPg) {
  const int64_t rr = r * r, cg = gb.A.dim(0);
  uint16_t* a16 = gb.AB16.data<uint16_t>();  // [nc, r, r]
  uint16_t* b16 = a16 + cg * rr;
  uint16_t* d16 = b16 + cg * rr;
  kern::f32_to_bf16(gb.A.f32(), a16, nc * rr);
  kern::f32_to_bf16(gb.B.f32(), b16, nc * rr);
  kern::f32_to_bf16(dPg, d16, nc * rr);
  float* dA = gb.dA.f32();
  float* dB = gb.dB.f32();
  const DType bf = DType::BF16;
  if (outgoing) {
    kern::gemm_batched_typed(bf, nc, false, false, r, r, r, 1.f, d16, r, rr, b16, r, rr, 0.f, dA, r,
                             rr);
    kern::gemm_batched_typed(bf, nc, true, false, r, r, r, 1.f, d16, r, rr, a16, r, rr, 0.f, dB, r,
                             rr);
  } else {
    kern::gemm_batched_typed(bf, nc, false, true, r, r, r, 1.f, b16, r, rr, d16, r, rr, 0.f, dA, r,
                             rr);
    kern::gemm_batched_typed(bf, nc, false, false, r, r, r, 1.f, a16, r, rr, d16, r, rr, 0.f, dB, r,
                             rr);
  }
}

}  // namespace

void triangle_multiplication_train(const TriangleMultiplicationW& w, const BlockContext& ctx,
                                   bool outgoing, float* z, TriangleMultiplicationState* st) {
  const EvoformerConfig& cfg = *ctx.cfg;
  const int64_t r = ctx.r, cz = cfg.c_z, rr = r * r;
  const float eps = cfg.eps_ln;
  Tensor x_ln = Tensor::empty({rr, cz});  // LN_in(z)
  kern::layernorm(z, cz, x_ln.f32(), cz, rr, cz, w.ln_in.w.f32(), w.ln_in.b.f32(), eps);
  const Tensor x16 = ln_in_bf16(ctx, x_ln);  // [rr, c_z] bf16 (bf16 training only)
  Tensor P = tri_mul_products(w, ctx, outgoing, x_ln.f32(), bf16_ptr(x16));
  tri_mul_output(w, ctx, P.f32(), x_ln.f32(), r, tri_mul_train_chunks(ctx).rows,
                 dropout_mask(ctx, outgoing ? "tri_mul_out" : "tri_mul_in", r, cz),
                 dropout_per_item(ctx, outgoing ? "tri_mul_out" : "tri_mul_in"), 0, z);
  if (st) st->P = to_store(ctx, std::move(P));
}

void triangle_multiplication_backward(const TriangleMultiplicationW& w, TriangleMultiplicationW* g,
                                      const BlockContext& ctx, bool outgoing, const float* z_in,
                                      TriangleMultiplicationState* st, float* dz) {
  const EvoformerConfig& cfg = *ctx.cfg;
  const int64_t r = ctx.r, cz = cfg.c_z, ct = cfg.c_hidden_mul, rr = r * r;
  const float eps = cfg.eps_ln;
  const TriMulTrainChunks chunks = tri_mul_train_chunks(ctx);
  NormedRows ln = layernorm_with_stats(z_in, rr, cz, w.ln_in, eps);  // LN_in(z_in)
  Tensor x16 = ln_in_bf16(ctx, ln.y);  // [rr, c_z] bf16 (bf16 training only)
  Tensor P = st->P.defined() ? from_store(std::move(st->P))
                             : tri_mul_products(w, ctx, outgoing, ln.y.f32(), bf16_ptr(x16));
  st->P = Tensor();
  Tensor dxln = Tensor::empty({rr, cz});  // dL/d LN_in(z), both branches
  Tensor dP = Tensor::empty({ct, r, r});  // dL/d triangle products, channel-major
  // Phase 2 backward, by rows i: dP and the gate branch's part of dxln (the dL/d out rows of dz
  // are read before the LN_in backward at the end accumulates into them).
  tri_mul_output_backward(w, g, ctx, P.f32(), ln.y.f32(), r, chunks.rows,
                          dropout_mask(ctx, outgoing ? "tri_mul_out" : "tri_mul_in", r, cz),
                          dropout_per_item(ctx, outgoing ? "tri_mul_out" : "tri_mul_in"), 0, dz,
                          dP.f32(), dxln.f32());
  P = Tensor();
  {
    // Phase 1 backward, by channel groups: rebuild the group's A and B, then dA, dB, and
    // (by blocks of pairs) d(projections), accumulating into dxln and the parameter gradients.
    const int64_t cg = chunks.group;
    TriMulGroupBackward gb(cg, cz, chunks.proj_rows * r, r, r);
    if (x16.defined()) gb.set_bf16(bf16_ptr(x16));
    for (int64_t c0 = 0; c0 < ct; c0 += cg) {
      const int64_t nc = std::min(cg, ct - c0);
      gb.rebuild(w, ct, c0, nc, ln.y.f32(), rr, ctx.pair_mask);
      const float* A = gb.A.f32();
      const float* B = gb.B.f32();
      float* dA = gb.dA.f32();
      float* dB = gb.dB.f32();
      const float* dPg = dP.f32() + c0 * rr;
      if (gb.AB16.defined()) {
        products_backward_bf16(gb, outgoing, nc, r, dPg);
      } else if (outgoing) {  // P_c = A_c B_c^T: dA_c = dP_c B_c, dB_c = dP_c^T A_c
        kern::gemm_batched(nc, false, false, r, r, r, 1.f, dPg, r, rr, B, r, rr, 0.f, dA, r, rr);
        kern::gemm_batched(nc, true, false, r, r, r, 1.f, dPg, r, rr, A, r, rr, 0.f, dB, r, rr);
      } else {  // P_c = A_c^T B_c: dA_c = B_c dP_c^T, dB_c = A_c dP_c
        kern::gemm_batched(nc, false, true, r, r, r, 1.f, B, r, rr, dPg, r, rr, 0.f, dA, r, rr);
        kern::gemm_batched(nc, false, false, r, r, r, 1.f, A, r, rr, dPg, r, rr, 0.f, dB, r, rr);
      }
      gb.backward(g, ct, ln.y.f32(), rr, ctx.pair_mask, dxln.f32());
    }
  }
  dP = Tensor();
  ln.y = Tensor();
  x16 = Tensor();
  layernorm_backward_into(z_in, dxln.f32(), rr, cz, w.ln_in, ln.mean.f32(), ln.rstd.f32(), dz,
                          &g->ln_in, true);
}

// ---- Triangle multiplication on a row shard (DAP) ----------------------------------------------

namespace {
// Whether the shard's update rows take one mask row each (tri_mul_dropout's per_row). The mask is
// indexed by rows of z in both cases: an AF2 mask (shared over the rows of z, indexed by column j)
// applies per row of z^T; an AF3 mask (one draw per row i of z) per row of z, and on z^T (the
// incoming shard) it is shared over the rows, indexed by the column of z^T.
bool shard_dropout_per_row(const BlockContext& ctx, const char* module, bool left_is_b) {
  return dropout_per_item(ctx, module) != left_is_b;
}

// P [c_t, rows, r] of the shard: per group, P_c[:, shard q's rows] = L_c R_{q,c}^T.
// x16: x_ln rounded to bf16 under bf16 training (the projections' and, with L and R rounded,
// the products' inputs; P rounded to bf16 values as one process), else nullptr.
Tensor tri_mul_shard_products(const TriangleMultiplicationW& w, const BlockContext& ctx,
                              bool left_is_b, int64_t rows, const float* mask,
                              const ShardGather& gather, const float* x_ln, const uint16_t* x16) {
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
  // bf16 training: L | every shard's R rounded to bf16 ([(1 + parts) * cg, rows, r]), the
  // products' inputs, and grp.Wb [4*cg, c_z]
  Tensor LG16 = x16 ? Tensor::empty({(1 + parts) * cg * rr + 4 * cg * cz}, DType::BF16) : Tensor();
  if (x16) grp.Wb = LG16.data<uint16_t>() + (1 + parts) * cg * rr;
  for (int64_t c0 = 0; c0 < ct; c0 += cg) {
    grp.load(w, ct, c0, std::min(cg, ct - c0));
    const int64_t nc = grp.nc;
    tri_mul_group_ab(grp, x_ln, x16, rr, cz, mask, q, Y.f32(), T.f32(), A.f32(), B.f32());
    const float* L = (left_is_b ? B : A).f32();
    gather.fn((left_is_b ? A : B).f32(), nc * rr, G.f32());
    if (!x16) {
      for (int64_t k = 0; k < parts; ++k)
        kern::gemm_batched(nc, false, true, rows, rows, r, 1.f, L, r, rr, G.f32() + k * nc * rr, r,
                           rr, 0.f, P.f32() + c0 * rr + k * rows, r, rr);
      continue;
    }
    uint16_t* l16 = LG16.data<uint16_t>();  // [nc, rows, r]
    uint16_t* g16 = l16 + cg * rr;          // [parts * nc, rows, r]
    kern::f32_to_bf16(L, l16, nc * rr);
    kern::f32_to_bf16(G.f32(), g16, parts * nc * rr);
    for (int64_t k = 0; k < parts; ++k)
      kern::gemm_batched_typed(DType::BF16, nc, false, true, rows, rows, r, 1.f, l16, r, rr,
                               g16 + k * nc * rr, r, rr, 0.f, P.f32() + c0 * rr + k * rows, r, rr);
  }
  round_for_store(ctx, P);
  return P;
}

// The shard's dL = sum_k dP_k R_k and dR_k = dP_k^T L (dG [parts*nc, rows, r]) with bf16 inputs:
// L [nc, rows, r], every shard's R in G [parts*nc, rows, r] and the group's dP [nc, rows, r] are
// rounded into gb's buffers (A and dP slots) and G16.
void shard_products_backward_bf16(TriMulGroupBackward& gb, const float* L, const float* G,
                                  const float* dPg, int64_t nc, int64_t rows, int64_t r,
                                  int64_t parts, Tensor& G16, float* dL, float* dG) {
  const int64_t rr = rows * r, cg = gb.A.dim(0);
  uint16_t* l16 = gb.AB16.data<uint16_t>();  // [nc, rows, r]
  uint16_t* d16 = l16 + 2 * cg * rr;         // [nc, rows, r]
  uint16_t* g16 = G16.data<uint16_t>();      // [parts * nc, rows, r]
  kern::f32_to_bf16(L, l16, nc * rr);
  kern::f32_to_bf16(G, g16, parts * nc * rr);
  kern::f32_to_bf16(dPg, d16, nc * rr);
  const DType bf = DType::BF16;
  for (int64_t k = 0; k < parts; ++k) {
    kern::gemm_batched_typed(bf, nc, false, false, rows, r, rows, 1.f, d16 + k * rows, r, rr,
                             g16 + k * nc * rr, r, rr, k == 0 ? 0.f : 1.f, dL, r, rr);
    kern::gemm_batched_typed(bf, nc, true, false, rows, r, rows, 1.f, d16 + k * rows, r, rr, l16, r,
                             rr, 0.f, dG + k * nc * rr, r, rr);
  }
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
  const Tensor x16 = ln_in_bf16(ctx, x_ln);  // [rr, c_z] bf16 (bf16 training only)
  Tensor P = tri_mul_shard_products(w, ctx, left_is_b, rows, mask, gather, x_ln.f32(),
                                    bf16_ptr(x16));  // [c_t, rows, r]
  const char* name = left_is_b ? "tri_mul_in" : "tri_mul_out";
  tri_mul_output(w, ctx, P.f32(), x_ln.f32(), rows,
                 tri_mul_train_chunks(ctx, rows, gather.parts).rows, dropout_mask(ctx, name, r, cz),
                 shard_dropout_per_row(ctx, name, left_is_b), row0, z);
  if (st) st->P = to_store(ctx, std::move(P));
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
  NormedRows ln = layernorm_with_stats(z_in, rr, cz, w.ln_in, eps);  // LN_in(z_in) of the shard
  Tensor x16 = ln_in_bf16(ctx, ln.y);  // [rr, c_z] bf16 (bf16 training only)
  Tensor P = st->P.defined() ? from_store(std::move(st->P))
                             : tri_mul_shard_products(w, ctx, left_is_b, rows, mask, gather,
                                                      ln.y.f32(), bf16_ptr(x16));
  st->P = Tensor();
  Tensor dxln = Tensor::empty({rr, cz});     // dL/d LN_in(z), both branches
  Tensor dP = Tensor::empty({ct, rows, r});  // dL/d triangle products, channel-major
  const char* name = left_is_b ? "tri_mul_in" : "tri_mul_out";
  tri_mul_output_backward(
      w, g, ctx, P.f32(), ln.y.f32(), rows, chunks.rows, dropout_mask(ctx, name, r, cz),
      shard_dropout_per_row(ctx, name, left_is_b), row0, dz, dP.f32(), dxln.f32());
  P = Tensor();
  {
    // Phase 1 backward by channel groups: rebuild the group's A, B and every shard's R;
    // dL = sum_k dP_k R_k, dR_k = dP_k^T L (reduce-scattered to shard k); then as one process.
    const int64_t cg = chunks.group;
    TriMulGroupBackward gb(cg, cz, chunks.proj_rows * r, rows, r);
    Tensor G = Tensor::empty({parts * cg, rows, r});   // every shard's R, shard-major
    Tensor dG = Tensor::empty({parts * cg, rows, r});  // this shard's part of every dR_k
    // bf16 training: gb's bf16 buffers (its A slot holds L, its dP slot dP) and every shard's R
    // rounded to bf16 [parts * cg, rows, r]
    Tensor G16 = x16.defined() ? Tensor::empty({parts * cg * rr}, DType::BF16) : Tensor();
    if (x16.defined()) gb.set_bf16(bf16_ptr(x16));
    for (int64_t c0 = 0; c0 < ct; c0 += cg) {
      const int64_t nc = std::min(cg, ct - c0);
      gb.rebuild(w, ct, c0, nc, ln.y.f32(), rr, mask);
      const float* L = (left_is_b ? gb.B : gb.A).f32();
      float* dL = (left_is_b ? gb.dB : gb.dA).f32();
      float* dR = (left_is_b ? gb.dA : gb.dB).f32();
      gather.fn((left_is_b ? gb.A : gb.B).f32(), nc * rr, G.f32());
      const float* dPg = dP.f32() + c0 * rr;
      if (G16.defined()) {
        shard_products_backward_bf16(gb, L, G.f32(), dPg, nc, rows, r, parts, G16, dL, dG.f32());
        reduce.fn(dG.f32(), nc * rr, dR);
        gb.backward(g, ct, ln.y.f32(), rr, mask, dxln.f32());
        continue;
      }
      for (int64_t k = 0; k < parts; ++k) {
        kern::gemm_batched(nc, false, false, rows, r, rows, 1.f, dPg + k * rows, r, rr,
                           G.f32() + k * nc * rr, r, rr, k == 0 ? 0.f : 1.f, dL, r, rr);
        kern::gemm_batched(nc, true, false, rows, r, rows, 1.f, dPg + k * rows, r, rr, L, r, rr,
                           0.f, dG.f32() + k * nc * rr, r, rr);
      }
      reduce.fn(dG.f32(), nc * rr, dR);
      gb.backward(g, ct, ln.y.f32(), rr, mask, dxln.f32());
    }
  }
  dP = Tensor();
  ln.y = Tensor();
  x16 = Tensor();
  layernorm_backward_into(z_in, dxln.f32(), rr, cz, w.ln_in, ln.mean.f32(), ln.rstd.f32(), dz,
                          &g->ln_in, true);
}

// ---- Models ------------------------------------------------------------------------------------

// Inference, as tri_mul_impl runs it (tri_mul_phase1): per channel group of cg channels, the
// input projections [ch*r, c_z] x [c_z, 4 cg] row chunk by row chunk (a narrow product when the
// channels are grouped), LN_in(z) once when kept or one group, else again per group; the batched
// products; the output side by row chunks of c2.
LayerWork trimul_work(const EvoformerConfig& cfg, int64_t r, const WorkChunks& ch) {
  const int64_t cz = cfg.c_z, ct = cfg.c_hidden_mul;
  const double rr = static_cast<double>(r) * r;
  const TriMulPhase1 ph = tri_mul_phase1(*ch.ctx, r, 1);
  const int64_t groups = div_ceil(ct, ph.cg);
  const int64_t c2 = tri_mul_output_chunk(*ch.ctx, r);
  LayerWork w;
  w.chunks += groups * div_ceil(r, ph.ch) + div_ceil(r, c2);
  const double proj = 2 * rr * cz * 4 * ct;
  if (groups == 1)
    w.gemm.push_back({proj, static_cast<double>(ph.ch * r)});
  else
    w.gemm_narrow.push_back({proj, static_cast<double>(ph.ch * r), static_cast<double>(4 * ph.cg)});
  w.batched += 2 * rr * r * ct;
  w.gemm.push_back({2 * rr * ct * cz, static_cast<double>(c2 * r)});
  w.gemm.push_back({2 * rr * cz * cz, static_cast<double>(c2 * r)});
  // LayerNorm in (for the projections: once, or per group; for the gate: once), gating of the
  // projections (sigmoid, mul, mask), A/B and P transposes, LayerNorm out, sigmoid-mul, residual.
  const double ln_in_passes = ph.keep_ln || groups == 1 ? 1.0 : static_cast<double>(groups);
  w.mem += 2 * rr * cz * (ln_in_passes + 1) + 2 * rr * ct * (2 + 3 + 2 + 2) + 2 * rr * ct * 2 +
           6 * rr * cz;
  // Over whole buffers (z, and P [c_t, r, r] channel-major): the LN_in(z) passes (fused: the
  // kernel normalises the rows of z per group) and the gate's, the transpose of P's channels into
  // rows, the residual add into z.
  const double whole = 2 * rr * cz * (ln_in_passes + 1) + 2 * rr * ct + 3 * rr * cz;
  w.mem -= whole;
  w.mem_stream += whole;
  w.ws_stream = rr * std::max(cz, ct) * sizeof(float);
  return w;
}

// Training: per channel group, the input projections [4 group, c_z] x
// [c_z, q pairs] block by block (q = proj_rows * r), channel-major gating into A, B, the
// batched products; the output side by row chunks. Each group sweeps LN_in(z) [r^2, c_z] once in
// the forward; in the backward three times (A, B rebuilt; projections re-run; dW) plus a
// read-modify-write of dL/d LN_in(z).
// rb: LN_in(z) and the products P (projections, gating, batched products), not the output side.
LayerWork trimul_train_work(const EvoformerConfig& cfg, int64_t r, const BlockContext& ctx,
                            LayerWork* rb) {
  const int64_t cz = cfg.c_z, ct = cfg.c_hidden_mul;
  const double rr = static_cast<double>(r) * r;
  const TriMulTrainChunks tm = tri_mul_train_chunks(ctx);
  const int64_t groups = div_ceil(ct, tm.group), q = tm.proj_rows * r;
  const double proj = 2 * rr * cz * 4 * ct;
  LayerWork w;
  w.chunks += groups * div_ceil(r, tm.proj_rows) + div_ceil(r, tm.rows);
  w.gemm_narrow.push_back({proj, static_cast<double>(q), static_cast<double>(4 * tm.group)});
  w.batched += 2 * rr * r * ct;
  w.gemm.push_back({2 * rr * ct * cz, static_cast<double>(tm.rows * r)});
  w.gemm.push_back({2 * rr * cz * cz, static_cast<double>(tm.rows * r)});
  // LayerNorm in, gating (per part: sigmoid 2, copy 2, two multiplies 3 + 2), P transposed into
  // rows, LayerNorm out, sigmoid-mul, residual add.
  w.mem += 2 * rr * cz + 2 * rr * ct * 9 + 2 * rr * ct * 2 + 6 * rr * cz;
  w.stream += groups * rr * cz;
  // The backward rebuilds LN_in(z), the projections twice (A, B; then pre-activation), the
  // gating of A, B, and LN_out.
  w.re_gemm_narrow.push_back({2 * proj, static_cast<double>(q), static_cast<double>(4 * tm.group)});
  w.re_mem += 2 * rr * cz + 2 * rr * ct * 9 + 2 * rr * ct;
  w.bwd_stream += 5 * groups * rr * cz;
  if (rb) {
    *rb = LayerWork{};
    rb->chunks = groups * div_ceil(r, tm.proj_rows);
    rb->gemm_narrow = w.gemm_narrow;
    rb->batched = w.batched;
    rb->mem = 2 * rr * cz + 2 * rr * ct * 9;
    rb->stream = w.stream;
  }
  return w;
}

namespace {
// Weights of one channel group of the triangle multiplication (gathered W, b).
int64_t tri_mul_group_w(const BlockContext& ctx, int64_t cg) {
  return 4 * cg * ctx.cfg->c_z + 4 * cg;
}

// The products of the training forward: P [c_t, r, r] stays; the group's weights, a block of its
// projections, A and B are transient.
void replay_products(AllocReplay& S, const BlockContext& ctx) {
  const int64_t r = ctx.r, rr = r * r, ct = ctx.cfg->c_hidden_mul;
  const TriMulTrainChunks c = tri_mul_train_chunks(ctx);
  const int64_t tmp = tri_mul_group_w(ctx, c.group) + 2 * c.proj_rows * r * 4 * c.group +
                      2 * c.group * rr;  // G.W, G.b, T, Y, A, B
  const int64_t ab16 = ctx.store == DType::BF16 ? 2 * c.group * rr + 4 * c.group * ctx.cfg->c_z
                                                : 0;  // A16, B16, G.Wb
  S.alloc(ct * rr);
  S.alloc(tmp);
  S.alloc_bf16(ab16);
  S.free(tmp);
  S.free_bf16(ab16);
}
// linear_z and linear_g of phase 2 per row chunk (their bf16 buffers; nothing under F32), with
// their backward when `backward`.
void replay_output_linears(AllocReplay& S, const BlockContext& ctx, bool backward) {
  const int64_t r = ctx.r, cz = ctx.cfg->c_z, ct = ctx.cfg->c_hidden_mul;
  const int64_t ch = tri_mul_train_chunks(ctx).rows;
  for (int64_t i0 = 0; i0 < r; i0 += ch) {
    const int64_t nr = std::min(ch, r - i0) * r;
    train_linear_replay(S, ctx, nr, ct, cz);
    train_linear_replay(S, ctx, nr, cz, cz);
    if (!backward) continue;
    train_linear_backward_replay(S, ctx, nr, cz, cz);
    train_linear_backward_replay(S, ctx, nr, ct, cz);
  }
}
}  // namespace

void tri_mul_train_replay(AllocReplay& S, const BlockContext& ctx, bool keep) {
  const int64_t r = ctx.r, rr = r * r, cz = ctx.cfg->c_z, ct = ctx.cfg->c_hidden_mul;
  const int64_t rows = tri_mul_train_chunks(ctx).rows * r;
  S.alloc(rr * cz);  // x_ln
  const int64_t x16 = ctx.store == DType::BF16 ? rr * cz : 0;
  S.alloc_bf16(x16);
  replay_products(S, ctx);
  S.alloc(rows * (ct + 2 * cz));  // p, y, g
  replay_output_linears(S, ctx, false);
  S.free(rows * (ct + 2 * cz));
  if (keep) to_store_replay(S, ctx, ct * rr);  // P
  S.free(rr * cz);
  S.free_bf16(x16);
  if (!keep) S.free(ct * rr);
}

void tri_mul_backward_replay(AllocReplay& S, const BlockContext& ctx, bool kept) {
  const int64_t r = ctx.r, rr = r * r, cz = ctx.cfg->c_z, ct = ctx.cfg->c_hidden_mul;
  const TriMulTrainChunks chunks = tri_mul_train_chunks(ctx);
  const int64_t rows = chunks.rows * r;
  S.alloc(rr * cz + 2 * rr);  // x_ln, mean, rstd
  const int64_t x16 = ctx.store == DType::BF16 ? rr * cz : 0;
  S.alloc_bf16(x16);
  if (!kept) replay_products(S, ctx);
  if (kept) from_store_replay(S, ctx, ct * rr);  // P
  S.alloc(rr * cz + ct * rr);                    // dxln, dP
  const int64_t phase2 = rows * (3 * ct + 2 + 5 * cz) + ln_scratch(rows, ct);
  S.alloc(phase2);
  replay_output_linears(S, ctx, true);
  S.free(phase2);
  S.free(ct * rr);  // P
  const int64_t cg = chunks.group;
  const int64_t q = chunks.proj_rows * r;
  const int64_t phase1 = 2 * tri_mul_group_w(ctx, cg) + 2 * q * 4 * cg + q +
                         4 * cg * rr;  // G.W, G.b, gW, gb, T, dT, ones, A, B, dA, dB
  S.alloc(phase1);
  const int64_t ab16 = x16 ? TriMulGroupBackward::bf16_elems(cg, rr, cz, q) : 0;
  S.alloc_bf16(ab16);
  S.free(phase1);
  S.free_bf16(ab16);
  S.free(ct * rr + rr * cz);  // dP, x_ln
  S.free_bf16(x16);
  S.alloc(ln_scratch(rr, cz));
  S.free(ln_scratch(rr, cz));
  S.free(rr * cz + 2 * rr);  // dxln, mean, rstd
}

}  // namespace fc
