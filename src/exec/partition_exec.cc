// Per-layer partitioning over a DAP group: layouts, layout changes to and from whole streams, and
// the heads / channels / replicated forms of a layer (src/exec/partition.h).
#include <algorithm>
#include <cstring>
#include <string>

#include "exec/partition.h"
#include "foldcube/partition.h"
#include "model/weights.h"

namespace fc {

namespace {
constexpr int64_t kF = sizeof(float);

bool is_full(Shard h) { return h == Shard::kMsaFull || h == Shard::kPairFull; }

bool uses(const LayerDesc& ly, Stream x) { return ly.updates == x || ly.reads == x; }

// ---- Weight slicing ----------------------------------------------------------------------------
// How a parameter is divided over the ranks: whole (every rank holds it; its gradient is summed
// over the ranks), rows / columns (rank k holds units [lo, lo + n) of each of `sections` equal
// sections of axis 0, or of axis 1; one unit is `unit` rows or columns), root (the output bias of
// a row-parallel projection: the root holds it, the others zeros, so that the sum adds it once),
// rows of the first section (as rows, in the first of `sections` equal sections of axis 0; the
// others whole: the OPM's a | b projection, a split, b whole).
enum class Cut { kWhole, kRows, kCols, kRoot, kRowsFirst };

// Visits the parameters of a layer's weight struct pairwise in a and b: f(Tensor& a, Tensor& b,
// Cut, sections, unit). Undefined tensors are skipped by the callers of f.
template <typename F>
void visit(LayerNormW& a, LayerNormW& b, F& f) {
  f(a.w, b.w, Cut::kWhole, 1, 1);
  f(a.b, b.b, Cut::kWhole, 1, 1);
}
template <typename F>
void visit(GatedAttentionW& a, GatedAttentionW& b, int64_t C, F& f) {
  f(a.w_qkvg, b.w_qkvg, Cut::kRows, 4, C);  // rows q | k | v | g, head-major within each
  f(a.b_qkvg, b.b_qkvg, Cut::kRows, 4, C);
  f(a.o.w, b.o.w, Cut::kCols, 1, C);
  f(a.o.b, b.o.b, Cut::kRoot, 1, 1);
}
template <typename F>
void visit(MsaRowAttentionW& a, MsaRowAttentionW& b, const EvoformerConfig& cfg, F& f) {
  visit(a.ln_m, b.ln_m, f);
  visit(a.ln_z, b.ln_z, f);
  f(a.lin_z.w, b.lin_z.w, Cut::kRows, 1, 1);  // [H_m, c_z]: one row per head
  f(a.lin_z.b, b.lin_z.b, Cut::kRows, 1, 1);
  visit(a.mha, b.mha, cfg.c_hidden_msa_att, f);
}
template <typename F>
void visit(MsaColumnAttentionW& a, MsaColumnAttentionW& b, const EvoformerConfig& cfg, F& f) {
  visit(a.ln_m, b.ln_m, f);
  visit(a.mha, b.mha, cfg.c_hidden_msa_att, f);
}
template <typename F>
void visit(TriangleAttentionW& a, TriangleAttentionW& b, const EvoformerConfig& cfg, F& f) {
  visit(a.ln, b.ln, f);
  f(a.lin.w, b.lin.w, Cut::kRows, 1, 1);  // [H_p, c_z]
  f(a.lin.b, b.lin.b, Cut::kRows, 1, 1);
  visit(a.mha, b.mha, cfg.c_hidden_pair_att, f);
}
template <typename F>
void visit(TransitionW& a, TransitionW& b, const EvoformerConfig&, F& f) {
  visit(a.ln, b.ln, f);
  f(a.l1.w, b.l1.w, Cut::kRows, 1, 1);  // [n*c, c]: column-parallel
  f(a.l1.b, b.l1.b, Cut::kRows, 1, 1);
  f(a.l2.w, b.l2.w, Cut::kCols, 1, 1);  // [c, n*c]: row-parallel
  f(a.l2.b, b.l2.b, Cut::kRoot, 1, 1);
}
// Layers without a sliced form: every parameter whole (for zero gradients of their shapes).
template <typename F>
void visit(LinearW& a, LinearW& b, F& f) {
  f(a.w, b.w, Cut::kWhole, 1, 1);
  f(a.b, b.b, Cut::kWhole, 1, 1);
}
// Channel-parallel OPM: a's channels c split (rows of linear_1, the columns (c, e) of
// linear_out: c_o columns per channel), b whole.
template <typename F>
void visit(OuterProductMeanW& a, OuterProductMeanW& b, const EvoformerConfig& cfg, F& f) {
  visit(a.ln, b.ln, f);
  f(a.l12.w, b.l12.w, Cut::kRowsFirst, 2, 1);  // [2 c_o, c_m]: rows a | b
  f(a.l12.b, b.l12.b, Cut::kRowsFirst, 2, 1);
  f(a.out.w, b.out.w, Cut::kCols, 1, cfg.c_hidden_opm);  // [c_z, c_o * c_o]
  f(a.out.b, b.out.b, Cut::kRoot, 1, 1);
}
// Channel-parallel triangle multiplication: the channels of a and b (rows of each of a_p | a_g |
// b_p | b_g), of LN_out and the columns of linear_z; LN_in and the gate whole.
template <typename F>
void visit(TriangleMultiplicationW& a, TriangleMultiplicationW& b, const EvoformerConfig&, F& f) {
  visit(a.ln_in, b.ln_in, f);
  f(a.ab.w, b.ab.w, Cut::kRows, 4, 1);  // [4 c_t, c_z]
  f(a.ab.b, b.ab.b, Cut::kRows, 4, 1);
  f(a.ln_out.w, b.ln_out.w, Cut::kRows, 1, 1);  // [c_t]
  f(a.ln_out.b, b.ln_out.b, Cut::kRows, 1, 1);
  f(a.lin_z.w, b.lin_z.w, Cut::kCols, 1, 1);  // [c_z, c_t]: row-parallel
  f(a.lin_z.b, b.lin_z.b, Cut::kRoot, 1, 1);
  visit(a.lin_g, b.lin_g, f);
}
template <typename F>
void visit(MsaColumnGlobalAttentionW& a, MsaColumnGlobalAttentionW& b, const EvoformerConfig&,
           F& f) {
  visit(a.ln_m, b.ln_m, f);
  visit(a.q, b.q, f);
  visit(a.kvg, b.kvg, f);
  visit(a.o, b.o, f);
}
// The layer's parameters inside block structs a and b (the table's weight struct).
template <typename F>
void visit_layer(const LayerDesc& ly, void* a, void* b, const EvoformerConfig& cfg, F f) {
  switch (ly.kind) {
    case LayerKind::kMsaRowAttention:
      return visit(layer_params<MsaRowAttentionW>(ly, a), layer_params<MsaRowAttentionW>(ly, b),
                   cfg, f);
    case LayerKind::kMsaColumnAttention:
      return visit(layer_params<MsaColumnAttentionW>(ly, a),
                   layer_params<MsaColumnAttentionW>(ly, b), cfg, f);
    case LayerKind::kTriangleAttention:
      return visit(layer_params<TriangleAttentionW>(ly, a), layer_params<TriangleAttentionW>(ly, b),
                   cfg, f);
    case LayerKind::kTransition:
    case LayerKind::kMaskedTransition:
      return visit(layer_params<TransitionW>(ly, a), layer_params<TransitionW>(ly, b), cfg, f);
    case LayerKind::kOuterProductMean:
      return visit(layer_params<OuterProductMeanW>(ly, a), layer_params<OuterProductMeanW>(ly, b),
                   cfg, f);
    case LayerKind::kTriangleMultiplication:
      return visit(layer_params<TriangleMultiplicationW>(ly, a),
                   layer_params<TriangleMultiplicationW>(ly, b), cfg, f);
    case LayerKind::kMsaColumnGlobalAttention:
      return visit(layer_params<MsaColumnGlobalAttentionW>(ly, a),
                   layer_params<MsaColumnGlobalAttentionW>(ly, b), cfg, f);
    case LayerKind::kSwiGluTransition:
      break;
  }
  FC_CHECK_MSG(false, std::string("layer ") + ly.name + " has no parameter visitor");
}

// Units [lo, lo + n) of this rank.
struct Part {
  int64_t lo = 0, n = 0;
};

// The heads or channels a heads / channels layer divides over the ranks.
int64_t split_units(const LayerDesc& ly, const void* bw, const EvoformerConfig& cfg, Split s) {
  if (s == Split::kHeads)
    return ly.kind == LayerKind::kTriangleAttention ? cfg.no_heads_pair : cfg.no_heads_msa;
  if (ly.kind == LayerKind::kTriangleMultiplication) return cfg.c_hidden_mul;
  if (ly.kind == LayerKind::kOuterProductMean) return cfg.c_hidden_opm;
  return layer_params<TransitionW>(ly, bw).l1.w.dim(0);
}

// This rank's heads or hidden channels of layer ly (block weights bw): units ceil(k*T/N) ..
// ceil((k+1)*T/N), so that the root (which adds the row-parallel output bias) always has some.
Part rank_part(const LayerDesc& ly, const void* bw, const EvoformerConfig& cfg, Split s,
               const DapLayout& l) {
  const int64_t total = split_units(ly, bw, cfg, s);
  Part p;
  p.lo = (total * l.rank + l.n - 1) / l.n;
  p.n = (total * (l.rank + 1) + l.n - 1) / l.n - p.lo;
  return p;
}

// Rows (axis 0) or columns (axis 1) [lo*unit, (lo+n)*unit) of each of `sections` sections of t.
Tensor take(const Tensor& t0, Cut cut, int sections, int64_t unit, Part p) {
  const Tensor t = t0.contiguous();
  const int64_t rows = t.dim(0), inner = t.numel() / rows;
  const float* src = t.f32();
  if (cut == Cut::kRowsFirst) {
    const int64_t sec = rows / sections, take_rows = p.n * unit;
    Shape sh = t.shape();
    sh[0] = take_rows + (sections - 1) * sec;
    Tensor out = Tensor::empty(sh);  // [n * unit + (sections - 1) * sec, ...]
    std::memcpy(out.f32(), src + p.lo * unit * inner, take_rows * inner * kF);
    std::memcpy(out.f32() + take_rows * inner, src + sec * inner, (rows - sec) * inner * kF);
    return out;
  }
  if (cut == Cut::kRows) {
    const int64_t sec = rows / sections, take_rows = p.n * unit;
    Shape sh = t.shape();
    sh[0] = sections * take_rows;
    Tensor out = Tensor::empty(sh);  // [sections * n * unit, ...]
    for (int q = 0; q < sections; ++q)
      std::memcpy(out.f32() + q * take_rows * inner, src + (q * sec + p.lo * unit) * inner,
                  take_rows * inner * kF);
    return out;
  }
  const int64_t cols = inner, w = p.n * unit;
  Tensor out = Tensor::empty({rows, w});  // [rows, n * unit]
  for (int64_t i = 0; i < rows; ++i)
    std::memcpy(out.f32() + i * w, src + i * cols + p.lo * unit, w * kF);
  return out;
}

// dst += src placed where take() took it from.
void put_add(Tensor& dst, const Tensor& src, Cut cut, int sections, int64_t unit, Part p) {
  FC_CHECK_MSG(dst.is_contiguous(), "parameter gradient is not contiguous");
  float* d = dst.f32();
  const float* s = src.f32();
  const int64_t rows = dst.dim(0), inner = dst.numel() / rows;
  if (cut == Cut::kRowsFirst) {  // the first section's slice, then the whole other sections
    const int64_t sec = rows / sections, n = p.n * unit * inner;
    for (int64_t i = 0; i < n; ++i) d[p.lo * unit * inner + i] += s[i];
    for (int64_t i = 0; i < (rows - sec) * inner; ++i) d[sec * inner + i] += s[n + i];
    return;
  }
  if (cut == Cut::kRows) {
    const int64_t sec = rows / sections, n = p.n * unit * inner;
    for (int q = 0; q < sections; ++q)
      for (int64_t i = 0; i < n; ++i) d[(q * sec + p.lo * unit) * inner + i] += s[q * n + i];
    return;
  }
  const int64_t w = p.n * unit;
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < w; ++j) d[i * inner + p.lo * unit + j] += s[i * w + j];
}

// The layer's weights of this rank in *wk (a copy of the block struct bw with the layer's
// parameters sliced), and zero gradients of the same shapes in *gk (when non-null).
template <typename W>
void slice_layer(const LayerDesc& ly, const void* bw, const EvoformerConfig& cfg, Part p, bool root,
                 W* wk, W* gk) {
  *wk = *static_cast<const W*>(bw);
  W full = *wk;
  visit_layer(ly, wk, &full, cfg, [&](Tensor& a, Tensor& b, Cut cut, int sections, int64_t unit) {
    if (!b.defined()) return;
    if (cut == Cut::kWhole) return;
    if (cut == Cut::kRoot)
      a = root ? b : Tensor::zeros(b.shape());
    else
      a = take(b, cut, sections, unit, p);
  });
  if (gk == nullptr) return;
  visit_layer(ly, gk, wk, cfg, [&](Tensor& g, Tensor& w, Cut, int, int64_t) {
    if (w.defined()) g = Tensor::zeros(w.shape());
  });
}

// The heads of this rank in a copy of cfg.
EvoformerConfig rank_config(const LayerDesc& ly, const EvoformerConfig& cfg, Split s, Part p) {
  EvoformerConfig c = cfg;
  if (s == Split::kChannels && ly.kind == LayerKind::kTriangleMultiplication) c.c_hidden_mul = p.n;
  if (s == Split::kHeads) {
    if (ly.kind == LayerKind::kTriangleAttention)
      c.no_heads_pair = p.n;
    else
      c.no_heads_msa = p.n;
  }
  return c;
}

// The hook of a channel-parallel triangle multiplication (LN_out's statistics summed over the
// group); empty for every other layer and split.
ChannelSum channel_sum(const LayerDesc& ly, const EvoformerConfig& cfg, Split s,
                       const dist::Communicator& comm) {
  ChannelSum cs;
  if (s != Split::kChannels || ly.kind != LayerKind::kTriangleMultiplication) return cs;
  cs.channels = cfg.c_hidden_mul;
  cs.fn = [&comm](float* x, int64_t count) { comm.all_reduce(x, count); };
  return cs;
}

// *x (count floats) = x0 + sum over the ranks of (*x - x0): the partial updates (or partial
// gradients) of the ranks summed onto the common value x0.
void sum_partials(float* x, const float* x0, int64_t count, const dist::Communicator& comm) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < count; ++i) x[i] -= x0[i];
  comm.all_reduce(x, count);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < count; ++i) x[i] += x0[i];
}

