// Cost model of the planner: time per module from FLOPs per kernel class and bytes moved (the
// rates of a DeviceProfile: profile.cc, measured by calibrate.cc), and the DAP communication
// volume. Formulas: docs/planner.md.
#include "plan/cost_model.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

#include "exec/dap.h"
#include "foldcube/model.h"
#include "foldcube/planner.h"
#include "foldcube/tensor.h"
#include "model/block_table.h"
#include "model/common.h"
#include "model/modules.h"
#include "model/train.h"

namespace fc {

namespace {
constexpr int64_t kF = sizeof(float);
constexpr double kRefKeys = 256;  // attention rates refer to this key length
}  // namespace

// ---- Time per module ---------------------------------------------------------------------------

namespace {

// Work of one module split by kernel class. GEMM terms carry their row count (the M of the
// product, which sets its efficiency).
struct Work {
  std::vector<std::pair<double, double>> gemm;  // (FLOPs, rows)
  // Products with a narrow side (output or reduction width `narrow`, e.g. the triangle
  // projections of a training channel group): (FLOPs, rows, narrow).
  std::vector<std::array<double, 3>> gemm_narrow;
  double batched = 0;                          // FLOPs of batched products
  std::vector<std::pair<double, double>> att;  // (FLOPs of QK^T + PV, key length)
  double mem = 0;                              // elements read + written by memory-bound kernels
  // Forward work the backward re-runs (recomputed LayerNorms, the triangle projections, the OPM
  // outer products; src/model/train.h says what each backward rebuilds).
  std::vector<std::pair<double, double>> re_gemm;
  std::vector<std::array<double, 3>> re_gemm_narrow;
  double re_batched = 0, re_mem = 0;
  // Elements swept through memory far larger than the caches (at stream_gbps), forward and
  // backward: the training triangle multiplication re-reads LN_in(z) per channel group.
  double stream = 0, bwd_stream = 0;
  double chunks = 0;  // iterations of the module's chunk loops (each pays chunk_overhead_us)
  double ws = 0;      // bytes of the module's chunk buffers (sets its memory-bound passes' rate)
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / std::max<int64_t>(b, 1); }

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

// Forward time, ms. Bytes scale with the element size; FLOP rates are the profile's.
double forward_ms(const Work& w, const DeviceProfile& d, int64_t e) {
  double s = 0;
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
double backward_ms(const Work& w, const DeviceProfile& d, int64_t e) {
  double s = 0;
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

// Items per chunk of each loop, as the inference modules (src/model/modules.cc) or the training
// functions (src/model/train.h) pick them; the GEMM row counts follow.
struct Chunks {
  const BlockContext* ctx;
  bool training;
  int64_t operator()(int64_t batch, int64_t bytes_per_item) const {
    return pick_chunk(*ctx, batch, bytes_per_item);
  }
};

// rb (training, may be null) receives the work the module's backward rebuilds under policy
// module (src/model/train.h): here the bias branch and per chunk LN, q|k|v|g and the attention
// (og, lse), not the output projection nor the residual add.
Work attention_work(int64_t N, int64_t L, int64_t c, int64_t H, int64_t C, bool bias, int64_t r,
                    int64_t cz, const Chunks& ch, Work* rb = nullptr) {
  Work w;
  const double rows = static_cast<double>(N) * L, hc = static_cast<double>(H) * C;
  const int64_t n = ch.training ? attention_train_chunk(*ch.ctx, N, L, c, H * C)
                                : ch(N, L * c * 2 * kF + L * 4 * H * C * kF);
  w.chunks += ceil_div(N, n);
  if (bias) {
    const int64_t nb = ch.training ? bias_train_chunk(*ch.ctx, H) : ch(r, r * cz * kF);
    w.chunks += ceil_div(r, nb);
    w.gemm.push_back({2.0 * r * r * cz * H, static_cast<double>(nb * r)});
    w.mem += 2.0 * r * r * cz + 2.0 * H * r * r;  // LayerNorm of z, bias transpose
  }
  w.gemm.push_back({2.0 * rows * c * 4 * hc, static_cast<double>(n * L)});
  w.gemm.push_back({2.0 * rows * hc * c, static_cast<double>(n * L)});
  w.att.push_back({attention_flops(N, H, L, L, C), static_cast<double>(L)});
  w.mem += 2 * rows * c + 3 * rows * c;                        // LayerNorm, residual add
  w.re_mem += 2 * rows * c + (bias ? 2.0 * r * r * cz : 0.0);  // LayerNorms rebuilt per chunk
  if (rb) {
    *rb = Work{};
    rb->chunks = w.chunks;
    if (bias) {
      rb->gemm.push_back(w.gemm[0]);
      rb->mem += 2.0 * r * r * cz + 2.0 * H * r * r;
    }
    rb->gemm.push_back(w.gemm[bias ? 1 : 0]);
    rb->att = w.att;
    rb->mem += 2 * rows * c;
  }
  return w;
}

// rb: LayerNorm, linear_1 and ReLU (the hidden h), not linear_2.
Work transition_work(int64_t rows, int64_t c, int64_t n, const Chunks& ch, Work* rb = nullptr) {
  Work w;
  const int64_t k =
      ch.training ? transition_train_chunk(*ch.ctx, rows, c, n * c) : ch(rows, (c + n * c) * kF);
  w.gemm.push_back({4.0 * rows * c * n * c, static_cast<double>(k)});
  w.chunks += ceil_div(rows, k);
  w.mem += 2.0 * rows * c + 2.0 * rows * n * c;  // LayerNorm, ReLU
  w.re_mem += 2.0 * rows * c;                    // LayerNorm rebuilt per chunk
  if (rb) {
    *rb = Work{};
    rb->chunks = w.chunks;
    rb->gemm.push_back({2.0 * rows * c * n * c, static_cast<double>(k)});
    rb->mem = w.mem;
  }
  return w;
}

// rb: LayerNorm, the masked projections a, b and the mask normaliser (the outer product is rebuilt
// by every backward, counted in re_batched).
Work opm_work(const EvoformerConfig& cfg, int64_t s, int64_t r, const Chunks& ch,
              Work* rb = nullptr) {
  const int64_t cm = cfg.c_m, co = cfg.c_hidden_opm, cz = cfg.c_z;
  Work w;
  // Training chunks only the outer product (residue blocks i); the projections run whole.
  const int64_t c1 = ch.training ? s : ch(s, r * (cm + 2 * co) * kF);
  const int64_t c2 = ch(r, 2 * co * r * co * kF + r * cz * kF);
  w.chunks += ceil_div(s, c1) + ceil_div(r, c2);
  const double sr = static_cast<double>(s) * r, rr = static_cast<double>(r) * r;
  w.gemm.push_back({2 * sr * cm * 2 * co, static_cast<double>(c1 * r)});
  w.gemm.push_back({2 * rr * s, static_cast<double>(r)});  // mask normaliser
  w.batched += 2 * rr * co * co * s;                       // outer products (K = s)
  w.gemm.push_back({2 * rr * co * co * cz, static_cast<double>(c2 * r)});
  w.mem += 2 * sr * cm + 4 * sr * co + 2 * rr * co * co + 3 * rr * cz;
  w.re_batched += 2 * rr * co * co * s;  // the outer product is rebuilt chunk by chunk
  if (rb) {
    *rb = Work{};
    rb->gemm = {w.gemm[0], w.gemm[1]};
    rb->mem = 2 * sr * cm + 4 * sr * co;
  }
  return w;
}

// Inference (src/model/modules.cc): row chunks c1 for the input projections (all channels),
// c2 for the output side.
Work trimul_work(const EvoformerConfig& cfg, int64_t r, const Chunks& ch) {
  const int64_t cz = cfg.c_z, ct = cfg.c_hidden_mul;
  const double rr = static_cast<double>(r) * r;
  Work w;
  const int64_t c1 = ch(r, r * (cz + 4 * ct) * kF);
  const int64_t c2 = ch(r, r * (ct + 3 * cz) * kF);
  w.chunks += ceil_div(r, c1) + ceil_div(r, c2);
  w.gemm.push_back({2 * rr * cz * 4 * ct, static_cast<double>(c1 * r)});
  w.batched += 2 * rr * r * ct;
  w.gemm.push_back({2 * rr * ct * cz, static_cast<double>(c2 * r)});
  w.gemm.push_back({2 * rr * cz * cz, static_cast<double>(c2 * r)});
  // LayerNorm in (twice), gating of the projections (sigmoid, mul, mask), A/B and P transposes,
  // LayerNorm out, sigmoid-mul, residual add.
  w.mem += 4 * rr * cz + 2 * rr * ct * (2 + 3 + 2 + 2) + 2 * rr * ct * 2 + 6 * rr * cz;
  return w;
}

// Training (src/model/train_pair.cc): per channel group, the input projections [4 group, c_z] x
// [c_z, q pairs] block by block (q = proj_rows * r), channel-major gating into A, B, the
// batched products; the output side by row chunks. Each group sweeps LN_in(z) [r^2, c_z] once in
// the forward; in the backward three times (A, B rebuilt; projections re-run; dW) plus a
// read-modify-write of dL/d LN_in(z).
// rb: LN_in(z) and the products P (projections, gating, batched products), not the output side.
Work trimul_train_work(const EvoformerConfig& cfg, int64_t r, const BlockContext& ctx,
                       Work* rb = nullptr) {
  const int64_t cz = cfg.c_z, ct = cfg.c_hidden_mul;
  const double rr = static_cast<double>(r) * r;
  const TriMulTrainChunks tm = tri_mul_train_chunks(ctx);
  const int64_t groups = ceil_div(ct, tm.group), q = tm.proj_rows * r;
  const double proj = 2 * rr * cz * 4 * ct;
  Work w;
  w.chunks += groups * ceil_div(r, tm.proj_rows) + ceil_div(r, tm.rows);
  w.gemm_narrow.push_back({proj, static_cast<double>(q), static_cast<double>(4 * tm.group)});
  w.batched += 2 * rr * r * ct;
  w.gemm.push_back({2 * rr * ct * cz, static_cast<double>(tm.rows * r)});
  w.gemm.push_back({2 * rr * cz * cz, static_cast<double>(tm.rows * r)});
  // LayerNorm in, gating (per part: sigmoid 2, copy 2, two multiplies 3 + 2), P transposed into
  // rows, LayerNorm out, sigmoid-mul, residual add.
  w.mem += 2 * rr * cz + 2 * rr * ct * 9 + 2 * rr * ct * 2 + 6 * rr * cz;
  w.stream += groups * rr * cz;
  // The backward rebuilds LN_in(z), the projections twice (A, B; then pre-activation), the
  // gating of A, B, and LN_out.
  w.re_gemm_narrow.push_back({2 * proj, static_cast<double>(q), static_cast<double>(4 * tm.group)});
  w.re_mem += 2 * rr * cz + 2 * rr * ct * 9 + 2 * rr * ct;
  w.bwd_stream += 5 * groups * rr * cz;
  if (rb) {
    *rb = Work{};
    rb->chunks = groups * ceil_div(r, tm.proj_rows);
    rb->gemm_narrow = w.gemm_narrow;
    rb->batched = w.batched;
    rb->mem = 2 * rr * cz + 2 * rr * ct * 9;
    rb->stream = w.stream;
  }
  return w;
}

// Global column attention (ExtraMSA; modules.cc / train_extra_msa.cc), chunked over columns: per
// column the k | v | g projection [s, c_e] x [c_e, 2C + HC], the query of the masked mean, the
// attention of H queries over s keys with one head, the gating and linear_o.
// rb: LN, means, q, k | v | g and the attention, not the gating nor linear_o.
Work global_attention_work(const EvoformerConfig& cfg, int64_t s, int64_t r, const Chunks& ch,
                           Work* rb = nullptr) {
  const int64_t ce = cfg.c_m, H = cfg.no_heads_msa, C = cfg.c_hidden_msa_att, hc = H * C;
  const int64_t ld = 2 * C + hc;
  const int64_t n =
      ch.training ? global_attention_train_chunk(*ch.ctx) : ch(r, (s * ce + s * ld + ce + hc) * kF);
  const double sr = static_cast<double>(s) * r;
  Work w;
  w.chunks += ceil_div(r, n);
  w.gemm.push_back({2 * sr * ce * ld, static_cast<double>(n * s)});
  w.gemm.push_back({2.0 * r * ce * hc, static_cast<double>(n)});
  w.att.push_back({attention_flops(r, 1, H, s, C), static_cast<double>(s)});
  w.gemm.push_back({2 * sr * hc * ce, static_cast<double>(n * s)});
  // LayerNorm, masked mean, gating (sigmoid, multiply), residual add.
  w.mem += 2 * sr * ce + sr * ce + 2 * sr * hc * 2 + 3 * sr * ce;
  w.re_mem += 3 * sr * ce;  // LayerNorm and masked mean rebuilt per chunk
  if (rb) {
    *rb = Work{};
    rb->chunks = w.chunks;
    rb->gemm = {w.gemm[0], w.gemm[1]};
    rb->att = w.att;
    rb->mem = 3 * sr * ce;
  }
  return w;
}

// The work of one layer of the block table; rb as in attention_work.
Work layer_work(const LayerDesc& l, const EvoformerConfig& cfg, int64_t s, int64_t r,
                const Chunks& ch, Work* rb) {
  const int64_t Hm = cfg.no_heads_msa, Cm = cfg.c_hidden_msa_att;
  const int64_t Hp = cfg.no_heads_pair, Cp = cfg.c_hidden_pair_att;
  switch (l.kind) {
    case LayerKind::kMsaRowAttention:
      return attention_work(s, r, cfg.c_m, Hm, Cm, true, r, cfg.c_z, ch, rb);
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
    case LayerKind::kSwiGluTransition:  // AF3: not modelled / sharded yet
      break;
  }
  FC_CHECK_MSG(false, std::string("layer ") + l.name + " has no cost model");
  return {};
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
  const Chunks ch{&ctx, training};
  const int64_t e = dtype_bytes(dev.dtype);
  const BlockTable& t = extra_msa ? kExtraMsaBlock : kEvoformerBlock;
  std::vector<Work> mods(t.count);
  std::vector<Work> rb(
      t.count);  // training: what each layer's backward rebuilds under policy module
  for (int i = 0; i < t.count; ++i)
    mods[i] = layer_work(t.layers[i], cfg, s, r, ch, training ? &rb[i] : nullptr);
  // Working sets: a chunk's buffers are about the target, at most the module's whole-axis ones.
  const auto whole = training_module_whole_bytes(cfg, s, r, extra_msa);
  for (int i = 0; i < t.count; ++i) {
    mods[i].ws = static_cast<double>(std::min(ctx.chunk_target_bytes, whole[i].second));
    rb[i].ws = mods[i].ws;
  }
  std::vector<ModuleCost> out;
  // Training: every chunk loop runs in the forward and again in the backward.
  for (int i = 0; i < t.count; ++i) {
    const Work& w = mods[i];
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
  return c;
}

double comm_ms(const DapComm& c, const DeviceProfile& dev) {
  const int calls = c.all_to_all_calls + c.all_gather_calls;
  if (calls == 0) return 0;
  const double bytes = static_cast<double>(c.all_to_all_bytes + c.all_gather_bytes);
  return calls * dev.link_latency_us * 1e-3 + bytes / (dev.link_gbps * 1e9) * 1e3;
}

}  // namespace fc
