// Split names (include/foldcube/partition.h) and the planner's cost, memory and search of
// per-layer partitions (src/plan/partition_cost.h).
#include "exec/partition.h"

#include <algorithm>
#include <array>
#include <climits>
#include <functional>

#include "foldcube/partition.h"
#include "model/block_table.h"
#include "plan/partition_cost.h"

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

bool full(Shard h) { return h == Shard::kMsaFull || h == Shard::kPairFull; }

// Floats a rank sends to change a stream of w whole (padded) floats from layout a to b over n
// ranks: an all-to-all (n-1)/n^2 w, an all-gather to the whole stream (n-1)/n w, a slice 0.
int64_t change_floats(Shard a, Shard b, int64_t w, int n) {
  if (a == b || full(a)) return 0;
  if (full(b)) return (n - 1) * (w / n);
  return (n - 1) * (w / n / n);
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
// shrink, the LayerNorms of the whole stream do not) and hidden channels (ceil(n/N) of the
// transition factor n), the forms heads and channels run.
struct LayerCosts {
  std::vector<ModuleCost> whole, heads, channels;
};

// The share of a heads / channels layer's units the most loaded rank holds.
double cost_share(const LayerDesc& ly, const EvoformerConfig& cfg, Split s, int64_t n) {
  const int64_t total =
      s == Split::kHeads
          ? (ly.kind == LayerKind::kTriangleAttention ? cfg.no_heads_pair : cfg.no_heads_msa)
          : cfg.transition_n * (ly.updates == Stream::kM ? cfg.c_m : cfg.c_z);
  return static_cast<double>((total + n - 1) / n) / static_cast<double>(total);
}

// The cost of layer i under split s on the most loaded rank (l: the plan's DAP layout).
const ModuleCost& cost_of(const LayerCosts& c, int i, Split s) {
  return s == Split::kHeads ? c.heads[i] : s == Split::kChannels ? c.channels[i] : c.whole[i];
}
double share_of(Split s, const DapLayout& l) {
  return s == Split::kDap ? static_cast<double>(l.r_loc) / static_cast<double>(l.r) : 1.0;
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
    default:
      return 0;
  }
}

double link_ms(int64_t sent_bytes, int calls, const DeviceProfile& dev) {
  if (calls == 0) return 0;
  const double gbps = dev.link_gbps > 0 ? dev.link_gbps : 10.0;
  return calls * dev.link_latency_us * 1e-3 + 2.0 * sent_bytes / (gbps * 1e9) * 1e3;
}

LayerCosts plan_layer_costs(const Plan& p, const DeviceProfile& dev) {
  DeviceProfile d = dev;
  d.dtype = p.dtype;
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
  return {costs(p.cfg), costs(heads), costs(channels)};
}

// estimate_partition with the layers' single-device costs at the plan's shape given.
PartitionEstimate estimate_with(const Plan& p, const DeviceProfile& dev, const LayerCosts& costs,
                                const std::vector<Split>& splits) {
  const EvoformerConfig& cfg = p.cfg;
  const BlockTable& t = kEvoformerBlock;
  const DapLayout l = dap_layout(p.s, p.r, p.dap, 0);
  const int n = l.n;
  const int64_t e = static_cast<int64_t>(dtype_size(p.dtype));
  const int64_t wm = l.s_pad * l.r_pad * cfg.c_m, wz = l.r_pad * l.r_pad * cfg.c_z;
  const std::vector<std::pair<Shard, Shard>> lay = partition_block_layouts(t, splits);
  PartitionEstimate est;
  int64_t fwd_floats = 0, bwd_floats = 0;
  int fwd_calls = 0, bwd_calls = 0;
  Shard m = Shard::kMsaBySeq, z = Shard::kPairRows;
  auto change = [&](Shard& from, Shard to, int64_t w) {
    const int64_t f = change_floats(from, to, w, n), b = change_floats(to, from, w, n);
    fwd_floats += f, bwd_floats += b;
    fwd_calls += f > 0, bwd_calls += b > 0;
    from = to;
  };
  const double mem_gbps = dev.mem_gbps > 0 ? dev.mem_gbps : 10.0;
  for (int i = 0; i < t.count; ++i) {
    const LayerDesc& ly = t.layers[i];
    const Split s = splits[i];
    change(m, lay[i].first, wm);
    change(z, lay[i].second, wz);
    const ModuleCost& c = cost_of(costs, i, s);
    const double share = share_of(s, l);
    est.fwd_ms += c.forward_ms * share;
    est.bwd_ms += c.backward_ms * share;
    est.rec_ms += c.rebuild_ms * share;
    const int64_t wx = ly.updates == Stream::kM ? wm : wz;
    const int64_t wr = ly.reads == Stream::kNone ? 0 : (ly.reads == Stream::kM ? wm : wz);
    if (s == Split::kDap) {
      const int64_t g = dap_gather_floats(ly, cfg, l);
      fwd_floats += g, bwd_floats += 2 * g;  // backward: reduce-scatter and a re-gather
      fwd_calls += g > 0, bwd_calls += 2 * (g > 0);
    } else {
      if (s != Split::kReplicated) {  // partial sums: all-reduce (ring: 2 (n-1)/n of the stream)
        fwd_floats += 2 * (n - 1) * (wx / n);
        bwd_floats += 2 * (n - 1) * ((wx + wr) / n);
        fwd_calls += 1, bwd_calls += 1 + (wr > 0);
        // Copy, subtract, add over the whole stream: forward and backward.
        const double ms = 4.0 * (wx + wr) * kF / (mem_gbps * 1e9) * 1e3;
        est.fwd_ms += ms * wx / (wx + wr);
        est.bwd_ms += ms;
      }
      // Whole streams on every rank instead of shards, and the partial-sum copies.
      int64_t extra = 0;
      if (ly.updates == Stream::kM || ly.reads == Stream::kM) extra += wm - wm / n;
      if (ly.updates == Stream::kZ || ly.reads == Stream::kZ) extra += wz - wz / n;
      if (s != Split::kReplicated) extra += wx + (p.training ? wr : 0);
      // This rank's weight slices (and their gradients); a replicated layer's gradients on the
      // ranks other than the root (discarded scratch).
      const int64_t params = layer_param_floats(ly, cfg);
      if (s != Split::kReplicated)
        extra += (p.training ? 2 : 1) * static_cast<int64_t>(params * cost_share(ly, cfg, s, n));
      else if (p.training)
        extra += params;
      est.transient_bytes = std::max(est.transient_bytes, extra * e);
      if (p.training) {
        const SavedInputs in = saved_inputs(t, i);
        est.saved_bytes += ((in.updated ? wx - wx / n : 0) + (in.read ? wr - wr / n : 0)) * e;
      }
    }
    // The OPM's backward rebuilds its m (not kept) from the block output by sequences.
    if (p.training && ly.reads == Stream::kM && !saved_inputs(t, i).read) {
      const int64_t f = change_floats(Shard::kMsaBySeq, lay[i].first, wm, n);
      bwd_floats += f, bwd_calls += f > 0;
    }
  }
  change(m, Shard::kMsaBySeq, wm);
  change(z, Shard::kPairRows, wz);
  est.sent_fwd_bytes = fwd_floats * e;
  est.sent_bwd_bytes = bwd_floats * e;
  est.comm_fwd_ms = link_ms(est.sent_fwd_bytes, fwd_calls, dev);
  est.comm_bwd_ms = link_ms(est.sent_bwd_bytes, bwd_calls, dev);
  return est;
}
}  // namespace

