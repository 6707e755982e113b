// `foldcube run`: load or generate weights and inputs, run the Evoformer stack, report.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <vector>

#include "commands.h"
#include "core/rng.h"
#include "foldcube/io.h"
#include "foldcube/memory.h"
#include "foldcube/model.h"
#include "foldcube/runtime.h"

namespace fc::app {

namespace {
int fail(const Status& st) {
  std::fprintf(stderr, "foldcube: error: %s\n", st.message().c_str());
  return 1;
}

Tensor random_tensor(const Shape& shape, uint64_t seed) {
  Tensor t = Tensor::empty(shape);
  float* p = t.f32();
  const int64_t n = t.numel();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) p[i] = uniform_pm1(seed, i) * 1.7320508f;  // unit variance
  return t;
}

Status resolve_config(const RunArgs& a, const TensorFile* weights, EvoformerConfig* cfg) {
  if (!a.config.empty()) return EvoformerConfig::from_json_file(a.config, cfg);
  if (weights != nullptr) {
    if (weights->metadata.count("c_m")) return EvoformerConfig::from_metadata(weights->metadata, cfg);
    return infer_config_from_weights(*weights, cfg);
  }
  *cfg = EvoformerConfig();
  cfg->no_blocks = a.blocks;
  return cfg->validate();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}
}  // namespace

