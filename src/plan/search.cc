// Plan search: the estimates of a plan (time from the cost model, memory from the exact analytic
// model) and the optimum over recompute policies per block, chunk targets and DAP/DP degrees.
// The recompute search is an exact dynamic programme over block positions (docs/planner.md).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <limits>
#include <map>
#include <tuple>

#include "foldcube/plan.h"
#include "foldcube/planner.h"
#include "model/block_table.h"
#include "model/common.h"
#include "model/modules.h"
#include "model/train.h"
#include "plan/memory_model.h"
#include "plan/partition_cost.h"

namespace fc {

namespace {
constexpr int64_t kF = sizeof(float);
constexpr int kTypes = 3;  // Recompute::kNone, kModule, kBlock
const Recompute kType[kTypes] = {Recompute::kNone, Recompute::kModule, Recompute::kBlock};

std::string mib(int64_t bytes) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.1f MiB", static_cast<double>(bytes) / 1048576.0);
  return buf;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// One choice of everything but the per-block policies.
struct Setting {
  int dap = 1, dp = 1;
  int64_t chunk = 0, target = 0;
};

// Memory of the training step per device, decomposed by block position (docs/planner.md):
// peak = base + max(K_total + C, max_b [K_<b + C + (B - b) G + m [b < B-1] + w_type(b)]) with
// K_<b the bytes kept by the blocks before b. k, w, C, m, G are read off stack_step_peak_bytes.
// wm: w of a block that is not the last (BF16 storage: its outputs are the next block's bf16
// inputs, which its backward widens; F32: wm = w).
struct Terms {
  int64_t k[kTypes] = {}, w[kTypes] = {}, wm[kTypes] = {};
  int64_t C = 0, m = 0, G = 0, gather = 0;
};

// extra_msa: the ExtraMSA stack (one process: dap = 1). e: plan_buffer_bytes; store: the kept
// inputs' dtype (plan_store_dtype).
// G: per-block parameter-gradient bytes. At s = r = 1 the streams are tiny and the backward of
// block 0 (under all the gradient structs) is the peak, so one more block adds exactly G.
int64_t block_grad_bytes(const EvoformerConfig& cfg, int threads, int64_t e, DType store,
                         int64_t chunk, int64_t target, bool extra_msa) {
  return stack_step_peak_bytes(cfg, 1, 1, 3, {Recompute::kBlock}, threads, e, chunk, target,
                               extra_msa, store) -
         stack_step_peak_bytes(cfg, 1, 1, 2, {Recompute::kBlock}, threads, e, chunk, target,
                               extra_msa, store);
}

Terms training_terms(const EvoformerConfig& cfg, int64_t s, int64_t r, int threads, int64_t e,
                     DType store, int dap, int64_t chunk, int64_t target, bool extra_msa) {
  Terms t;
  t.G = block_grad_bytes(cfg, threads, e, store, chunk, target, extra_msa);
  if (dap > 1) {  // the padded shape; target 0: the DAP executor's default (make_dap_shards)
    s = ceil_div(s, dap) * dap, r = ceil_div(r, dap) * dap;
    if (target <= 0 && chunk <= 0)
      target = std::max<int64_t>((s * r * cfg.c_m + r * r * cfg.c_z) / dap * kF / 8, 1 << 20);
  }
  const int64_t m = s * r * cfg.c_m * e, z = r * r * cfg.c_z * e;
  t.C = m + z;
  t.m = store == DType::BF16 ? s * r * cfg.c_m * 2 : m;  // the held input: a kept one
  // DAP: a rank's chunk buffers at target T are those of one process at N T divided by N (the
  // shards are 1/N of the items), so the work terms come from the one-process model at N T.
  const int64_t wt = dap > 1 && chunk <= 0 ? target * dap : target;
  for (int i = 0; i < kTypes; ++i) {
    t.k[i] = block_activation_bytes(cfg, s, r, kType[i], e, chunk, target, extra_msa, store);
    // A one-block stack's peak is the backward of its only block: C + G + w.
    t.w[i] =
        stack_step_peak_bytes(cfg, s, r, 1, {kType[i]}, threads, e, chunk, wt, extra_msa, store) -
        t.C - t.G;
    t.wm[i] = t.w[i];
    if (store == DType::BF16)
      t.wm[i] += block_backward_peak_bytes(cfg, s, r, kType[i], threads, e, chunk, wt, extra_msa,
                                           store, false) -
                 block_backward_peak_bytes(cfg, s, r, kType[i], threads, e, chunk, wt, extra_msa,
                                           store, true);
  }
  if (dap > 1) {  // each rank holds 1/N of every padded activation and whole gathered operands
    const int64_t sp = s, rp = r;
    // Policy none keeps the three gathered pair biases [H, r_p, r_p] whole on every rank.
    const int64_t bias = (cfg.no_heads_msa + 2 * cfg.no_heads_pair) * rp * rp * e;
    t.k[0] = ceil_div(t.k[0] - bias, dap) + bias;
    for (int i = 1; i < kTypes; ++i) t.k[i] = ceil_div(t.k[i], dap);
    for (int i = 0; i < kTypes; ++i) t.w[i] = t.wm[i] = ceil_div(t.w[i], dap);
    t.C = ceil_div(t.C, dap);
    t.m = ceil_div(t.m, dap);
    // Beside a block's work: the largest gathered operand (a triangle multiplication's channel
    // group as tri_mul_train_chunks(ctx, rows, parts) of src/layers/triangle_multiplication.cc
    // picks it), the OPM input the backward rebuilds from the block output (a shard of m) with one
    // more shard for its layout change, and a bias gradient's reduce-scatter buffers (2 [H, r_p,
    // r_p]), none of which shrink like the rest.
    const int64_t ms = sp / dap * rp * cfg.c_m, zs = rp / dap * rp * cfg.c_z;
    const int64_t H = std::max(cfg.no_heads_msa, cfg.no_heads_pair);
    BlockContext ctx;  // the shards' context: channel groups of the triangle multiplication
    ctx.cfg = &cfg;
    ctx.s = sp, ctx.r = rp;
    ctx.chunk = chunk;
    ctx.chunk_target_bytes = target;
    const int64_t cg = tri_mul_train_chunks(ctx, rp / dap, dap).group;
    t.gather = (std::max({cg * rp * rp, cfg.no_heads_msa * rp * rp, sp * rp * cfg.c_hidden_opm}) +
                ms + std::max(ms, zs) + 2 * H * rp * rp) *
               e;
  }
  return t;
}

// The DAP training estimate per rank: the decomposition with the terms above plus 3 % for what it
// does not list (docs/planner.md: with 1 % it was 0.2-3.8 % above the measured peak at tiny and
// AF2 dims up to (128, 256), but 0.9 % and 1.1 % below at (512, 256) and (512, 384), policy
// module, automatic target; the exact replay of the sharded step is not written).
int64_t dap_train_peak(int64_t decomposed) { return decomposed + decomposed * 3 / 100; }

// DAP training, rank 0 after the backward (above base and the B gradient structs): its shards of
// m, z and their gradients, then the whole outputs and input gradients gathered one by one (each
// into a padded buffer, cropped when padded) while the shards are freed (dap_train_step).
int64_t dap_train_end_bytes(const EvoformerConfig& cfg, int64_t s, int64_t r, int n, int64_t e) {
  const int64_t sp = ceil_div(s, n) * n, rp = ceil_div(r, n) * n;
  const int64_t M = s * r * cfg.c_m, Z = r * r * cfg.c_z;
  const int64_t Mp = sp * rp * cfg.c_m, Zp = rp * rp * cfg.c_z, ms = Mp / n, zs = Zp / n;
  const bool pad = sp != s || rp != r;
  int64_t live = 2 * (ms + zs), peak = live;
  for (int i = 0; i < 4; ++i) {  // m, z, grad m, grad z
    const bool is_m = i % 2 == 0;
    peak = std::max(peak, live + (is_m ? Mp : Zp) + (pad ? (is_m ? M : Z) : 0));
    live += is_m ? M - ms : Z - zs;
  }
  return peak * e;
}

// Minimal peak (above base) of every count vector, by a DP over positions; state (a, c) = blocks
// with kNone and kModule among the positions done. The terms of position b depend only on the
// state and b, so the minimal max over positions is exact. choice[b][a][c] is the type placed at
// position b - 1 to reach (a, c) at b.
struct PolicyDp {
  int B = 0;
  std::vector<int64_t> peak;                     // [(B+1)^2]: final (a, c) -> min peak
  std::vector<std::vector<signed char>> choice;  // [B+1][(B+1)^2]
  int idx(int a, int c) const { return a * (B + 1) + c; }
  std::vector<Recompute> order(int a, int c) const {
    std::vector<Recompute> seq(B);
    for (int b = B; b > 0; --b) {
      const int t = choice[b][idx(a, c)];
      seq[b - 1] = kType[t];
      if (t == 0) --a;
      if (t == 1) --c;
    }
    return seq;
  }
};

PolicyDp policy_dp(const Terms& t, int B) {
  constexpr int64_t kInf = std::numeric_limits<int64_t>::max();
  PolicyDp dp;
  dp.B = B;
  const int n = (B + 1) * (B + 1);
  std::vector<int64_t> cur(n, kInf), nxt(n, kInf);
  dp.choice.assign(B + 1, std::vector<signed char>(n, -1));
  cur[dp.idx(0, 0)] = 0;
  for (int b = 0; b < B; ++b) {
    std::fill(nxt.begin(), nxt.end(), kInf);
    const int64_t pos = t.C + (B - b) * t.G + (b + 1 < B ? t.m : 0) + t.gather;
    for (int a = 0; a <= b; ++a)
      for (int c = 0; a + c <= b; ++c) {
        const int64_t v = cur[dp.idx(a, c)];
        if (v == kInf) continue;
        const int64_t K = a * t.k[0] + c * t.k[1] + (b - a - c) * t.k[2];
        for (int ty = 0; ty < kTypes; ++ty) {
          const int na = a + (ty == 0), nc = c + (ty == 1);
          const int64_t nv = std::max(v, K + pos + (b + 1 < B ? t.wm[ty] : t.w[ty]));
          int64_t& slot = nxt[dp.idx(na, nc)];
          if (nv < slot) {
            slot = nv;
            dp.choice[b + 1][dp.idx(na, nc)] = static_cast<signed char>(ty);
          }
        }
      }
    std::swap(cur, nxt);
  }
  dp.peak.assign(n, kInf);
  for (int a = 0; a <= B; ++a)
    for (int c = 0; a + c <= B; ++c) {
      const int64_t v = cur[dp.idx(a, c)];
      if (v == kInf) continue;
      const int64_t total = a * t.k[0] + c * t.k[1] + (B - a - c) * t.k[2];
      dp.peak[dp.idx(a, c)] = std::max(v, total + t.C + t.gather);
    }
  return dp;
}

// The ExtraMSA stack has no single projection (linear.*).
int64_t weights_bytes(const EvoformerConfig& cfg, int64_t grad_struct, int64_t e,
                      bool extra_msa = false) {
  return cfg.no_blocks * grad_struct + (extra_msa ? 0 : (cfg.c_s * cfg.c_m + cfg.c_s) * e);
}

int64_t dap_mask_elems(int64_t sp, int64_t rp, int64_t rl);

// Bytes live before the step (weights; inputs and masks; for training the output gradients),
// per device. DAP (training): the largest rank is rank 0, which holds the whole output gradients
// for the step; every rank holds the padded masks (the shards of m and z are in the step terms).
int64_t base_bytes(const EvoformerConfig& cfg, int64_t s, int64_t r, bool training,
                   int64_t grad_struct, int64_t e, int dap, bool extra_msa) {
  // Masks: the all-ones msa and pair masks; training keeps their biases (and transposes) for the
  // step, while the forward's are in forward_peak_bytes.
  const int64_t mz = s * r * cfg.c_m + r * r * cfg.c_z,
                masks = (training ? 3 : 1) * (s * r + r * r);
  if (dap > 1) {
    const int64_t rl = ceil_div(r, dap);
    return weights_bytes(cfg, grad_struct, e, extra_msa) +
           ((training ? mz : 0) + dap_mask_elems(ceil_div(s, dap) * dap, rl * dap, rl)) * e;
  }
  return weights_bytes(cfg, grad_struct, e, extra_msa) + ((training ? 2 : 1) * mz + masks) * e;
}

// Items per chunk of each module, as the modules pick them.
std::vector<std::pair<std::string, int64_t>> module_chunks(const EvoformerConfig& cfg, int64_t s,
                                                           int64_t r, bool training, int64_t chunk,
                                                           int64_t target, int threads,
                                                           bool extra_msa) {
  const BlockContext ctx = shape_context(
      cfg, s, r, chunk,
      target > 0 || !training ? target : default_train_chunk_target_bytes(cfg, s, r), threads);
  std::vector<std::pair<std::string, int64_t>> out;
  auto add = [&](const std::string& name, int64_t items) {
    for (const auto& e : out)
      if (e.first == name) return;  // loops shared by a layer kind are listed once
    out.emplace_back(name, items);
  };
  for (const LayerDesc& l : extra_msa ? kExtraMsaBlock : kEvoformerBlock) {
    const std::vector<ChunkLoop> loops = layer_chunking(l, ctx);  // the inference loops
    if (!training) {
      if (l.kind == LayerKind::kOuterProductMean)
        add(std::string(l.name) + ".msa_rows", loops[0].items);
      if (l.kind == LayerKind::kTriangleMultiplication)
        add("tri_mul.channel_group", loops[0].items);
      add(l.name, loops.back().items);
      continue;
    }
    // Training: the chunk functions of src/model/train.h (the OPM's residue blocks as inference).
    const int64_t c = stream_channels(ctx, l.updates), n = cfg.transition_n;
    const int64_t hm = cfg.no_heads_msa * cfg.c_hidden_msa_att;
    const int64_t hp = cfg.no_heads_pair * cfg.c_hidden_pair_att;
    switch (l.kind) {
      case LayerKind::kMsaRowAttention:
        add(l.name, attention_train_chunk(ctx, s, r, cfg.c_m, hm));
        add(std::string(l.name) + ".bias_rows", bias_train_chunk(ctx, cfg.no_heads_msa));
        break;
      case LayerKind::kMsaColumnAttention:
        add(l.name, attention_train_chunk(ctx, r, s, cfg.c_m, hm));
        break;
      case LayerKind::kTransition:
      case LayerKind::kMaskedTransition:
        add(l.name, transition_train_chunk(ctx, stream_rows(ctx, l.updates), c, n * c));
        break;
      case LayerKind::kMsaColumnGlobalAttention:
        add(l.name, global_attention_train_chunk(ctx));
        break;
      case LayerKind::kOuterProductMean:
        add(l.name, loops.back().items);
        break;
      case LayerKind::kTriangleMultiplication: {
        const TriMulTrainChunks tm = tri_mul_train_chunks(ctx);
        add("tri_mul.channel_group", tm.group);
        add(l.name, tm.rows);
        break;
      }
      case LayerKind::kTriangleAttention:
        add("tri_att.bias_rows", bias_train_chunk(ctx, cfg.no_heads_pair));
        add(l.name, attention_train_chunk(ctx, r, r, cfg.c_z, hp));
        break;
      default:
        FC_CHECK_MSG(false, std::string("layer ") + l.name + " has no training path");
    }
  }
  return out;
}

// Elements of the padded masks every DAP rank holds (DapShards of src/exec/dap.h): msa mask,
// bias [s_p, r_p] and transposed bias, this rank's mask columns [s_p, r_l], pair mask, its
// transpose, bias and transposed bias [r_p, r_p].
int64_t dap_mask_elems(int64_t sp, int64_t rp, int64_t rl) {
  return 3 * sp * rp + sp * rl + 4 * rp * rp;
}

// Tracked peak per rank of dap_forward (src/exec/dap.cc) over n ranks, in bytes, the largest
// over ranks (docs/planner.md). Every rank holds the weights, the padded masks, its shards of m
// and z and, at one time, one module's work on the shards: the biased attentions' gathered bias
// [H, r_p, r_p] (2x while it is permuted), column attention and the transitions on the shard
// shapes (module_workspace_bytes on shard contexts), one more shard for a layout change, the
// outer product mean and the triangle multiplications on their shards (above). Rank 0 also holds
// the whole inputs before the scatter and the outputs after the gather. Without the weights.
// extra_msa: the ExtraMSA stack's dap_forward (global column attention and the masked
// transition, which runs on m by sequences or by residues, in place of the column attention and
// the MSA transition; no output s). dtype: DapOptions::dtype (BF16: the layers' bf16 weight
// copies and GEMM scratch in their workspaces).
int64_t dap_inference_peak(const EvoformerConfig& cfg, int64_t s, int64_t r, int n, int64_t chunk,
                           int64_t target, int threads, bool extra_msa, DType dtype) {
  const int64_t sl = ceil_div(s, n), rl = ceil_div(r, n), sp = sl * n, rp = rl * n;
  const int64_t cm = cfg.c_m, cz = cfg.c_z;
  const int64_t shards = (sl * rp * cm + rl * rp * cz) * kF;
  BlockContext base;
  base.cfg = &cfg;
  base.chunk = chunk;
  base.chunk_target_bytes = target > 0 ? target : std::max<int64_t>(shards / 8, 1 << 20);
  base.threads = std::max(threads, 1);
  base.dtype = dtype;
  BlockContext full = base, col = base;  // (s_p, r_p) and m by residues (s_p, r_l)
  full.s = col.s = sp;
  full.r = rp;
  col.r = rl;
  // Attention over `items` rows of length L with c channels (the column-attention formula).
  auto attention = [&](int64_t H, int64_t C, int64_t items, int64_t L, int64_t c) {
    EvoformerConfig a = cfg;
    a.no_heads_msa = H, a.c_hidden_msa_att = C, a.c_m = c;
    BlockContext ctx = base;
    ctx.cfg = &a;
    ctx.r = items;
    ctx.s = L;
    return module_workspace_bytes("msa_att_col", ctx);
  };
  // Gathered bias: all [r_p^2, H] + this rank's rows [r_l r_p, H] + the projection's workspace,
  // then all + bias; then the bias beside the attention.
  auto biased = [&](int64_t H, int64_t C, int64_t items, int64_t c) {
    const int64_t ln = pair_bias_project_bytes(full, rl, H);
    return std::max({(rp * rp + rl * rp) * H * kF + ln, 2 * H * rp * rp * kF,
                     H * rp * rp * kF + attention(H, C, items, rp, c)});
  };
  EvoformerConfig pz = cfg;  // the pair transition on [r_l r_p, c_z] as the MSA one
  pz.c_m = cz;
  BlockContext pt = base;
  pt.cfg = &pz;
  pt.s = rl;
  pt.r = rp;
  BlockContext row = base;  // m by sequences (s_l, r_p)
  row.s = sl;
  row.r = rp;
  const int64_t msa_layers =
      extra_msa
          ? std::max({layer_workspace_bytes(*find_layer(kExtraMsaBlock, "msa_att_col"), col),
                      layer_workspace_bytes(*find_layer(kExtraMsaBlock, "msa_transition"), col),
                      layer_workspace_bytes(*find_layer(kExtraMsaBlock, "msa_transition"), row)})
          : std::max(module_workspace_bytes("msa_att_col", col),
                     module_workspace_bytes("msa_transition", col));
  const int64_t work =
      std::max({biased(cfg.no_heads_msa, cfg.c_hidden_msa_att, sl, cm), sl * rp * cm * kF,
                rl * rp * cz * kF, msa_layers, outer_product_mean_shard_bytes(full, rl, n),
                triangle_multiplication_shard_bytes(full, rl, n),
                biased(cfg.no_heads_pair, cfg.c_hidden_pair_att, rl, cz),
                module_workspace_bytes("msa_transition", pt)});
  const int64_t masks = dap_mask_elems(sp, rp, rl) * kF;
  const int64_t m = s * r * cm * kF, z = r * r * cz * kF;
  const int64_t mp = sp * rp * cm * kF, zp = rp * rp * cz * kF;
  const bool padded = sp != s || rp != r;
  // Root: prepare_inputs (all-ones masks, biases, transposes) beside the padded masks; the padded
  // inputs being scattered; the outputs being gathered and cropped, then s [r, c_s].
  const int64_t root = std::max(
      {m + z + (3 * s * r + 3 * r * r + sp * rp + rp * rp) * kF,
       masks + shards + mp + zp + (padded ? std::max(m, z) : 0),
       masks + std::max({mp + (padded ? m : 0) + shards, m + zp + (padded ? z : 0) + shards,
                         m + z + (extra_msa ? 0 : r * cfg.c_s * kF)})});
  return std::max(masks + shards + work, root);
}

// Per-block times of one setting (per device): forward, backward, recompute per type, comm.
struct BlockTimes {
  double fwd = 0, bwd = 0, rec[kTypes] = {}, comm_fwd = 0;
  double comm_bwd[kTypes] = {};  // the backward's collectives per policy (recompute included)
  std::vector<ModuleCost> costs;
};

// costs: block_module_costs of this shape and chunking on dev when known (it does not depend on
// the DAP degree), else computed.
BlockTimes block_times(const EvoformerConfig& cfg, int64_t s, int64_t r, bool training,
                       const Setting& st, const DeviceProfile& dev, bool extra_msa,
                       const std::vector<ModuleCost>* costs = nullptr) {
  BlockTimes bt;
  bt.costs =
      costs ? *costs : block_module_costs(cfg, s, r, st.chunk, st.target, training, dev, extra_msa);
  // DAP: every module's work splits over the ranks along one axis of length r (or s); the
  // padded shard length sets the time.
  const double share = st.dap > 1 ? static_cast<double>(ceil_div(r, st.dap)) / r : 1.0;
  // A module's fixed overhead (module_overhead_us: dispatch, launches) runs in full on every rank.
  const double fixed = dev.module_overhead_us * 1e-3;
  auto split = [&](double ms) { return (ms - fixed) * share + fixed; };
  for (ModuleCost& c : bt.costs) {
    c.forward_ms = split(c.forward_ms);
    if (training) c.backward_ms = split(c.backward_ms), c.rebuild_ms = split(c.rebuild_ms);
    bt.fwd += c.forward_ms;
    bt.bwd += c.backward_ms;
    bt.rec[1] += c.rebuild_ms;  // kModule rebuilds each module's saved state
  }
  bt.rec[2] = bt.fwd;  // kBlock re-runs the block forward
  const int64_t e = plan_buffer_bytes(dev.element_bytes);
  // The seeds' PASDAP form is the Evoformer stack's (the seeds ran no ExtraMSA stack under DAP).
  const bool pasdap = dev.dap_form == "pasdap" && !extra_msa;
  bt.comm_fwd = comm_ms(pasdap ? pasdap_block_comm(cfg, s, r, st.dap, e, false, Recompute::kNone)
                               : dap_block_comm(cfg, s, r, st.dap, e),
                        dev);
  for (int i = 0; i < kTypes; ++i)
    bt.comm_bwd[i] = comm_ms(pasdap ? pasdap_block_comm(cfg, s, r, st.dap, e, true, kType[i])
                                    : dap_block_backward_comm(cfg, s, r, st.dap, e, kType[i]),
                             dev);
  // The CPU's copies of the collectives and layout changes (packing, the collectives' own copies
  // and sums), which the link model leaves out: forward, and the backward per policy.
  const PartitionEstimate c = dap_copy_estimate(cfg, s, r, st.dap, training, extra_msa, dev);
  bt.comm_fwd += c.copy_fwd_ms;
  for (int i = 0; i < kTypes; ++i)
    bt.comm_bwd[i] += c.copy_bwd_ms + (kType[i] == Recompute::kModule ? c.copy_rec_ms : 0) +
                      (kType[i] == Recompute::kBlock ? c.copy_fwd_ms : 0);
  return bt;
}

// Gradient all-reduce over dp replicas (ring: 2 (D-1)/D of the gradient bytes).
double allreduce_ms(int64_t grad_bytes, int dp, const DeviceProfile& dev) {
  if (dp <= 1) return 0;
  return 2.0 * (dp - 1) / dp * grad_bytes / (dev.link_gbps * 1e9) * 1e3 +
         2.0 * (dp - 1) * dev.link_latency_us * 1e-3;
}

DeviceProfile with_dtype(const DeviceProfile& dev, DType dtype, int element_bytes) {
  DeviceProfile d = dev;
  d.dtype = dtype;
  d.element_bytes = element_bytes;
  return d;
}

// What make_plan's settings share (one request: the same config, shape, stack, device and
// dtypes): the memory terms per (dap, chunk, target) and the block's module costs per (chunk,
// target), which every DAP degree and every estimate of a setting reuse.
struct SearchCache {
  std::map<std::tuple<int, int64_t, int64_t>, Terms> terms;
  std::map<std::pair<int64_t, int64_t>, std::vector<ModuleCost>> costs;
  std::map<std::tuple<int, int64_t, int64_t>, int64_t> inference_peak;  // fp32 bytes, no weights
};

const Terms& cached_terms(SearchCache& c, const EvoformerConfig& cfg, int64_t s, int64_t r,
                          int threads, int64_t e, DType store, const Setting& st, bool extra_msa) {
  const auto key = std::make_tuple(st.dap, st.chunk, st.target);
  auto it = c.terms.find(key);
  if (it == c.terms.end())
    it = c.terms
             .emplace(key, training_terms(cfg, s, r, threads, e, store, st.dap, st.chunk, st.target,
                                          extra_msa))
             .first;
  return it->second;
}

const std::vector<ModuleCost>& cached_costs(SearchCache& c, const EvoformerConfig& cfg, int64_t s,
                                            int64_t r, bool training, const Setting& st,
                                            const DeviceProfile& dev, bool extra_msa) {
  const auto key = std::make_pair(st.chunk, st.target);
  auto it = c.costs.find(key);
  if (it == c.costs.end())
    it = c.costs
             .emplace(key,
                      block_module_costs(cfg, s, r, st.chunk, st.target, training, dev, extra_msa))
             .first;
  return it->second;
}

// Fills the estimates of `p` (choices set, validated) on `dev`. With a cache (make_plan's search)
// the terms are shared between settings and a one-process training peak comes from the position
// decomposition, which make_plan checks against the replay for the plan it returns.
void estimate(const DeviceProfile& dev0, Plan* p, SearchCache* cache = nullptr) {
  const DeviceProfile dev = with_dtype(dev0, p->dtype, p->element_bytes);
  const int64_t e = plan_buffer_bytes(p->element_bytes), B = p->cfg.no_blocks;
  const DType store = plan_store_dtype(p->dtype, p->element_bytes);
  const Setting st{p->dap, p->dp, p->chunk, p->chunk_target_bytes};
  const BlockTimes bt = block_times(
      p->cfg, p->s, p->r, p->training, st, dev, p->extra_msa,
      cache ? &cached_costs(*cache, p->cfg, p->s, p->r, p->training, st, dev, p->extra_msa)
            : nullptr);
  // Inference needs only the gradient struct's size (G) of the terms: the weights' bytes.
  Terms t;
  if (!p->training)
    t.G = block_grad_bytes(p->cfg, p->threads, e, store, p->chunk, p->chunk_target_bytes,
                           p->extra_msa);
  else if (cache)
    t = cached_terms(*cache, p->cfg, p->s, p->r, p->threads, e, store, st, p->extra_msa);
  else
    t = training_terms(p->cfg, p->s, p->r, p->threads, e, store, p->dap, p->chunk,
                       p->chunk_target_bytes, p->extra_msa);
  const int64_t base = base_bytes(p->cfg, p->s, p->r, p->training, t.G, e, p->dap, p->extra_msa);
  p->module_costs = bt.costs;
  p->module_chunks = module_chunks(p->cfg, p->s, p->r, p->training, p->chunk, p->chunk_target_bytes,
                                   p->threads, p->extra_msa);
  p->profile = dev.name;
  if (!p->training) {
    p->forward_ms = B * bt.fwd;
    p->backward_ms = p->recompute_ms = 0;
    p->comm_ms = B * bt.comm_fwd;
    p->activation_bytes = 0;
    // The forward's peak above the weights (and inputs, one process), fp32 bytes: the same for
    // every dp degree of a setting.
    auto peak = [&] {
      return p->dap > 1     ? dap_inference_peak(p->cfg, p->s, p->r, p->dap, p->chunk,
                                                 p->chunk_target_bytes, p->threads, p->extra_msa, store)
             : p->extra_msa ? extra_msa_forward_peak_bytes(p->cfg, p->s, p->r, true, p->chunk,
                                                           p->chunk_target_bytes, p->threads, store)
                            : forward_peak_bytes(p->cfg, p->s, p->r, true, p->chunk,
                                                 p->chunk_target_bytes, p->threads, store);
    };
    int64_t fwd = 0;
    if (cache) {
      const auto key = std::make_tuple(p->dap, p->chunk, p->chunk_target_bytes);
      auto it = cache->inference_peak.find(key);
      if (it == cache->inference_peak.end()) it = cache->inference_peak.emplace(key, peak()).first;
      fwd = it->second;
    } else {
      fwd = peak();
    }
    p->peak_bytes =
        (p->dap > 1 ? weights_bytes(p->cfg, t.G, e, p->extra_msa) : base) + fwd / kF * e;
  } else {
    p->forward_ms = B * bt.fwd;
    p->backward_ms = B * bt.bwd;
    p->recompute_ms = 0;
    p->comm_ms = B * bt.comm_fwd;
    p->activation_bytes = 0;
    for (Recompute rc : p->policy) {
      const int ty = static_cast<int>(rc);
      p->recompute_ms += bt.rec[ty];
      p->comm_ms += bt.comm_bwd[ty];
      p->activation_bytes += t.k[ty];
    }
    // Parameter gradients: all-reduced over the DAP ranks of a group (each holds a partial sum),
    // then over the dp groups.
    p->comm_ms += allreduce_ms(B * t.G, p->dap, dev) + allreduce_ms(B * t.G, p->dp, dev);
    if (p->dap == 1 && !cache) {
      p->peak_bytes =
          base + stack_step_peak_bytes(p->cfg, p->s, p->r, B, p->policy, p->threads, e, p->chunk,
                                       p->chunk_target_bytes, p->extra_msa, store);
    } else {  // the decomposition (DAP: with per-rank shards)
      int64_t K = 0, peak = 0;
      for (int64_t b = 0; b < B; ++b) {
        const int ty = static_cast<int>(p->policy[b]);
        peak = std::max(
            peak, K + t.C + (B - b) * t.G + (b + 1 < B ? t.m + t.wm[ty] : t.w[ty]) + t.gather);
        K += t.k[ty];
      }
      p->peak_bytes =
          p->dap == 1
              ? base + std::max(peak, K + t.C + t.gather)
              : dap_train_peak(base + std::max({peak, K + t.C + t.gather,
                                                B * t.G + dap_train_end_bytes(p->cfg, p->s, p->r,
                                                                              p->dap, e)}));
    }
  }
  p->time_ms = p->forward_ms + p->backward_ms + p->recompute_ms + p->comm_ms;
  p->time_per_protein_ms = p->time_ms / p->dp;
  p->fits = p->memory_limit_bytes <= 0 || p->peak_bytes <= p->memory_limit_bytes;
  add_partition_estimates(dev, p);  // per-layer partitions: their difference to pure DAP
}

}  // namespace

std::vector<std::pair<std::string, int64_t>> training_module_whole_bytes(const EvoformerConfig& cfg,
                                                                         int64_t s, int64_t r,
                                                                         bool extra_msa) {
  // The units' chunk buffers per item (src/layers/*) times the whole axis: attention (and the
  // bias branch's row blocks), transitions, OPM residue blocks, tri-mul channel groups with their
  // projection blocks and the output side's rows.
  const BlockContext ctx = shape_context(cfg, s, r, 0, 0, 1);
  const int64_t hm = cfg.no_heads_msa * cfg.c_hidden_msa_att;
  const int64_t hp = cfg.no_heads_pair * cfg.c_hidden_pair_att;
  std::vector<std::pair<std::string, int64_t>> out;
  for (const LayerDesc& l : extra_msa ? kExtraMsaBlock : kEvoformerBlock) {
    int64_t bytes = 0;
    switch (l.kind) {
      case LayerKind::kMsaRowAttention:
        bytes = std::max(s * attention_train_item_bytes(r, cfg.c_m, hm),
                         r * bias_train_row_bytes(ctx, cfg.no_heads_msa));
        break;
      case LayerKind::kMsaColumnAttention:
        bytes = r * attention_train_item_bytes(s, cfg.c_m, hm);
        break;
      case LayerKind::kMsaColumnGlobalAttention:
        bytes = r * global_attention_train_item_bytes(ctx);
        break;
      case LayerKind::kTransition:
      case LayerKind::kMaskedTransition: {
        const int64_t c = stream_channels(ctx, l.updates);
        bytes = stream_rows(ctx, l.updates) * transition_train_row_bytes(c, cfg.transition_n * c);
        break;
      }
      case LayerKind::kOuterProductMean:
        bytes = r * opm_outer_backward_item_bytes(ctx);
        break;
      case LayerKind::kTriangleMultiplication:
        bytes = tri_mul_train_whole_bytes(ctx);
        break;
      case LayerKind::kTriangleAttention:
        bytes = std::max(r * attention_train_item_bytes(r, cfg.c_z, hp),
                         r * bias_train_row_bytes(ctx, cfg.no_heads_pair));
        break;
      default:
        FC_CHECK_MSG(false, std::string("layer ") + l.name + " has no training path");
    }
    out.emplace_back(l.name, bytes);
  }
  return out;
}

std::vector<int64_t> training_chunk_targets(const EvoformerConfig& cfg, int64_t s, int64_t r,
                                            bool extra_msa) {
  // At the largest whole-axis buffer every module runs in one chunk.
  int64_t whole = 0;
  for (const auto& [name, bytes] : training_module_whole_bytes(cfg, s, r, extra_msa))
    whole = std::max(whole, bytes);
  std::vector<int64_t> out;
  int64_t t = std::max<int64_t>(default_chunk_target_bytes(cfg, s, r) / 16, 64 << 10);
  for (; t < whole; t *= 4) out.push_back(t);
  out.push_back(whole);
  return out;
}

Status evaluate_plan(const DeviceProfile& dev, Plan* plan) {
  FC_RETURN_IF_ERROR(dev.validate());
  FC_RETURN_IF_ERROR(plan->validate());
  if (plan->dap * plan->dp > dev.devices)
    return Status::InvalidArgument("plan: dap x dp = " + std::to_string(plan->dap * plan->dp) +
                                   " exceeds the profile's " + std::to_string(dev.devices) +
                                   " device(s)");
  estimate(dev, plan);
  return Status::OK();
}

Status make_plan(const PlanRequest& req, Plan* out) {
  const auto t0 = std::chrono::steady_clock::now();
  FC_RETURN_IF_ERROR(req.cfg.validate());
  FC_RETURN_IF_ERROR(req.profile.validate());
  if (req.s < 1 || req.r < 1) return Status::InvalidArgument("s and r must be >= 1");
  const int devices = req.devices > 0 ? req.devices : req.profile.devices;
  if (req.devices < 0 || req.dap < 0 || req.dp < 0 || req.chunk < 0 || req.chunk_target < 0 ||
      req.memory_bytes < 0)
    return Status::InvalidArgument("devices, dap, dp, chunk and memory must not be negative");
  if (req.dap * std::max(req.dp, 1) > devices || req.dp * std::max(req.dap, 1) > devices)
    return Status::InvalidArgument("dap x dp exceeds the " + std::to_string(devices) +
                                   " device(s)");
  const DType dtype = req.dtype.value_or(req.profile.dtype);
  FC_RETURN_IF_ERROR(check_plan_dtype(dtype));
  const int element_bytes = req.element_bytes.value_or(req.profile.element_bytes);
  FC_RETURN_IF_ERROR(check_element_bytes(element_bytes));
  const int64_t limit = req.memory_bytes > 0 ? req.memory_bytes : req.profile.memory_bytes;
  if (limit <= 0)
    return Status::InvalidArgument(
        "no memory limit: give one (--memory) or a profile with "
        "memory_bytes");
  if (req.fixed_policy && !req.training)
    return Status::InvalidArgument("a recompute policy applies to training plans only (--train)");
  int64_t r = req.r;
  if (req.bucket)
    FC_RETURN_IF_ERROR(
        bucket_residues(req.r, req.buckets.empty() ? default_buckets() : req.buckets, &r));
  if (devices > 1 && req.profile.link_gbps <= 0)
    return Status::InvalidArgument("more than one device needs link_gbps in the profile");
  DeviceProfile dev = with_dtype(req.profile, dtype, element_bytes);
  dev.devices = devices;
  const int64_t e = plan_buffer_bytes(element_bytes), B = req.cfg.no_blocks;
  const DType store = plan_store_dtype(dtype, element_bytes);

  // Candidate settings: DAP/DP degrees (dap x dp <= devices) and chunk targets, coarsest first:
  // for inference from the default down by halves, for training the geometric set of
  // training_chunk_targets from whole down (smaller chunks cost GEMM efficiency, save workspace).
  std::vector<Setting> settings;
  const int64_t dflt = default_chunk_target_bytes(req.cfg, req.s, r);
  std::vector<std::pair<int64_t, int64_t>> chunks;  // (chunk, target)
  if (req.chunk > 0) {
    chunks.push_back({req.chunk, 0});
  } else if (req.chunk_target > 0) {
    chunks.push_back({0, req.chunk_target});
  } else if (req.training) {
    // A calibrated profile's memory-bound rates end at its largest measured working set; larger
    // targets (whole-axis chunks of hundreds of MiB) are left out: this machine ran them 10-30 %
    // slower than the model says (strided passes over buffers far beyond the caches and the TLB's
    // reach), and never faster than the coarsest target inside the range (docs/planner.md).
    const std::vector<int64_t> tg = training_chunk_targets(req.cfg, req.s, r, req.extra_msa);
    const double cap = req.profile.mem_by_size.empty() ? 0 : req.profile.mem_by_size.back()[0];
    for (auto it = tg.rbegin(); it != tg.rend(); ++it)
      if (cap <= 0 || *it <= cap || it + 1 == tg.rend()) chunks.push_back({0, *it});
  } else {
    for (int64_t tgt = dflt; tgt >= 16 << 10; tgt /= 2) chunks.push_back({0, tgt});
    chunks.push_back({1, 0});  // the finest: one item per chunk
  }
  for (int dap = 1; dap <= devices; ++dap) {
    if (req.dap > 0 && dap != req.dap) continue;
    for (int dp = 1; dap * dp <= devices; ++dp) {
      if (req.dp > 0 && dp != req.dp) continue;
      for (const auto& [c, tgt] : chunks) settings.push_back({dap, dp, c, tgt});
    }
  }

  Plan best;
  bool found = false;
  int64_t smallest = std::numeric_limits<int64_t>::max();
  SearchCache cache;
  auto consider = [&](Plan p, bool estimated) {
    if (!estimated) estimate(dev, &p, &cache);
    smallest = std::min(smallest, p.peak_bytes);
    if (p.peak_bytes > limit && !req.fixed_policy) return;
    const bool fits = p.peak_bytes <= limit;
    const bool best_fits = found && best.peak_bytes <= limit;
    // Settings come coarsest chunking first: on equal estimated time (to rounding) the earlier,
    // coarser one stays, so a model that sees no cost in chunking never chunks for nothing.
    if (!found || (fits && !best_fits) ||
        (fits == best_fits && p.time_per_protein_ms < best.time_per_protein_ms * (1 - 1e-12))) {
      best = std::move(p);
      found = true;
    }
  };
  for (const Setting& st : settings) {
    Plan p;
    p.cfg = req.cfg;
    p.s = req.s;
    p.r = r;
    p.r_real = req.r;
    p.training = req.training;
    p.extra_msa = req.extra_msa;
    p.chunk = st.chunk;
    p.chunk_target_bytes = st.target;
    p.dap = st.dap;
    p.dp = st.dp;
    p.dtype = dtype;
    p.element_bytes = element_bytes;
    p.threads = dev.threads;
    p.memory_limit_bytes = limit;
    if (!req.training) {
      consider(std::move(p), false);
      continue;
    }
    if (req.fixed_policy) {
      p.policy.assign(B, req.policy);
      consider(std::move(p), false);
      continue;
    }
    // Time depends only on the counts of each policy, memory on their order: the DP gives the
    // smallest peak of every count vector; the fastest count vector that fits wins.
    const Terms& t =
        cached_terms(cache, req.cfg, req.s, r, dev.threads, e, store, st, req.extra_msa);
    const int64_t base = base_bytes(req.cfg, req.s, r, true, t.G, e, st.dap, req.extra_msa);
    const BlockTimes bt =
        block_times(req.cfg, req.s, r, true, st, dev, req.extra_msa,
                    &cached_costs(cache, req.cfg, req.s, r, true, st, dev, req.extra_msa));
    const PolicyDp dp = policy_dp(t, static_cast<int>(B));
    const int64_t end =
        st.dap > 1 ? B * t.G + dap_train_end_bytes(req.cfg, req.s, r, st.dap, e) : 0;
    int ba = -1, bc = -1;
    double bt_best = 0;
    int64_t bpeak = 0;
    for (int a = 0; a <= B; ++a)
      for (int c = 0; a + c <= B; ++c) {
        const int64_t pk = st.dap > 1 ? dap_train_peak(base + std::max(dp.peak[dp.idx(a, c)], end))
                                      : base + dp.peak[dp.idx(a, c)];
        smallest = std::min(smallest, pk);
        if (pk > limit) continue;
        const double time = a * bt.comm_bwd[0] + c * (bt.rec[1] + bt.comm_bwd[1]) +
                            (B - a - c) * (bt.rec[2] + bt.comm_bwd[2]);  // varying parts
        if (ba < 0 || time < bt_best || (time == bt_best && pk < bpeak))
          ba = a, bc = c, bt_best = time, bpeak = pk;
      }
    if (ba < 0) continue;
    p.policy = dp.order(ba, bc);
    estimate(dev, &p, &cache);
    if (st.dap == 1 && p.peak_bytes != bpeak)
      return Status::Internal("planner: the DP's peak (" + std::to_string(bpeak) +
                              " B) disagrees with the position decomposition (" +
                              std::to_string(p.peak_bytes) + " B)");
    consider(std::move(p), true);
  }
  if (!found)
    return Status::OutOfMemory(
        "no plan fits in " + mib(limit) + " per device for s=" + std::to_string(req.s) +
        " r=" + std::to_string(r) + " blocks=" + std::to_string(B) + " (" +
        (req.training ? "training" : "inference") + ", " + plan_dtype_name(dtype) + ", " +
        std::to_string(devices) + " device(s)); the smallest feasible budget is " + mib(smallest));
  if (best.training && best.dap == 1) {  // the decomposition against the exact replay
    Plan check = best;
    estimate(dev, &check);
    if (check.peak_bytes != best.peak_bytes)
      return Status::Internal("planner: the position decomposition of the memory model (" +
                              std::to_string(best.peak_bytes) +
                              " B) disagrees with stack_step_peak_bytes (" +
                              std::to_string(check.peak_bytes) + " B)");
  }
  if (req.split_auto) choose_partition(dev, &best);
  best.search_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  *out = std::move(best);
  return Status::OK();
}

}  // namespace fc
