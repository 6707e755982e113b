// Split names (include/foldcube/partition.h) and the planner's cost, memory and search of
// per-layer partitions (src/plan/partition_cost.h).
#include "exec/partition.h"

#include <algorithm>
#include <array>
#include <climits>
#include <cmath>
#include <functional>

#include "foldcube/partition.h"
#include "model/block_table.h"
#include "plan/partition_cost.h"
#include "plan/table_cost.h"

namespace fc {

const char* split_name(Split s) {
  switch (s) {
    case Split::kDap:
      return "dap";
    case Split::kHeads:
      return "heads";
    case Split::kChannels:
      return "channels";
    case Split::kReplicated:
      return "replicated";
  }
  return "?";
}

Status parse_split(const std::string& name, Split* out) {
  for (int i = 0; i < kSplits; ++i)
    if (name == split_name(static_cast<Split>(i))) {
      *out = static_cast<Split>(i);
      return Status::OK();
    }
  return Status::InvalidArgument("unknown split '" + name + "' (dap|heads|channels|replicated)");
}

}  // namespace fc

// ---- Cost and memory (src/plan/partition_cost.h) ------------------------------------------------

namespace fc {

namespace {
constexpr int64_t kF = sizeof(float);

// The block type of the plan's stack.
const BlockTable& plan_table(const Plan& p) {
  return p.extra_msa ? kExtraMsaBlock : kEvoformerBlock;
}

bool full(Shard h) { return h == Shard::kMsaFull || h == Shard::kPairFull; }

// Floats a rank sends to change a stream of w whole (padded) floats from layout a to b over n
// ranks: an all-to-all (n-1)/n^2 w, an all-gather to the whole stream (n-1)/n w, a slice 0.
int64_t change_floats(Shard a, Shard b, int64_t w, int n) {
  if (a == b || full(a)) return 0;
  if (full(b)) return (n - 1) * (w / n);
  return (n - 1) * (w / n / n);
}

// Elements a rank's CPU moves (reads plus writes) to change a stream of w floats from layout a to
// b over n ranks, beside the link's copies of the bytes it sends and receives (change_floats):
//   shard -> shard (all-to-all, sh = w/n): the collective's copy of the block the rank keeps
//     (sh/n), and the packing of its shard into rank-major blocks (m by sequences -> residues),
//     the unpacking (m by residues -> sequences), or both (rows of z <-> rows of z^T);
//   shard -> whole (all-gather): the collective's copy of the rank's own shard, and reassembling
//     the whole stream where the rank blocks are not consecutive rows (m by residues: a join; rows
//     of z^T: the transpose back), w;
//   whole -> shard: the slice, sh.
// Each copy reads and writes once: 2 elements per float.
int64_t change_copy_elems(Shard a, Shard b, int64_t w, int n) {
  if (a == b) return 0;
  const int64_t sh = w / n;
  if (full(a)) return 2 * sh;
  if (full(b)) {
    const bool reassemble = a == Shard::kMsaByRes || a == Shard::kPairRowsT;
    return 2 * sh + (reassemble ? 2 * w : 0);
  }
  const bool pair = a == Shard::kPairRows || a == Shard::kPairRowsT;
  return 2 * (sh / n) + (pair ? 4 : 2) * sh;
}

// Floats a rank sends in the layer's own DAP collectives (docs/dap.md), forward.
int64_t dap_gather_floats(const LayerDesc& ly, const EvoformerConfig& cfg, const DapLayout& l) {
  const int64_t n1 = l.n - 1, rl = l.r_loc, rp = l.r_pad;
  switch (ly.kind) {
    case LayerKind::kMsaRowAttention:
      return n1 * rl * rp * cfg.no_heads_msa;
    case LayerKind::kTriangleAttention:
      return n1 * rl * rp * cfg.no_heads_pair;
    case LayerKind::kOuterProductMean:
      return n1 * l.s_pad * rl * cfg.c_hidden_opm;
    case LayerKind::kTriangleMultiplication:
      return n1 * cfg.c_hidden_mul * rl * rp;
    default:
      return 0;
  }
}

// The layers' single-device costs at the plan's shape: as they are (dap: times the shard share;
// replicated), and at this rank's heads (ceil(H/N) heads: the projections and the attention
// shrink, the LayerNorms of the whole stream do not) and channels (ceil(n/N) of the transition
// factor n; ceil(c_t/N) triangle-multiplication channels: the projections, products and LN_out
// shrink, LN_in and the gate do not; the OPM at ceil(c_o/N)/c_o of its whole cost: its outer
// product and linear_out shrink so, its LayerNorm and b's projection do not, a small part), the
// forms heads and channels run.
struct LayerCosts {
  std::vector<ModuleCost> whole, heads, channels;
};

// The share of a heads / channels layer's units the most loaded rank holds.
double cost_share(const LayerDesc& ly, const EvoformerConfig& cfg, Split s, int64_t n) {
  int64_t total = cfg.transition_n * (ly.updates == Stream::kM ? cfg.c_m : cfg.c_z);
  if (s == Split::kHeads)
    total = ly.kind == LayerKind::kTriangleAttention ? cfg.no_heads_pair : cfg.no_heads_msa;
  else if (ly.kind == LayerKind::kTriangleMultiplication)
    total = cfg.c_hidden_mul;
  else if (ly.kind == LayerKind::kOuterProductMean)
    total = cfg.c_hidden_opm;
  return static_cast<double>((total + n - 1) / n) / static_cast<double>(total);
}

// The cost of layer i under split s on the most loaded rank (l: the plan's DAP layout).
const ModuleCost& cost_of(const LayerCosts& c, int i, Split s) {
  return s == Split::kHeads ? c.heads[i] : s == Split::kChannels ? c.channels[i] : c.whole[i];
}
// A layer's cost on the most loaded rank: dap takes the shard share of its work, but its fixed
// per-module overhead (dispatch, launches) in full, as block_times (search.cc) charges it; the
// other splits are costed at this rank's heads / channels or whole, overhead included.
double rank_ms(double ms, Split s, const DapLayout& l, double fixed_ms) {
  if (s != Split::kDap || ms <= 0) return ms;
  return (ms - fixed_ms) * static_cast<double>(l.r_loc) / static_cast<double>(l.r) + fixed_ms;
}

// Floats of a layer's parameters (the Evoformer's kinds; LayerNorms included).
int64_t layer_param_floats(const LayerDesc& ly, const EvoformerConfig& cfg) {
  const int64_t cm = cfg.c_m, cz = cfg.c_z, n = cfg.transition_n;
  const int64_t hm = cfg.no_heads_msa * cfg.c_hidden_msa_att;
  const int64_t hp = cfg.no_heads_pair * cfg.c_hidden_pair_att;
  const int64_t co = cfg.c_hidden_opm, ct = cfg.c_hidden_mul;
  const int64_t c = ly.updates == Stream::kM ? cm : cz;
  switch (ly.kind) {
    case LayerKind::kMsaRowAttention:
      return 5 * hm * cm + 4 * hm + cm + cfg.no_heads_msa * cz + 2 * cm + 2 * cz;
    case LayerKind::kMsaColumnAttention:
      return 5 * hm * cm + 4 * hm + cm + 2 * cm;
    case LayerKind::kTriangleAttention:
      return 5 * hp * cz + 4 * hp + cz + cfg.no_heads_pair * cz + 2 * cz;
    case LayerKind::kTransition:
    case LayerKind::kMaskedTransition:
      return 2 * n * c * c + n * c + c + 2 * c;
    case LayerKind::kOuterProductMean:
      return 2 * co * cm + 2 * co + cz * co * co + cz + 2 * cm;
    case LayerKind::kTriangleMultiplication:
      return 4 * ct * cz + 4 * ct + 2 * ct + cz * ct + cz + cz * cz + cz + 2 * cz;
    case LayerKind::kMsaColumnGlobalAttention:  // q (H heads), k | v (one head), g, o
      return 2 * cm + hm * cm + 2 * cfg.c_hidden_msa_att * cm + hm * cm + hm + cm * hm + cm;
    default:
      return 0;
  }
}

double link_ms(int64_t sent_bytes, int calls, const DeviceProfile& dev) {
  if (calls == 0) return 0;
  const double gbps = dev.link_gbps > 0 ? dev.link_gbps : 10.0;
  return calls * dev.link_latency_us * 1e-3 + 2.0 * sent_bytes / (gbps * 1e9) * 1e3;
}

// Time of moving `bytes` (reads plus writes) through DRAM on the CPU: the calibrated sweep rate
// (stream_gbps; else mem_gbps), the rate of the large buffers the collectives copy.
double copy_ms(int64_t bytes, const DeviceProfile& dev) {
  const double gbps = dev.stream_gbps > 0 ? dev.stream_gbps
                      : dev.mem_gbps > 0  ? dev.mem_gbps
                                          : 10.0;
  return bytes / (gbps * 1e9) * 1e3;
}

}  // namespace

double dap_shard_extra_ms(const LayerDesc& ly, const EvoformerConfig& cfg, int64_t s, int64_t r,
                          int dap, bool training, const DeviceProfile& dev) {
  if (dap <= 1 || training || dev.batched_by_rows.empty() ||
      ly.kind != LayerKind::kTriangleMultiplication)
    return 0;
  const DapLayout l = dap_layout(s, r, dap, 0);
  auto rate = [&](double m) { return interpolate_table(dev.batched_by_rows, m, 1); };
  // This rank's products: 2 r_loc r_pad^2 c_t FLOPs, as the whole layer x r_loc / r charges them.
  const double flops = 2.0 * l.r_loc * l.r_pad * l.r_pad * cfg.c_hidden_mul;
  return flops * (1 / rate(static_cast<double>(l.r_loc)) - 1 / rate(static_cast<double>(r))) * 1e-6;
}

namespace {

LayerCosts plan_layer_costs(const Plan& p, const DeviceProfile& dev) {
  DeviceProfile d = dev;
  d.dtype = p.dtype;
  d.element_bytes = p.element_bytes;
  auto costs = [&](const EvoformerConfig& cfg) {
    return block_module_costs(cfg, p.s, p.r, p.chunk, p.chunk_target_bytes, p.training, d,
                              p.extra_msa);
  };
  const int64_t n = std::max(p.dap, 1);
  auto part = [&](int64_t total) { return (total + n - 1) / n; };
  EvoformerConfig heads = p.cfg, channels = p.cfg;
  heads.no_heads_msa = part(p.cfg.no_heads_msa);
  heads.no_heads_pair = part(p.cfg.no_heads_pair);
  channels.transition_n = part(p.cfg.transition_n);
  channels.c_hidden_mul = part(p.cfg.c_hidden_mul);
  LayerCosts c{costs(p.cfg), costs(heads), costs(channels)};
  const BlockTable& t = plan_table(p);
  // A channel-parallel triangle multiplication runs its training forward also in inference (the
  // form with LN_out's channel_sum hook: triangle_multiplication in src/layers): channel groups
  // of the training chunking, narrow projections, LN_in(z) swept per group. Its inference cost is
  // that form's forward at this rank's channels, not the inference form's.
  if (!p.training) {
    // The executor's target when the plan has none (dap.cc: 1/8 of a rank's shard bytes).
    const DapLayout l = dap_layout(p.s, p.r, p.dap, 0);
    const int64_t shards = (l.s_loc * l.r_pad * p.cfg.c_m + l.r_loc * l.r_pad * p.cfg.c_z) * kF;
    const int64_t target =
        p.chunk_target_bytes > 0 ? p.chunk_target_bytes : std::max<int64_t>(shards / 8, 1 << 20);
    // Without train_fwd_factor: it covers the training step's state writes and per-chunk copies,
    // and this form keeps no state (measured, (128, 256), 2 ranks, 4 MiB target: 393-404 ms
    // CPU for 2 blocks against 402 ms modelled without the factor, 467 ms with it).
    DeviceProfile dt = d;
    dt.train_fwd_factor = 1;
    const std::vector<ModuleCost> train =
        block_module_costs(channels, p.s, p.r, p.chunk, target, true, dt, p.extra_msa);
    for (int i = 0; i < t.count && i < static_cast<int>(train.size()); ++i)
      if (t.layers[i].kind == LayerKind::kTriangleMultiplication)
        c.channels[i].forward_ms = train[i].forward_ms;
  }
  for (int i = 0; i < t.count && i < static_cast<int>(c.channels.size()); ++i)
    if (t.layers[i].kind == LayerKind::kOuterProductMean) {
      const double share = cost_share(t.layers[i], p.cfg, Split::kChannels, n);
      ModuleCost& m = c.channels[i];
      m = c.whole[i];
      m.forward_ms *= share, m.backward_ms *= share, m.rebuild_ms *= share;
    }
  return c;
}

// estimate_partition with the layers' single-device costs at the plan's shape given.
// in / out: the layouts the block starts in and leaves its streams in (nullptr: the boundary);
// a whole stream carried out of the block is counted as live over the rest of the block.
PartitionEstimate estimate_with(const Plan& p, const DeviceProfile& dev, const LayerCosts* costs,
                                const std::vector<Split>& splits, const BlockLayouts* in = nullptr,
                                const BlockLayouts* out = nullptr) {
  const EvoformerConfig& cfg = p.cfg;
  const BlockTable& t = plan_table(p);
  const DapLayout l = dap_layout(p.s, p.r, p.dap, 0);
  const int n = l.n;
  const int64_t e = plan_buffer_bytes(p.element_bytes);
  const int64_t wm = l.s_pad * l.r_pad * cfg.c_m, wz = l.r_pad * l.r_pad * cfg.c_z;
  const std::vector<std::pair<Shard, Shard>> lay = partition_block_layouts(t, splits);
  PartitionEstimate est;
  // The CPU copies below are those of foldcube's executor (element_bytes 0: the engine's f32
  // buffers); a profile of another executor (element_bytes 2 or 4, e.g. the seeds' GPUs) keeps the
  // link model alone and its partial sums at the LayerNorm rate.
  const bool engine = p.element_bytes == 0;
  int64_t fwd_floats = 0, bwd_floats = 0, rec_floats = 0;
  int fwd_calls = 0, bwd_calls = 0, rec_calls = 0;
  // Elements the CPU moves for the collectives and layout changes (change_copy_elems, the
  // collectives' own copies and sums, the partial sums' passes), at the DRAM rate.
  int64_t fwd_copy = 0, bwd_copy = 0, rec_copy = 0;
  const BlockLayouts boundary{dap_boundary_m(t), Shard::kPairRows};
  const BlockLayouts exit = out ? *out : boundary;
  const int last_m = dap_last_use(t, Stream::kM), last_z = dap_last_use(t, Stream::kZ);
  Shard m = (in ? *in : boundary).first, z = (in ? *in : boundary).second;
  auto change = [&](Shard& from, Shard to, int64_t w) {
    const int64_t f = change_floats(from, to, w, n), b = change_floats(to, from, w, n);
    fwd_floats += f, bwd_floats += b;
    fwd_calls += f > 0, bwd_calls += b > 0;
    fwd_copy += change_copy_elems(from, to, w, n), bwd_copy += change_copy_elems(to, from, w, n);
    from = to;
  };
  // Per layer: the running totals before its layout changes, after them, and after the layer.
  struct Totals {
    int64_t f, b, r;
    int fc, bc, rc;
    int64_t fy, by, ry;
    double fwd, bwd, rec;
  };
  auto totals = [&] {
    return Totals{fwd_floats, bwd_floats, rec_floats, fwd_calls,  bwd_calls,  rec_calls,
                  fwd_copy,   bwd_copy,   rec_copy,   est.fwd_ms, est.bwd_ms, est.rec_ms};
  };
  auto copy_time = [&](int64_t elems) { return engine ? copy_ms(elems * e, dev) : 0.0; };
  auto traffic = [&](int64_t floats, int calls, int64_t copy) {
    return link_ms(floats * e, calls, dev) + copy_time(copy);
  };
  est.layers.assign(t.count, LayerEstimate());
  for (int i = 0; i < t.count; ++i) {
    const LayerDesc& ly = t.layers[i];
    const Split s = splits[i];
    const bool uses_m = ly.updates == Stream::kM || ly.reads == Stream::kM;
    const bool uses_z = ly.updates == Stream::kZ || ly.reads == Stream::kZ;
    const Totals t0 = totals();
    if (uses_m) change(m, lay[i].first, wm);
    if (uses_z) change(z, lay[i].second, wz);
    const Totals t1 = totals();
    if (costs) {
      const ModuleCost& c = cost_of(*costs, i, s);
      const double fixed = dev.module_overhead_us * 1e-3;
      est.fwd_ms += rank_ms(c.forward_ms, s, l, fixed);
      if (s == Split::kDap) est.fwd_ms += dap_shard_extra_ms(ly, cfg, p.s, p.r, n, p.training, dev);
      if (p.training) {
        est.bwd_ms += rank_ms(c.backward_ms, s, l, fixed);
        est.rec_ms += rank_ms(c.rebuild_ms, s, l, fixed);
      }
    }
    const int64_t wx = ly.updates == Stream::kM ? wm : wz;
    const int64_t wr = ly.reads == Stream::kNone ? 0 : (ly.reads == Stream::kM ? wm : wz);
    if (s == Split::kChannels && ly.kind == LayerKind::kTriangleMultiplication) {
      // LN_out's statistics over the ranks' channels: forward mean and variance (all-reduces of
      // r_pad^2 floats); backward the same again and the two sums of its gradient (2 r_pad^2).
      const int64_t rr = l.r_pad * l.r_pad;
      fwd_floats += 2 * (2 * (n - 1) * rr / n);
      bwd_floats += 2 * (2 * (n - 1) * rr / n) + 2 * (n - 1) * (2 * rr) / n;
      fwd_calls += 2, bwd_calls += 3;
      // The statistics' own passes over this rank's products P [c_t/N, r_pad^2] (channel-major,
      // as large as z): forward two reads (the sums, the squared deviations); the backward those
      // again and the second part of LN_out's backward (P and dP read, dP written).
      const int64_t pc = (cfg.c_hidden_mul + n - 1) / n * rr;
      est.fwd_ms += copy_time(2 * pc);
      if (p.training) est.bwd_ms += copy_time(5 * pc);
    }
    if (s == Split::kDap) {
      const int64_t g = dap_gather_floats(ly, cfg, l);
      // Backward (states kept): the reduce-scatter, and a re-gather where the backward rebuilds
      // what the gather gave (the triangle multiplication's right operand, the OPM's b; the
      // attentions keep their bias). A module rebuild gathers again for the attentions' bias and
      // the triangle multiplication's products (the OPM's rebuilt state needs no gather).
      const LayerKind k = ly.kind;
      const bool regather =
          k == LayerKind::kTriangleMultiplication || k == LayerKind::kOuterProductMean;
      const bool rebuild = k == LayerKind::kMsaRowAttention || k == LayerKind::kTriangleAttention ||
                           k == LayerKind::kTriangleMultiplication;
      fwd_floats += g, bwd_floats += (1 + regather) * g, rec_floats += rebuild * g;
      fwd_calls += g > 0, bwd_calls += (1 + regather) * (g > 0), rec_calls += rebuild * (g > 0);
      // The collective's copy of this rank's own part (g / (n - 1) floats); the reduce-scatter's
      // sums, 3 elements for each of the n - 1 contributions to this rank's part.
      const int64_t part = g / (n - 1);
      fwd_copy += 2 * part, rec_copy += rebuild * 2 * part;
      bwd_copy += 3 * g + regather * 2 * part;
    } else {
      if (s != Split::kReplicated) {
        // Partial sums: a reduce-scatter ((n-1)/n of the stream) into the shard the stream is
        // next needed in, else an all-reduce (2 (n-1)/n); backward all-reduces.
        const bool to_shard = !full(partition_next_layout(t, splits, i, &exit));
        fwd_floats += to_shard ? (n - 1) * (wx / n) : 2 * (n - 1) * wx / n;
        // Backward: the partial gradients likewise into the layout the backward next needs.
        const BlockLayouts entry = in ? *in : boundary;
        auto sum = [&](Stream x, int64_t w) {
          if (w == 0) return int64_t{0};
          return full(partition_prev_layout(t, lay, i, x, &entry)) ? 2 * (n - 1) * w / n
                                                                   : (n - 1) * (w / n);
        };
        bwd_floats += sum(ly.updates, wx) + sum(ly.reads, wr);
        fwd_calls += 1, bwd_calls += 1 + (wr > 0);
        // The CPU side of a partial sum of a stream of w floats: the copy of the common value
        // (2 w elements), the partial update minus it (3 w), the collective's sums (3 (n-1)/n w)
        // and, into a shard, the packing of rank blocks that are not consecutive rows (2 w), the
        // slice of the common value and its add (2 w/n + 3 w/n), or, whole, its add (3 w).
        auto passes = [&](Shard want, int64_t w) {
          if (w == 0) return int64_t{0};
          int64_t y = 2 * w + 3 * w + 3 * (n - 1) * w / n;
          if (!full(want)) {
            const bool packs = want == Shard::kMsaByRes || want == Shard::kPairRowsT;
            y += (packs ? 2 * w : 0) + 5 * w / n;
          } else {
            y += 3 * w;
          }
          return y;
        };
        if (engine) {
          fwd_copy += passes(partition_next_layout(t, splits, i, &exit), wx);
          bwd_copy += passes(partition_prev_layout(t, lay, i, ly.updates, &entry), wx) +
                      passes(partition_prev_layout(t, lay, i, ly.reads, &entry), wr);
        } else {  // another executor's partial sums: copy, subtract, add at the LayerNorm rate
          const double gbps = dev.mem_gbps > 0 ? dev.mem_gbps : 10.0;
          const double ms = 4.0 * (wx + wr) * kF / (gbps * 1e9) * 1e3;
          est.fwd_ms += ms * wx / (wx + wr);
          est.bwd_ms += ms;
        }
      }
      // Whole streams on every rank instead of shards, and the partial-sum copies.
      int64_t extra = 0;
      if (ly.updates == Stream::kM || ly.reads == Stream::kM) extra += wm - wm / n;
      if (ly.updates == Stream::kZ || ly.reads == Stream::kZ) extra += wz - wz / n;
      if (s != Split::kReplicated) extra += wx + (p.training ? wr : 0);
      // The reduce-scatter into a shard whose rank parts are not consecutive rows packs them
      // rank-major first (a whole copy).
      auto packs = [](Shard h) { return h == Shard::kMsaByRes || h == Shard::kPairRowsT; };
      if (partition_reduces(s)) {
        const BlockLayouts entry = in ? *in : boundary;
        if (packs(partition_next_layout(t, splits, i, &exit)) ||
            (p.training && packs(partition_prev_layout(t, lay, i, ly.updates, &entry))))
          extra += wx;
        if (p.training && wr > 0 && packs(partition_prev_layout(t, lay, i, ly.reads, &entry)))
          extra += wr;
      }
      // This rank's weight slices (and their gradients); a replicated layer's gradients on the
      // ranks other than the root (discarded scratch).
      const int64_t params = layer_param_floats(ly, cfg);
      if (s != Split::kReplicated)
        extra += (p.training ? 2 : 1) * static_cast<int64_t>(params * cost_share(ly, cfg, s, n));
      else if (p.training)
        extra += params;
      est.transient_bytes = std::max(est.transient_bytes, extra * e);
      if (p.training) {  // kept whole-stream inputs in the store dtype (bf16 training: 2 bytes)
        const SavedInputs in = saved_inputs(t, i);
        const int64_t ke =
            engine && plan_store_dtype(p.dtype, p.element_bytes) == DType::BF16 ? 2 : e;
        est.saved_bytes += ((in.updated ? wx - wx / n : 0) + (in.read ? wr - wr / n : 0)) * ke;
      }
    }
    const Totals t2 = totals();
    // The OPM's backward rebuilds its m (not kept) from the block output (in the exit layout).
    if (p.training && ly.reads == Stream::kM && !saved_inputs(t, i).read) {
      const int64_t f = change_floats(exit.first, lay[i].first, wm, n);
      bwd_floats += f, bwd_calls += f > 0;
      bwd_copy += change_copy_elems(exit.first, lay[i].first, wm, n);
    }
    // After its last use in the block a stream goes to the block's exit layout.
    if (i == last_m) change(m, exit.first, wm);
    if (i == last_z) change(z, exit.second, wz);
    const Totals t3 = totals();
    LayerEstimate& le = est.layers[i];
    le.fwd_ms = t2.fwd - t1.fwd, le.bwd_ms = t2.bwd - t1.bwd, le.rec_ms = t2.rec - t1.rec;
    le.comm_fwd_ms = traffic(t2.f - t1.f, t2.fc - t1.fc, t2.fy - t1.fy);
    le.comm_bwd_ms = traffic(t2.b - t1.b, t2.bc - t1.bc, t2.by - t1.by);
    le.comm_rec_ms = traffic(t2.r - t1.r, t2.rc - t1.rc, t2.ry - t1.ry);
    le.change_fwd_ms = traffic(t1.f - t0.f + t3.f - t2.f, t1.fc - t0.fc + t3.fc - t2.fc,
                               t1.fy - t0.fy + t3.fy - t2.fy);
    le.change_bwd_ms = traffic(t1.b - t0.b + t3.b - t2.b, t1.bc - t0.bc + t3.bc - t2.bc,
                               t1.by - t0.by + t3.by - t2.by);
  }
  const int64_t carried =
      (full(exit.first) ? wm - wm / n : 0) + (full(exit.second) ? wz - wz / n : 0);
  est.transient_bytes += carried * e;
  if (p.training) {
    // A policy-block block keeps its input as boundary shards: its recompute gathers a whole
    // entry stream again, and so does the backward driver for the previous block's output m.
    const BlockLayouts entry = in ? *in : boundary;
    const int64_t fm = change_floats(boundary.first, entry.first, wm, n);
    const int64_t fz = change_floats(boundary.second, entry.second, wz, n);
    est.sent_block_rec_bytes = (2 * fm + fz) * e;
    est.calls_block_rec = 2 * (fm > 0) + (fz > 0);
    const int64_t ym = change_copy_elems(entry.first, boundary.first, wm, n) +
                       2 * change_copy_elems(boundary.first, entry.first, wm, n);
    const int64_t yz = change_copy_elems(entry.second, boundary.second, wz, n) +
                       change_copy_elems(boundary.second, entry.second, wz, n);
    est.copy_block_rec_ms = copy_time(ym + yz);
    est.comm_block_rec_ms =
        link_ms(est.sent_block_rec_bytes, est.calls_block_rec, dev) + est.copy_block_rec_ms;
  }
  est.sent_fwd_bytes = fwd_floats * e;
  est.sent_bwd_bytes = bwd_floats * e;
  est.sent_rec_bytes = rec_floats * e;
  est.copy_fwd_ms = copy_time(fwd_copy);
  est.copy_bwd_ms = copy_time(bwd_copy);
  est.copy_rec_ms = copy_time(rec_copy);
  est.comm_fwd_ms = link_ms(est.sent_fwd_bytes, fwd_calls, dev) + est.copy_fwd_ms;
  est.comm_bwd_ms = link_ms(est.sent_bwd_bytes, bwd_calls, dev) + est.copy_bwd_ms;
  est.comm_rec_ms = link_ms(est.sent_rec_bytes, rec_calls, dev) + est.copy_rec_ms;
  est.calls_fwd = fwd_calls, est.calls_bwd = bwd_calls, est.calls_rec = rec_calls;
  return est;
}
}  // namespace

PartitionEstimate estimate_partition(const Plan& p, const DeviceProfile& dev,
                                     const std::vector<Split>& splits) {
  const LayerCosts costs_of_plan = plan_layer_costs(p, dev);
  return estimate_with(p, dev, &costs_of_plan, splits);
}

namespace {
// Block b's estimate in a stack running lists `blocks`: layouts carry across blocks
// (partition_exit_layouts), in inference and training.
PartitionEstimate block_estimate(const Plan& p, const DeviceProfile& dev, const LayerCosts& costs,
                                 const std::vector<std::vector<Split>>& blocks, int b) {
  const BlockTable& t = plan_table(p);
  const BlockLayouts in = b == 0 ? BlockLayouts{dap_boundary_m(t), Shard::kPairRows}
                                 : partition_entry_layouts(t, blocks[b]);
  const BlockLayouts out = partition_exit_layouts(t, blocks, b);
  return estimate_with(p, dev, &costs, blocks[b], &in, &out);
}
}  // namespace

PartitionEstimate estimate_partition_in_stack(const Plan& p, const DeviceProfile& dev,
                                              const std::vector<std::vector<Split>>& blocks,
                                              int b) {
  return block_estimate(p, dev, plan_layer_costs(p, dev), blocks, b);
}

namespace {
std::vector<Split> resolve_one(const BlockTable& t, const std::vector<LayerSplit>& list);
}  // namespace

PartitionEstimate dap_copy_estimate(const EvoformerConfig& cfg, int64_t s, int64_t r, int dap,
                                    bool training, bool extra_msa, const DeviceProfile& dev) {
  Plan p;
  p.cfg = cfg, p.s = s, p.r = r, p.dap = dap, p.training = training, p.extra_msa = extra_msa;
  p.element_bytes = dev.element_bytes;
  if (dap < 2) return PartitionEstimate();
  return estimate_with(p, dev, nullptr, std::vector<Split>(plan_table(p).count, Split::kDap));
}

std::vector<StackLayerEstimate> estimate_stack_layers(const Plan& p, const DeviceProfile& dev) {
  const BlockTable& t = plan_table(p);
  std::vector<StackLayerEstimate> out(t.count);
  if (p.dap < 2) return out;
  const LayerCosts costs = plan_layer_costs(p, dev);
  const int64_t B = p.cfg.no_blocks;
  std::vector<std::vector<Split>> lists;
  for (int64_t k = 0; k < B; ++k)
    lists.push_back(p.partitions.empty()
                        ? std::vector<Split>(t.count, Split::kDap)
                        : resolve_one(t, p.partitions[p.partitions.size() == 1 ? 0 : k]));
  for (int64_t k = 0; k < B; ++k) {
    const PartitionEstimate a = block_estimate(p, dev, costs, lists, static_cast<int>(k));
    const Recompute pol =
        p.training && k < static_cast<int64_t>(p.policy.size()) ? p.policy[k] : Recompute::kBlock;
    for (int i = 0; i < t.count; ++i) {
      const LayerEstimate& le = a.layers[i];
      StackLayerEstimate& o = out[i];
      auto add = [](PhaseEstimate* ph, double compute, double comm, double change) {
        ph->compute_ms += compute, ph->comm_ms += comm, ph->change_ms += change;
      };
      add(&o.fwd, le.fwd_ms, le.comm_fwd_ms, le.change_fwd_ms);
      if (!p.training) continue;
      add(&o.bwd, le.bwd_ms, le.comm_bwd_ms, le.change_bwd_ms);
      if (pol == Recompute::kModule) add(&o.bwd, le.rec_ms, le.comm_rec_ms, 0);
      if (pol == Recompute::kBlock) add(&o.rec, le.fwd_ms, le.comm_fwd_ms, le.change_fwd_ms);
    }
  }
  return out;
}

namespace {
// Blocks whose policy keeps per-layer inputs (none, module).
int64_t keeping_blocks(const Plan& p) {
  if (!p.training) return 0;
  return std::count_if(p.policy.begin(), p.policy.end(),
                       [](Recompute r) { return r != Recompute::kBlock; });
}

// Modelled step time of a split list relative to pure DAP (ms; negative: faster), and the extra
// peak bytes.
void delta(const Plan& p, const PartitionEstimate& a, const PartitionEstimate& d, double* dt_fwd,
           double* dt_bwd, double* dt_rec, double* dt_comm, int64_t* dpeak) {
  const int64_t B = p.cfg.no_blocks;
  int64_t modules = 0;
  for (Recompute r : p.policy) modules += r == Recompute::kModule;
  int64_t blocks = 0;
  for (Recompute r : p.policy) blocks += r == Recompute::kBlock;
  *dt_fwd = B * (a.fwd_ms - d.fwd_ms);
  *dt_bwd = p.training ? B * (a.bwd_ms - d.bwd_ms) : 0;
  *dt_rec = p.training ? modules * (a.rec_ms - d.rec_ms) + blocks * (a.fwd_ms - d.fwd_ms) : 0;
  *dt_comm = B * (a.comm_fwd_ms - d.comm_fwd_ms) +
             (p.training ? B * (a.comm_bwd_ms - d.comm_bwd_ms) +
                               blocks * (a.comm_fwd_ms - d.comm_fwd_ms + a.comm_block_rec_ms -
                                         d.comm_block_rec_ms) +
                               modules * (a.comm_rec_ms - d.comm_rec_ms)
                         : 0);
  *dpeak = a.transient_bytes + keeping_blocks(p) * a.saved_bytes;
}

std::vector<Split> resolve_one(const BlockTable& t, const std::vector<LayerSplit>& list) {
  std::vector<Split> out(t.count, Split::kDap);
  for (const LayerSplit& ls : list) {
    const LayerDesc* d = find_layer(t, ls.layer.c_str());
    if (d) out[d - t.layers] = ls.split;
  }
  return out;
}
}  // namespace

void add_partition_estimates(const DeviceProfile& dev, Plan* p) {
  if (p->partitions.empty() || p->dap < 2) return;
  const LayerCosts costs = plan_layer_costs(*p, dev);
  const std::vector<Split> dap(plan_table(*p).count, Split::kDap);
  const PartitionEstimate d = estimate_with(*p, dev, &costs, dap);
  // Blocks may differ: the estimate of each block's list, averaged over the blocks.
  double f = 0, b = 0, r = 0, c = 0;
  int64_t peak = 0, kept = 0;
  const int64_t B = p->cfg.no_blocks;
  std::vector<std::vector<Split>> lists;
  for (int64_t k = 0; k < B; ++k)
    lists.push_back(resolve_one(plan_table(*p), p->partitions[p->partitions.size() == 1 ? 0 : k]));
  for (int64_t k = 0; k < B; ++k) {
    const PartitionEstimate a = block_estimate(*p, dev, costs, lists, static_cast<int>(k));
    double df, db, dr, dc;
    int64_t dp;
    delta(*p, a, d, &df, &db, &dr, &dc, &dp);
    f += df / B, b += db / B, r += dr / B, c += dc / B;
    peak = std::max(peak, a.transient_bytes);
    if (p->training && p->policy[k] != Recompute::kBlock) kept += a.saved_bytes;
  }
  p->activation_bytes += kept;
  peak += kept;
  p->forward_ms += f;
  p->backward_ms += b;
  p->recompute_ms += r;
  p->comm_ms += c;
  p->peak_bytes += peak;
  p->time_ms = p->forward_ms + p->backward_ms + p->recompute_ms + p->comm_ms;
  p->time_per_protein_ms = p->time_ms / p->dp;
  p->fits = p->memory_limit_bytes <= 0 || p->peak_bytes <= p->memory_limit_bytes;
}

namespace {
// A split list of the search with its per-block time difference to pure DAP under each recompute
// policy (inference: index 0) and its memory.
struct Candidate {
  std::vector<Split> splits;
  double dt[3] = {0, 0, 0};  // ms per block: policy none, module, block
  int64_t transient = 0, saved = 0;
};

Candidate candidate(const Plan& p, const PartitionEstimate& a, const PartitionEstimate& d,
                    const std::vector<Split>& splits) {
  Candidate c;
  c.splits = splits;
  const double f = a.fwd_ms - d.fwd_ms, cf = a.comm_fwd_ms - d.comm_fwd_ms;
  if (!p.training) {
    c.dt[0] = c.dt[1] = c.dt[2] = f + cf;
  } else {
    const double base = f + (a.bwd_ms - d.bwd_ms) + cf + (a.comm_bwd_ms - d.comm_bwd_ms);
    c.dt[0] = base;
    c.dt[1] = base + (a.rec_ms - d.rec_ms) + (a.comm_rec_ms - d.comm_rec_ms);
    c.dt[2] = base + f + cf + a.comm_block_rec_ms - d.comm_block_rec_ms;  // the forward again
  }
  c.transient = a.transient_bytes;
  c.saved = p.training ? a.saved_bytes : 0;
  return c;
}

// Budget units of the kept-bytes knapsack below (kept bytes rounded up: feasible).
constexpr int kUnits = 256;
}  // namespace

// The search: every split list of the block table (every combination of supported splits) is
// estimated once; then per block a list is chosen under the memory limit. The peak grows by the
// largest transient of any chosen list plus the saved bytes of the lists of the blocks that keep
// inputs (policies none / module), so for each cap on the transient (its distinct values) the
// blocks without kept inputs take their fastest list under the cap, and the keeping blocks solve a
// knapsack over the remaining bytes (DP over blocks, kUnits budget units); the fastest cap wins.
// Blocks of different policies therefore may get different lists.
void choose_partition(const DeviceProfile& dev, Plan* p) {
  p->partitions.clear();
  if (p->dap < 2) return;
  const BlockTable& t = plan_table(*p);
  const LayerCosts costs = plan_layer_costs(*p, dev);
  const std::vector<Split> dap(t.count, Split::kDap);
  const PartitionEstimate d = estimate_with(*p, dev, &costs, dap);
  const int64_t spare =
      p->memory_limit_bytes > 0 ? p->memory_limit_bytes - p->peak_bytes : INT64_MAX / 4;
  if (spare < 0) return;
  std::vector<Candidate> cands;
  std::vector<Split> cur(t.count, Split::kDap);
  // Layouts carry across blocks: a list is estimated as it repeats (entering and leaving in its
  // own entry layouts); the chosen lists are then re-estimated block by block.
  const bool carry = p->cfg.no_blocks > 1;
  std::function<void(int)> walk = [&](int i) {
    if (i == t.count) {
      const BlockLayouts e = partition_entry_layouts(t, cur);
      const Candidate c = candidate(
          *p, estimate_with(*p, dev, &costs, cur, carry ? &e : nullptr, carry ? &e : nullptr), d,
          cur);
      if (c.transient <= spare) cands.push_back(c);
      return;
    }
    for (int k = 0; k < kSplits; ++k) {
      const Split s = static_cast<Split>(k);
      if (!split_supported(t.layers[i], s)) continue;
      cur[i] = s;
      walk(i + 1);
    }
    cur[i] = Split::kDap;
  };
  walk(0);
  const int64_t B = p->cfg.no_blocks;
  auto policy_of = [&](int64_t b) {
    return p->training && b < static_cast<int64_t>(p->policy.size()) ? p->policy[b]
                                                                     : Recompute::kBlock;
  };
  std::vector<int64_t> caps;
  for (const Candidate& c : cands) caps.push_back(c.transient);
  std::sort(caps.begin(), caps.end());
  caps.erase(std::unique(caps.begin(), caps.end()), caps.end());
  // Per policy: the candidates fastest first (ties: fewer kept bytes).
  std::vector<int> order[3];
  for (int pol = 0; pol < 3; ++pol) {
    order[pol].resize(cands.size());
    for (int k = 0; k < static_cast<int>(cands.size()); ++k) order[pol][k] = k;
    std::sort(order[pol].begin(), order[pol].end(), [&](int a, int b) {
      return cands[a].dt[pol] != cands[b].dt[pol] ? cands[a].dt[pol] < cands[b].dt[pol]
                                                  : cands[a].saved < cands[b].saved;
    });
  }
  const bool limited = p->memory_limit_bytes > 0;
  double best_dt = -1e-9;  // pure DAP unless a choice is faster
  std::vector<int> best;   // per block: index into cands
  for (const int64_t cap : caps) {
    const int64_t budget = spare - cap;
    const double unit = std::max(1.0, static_cast<double>(budget) / kUnits);
    // Per policy: the candidates under the cap on the (saved, dt) Pareto front (fastest first).
    std::vector<int> front[3];
    for (int pol = 0; pol < 3; ++pol) {
      int64_t least = INT64_MAX;
      for (int k : order[pol])
        if (cands[k].transient <= cap && cands[k].saved < least)
          front[pol].push_back(k), least = cands[k].saved;
    }
    // DP over the blocks: cost[u] = the least time of the blocks so far using u budget units.
    const double inf = 1e300;
    std::vector<double> cost(kUnits + 1, inf), next;
    cost[0] = 0;
    std::vector<std::vector<std::pair<int, int>>> from(B);  // per block and unit: (choice, prev)
    for (int64_t b = 0; b < B; ++b) {
      const Recompute pol = policy_of(b);
      const int pi = static_cast<int>(pol);
      const bool keeps = limited && p->training && pol != Recompute::kBlock;
      next.assign(kUnits + 1, inf);
      from[b].assign(kUnits + 1, {-1, -1});
      for (int u = 0; u <= kUnits; ++u) {
        if (cost[u] >= inf) continue;
        for (int k : front[pi]) {
          const int64_t need =
              keeps ? static_cast<int64_t>(std::ceil(cands[k].saved / unit - 1e-12)) : 0;
          if (keeps && static_cast<double>(cands[k].saved) > budget) continue;
          const int64_t v = u + need;
          if (v > kUnits) continue;
          const double c = cost[u] + cands[k].dt[pi];
          if (c < next[v]) next[v] = c, from[b][v] = {k, u};
          if (!keeps) break;  // the fastest under the cap
        }
      }
      cost.swap(next);
    }
    int bu = -1;
    for (int u = 0; u <= kUnits; ++u)
      if (cost[u] < inf && (bu < 0 || cost[u] < cost[bu])) bu = u;
    if (bu < 0 || cost[bu] >= best_dt) continue;
    best_dt = cost[bu];
    best.assign(B, -1);
    for (int64_t b = B - 1, u = bu; b >= 0; --b) {
      best[b] = from[b][u].first;
      u = from[b][u].second;
    }
  }
  if (best.empty()) return;
  bool any = false;
  for (int64_t b = 0; b < B; ++b) {
    std::vector<LayerSplit> list;
    for (int i = 0; i < t.count; ++i) {
      list.push_back({t.layers[i].name, cands[best[b]].splits[i]});
      any = any || cands[best[b]].splits[i] != Split::kDap;
    }
    p->partitions.push_back(std::move(list));
  }
  if (!any) {
    p->partitions.clear();
    return;
  }
  // The per-block estimate is exact where the search's repeated-list estimate of a carried
  // inference list is not (the first block's entry, the last block's exit): keep pure DAP unless
  // the chosen lists are faster or as fast.
  Plan dap_plan = *p;
  dap_plan.partitions.clear();
  add_partition_estimates(dev, p);
  if (p->time_ms > dap_plan.time_ms) *p = std::move(dap_plan);
}

}  // namespace fc

