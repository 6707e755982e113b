// Memory model of alphafold_dap_forward (src/exec/af2_dap.cc) on one rank: a replay of the
// tracked allocations that rank makes, in the order the sharded forward makes them. Any change to
// the allocations of a stage in af2_dap.cc must change its replay here; tests/dap_af2_test.cc
// compares every stage of every rank against the allocator byte for byte.
#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "exec/af2_dap.h"
#include "layers/layer_norm_linear.h"
#include "layers/outer_product_mean.h"
#include "layers/triangle_multiplication.h"
#include "model/af2/block_sizes.h"
#include "model/block_table.h"
#include "model/modules.h"
#include "plan/af2_memory_internal.h"

namespace fc {
namespace {

constexpr int64_t kF = 4, kI = 8;  // bytes of F32 and I64
constexpr int64_t kAtom37 = 37;
constexpr int64_t kTemplPairFeat = 88, kTemplAngleFeat = 57, kExtraFeat = 25, kMsaHeadOut = 23;

int64_t valid_rows(int64_t total, int64_t loc, int rank) {
  return std::clamp<int64_t>(total - rank * loc, 0, loc);
}

// The contexts make_dap_shards gives layout l (chunk target: the given one, else 1/8 of the
// rank's shards of m and z with a 1 MiB floor).
struct ShardContexts {
  BlockContext row, col, full;
};
ShardContexts shard_contexts(const EvoformerConfig& cfg, const DapLayout& l, int64_t chunk,
                             int64_t target, int threads, DType dtype) {
  const int64_t sl = l.s_loc, rl = l.r_loc, sp = l.s_pad, rp = l.r_pad;
  const int64_t mz_loc = (sl * rp * cfg.c_m + rl * rp * cfg.c_z) * kF;
  BlockContext base;
  base.cfg = &cfg;
  base.chunk = chunk;
  base.chunk_target_bytes = target > 0 ? target : std::max<int64_t>(mz_loc / 8, 1 << 20);
  base.threads = std::max(threads, 1);
  base.dtype = dtype;
  ShardContexts c{base, base, base};
  c.row.s = sl;
  c.row.r = rp;
  c.col.s = sp;
  c.col.r = rl;
  c.full.s = sp;
  c.full.r = rp;
  return c;
}

// Bytes make_dap_shards allocates beside the masks it is given: msa bias and its transpose
// [s_pad, r_pad], this rank's mask columns [s_pad, r_loc], the pair mask's transpose, bias and
// transposed bias [r_pad, r_pad].
int64_t shard_mask_bytes(const DapLayout& l) {
  return (2 * l.s_pad * l.r_pad + l.s_pad * l.r_loc + 3 * l.r_pad * l.r_pad) * kF;
}

}  // namespace

int64_t dap_blocks_work_bytes(const BlockTable& t, const EvoformerConfig& cfg, const DapLayout& l,
                              int64_t chunk, int64_t target, int threads, DType dtype) {
  const ShardContexts sc = shard_contexts(cfg, l, chunk, target, threads, dtype);
  const int64_t sl = l.s_loc, rl = l.r_loc, rp = l.r_pad;
  const int n = l.n;
  // Attention over `items` rows of length L with c channels (the column-attention formula).
  auto attention = [&](int64_t H, int64_t C, int64_t items, int64_t L, int64_t c) {
    EvoformerConfig a = cfg;
    a.no_heads_msa = H, a.c_hidden_msa_att = C, a.c_m = c;
    BlockContext ctx = sc.full;
    ctx.cfg = &a;
    ctx.r = items;
    ctx.s = L;
    return module_workspace_bytes("msa_att_col", ctx);
  };
  // gathered_pair_bias: all [r_p^2, H] + this rank's rows [r_l r_p, H] + the projection's
  // workspace, then all + bias [H, r_p, r_p]; then the bias beside the attention.
  auto biased = [&](int64_t H, int64_t C, int64_t items, int64_t c) {
    const int64_t ln = pair_bias_project_bytes(sc.full, rl, H);
    return std::max({(rp * rp + rl * rp) * H * kF + ln, 2 * H * rp * rp * kF,
                     H * rp * rp * kF + attention(H, C, items, rp, c)});
  };
  EvoformerConfig pz = cfg;  // the pair transition on [r_l r_p, c_z] as the MSA one
  pz.c_m = cfg.c_z;
  BlockContext pt = sc.full;
  pt.cfg = &pz;
  pt.s = rl;
  pt.r = rp;
  int64_t work = 0;
  Shard m_how = dap_boundary_m(t), z_how = Shard::kPairRows;
  const int last_m = dap_last_use(t, Stream::kM), last_z = dap_last_use(t, Stream::kZ);
  for (int i = 0; i < t.count; ++i) {
    const LayerDesc& ly = t.layers[i];
    const DapLayerLayout want = dap_layer_layout(ly);
    // A layout change holds one more shard of the stream it moves (dap.cc, pair_transpose and
    // the MSA all-to-alls).
    if (want.m && *want.m != m_how) work = std::max(work, sl * rp * cfg.c_m * kF), m_how = *want.m;
    if (want.z && *want.z != z_how) work = std::max(work, rl * rp * cfg.c_z * kF), z_how = *want.z;
    const BlockContext& mctx = m_how == Shard::kMsaByRes ? sc.col : sc.row;
    int64_t w = 0;
    switch (ly.kind) {
      case LayerKind::kMsaRowAttention:
        w = biased(cfg.no_heads_msa, cfg.c_hidden_msa_att, sl, cfg.c_m);
        break;
      case LayerKind::kMsaColumnAttention:
        w = module_workspace_bytes("msa_att_col", sc.col);
        break;
      case LayerKind::kMsaColumnGlobalAttention:
      case LayerKind::kMaskedTransition:
        w = layer_workspace_bytes(ly, mctx);
        break;
      case LayerKind::kTransition:
        w = ly.updates == Stream::kZ ? module_workspace_bytes("msa_transition", pt)
                                     : module_workspace_bytes("msa_transition", mctx);
        break;
      case LayerKind::kOuterProductMean:
        w = outer_product_mean_shard_bytes(sc.full, rl, n);
        break;
      case LayerKind::kTriangleMultiplication:
        w = triangle_multiplication_shard_bytes(sc.full, rl, n);
        break;
      case LayerKind::kTriangleAttention:
        w = biased(cfg.no_heads_pair, cfg.c_hidden_pair_att, rl, cfg.c_z);
        break;
      default:
        FC_CHECK_MSG(false, std::string("layer ") + ly.name + " has no AF2 DAP memory model");
    }
    work = std::max(work, w);
    if (i == last_m && m_how != dap_boundary_m(t))
      work = std::max(work, sl * rp * cfg.c_m * kF), m_how = dap_boundary_m(t);
    if (i == last_z && z_how != Shard::kPairRows)
      work = std::max(work, rl * rp * cfg.c_z * kF), z_how = Shard::kPairRows;
  }
  return work;
}

Status alphafold_dap_forward_memory(const AlphaFoldConfig& cfg, const AlphaFoldDims& d,
                                    const AlphaFoldOptions& opts, int threads, int n, int rank,
                                    AlphaFoldMemory* out, bool sharded_weights) {
  FC_RETURN_IF_ERROR(cfg.evoformer.validate());
  if (opts.dtype != DType::F32 && opts.dtype != DType::BF16)
    return Status::InvalidArgument("alphafold DAP memory: dtype must be F32 or BF16");
  if (d.r < 1 || d.S < 1 || d.E < 1 || d.T < 0 || d.passes < 1 || opts.chunk < 0 ||
      opts.chunk_target_bytes < 0 || opts.pair_block_bytes < 0 || threads < 1 || n < 1 ||
      rank < 0 || rank >= n || d.r_features < 0 || d.r_features > d.r)
    return Status::InvalidArgument(
        "alphafold DAP memory: r, S, E, passes, threads and ranks must be >= 1, 0 <= rank < "
        "ranks, T, chunk and the chunk target >= 0, 0 <= r_features <= r");
  // A trace hook gathers sharded values to the root and computes some stages whole on each
  // rank's rows: not modelled.
  if (opts.trace)
    return Status::InvalidArgument(
        "alphafold DAP memory: a traced run (AlphaFoldOptions::trace) is not modelled; plan the "
        "untraced run");
  if (d.r_features > 0 && d.r_features < d.r) {
    // pad_to: every rank pads its features (held beside the forward, counted in its peak), then
    // runs the unpadded forward at the bucket, whose stages count from there. The cropped outputs
    // are made after the forward's peak is taken.
    AlphaFoldDims bucket = d;
    bucket.r_features = 0;
    FC_RETURN_IF_ERROR(
        alphafold_dap_forward_memory(cfg, bucket, opts, threads, n, rank, out, sharded_weights));
    out->peak_bytes += af2_padded_feature_bytes(cfg, d);
    return Status::OK();
  }
  const int me = rank;
  const int64_t chunk = opts.chunk, target = opts.chunk_target_bytes;
  const int64_t pbb = opts.pair_block_bytes;
  const EvoformerConfig& ev = cfg.evoformer;
  const int64_t r = d.r, S = d.S, E = d.E, cm = ev.c_m, cz = ev.c_z, cs = ev.c_s;
  const int64_t T = cfg.templates ? d.T : 0;
  const DapLayout le = dap_layout(S + T, r, n, me), lx = dap_layout(E, r, n, me);
  const int64_t rl = le.r_loc, rp = le.r_pad, sl = le.s_loc, el = lx.s_loc;
  const int64_t nrow = valid_rows(r, rl, me);
  const int64_t rows = af2::pair_block_rows(r, cz, pbb);
  const int64_t zsh = rl * rp * cz * kF;            // a z shard
  const int64_t msh = sl * rp * cm * kF;            // an m shard
  const int64_t mprev = me == 0 ? r * cm * kF : 0;  // m[0] of the previous pass, on the root
  const int64_t xprev = r * kAtom37 * 3 * kF;
  const int64_t pf = af2_pass_feature_bytes(cfg, d);
  const int64_t masks = (rp * rp + le.s_pad * rp + lx.s_pad * rp) * kF;  // padded_masks
  // Sharded weights: each stack's stage holds a buffer of one of its blocks.
  auto block_buffer = [&](const BlockTable& t, const EvoformerConfig& c) {
    return sharded_weights && n > 1 ? dap_block_buffer_bytes(t, c) : 0;
  };
  AlphaFoldMemory mem;
  Af2Replay m;
  auto stage = [&](int pass, const char* name) {
    mem.stages.push_back({pass, name, 0.0, m.entry, m.stage_peak});
  };
  for (int k = 0; k < d.passes; ++k) {
    m.alloc(pf);
    if (k == 0) m.alloc(mprev + zsh + xprev);  // m_prev, z_prev, x_prev
    m.alloc(masks);
    m.alloc(zsh);  // z (m is made in the Evoformer stage)
    // input embedder: a_i, a_j, the relative-position table
    m.begin();
    m.transient((2 * r * cz + (2 * cfg.relpos_k + 1) * cz) * kF);
    stage(k, "input_embedder");
    // recycling embedder: pseudo-beta, then a block of recycled rows; z_prev freed
    m.begin();
    m.alloc(r * 3 * kF);
    m.transient(std::min(rows, std::max<int64_t>(nrow, 1)) * rp * cz * kF);
    m.free(zsh + r * 3 * kF);
    stage(k, "recycling_embedder");
    if (T > 0) {
      const EvoformerConfig& tc = cfg.template_pair;
      const int64_t ct = tc.c_z, H = cfg.template_att_heads, hc = H * cfg.template_att_hidden;
      const DapLayout lt = dap_layout(n, r, n, me);
      const int64_t npos = rl * rp;
      const int64_t blk = std::min(af2::template_block_positions(r * r, hc, pbb), npos);
      m.begin();
      const int64_t sh = lt.s_pad * rp * kF + shard_mask_bytes(lt);  // dummy MSA mask + shards'
      const int64_t acc = (npos * hc + 2 * npos * H) * kF +          // o, den, mx
                          block_buffer(kTemplatePairBlock, tc);
      m.alloc(sh + acc);
      const int64_t act = npos * ct * kF;
      const int64_t ws =
          dap_blocks_work_bytes(kTemplatePairBlock, tc, lt, chunk, target, threads, opts.dtype);
      m.transient(act + std::max({npos * kTemplPairFeat * kF, ws, blk * 3 * hc * kF}));
      m.transient(blk * cz * kF);  // a block of the output projection
      m.alloc(T * r * cm * kF);    // the template single rows, kept for the Evoformer stage
      m.transient(T * r * (kTemplAngleFeat + cm) * kF);  // their angle features and hidden layer
      m.free(sh + acc);
      stage(k, "template_embedder");
    }
    {
      // extra-MSA stack: this rank's embedded rows (features one row at a time), the shards'
      // masks and the blocks' work
      const EvoformerConfig& xc = cfg.extra_msa;
      const int64_t a = el * rp * xc.c_m * kF;
      m.begin();
      m.alloc(a);
      if (valid_rows(E, el, me) > 0) m.transient(r * kExtraFeat * kF);
      m.transient(
          shard_mask_bytes(lx) + block_buffer(kExtraMsaBlock, xc) +
          dap_blocks_work_bytes(kExtraMsaBlock, xc, lx, chunk, target, threads, opts.dtype));
      m.free(a);
      stage(k, "extra_msa_stack");
    }
    m.alloc(r * cs * kF);  // s
    // Evoformer: m made (the target_feat projection beside it; LN(m_prev) on the root), the
    // template single rows freed, then the shards' masks and the blocks' work
    m.begin();
    m.alloc(msh);
    m.transient(r * cm * kF);
    m.free(T * r * cm * kF);
    m.transient(shard_mask_bytes(le) + block_buffer(kEvoformerBlock, ev) +
                dap_blocks_work_bytes(kEvoformerBlock, ev, le, chunk, target, threads, opts.dtype));
    stage(k, "evoformer");
    // structure module (structure_module_rows with this rank's pair rows)
    const int64_t H = cfg.ipa_heads, outs = af2_sm_output_bytes(cfg, r);
    const int64_t mine = rl * rp * H * kF, bias = n * mine;
    m.begin();
    m.alloc(2 * r * cs * kF + mine + bias);  // s0, s, this rank's bias rows, the gathered bias
    m.transient(rows * rp * cz * kF);        // a block of LN_z(z) rows
    m.free(mine);
    m.alloc(outs + (r * cs + r * 6) * kF);
    // o_pair: its rows [r_l, H*c_z], a block of LN_z(z) rows, then every rank's rows gathered
    const int64_t hz = H * cz, zl = std::min(rows, std::max<int64_t>(nrow, 1)) * rp * cz;
    m.transient(af2_sm_layer_bytes(cfg, r, (rl * hz + zl + n * rl * hz) * kF));
    m.free((2 * r * cs + r * 6) * kF + bias);  // s0, ipa, upd and the bias; s is an output
    stage(k, "structure_module");
    m.alloc((r * kAtom37 * 3 + r * kAtom37) * kF);  // x37, mask37
    if (k + 1 == d.passes) {
      m.begin();
      const int64_t db = cfg.distogram_bins, tb = cfg.tm_bins;
      af2_plddt_head(cfg, r, &m);
      const int64_t dist = rl * rp * db * kF;
      m.alloc(dist);
      m.transient(2 * dist);  // its clone, then the all-to-all's buffers (pair_transpose)
      m.alloc(sl * rp * kMsaHeadOut * kF + r * kAtom37 * kF);  // masked MSA rows, exp. resolved
      if (cfg.ptm) m.alloc((2 * rl * rp * tb + rl * rp + 2) * kF);
      stage(k, "heads");
      m.alloc(kI);  // num_recycles
    } else {
      // next pass: the root's new m_prev (then the old one freed), x37 becomes x_prev, z
      // becomes z_prev, the rest of the pass is freed
      m.alloc(mprev);
      m.free(mprev + xprev);
      m.free(pf + masks + msh + r * cs * kF + outs + r * cs * kF + r * kAtom37 * kF);
    }
  }
  mem.peak_bytes = m.peak;
  *out = std::move(mem);
  return Status::OK();
}

Status plan_alphafold_dap(const AlphaFoldConfig& cfg, const AlphaFoldDims& d, int64_t base_bytes,
                          int64_t budget_bytes, int threads, int n, AlphaFoldPlan* out, DType dtype,
                          bool sharded_weights) {
  if (base_bytes < 0 || n < 1)
    return Status::InvalidArgument(
        "plan_alphafold_dap: base bytes must be >= 0, the budget and the ranks >= 1");
  return plan_alphafold_dap(cfg, d, std::vector<int64_t>(n, base_bytes), budget_bytes, threads, out,
                            dtype, sharded_weights);
}

Status plan_alphafold_dap(const AlphaFoldConfig& cfg, const AlphaFoldDims& d,
                          const std::vector<int64_t>& bases, int64_t budget_bytes, int threads,
                          AlphaFoldPlan* out, DType dtype, bool sharded_weights) {
  const int n = static_cast<int>(bases.size());
  if (n < 1 || budget_bytes < 1 || *std::min_element(bases.begin(), bases.end()) < 0)
    return Status::InvalidArgument(
        "plan_alphafold_dap: base bytes must be >= 0, the budget and the ranks >= 1");
  // One knob, as plan_alphafold: the stacks' chunk target, which also caps the pair blocks.
  auto options = [dtype](int64_t target) {
    AlphaFoldOptions o;
    o.dtype = dtype;
    o.chunk_target_bytes = target;
    o.pair_block_bytes = target > 0 && target < (int64_t{4} << 20) ? target : 0;
    return o;
  };
  std::string stage;  // the stage at the largest rank's peak
  int64_t held = 0;   // what that rank holds
  // The largest over the ranks of what a rank holds plus its forward's peak.
  auto peak = [&](int64_t target, int64_t* bytes) -> Status {
    *bytes = 0;
    for (int k = 0; k < n; ++k) {
      AlphaFoldMemory mem;
      FC_RETURN_IF_ERROR(alphafold_dap_forward_memory(cfg, d, options(target), threads, n, k, &mem,
                                                      sharded_weights));
      if (bases[k] + mem.peak_bytes <= *bytes) continue;
      *bytes = bases[k] + mem.peak_bytes;
      held = bases[k];
      for (const AlphaFoldStageStat& s : mem.stages)
        if (s.peak_bytes == mem.peak_bytes) stage = s.stage;
    }
    return Status::OK();
  };
  auto mib = [](int64_t b) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.1f MiB", static_cast<double>(b) / 1048576.0);
    return std::string(buf);
  };
  int64_t p = 0;
  FC_RETURN_IF_ERROR(peak(0, &p));
  if (p <= budget_bytes) {
    *out = {0, 0, p, stage};
    return Status::OK();
  }
  FC_RETURN_IF_ERROR(peak(1, &p));
  if (p > budget_bytes)
    return Status::OutOfMemory("memory budget " + mib(budget_bytes) +
                               " per rank is too small for AlphaFold2 at r=" + std::to_string(d.r) +
                               " on " + std::to_string(n) +
                               " DAP ranks: even the finest chunking peaks at " + mib(p) +
                               " in the " + stage + " (weights and features " + mib(held) +
                               "); the smallest feasible budget per rank is " + mib(p));
  int64_t lo = 1, hi = std::max({default_chunk_target_bytes(cfg.evoformer, d.S + d.T, d.r),
                                 default_chunk_target_bytes(cfg.extra_msa, d.E, d.r),
                                 default_chunk_target_bytes(cfg.template_pair, 1, d.r)});
  FC_RETURN_IF_ERROR(peak(hi, &p));
  if (p <= budget_bytes) lo = hi;
  while (hi - lo > 1) {  // lo fits; the peak never grows as the target shrinks
    const int64_t mid = lo + (hi - lo) / 2;
    FC_RETURN_IF_ERROR(peak(mid, &p));
    (p <= budget_bytes ? lo : hi) = mid;
  }
  FC_RETURN_IF_ERROR(peak(lo, &p));
  *out = {lo, options(lo).pair_block_bytes, p, stage};
  return Status::OK();
}

}  // namespace fc
