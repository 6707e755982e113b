// Cost model of the planner: time per module from FLOPs per kernel class and bytes moved (the
// rates of a DeviceProfile: profile.cc, measured by calibrate.cc), and the DAP communication
// volume. Formulas: docs/planner.md.

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

#include "exec/dap.h"
#include "foldcube/model.h"
#include "foldcube/planner.h"
#include "foldcube/tensor.h"
#include "layers/swiglu_transition.h"
#include "model/block_table.h"
#include "model/common.h"
#include "model/modules.h"
#include "model/train.h"
#include "plan/table_cost.h"

namespace fc {

namespace {
constexpr int64_t kF = sizeof(float);
constexpr double kRefKeys = 256;  // attention rates refer to this key length
}  // namespace

// ---- Time per module ---------------------------------------------------------------------------

namespace {

// Interpolates column col of a table of (x, rate, rate) rows, x ascending, in log x; clamped.
double interpolate(const std::vector<std::array<double, 3>>& t, double x, int col) {
  if (x <= t.front()[0]) return t.front()[col];
  if (x >= t.back()[0]) return t.back()[col];
  size_t i = 1;
  while (t[i][0] < x) ++i;
  const double u = std::log(x / t[i - 1][0]) / std::log(t[i][0] / t[i - 1][0]);
  return t[i - 1][col] + u * (t[i][col] - t[i - 1][col]);
}

// Projection rate at a row count: the calibrated gemm_by_rows table, or the fitted
// R_inf * M / (M + M_half).
double gemm_rate(const DeviceProfile& d, double rows) {
  if (!d.gemm_by_rows.empty()) return interpolate(d.gemm_by_rows, rows, 1);
  return d.gemm_gflops * rows / (rows + d.gemm_half_rows);
}

// The backward's dX and dW products have the forward's row count (dW reduces over it), so the
// same row-count efficiency applies.
double gemm_bwd_rate(const DeviceProfile& d, double rows) {
  if (!d.gemm_by_rows.empty()) return interpolate(d.gemm_by_rows, rows, 2);
  return d.gemm_bwd_gflops * rows / (rows + d.gemm_bwd_half_rows);
}

// Rate factor of a product whose narrow side has n columns.
double narrow_factor(const DeviceProfile& d, double n) { return n / (n + d.gemm_half_cols); }

// Rate of a narrow product with n outputs: the calibrated table, interpolated in log n (clamped
// at its ends), or the row-count rate times narrow_factor. col: 1 forward, 2 backward.
double narrow_rate(const DeviceProfile& d, double rows, double n, int col) {
  if (d.narrow_gemm.empty())
    return (col == 1 ? gemm_rate(d, rows) : gemm_bwd_rate(d, rows)) * narrow_factor(d, n);
  return interpolate(d.narrow_gemm, n, col);
}

// Memory-bound rate at working set ws (bytes): the calibrated table, interpolated in log ws and
// clamped at its ends, or mem_gbps / mem_bwd_gbps. col: 1 forward, 2 backward.
double mem_rate(const DeviceProfile& d, double ws, int col) {
  if (d.mem_by_size.empty() || ws <= 0)
    return col == 1 || d.mem_bwd_gbps <= 0 ? d.mem_gbps : d.mem_bwd_gbps;
  return interpolate(d.mem_by_size, ws, col);
}

double stream_rate(const DeviceProfile& d) {
  return d.stream_gbps > 0 ? d.stream_gbps : d.mem_gbps;
}

double att_scale(const DeviceProfile& d, double L) {
  return std::pow(std::clamp(L, 32.0, 4096.0) / kRefKeys, d.attention_len_exp);
}

// Seconds of the attentions' per-score work: the fused kernel's (at its score rate) and an
// unfused attention's passes over the scores (at the memory-bound rate of the module's working
// set). col: 1 forward, 2 backward.
double score_seconds(const LayerWork& w, const DeviceProfile& d, int64_t e, int col) {
  if (w.att_scores <= 0) return 0;
  const double gps = col == 1 ? d.attention_score_gps : d.attention_bwd_score_gps;
  const double passes = col == 1 ? d.attention_score_passes : d.attention_bwd_score_passes;
  const double bias_passes =
      col == 1 ? d.attention_bias_score_passes : d.attention_bias_bwd_score_passes;
  double s = gps > 0 ? w.att_scores / (gps * 1e9) : 0;
  const double moved = passes * w.att_scores + bias_passes * w.att_bias_scores;
  if (moved > 0) s += moved * e / (mem_rate(d, w.ws, col) * 1e9);
  return s;
}

// Forward time, ms. Bytes scale with the element size; FLOP rates are the profile's.
double forward_ms(const LayerWork& w, const DeviceProfile& d, int64_t e) {
  double s = score_seconds(w, d, e, 1);
  for (const auto& [f, rows] : w.gemm) s += f / (gemm_rate(d, rows) * 1e9);
  for (const auto& [f, rows, n] : w.gemm_narrow) s += f / (narrow_rate(d, rows, n, 1) * 1e9);
  s += w.batched / (d.batched_gflops * 1e9);
  for (const auto& [f, L] : w.att) s += f / (d.attention_gflops * att_scale(d, L) * 1e9);
  s += w.mem * e / (mem_rate(d, w.ws, 1) * 1e9);
  // The calibrated narrow_gemm table was measured on DRAM-sized inputs: its rates contain the
  // sweeps; without it (user profiles) they are charged here.
  if (d.narrow_gemm.empty()) s += w.stream * e / (stream_rate(d) * 1e9);
  return s * 1e3;
}

// Backward: dX and dW of every product (twice the FLOPs) at the calibrated linear-backward rate,
// the attention backward kernel (2.5x the forward products: QK^T again, dV, dP, dQ, dK), twice
// the memory traffic at the LayerNorm-backward bandwidth, and the forward work it re-runs.
double backward_ms(const LayerWork& w, const DeviceProfile& d, int64_t e) {
  double s = score_seconds(w, d, e, 2);
  for (const auto& [f, rows] : w.gemm) s += 2 * f / (gemm_bwd_rate(d, rows) * 1e9);
  for (const auto& [f, rows, n] : w.gemm_narrow) s += 2 * f / (narrow_rate(d, rows, n, 2) * 1e9);
  for (const auto& [f, rows, n] : w.re_gemm_narrow) s += f / (narrow_rate(d, rows, n, 1) * 1e9);
  s += 2 * w.batched / (d.batched_gflops * 1e9);
  for (const auto& [f, L] : w.att) s += 2.5 * f / (d.attention_bwd_gflops * att_scale(d, L) * 1e9);
  s += 2 * w.mem * e / (mem_rate(d, w.ws, 2) * 1e9);
  for (const auto& [f, rows] : w.re_gemm) s += f / (gemm_rate(d, rows) * 1e9);
  s += w.re_batched / (d.batched_gflops * 1e9);
  s += w.re_mem * e / (mem_rate(d, w.ws, 1) * 1e9);
  if (d.narrow_gemm.empty()) s += w.bwd_stream * e / (stream_rate(d) * 1e9);
  return s * 1e3;
}

// The work of one layer of the block table; rb as in attention_work.
LayerWork layer_work(const LayerDesc& l, const EvoformerConfig& cfg, int64_t s, int64_t r,
                     const WorkChunks& ch, LayerWork* rb) {
  const int64_t Hm = cfg.no_heads_msa, Cm = cfg.c_hidden_msa_att;
  const int64_t Hp = cfg.no_heads_pair, Cp = cfg.c_hidden_pair_att;
  switch (l.kind) {
    case LayerKind::kMsaRowAttention:
      return attention_work(s, r, cfg.c_m, Hm, Cm, true, r, cfg.c_z, ch, rb, !l.bias_logits);
    case LayerKind::kMsaColumnAttention:
      return attention_work(r, s, cfg.c_m, Hm, Cm, false, r, cfg.c_z, ch, rb);
    case LayerKind::kTransition:
      return l.updates == Stream::kM ? transition_work(s * r, cfg.c_m, cfg.transition_n, ch, rb)
                                     : transition_work(r * r, cfg.c_z, cfg.transition_n, ch, rb);
    case LayerKind::kOuterProductMean:
      return opm_work(cfg, s, r, ch, rb);
    case LayerKind::kTriangleMultiplication:
      return ch.training ? trimul_train_work(cfg, r, *ch.ctx, rb) : trimul_work(cfg, r, ch);
    case LayerKind::kTriangleAttention:
      return attention_work(r, r, cfg.c_z, Hp, Cp, true, r, cfg.c_z, ch, rb);
    case LayerKind::kMsaColumnGlobalAttention:
      return global_attention_work(cfg, s, r, ch, rb);
    case LayerKind::kMaskedTransition:
      return transition_work(s * r, cfg.c_m, cfg.transition_n, ch, rb);
    case LayerKind::kSwiGluTransition: {  // AF3: hidden transition_n x c, as the layer's weights
      const int64_t rows = l.updates == Stream::kM ? s * r : r * r;
      const int64_t c = l.updates == Stream::kM ? cfg.c_m : cfg.c_z;
      return swiglu_transition_work(rows, c, cfg.transition_n * c, ch, rb);
    }
  }
  FC_CHECK_MSG(false, std::string("layer ") + l.name + " has no cost model");
  return {};
}

}  // namespace

namespace {
// The costs of table t's layers at the context's shapes and chunking; whole[i]: bytes of layer i's
// chunk buffers when it runs in one chunk (a chunk's working set is about the target, at most
// that).
std::vector<ModuleCost> module_costs(const BlockTable& t, const EvoformerConfig& cfg,
                                     const BlockContext& ctx, bool training,
                                     const DeviceProfile& dev, const std::vector<int64_t>& whole) {
  const int64_t s = ctx.s, r = ctx.r;
  const WorkChunks ch{&ctx, training};
  const int64_t e = plan_buffer_bytes(dev.element_bytes);  // the memory-bound passes' elements
  std::vector<LayerWork> mods(t.count);
  std::vector<LayerWork> rb(
      t.count);  // training: what each layer's backward rebuilds under policy module
  for (int i = 0; i < t.count; ++i)
    mods[i] = layer_work(t.layers[i], cfg, s, r, ch, training ? &rb[i] : nullptr);
  for (int i = 0; i < t.count; ++i) {
    mods[i].ws = static_cast<double>(std::min(ctx.chunk_target_bytes, whole[i]));
    rb[i].ws = mods[i].ws;
  }
  std::vector<ModuleCost> out;
  // Training: every chunk loop runs in the forward and again in the backward.
  for (int i = 0; i < t.count; ++i) {
    const LayerWork& w = mods[i];
    const double ovh = (w.chunks * dev.chunk_overhead_us + dev.module_overhead_us) * 1e-3;
    ModuleCost c{t.layers[i].name,
                 forward_ms(w, dev, e) * (training ? dev.train_fwd_factor : 1.0) + ovh, 0.0, 0.0};
    if (training) {
      c.backward_ms = backward_ms(w, dev, e) * dev.train_bwd_factor + ovh;
      c.rebuild_ms = forward_ms(rb[i], dev, e) * dev.train_fwd_factor +
                     (rb[i].chunks * dev.chunk_overhead_us + dev.module_overhead_us) * 1e-3;
    }
    out.push_back(c);
  }
  return out;
}
}  // namespace

std::vector<ModuleCost> block_module_costs(const EvoformerConfig& cfg, int64_t s, int64_t r,
                                           int64_t chunk, int64_t chunk_target_bytes, bool training,
                                           const DeviceProfile& dev, bool extra_msa) {
  const BlockContext ctx = shape_context(cfg, s, r, chunk,
                                         chunk_target_bytes > 0 || !training
                                             ? chunk_target_bytes
                                             : default_train_chunk_target_bytes(cfg, s, r),
                                         dev.threads);
  std::vector<int64_t> whole;
  for (const auto& [name, bytes] : training_module_whole_bytes(cfg, s, r, extra_msa))
    whole.push_back(bytes);
  return module_costs(extra_msa ? kExtraMsaBlock : kEvoformerBlock, cfg, ctx, training, dev, whole);
}

std::vector<ModuleCost> table_module_costs(const BlockTable& t, const EvoformerConfig& cfg,
                                           int64_t s, int64_t r, int64_t chunk,
                                           int64_t chunk_target_bytes, bool training,
                                           const DeviceProfile& dev) {
  const BlockContext ctx = shape_context(cfg, s, r, chunk,
                                         chunk_target_bytes > 0 || !training
                                             ? chunk_target_bytes
                                             : default_train_chunk_target_bytes(cfg, s, r),
                                         dev.threads);
  BlockContext one = ctx;  // each layer in one chunk
  one.chunk = std::max<int64_t>({s, r * r, s * r});
  std::vector<int64_t> whole;
  for (const LayerDesc& l : t) whole.push_back(layer_workspace_bytes(l, one));
  return module_costs(t, cfg, ctx, training, dev, whole);
}

// ---- DAP communication -------------------------------------------------------------------------

DapComm dap_block_comm(const EvoformerConfig& cfg, int64_t s, int64_t r, int dap,
                       int64_t elem_bytes) {
  DapComm c;
  if (dap <= 1) return c;
  // The executor's own count (src/exec/dap.h: fp32 bytes a rank sends per block, checked against
  // the dist layer's counters); a rank receives as much as it sends.
  const DapBlockVolume v = dap_block_volume(cfg, dap_layout(s, r, dap, 0));
  c.all_to_all_bytes = 2 * v.all_to_all_bytes / kF * elem_bytes;
  c.all_gather_bytes = 2 * v.all_gather_bytes / kF * elem_bytes;
  c.all_to_all_calls = 6;
  c.all_gather_calls = 6;  // at least: the tri-mul gathers run once per channel group
  c.dap = dap;
  return c;
}

DapComm dap_block_backward_comm(const EvoformerConfig& cfg, int64_t s, int64_t r, int dap,
                                int64_t elem_bytes, Recompute policy) {
  DapComm c;
  if (dap <= 1) return c;
  const DapBlockVolume v = dap_block_backward_volume(cfg, dap_layout(s, r, dap, 0), policy);
  c.all_to_all_bytes = 2 * v.all_to_all_bytes / kF * elem_bytes;
  c.all_gather_bytes = 2 * (v.all_gather_bytes + v.reduce_scatter_bytes) / kF * elem_bytes;
  // Calls (approximate; they only carry the latency term): the forward's reversed plus one
  // all-to-all of m, a reduce-scatter per gather and the re-gathers; kModule re-gathers the
  // biases and products, kBlock repeats the whole forward.
  c.all_to_all_calls = 7 + (policy == Recompute::kBlock ? 6 : 0);
  c.all_gather_calls = 6 + 3 + (policy == Recompute::kNone ? 0 : 6);
  c.dap = dap;
  return c;
}

DapComm pasdap_block_comm(const EvoformerConfig& cfg, int64_t s, int64_t r, int dap,
                          int64_t elem_bytes, bool backward, Recompute policy) {
  DapComm c;
  if (dap <= 1) return c;
  const double n = dap;
  const double m = static_cast<double>(s) * r * cfg.c_m, z = static_cast<double>(r) * r * cfg.c_z;
  // Forward, elements a rank sends: all-to-alls of m at the column attention and at the next
  // block's row attention, of z around the OPM's residual add (z and the OPM output to columns,
  // their sum back to rows for the outgoing triangle multiplication) and at the incoming
  // multiplication, both triangle attentions and the pair transition: (N - 1) / N^2 of each.
  // All-gathers, (N - 1) / N of each gathered tensor: the whole z (the row attention is one
  // registered op whose pair input has no sequence axis, so every rank gets all of it), the
  // OPM's right operand [s, r, c_opm], both triangle multiplications' right operands [r, r, c_mul]
  // and the two triangle-attention biases [r, r, H_pair].
  const double a2a = (n - 1) / (n * n) * (2 * m + 7 * z);
  const double gather = (n - 1) / n *
                        (z + static_cast<double>(s) * r * cfg.c_hidden_opm +
                         2.0 * r * r * cfg.c_hidden_mul + 2.0 * r * r * cfg.no_heads_pair);
  const int a2a_calls = 9, gather_calls = 6;
  // Backward (autograd through the adapters): each all-to-all reversed, a reduce-scatter for each
  // all-gather; a block recompute runs the forward's collectives again, a module recompute the
  // gathers inside the modules.
  double k_a2a = 1, k_gather = 1;
  if (backward) {
    k_a2a = policy == Recompute::kBlock ? 2 : 1;
    k_gather = policy == Recompute::kNone ? 1 : 2;
  }
  c.all_to_all_bytes = static_cast<int64_t>(2 * k_a2a * a2a * elem_bytes);
  c.all_gather_bytes = static_cast<int64_t>(2 * k_gather * gather * elem_bytes);
  c.all_to_all_calls = static_cast<int>(k_a2a * a2a_calls);
  c.all_gather_calls = static_cast<int>(k_gather * gather_calls);
  c.dap = dap;
  return c;
}

double comm_ms(const DapComm& c, const DeviceProfile& dev) {
  const int calls = c.all_to_all_calls + c.all_gather_calls;
  if (calls == 0) return 0;
  const double bytes = static_cast<double>(c.all_to_all_bytes + c.all_gather_bytes);
  // The collectives' device copies: a rank sends and receives 2 (N - 1) / N^2 of an all-to-all's
  // tensor T (its shard is T / N) and 2 (N - 1) / N of an all-gather's, so both per-call sizes are
  // the link bytes x N / (2 (N - 1)).
  const double per_link_byte = c.dap > 1 ? c.dap / (2.0 * (c.dap - 1)) : 0;
  const double copied = per_link_byte * (dev.collective_a2a_copies * c.all_to_all_bytes +
                                         dev.collective_gather_copies * c.all_gather_bytes);
  return calls * dev.link_latency_us * 1e-3 + bytes / (dev.link_gbps * 1e9) * 1e3 +
         copied / (stream_rate(dev) * 1e9) * 1e3;
}

}  // namespace fc
