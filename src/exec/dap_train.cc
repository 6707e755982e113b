#include "exec/dap_train.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "exec/layer_times.h"
#include "exec/partition.h"
#include "foldcube/memory.h"
#include "foldcube/runtime.h"
#include "foldcube/status.h"
#include "kernels/convert.h"
#include "kernels/kernels.h"
#include "layers/single_attention_shard.h"
#include "layers/swiglu_transition.h"
#include "model/common.h"
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
  Tensor bias = Tensor::empty({H, rp, rp});  // heads-first
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
  Tensor bias = st->bias.defined() ? st->bias : gathered_bias(a, sh, comm, zr_in);  // [H, r_p, r_p]
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

namespace {
template <typename W>
void all_reduce_grads(const dist::Communicator& comm, W* g) {
  for (auto& [name, t] : named_params(*g, "")) {
    FC_CHECK_MSG(t.is_contiguous(), "parameter gradient view is not contiguous");
    comm.all_reduce(t.f32(), t.numel());
  }
}
}  // namespace

void dap_all_reduce_grads(const dist::Communicator& comm, BlockWeights* g) {
  all_reduce_grads(comm, g);
}

void dap_all_reduce_grads(const dist::Communicator& comm, ExtraMsaBlockWeights* g) {
  all_reduce_grads(comm, g);
}

