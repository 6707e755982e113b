#include "exec/dap.h"

#include <algorithm>
#include <cstring>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <type_traits>

#include "exec/layer_times.h"
#include "exec/partition.h"
#include "foldcube/memory.h"
#include "foldcube/runtime.h"
#include "kernels/kernels.h"
#include "layers/single_attention_shard.h"
#include "layers/swiglu_transition.h"
#include "model/block_table.h"
#include "model/common.h"
#include "model/modules.h"
#include "model/weights.h"

namespace fc {

namespace {
constexpr int64_t kF = sizeof(float);

// FNV-1a over raw bytes (for the cross-rank agreement checks).
uint64_t hash_bytes(const void* p, size_t n, uint64_t h = 1469598103934665603ull) {
  const auto* b = static_cast<const unsigned char*>(p);
  for (size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ull;
  return h;
}

// The whole stream, unpadded, on the root of tc (collective; undefined on the other ranks):
// m [s, r, c] or z [r, r, c] from this rank's shard in layout `how`.
Tensor assemble(const Tensor& shard, Shard how, const DapLayout& l, const dist::Communicator& tc) {
  const int64_t c = shard.dim(2), sp = l.s_pad, rp = l.r_pad, rl = l.r_loc;
  const bool msa = how == Shard::kMsaBySeq || how == Shard::kMsaByRes || how == Shard::kMsaFull;
  if (how == Shard::kMsaFull || how == Shard::kPairFull)  // every rank holds it whole
    return tc.rank() == 0 ? crop3(shard, msa ? l.s : l.r, l.r) : Tensor();
  const int64_t rows_p = msa ? sp : rp;
  Tensor all = tc.rank() == 0 ? Tensor::empty({rows_p, rp, c}) : Tensor();  // shard-major
  tc.gather(shard.f32(), tc.rank() == 0 ? all.f32() : nullptr, shard.numel(), 0);
  if (tc.rank() != 0) return Tensor();
  Tensor full = all;
  if (how == Shard::kMsaByRes || how == Shard::kPairRowsT) {
    full = Tensor::empty({rows_p, rp, c});
    const float* ap = all.f32();
    float* fp = full.f32();
    for (int64_t p = 0; p < l.n; ++p)
      for (int64_t i = 0; i < rows_p; ++i)
        for (int64_t j = 0; j < rl; ++j) {
          // kMsaByRes: block p is m[:, p*rl + j]; kPairRowsT: block p is z^T[p*rl + j, i].
          const float* src = how == Shard::kMsaByRes ? ap + ((p * rows_p + i) * rl + j) * c
                                                     : ap + ((p * rl + j) * rp + i) * c;
          std::memcpy(fp + (i * rp + p * rl + j) * c, src, c * kF);
        }
  }
  return crop3(full, msa ? l.s : l.r, l.r);
}

// Pair bias [H, r_pad, r_pad] of an attention module from this rank's rows z [r_loc, r_pad, c_z]:
// each rank projects its rows, the projections are all-gathered, then permuted to heads-first.
Tensor gathered_pair_bias(const LayerNormW& ln, const LinearW& lin, const BlockContext& ctx,
                          const DapLayout& l, const float* z, const dist::Communicator& comm) {
  const int64_t rl = l.r_loc, rp = l.r_pad, H = lin.w.dim(0);
  Tensor all = Tensor::empty({rp * rp, H});  // [(q, k), h] of every rank's rows q
  {
    Tensor t = Tensor::empty({rl * rp, H});  // this rank's rows
    pair_bias_project(ln, lin, ctx, z, rl, t.f32());
    comm.all_gather(t.f32(), all.f32(), rl * rp * H);
  }
  Tensor bias = Tensor::empty({H, rp, rp});
  pair_bias_permute(all.f32(), rp, H, false, bias.f32());
  return bias;
}
}  // namespace

// x [rows, cols, c] copied into the top-left corner of a zero tensor [rows_p, cols_p, c]; x itself
// when nothing is padded.
Tensor pad3(const Tensor& x, int64_t rows_p, int64_t cols_p) {
  const int64_t rows = x.dim(0), cols = x.dim(1), c = x.dim(2);
  if (rows == rows_p && cols == cols_p) return x;
  Tensor out = Tensor::zeros({rows_p, cols_p, c});
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < rows; ++i)
    std::memcpy(out.f32() + i * cols_p * c, x.f32() + i * cols * c, cols * c * kF);
  return out;
}

// The top-left [rows, cols, c] corner of x [rows_p, cols_p, c]; x itself when nothing is cropped.
Tensor crop3(const Tensor& x, int64_t rows, int64_t cols) {
  const int64_t rows_p = x.dim(0), cols_p = x.dim(1), c = x.dim(2);
  if (rows == rows_p && cols == cols_p) return x;
  Tensor out = Tensor::empty({rows, cols, c});
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < rows; ++i)
    std::memcpy(out.f32() + i * cols * c, x.f32() + i * cols_p * c, cols * c * kF);
  return out;
}

