// Cost model of the planner: device profiles (JSON, calibration by micro-benchmarks), time per
// module from FLOPs per kernel class and bytes moved, and the DAP communication volume.
// Formulas: docs/planner.md.
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "exec/dap.h"
#include "foldcube/model.h"
#include "foldcube/planner.h"
#include "foldcube/runtime.h"
#include "foldcube/tensor.h"
#include "kernels/backward.h"
#include "kernels/kernels.h"
#include "model/block_table.h"
#include "model/common.h"
#include "model/modules.h"
#include "model/train.h"
#include "plan/json_int.h"

namespace fc {

namespace {
using json = nlohmann::json;
constexpr int64_t kF = sizeof(float);
constexpr double kRefKeys = 256;  // attention rates refer to this key length

// Default efficiencies for user profiles that give peaks only (docs/planner.md).
struct Efficiency {
  double gemm = 0.75, bwd = 0.6, batched = 0.6, attention = 0.55, attention_bwd = 0.4, mem = 0.7;
};
}  // namespace

int64_t dtype_bytes(DType dtype) { return static_cast<int64_t>(dtype_size(dtype)); }

const char* plan_dtype_name(DType dtype) {
  switch (dtype) {
    case DType::F32:
      return "fp32";
    case DType::BF16:
      return "bf16";
    case DType::F16:
      return "fp16";
    case DType::F64:
      return "fp64";
    case DType::I64:
    case DType::I32:
      break;  // not a precision
  }
  return "?";
}

Status parse_plan_dtype(const std::string& name, DType* out) {
  for (DType t : {DType::F32, DType::BF16, DType::F16})
    if (name == plan_dtype_name(t)) {
      *out = t;
      return Status::OK();
    }
  return Status::InvalidArgument("unknown dtype '" + name + "' (fp32|bf16|fp16)");
}

Status check_plan_dtype(DType dtype) {
  if (dtype == DType::F32 || dtype == DType::BF16 || dtype == DType::F16) return Status::OK();
  return Status::InvalidArgument(std::string("unsupported planner dtype '") +
                                 plan_dtype_name(dtype) + "' (fp32|bf16|fp16)");
}

// ---- Profiles ----------------------------------------------------------------------------------

std::string DeviceProfile::to_json() const {
  json j;
  j["name"] = name;
  j["calibrated"] = calibrated;
  j["devices"] = devices;
  j["threads"] = threads;
  j["memory_bytes"] = memory_bytes;
  j["dtype"] = plan_dtype_name(dtype);
  j["gemm_gflops"] = gemm_gflops;
  j["gemm_half_rows"] = gemm_half_rows;
  j["gemm_half_cols"] = gemm_half_cols;
  j["narrow_gemm"] = narrow_gemm;
  j["gemm_by_rows"] = gemm_by_rows;
  j["gemm_bwd_gflops"] = gemm_bwd_gflops;
  j["gemm_bwd_half_rows"] = gemm_bwd_half_rows;
  j["batched_gflops"] = batched_gflops;
  j["attention_gflops"] = attention_gflops;
  j["attention_bwd_gflops"] = attention_bwd_gflops;
  j["attention_len_exp"] = attention_len_exp;
  j["mem_gbps"] = mem_gbps;
  j["mem_bwd_gbps"] = mem_bwd_gbps;
  j["stream_gbps"] = stream_gbps;
  j["mem_by_size"] = mem_by_size;
  j["link_gbps"] = link_gbps;
  j["link_latency_us"] = link_latency_us;
  j["train_fwd_factor"] = train_fwd_factor;
  j["train_bwd_factor"] = train_bwd_factor;
  j["chunk_overhead_us"] = chunk_overhead_us;
  j["module_overhead_us"] = module_overhead_us;
  return j.dump(2);
}

Status DeviceProfile::validate() const {
  if (devices < 1) return Status::InvalidArgument("profile: devices must be >= 1");
  if (threads < 1) return Status::InvalidArgument("profile: threads must be >= 1");
  if (memory_bytes < 0) return Status::InvalidArgument("profile: memory_bytes must be >= 0");
  if (!check_plan_dtype(dtype).ok())
    return Status::InvalidArgument(std::string("profile: unknown dtype '") +
                                   plan_dtype_name(dtype) + "' (fp32|bf16|fp16)");
  const std::pair<const char*, double> rates[] = {{"gemm_gflops", gemm_gflops},
                                                  {"gemm_bwd_gflops", gemm_bwd_gflops},
                                                  {"batched_gflops", batched_gflops},
                                                  {"attention_gflops", attention_gflops},
                                                  {"attention_bwd_gflops", attention_bwd_gflops},
                                                  {"mem_gbps", mem_gbps}};
  for (const auto& [key, v] : rates)
    if (!(v > 0) || !std::isfinite(v))
      return Status::InvalidArgument(std::string("profile: ") + key + " must be > 0");
  if (!(train_fwd_factor > 0) || !(train_bwd_factor > 0) || !std::isfinite(train_fwd_factor) ||
      !std::isfinite(train_bwd_factor))
    return Status::InvalidArgument("profile: train_fwd_factor and train_bwd_factor must be > 0");
  if (!(chunk_overhead_us >= 0) || !std::isfinite(chunk_overhead_us))
    return Status::InvalidArgument("profile: chunk_overhead_us must be >= 0");
  if (!(module_overhead_us >= 0) || !std::isfinite(module_overhead_us))
    return Status::InvalidArgument("profile: module_overhead_us must be >= 0");
  if (!(mem_bwd_gbps >= 0) || !std::isfinite(mem_bwd_gbps))
    return Status::InvalidArgument("profile: mem_bwd_gbps must be >= 0 (0: mem_gbps)");
  if (!(stream_gbps >= 0) || !std::isfinite(stream_gbps))
    return Status::InvalidArgument("profile: stream_gbps must be >= 0 (0: mem_gbps)");
  if (!(gemm_half_rows >= 0) || !(gemm_bwd_half_rows >= 0) || !(gemm_half_cols >= 0) ||
      !std::isfinite(attention_len_exp) || !(link_gbps >= 0) || !(link_latency_us >= 0))
    return Status::InvalidArgument(
        "profile: gemm_half_rows, link_gbps and link_latency_us must be >= 0");
  if (devices > 1 && link_gbps <= 0)
    return Status::InvalidArgument("profile: link_gbps must be > 0 with more than one device");
  return Status::OK();
}

namespace {
// A calibrated table under `key` (absent: left empty): rows [x >= 1, rate > 0, rate > 0] with x
// strictly ascending.
Status read_table(const json& j, const char* key, std::vector<std::array<double, 3>>* out) {
  if (!j.contains(key)) return Status::OK();
  *out = j[key].get<std::vector<std::array<double, 3>>>();
  for (size_t i = 0; i < out->size(); ++i) {
    const auto& e = (*out)[i];
    if (!(e[0] >= 1 && e[1] > 0 && e[2] > 0) || !std::isfinite(e[0]) || !std::isfinite(e[1]) ||
        !std::isfinite(e[2]) || (i > 0 && !(e[0] > (*out)[i - 1][0])))
      return Status::InvalidArgument(std::string("profile: ") + key +
                                     " rows must be [x >= 1, rate > 0, rate > 0] with x ascending");
  }
  return Status::OK();
}
}  // namespace

Status DeviceProfile::from_json(const std::string& text, DeviceProfile* out) {
  json j;
  try {
    j = json::parse(text);
  } catch (const std::exception& e) {
    return Status::InvalidArgument(std::string("profile: not valid JSON: ") + e.what());
  }
  if (!j.is_object()) return Status::InvalidArgument("profile: expected a JSON object");
  DeviceProfile p;
  try {
    auto num = [&](const char* key, double* v) {
      if (j.contains(key)) *v = j.at(key).get<double>();
    };
    if (j.contains("name")) p.name = j["name"].get<std::string>();
    if (j.contains("calibrated")) p.calibrated = j["calibrated"].get<bool>();
    p.devices = json_int<int>(j, "devices", p.devices);
    p.threads = json_int<int>(j, "threads", p.threads);
    p.memory_bytes = json_int<int64_t>(j, "memory_bytes", p.memory_bytes);
    if (j.contains("memory_gb")) {
      const double gb = j["memory_gb"].get<double>();
      if (!(gb >= 0 && gb < 9e9))  // bytes must fit int64
        return Status::InvalidArgument("profile: memory_gb must be in [0, 9e9)");
      p.memory_bytes = static_cast<int64_t>(gb * 1e9);
    }
    if (j.contains("dtype")) {
      const Status st = parse_plan_dtype(j["dtype"].get<std::string>(), &p.dtype);
      if (!st.ok()) return Status::InvalidArgument("profile: " + st.message());
    }
    num("gemm_gflops", &p.gemm_gflops);
    num("gemm_half_rows", &p.gemm_half_rows);
    num("gemm_half_cols", &p.gemm_half_cols);
    FC_RETURN_IF_ERROR(read_table(j, "narrow_gemm", &p.narrow_gemm));
    FC_RETURN_IF_ERROR(read_table(j, "gemm_by_rows", &p.gemm_by_rows));
    FC_RETURN_IF_ERROR(read_table(j, "mem_by_size", &p.mem_by_size));
    num("gemm_bwd_gflops", &p.gemm_bwd_gflops);
    p.gemm_bwd_half_rows = -1;  // absent: the forward's
    num("gemm_bwd_half_rows", &p.gemm_bwd_half_rows);
    num("batched_gflops", &p.batched_gflops);
    num("attention_gflops", &p.attention_gflops);
    num("attention_bwd_gflops", &p.attention_bwd_gflops);
    num("attention_len_exp", &p.attention_len_exp);
    num("mem_gbps", &p.mem_gbps);
    num("mem_bwd_gbps", &p.mem_bwd_gbps);
    num("stream_gbps", &p.stream_gbps);
    num("link_gbps", &p.link_gbps);
    num("link_latency_us", &p.link_latency_us);
    num("train_fwd_factor", &p.train_fwd_factor);
    num("train_bwd_factor", &p.train_bwd_factor);
    num("chunk_overhead_us", &p.chunk_overhead_us);
    num("module_overhead_us", &p.module_overhead_us);
    // A machine we do not have: rates from peaks and efficiencies.
    double peak = 0, bw = 0;
    num("peak_gflops", &peak);
    num("peak_mem_gbps", &bw);
    Efficiency e;
    num("eff_gemm", &e.gemm);
    num("eff_bwd", &e.bwd);
    num("eff_batched", &e.batched);
    num("eff_attention", &e.attention);
    num("eff_attention_bwd", &e.attention_bwd);
    num("eff_mem", &e.mem);
    for (double v : {e.gemm, e.bwd, e.batched, e.attention, e.attention_bwd, e.mem})
      if (!(v > 0 && v <= 1))
        return Status::InvalidArgument("profile: efficiencies (eff_*) must be in (0, 1]");
    if (peak < 0 || bw < 0)
      return Status::InvalidArgument("profile: peak_gflops and peak_mem_gbps must be > 0");
    if (peak > 0) {
      if (p.gemm_gflops == 0) p.gemm_gflops = e.gemm * peak;
      if (p.gemm_bwd_gflops == 0) p.gemm_bwd_gflops = e.bwd * peak;
      if (p.batched_gflops == 0) p.batched_gflops = e.batched * peak;
      if (p.attention_gflops == 0) p.attention_gflops = e.attention * peak;
      if (p.attention_bwd_gflops == 0) p.attention_bwd_gflops = e.attention_bwd * peak;
    }
    if (bw > 0 && p.mem_gbps == 0) p.mem_gbps = e.mem * bw;
    if (p.gemm_bwd_half_rows < 0) p.gemm_bwd_half_rows = p.gemm_half_rows;
    if (p.mem_bwd_gbps == 0) p.mem_bwd_gbps = p.mem_gbps;
    if (p.stream_gbps == 0) p.stream_gbps = p.mem_gbps;
  } catch (const std::exception& e) {
    return Status::InvalidArgument(std::string("profile: bad value: ") + e.what());
  }
  if (p.gemm_gflops == 0)
    return Status::InvalidArgument("profile: give gemm_gflops (calibrated) or peak_gflops");
  if (p.mem_gbps == 0)
    return Status::InvalidArgument("profile: give mem_gbps (calibrated) or peak_mem_gbps");
  FC_RETURN_IF_ERROR(p.validate());
  *out = p;
  return Status::OK();
}

namespace {

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

struct AttentionBench {
  Tensor qkvg, bias, mask, scratch, grad, dqkvg, dbias, bscratch;
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
    scratch = Tensor::empty({kern::attention_scratch_floats(a, threads)});
    dqkvg = Tensor::empty({B * L, ld});
    dbias = Tensor::zeros({H, L, L});
    bscratch = Tensor::empty({kern::attention_backward_scratch_floats(a, threads, true)});
    float* d = dqkvg.f32();
    g.d_out = grad.f32();
    g.dq = d, g.dk = d + H * C, g.dv = d + 2 * H * C, g.dgate = d + 3 * H * C;
    g.d_pair_bias = dbias.f32();
  }
};

double attention_flops(int64_t B, int64_t H, int64_t Lq, int64_t Lk, int64_t C) {
  return 4.0 * B * H * Lq * Lk * C;  // QK^T and PV
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
  // Projections: the rate model 1/rate(M) = (1 + h/M) / R_inf through two row counts.
  const double a = 256, b = 8192;
  const double ra = projection_gflops(static_cast<int64_t>(a), reps);
  const double rb = projection_gflops(static_cast<int64_t>(b), reps);
  double y = (1 / ra - 1 / rb) / (1 / a - 1 / b);
  y = std::max(y, 0.0);
  const double x = 1 / rb - y / b;
  p.gemm_gflops = x > 0 ? 1 / x : rb;
  p.gemm_half_rows = x > 0 ? y / x : 0;
  // The same projections, forward and backward, from 16 to 8192 rows: small training chunks run
  // them on a few rows, where no one-parameter curve through 256 and 8192 holds.
  for (const int64_t rows : {16, 64, 256, 1024, 8192})
    p.gemm_by_rows.push_back({static_cast<double>(rows),
                              rows == 256    ? ra
                              : rows == 8192 ? rb
                                             : projection_gflops(rows, reps),
                              projection_bwd_gflops(rows, reps)});
  {
    // The training triangle multiplication's group projections as src/model/train_pair.cc runs
    // them, at its block shapes (q pairs x 128 inputs -> n = 4 x group outputs, q n = 2^18 for
    // its 2 MiB blocks): forward W X^T below 16 outputs, X W^T then a transpose from 16 up;
    // backward dX = dT^T W and dW = dT X. The fitted n_half serves profiles without the table.
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
      p.narrow_gemm.push_back({static_cast<double>(n), flops / fwd / 1e9, 2 * flops / bwd / 1e9});
    }
    // Per-column times t(n) ~ 1 / rate(n) ~ (n + h) / n between n = 4 and 64:
    // h = a b (rho - 1) / (b - rho a), rho = t(a) / t(b).
    const double na = 4, nb = 64, rho = p.narrow_gemm[4][1] / p.narrow_gemm[0][1];
    p.gemm_half_cols = rho < nb / na ? std::max(0.0, na * nb * (rho - 1) / (nb - rho * na)) : nb;
  }
  {
    // Linear backward (dX and dW, kern::linear_backward) at the same shapes and row counts,
    // fitted to the same rate model.
    const double ba = projection_bwd_gflops(static_cast<int64_t>(a), reps);
    const double bb = projection_bwd_gflops(static_cast<int64_t>(b), reps);
    const double yb = std::max((1 / ba - 1 / bb) / (1 / a - 1 / b), 0.0);
    const double xb = 1 / bb - yb / b;
    p.gemm_bwd_gflops = xb > 0 ? 1 / xb : bb;
    p.gemm_bwd_half_rows = xb > 0 ? yb / xb : 0;
  }
  {
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
    p.batched_gflops = 2.0 * batch * n * n * n / sec / 1e9;
  }
  {
    const int64_t H = 8, C = 32;
    double rate[2] = {0, 0};
    const int64_t lens[2] = {128, 256};
    for (int i = 0; i < 2; ++i) {
      const int64_t L = lens[i], B = 2 * 65536 / (L * 32);
      AttentionBench ab(B, L, H, C, p.threads);
      const double sec =
          best_seconds([&] { kern::attention(ab.a, ab.scratch.f32(), p.threads); }, reps);
      rate[i] = attention_flops(B, H, L, L, C) / sec / 1e9;
      if (L == 256) {
        const double bsec = best_seconds(
            [&] { kern::attention_backward(ab.a, ab.g, ab.bscratch.f32(), p.threads); }, reps);
        p.attention_bwd_gflops = 2.5 * attention_flops(B, H, L, L, C) / bsec / 1e9;
      }
    }
    p.attention_gflops = rate[1];
    p.attention_len_exp = std::log(rate[1] / rate[0]) / std::log(2.0);
  }
  {
    // 16 MiB each way: the size of the chunk buffers that the elementwise passes work on.
    const int64_t rows = 32768, n = 128;
    Tensor xx = Tensor::empty({rows, n}), yy = Tensor::empty({rows, n});
    Tensor gamma = Tensor::full({n}, 1.f), beta = Tensor::zeros({n});
    fill(xx, 1.f);
    const double sec = best_seconds(
        [&] { kern::layernorm(xx.f32(), n, yy.f32(), n, rows, n, gamma.f32(), beta.f32(), 1e-5f); },
        reps);
    p.mem_gbps = 2.0 * rows * n * kF / sec / 1e9;
    // LayerNorm backward (reads x and dy, writes dx) for the backward's memory-bound passes.
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
    p.mem_bwd_gbps = 3.0 * rows * n * kF / bsec / 1e9;
  }
  {
    // 128 MiB each way, 4x a large L3: y += x reads two and writes one DRAM-resident buffer.
    const int64_t rows = 262144, n = 128;
    Tensor xx = Tensor::empty({rows, n}), yy = Tensor::empty({rows, n});
    fill(xx, 1e-3f), fill(yy, 0.f);
    const double sec =
        best_seconds([&] { kern::add_inplace(yy.f32(), n, xx.f32(), n, rows, n); }, 3);
    p.stream_gbps = 3.0 * rows * n * kF / sec / 1e9;
  }
  {
    // LayerNorm forward and backward by working set (in + out = 4, 16, 64, 256 MiB): chunk
    // buffers that the caches (and the TLB) hold run the memory-bound passes 2-4x faster than
    // DRAM-sized ones (this machine, 2 threads: LayerNorm 89 / 66 / 38 / 39 GB/s).
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
      p.mem_by_size.push_back({static_cast<double>(ws), 2.0 * rows * n * kF / fsec / 1e9,
                               3.0 * rows * n * kF / bsec / 1e9});
    }
  }
  {
    // The training step as a whole: one AF2 block at (32, 128), policy none, one chunk per module
    // (fastest of 2 after a warm-up, ~1-2 s). What the kernel classes above miss (the training
    // functions' state writes, per-chunk copies and gathers) is the ratio of measured to
    // modelled forward and backward time at this shape; block_module_costs applies it.
    FC_RETURN_IF_ERROR(p.validate());
    EvoformerConfig cfg;
    cfg.no_blocks = 1;
    const int64_t s = 32, r = 128;
    const EvoformerStack stack = EvoformerStack::random(cfg, 1);
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
    for (const ModuleCost& c : block_module_costs(cfg, s, r, 0, o.chunk_target_bytes, true, p))
      mf += c.forward_ms, mb += c.backward_ms;
    p.train_fwd_factor = fwd / mf;
    p.train_bwd_factor = bwd / mb;
    // The fixed cost of one chunk-loop iteration: the same block at (16, 64), policy module,
    // finest training chunk target (one item, one channel per chunk; ~0.3-1 s): the time the
    // rate model leaves unexplained over the iterations it counts.
    const int64_t s2 = 16, r2 = 64;
    Tensor m1 = Tensor::empty({s2, r2, cfg.c_m}), z1 = Tensor::empty({r2, r2, cfg.c_z});
    Tensor gm1 = Tensor::empty({s2, r2, cfg.c_m}), gz1 = Tensor::empty({r2, r2, cfg.c_z});
    fill(gm1, 0.1f), fill(gz1, 0.1f);
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
    DeviceProfile unit = p;
    unit.chunk_overhead_us = 1;  // 1 us per iteration: the difference counts the iterations
    for (const ModuleCost& c : block_module_costs(cfg, s2, r2, 0, o.chunk_target_bytes, true, p))
      model += 2 * c.forward_ms + c.backward_ms;  // forward, module recompute, backward
    for (const ModuleCost& c : block_module_costs(cfg, s2, r2, 0, o.chunk_target_bytes, true, unit))
      iters += (2 * c.forward_ms + c.backward_ms) * 1e3;
    iters -= model * 1e3;
    p.chunk_overhead_us = iters > 0 ? std::max(0.0, (step - model) * 1e3 / iters) : 0;
  }
  set_num_threads(saved);
  FC_RETURN_IF_ERROR(p.validate());
  *out = p;
  return Status::OK();
}