namespace {

// FNV-1a over raw bytes (cross-rank agreement of configs and options).
uint64_t hash_bytes(const void* p, size_t n, uint64_t h = 1469598103934665603ull) {
  const auto* b = static_cast<const unsigned char*>(p);
  for (size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ull;
  return h;
}

// Rows of the shard a pointwise layer runs on: z [r_loc * r_pad], m by sequences [s_loc * r_pad],
// by residues [s_pad * r_loc], a single stream by tokens [r_loc].
int64_t swiglu_rows(const LayerDesc& ly, const DapShards& sh, Shard m_how) {
  const DapLayout& l = sh.l;
  if (ly.updates == Stream::kZ) return l.r_loc * l.r_pad;
  if (ly.single) return l.r_loc;
  return m_how == Shard::kMsaByRes ? l.s_pad * l.r_loc : l.s_loc * l.r_pad;
}

// One layer's training forward on this rank's shards (m, z in the layer's layouts); bw: the
// table's block weight struct.
void dap_layer_train(const LayerDesc& ly, const void* bw, const DapShards& sh,
                     const dist::Communicator& comm, Shard m_how, float* m, float* z,
                     LayerState* st) {
  const EvoformerConfig& cfg = *sh.full.cfg;
  const DapLayout& l = sh.l;
  switch (ly.kind) {
    case LayerKind::kMsaRowAttention:
      if (ly.single)  // the single stream by tokens: nothing kept, the backward recomputes
        return single_attention_shard(layer_params<MsaRowAttentionW>(ly, bw), sh.full,
                                      cfg.no_heads_msa, cfg.c_hidden_msa_att, m, l.r_loc, z,
                                      sh.msa_bias.f32(), shard_gather(comm));
      return dap_msa_row_attention_train(layer_params<MsaRowAttentionW>(ly, bw), sh, comm, m, z,
                                         st ? &st->att : nullptr);
    case LayerKind::kMsaColumnAttention:
      return msa_column_attention_train(layer_params<MsaColumnAttentionW>(ly, bw), sh.col, m,
                                        st ? &st->att : nullptr);
    case LayerKind::kTransition: {
      const TransitionW& w = layer_params<TransitionW>(ly, bw);
      TransitionState* ts = st ? &st->trans : nullptr;
      if (ly.updates == Stream::kZ)
        return transition_train(w, sh.full, z, l.r_loc * l.r_pad, cfg.c_z, ts);
      return m_how == Shard::kMsaByRes
                 ? transition_train(w, sh.col, m, l.s_pad * l.r_loc, cfg.c_m, ts)
                 : transition_train(w, sh.row, m, l.s_loc * l.r_pad, cfg.c_m, ts);
    }
    case LayerKind::kOuterProductMean: {
      OuterProductMeanState o;  // the state is built even when it is not kept
      dap_outer_product_mean_train(layer_params<OuterProductMeanW>(ly, bw), sh, comm, m, z, &o);
      if (st) {
        st->opm = std::move(o);
        opm_state_to_store(sh.full, &st->opm);
      }
      return;
    }
    case LayerKind::kTriangleMultiplication:
      return dap_triangle_multiplication_train(layer_params<TriangleMultiplicationW>(ly, bw), sh,
                                               comm, ly.transposed, z, st ? &st->tri : nullptr);
    case LayerKind::kTriangleAttention:
      return dap_triangle_attention_train(layer_params<TriangleAttentionW>(ly, bw), sh, comm,
                                          ly.transposed, z, st ? &st->att : nullptr);
    case LayerKind::kMsaColumnGlobalAttention:  // m by residues: per column, no communication
      return msa_column_global_attention_train(layer_params<MsaColumnGlobalAttentionW>(ly, bw),
                                               sh.col, m, st ? &st->global : nullptr);
    case LayerKind::kMaskedTransition: {
      const BlockContext& c = m_how == Shard::kMsaByRes ? sh.col : sh.row;
      return transition_train(layer_params<TransitionW>(ly, bw), c, m, c.s * c.r, cfg.c_m,
                              st ? &st->trans : nullptr, c.msa_mask);
    }
    case LayerKind::kSwiGluTransition:  // pointwise: the current layout's rows
      return swiglu_transition_train(layer_params<SwiGluTransitionW>(ly, bw), sh.full,
                                     ly.updates == Stream::kZ ? z : m, swiglu_rows(ly, sh, m_how),
                                     stream_channels(sh.full, ly.updates),
                                     st ? &st->trans : nullptr);
  }
  FC_CHECK_MSG(false, std::string("layer ") + ly.name + " has no DAP training form");
}

// Its backward: x_in / read_in as layer_backward (train.h), dm and dz in the layer's layouts.
void dap_layer_backward(const LayerDesc& ly, const void* bw, void* g, const DapShards& sh,
                        const dist::Communicator& comm, Shard m_how, const float* x_in,
                        const float* read_in, LayerState* st, float* dm, float* dz) {
  const EvoformerConfig& cfg = *sh.full.cfg;
  const DapLayout& l = sh.l;
  switch (ly.kind) {
    case LayerKind::kMsaRowAttention:
      if (ly.single)
        return single_attention_shard_backward(
            layer_params<MsaRowAttentionW>(ly, bw), &layer_params<MsaRowAttentionW>(ly, g), sh.full,
            cfg.no_heads_msa, cfg.c_hidden_msa_att, x_in, l.r_loc, read_in, sh.msa_bias.f32(),
            shard_gather(comm), shard_reduce(comm), dm, dz);
      return dap_msa_row_attention_backward(layer_params<MsaRowAttentionW>(ly, bw),
                                            &layer_params<MsaRowAttentionW>(ly, g), sh, comm, x_in,
                                            read_in, &st->att, dm, dz);
    case LayerKind::kMsaColumnAttention:
      return msa_column_attention_backward(layer_params<MsaColumnAttentionW>(ly, bw),
                                           &layer_params<MsaColumnAttentionW>(ly, g), sh.col, x_in,
                                           &st->att, dm);
    case LayerKind::kTransition: {
      const TransitionW& w = layer_params<TransitionW>(ly, bw);
      TransitionW* gw = &layer_params<TransitionW>(ly, g);
      if (ly.updates == Stream::kZ)
        return transition_backward(w, gw, sh.full, x_in, &st->trans, dz, l.r_loc * l.r_pad,
                                   cfg.c_z);
      return m_how == Shard::kMsaByRes ? transition_backward(w, gw, sh.col, x_in, &st->trans, dm,
                                                             l.s_pad * l.r_loc, cfg.c_m)
                                       : transition_backward(w, gw, sh.row, x_in, &st->trans, dm,
                                                             l.s_loc * l.r_pad, cfg.c_m);
    }
    case LayerKind::kOuterProductMean: {
      const OuterProductMeanW& w = layer_params<OuterProductMeanW>(ly, bw);
      if (!st->opm.a.defined())
        dap_outer_product_mean_train(w, sh, comm, read_in, nullptr, &st->opm);
      else
        opm_state_from_store(&st->opm);
      dap_outer_product_mean_backward(w, &layer_params<OuterProductMeanW>(ly, g), sh, comm, read_in,
                                      st->opm, dz, dm);
      st->opm = {};
      return;
    }
    case LayerKind::kTriangleMultiplication:
      return dap_triangle_multiplication_backward(layer_params<TriangleMultiplicationW>(ly, bw),
                                                  &layer_params<TriangleMultiplicationW>(ly, g), sh,
                                                  comm, ly.transposed, x_in, &st->tri, dz);
    case LayerKind::kTriangleAttention:
      return dap_triangle_attention_backward(layer_params<TriangleAttentionW>(ly, bw),
                                             &layer_params<TriangleAttentionW>(ly, g), sh, comm,
                                             ly.transposed, x_in, &st->att, dz);
    case LayerKind::kMsaColumnGlobalAttention:
      return msa_column_global_attention_backward(layer_params<MsaColumnGlobalAttentionW>(ly, bw),
                                                  &layer_params<MsaColumnGlobalAttentionW>(ly, g),
                                                  sh.col, x_in, &st->global, dm);
    case LayerKind::kMaskedTransition: {
      const BlockContext& c = m_how == Shard::kMsaByRes ? sh.col : sh.row;
      return transition_backward(layer_params<TransitionW>(ly, bw),
                                 &layer_params<TransitionW>(ly, g), c, x_in, &st->trans, dm,
                                 c.s * c.r, cfg.c_m, c.msa_mask);
    }
    case LayerKind::kSwiGluTransition:
      return swiglu_transition_backward(
          layer_params<SwiGluTransitionW>(ly, bw), &layer_params<SwiGluTransitionW>(ly, g), sh.full,
          x_in, &st->trans, ly.updates == Stream::kZ ? dz : dm, swiglu_rows(ly, sh, m_how),
          stream_channels(sh.full, ly.updates));
  }
  FC_CHECK_MSG(false, std::string("layer ") + ly.name + " has no DAP training form");
}

}  // namespace

void dap_block_forward(const BlockTable& t, const void* w, const DapShards& sh,
                       const dist::Communicator& comm, Tensor& mr, Tensor& zr, Recompute policy,
                       const std::vector<Split>& splits, DapBlockState* st, const BlockLayouts* in,
                       const BlockLayouts* out) {
  const DapLayout& l = sh.l;
  const BlockLayouts boundary{dap_boundary_m(t), Shard::kPairRows};
  const DType store = sh.full.store;  // F32, or BF16: kept copies in bf16 (as one process)
  auto copy = [&](const Tensor& x) { return kept_copy(x.f32(), x.shape(), store); };
  // BF16 storage: the streams a layer touches are rounded to bf16 values before it runs.
  auto round = [&](Stream x) {
    Tensor& t = x == Stream::kM ? mr : zr;
    if (store == DType::BF16 && x != Stream::kNone && t.defined())
      kern::round_to_bf16(t.f32(), t.f32(), t.numel());
  };
  st->policy = policy;
  st->splits = splits;
  st->in = in ? *in : boundary;
  st->out = out ? *out : boundary;
  if (policy == Recompute::kBlock) {  // kept as shards (a slice of a whole stream: a local copy)
    Tensor m0 = mr, z0 = zr;  // handles: a layout change makes new tensors, never writes these
    Shard how = st->in.first;
    dap_to_layout(&m0, &how, boundary.first, l, comm);
    how = st->in.second;
    dap_to_layout(&z0, &how, boundary.second, l, comm);
    st->m0 = copy(m0);
    st->z0 = copy(z0);
  }
  const bool keep = policy == Recompute::kNone;
  st->in_updated.assign(t.count, Tensor());
  st->in_read.assign(t.count, Tensor());
  st->layers.assign(t.count, LayerState());
  const int last_m = dap_last_use(t, Stream::kM), last_z = dap_last_use(t, Stream::kZ);
  Shard m_how = st->in.first, z_how = st->in.second;
  for (int i = 0; i < t.count; ++i) {
    const LayerDesc& ly = t.layers[i];
    const Split split = splits.empty() ? Split::kDap : splits[i];
    LayerClock clock(i, comm);
    const DapLayerLayout want = partition_layer_layout(ly, split, m_how, z_how);
    if (want.m) dap_to_layout(&mr, &m_how, *want.m, l, comm);
    if (want.z) dap_to_layout(&zr, &z_how, *want.z, l, comm);
    clock.change();
    round(ly.updates);
    round(ly.reads);
    if (policy != Recompute::kBlock) {
      const SavedInputs in = saved_inputs(t, i);
      if (in.updated) st->in_updated[i] = copy(ly.updates == Stream::kM ? mr : zr);
      if (in.read) st->in_read[i] = copy(ly.reads == Stream::kM ? mr : zr);
    }
    LayerState* ls = keep ? &st->layers[i] : nullptr;
    if (split == Split::kDap)
      dap_layer_train(ly, w, sh, comm, m_how, mr.f32(), zr.f32(), ls);
    else {
      const ReduceTo rt = partition_reduce_to(t, splits, i, &mr, &zr, &m_how, &z_how, &st->out);
      partition_layer_train(t, ly, w, sh, comm, split, mr.f32(), zr.f32(), ls, &rt);
    }
    clock.layer();
    if (i == last_m) dap_to_layout(&mr, &m_how, st->out.first, l, comm);
    if (i == last_z) dap_to_layout(&zr, &z_how, st->out.second, l, comm);
    clock.change();
  }
}

void dap_block_backward(const BlockTable& t, const void* w, void* g, const DapShards& sh,
                        const dist::Communicator& comm, DapBlockState* st, const Tensor& m_out,
                        const Tensor& z_out, Tensor& dmr, Tensor& dzr) {
  const DapLayout& l = sh.l;
  if (st->policy == Recompute::kBlock) {
    // z0 in place; m0 on a copy, since the caller still holds it as the previous block's output
    // (kept in bf16, both are widened copies).
    Tensor mr = st->m0.dtype() == DType::BF16 ? as_f32(st->m0) : st->m0.clone();
    Tensor zr = as_f32(st->z0);  // block-boundary layouts
    st->m0 = st->z0 = Tensor();
    DapBlockState full;
    const LayerPhase phase = layer_times_current_phase();
    layer_times_phase(LayerPhase::kRecompute);
    {
      LayerClock clock(0, comm);  // back to the layouts the block came in
      Shard how = dap_boundary_m(t);
      dap_to_layout(&mr, &how, st->in.first, l, comm);
      how = Shard::kPairRows;
      dap_to_layout(&zr, &how, st->in.second, l, comm);
      clock.change();
    }
    dap_block_forward(t, w, sh, comm, mr, zr, Recompute::kNone, st->splits, &full, &st->in,
                      &st->out);
    layer_times_phase(phase);
    if (!reads_block_output(t, Stream::kZ)) zr = Tensor();
    dap_block_backward(t, w, g, sh, comm, &full, mr, zr, dmr, dzr);
    return;
  }
  const std::vector<std::pair<Shard, Shard>> layouts =
      st->splits.empty() ? dap_block_layouts(t) : partition_block_layouts(t, st->splits);
  Shard dm_how = st->out.first, dz_how = st->out.second;
  for (int i = t.count - 1; i >= 0; --i) {
    const LayerDesc& ly = t.layers[i];
    const auto [m_how, z_how] = layouts[i];
    auto uses = [&](Stream x) { return ly.updates == x || ly.reads == x; };
    LayerClock clock(i, comm);
    if (uses(Stream::kZ)) dap_to_layout(&dzr, &dz_how, z_how, l, comm);
    if (uses(Stream::kM)) dap_to_layout(&dmr, &dm_how, m_how, l, comm);
    Tensor read = as_f32(st->in_read[i]);  // f32 views of the kept inputs (widened when bf16)
    if (ly.reads == Stream::kM && !read.defined()) {  // the block output in the layer's layout
      Shard how = st->out.first;
      read = as_f32(m_out);
      dap_to_layout(&read, &how, m_how, l, comm);
    }
    if (ly.reads == Stream::kZ && !read.defined()) {
      FC_CHECK_MSG(z_out.defined(), std::string(ly.name) + " reads the block output z");
      Shard how = st->out.second;
      read = as_f32(z_out);
      dap_to_layout(&read, &how, z_how, l, comm);
    }
    clock.change();
    const Tensor x_kept = as_f32(st->in_updated[i]);
    const float* x_in = x_kept.defined() ? x_kept.f32() : nullptr;
    const float* read_in = read.defined() ? read.f32() : nullptr;
    if (st->splits.empty() || st->splits[i] == Split::kDap)
      dap_layer_backward(ly, w, g, sh, comm, m_how, x_in, read_in, &st->layers[i], dmr.f32(),
                         dzr.f32());
    else {
      const ReduceTo rm =
          partition_grad_reduce_to(t, st->splits, layouts, i, Stream::kM, &dmr, &dm_how, &st->in);
      const ReduceTo rz =
          partition_grad_reduce_to(t, st->splits, layouts, i, Stream::kZ, &dzr, &dz_how, &st->in);
      partition_layer_backward(t, ly, w, g, sh, comm, st->splits[i], x_in, read_in, &st->layers[i],
                               dmr.f32(), dzr.f32(), &rm, &rz);
    }
    clock.layer();
    read = Tensor();
    st->in_updated[i] = Tensor();
    st->in_read[i] = Tensor();
  }
  LayerClock clock(0, comm);  // back to the layouts the block came in: the first layer's
  dap_to_layout(&dzr, &dz_how, st->in.second, l, comm);
  dap_to_layout(&dmr, &dm_how, st->in.first, l, comm);
  clock.change();
}

Tensor scatter_rows(const Tensor& x, int64_t rows_p, int64_t cols_p, int64_t c,
                    const dist::Communicator& comm) {
  const int64_t rl = rows_p / comm.size();
  Tensor mine = Tensor::empty({rl, cols_p, c});                        // this rank's rows
  Tensor all = comm.rank() == 0 ? pad3(x, rows_p, cols_p) : Tensor();  // [rows_p, cols_p, c]
  comm.scatter(comm.rank() == 0 ? all.f32() : nullptr, mine.f32(), rl * cols_p * c, 0);
  return mine;
}

Tensor gather_rows(const Tensor& mine, int64_t rows, int64_t cols, const dist::Communicator& comm) {
  const int64_t rows_p = mine.dim(0) * comm.size(), cols_p = mine.dim(1), c = mine.dim(2);
  Tensor all = comm.rank() == 0 ? Tensor::empty({rows_p, cols_p, c}) : Tensor();  // padded
  comm.gather(mine.f32(), comm.rank() == 0 ? all.f32() : nullptr, mine.numel(), 0);
  if (comm.rank() != 0) return Tensor();
  return crop3(all, rows, cols);
}

namespace {
// dap_train_step of a stack whose blocks follow `table` with weight structs W.
template <typename Stack, typename W>
Status dap_train_impl(const Stack& stack, const BlockTable& table, float global_eps,
                      const dist::Communicator& comm, Tensor& m, Tensor& z, const Tensor& msa_mask,
                      const Tensor& pair_mask, const Tensor& grad_out_m, const Tensor& grad_out_z,
                      const TrainOptions& opts, const StackPartition& partitions,
                      DapTrainStats* stats, TrainResult* out) {
  MemoryScope scope;
  const int64_t live0 = scope.start_live();
  const EvoformerConfig& cfg = stack.config();
  const int nb = cfg.no_blocks, me = comm.rank();
  {
    std::string key = cfg.to_json() + "|" + std::to_string(opts.chunk) + "|" +
                      std::to_string(opts.chunk_target_bytes) + "|" + std::to_string(opts.dropout) +
                      "|" + std::to_string(opts.seed) + "|" + dtype_name(opts.dtype);
    for (Recompute p : opts.policy) key += std::string("|") + recompute_name(p);
    for (const auto& block : partitions) {
      key += "|b";
      for (const LayerSplit& ls : block) key += "|" + ls.layer + ":" + split_name(ls.split);
    }
    if (!comm.all_equal(hash_bytes(key.data(), key.size())))
      return Status::InvalidArgument(
          "DAP ranks hold different model configurations or training options");
  }
  // The root validates everything and shares the sizes (or its error).
  DapLayout l;
  Tensor msa_p, pair_p;  // padded masks [s_pad, r_pad], [r_pad, r_pad]
  const auto root_check = [&]() -> Status {
    FC_RETURN_IF_ERROR(check_input("grad.output.m", grad_out_m, m.shape()));
    FC_RETURN_IF_ERROR(check_input("grad.output.z", grad_out_z, z.shape()));
    if (!opts.policy.empty() && opts.policy.size() != 1 &&
        static_cast<int>(opts.policy.size()) != nb)
      return Status::InvalidArgument("recompute policy list has " +
                                     std::to_string(opts.policy.size()) + " entries for " +
                                     std::to_string(nb) + " blocks");
    if (opts.chunk < 0 || opts.chunk_target_bytes < 0)
      return Status::InvalidArgument("chunk and chunk_target_bytes must be >= 0");
    return Status::OK();
  };
  std::vector<std::vector<Split>> splits;  // per block and layer; empty: pure DAP
  FC_RETURN_IF_ERROR(resolve_partition(table, partitions, cfg, comm.size(), &splits));
  if (opts.dtype != DType::F32 && opts.dtype != DType::BF16)
    return Status::InvalidArgument("training dtype must be fp32 or bf16");
  FC_RETURN_IF_ERROR(
      share_padded_masks(cfg, comm, m, z, msa_mask, pair_mask, root_check, &l, &msa_p, &pair_p));
  const int64_t sp = l.s_pad, rp = l.r_pad, cm = cfg.c_m, cz = cfg.c_z;
  DapShards sh =
      make_dap_shards(cfg, l, msa_p, pair_p, opts.chunk, opts.chunk_target_bytes, num_threads());
  msa_p = pair_p = Tensor();
  for (BlockContext* c : {&sh.row, &sh.col, &sh.full}) {
    c->global_eps = global_eps;
    c->store = opts.dtype;  // bf16 training: kept inputs and states in bf16, bf16 GEMM inputs
  }
  auto policy = [&](int b) { return policy_of(opts, b); };
  auto block_key = [&](int b) { return block_dropout_key(opts.seed, b); };

  Tensor mr = scatter_rows(m, sp, rp, cm, comm);  // [s_loc, r_pad, c_m]
  Tensor zr = scatter_rows(z, rp, rp, cz, comm);  // [r_loc, r_pad, c_z]
  if (me == 0) m = z = Tensor();
  const int64_t live_start = mem_stats().live_bytes;
  const dist::CommStats c0 = comm.stats();
  std::vector<std::unique_ptr<DapBlockState>> states;
  auto t0 = std::chrono::steady_clock::now();
  layer_times_phase(LayerPhase::kForward);
  // Each block leaves its streams in the layouts the next block starts with (a whole stream stays
  // whole between blocks); the first block enters at the boundary, the last one leaves there.
  BlockLayouts in{dap_boundary_m(table), Shard::kPairRows};
  for (int b = 0; b < nb; ++b) {
    set_dap_dropout(&sh, opts.dropout, block_key(b));
    states.push_back(std::make_unique<DapBlockState>());
    const BlockLayouts out = splits.empty() ? in : partition_exit_layouts(table, splits, b);
    dap_block_forward(table, &StackAccess::block(stack, b), sh, comm, mr, zr, policy(b),
                      splits.empty() ? std::vector<Split>() : splits[b], states.back().get(), &in,
                      &out);
    in = out;
  }
  out->forward_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  out->activation_bytes = mem_stats().live_bytes - live_start;
  const dist::CommStats c1 = comm.stats();

  t0 = std::chrono::steady_clock::now();
  Tensor dmr = scatter_rows(grad_out_m, sp, rp, cm, comm);  // [s_loc, r_pad, c_m]
  Tensor dzr = scatter_rows(grad_out_z, rp, rp, cz, comm);  // [r_loc, r_pad, c_z]
  const dist::CommStats c1b = comm.stats();                 // after the gradient shards went out
  std::vector<std::unique_ptr<W>> grads(nb);
  dist::CommStats reduce;
  Tensor m_out = mr;  // output m [by sequences] of the block being differentiated
  layer_times_phase(LayerPhase::kBackward);
  for (int b = nb - 1; b >= 0; --b) {
    set_dap_dropout(&sh, opts.dropout, block_key(b));
    grads[b] = std::make_unique<W>();
    allocate_block_grads(cfg, grads[b].get());
    // The block's input m: the output m of block b - 1, in the layout it left that block in
    // (sb.in.first), for block b - 1's backward.
    const DapBlockState& sb = *states[b];
    const int i0 = block_input_m_layer(table);
    Tensor m_in = sb.policy == Recompute::kBlock           ? sb.m0
                  : table.layers[i0].updates == Stream::kM ? sb.in_updated[i0]
                                                           : sb.in_read[i0];
    if (b > 0) {  // kept as boundary shards (kBlock) or in layer i0's layout
      Shard how = sb.policy == Recompute::kBlock ? dap_boundary_m(table)
                  : sb.splits.empty()            ? dap_block_layouts(table)[i0].first
                                      : partition_block_layouts(table, sb.splits)[i0].first;
      if (how != sb.in.first) m_in = as_f32(m_in);  // a kept bf16 copy, widened to move it
      dap_to_layout(&m_in, &how, sb.in.first, l, comm);
    }
    dap_block_backward(table, &StackAccess::block(stack, b), grads[b].get(), sh, comm,
                       states[b].get(), m_out, Tensor(), dmr, dzr);
    states[b].reset();
    m_out = m_in;
    const dist::CommStats r0 = comm.stats();
    LayerClock clock(table.count, comm);  // the parameter-gradient all-reduce
    dap_all_reduce_grads(comm, grads[b].get());
    clock.layer();
    const dist::CommStats d = comm.stats().since(r0);
    for (int k = 0; k < static_cast<int>(dist::Op::kCount); ++k) {
      reduce.bytes[k] += d.bytes[k];
      reduce.calls[k] += d.calls[k];
      reduce.seconds[k] += d.seconds[k];
    }
  }
  layer_times_phase(LayerPhase::kForward);
  out->backward_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  const dist::CommStats c2 = comm.stats();

  m_out = Tensor();
  m = gather_rows(mr, l.s, l.r, comm);
  mr = Tensor();
  z = gather_rows(zr, l.r, l.r, comm);
  zr = Tensor();
  out->grad_m = gather_rows(dmr, l.s, l.r, comm);
  dmr = Tensor();
  out->grad_z = gather_rows(dzr, l.r, l.r, comm);
  dzr = Tensor();
  out->grad_params.clear();
  for (int b = 0; b < nb; ++b)
    for (auto& [name, t] : named_params(*grads[b], block_prefix(b)))
      out->grad_params.emplace_back(name, t);
  out->peak_bytes = scope.peak() - live0;
  out->s = Tensor();
  if constexpr (std::is_same_v<Stack, EvoformerStack>) {
    if (me == 0) {  // output.s = linear(m[0]) [r, c_s], after the step's peak
      out->s = Tensor::empty({l.r, cfg.c_s});
      kern::linear(m.f32(), cm, l.r, cm, stack.linear_weight().f32(), stack.linear_bias().f32(),
                   cfg.c_s, out->s.f32(), cfg.c_s);
    }
  }
  if (stats != nullptr) {
    stats->forward = c1.since(c0);
    stats->backward = c2.since(c1b).since(reduce);
    stats->grad_reduce = reduce;
    stats->activation_bytes = out->activation_bytes;
    stats->peak_bytes = out->peak_bytes;
    stats->shard_bytes = (l.s_loc * rp * cm + l.r_loc * rp * cz) * kF;
  }
  return Status::OK();
}

}  // namespace

Status dap_train_step(const EvoformerStack& stack, const dist::Communicator& comm, Tensor& m,
                      Tensor& z, const Tensor& msa_mask, const Tensor& pair_mask,
                      const Tensor& grad_out_m, const Tensor& grad_out_z, const TrainOptions& opts,
                      DapTrainStats* stats, TrainResult* out) {
  return dap_train_impl<EvoformerStack, BlockWeights>(
      stack, kEvoformerBlock, ExtraMsaStack::kDefaultGlobalEps, comm, m, z, msa_mask, pair_mask,
      grad_out_m, grad_out_z, opts, {}, stats, out);
}

Status dap_train_step(const EvoformerStack& stack, const dist::Communicator& comm, Tensor& m,
                      Tensor& z, const Tensor& msa_mask, const Tensor& pair_mask,
                      const Tensor& grad_out_m, const Tensor& grad_out_z, const TrainOptions& opts,
                      const StackPartition& partitions, DapTrainStats* stats, TrainResult* out) {
  return dap_train_impl<EvoformerStack, BlockWeights>(
      stack, kEvoformerBlock, ExtraMsaStack::kDefaultGlobalEps, comm, m, z, msa_mask, pair_mask,
      grad_out_m, grad_out_z, opts, partitions, stats, out);
}

Status dap_train_step(const ExtraMsaStack& stack, const dist::Communicator& comm, Tensor& m,
                      Tensor& z, const Tensor& msa_mask, const Tensor& pair_mask,
                      const Tensor& grad_out_m, const Tensor& grad_out_z, const TrainOptions& opts,
                      DapTrainStats* stats, TrainResult* out) {
  return dap_train_impl<ExtraMsaStack, ExtraMsaBlockWeights>(
      stack, kExtraMsaBlock, stack.global_eps(), comm, m, z, msa_mask, pair_mask, grad_out_m,
      grad_out_z, opts, {}, stats, out);
}

Status dap_train_step(const ExtraMsaStack& stack, const dist::Communicator& comm, Tensor& m,
                      Tensor& z, const Tensor& msa_mask, const Tensor& pair_mask,
                      const Tensor& grad_out_m, const Tensor& grad_out_z, const TrainOptions& opts,
                      const StackPartition& partitions, DapTrainStats* stats, TrainResult* out) {
  return dap_train_impl<ExtraMsaStack, ExtraMsaBlockWeights>(
      stack, kExtraMsaBlock, stack.global_eps(), comm, m, z, msa_mask, pair_mask, grad_out_m,
      grad_out_z, opts, partitions, stats, out);
}

}  // namespace fc