// A copy of count floats (tracked), of the given shape (default [count]).
Tensor copy_of(const float* x, int64_t count, const Shape& shape = {}) {
  Tensor t = Tensor::empty(shape.empty() ? Shape{count} : shape);  // shape
  std::memcpy(t.f32(), x, count * kF);
  return t;
}

// The reduce-scatter ending of a heads / channels layer: *rt->x (whole, count floats) = this
// rank's part of x0 + sum over the ranks of (x - x0) in the shard layout rt->want. The ranks'
// parts are packed rank-major first unless they are consecutive rows already (kMsaBySeq,
// kPairRows).
void reduce_to_shard(const ReduceTo& rt, const Tensor& x0, const DapLayout& l,
                     const dist::Communicator& comm) {
  float* x = rt.x->f32();
  const int64_t count = rt.x->numel(), per = count / l.n;
  const float* d0 = x0.f32();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < count; ++i) x[i] -= d0[i];
  const bool consecutive = rt.want == Shard::kMsaBySeq || rt.want == Shard::kPairRows;
  const Shard whole = *rt.how;
  FC_CHECK_MSG(is_full(whole), "reduce_to_shard: the partial updates are not a whole stream");
  Tensor packed;  // [n * per]: rank k's part of the partial sums at block k
  if (!consecutive) {
    packed = Tensor::empty({count});
    for (int k = 0; k < l.n; ++k) {
      DapLayout lk = l;
      lk.rank = k;
      Tensor part = *rt.x;  // a view of the whole partial stream; the slice is a new tensor
      Shard how = whole;
      full_to_layout(&part, &how, rt.want, lk, comm);
      std::memcpy(packed.f32() + k * per, part.f32(), per * kF);
    }
  }
  Tensor shard = x0;  // x0 whole, then this rank's part of it
  Shard how = whole;
  full_to_layout(&shard, &how, rt.want, l, comm);
  Tensor mine = Tensor::empty(shard.shape());  // the summed partial updates of this rank's part
  comm.reduce_scatter(consecutive ? x : packed.f32(), mine.f32(), per);
  packed = Tensor();
  float* o = mine.f32();
  const float* a = shard.f32();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < per; ++i) o[i] += a[i];
  *rt.x = std::move(mine);
  *rt.how = rt.want;
}