std::string default_profile_path() {
  std::string base;
  if (const char* x = std::getenv("XDG_CACHE_HOME"); x != nullptr && *x)
    base = x;
  else if (const char* h = std::getenv("HOME"); h != nullptr && *h)
    base = std::string(h) + "/.cache";
  else
    base = "/tmp";
  char host[256] = "localhost";
  gethostname(host, sizeof host - 1);
  // Rates depend on the thread count, so each count has its own calibration.
  return base + "/foldcube/profile-" + host + "-" + std::to_string(num_threads()) + "t.json";
}

Status load_or_calibrate_profile(const std::string& path, bool recalibrate, DeviceProfile* out) {
  const bool local = path.empty();
  const std::string p = local ? default_profile_path() : path;
  if (!recalibrate) {
    std::ifstream f(p);
    if (f) {
      std::stringstream ss;
      ss << f.rdbuf();
      Status st = DeviceProfile::from_json(ss.str(), out);
      if (!st.ok()) return Status::InvalidArgument(p + ": " + st.message());
      return Status::OK();
    }
    if (!local) return Status::NotFound("profile " + p + " not found");
  }
  // A calibration that did not get its cores (other processes running) measures their load, not
  // the machine (seen: every estimate 10x too slow from a profile calibrated at load 15). It is
  // used for this run, marked in its name, and not cached.
  const auto t0 = std::chrono::steady_clock::now();
  const double cpu0 = process_cpu_ms();
  FC_RETURN_IF_ERROR(calibrate_profile(0, out));
  const double wall_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  const double share = (process_cpu_ms() - cpu0) / std::max(wall_ms * out->threads, 1e-9);
  if (local && share < 0.6) {
    char note[96];
    std::snprintf(note, sizeof note, " [busy machine: %.0f %% of %d cores; not cached]",
                  100 * share, out->threads);
    out->name += note;
    return Status::OK();
  }
  std::error_code ec;
  std::filesystem::create_directories(std::filesystem::path(p).parent_path(), ec);
  std::ofstream f(p);
  f << out->to_json() << "\n";
  if (!f) return Status::IOError("cannot write profile " + p);
  return Status::OK();
}

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