PartitionEstimate estimate_partition(const Plan& p, const DeviceProfile& dev,
                                     const std::vector<Split>& splits) {
  return estimate_with(p, dev, plan_layer_costs(p, dev), splits);
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
  *dt_comm =
      B * (a.comm_fwd_ms - d.comm_fwd_ms) +
      (p.training ? B * (a.comm_bwd_ms - d.comm_bwd_ms) + blocks * (a.comm_fwd_ms - d.comm_fwd_ms)
                  : 0);
  *dpeak = a.transient_bytes + keeping_blocks(p) * a.saved_bytes;
}

std::vector<Split> resolve_one(const std::vector<LayerSplit>& list) {
  std::vector<Split> out(kEvoformerBlock.count, Split::kDap);
  for (const LayerSplit& ls : list) {
    const LayerDesc* d = find_layer(kEvoformerBlock, ls.layer.c_str());
    if (d) out[d - kEvoformerBlock.layers] = ls.split;
  }
  return out;
}
}  // namespace

void add_partition_estimates(const DeviceProfile& dev, Plan* p) {
  if (p->partitions.empty() || p->dap < 2 || p->extra_msa) return;
  const LayerCosts costs = plan_layer_costs(*p, dev);
  const std::vector<Split> dap(kEvoformerBlock.count, Split::kDap);
  const PartitionEstimate d = estimate_with(*p, dev, costs, dap);
  // Blocks may differ: the estimate of each block's list, averaged over the blocks.
  double f = 0, b = 0, r = 0, c = 0;
  int64_t peak = 0, kept = 0;
  const int64_t B = p->cfg.no_blocks;
  for (int64_t k = 0; k < B; ++k) {
    const auto& list = p->partitions[p->partitions.size() == 1 ? 0 : k];
    const PartitionEstimate a = estimate_with(*p, dev, costs, resolve_one(list));
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

void choose_partition(const DeviceProfile& dev, Plan* p) {
  p->partitions.clear();
  if (p->dap < 2 || p->extra_msa) return;
  const BlockTable& t = kEvoformerBlock;
  const LayerCosts costs = plan_layer_costs(*p, dev);
  const std::vector<Split> dap(t.count, Split::kDap);
  const PartitionEstimate d = estimate_with(*p, dev, costs, dap);
  const int64_t spare =
      p->memory_limit_bytes > 0 ? p->memory_limit_bytes - p->peak_bytes : INT64_MAX;
  std::vector<Split> cur(t.count, Split::kDap), best = dap;
  double best_dt = 0;
  // Every combination of supported splits, layer by layer.
  std::function<void(int)> walk = [&](int i) {
    if (i == t.count) {
      const PartitionEstimate a = estimate_with(*p, dev, costs, cur);
      double df, db, dr, dc;
      int64_t dpk;
      delta(*p, a, d, &df, &db, &dr, &dc, &dpk);
      const double dt = df + db + dr + dc;
      if (dpk <= spare && dt < best_dt - 1e-9) best_dt = dt, best = cur;
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
  if (best == dap) return;
  std::vector<LayerSplit> list;
  for (int i = 0; i < t.count; ++i) list.push_back({t.layers[i].name, best[i]});
  p->partitions.assign(p->cfg.no_blocks, list);
  add_partition_estimates(dev, p);
}

}  // namespace fc