int64_t whole_count(const DapShards& sh, Stream x) {
  const EvoformerConfig& cfg = *sh.full.cfg;
  return x == Stream::kM ? sh.l.s_pad * sh.l.r_pad * cfg.c_m : sh.l.r_pad * sh.l.r_pad * cfg.c_z;
}

// Runs `run(weights, ctx)` for a heads / channels layer with this rank's slice of the weights and
// sums the ranks' partial updates of the stream the layer updates.
template <typename W, typename Run>
void sliced_forward(const LayerDesc& ly, const void* bw, const DapShards& sh,
                    const dist::Communicator& comm, Split s, float* m, float* z, const ReduceTo* rt,
                    Run run) {
  const EvoformerConfig& cfg = *sh.full.cfg;
  const Part p = rank_part(ly, bw, cfg, s, sh.l);
  float* x = ly.updates == Stream::kM ? m : z;
  const int64_t count = whole_count(sh, ly.updates);
  const bool scatter = rt != nullptr && !is_full(rt->want);
  FC_CHECK_MSG(!scatter || rt->x->f32() == x, "ReduceTo names another stream");
  // The layer's input, [count] (reduce-scatter: the whole stream's shape).
  const Tensor x0 = copy_of(x, count, scatter ? rt->x->shape() : Shape{});
  if (p.n > 0) {
    W wk;
    slice_layer<W>(ly, bw, cfg, p, comm.rank() == 0, &wk, nullptr);
    const EvoformerConfig ck = rank_config(ly, cfg, s, p);
    BlockContext ctx = sh.full;
    ctx.cfg = &ck;
    const ChannelSum cs = channel_sum(ly, cfg, s, comm);
    if (cs.fn) ctx.channel_sum = &cs;
    run(static_cast<const void*>(&wk), ctx);
  }
  if (scatter)
    reduce_to_shard(*rt, x0, sh.l, comm);
  else
    sum_partials(x, x0.f32(), count, comm);
}