// ---- Explanation of the search (src/plan/partition_cost.h) -------------------------------------

namespace fc {

namespace {
// Per-step terms of estimate a relative to d (or of a alone: d zero) under the plan's policies.
SplitTerms step_terms(const Plan& p, const DeviceProfile& dev, const PartitionEstimate& a,
                      const PartitionEstimate& d) {
  SplitTerms t;
  double calls = 0, bytes = 0;
  const int64_t B = p.cfg.no_blocks;
  for (int64_t b = 0; b < B; ++b) {
    const Recompute pol =
        p.training && b < static_cast<int64_t>(p.policy.size()) ? p.policy[b] : Recompute::kBlock;
    t.compute_ms += a.fwd_ms - d.fwd_ms + a.copy_fwd_ms - d.copy_fwd_ms;
    calls += a.calls_fwd - d.calls_fwd;
    bytes += static_cast<double>(a.sent_fwd_bytes - d.sent_fwd_bytes);
    if (!p.training) continue;
    t.compute_ms += a.bwd_ms - d.bwd_ms + a.copy_bwd_ms - d.copy_bwd_ms;
    calls += a.calls_bwd - d.calls_bwd;
    bytes += static_cast<double>(a.sent_bwd_bytes - d.sent_bwd_bytes);
    if (pol == Recompute::kModule) {
      t.compute_ms += a.rec_ms - d.rec_ms + a.copy_rec_ms - d.copy_rec_ms;
      calls += a.calls_rec - d.calls_rec;
      bytes += static_cast<double>(a.sent_rec_bytes - d.sent_rec_bytes);
    } else if (pol == Recompute::kBlock) {
      t.compute_ms += a.fwd_ms - d.fwd_ms + a.copy_fwd_ms - d.copy_fwd_ms + a.copy_block_rec_ms -
                      d.copy_block_rec_ms;
      calls += a.calls_fwd - d.calls_fwd + a.calls_block_rec - d.calls_block_rec;
      bytes += static_cast<double>(a.sent_fwd_bytes - d.sent_fwd_bytes + a.sent_block_rec_bytes -
                                   d.sent_block_rec_bytes);
    }
  }
  const double gbps = dev.link_gbps > 0 ? dev.link_gbps : 10.0;
  t.latency_ms = calls * dev.link_latency_us * 1e-3;
  t.link_ms = 2.0 * bytes / (gbps * 1e9) * 1e3;
  t.extra_peak_bytes = a.transient_bytes + keeping_blocks(p) * a.saved_bytes -
                       (d.transient_bytes + keeping_blocks(p) * d.saved_bytes);
  return t;
}
}  // namespace

std::vector<SplitTerms> explain_splits(const DeviceProfile& dev, const Plan& p) {
  std::vector<SplitTerms> out;
  if (p.dap < 2) return out;
  const BlockTable& t = plan_table(p);
  const LayerCosts costs = plan_layer_costs(p, dev);
  const std::vector<Split> dap(t.count, Split::kDap);
  const PartitionEstimate d = estimate_with(p, dev, &costs, dap);
  auto terms = [&](const std::vector<Split>& s) {
    SplitTerms r = step_terms(p, dev, estimate_with(p, dev, &costs, s), d);
    r.splits = s;
    return r;
  };
  for (int i = 0; i < t.count; ++i)
    for (int k = 1; k < kSplits; ++k)
      if (split_supported(t.layers[i], static_cast<Split>(k))) {
        std::vector<Split> s = dap;
        s[i] = static_cast<Split>(k);
        out.push_back(terms(s));
      }
  SplitTerms best = terms(dap);
  std::vector<Split> cur = dap;
  std::function<void(int)> walk = [&](int i) {
    if (i == t.count) {
      if (cur == dap) return;
      SplitTerms c = terms(cur);
      if (best.splits == dap || c.total_ms() < best.total_ms()) best = std::move(c);
      return;
    }
    for (int k = 0; k < kSplits; ++k)
      if (split_supported(t.layers[i], static_cast<Split>(k))) {
        cur[i] = static_cast<Split>(k);
        walk(i + 1);
      }
    cur[i] = Split::kDap;
  };
  walk(0);
  out.push_back(std::move(best));
  return out;
}

void dap_link_terms(const DeviceProfile& dev, const Plan& p, double* link_ms, double* latency_ms) {
  const BlockTable& t = plan_table(p);
  const LayerCosts costs = plan_layer_costs(p, dev);
  const std::vector<Split> dap(t.count, Split::kDap);
  const SplitTerms s = step_terms(p, dev, estimate_with(p, dev, &costs, dap), PartitionEstimate{});
  *link_ms = s.link_ms;
  *latency_ms = s.latency_ms;
}

}  // namespace fc