// ---- Layout changes (all-to-all). Each takes its input by value so that it dies after packing:
// at most two shards' worth of buffers are live.

// m by sequences [s_loc, r_pad, c] -> m by residues [s_pad, r_loc, c].
Tensor msa_rows_to_cols(Tensor in, const DapLayout& l, const dist::Communicator& comm) {
  const int64_t sl = l.s_loc, rl = l.r_loc, rp = l.r_pad, c = in.dim(2);
  Tensor send = Tensor::empty({l.n, sl, rl, c});  // block q: rank q's residue columns
  float* sp = send.f32();
  const float* ip = in.f32();
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t q = 0; q < l.n; ++q)
    for (int64_t i = 0; i < sl; ++i)
      std::memcpy(sp + (q * sl + i) * rl * c, ip + (i * rp + q * rl) * c, rl * c * kF);
  in = Tensor();
  Tensor out = Tensor::empty({l.s_pad, rl, c});  // block p: rank p's sequences
  comm.all_to_all(sp, out.f32(), sl * rl * c);
  return out;
}

// out [rows, n*w, c] from n received blocks [n, rows, w, c]: block p fills columns p*w ..
// (p+1)*w of every row.
void join_column_blocks(const float* blocks, int64_t n, int64_t rows, int64_t w, int64_t c,
                        float* out) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t p = 0; p < n; ++p)
    for (int64_t i = 0; i < rows; ++i)
      std::memcpy(out + (i * n * w + p * w) * c, blocks + (p * rows + i) * w * c, w * c * kF);
}

// m by residues [s_pad, r_loc, c] -> m by sequences [s_loc, r_pad, c].
Tensor msa_cols_to_rows(Tensor in, const DapLayout& l, const dist::Communicator& comm) {
  const int64_t sl = l.s_loc, rl = l.r_loc, rp = l.r_pad, c = in.dim(2);
  Tensor recv = Tensor::empty({l.n, sl, rl, c});  // block p: rank p's residue columns
  comm.all_to_all(in.f32(), recv.f32(), sl * rl * c);
  in = Tensor();
  Tensor out = Tensor::empty({sl, rp, c});
  join_column_blocks(recv.f32(), l.n, sl, rl, c, out.f32());
  return out;
}

// Rows of X [r_loc, r_pad, c] -> rows of X^T [r_loc, r_pad, c] (X^T[b, a] = X[a, b]).
Tensor pair_transpose(Tensor in, const DapLayout& l, const dist::Communicator& comm) {
  const int64_t rl = l.r_loc, rp = l.r_pad, c = in.dim(2);
  Tensor send = Tensor::empty({l.n, rl, rl, c});  // send[q][b][a] = X[a, q*rl + b]
  float* sp = send.f32();
  const float* ip = in.f32();
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t q = 0; q < l.n; ++q)
    for (int64_t b = 0; b < rl; ++b)
      for (int64_t a = 0; a < rl; ++a)
        std::memcpy(sp + ((q * rl + b) * rl + a) * c, ip + (a * rp + q * rl + b) * c, c * kF);
  in = Tensor();
  Tensor recv = Tensor::empty({l.n, rl, rl, c});  // recv[p][b][a] = X[p*rl + a, rank*rl + b]
  comm.all_to_all(sp, recv.f32(), rl * rl * c);
  send = Tensor();
  Tensor out = Tensor::empty({rl, rp, c});
  join_column_blocks(recv.f32(), l.n, rl, rl, c, out.f32());
  return out;
}