template <typename W>
void backward_impl(const LayerDesc& ly, const void* bw, void* g, const DapShards& sh,
                   const dist::Communicator& comm, Split s, const float* x_in, const float* read_in,
                   LayerState* st, float* dm, float* dz, const ReduceTo* rt_m,
                   const ReduceTo* rt_z) {
  const EvoformerConfig& cfg = *sh.full.cfg;
  const bool root = comm.rank() == 0;
  if (s == Split::kReplicated) {  // every rank computes everything; the root's gradient counts
    if (root) return layer_backward(ly, bw, g, sh.full, x_in, read_in, st, dm, dz);
    W scratch, wk = *static_cast<const W*>(bw);  // a non-root rank's gradients of this layer
    visit_layer(ly, &scratch, &wk, cfg, [](Tensor& g, Tensor& w, Cut, int, int64_t) {
      if (w.defined()) g = Tensor::zeros(w.shape());
    });
    return layer_backward(ly, bw, &scratch, sh.full, x_in, read_in, st, dm, dz);
  }
  const Part p = rank_part(ly, bw, cfg, s, sh.l);
  float* dx = ly.updates == Stream::kM ? dm : dz;
  float* dr = ly.reads == Stream::kNone ? nullptr : (ly.reads == Stream::kM ? dm : dz);
  const int64_t nx = whole_count(sh, ly.updates);
  const int64_t nr = dr ? whole_count(sh, ly.reads) : 0;
  // Where each partial gradient goes: a reduce-scatter into the shard the gradient is next needed
  // in (its tensor's shape for the copies below), else an all-reduce.
  auto target = [&](Stream x) {
    const ReduceTo* rt = x == Stream::kM ? rt_m : rt_z;
    return rt != nullptr && !is_full(rt->want) ? rt : nullptr;
  };
  const ReduceTo* tx = target(ly.updates);
  const ReduceTo* tr = dr ? target(ly.reads) : nullptr;
  const Tensor dx0 = copy_of(dx, nx, tx ? tx->x->shape() : Shape{});  // dL/d out
  const Tensor dr0 = dr ? copy_of(dr, nr, tr ? tr->x->shape() : Shape{}) : Tensor();
  W wk, gk;
  if (p.n > 0) {
    slice_layer<W>(ly, bw, cfg, p, root, &wk, &gk);
    const EvoformerConfig ck = rank_config(ly, cfg, s, p);
    BlockContext ctx = sh.full;
    ctx.cfg = &ck;
    const ChannelSum cs = channel_sum(ly, cfg, s, comm);
    if (cs.fn) ctx.channel_sum = &cs;
    layer_backward(ly, &wk, &gk, ctx, x_in, read_in, st, dm, dz);
  }
  if (tx)
    reduce_to_shard(*tx, dx0, sh.l, comm);
  else
    sum_partials(dx, dx0.f32(), nx, comm);
  if (tr)
    reduce_to_shard(*tr, dr0, sh.l, comm);
  else if (dr)
    sum_partials(dr, dr0.f32(), nr, comm);
  if (p.n == 0) return;
  visit_layer(ly, g, &gk, cfg, [&](Tensor& a, Tensor& b, Cut cut, int sections, int64_t unit) {
    if (!b.defined()) return;
    if (cut == Cut::kRoot && !root) return;
    if (cut == Cut::kWhole || cut == Cut::kRoot)
      put_add(a, b, Cut::kRows, 1, a.dim(0), Part{0, 1});
    else
      put_add(a, b, cut, sections, unit, p);
  });
}