int run_command(const RunArgs& a) {
  set_num_threads(a.threads);
  TensorFile wfile, ifile;
  if (!a.weights.empty()) {
    Status st = read_safetensors(a.weights, &wfile);
    if (!st.ok()) return fail(st);
  }
  EvoformerConfig cfg;
  Status st = resolve_config(a, a.weights.empty() ? nullptr : &wfile, &cfg);
  if (!st.ok()) return fail(st);

  EvoformerStack stack;
  if (!a.weights.empty()) {
    st = EvoformerStack::load(cfg, wfile, &stack);
    if (!st.ok()) return fail(st);
    wfile = TensorFile();  // the stack holds its own copy
  } else {
    stack = EvoformerStack::random(cfg, a.seed);
  }

  Tensor m0, z0, msa_mask, pair_mask;
  if (!a.inputs.empty()) {
    st = read_safetensors(a.inputs, &ifile);
    if (!st.ok()) return fail(st);
    st = ifile.get_f32("input.m", {}, &m0);
    if (st.ok() && m0.ndim() != 3)
      st = Status::InvalidArgument("input.m must be [s, r, c_m], got " + shape_str(m0.shape()));
    if (st.ok()) st = ifile.get_f32("input.z", {}, &z0);
    if (st.ok() && ifile.has("input.msa_mask"))
      st = ifile.get_f32("input.msa_mask", {m0.dim(0), m0.dim(1)}, &msa_mask);
    if (st.ok() && ifile.has("input.pair_mask"))
      st = ifile.get_f32("input.pair_mask", {m0.dim(1), m0.dim(1)}, &pair_mask);
    if (!st.ok()) return fail(st);
  } else {
    m0 = random_tensor({a.s, a.r, cfg.c_m}, a.seed * 2 + 1);
    z0 = random_tensor({a.r, a.r, cfg.c_z}, a.seed * 2 + 2);
  }
  const int64_t s = m0.dim(0), r = m0.dim(1);

  ForwardOptions opts;
  opts.chunk = a.chunk;
  std::vector<std::pair<std::string, double>> module_ms;  // in first-seen order
  auto mark = std::chrono::steady_clock::now();
  if (a.profile) {
    opts.trace = [&](int, const std::string& module, const std::string&, const Tensor&) {
      const auto now = std::chrono::steady_clock::now();
      const double ms = std::chrono::duration<double, std::milli>(now - mark).count();
      mark = now;
      auto it = std::find_if(module_ms.begin(), module_ms.end(),
                             [&](const auto& e) { return e.first == module; });
      if (it == module_ms.end()) module_ms.emplace_back(module, ms);
      else it->second += ms;
    };
  }
  Tensor m, z, s_out;
  std::vector<double> times;
  int64_t peak_tracked = 0, inference_peak = 0;
  const int64_t mz_bytes = static_cast<int64_t>(m0.nbytes() + z0.nbytes());
  const int passes = a.warmup + a.repeats;
  for (int it = 0; it < passes; ++it) {
    if (it + 1 < passes) {  // keep pristine inputs for the next pass
      m = m0.clone();
      z = z0.clone();
    } else {  // last pass runs on the inputs themselves: no extra copy is live
      m = std::move(m0);
      z = std::move(z0);
      ifile = TensorFile();
    }
    MemoryScope scope;
    module_ms.clear();
    const auto t0 = std::chrono::steady_clock::now();
    mark = t0;
    st = stack.forward(m, z, msa_mask, pair_mask, &s_out, opts);
    const auto t1 = std::chrono::steady_clock::now();
    if (!st.ok()) return fail(st);
    peak_tracked = std::max(peak_tracked, scope.peak());
    inference_peak = std::max(inference_peak, scope.peak() - scope.start_live() + mz_bytes);
    if (it >= a.warmup) times.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  const double time_ms = median(times);
  const double gflop = evoformer_block_flops(cfg, s, r) * cfg.no_blocks / 1e9;
  const int64_t rss = peak_rss_bytes();

  if (!a.out.empty()) {
    TensorFile out;
    out.metadata["format"] = "foldcube-output/1";
    out.metadata["config"] = cfg.to_json();
    out.put("output.m", m);
    out.put("output.z", z);
    out.put("output.s", s_out);
    st = write_safetensors(a.out, out);
    if (!st.ok()) return fail(st);
  }
  if (!a.quiet) {
    std::printf("foldcube run: Evoformer %lld block(s), s=%lld r=%lld c_m=%lld c_z=%lld, %d thread(s)%s\n",
                static_cast<long long>(cfg.no_blocks), static_cast<long long>(s),
                static_cast<long long>(r), static_cast<long long>(cfg.c_m),
                static_cast<long long>(cfg.c_z), num_threads(),
                a.weights.empty() ? ", random weights" : "");
    std::printf("  time        %10.1f ms  (median of %d; %.1f GFLOP, %.1f GFLOP/s)\n", time_ms,
                a.repeats, gflop, gflop / (time_ms / 1e3));
    std::printf("  tracked peak %9.1f MiB  (all tensors: weights %.1f MiB, inputs, masks, work)\n",
                peak_tracked / 1048576.0, stack.param_bytes() / 1048576.0);
    std::printf("  inference   %9.1f MiB  (m+z+workspace = %.2f x bytes of m+z = %.1f MiB)\n",
                inference_peak / 1048576.0, static_cast<double>(inference_peak) / mz_bytes,
                mz_bytes / 1048576.0);
    std::printf("  peak RSS    %9.1f MiB\n", rss / 1048576.0);
    for (const auto& [module, ms] : module_ms)
      std::printf("    %-20s %9.1f ms\n", module.c_str(), ms);
    if (!a.out.empty()) std::printf("  wrote %s\n", a.out.c_str());
  }
  if (!a.report.empty()) {
    nlohmann::json j;
    j["time_ms"] = time_ms;
    j["times_ms"] = times;
    j["peak_tracked_bytes"] = peak_tracked;
    j["peak_rss_bytes"] = rss;
    j["inference_peak_bytes"] = inference_peak;
    j["param_bytes"] = stack.param_bytes();
    j["mz_bytes"] = mz_bytes;
    j["gflop"] = gflop;
    j["gflops_per_s"] = gflop / (time_ms / 1e3);
    j["s"] = s;
    j["r"] = r;
    j["blocks"] = cfg.no_blocks;
    j["threads"] = num_threads();
    j["chunk"] = a.chunk;
    j["config"] = nlohmann::json::parse(cfg.to_json());
    if (a.profile)
      for (const auto& [module, ms] : module_ms) j["module_ms"][module] = ms;
    std::ofstream f(a.report);
    f << j.dump(2) << "\n";
    if (!f) return fail(Status::IOError("cannot write report " + a.report));
  }
  return 0;
}

}  // namespace fc::app