DapLayerLayout dap_layer_layout(const LayerDesc& ly) {
  switch (ly.kind) {
    case LayerKind::kMsaRowAttention:  // a single stream: its tokens (the queries) sharded
      return {ly.single ? Shard::kMsaByRes : Shard::kMsaBySeq, Shard::kPairRows};
    case LayerKind::kMsaColumnAttention:
    case LayerKind::kMsaColumnGlobalAttention:
      return {Shard::kMsaByRes, std::nullopt};
    case LayerKind::kTransition:
    case LayerKind::kMaskedTransition:
    case LayerKind::kSwiGluTransition:
      return {};
    case LayerKind::kOuterProductMean:
      return {Shard::kMsaByRes, Shard::kPairRows};
    case LayerKind::kTriangleMultiplication:
    case LayerKind::kTriangleAttention:
      return {std::nullopt, ly.transposed ? Shard::kPairRowsT : Shard::kPairRows};
  }
  FC_CHECK_MSG(false, std::string("layer ") + ly.name + " has no DAP form");
  return {};
}

int dap_last_use(const BlockTable& t, Stream x) {
  int last = -1;
  for (int i = 0; i < t.count; ++i)
    if (t.layers[i].updates == x || t.layers[i].reads == x) last = i;
  return last;
}

Shard dap_boundary_m(const BlockTable& t) {
  for (const LayerDesc& ly : t)
    if (ly.single && ly.updates == Stream::kM) return Shard::kMsaByRes;
  return Shard::kMsaBySeq;
}

std::vector<std::pair<Shard, Shard>> dap_block_layouts(const BlockTable& t) {
  return partition_block_layouts(t, std::vector<Split>(t.count, Split::kDap));
}

void dap_to_layout(Tensor* x, Shard* how, Shard want, const DapLayout& l,
                   const dist::Communicator& comm) {
  if (*how == want) return;
  if (want == Shard::kMsaFull || want == Shard::kPairFull || *how == Shard::kMsaFull ||
      *how == Shard::kPairFull)
    return full_to_layout(x, how, want, l, comm);
  if (want == Shard::kMsaBySeq)
    *x = msa_cols_to_rows(std::move(*x), l, comm);
  else if (want == Shard::kMsaByRes)
    *x = msa_rows_to_cols(std::move(*x), l, comm);
  else
    *x = pair_transpose(std::move(*x), l, comm);
  *how = want;
}

