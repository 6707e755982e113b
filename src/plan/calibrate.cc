// Calibration of a DeviceProfile on this machine: one named micro-benchmark per group of rates
// (projections by row count, the training triangle multiplication's narrow projections, the
// linear backward, batched products, attention, LayerNorm bandwidth, DRAM streams, bandwidth by
// working set) and the whole-step corrections (train factors, chunk-loop overhead) against the
// cost model (cost_model.cc). Formulas: docs/planner.md.
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <string>
#include <tuple>
#include <utility>

#include "foldcube/model.h"
#include "foldcube/planner.h"
#include "foldcube/runtime.h"
#include "foldcube/tensor.h"
#include "kernels/backward.h"
#include "kernels/kernels.h"
#include "layers/layer_models.h"

namespace fc {

namespace {
constexpr int64_t kF = sizeof(float);

// Best of `reps` timed calls after one warm-up, in seconds.
template <typename F>
double best_seconds(F&& f, int reps) {
  f();
  double best = 1e30;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    best = std::min(best,
                    std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

void fill(Tensor& t, float v) {
  float* p = t.f32();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = v * static_cast<float>((i * 7919) % 17 - 8) / 8.f;
}

// Projection GEMMs of the Evoformer (rows x in -> out) at `rows` rows: GFLOP/s over the set.
double projection_gflops(int64_t rows, int reps) {
  const int64_t shapes[][2] = {{256, 1024}, {1024, 256}, {128, 512}, {256, 256}};
  double flops = 0, sec = 0;
  for (const auto& sh : shapes) {
    Tensor x = Tensor::empty({rows, sh[0]}), w = Tensor::empty({sh[1], sh[0]});
    Tensor y = Tensor::empty({rows, sh[1]});
    fill(x, 0.5f), fill(w, 0.1f);
    sec += best_seconds(
        [&] { kern::linear(x.f32(), sh[0], rows, sh[0], w.f32(), nullptr, sh[1], y.f32(), sh[1]); },
        reps);
    flops += 2.0 * rows * sh[0] * sh[1];
  }
  return flops / sec / 1e9;
}

// The same projections' backward (dX = dY W and dW = dY^T X): GFLOP/s over the set.
double projection_bwd_gflops(int64_t rows, int reps) {
  const int64_t shapes[][2] = {{256, 1024}, {1024, 256}, {128, 512}, {256, 256}};
  double flops = 0, sec = 0;
  for (const auto& sh : shapes) {
    const int64_t in = sh[0], o = sh[1];
    Tensor x = Tensor::empty({rows, in}), w = Tensor::empty({o, in}), dy = Tensor::empty({rows, o});
    Tensor dx = Tensor::empty({rows, in}), dw = Tensor::zeros({o, in});
    fill(x, 0.5f), fill(w, 0.1f), fill(dy, 0.2f);
    sec += best_seconds(
        [&] {
          kern::linear_backward(x.f32(), in, rows, in, w.f32(), o, dy.f32(), o, dx.f32(), in,
                                dw.f32(), nullptr);
        },
        reps);
    flops += 4.0 * rows * in * o;
  }
  return flops / sec / 1e9;
}

// The gated attention with pair bias as training runs it: the forward saves lse, the backward
// uses it.
struct AttentionBench {
  Tensor qkvg, bias, mask, scratch, grad, dqkvg, dbias, bscratch, lse;
  kern::AttentionArgs a;
  kern::AttentionGrads g;
  AttentionBench(int64_t B, int64_t L, int64_t H, int64_t C, int threads) {
    const int64_t ld = 4 * H * C;
    qkvg = Tensor::empty({B * L, ld});
    bias = Tensor::empty({H, L, L});
    mask = Tensor::zeros({B, L});
    fill(qkvg, 0.5f), fill(bias, 0.3f);
    a.B = B, a.Lq = L, a.Lk = L, a.H = H, a.C = C;
    a.scale = 1.f / std::sqrt(static_cast<float>(C));
    float* p = qkvg.f32();
    a.q = p, a.q_bs = L * ld, a.q_rs = ld;
    a.k = p + H * C, a.k_bs = L * ld, a.k_rs = ld;
    a.v = p + 2 * H * C, a.v_bs = L * ld, a.v_rs = ld;
    a.gate = p + 3 * H * C, a.g_bs = L * ld, a.g_rs = ld;
    grad = Tensor::empty({B * L, H * C});
    fill(grad, 0.2f);
    a.o = grad.f32(), a.o_bs = L * H * C, a.o_rs = H * C;
    a.mask_bias = mask.f32();
    a.pair_bias = bias.f32();
    lse = Tensor::empty({B, H, L});
    a.lse = lse.f32();
    scratch = Tensor::empty({kern::attention_scratch_floats(a, threads)});
    dqkvg = Tensor::empty({B * L, ld});
    dbias = Tensor::zeros({H, L, L});
    bscratch = Tensor::empty({kern::attention_backward_scratch_floats(a, threads, true)});
    float* d = dqkvg.f32();
    g.d_out = grad.f32();
    g.dq = d, g.dk = d + H * C, g.dv = d + 2 * H * C, g.dgate = d + 3 * H * C;
    g.d_pair_bias = dbias.f32();
    g.lse = lse.f32();
  }
};

// The projection rate model 1/rate(M) = (1 + h/M) / R_inf through the rates ra, rb measured at
// a < b rows: {R_inf, h} (R_inf = rb, h = 0 when the two points give no positive intercept).
std::pair<double, double> fit_row_rate(double a, double ra, double b, double rb) {
  const double y = std::max((1 / ra - 1 / rb) / (1 / a - 1 / b), 0.0);
  const double x = 1 / rb - y / b;
  return {x > 0 ? 1 / x : rb, x > 0 ? y / x : 0};
}

// gemm_gflops, gemm_half_rows (the rate model through 256 and 8192 rows) and gemm_by_rows: the
// same projections, forward and backward, from 16 to 8192 rows (small training chunks run them
// on a few rows, where no one-parameter curve through 256 and 8192 holds).
void measure_projections(int reps, DeviceProfile* p) {
  const double a = 256, b = 8192;
  const double ra = projection_gflops(static_cast<int64_t>(a), reps);
  const double rb = projection_gflops(static_cast<int64_t>(b), reps);
  std::tie(p->gemm_gflops, p->gemm_half_rows) = fit_row_rate(a, ra, b, rb);
  for (const int64_t rows : {16, 64, 256, 1024, 8192})
    p->gemm_by_rows.push_back({static_cast<double>(rows),
                               rows == 256    ? ra
                               : rows == 8192 ? rb
                                              : projection_gflops(rows, reps),
                               projection_bwd_gflops(rows, reps)});
}

// narrow_gemm and gemm_half_cols: the training triangle multiplication's group projections as
// src/layers/triangle_multiplication.cc runs them, at its block shapes (q pairs x 128 inputs -> n =
// 4 x group outputs, q n = 2^18 for its 2 MiB blocks): forward W X^T below 16 outputs, X W^T then a
// transpose from 16 up; backward dX = dT^T W and dW = dT X. The fitted n_half serves profiles
// without the table.
void measure_narrow_projections(DeviceProfile* p) {
  const int64_t in = 128;
  for (const int64_t n : {4, 8, 16, 32, 64, 128, 512}) {
    const int64_t q = std::clamp<int64_t>((int64_t{1} << 18) / n, 512, 65536);
    Tensor x = Tensor::empty({q, in}), w = Tensor::empty({n, in}), y = Tensor::empty({q, n});
    Tensor t = Tensor::empty({n, q}), dx = Tensor::empty({q, in}), dw = Tensor::empty({n, in});
    fill(x, 0.5f), fill(w, 0.1f), fill(t, 0.01f), fill(dx, 0.f), fill(dw, 0.f);
    const double fwd = best_seconds(
        [&] {
          if (n < 16) {
            kern::gemm(false, true, n, q, in, 1.f, w.f32(), in, x.f32(), in, 0.f, t.f32(), q);
          } else {
            kern::linear(x.f32(), in, q, in, w.f32(), nullptr, n, y.f32(), n);
            kern::transpose(y.f32(), n, t.f32(), q, q, n);
          }
        },
        3);
    const double bwd = best_seconds(
        [&] {
          kern::gemm(true, false, q, in, n, 1.f, t.f32(), q, w.f32(), in, 1.f, dx.f32(), in);
          kern::gemm(false, false, n, in, q, 1.f, t.f32(), q, x.f32(), in, 1.f, dw.f32(), in);
        },
        3);
    const double flops = 2.0 * q * in * n;
    p->narrow_gemm.push_back({static_cast<double>(n), flops / fwd / 1e9, 2 * flops / bwd / 1e9});
  }
  // Per-column times t(n) ~ 1 / rate(n) ~ (n + h) / n between n = 4 and 64:
  // h = a b (rho - 1) / (b - rho a), rho = t(a) / t(b).
  const double na = 4, nb = 64, rho = p->narrow_gemm[4][1] / p->narrow_gemm[0][1];
  p->gemm_half_cols = rho < nb / na ? std::max(0.0, na * nb * (rho - 1) / (nb - rho * na)) : nb;
}

// gemm_bwd_gflops, gemm_bwd_half_rows: linear backward (dX and dW, kern::linear_backward) at the
// projection shapes and row counts, fitted to the same rate model.
void measure_projection_backward(int reps, DeviceProfile* p) {
  const double a = 256, b = 8192;
  const double ba = projection_bwd_gflops(static_cast<int64_t>(a), reps);
  const double bb = projection_bwd_gflops(static_cast<int64_t>(b), reps);
  std::tie(p->gemm_bwd_gflops, p->gemm_bwd_half_rows) = fit_row_rate(a, ba, b, bb);
}

// batched_gflops: 16 products of 256 x 256 x 256 (the triangle multiplication's shape).
void measure_batched(int reps, DeviceProfile* p) {
  const int64_t n = 256, batch = 16;
  Tensor A = Tensor::empty({batch, n, n}), B = Tensor::empty({batch, n, n});
  Tensor C = Tensor::empty({batch, n, n});
  fill(A, 0.5f), fill(B, 0.25f);
  const double sec = best_seconds(
      [&] {
        kern::gemm_batched(batch, false, true, n, n, n, 1.f, A.f32(), n, n * n, B.f32(), n, n * n,
                           0.f, C.f32(), n, n * n);
      },
      reps);
  p->batched_gflops = 2.0 * batch * n * n * n / sec / 1e9;
  // The same products of M x M outputs (a DAP shard's parts: M = r / ranks), K = 256, written as
  // a block of rows of a [256, 256] channel as the shard writes its part of P: A B^T (the shard's
  // form and the outgoing one) and A^T B (the incoming one).
  p->batched_by_rows.clear();
  for (const int64_t m : {64, 128, 256}) {
    double rate[2] = {p->batched_gflops, 0};  // A B^T at M = 256: the measurement above
    for (int t = m == n ? 1 : 0; t < 2; ++t) {
      const double s = best_seconds(
          [&] {
            kern::gemm_batched(batch, t == 1, t == 0, m, m, n, 1.f, A.f32(), t == 1 ? m : n, n * n,
                               B.f32(), t == 1 ? m : n, n * n, 0.f, C.f32(), n, n * n);
          },
          reps);
      rate[t] = 2.0 * batch * m * m * n / s / 1e9;
    }
    p->batched_by_rows.push_back({static_cast<double>(m), rate[0], rate[1]});
  }
}

// Per-score and per-FLOP costs from seconds per score at two head widths: t = 4 C / R + 1 / S
// (FLOPs counted as the rates count them, x `flop_mult` for the backward): {R GFLOP/s, S G/s}.
// Under load either part may come out non-positive; then the wide shape's rate alone is kept
// ({its rate, 0}).
std::pair<double, double> split_score_cost(double t_wide, double c_wide, double t_narrow,
                                           double c_narrow, double flop_mult) {
  const double per_flop = (t_wide - t_narrow) / (flop_mult * 4 * (c_wide - c_narrow));
  const double per_score = t_wide - flop_mult * 4 * c_wide * per_flop;
  if (!(per_flop > 0) || !(per_score > 0)) return {flop_mult * 4 * c_wide / t_wide / 1e9, 0};
  return {1 / per_flop / 1e9, 1 / per_score / 1e9};
}

// attention_gflops (256 keys), attention_len_exp (from 128 and 256 keys), attention_bwd_gflops
// (256 keys), 8 heads of 32 channels; attention_score_gps and attention_bwd_score_gps from the
// same kernel at 8 channels (the ExtraMSA attentions' width: 4x fewer FLOPs per score). The
// length exponent applies to the FLOP part.
void measure_attention(int reps, DeviceProfile* p) {
  const int64_t H = 8;
  // seconds per score: [C = 32 at 128 keys, C = 32 at 256 keys, C = 8 at 256 keys]
  double fwd[3] = {0, 0, 0}, bwd[3] = {0, 0, 0};
  const int64_t lens[3] = {128, 256, 256}, widths[3] = {32, 32, 8};
  for (int i = 0; i < 3; ++i) {
    const int64_t L = lens[i], B = 2 * 65536 / (L * 32);
    AttentionBench ab(B, L, H, widths[i], p->threads);
    const double scores = static_cast<double>(B) * H * L * L;
    fwd[i] =
        best_seconds([&] { kern::attention(ab.a, ab.scratch.f32(), p->threads); }, reps) / scores;
    if (L == 256)
      bwd[i] =
          best_seconds([&] { kern::attention_backward(ab.a, ab.g, ab.bscratch.f32(), p->threads); },
                       reps) /
          scores;
  }
  std::tie(p->attention_gflops, p->attention_score_gps) =
      split_score_cost(fwd[1], 32, fwd[2], 8, 1.0);
  std::tie(p->attention_bwd_gflops, p->attention_bwd_score_gps) =
      split_score_cost(bwd[1], 32, bwd[2], 8, 2.5);
  const double score_sec = p->attention_score_gps > 0 ? 1 / (p->attention_score_gps * 1e9) : 0;
  const double flop128 = std::max(fwd[0] - score_sec, 1e-3 * fwd[0]);
  const double flop256 = std::max(fwd[1] - score_sec, 1e-3 * fwd[1]);
  p->attention_len_exp = std::log(flop128 / flop256) / std::log(2.0);
}

// mem_gbps and mem_bwd_gbps: LayerNorm forward, and backward (reads x and dy, writes dx) for the
// backward's memory-bound passes, on 16 MiB each way: the size of the chunk buffers that the
// elementwise passes work on.
void measure_layernorm_bandwidth(int reps, DeviceProfile* p) {
  const int64_t rows = 32768, n = 128;
  Tensor xx = Tensor::empty({rows, n}), yy = Tensor::empty({rows, n});
  Tensor gamma = Tensor::full({n}, 1.f), beta = Tensor::zeros({n});
  fill(xx, 1.f);
  const double sec = best_seconds(
      [&] { kern::layernorm(xx.f32(), n, yy.f32(), n, rows, n, gamma.f32(), beta.f32(), 1e-5f); },
      reps);
  p->mem_gbps = 2.0 * rows * n * kF / sec / 1e9;
  Tensor dy = Tensor::empty({rows, n}), dx = Tensor::empty({rows, n});
  Tensor mean = Tensor::empty({rows}), rstd = Tensor::empty({rows});
  Tensor dg = Tensor::zeros({n}), db = Tensor::zeros({n});
  Tensor scratch = Tensor::empty({kern::layernorm_backward_scratch_floats(rows, n)});
  fill(dy, 0.3f);
  kern::layernorm(xx.f32(), n, yy.f32(), n, rows, n, gamma.f32(), beta.f32(), 1e-5f, mean.f32(),
                  rstd.f32());
  const double bsec = best_seconds(
      [&] {
        kern::layernorm_backward(xx.f32(), n, dy.f32(), n, rows, n, gamma.f32(), mean.f32(),
                                 rstd.f32(), dx.f32(), n, dg.f32(), db.f32(), scratch.f32());
      },
      reps);
  p->mem_bwd_gbps = 3.0 * rows * n * kF / bsec / 1e9;
}

// stream_gbps: 128 MiB each way, 4x a large L3: y += x reads two and writes one DRAM-resident
// buffer.
void measure_stream(DeviceProfile* p) {
  const int64_t rows = 262144, n = 128;
  Tensor xx = Tensor::empty({rows, n}), yy = Tensor::empty({rows, n});
  fill(xx, 1e-3f), fill(yy, 0.f);
  const double sec = best_seconds([&] { kern::add_inplace(yy.f32(), n, xx.f32(), n, rows, n); }, 3);
  p->stream_gbps = 3.0 * rows * n * kF / sec / 1e9;
}

// mem_by_size: LayerNorm forward and backward by working set (in + out = 4, 16, 64, 256 MiB):
// chunk buffers that the caches (and the TLB) hold run the memory-bound passes 2-4x faster than
// DRAM-sized ones (this machine, 2 threads: LayerNorm 89 / 66 / 38 / 39 GB/s).
void measure_bandwidth_by_size(DeviceProfile* p) {
  const int64_t n = 128;
  for (const int64_t ws :
       {int64_t{4} << 20, int64_t{16} << 20, int64_t{64} << 20, int64_t{256} << 20}) {
    const int64_t rows = ws / 2 / (n * kF);
    Tensor xx = Tensor::empty({rows, n}), yy = Tensor::empty({rows, n});
    Tensor gamma = Tensor::full({n}, 1.f), beta = Tensor::zeros({n});
    Tensor mean = Tensor::empty({rows}), rstd = Tensor::empty({rows});
    Tensor dg = Tensor::zeros({n}), db = Tensor::zeros({n});
    Tensor scratch = Tensor::empty({kern::layernorm_backward_scratch_floats(rows, n)});
    fill(xx, 1.f);
    const double fsec = best_seconds(
        [&] {
          kern::layernorm(xx.f32(), n, yy.f32(), n, rows, n, gamma.f32(), beta.f32(), 1e-5f,
                          mean.f32(), rstd.f32());
        },
        3);
    // Backward reads x and dy (yy) and writes dx in place of dy.
    const double bsec = best_seconds(
        [&] {
          kern::layernorm_backward(xx.f32(), n, yy.f32(), n, rows, n, gamma.f32(), mean.f32(),
                                   rstd.f32(), yy.f32(), n, dg.f32(), db.f32(), scratch.f32());
        },
        3);
    p->mem_by_size.push_back({static_cast<double>(ws), 2.0 * rows * n * kF / fsec / 1e9,
                              3.0 * rows * n * kF / bsec / 1e9});
  }
}

// train_fwd_factor, train_bwd_factor: the training step as a whole, one AF2 block at (32, 128),
// policy none, one chunk per module (fastest of 2 after a warm-up, ~1-2 s). What the kernel
// classes miss (the training functions' state writes, per-chunk copies and gathers) is the ratio
// of measured to modelled forward and backward time at this shape; block_module_costs applies it.
Status measure_train_factors(const EvoformerStack& stack, DeviceProfile* p) {
  const EvoformerConfig& cfg = stack.config();
  const int64_t s = 32, r = 128;
  Tensor m0 = Tensor::empty({s, r, cfg.c_m}), z0 = Tensor::empty({r, r, cfg.c_z});
  Tensor gm = Tensor::empty({s, r, cfg.c_m}), gz = Tensor::empty({r, r, cfg.c_z});
  fill(m0, 1.f), fill(z0, 1.f), fill(gm, 0.1f), fill(gz, 0.1f);
  TrainOptions o;
  o.policy = {Recompute::kNone};
  o.chunk_target_bytes = training_chunk_targets(cfg, s, r).back();
  double fwd = 1e30, bwd = 1e30;
  for (int i = 0; i < 3; ++i) {
    Tensor m = m0.clone(), z = z0.clone();
    TrainResult res;
    FC_RETURN_IF_ERROR(stack.train_step(m, z, Tensor(), Tensor(), gm, gz, o, &res));
    if (i > 0) fwd = std::min(fwd, res.forward_ms), bwd = std::min(bwd, res.backward_ms);
  }
  double mf = 0, mb = 0;
  for (const ModuleCost& c : block_module_costs(cfg, s, r, 0, o.chunk_target_bytes, true, *p))
    mf += c.forward_ms, mb += c.backward_ms;
  p->train_fwd_factor = fwd / mf;
  p->train_bwd_factor = bwd / mb;
  return Status::OK();
}

// chunk_overhead_us, the fixed cost of one chunk-loop iteration: the same block at (16, 64),
// policy module, finest training chunk target (one item, one channel per chunk; ~0.3-1 s): the
// time the rate model leaves unexplained over the iterations it counts.
Status measure_chunk_overhead(const EvoformerStack& stack, DeviceProfile* p) {
  const EvoformerConfig& cfg = stack.config();
  const int64_t s2 = 16, r2 = 64;
  Tensor m1 = Tensor::empty({s2, r2, cfg.c_m}), z1 = Tensor::empty({r2, r2, cfg.c_z});
  Tensor gm1 = Tensor::empty({s2, r2, cfg.c_m}), gz1 = Tensor::empty({r2, r2, cfg.c_z});
  fill(gm1, 0.1f), fill(gz1, 0.1f);
  TrainOptions o;
  o.policy = {Recompute::kModule};
  o.chunk_target_bytes = training_chunk_targets(cfg, s2, r2).front();
  double step = 1e30;
  for (int i = 0; i < 2; ++i) {
    fill(m1, 1.f), fill(z1, 1.f);
    TrainResult res;
    FC_RETURN_IF_ERROR(stack.train_step(m1, z1, Tensor(), Tensor(), gm1, gz1, o, &res));
    step = std::min(step, res.forward_ms + res.backward_ms);
  }
  double model = 0, iters = 0;
  DeviceProfile unit = *p;
  unit.chunk_overhead_us = 1;  // 1 us per iteration: the difference counts the iterations
  for (const ModuleCost& c : block_module_costs(cfg, s2, r2, 0, o.chunk_target_bytes, true, *p))
    model += 2 * c.forward_ms + c.backward_ms;  // forward, module recompute, backward
  for (const ModuleCost& c : block_module_costs(cfg, s2, r2, 0, o.chunk_target_bytes, true, unit))
    iters += (2 * c.forward_ms + c.backward_ms) * 1e3;
  iters -= model * 1e3;
  p->chunk_overhead_us = iters > 0 ? std::max(0.0, (step - model) * 1e3 / iters) : 0;
  return Status::OK();
}

}  // namespace

Status calibrate_profile(int threads, DeviceProfile* out) {
  const int saved = num_threads();
  if (threads > 0) set_num_threads(threads);
  DeviceProfile p;
  p.threads = num_threads();
  p.calibrated = true;
  char host[256] = "localhost";
  gethostname(host, sizeof host - 1);
  p.name = std::string(host) + " (calibrated, " + std::to_string(p.threads) + " threads)";
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  p.memory_bytes = pages > 0 && page > 0 ? static_cast<int64_t>(pages) * page : 0;
  const int reps = 5;  // best of: filters out other processes on a shared machine
  measure_projections(reps, &p);
  measure_narrow_projections(&p);
  measure_projection_backward(reps, &p);
  measure_batched(reps, &p);
  measure_attention(reps, &p);
  measure_layernorm_bandwidth(reps, &p);
  measure_stream(&p);
  measure_bandwidth_by_size(&p);
  FC_RETURN_IF_ERROR(p.validate());
  EvoformerConfig cfg;
  cfg.no_blocks = 1;
  const EvoformerStack stack = EvoformerStack::random(cfg, 1);
  FC_RETURN_IF_ERROR(measure_train_factors(stack, &p));
  FC_RETURN_IF_ERROR(measure_chunk_overhead(stack, &p));
  set_num_threads(saved);
  FC_RETURN_IF_ERROR(p.validate());
  *out = p;
  return Status::OK();
}

}  // namespace fc
