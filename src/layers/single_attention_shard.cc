#include "layers/single_attention_shard.h"

#include <algorithm>
#include <cmath>

#include "kernels/backward.h"
#include "kernels/kernels.h"
#include "kernels/typed.h"
#include "layers/layer_util.h"

namespace fc {

namespace {
// What the forward computes and the backward rebuilds.
struct SingleAttentionFwd {
  Tensor mean, rstd;  // [rows] LN(s) statistics
  Tensor x;           // [rows, c] LN(s) of the shard
  Tensor X;           // [r, c] LN(s) of every token
  Tensor qg;          // [rows, 2HC] q | g (pre-sigmoid) of the shard's tokens
  Tensor kv;          // [r, 2HC] k | v of every token
  Tensor bias;        // [H, rows, r] pair bias of the shard's query rows
  Tensor og;          // [rows, HC] gated attention output
  Tensor lse;         // [H, rows] log-sum-exp per query
};

kern::AttentionArgs args(const SingleAttentionFwd& f, int64_t H, int64_t C, int64_t rows, int64_t r,
                         const float* key_bias, DType dtype = DType::F32) {
  const int64_t hc = H * C;
  kern::AttentionArgs a;
  a.dtype = dtype;
  a.B = 1, a.Lq = rows, a.Lk = r, a.H = H, a.C = C;
  a.scale = 1.f / std::sqrt(static_cast<float>(C));
  a.q = f.qg.f32(), a.q_bs = rows * 2 * hc, a.q_rs = 2 * hc;
  a.gate = f.qg.f32() + hc, a.g_bs = rows * 2 * hc, a.g_rs = 2 * hc;
  a.k = f.kv.f32(), a.k_bs = r * 2 * hc, a.k_rs = 2 * hc;
  a.v = f.kv.f32() + hc, a.v_bs = r * 2 * hc, a.v_rs = 2 * hc;
  a.o = f.og.f32(), a.o_bs = rows * hc, a.o_rs = hc;
  a.mask_bias = key_bias;
  a.pair_bias = f.bias.f32();
  a.lse = f.lse.f32();
  return a;
}

// Everything up to the gated attention output og (s, z: the layer's input shards). In bf16
// (inference, bf16_fused) LN(s) and the weights are rounded to bf16 for the projections
// (f32 accumulation), and the attention's products take bf16 inputs, as the one-process fused
// layer; the gather moves the f32 LN(s) (rounding is elementwise: the same values). Under bf16
// storage (training, ctx.store) as the one-process training layer (gated_attention.cc): LN(s)
// rounded to bf16 values before the gather, the projections through train_linear, q | g and
// k | v rounded to bf16 values, bf16 attention products.
SingleAttentionFwd forward_state(const MsaRowAttentionW& w, const BlockContext& ctx, int64_t H,
                                 int64_t C, const float* s, int64_t rows, const float* z,
                                 const float* key_bias, const ShardGather& gather,
                                 bool bf16 = false) {
  const int64_t r = ctx.r, c = ctx.cfg->c_m, hc = H * C;
  const float* W = w.mha.w_qkvg.f32();  // [4HC, c] q | k | v | g
  const float* b = w.mha.b_qkvg.f32();  // [4HC]
  SingleAttentionFwd f;
  f.bias = Tensor::empty({H, rows, r});
  {
    Tensor t = Tensor::empty({rows * r, H});  // [(q, k), h]
    pair_bias_project(w.ln_z, w.lin_z, ctx, z, rows, t.f32());
    const float* tp = t.f32();
    float* bp = f.bias.f32();
#pragma omp parallel for schedule(static)
    for (int64_t q = 0; q < rows; ++q)
      for (int64_t k = 0; k < r; ++k)
        for (int64_t h = 0; h < H; ++h) bp[(h * rows + q) * r + k] = tp[(q * r + k) * H + h];
  }
  f.mean = Tensor::empty({rows});
  f.rstd = Tensor::empty({rows});
  f.x = Tensor::empty({rows, c});
  kern::layernorm(s, c, f.x.f32(), c, rows, c, w.ln_m.w.f32(), w.ln_m.b.f32(), ctx.cfg->eps_ln,
                  f.mean.f32(), f.rstd.f32());
  round_for_store(ctx, f.x);
  f.X = Tensor::empty({r, c});
  gather.fn(f.x.f32(), rows * c, f.X.f32());
  f.qg = Tensor::empty({rows, 2 * hc});
  f.kv = Tensor::empty({r, 2 * hc});
  if (bf16) {
    const Tensor wb = gemm_weights(w.mha.w_qkvg, DType::BF16);                  // [4HC, c] bf16
    Tensor xs = Tensor::empty({kern::linear_bf16_scratch(r, c)}, DType::BF16);  // bf16 LN rows
    const uint16_t* Wb = wb.data<uint16_t>();
    uint16_t* xp = xs.data<uint16_t>();
    kern::linear_bf16(f.x.f32(), c, rows, c, Wb, b, hc, f.qg.f32(), 2 * hc, false, xp);
    kern::linear_bf16(f.x.f32(), c, rows, c, Wb + 3 * hc * c, b + 3 * hc, hc, f.qg.f32() + hc,
                      2 * hc, false, xp);
    kern::linear_bf16(f.X.f32(), c, r, c, Wb + hc * c, b + hc, 2 * hc, f.kv.f32(), 2 * hc, false,
                      xp);
  } else {
    train_linear(ctx, f.x.f32(), c, rows, c, W, b, hc, f.qg.f32(), 2 * hc);
    train_linear(ctx, f.x.f32(), c, rows, c, W + 3 * hc * c, b + 3 * hc, hc, f.qg.f32() + hc,
                 2 * hc);
    train_linear(ctx, f.X.f32(), c, r, c, W + hc * c, b + hc, 2 * hc, f.kv.f32(), 2 * hc);
    round_for_store(ctx, f.qg);
    round_for_store(ctx, f.kv);
  }
  f.og = Tensor::empty({rows, hc});
  f.lse = Tensor::empty({H, rows});
  const kern::AttentionArgs a = args(f, H, C, rows, r, key_bias, bf16 ? DType::BF16 : ctx.store);
  Tensor scratch = Tensor::empty({kern::attention_scratch_floats(a, ctx.threads)});
  kern::attention(a, scratch.f32(), ctx.threads);
  return f;
}
}  // namespace

void single_attention_shard(const MsaRowAttentionW& w, const BlockContext& ctx, int64_t H,
                            int64_t C, float* s, int64_t rows, const float* z,
                            const float* key_bias, const ShardGather& gather) {
  const int64_t c = ctx.cfg->c_m, hc = H * C;
  const bool bf16 = bf16_fused(ctx);
  const SingleAttentionFwd f = forward_state(w, ctx, H, C, s, rows, z, key_bias, gather, bf16);
  if (!bf16)  // f32, or bf16 storage: og rounded to bf16 as linear_o's input
    return train_linear(ctx, f.og.f32(), hc, rows, hc, w.mha.o.w.f32(), bias_ptr(w.mha.o), c, s, c,
                        true);
  const Tensor wo = gemm_weights(w.mha.o.w, DType::BF16);                         // [c, HC] bf16
  Tensor xs = Tensor::empty({kern::linear_bf16_scratch(rows, hc)}, DType::BF16);  // bf16 og
  kern::linear_bf16(f.og.f32(), hc, rows, hc, wo.data<uint16_t>(), bias_ptr(w.mha.o), c, s, c, true,
                    xs.data<uint16_t>());
}

void single_attention_shard_backward(const MsaRowAttentionW& w, MsaRowAttentionW* g,
                                     const BlockContext& ctx, int64_t H, int64_t C,
                                     const float* s_in, int64_t rows, const float* z_in,
                                     const float* key_bias, const ShardGather& gather,
                                     const ShardReduce& reduce, float* ds, float* dz) {
  const int64_t r = ctx.r, c = ctx.cfg->c_m, hc = H * C;
  const float* W = w.mha.w_qkvg.f32();  // [4HC, c]
  float* gW = g->mha.w_qkvg.f32();      // [4HC, c]
  float* gb = g->mha.b_qkvg.f32();      // [4HC]
  SingleAttentionFwd f = forward_state(w, ctx, H, C, s_in, rows, z_in, key_bias, gather);
  Tensor dog = Tensor::empty({rows, hc});  // dL/d og
  train_linear_backward(ctx, f.og.f32(), hc, rows, hc, w.mha.o.w.f32(), c, ds, c, dog.f32(), hc,
                        g->mha.o.w.f32(), bias_ptr(g->mha.o));
  Tensor dqg = Tensor::empty({rows, 2 * hc});  // dL/d q | g
  Tensor dkv = Tensor::empty({r, 2 * hc});     // dL/d k | v of every token (this shard's queries)
  Tensor dbias = Tensor::zeros({H, rows, r});
  {
    const kern::AttentionArgs a = args(f, H, C, rows, r, key_bias, ctx.store);
    kern::AttentionGrads ag;
    ag.d_out = dog.f32();
    ag.dq = dqg.f32(), ag.dgate = dqg.f32() + hc;
    ag.dk = dkv.f32(), ag.dv = dkv.f32() + hc;
    ag.d_pair_bias = dbias.f32();
    ag.lse = f.lse.f32();
    Tensor scratch = Tensor::empty({kern::attention_backward_scratch_floats(a, ctx.threads)});
    kern::attention_backward(a, ag, scratch.f32(), ctx.threads);
  }
  dog = Tensor();
  f.qg = f.kv = f.bias = f.og = f.X = Tensor();
  Tensor dx = Tensor::empty({rows, c});  // dL/d LN(s) of the shard
  {
    // dL/d k | v of the shard's tokens, summed over every shard's queries before its products
    // (under bf16 storage it is rounded once, as one process rounds its dL/d k | v)
    Tensor dkv_mine = Tensor::empty({rows, 2 * hc});
    reduce.fn(dkv.f32(), rows * 2 * hc, dkv_mine.f32());
    dkv = Tensor();
    train_linear_backward(ctx, f.x.f32(), c, rows, c, W + hc * c, 2 * hc, dkv_mine.f32(), 2 * hc,
                          dx.f32(), c, gW + hc * c, gb + hc);
  }
  train_linear_backward(ctx, f.x.f32(), c, rows, c, W, hc, dqg.f32(), 2 * hc, dx.f32(), c, gW, gb,
                        true);
  train_linear_backward(ctx, f.x.f32(), c, rows, c, W + 3 * hc * c, hc, dqg.f32() + hc, 2 * hc,
                        dx.f32(), c, gW + 3 * hc * c, gb + 3 * hc, true);
  dqg = Tensor();
  {
    Tensor scratch = Tensor::empty({kern::layernorm_backward_scratch_floats(rows, c)});
    kern::layernorm_backward(s_in, c, dx.f32(), c, rows, c, w.ln_m.w.f32(), f.mean.f32(),
                             f.rstd.f32(), ds, c, g->ln_m.w.f32(), g->ln_m.b.f32(), scratch.f32(),
                             true);
  }
  Tensor dt = Tensor::empty({rows * r, H});  // dL/d projection [(q, k), h]
  {
    const float* dp = dbias.f32();
    float* tp = dt.f32();
#pragma omp parallel for schedule(static)
    for (int64_t q = 0; q < rows; ++q)
      for (int64_t k = 0; k < r; ++k)
        for (int64_t h = 0; h < H; ++h) tp[(q * r + k) * H + h] = dp[(h * rows + q) * r + k];
  }
  dbias = Tensor();
  pair_bias_project_backward(w.ln_z, w.lin_z, &g->ln_z, &g->lin_z, ctx, z_in, rows, dt.f32(), dz);
}

}  // namespace fc