bool is_extra(const BlockTable& t) { return &t == &kExtraMsaBlock; }

}  // namespace

bool split_supported(const LayerDesc& l, Split s) {
  switch (s) {
    case Split::kDap:
      return l.kind != LayerKind::kSwiGluTransition;
    case Split::kReplicated:
      return l.kind != LayerKind::kSwiGluTransition;
    case Split::kHeads:
      return l.kind == LayerKind::kMsaRowAttention || l.kind == LayerKind::kMsaColumnAttention ||
             l.kind == LayerKind::kTriangleAttention;
    case Split::kChannels:
      return l.kind == LayerKind::kTransition || l.kind == LayerKind::kMaskedTransition ||
             l.kind == LayerKind::kTriangleMultiplication || l.kind == LayerKind::kOuterProductMean;
  }
  return false;
}

Status resolve_partition(const BlockTable& table, const StackPartition& p, int nb,
                         std::vector<std::vector<Split>>* out) {
  out->clear();
  if (p.empty()) return Status::OK();
  if (p.size() != 1 && static_cast<int>(p.size()) != nb)
    return Status::InvalidArgument("partitions: " + std::to_string(p.size()) + " lists for " +
                                   std::to_string(nb) + " blocks (one per block, or one for all)");
  for (int b = 0; b < nb; ++b) {
    std::vector<Split> splits(table.count, Split::kDap);
    for (const LayerSplit& ls : p[p.size() == 1 ? 0 : b]) {
      const LayerDesc* d = find_layer(table, ls.layer.c_str());
      if (d == nullptr)
        return Status::InvalidArgument("partitions: block " + std::to_string(b) + ": no layer '" +
                                       ls.layer + "' in the " + table.name + " block");
      if (!split_supported(*d, ls.split))
        return Status::InvalidArgument("partitions: layer '" + ls.layer + "' has no '" +
                                       split_name(ls.split) + "' split");
      splits[d - table.layers] = ls.split;
    }
    out->push_back(std::move(splits));
  }
  return Status::OK();
}