void dap_layer_forward(const LayerDesc& ly, const void* bw, const DapShards& sh,
                       const dist::Communicator& comm, const ShardGather& gather, DapStreams* st) {
  const EvoformerConfig& cfg = *sh.full.cfg;
  const DapLayout& l = sh.l;
  const int64_t sl = l.s_loc, rl = l.r_loc, sp = l.s_pad, rp = l.r_pad, me = l.rank;
  const bool zt = st->z_how == Shard::kPairRowsT;
  switch (ly.kind) {
    case LayerKind::kMsaRowAttention: {
      const MsaRowAttentionW& w = layer_params<MsaRowAttentionW>(ly, bw);
      if (ly.single)  // queries: this rank's tokens [1, r_loc, c]; key bias: row 0 of msa_bias
        return single_attention_shard(w, sh.full, cfg.no_heads_msa, cfg.c_hidden_msa_att,
                                      st->m.f32(), rl, st->z.f32(), sh.msa_bias.f32(), gather);
      Tensor bias = gathered_pair_bias(w.ln_z, w.lin_z, sh.full, l, st->z.f32(),
                                       comm);  // [H_m, r_pad, r_pad]
      return attention_rows(w.ln_m, w.mha, cfg.no_heads_msa, cfg.c_hidden_msa_att, sh.row,
                            st->m.f32(), sl, rp, cfg.c_m, sh.msa_bias_rows, bias.f32());
    }
    case LayerKind::kMsaColumnAttention:
      return msa_column_attention(layer_params<MsaColumnAttentionW>(ly, bw), sh.col, st->m.f32());
    case LayerKind::kTransition: {
      const TransitionW& w = layer_params<TransitionW>(ly, bw);
      if (ly.updates == Stream::kZ) return transition(w, sh.full, st->z.f32(), rl * rp, cfg.c_z);
      return st->m_how == Shard::kMsaByRes ? transition(w, sh.col, st->m.f32(), sp * rl, cfg.c_m)
                                           : transition(w, sh.row, st->m.f32(), sl * rp, cfg.c_m);
    }
    case LayerKind::kOuterProductMean:
      return outer_product_mean_shard(layer_params<OuterProductMeanW>(ly, bw), sh.full, st->m.f32(),
                                      me * rl, rl, sh.msa_mask_cols.f32(), gather, st->z.f32());
    case LayerKind::kTriangleMultiplication:
      return triangle_multiplication_shard(
          layer_params<TriangleMultiplicationW>(ly, bw), sh.full, zt, rl,
          (zt ? sh.pair_mask_t : sh.pair_mask).f32() + me * rl * rp, gather, st->z.f32());
    case LayerKind::kTriangleAttention: {
      const TriangleAttentionW& w = layer_params<TriangleAttentionW>(ly, bw);
      Tensor bias = gathered_pair_bias(w.ln, w.lin, sh.full, l, st->z.f32(),
                                       comm);  // [H_p, r_pad, r_pad]
      return attention_rows(w.ln, w.mha, cfg.no_heads_pair, cfg.c_hidden_pair_att, sh.full,
                            st->z.f32(), rl, rp, cfg.c_z,
                            zt ? sh.pair_bias_t_rows : sh.pair_bias_rows, bias.f32());
    }
    case LayerKind::kMsaColumnGlobalAttention:  // per residue column: no communication
      return msa_column_global_attention(layer_params<MsaColumnGlobalAttentionW>(ly, bw), sh.col,
                                         sh.col.global_eps, st->m.f32());
    case LayerKind::kMaskedTransition:  // the mask rows of the current layout (sh.row / sh.col)
      return masked_msa_transition(layer_params<TransitionW>(ly, bw),
                                   st->m_how == Shard::kMsaByRes ? sh.col : sh.row, st->m.f32());
    case LayerKind::kSwiGluTransition: {  // pointwise: the current layout's rows
      Tensor& x = ly.updates == Stream::kZ ? st->z : st->m;
      const int64_t c = ly.updates == Stream::kZ ? cfg.c_z : cfg.c_m;
      return swiglu_transition(layer_params<SwiGluTransitionW>(ly, bw), sh.full, x.f32(),
                               x.numel() / c, c);
    }
  }
  FC_CHECK_MSG(false, std::string("layer ") + ly.name + " has no DAP form");
}

DapLayout dap_layout(int64_t s, int64_t r, int n, int rank) {
  DapLayout l;
  l.n = n;
  l.rank = rank;
  l.s = s;
  l.r = r;
  l.s_loc = (s + n - 1) / n;
  l.r_loc = (r + n - 1) / n;
  l.s_pad = l.s_loc * n;
  l.r_pad = l.r_loc * n;
  return l;
}

DapBlockVolume dap_block_volume(const EvoformerConfig& cfg, const DapLayout& l) {
  const int64_t n1 = l.n - 1, sl = l.s_loc, rl = l.r_loc, sp = l.s_pad, rp = l.r_pad;
  DapBlockVolume v;
  // 2 x m (sequences <-> residues), 4 x z (rows <-> columns): N-1 blocks each.
  v.all_to_all_bytes = n1 * (2 * sl * rl * cfg.c_m + 4 * rl * rl * cfg.c_z) * kF;
  // Row-attention and two tri-att biases [r_loc*r_pad, H], OPM b [s_pad, r_loc, c_o], two tri-mul
  // right projections [c_t, r_loc, r_pad].
  v.all_gather_bytes = n1 *
                       (rl * rp * (cfg.no_heads_msa + 2 * cfg.no_heads_pair) +
                        sp * rl * cfg.c_hidden_opm + 2 * cfg.c_hidden_mul * rl * rp) *
                       kF;
  return v;
}

