#include "exec/dap_train.h"

#include <algorithm>
#include <cstring>

#include "foldcube/status.h"
#include "model/dropout.h"

namespace fc {

namespace {
constexpr int64_t kF = sizeof(float);

// The pair-biased attention modules' weights and shapes.
struct BiasedAttn {
  const LayerNormW& ln_z;  // bias branch
  const LinearW& lin_z;
  const LayerNormW& ln;  // attention input
  const GatedAttentionW& mha;
  int64_t H, C;
  const char* module;
};

// Bias [H, r_pad, r_pad] from this rank's rows zr [r_loc, r_pad, c_z]: project, all-gather,
// permute to heads-first.
Tensor gathered_bias(const BiasedAttn& a, const DapShards& sh, const dist::Communicator& comm,
                     const float* zr) {
  const int64_t rl = sh.l.r_loc, rp = sh.l.r_pad, H = a.H;
  Tensor all = Tensor::empty({rp * rp, H});  // [(q, k), h] of every rank's rows q
  {
    Tensor t = Tensor::empty({rl * rp, H});  // this rank's rows
    pair_bias_project(a.ln_z, a.lin_z, sh.full, zr, rl, t.f32());
    comm.all_gather(t.f32(), all.f32(), rl * rp * H);
  }
  Tensor bias = Tensor::empty({H, rp, rp});
  pair_bias_permute(all.f32(), rp, H, false, bias.f32());
  return bias;
}

// Forward on S [items, L, c] (this rank's items), bias from zr. st: bias and chunks kept.
void biased_train(const BiasedAttn& a, const BlockContext& ctx, const DapShards& sh,
                  const dist::Communicator& comm, float* S, int64_t items, int64_t c,
                  const float* mask_bias, const float* zr, AttentionState* st) {
  Tensor bias = gathered_bias(a, sh, comm, zr);  // [H, r_pad, r_pad]
  attention_rows_train(a.ln, a.mha, a.H, a.C, a.module, ctx, S, items, sh.l.r_pad, c, mask_bias,
                       bias.f32(), st);
  if (st) st->bias = std::move(bias);
}

// Backward: the bias gradient [H, r_pad, r_pad] of this rank's items is summed over the ranks and
// scattered to the rows that projected it (reduce-scatter, the adjoint of the all-gather), then
// back-propagated through the projection of this rank's rows into dzr.
void biased_backward(const BiasedAttn& a, LayerNormW* g_ln_z, LinearW* g_lin_z, LayerNormW* g_ln,
                     GatedAttentionW* g_mha, const BlockContext& ctx, const DapShards& sh,
                     const dist::Communicator& comm, const float* S_in, float* dS, int64_t items,
                     int64_t c, const float* mask_bias, const float* zr_in, AttentionState* st,
                     float* dzr) {
  const int64_t rl = sh.l.r_loc, rp = sh.l.r_pad, H = a.H;
  Tensor bias = st->bias.defined() ? st->bias : gathered_bias(a, sh, comm, zr_in);
  st->bias = Tensor();
  Tensor dt = Tensor::empty({rl * rp, H});  // dL/d projection of this rank's rows [(q, k), h]
  {
    Tensor dbias = Tensor::zeros({H, rp, rp});  // this rank's items' part of dL/d bias
    attention_rows_backward(a.ln, a.mha, g_ln, g_mha, a.H, a.C, a.module, ctx, S_in, dS, items, rp,
                            c, mask_bias, bias.f32(), st, dbias.f32());
    bias = Tensor();
    Tensor dall = Tensor::empty({rp * rp, H});  // [(q, k), h], rank-major blocks of rows q
    pair_bias_unpermute(dbias.f32(), rp, H, dall.f32());
    dbias = Tensor();
    comm.reduce_scatter(dall.f32(), dt.f32(), rl * rp * H);
  }
  pair_bias_project_backward(a.ln_z, a.lin_z, g_ln_z, g_lin_z, sh.full, zr_in, rl, dt.f32(), dzr);
}

ShardGather shard_gather(const dist::Communicator& comm) {
  return {comm.size(), [&comm](const float* mine, int64_t count, float* all) {
            comm.all_gather(mine, all, count);
          }};
}
ShardReduce shard_reduce(const dist::Communicator& comm) {
  return {comm.size(), [&comm](const float* all, int64_t count, float* mine) {
            comm.reduce_scatter(all, mine, count);
          }};
}

BiasedAttn row_attn(const MsaRowAttentionW& w, const EvoformerConfig& cfg) {
  return {w.ln_z, w.lin_z, w.ln_m, w.mha, cfg.no_heads_msa, cfg.c_hidden_msa_att, "msa_att_row"};
}
BiasedAttn tri_attn(const TriangleAttentionW& w, const EvoformerConfig& cfg, bool ending) {
  return {w.ln,
          w.lin,
          w.ln,
          w.mha,
          cfg.no_heads_pair,
          cfg.c_hidden_pair_att,
          ending ? "tri_att_end" : "tri_att_start"};
}

}  // namespace

DapShards make_dap_shards(const EvoformerConfig& cfg, const DapLayout& l, const Tensor& msa_mask,
                          const Tensor& pair_mask, int64_t chunk, int64_t chunk_target_bytes,
                          int threads) {
  const int64_t sp = l.s_pad, rp = l.r_pad, sl = l.s_loc, rl = l.r_loc;
  FC_CHECK_MSG(msa_mask.numel() == sp * rp && pair_mask.numel() == rp * rp,
               "DAP masks must be padded to [s_pad, r_pad] and [r_pad, r_pad]");
  DapShards d;
  d.l = l;
  d.msa_mask = msa_mask.clone();
  d.pair_mask = pair_mask.clone();
  d.msa_bias = Tensor::empty({sp, rp});
  d.msa_bias_t = Tensor::empty({rp, sp});
  d.pair_mask_t = Tensor::empty({rp, rp});
  d.pair_bias = Tensor::empty({rp, rp});
  d.pair_bias_t = Tensor::empty({rp, rp});
  const float* mm = d.msa_mask.f32();
  const float* pm = d.pair_mask.f32();
  d.msa_mask_cols = Tensor::empty({sp, rl});
  for (int64_t i = 0; i < sp; ++i)
    std::memcpy(d.msa_mask_cols.f32() + i * rl, mm + i * rp + l.rank * rl, rl * kF);
  for (int64_t i = 0; i < sp; ++i)
    for (int64_t j = 0; j < rp; ++j) {
      const float v = cfg.inf * (mm[i * rp + j] - 1.f);
      d.msa_bias.f32()[i * rp + j] = v;
      d.msa_bias_t.f32()[j * sp + i] = v;
    }
  for (int64_t i = 0; i < rp; ++i)
    for (int64_t j = 0; j < rp; ++j) {
      const float mk = pm[i * rp + j], v = cfg.inf * (mk - 1.f);
      d.pair_mask_t.f32()[j * rp + i] = mk;
      d.pair_bias.f32()[i * rp + j] = v;
      d.pair_bias_t.f32()[j * rp + i] = v;
    }
  const int64_t mz_loc = (sl * rp * cfg.c_m + rl * rp * cfg.c_z) * kF;
  BlockContext base;
  base.cfg = &cfg;
  base.chunk = chunk;
  base.chunk_target_bytes =
      chunk_target_bytes > 0 ? chunk_target_bytes : std::max<int64_t>(mz_loc / 8, 1 << 20);
  base.threads = std::max(threads, 1);
  d.row = base;
  d.row.s = sl;
  d.row.r = rp;
  d.col = base;
  d.col.s = sp;
  d.col.r = rl;
  d.col.msa_bias_t = d.msa_bias_t.f32() + l.rank * rl * sp;
  d.full = base;
  d.full.s = sp;
  d.full.r = rp;
  d.full.msa_mask = d.msa_mask.f32();
  d.full.msa_bias = d.msa_bias.f32();
  d.full.msa_bias_t = d.msa_bias_t.f32();
  d.full.pair_mask = d.pair_mask.f32();
  d.full.pair_bias = d.pair_bias.f32();
  d.full.pair_bias_t = d.pair_bias_t.f32();
  d.msa_bias_rows = d.msa_bias.f32() + l.rank * sl * rp;
  d.pair_bias_rows = d.pair_bias.f32() + l.rank * rl * rp;
  d.pair_bias_t_rows = d.pair_bias_t.f32() + l.rank * rl * rp;
  return d;
}

void set_dap_dropout(DapShards* sh, bool dropout, uint64_t key) {
  for (BlockContext* c : {&sh->row, &sh->col, &sh->full}) {
    c->dropout = dropout;
    c->dropout_key = key;
  }
}

void dap_msa_row_attention_train(const MsaRowAttentionW& w, const DapShards& sh,
                                 const dist::Communicator& comm, float* m, const float* z,
                                 AttentionState* st) {
  const EvoformerConfig& cfg = *sh.full.cfg;
  biased_train(row_attn(w, cfg), sh.row, sh, comm, m, sh.l.s_loc, cfg.c_m, sh.msa_bias_rows, z, st);
}

void dap_msa_row_attention_backward(const MsaRowAttentionW& w, MsaRowAttentionW* g,
                                    const DapShards& sh, const dist::Communicator& comm,
                                    const float* m_in, const float* z_in, AttentionState* st,
                                    float* dm, float* dz) {
  const EvoformerConfig& cfg = *sh.full.cfg;
  biased_backward(row_attn(w, cfg), &g->ln_z, &g->lin_z, &g->ln_m, &g->mha, sh.row, sh, comm, m_in,
                  dm, sh.l.s_loc, cfg.c_m, sh.msa_bias_rows, z_in, st, dz);
}

void dap_triangle_attention_train(const TriangleAttentionW& w, const DapShards& sh,
                                  const dist::Communicator& comm, bool ending, float* z,
                                  AttentionState* st) {
  const EvoformerConfig& cfg = *sh.full.cfg;
  biased_train(tri_attn(w, cfg, ending), sh.full, sh, comm, z, sh.l.r_loc, cfg.c_z,
               ending ? sh.pair_bias_t_rows : sh.pair_bias_rows, z, st);
}

void dap_triangle_attention_backward(const TriangleAttentionW& w, TriangleAttentionW* g,
                                     const DapShards& sh, const dist::Communicator& comm,
                                     bool ending, const float* z_in, AttentionState* st,
                                     float* dz) {
  const EvoformerConfig& cfg = *sh.full.cfg;
  // The bias branch and the attention share ln: both gradients accumulate into g->ln.
  biased_backward(tri_attn(w, cfg, ending), &g->ln, &g->lin, &g->ln, &g->mha, sh.full, sh, comm,
                  z_in, dz, sh.l.r_loc, cfg.c_z, ending ? sh.pair_bias_t_rows : sh.pair_bias_rows,
                  z_in, st, dz);
}

void dap_outer_product_mean_train(const OuterProductMeanW& w, const DapShards& sh,
                                  const dist::Communicator& comm, const float* m, float* z,
                                  OuterProductMeanState* st) {
  outer_product_mean_shard_train(w, sh.full, m, sh.l.rank * sh.l.r_loc, sh.l.r_loc,
                                 sh.msa_mask_cols.f32(), shard_gather(comm), z, st);
}

void dap_outer_product_mean_backward(const OuterProductMeanW& w, OuterProductMeanW* g,
                                     const DapShards& sh, const dist::Communicator& comm,
                                     const float* m_in, const OuterProductMeanState& st,
                                     const float* dz, float* dm) {
  outer_product_mean_shard_backward(w, g, sh.full, m_in, sh.l.r_loc, sh.msa_mask_cols.f32(), st,
                                    shard_gather(comm), shard_reduce(comm), dz, dm);
}

void dap_triangle_multiplication_train(const TriangleMultiplicationW& w, const DapShards& sh,
                                       const dist::Communicator& comm, bool incoming, float* z,
                                       TriangleMultiplicationState* st) {
  const DapLayout& l = sh.l;
  const float* mask = (incoming ? sh.pair_mask_t : sh.pair_mask).f32() + l.rank * l.r_loc * l.r_pad;
  triangle_multiplication_shard_train(w, sh.full, incoming, l.r_loc, l.rank * l.r_loc, mask,
                                      shard_gather(comm), z, st);
}

void dap_triangle_multiplication_backward(const TriangleMultiplicationW& w,
                                          TriangleMultiplicationW* g, const DapShards& sh,
                                          const dist::Communicator& comm, bool incoming,
                                          const float* z_in, TriangleMultiplicationState* st,
                                          float* dz) {
  const DapLayout& l = sh.l;
  const float* mask = (incoming ? sh.pair_mask_t : sh.pair_mask).f32() + l.rank * l.r_loc * l.r_pad;
  triangle_multiplication_shard_backward(w, g, sh.full, incoming, l.r_loc, l.rank * l.r_loc, mask,
                                         shard_gather(comm), shard_reduce(comm), z_in, st, dz);
}

void dap_all_reduce_grads(const dist::Communicator& comm, BlockWeights* g) {
  for (auto& [name, t] : named_params(*g, "")) {
    FC_CHECK_MSG(t.is_contiguous(), "parameter gradient view is not contiguous");
    comm.all_reduce(t.f32(), t.numel());
  }
}

}  // namespace fc