Status resolve_partition(const BlockTable& table, const StackPartition& p,
                         const EvoformerConfig& cfg, int ranks,
                         std::vector<std::vector<Split>>* out) {
  FC_RETURN_IF_ERROR(resolve_partition(table, p, static_cast<int>(cfg.no_blocks), out));
  for (const std::vector<Split>& splits : *out)
    for (int i = 0; i < table.count; ++i)
      if (splits[i] == Split::kChannels &&
          table.layers[i].kind == LayerKind::kTriangleMultiplication && cfg.c_hidden_mul < ranks)
        return Status::InvalidArgument(
            std::string("partitions: layer '") + table.layers[i].name + "' on 'channels' needs " +
            "at least one channel per rank (c_hidden_mul " + std::to_string(cfg.c_hidden_mul) +
            ", " + std::to_string(ranks) + " ranks)");
  return Status::OK();
}

DapLayerLayout partition_layer_layout(const LayerDesc& ly, Split s, Shard m_how, Shard z_how) {
  DapLayerLayout want;
  if (s != Split::kDap) {
    if (uses(ly, Stream::kM)) want.m = Shard::kMsaFull;
    if (uses(ly, Stream::kZ)) want.z = Shard::kPairFull;
    return want;
  }
  want = dap_layer_layout(ly);
  // A pointwise DAP layer on a whole stream runs on the block-boundary shard.
  if (uses(ly, Stream::kM) && !want.m && m_how == Shard::kMsaFull) want.m = Shard::kMsaBySeq;
  if (uses(ly, Stream::kZ) && !want.z && z_how == Shard::kPairFull) want.z = Shard::kPairRows;
  return want;
}

std::vector<std::pair<Shard, Shard>> partition_block_layouts(const BlockTable& t,
                                                             const std::vector<Split>& splits) {
  const int last_m = dap_last_use(t, Stream::kM), last_z = dap_last_use(t, Stream::kZ);
  Shard m = dap_boundary_m(t), z = Shard::kPairRows;
  std::vector<std::pair<Shard, Shard>> out;
  for (int i = 0; i < t.count; ++i) {
    const DapLayerLayout want = partition_layer_layout(t.layers[i], splits[i], m, z);
    m = want.m.value_or(m);
    z = want.z.value_or(z);
    out.emplace_back(m, z);
    if (i == last_m) m = dap_boundary_m(t);
    if (i == last_z) z = Shard::kPairRows;
  }
  return out;
}