DapBlockVolume dap_block_backward_volume(const EvoformerConfig& cfg, const DapLayout& l,
                                         Recompute policy) {
  const int64_t n1 = l.n - 1, rl = l.r_loc, sp = l.s_pad, rp = l.r_pad;
  const DapBlockVolume f = dap_block_volume(cfg, l);
  const int64_t bias = n1 * rl * rp * (cfg.no_heads_msa + 2 * cfg.no_heads_pair) * kF;
  const int64_t operands = n1 * (sp * rl * cfg.c_hidden_opm + 2 * cfg.c_hidden_mul * rl * rp) * kF;
  const int64_t products = n1 * 2 * cfg.c_hidden_mul * rl * rp * kF;
  DapBlockVolume v;
  // The forward's all-to-alls reversed, plus one of m to rebuild the OPM's input.
  v.all_to_all_bytes = f.all_to_all_bytes + n1 * l.s_loc * rl * cfg.c_m * kF;
  v.reduce_scatter_bytes = f.all_gather_bytes;
  v.all_gather_bytes = operands;
  if (policy == Recompute::kModule) v.all_gather_bytes += bias + products;
  if (policy == Recompute::kBlock) {
    v.all_to_all_bytes += f.all_to_all_bytes;
    v.all_gather_bytes += f.all_gather_bytes;
  }
  return v;
}

DapShards make_dap_shards(const EvoformerConfig& cfg, const DapLayout& l, Tensor msa_mask,
                          Tensor pair_mask, int64_t chunk, int64_t chunk_target_bytes,
                          int threads) {
  const int64_t sp = l.s_pad, rp = l.r_pad, sl = l.s_loc, rl = l.r_loc;
  FC_CHECK_MSG(msa_mask.numel() == sp * rp && pair_mask.numel() == rp * rp,
               "DAP masks must be padded to [s_pad, r_pad] and [r_pad, r_pad]");
  DapShards d;
  d.l = l;
  d.msa_mask = std::move(msa_mask);
  d.pair_mask = std::move(pair_mask);
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
  d.row.msa_mask = d.msa_mask.f32() + l.rank * sl * rp;
  d.col = base;
  d.col.s = sp;
  d.col.r = rl;
  d.col.msa_mask = d.msa_mask_cols.f32();
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

Status share_padded_masks(const EvoformerConfig& cfg, const dist::Communicator& comm,
                          const Tensor& m, const Tensor& z, const Tensor& msa_mask,
                          const Tensor& pair_mask, const std::function<Status()>& root_check,
                          DapLayout* layout, Tensor* msa_p, Tensor* pair_p) {
  const int me = comm.rank();
  int64_t dims[2] = {0, 0};  // s, r
  std::string err;
  StackInputs in;
  if (me == 0) {
    Status st = prepare_inputs(cfg, m, z, msa_mask, pair_mask, &in);
    if (st.ok() && root_check) st = root_check();
    if (st.ok()) {
      dims[0] = in.s;
      dims[1] = in.r;
    } else {
      err = st.message();
    }
  }
  comm.broadcast_string(&err, 0);
  if (!err.empty()) return Status::InvalidArgument(err);
  comm.broadcast_bytes(dims, sizeof(dims), 0);
  const DapLayout l = dap_layout(dims[0], dims[1], comm.size(), me);
  *msa_p = Tensor::zeros({l.s_pad, l.r_pad});
  *pair_p = Tensor::zeros({l.r_pad, l.r_pad});
  if (me == 0) {
    for (int64_t i = 0; i < l.s; ++i)
      std::memcpy(msa_p->f32() + i * l.r_pad, in.msa_mask.f32() + i * l.r, l.r * kF);
    for (int64_t i = 0; i < l.r; ++i)
      std::memcpy(pair_p->f32() + i * l.r_pad, in.pair_mask.f32() + i * l.r, l.r * kF);
  }
  comm.broadcast(msa_p->f32(), l.s_pad * l.r_pad, 0);
  comm.broadcast(pair_p->f32(), l.r_pad * l.r_pad, 0);
  *layout = l;
  return Status::OK();
}

namespace {
// dap_forward of a stack whose blocks follow `table` (EvoformerStack or ExtraMsaStack; s_out is
// the Evoformer's single output, nullptr for the ExtraMSA stack).
template <typename Stack>
Status dap_forward_impl(const Stack& stack, const BlockTable& table, float global_eps,
                        const dist::Communicator& comm, Tensor& m, Tensor& z,
                        const Tensor& msa_mask, const Tensor& pair_mask, Tensor* s_out,
                        const DapOptions& opts, DapStats* stats) {
  MemoryScope scope;
  const dist::CommStats stats0 = comm.stats();
  const EvoformerConfig& cfg = stack.config();
  const std::string cfg_json = cfg.to_json();
  if (!comm.all_equal(hash_bytes(cfg_json.data(), cfg_json.size())))
    return Status::InvalidArgument("DAP ranks hold different model configurations");
  const int n = comm.size(), me = comm.rank();
  const int64_t cm = cfg.c_m, cz = cfg.c_z;
  std::vector<std::vector<Split>> splits;  // per block and layer; empty: pure DAP
  FC_RETURN_IF_ERROR(resolve_partition(table, opts.partitions, cfg, n, &splits));
  {
    ForwardOptions fo;
    fo.dtype = opts.dtype;
    FC_RETURN_IF_ERROR(check_forward_dtype(fo).WithContext("DAP"));
    if (!comm.all_equal(static_cast<uint64_t>(opts.dtype)))
      return Status::InvalidArgument("DAP ranks were given different dtypes");
  }

  // The root validates its inputs and shares the sizes (or its error) with every rank.
  DapLayout l;
  Tensor msa_p, pair_p;  // padded masks [s_pad, r_pad], [r_pad, r_pad]
  FC_RETURN_IF_ERROR(
      share_padded_masks(cfg, comm, m, z, msa_mask, pair_mask, nullptr, &l, &msa_p, &pair_p));
  const int64_t sl = l.s_loc, rl = l.r_loc, sp = l.s_pad, rp = l.r_pad;
  DapShards sh = make_dap_shards(cfg, l, std::move(msa_p), std::move(pair_p), opts.chunk,
                                 opts.chunk_target_bytes, num_threads());
  for (BlockContext* c : {&sh.row, &sh.col, &sh.full}) {
    c->global_eps = global_eps;
    c->dtype = opts.dtype;
  }

  // Shards: m by sequences [s_loc, r_pad, c_m], z by rows [r_loc, r_pad, c_z].
  DapStreams st;
  st.m = Tensor::empty({sl, rp, cm});
  st.z = Tensor::empty({rl, rp, cz});
  Tensor& mr = st.m;
  Tensor& zr = st.z;
  {
    Tensor mp, zp;  // padded inputs on the root: [s_pad, r_pad, c_m], [r_pad, r_pad, c_z]
    if (me == 0) {
      mp = pad3(m, sp, rp);
      m = Tensor();
      zp = pad3(z, rp, rp);
      z = Tensor();
    }
    comm.scatter(me == 0 ? mp.f32() : nullptr, mr.f32(), sl * rp * cm, 0);
    mp = Tensor();
    comm.scatter(me == 0 ? zp.f32() : nullptr, zr.f32(), rl * rp * cz, 0);
  }

  // Contexts of the shards (masks in full; the modules see the shard's sizes).
  const int64_t mz_loc = (sl * rp * cm + rl * rp * cz) * kF;
  const ShardGather gather{
      n, [&](const float* mine, int64_t count, float* all) { comm.all_gather(mine, all, count); }};

  const bool tracing = opts.trace != nullptr;
  if (!comm.all_equal(tracing))
    return Status::InvalidArgument("DapOptions::trace must be set on every rank or on none");
  const dist::Communicator tc = tracing ? comm.split(0, me) : comm;  // trace gathers only
  int blk = 0;
  auto trace = [&](const char* module, const Tensor& t, Shard how) {
    if (!tracing) return;
    const bool is_m = how == Shard::kMsaBySeq || how == Shard::kMsaByRes || how == Shard::kMsaFull;
    const Tensor full = assemble(t, how, l, tc);
    if (me == 0) opts.trace(blk, module, is_m ? "m" : "z", full);
  };

  const dist::CommStats before_blocks = comm.stats();
  // The block table's layers, each in its shard layout: an all-to-all where the layout changes,
  // and each stream after its last use in the block into the layout the next block starts with
  // (partition_exit_layouts; pure DAP and after the last block: the block boundary).
  const int last_m = dap_last_use(table, Stream::kM), last_z = dap_last_use(table, Stream::kZ);
  for (int b = 0; b < cfg.no_blocks; ++b) {
    blk = b;
    const BlockLayouts exit = partition_exit_layouts(table, splits, b);
    for (int i = 0; i < table.count; ++i) {
      const LayerDesc& ly = table.layers[i];
      const Split split = splits.empty() ? Split::kDap : splits[b][i];
      LayerClock clock(i, comm);
      const DapLayerLayout want = partition_layer_layout(ly, split, st.m_how, st.z_how);
      if (want.m) dap_to_layout(&st.m, &st.m_how, *want.m, l, comm);
      if (want.z) dap_to_layout(&st.z, &st.z_how, *want.z, l, comm);
      clock.change();
      if (split == Split::kDap)
        dap_layer_forward(ly, &StackAccess::block(stack, b), sh, comm, gather, &st);
      else {
        const ReduceTo rt =
            partition_reduce_to(table, splits[b], i, &st.m, &st.z, &st.m_how, &st.z_how, &exit);
        partition_layer_forward(table, ly, &StackAccess::block(stack, b), sh, comm, split,
                                st.m.defined() ? st.m.f32() : nullptr, st.z.f32(), &rt);
      }
      clock.layer();
      const bool is_m = ly.updates == Stream::kM;
      trace(ly.name, is_m ? st.m : st.z, is_m ? st.m_how : st.z_how);
      clock.skip();  // the trace's gathers are not the layer's
      if (i == last_m) dap_to_layout(&st.m, &st.m_how, exit.first, l, comm);
      if (i == last_z) dap_to_layout(&st.z, &st.z_how, exit.second, l, comm);
      clock.change();
    }
  }
  const dist::CommStats after_blocks = comm.stats();

  // Outputs back to the root, without the padding.
  {
    Tensor all = me == 0 ? Tensor::empty({sp, rp, cm}) : Tensor();  // padded m on the root
    comm.gather(mr.f32(), me == 0 ? all.f32() : nullptr, sl * rp * cm, 0);
    mr = Tensor();
    if (me == 0) m = crop3(all, l.s, l.r);
  }
  {
    Tensor all = me == 0 ? Tensor::empty({rp, rp, cz}) : Tensor();  // padded z on the root
    comm.gather(zr.f32(), me == 0 ? all.f32() : nullptr, rl * rp * cz, 0);
    zr = Tensor();
    if (me == 0) z = crop3(all, l.r, l.r);
  }
  if constexpr (std::is_same_v<Stack, EvoformerStack>) {
    if (me == 0 && s_out != nullptr) {
      *s_out = Tensor::empty({l.r, cfg.c_s});
      kern::linear(m.f32(), cm, l.r, cm, stack.linear_weight().f32(), stack.linear_bias().f32(),
                   cfg.c_s, s_out->f32(), cfg.c_s);
    }
  }
  if (stats != nullptr) {
    stats->total = comm.stats().since(stats0);
    stats->blocks = after_blocks.since(before_blocks);
    stats->peak_bytes = scope.peak();
    stats->work_peak_bytes = scope.peak_above_start();
    stats->shard_bytes = mz_loc;
  }
  return Status::OK();
}

// dap_share_stack; `file` may carry metadata the stack's load reads (ExtraMSA: the eps).
template <typename Stack>
Status share_stack_impl(const dist::Communicator& comm, Stack* stack, TensorFile file) {
  static_assert(std::is_trivially_copyable_v<EvoformerConfig>);
  EvoformerConfig cfg = stack->config();
  comm.broadcast_bytes(&cfg, sizeof(cfg), 0);
  // Names and shapes ("name d0 d1 ...\n" per tensor), then the tensors in that order.
  std::string header;
  if (comm.rank() == 0) {
    stack->export_weights(&file);
    std::ostringstream h;
    for (const std::string& name : file.names) {
      h << name;
      for (int64_t d : file.tensors.at(name).shape()) h << ' ' << d;
      h << '\n';
    }
    header = h.str();
  }
  comm.broadcast_string(&header, 0);
  if (comm.rank() != 0) {
    std::istringstream h(header);
    std::string line;
    while (std::getline(h, line)) {
      std::istringstream ls(line);
      std::string name;
      ls >> name;
      Shape shape;
      for (int64_t d; ls >> d;) shape.push_back(d);
      file.put(name, Tensor::empty(shape));
    }
  }
  for (const std::string& name : file.names) {
    Tensor t = file.tensors.at(name).contiguous();
    comm.broadcast(t.f32(), t.numel(), 0);
    if (comm.rank() != 0) file.put(name, t);
  }
  if (comm.rank() == 0) return Status::OK();
  return Stack::load(cfg, file, stack);
}
}  // namespace

Status dap_forward(const EvoformerStack& stack, const dist::Communicator& comm, Tensor& m,
                   Tensor& z, const Tensor& msa_mask, const Tensor& pair_mask, Tensor* s_out,
                   const DapOptions& opts, DapStats* stats) {
  return dap_forward_impl(stack, kEvoformerBlock, ExtraMsaStack::kDefaultGlobalEps, comm, m, z,
                          msa_mask, pair_mask, s_out, opts, stats);
}

Status dap_forward(const ExtraMsaStack& stack, const dist::Communicator& comm, Tensor& m, Tensor& z,
                   const Tensor& msa_mask, const Tensor& pair_mask, const DapOptions& opts,
                   DapStats* stats) {
  return dap_forward_impl(stack, kExtraMsaBlock, stack.global_eps(), comm, m, z, msa_mask,
                          pair_mask, nullptr, opts, stats);
}

void dap_run_blocks(const BlockTable& t, const std::vector<const void*>& blocks,
                    const DapShards& sh, const dist::Communicator& comm, Tensor* m, Tensor* z) {
  const DapLayout& l = sh.l;
  const ShardGather gather{l.n, [&](const float* mine, int64_t count, float* all) {
                             comm.all_gather(mine, all, count);
                           }};
  DapStreams st;
  st.m_how = dap_boundary_m(t);
  if (m != nullptr) st.m = std::move(*m);
  st.z = std::move(*z);
  const int last_m = dap_last_use(t, Stream::kM), last_z = dap_last_use(t, Stream::kZ);
  for (const void* bw : blocks)
    for (int i = 0; i < t.count; ++i) {
      const LayerDesc& ly = t.layers[i];
      const DapLayerLayout want = dap_layer_layout(ly);
      if (want.m) dap_to_layout(&st.m, &st.m_how, *want.m, l, comm);
      if (want.z) dap_to_layout(&st.z, &st.z_how, *want.z, l, comm);
      dap_layer_forward(ly, bw, sh, comm, gather, &st);
      if (i == last_m) dap_to_layout(&st.m, &st.m_how, dap_boundary_m(t), l, comm);
      if (i == last_z) dap_to_layout(&st.z, &st.z_how, Shard::kPairRows, l, comm);
    }
  if (m != nullptr) *m = std::move(st.m);
  *z = std::move(st.z);
}

Status dap_share_stack(const dist::Communicator& comm, EvoformerStack* stack) {
  return share_stack_impl(comm, stack, TensorFile());
}

Status dap_share_stack(const dist::Communicator& comm, ExtraMsaStack* stack) {
  float eps = stack->global_eps();
  comm.broadcast_bytes(&eps, sizeof(eps), 0);
  TensorFile file;  // the eps as ExtraMsaStack::load reads it from metadata
  file.metadata["constants"] = nlohmann::json{{"global_attention_eps", double(eps)}}.dump();
  return share_stack_impl(comm, stack, std::move(file));
}

}  // namespace fc