void full_to_layout(Tensor* x, Shard* how, Shard want, const DapLayout& l,
                    const dist::Communicator& comm) {
  if (*how == want) return;
  const int64_t c = x->dim(2), sl = l.s_loc, rl = l.r_loc, sp = l.s_pad, rp = l.r_pad;
  const int64_t me = l.rank;
  const float* in = x->f32();
  Tensor out;  // the stream in layout want
  if (is_full(want)) {
    FC_CHECK_MSG(!is_full(*how), "layout change between two whole streams");
    switch (*how) {
      case Shard::kMsaBySeq:               // rank blocks are consecutive sequences
        out = Tensor::empty({sp, rp, c});  // whole m [s_pad, r_pad, c]
        comm.all_gather(in, out.f32(), sl * rp * c);
        break;
      case Shard::kMsaByRes: {                          // rank blocks are residue columns
        Tensor recv = Tensor::empty({l.n, sp, rl, c});  // block p: rank p's columns
        comm.all_gather(in, recv.f32(), sp * rl * c);
        *x = Tensor();
        out = Tensor::empty({sp, rp, c});  // whole m [s_pad, r_pad, c]
        join_column_blocks(recv.f32(), l.n, sp, rl, c, out.f32());
        break;
      }
      case Shard::kPairRows:
        out = Tensor::empty({rp, rp, c});  // whole z [r_pad, r_pad, c]
        comm.all_gather(in, out.f32(), rl * rp * c);
        break;
      case Shard::kPairRowsT: {                  // rows of z^T: gather z^T, transpose
        Tensor zt = Tensor::empty({rp, rp, c});  // z^T
        comm.all_gather(in, zt.f32(), rl * rp * c);
        *x = Tensor();
        out = Tensor::empty({rp, rp, c});  // whole z [r_pad, r_pad, c]
        float* o = out.f32();
        const float* t = zt.f32();
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < rp; ++i)
          for (int64_t j = 0; j < rp; ++j)
            std::memcpy(o + (i * rp + j) * c, t + (j * rp + i) * c, c * kF);
        break;
      }
      default:
        break;
    }
  } else {
    FC_CHECK_MSG(is_full(*how), "full_to_layout: neither layout is a whole stream");
    switch (want) {
      case Shard::kMsaBySeq:
        out = Tensor::empty({sl, rp, c});  // m by sequences [s_loc, r_pad, c]
        std::memcpy(out.f32(), in + me * sl * rp * c, sl * rp * c * kF);
        break;
      case Shard::kMsaByRes: {
        out = Tensor::empty({sp, rl, c});  // m by residues [s_pad, r_loc, c]
        float* o = out.f32();
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < sp; ++i)
          std::memcpy(o + i * rl * c, in + (i * rp + me * rl) * c, rl * c * kF);
        break;
      }
      case Shard::kPairRows:
        out = Tensor::empty({rl, rp, c});  // z by rows [r_loc, r_pad, c]
        std::memcpy(out.f32(), in + me * rl * rp * c, rl * rp * c * kF);
        break;
      case Shard::kPairRowsT: {            // z^T[b, a] = z[a, b] for this rank's b
        out = Tensor::empty({rl, rp, c});  // rows of z^T [r_loc, r_pad, c]
        float* o = out.f32();
#pragma omp parallel for schedule(static)
        for (int64_t b = 0; b < rl; ++b)
          for (int64_t a = 0; a < rp; ++a)
            std::memcpy(o + (b * rp + a) * c, in + (a * rp + me * rl + b) * c, c * kF);
        break;
      }
      default:
        break;
    }
  }
  *x = std::move(out);
  *how = want;
}

void partition_layer_forward(const BlockTable& table, const LayerDesc& ly, const void* bw,
                             const DapShards& sh, const dist::Communicator& comm, Split s, float* m,
                             float* z, const ReduceTo* rt) {
  if (s == Split::kReplicated) return layer_forward(ly, bw, sh.full, m, z);
  auto run = [&](const void* wk, const BlockContext& ctx) { layer_forward(ly, wk, ctx, m, z); };
  if (is_extra(table))
    sliced_forward<ExtraMsaBlockWeights>(ly, bw, sh, comm, s, m, z, rt, run);
  else
    sliced_forward<BlockWeights>(ly, bw, sh, comm, s, m, z, rt, run);
}

void partition_layer_train(const BlockTable& table, const LayerDesc& ly, const void* bw,
                           const DapShards& sh, const dist::Communicator& comm, Split s, float* m,
                           float* z, LayerState* st, const ReduceTo* rt) {
  if (s == Split::kReplicated) return layer_train(ly, bw, sh.full, m, z, st);
  auto run = [&](const void* wk, const BlockContext& ctx) { layer_train(ly, wk, ctx, m, z, st); };
  if (is_extra(table))
    sliced_forward<ExtraMsaBlockWeights>(ly, bw, sh, comm, s, m, z, rt, run);
  else
    sliced_forward<BlockWeights>(ly, bw, sh, comm, s, m, z, rt, run);
}

bool partition_reduces(Split s) { return s == Split::kHeads || s == Split::kChannels; }

namespace {
// The layout the first layer of t from layer `from` on that uses stream x takes (a pointwise DAP
// layer: the block-boundary shard); nullopt when none uses it.
std::optional<Shard> first_want(const BlockTable& t, const std::vector<Split>& splits, int from,
                                Stream x) {
  for (int j = from; j < t.count; ++j) {
    const LayerDesc& ly = t.layers[j];
    if (!uses(ly, x)) continue;
    const DapLayerLayout want =
        partition_layer_layout(ly, splits[j], Shard::kMsaFull, Shard::kPairFull);
    return *(x == Stream::kM ? want.m : want.z);
  }
  return std::nullopt;
}
}  // namespace

BlockLayouts partition_entry_layouts(const BlockTable& t, const std::vector<Split>& splits) {
  return {first_want(t, splits, 0, Stream::kM).value_or(dap_boundary_m(t)),
          first_want(t, splits, 0, Stream::kZ).value_or(Shard::kPairRows)};
}

BlockLayouts partition_exit_layouts(const BlockTable& t,
                                    const std::vector<std::vector<Split>>& blocks, int b) {
  if (b + 1 >= static_cast<int>(blocks.size())) return {dap_boundary_m(t), Shard::kPairRows};
  return partition_entry_layouts(t, blocks[b + 1]);
}

Shard partition_next_layout(const BlockTable& t, const std::vector<Split>& splits, int i,
                            const BlockLayouts* exit) {
  const Stream x = t.layers[i].updates;
  if (const std::optional<Shard> h = first_want(t, splits, i + 1, x)) return *h;
  if (exit) return x == Stream::kM ? exit->first : exit->second;
  return x == Stream::kM ? dap_boundary_m(t) : Shard::kPairRows;
}

Shard partition_prev_layout(const BlockTable& t,
                            const std::vector<std::pair<Shard, Shard>>& layouts, int i, Stream x,
                            const BlockLayouts* entry) {
  for (int j = i - 1; j >= 0; --j)
    if (uses(t.layers[j], x)) return x == Stream::kM ? layouts[j].first : layouts[j].second;
  if (entry) return x == Stream::kM ? entry->first : entry->second;
  return x == Stream::kM ? dap_boundary_m(t) : Shard::kPairRows;
}

ReduceTo partition_grad_reduce_to(const BlockTable& t, const std::vector<Split>& splits,
                                  const std::vector<std::pair<Shard, Shard>>& layouts, int i,
                                  Stream x, Tensor* dx, Shard* how, const BlockLayouts* entry) {
  const bool scatter = partition_reduces(splits[i]) && uses(t.layers[i], x);
  return {dx, how,
          scatter ? partition_prev_layout(t, layouts, i, x, entry)
                  : (x == Stream::kM ? Shard::kMsaFull : Shard::kPairFull)};
}

ReduceTo partition_reduce_to(const BlockTable& t, const std::vector<Split>& splits, int i,
                             Tensor* m, Tensor* z, Shard* m_how, Shard* z_how,
                             const BlockLayouts* exit) {
  const bool is_m = t.layers[i].updates == Stream::kM;
  return {is_m ? m : z, is_m ? m_how : z_how,
          partition_reduces(splits[i]) ? partition_next_layout(t, splits, i, exit)
                                       : (is_m ? Shard::kMsaFull : Shard::kPairFull)};
}

void partition_layer_backward(const BlockTable& table, const LayerDesc& ly, const void* bw, void* g,
                              const DapShards& sh, const dist::Communicator& comm, Split s,
                              const float* x_in, const float* read_in, LayerState* st, float* dm,
                              float* dz, const ReduceTo* rt_m, const ReduceTo* rt_z) {
  if (is_extra(table))
    backward_impl<ExtraMsaBlockWeights>(ly, bw, g, sh, comm, s, x_in, read_in, st, dm, dz, rt_m,
                                        rt_z);
  else
    backward_impl<BlockWeights>(ly, bw, g, sh, comm, s, x_in, read_in, st, dm, dz, rt_m, rt_z);
}

}  // namespace fc
