// `foldcube run`: load or generate weights and inputs, run the Evoformer stack, report.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <vector>

#include "commands.h"
#include "core/rng.h"
#include "foldcube/extra_msa.h"
#include "foldcube/io.h"
#include "foldcube/memory.h"
#include "foldcube/model.h"
#include "foldcube/plan.h"
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
    if (weights->metadata.count("c_m"))
      return EvoformerConfig::from_metadata(weights->metadata, cfg);
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

struct Job {
  EvoformerConfig cfg;
  bool extra = false;  // ExtraMSA stack instead of the Evoformer stack
  EvoformerStack stack;
  ExtraMsaStack extra_stack;
  TensorFile ifile;
  Tensor m0, z0, msa_mask, pair_mask;
};

Status setup_job(const RunArgs& a, Job* job) {
  TensorFile wfile;
  if (!a.weights.empty()) FC_RETURN_IF_ERROR(read_safetensors(a.weights, &wfile));
  if (a.stack == "extra_msa") {
    job->extra = true;
  } else if (a.stack == "auto") {
    auto kind = wfile.metadata.find("kind");
    job->extra = kind != wfile.metadata.end() && kind->second == "extra_msa";
  } else if (a.stack != "evoformer") {
    return Status::InvalidArgument("unknown --stack '" + a.stack + "' (evoformer|extra_msa|auto)");
  }
  if (job->extra && a.weights.empty() && a.config.empty()) {
    job->cfg = EvoformerConfig();  // AF2 extra-MSA stack: c_e = 64, 8 heads of 8
    job->cfg.c_m = 64;
    job->cfg.c_hidden_msa_att = 8;
    job->cfg.no_blocks = a.blocks;
  } else {
    FC_RETURN_IF_ERROR(resolve_config(a, a.weights.empty() ? nullptr : &wfile, &job->cfg));
  }
  if (job->extra) {
    if (!a.weights.empty())
      FC_RETURN_IF_ERROR(ExtraMsaStack::load(job->cfg, wfile, &job->extra_stack));
    else
      job->extra_stack = ExtraMsaStack::random(job->cfg, a.seed);
  } else if (!a.weights.empty()) {
    FC_RETURN_IF_ERROR(EvoformerStack::load(job->cfg, wfile, &job->stack));
  } else {
    job->stack = EvoformerStack::random(job->cfg, a.seed);
  }
  if (!a.inputs.empty()) {
    TensorFile& f = job->ifile;
    FC_RETURN_IF_ERROR(read_safetensors(a.inputs, &f));
    FC_RETURN_IF_ERROR(f.get_f32("input.m", {}, &job->m0));
    if (job->m0.ndim() != 3)
      return Status::InvalidArgument("input.m must be [s, r, c_m], got " +
                                     shape_str(job->m0.shape()));
    FC_RETURN_IF_ERROR(f.get_f32("input.z", {}, &job->z0));
    const int64_t s = job->m0.dim(0), r = job->m0.dim(1);
    if (f.has("input.msa_mask"))
      FC_RETURN_IF_ERROR(f.get_f32("input.msa_mask", {s, r}, &job->msa_mask));
    if (f.has("input.pair_mask"))
      FC_RETURN_IF_ERROR(f.get_f32("input.pair_mask", {r, r}, &job->pair_mask));
  } else {
    job->m0 = random_tensor({a.s, a.r, job->cfg.c_m}, a.seed * 2 + 1);
    job->z0 = random_tensor({a.r, a.r, job->cfg.c_z}, a.seed * 2 + 2);
  }
  return Status::OK();
}

int run_training(const RunArgs& a, Job& job);

}  // namespace

int run_command(const RunArgs& a) {
  set_num_threads(a.threads);
  Job job;
  Status st = setup_job(a, &job);
  if (!st.ok()) return fail(st);
  const bool training = a.backward || a.train || !a.grad_outputs.empty() || !a.policy.empty();
  if (job.extra && (training || !a.memory_budget.empty()))
    return fail(Status::InvalidArgument(
        "the ExtraMSA stack runs inference only (no training or --memory-budget yet)"));
  if (training) return run_training(a, job);
  const EvoformerConfig& cfg = job.cfg;
  const EvoformerStack& stack = job.stack;
  TensorFile& ifile = job.ifile;
  Tensor& m0 = job.m0;
  Tensor& z0 = job.z0;
  const Tensor& msa_mask = job.msa_mask;
  const Tensor& pair_mask = job.pair_mask;
  const int64_t s = m0.dim(0), r = m0.dim(1);

  ForwardOptions opts;
  opts.chunk = a.chunk;
  InferencePlan plan;
  int64_t budget = 0;
  if (!a.memory_budget.empty()) {
    Status st = parse_bytes(a.memory_budget, &budget);
    if (st.ok() && a.chunk > 0)
      st = Status::InvalidArgument("--memory-budget chooses the chunk sizes; drop --chunk");
    if (!st.ok()) return fail(st);
    ifile = TensorFile();  // only m0, z0 and the masks stay live
    const int64_t mz = static_cast<int64_t>(m0.nbytes() + z0.nbytes());
    const int64_t base = mem_stats().live_bytes + (a.warmup + a.repeats > 1 ? mz : 0);
    st = plan_inference(cfg, s, r, msa_mask.defined() && pair_mask.defined(), base, budget,
                        num_threads(), &plan);
    if (!st.ok()) return fail(st);
    opts.chunk_target_bytes = plan.chunk_target_bytes;
  }
  std::vector<std::pair<std::string, double>> module_ms;  // in first-seen order
  auto mark = std::chrono::steady_clock::now();
  if (a.profile) {
    opts.trace = [&](int, const std::string& module, const std::string&, const Tensor&) {
      const auto now = std::chrono::steady_clock::now();
      const double ms = std::chrono::duration<double, std::milli>(now - mark).count();
      mark = now;
      auto it = std::find_if(module_ms.begin(), module_ms.end(),
                             [&](const auto& e) { return e.first == module; });
      if (it == module_ms.end())
        module_ms.emplace_back(module, ms);
      else
        it->second += ms;
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
    st = job.extra ? job.extra_stack.forward(m, z, msa_mask, pair_mask, opts)
                   : stack.forward(m, z, msa_mask, pair_mask, &s_out, opts);
    const auto t1 = std::chrono::steady_clock::now();
    if (!st.ok()) return fail(st);
    peak_tracked = std::max(peak_tracked, scope.peak());
    inference_peak = std::max(inference_peak, scope.peak() - scope.start_live() + mz_bytes);
    if (it >= a.warmup) times.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  const double time_ms = median(times);
  // The FLOP formula is the Evoformer block's; the ExtraMSA block's global attention differs.
  const double gflop = job.extra ? 0.0 : evoformer_block_flops(cfg, s, r) * cfg.no_blocks / 1e9;
  const int64_t param_bytes = job.extra ? job.extra_stack.param_bytes() : stack.param_bytes();
  const int64_t rss = peak_rss_bytes();

  if (!a.out.empty()) {
    TensorFile out;
    out.metadata["format"] = "foldcube-output/1";
    out.metadata["config"] = cfg.to_json();
    out.put("output.m", m);
    out.put("output.z", z);
    if (s_out.defined()) out.put("output.s", s_out);
    st = write_safetensors(a.out, out);
    if (!st.ok()) return fail(st);
  }
  if (!a.quiet) {
    std::printf("foldcube run: %s %lld block(s), s=%lld r=%lld c_m=%lld c_z=%lld, %d thread(s)%s\n",
                job.extra ? "ExtraMSA" : "Evoformer", static_cast<long long>(cfg.no_blocks),
                static_cast<long long>(s), static_cast<long long>(r),
                static_cast<long long>(cfg.c_m), static_cast<long long>(cfg.c_z), num_threads(),
                a.weights.empty() ? ", random weights" : "");
    if (gflop > 0)
      std::printf("  time        %10.1f ms  (median of %d; %.1f GFLOP, %.1f GFLOP/s)\n", time_ms,
                  a.repeats, gflop, gflop / (time_ms / 1e3));
    else
      std::printf("  time        %10.1f ms  (median of %d)\n", time_ms, a.repeats);
    std::printf("  tracked peak %9.1f MiB  (all tensors: weights %.1f MiB, inputs, masks, work)\n",
                peak_tracked / 1048576.0, param_bytes / 1048576.0);
    std::printf("  inference   %9.1f MiB  (m+z+workspace = %.2f x bytes of m+z = %.1f MiB)\n",
                inference_peak / 1048576.0, static_cast<double>(inference_peak) / mz_bytes,
                mz_bytes / 1048576.0);
    std::printf("  peak RSS    %9.1f MiB\n", rss / 1048576.0);
    const std::vector<ModuleChunk> chunking =
        forward_chunking(cfg, s, r, opts.chunk, opts.chunk_target_bytes, num_threads(), job.extra);
    for (const auto& [module, ms] : module_ms) {
      std::string chunks;  // "items/length" per chunk loop of the module
      for (const ModuleChunk& c : chunking)
        if (c.module == module)
          chunks += " " + std::to_string(c.items) + "/" + std::to_string(c.length);
      std::printf("    %-20s %9.1f ms   chunks%s\n", module.c_str(), ms, chunks.c_str());
    }
    if (budget > 0)
      std::printf(
          "  budget      %9.1f MiB  (chunk target %.2f MiB; predicted peak %.1f MiB, "
          "measured %.1f MiB)\n",
          budget / 1048576.0, plan.chunk_target_bytes / 1048576.0,
          plan.predicted_peak_bytes / 1048576.0, peak_tracked / 1048576.0);
    if (!a.out.empty()) std::printf("  wrote %s\n", a.out.c_str());
  }
  if (!a.report.empty()) {
    nlohmann::json j;
    j["time_ms"] = time_ms;
    if (budget > 0) {
      j["memory_budget_bytes"] = budget;
      j["chunk_target_bytes"] = plan.chunk_target_bytes;
      j["predicted_peak_bytes"] = plan.predicted_peak_bytes;
    }
    j["times_ms"] = times;
    j["peak_tracked_bytes"] = peak_tracked;
    j["peak_rss_bytes"] = rss;
    j["inference_peak_bytes"] = inference_peak;
    j["param_bytes"] = param_bytes;
    j["stack"] = job.extra ? "extra_msa" : "evoformer";
    j["mz_bytes"] = mz_bytes;
    j["gflop"] = gflop;
    j["gflops_per_s"] = gflop / (time_ms / 1e3);
    j["s"] = s;
    j["r"] = r;
    j["blocks"] = cfg.no_blocks;
    j["threads"] = num_threads();
    j["chunk"] = a.chunk;
    j["chunk_target_bytes_used"] = opts.chunk_target_bytes > 0
                                       ? opts.chunk_target_bytes
                                       : default_chunk_target_bytes(cfg, s, r);
    for (const ModuleChunk& c :
         forward_chunking(cfg, s, r, opts.chunk, opts.chunk_target_bytes, num_threads(), job.extra))
      j["module_chunks"][c.module].push_back(
          {{"axis", c.axis}, {"length", c.length}, {"items", c.items}});
    j["config"] = nlohmann::json::parse(cfg.to_json());
    if (a.profile)
      for (const auto& [module, ms] : module_ms) j["module_ms"][module] = ms;
    std::ofstream f(a.report);
    f << j.dump(2) << "\n";
    if (!f) return fail(Status::IOError("cannot write report " + a.report));
  }
  return 0;
}

namespace {
// Forward + backward (`--backward`, `--grad-outputs`, `--policy`).
int run_training(const RunArgs& a, Job& job) {
  const EvoformerConfig& cfg = job.cfg;
  const int64_t s = job.m0.dim(0), r = job.m0.dim(1);
  TrainOptions opts;
  opts.chunk = a.chunk;
  opts.dropout = a.train;
  opts.seed = a.seed;
  for (size_t p = 0, q; p <= a.policy.size(); p = q + 1) {
    q = a.policy.find(',', p);
    if (q == std::string::npos) q = a.policy.size();
    if (q == p && a.policy.empty()) break;
    Recompute rc;
    Status st = parse_recompute(a.policy.substr(p, q - p), &rc);
    if (!st.ok()) return fail(st);
    opts.policy.push_back(rc);
  }
  Tensor gm, gz;
  if (!a.grad_outputs.empty()) {
    TensorFile g;
    Status st = read_safetensors(a.grad_outputs, &g);
    if (st.ok()) st = g.get_f32("grad.output.m", job.m0.shape(), &gm);
    if (st.ok()) st = g.get_f32("grad.output.z", job.z0.shape(), &gz);
    if (!st.ok()) return fail(st);
  } else {
    gm = random_tensor(job.m0.shape(), a.seed * 2 + 3);
    gz = random_tensor(job.z0.shape(), a.seed * 2 + 4);
  }
  std::vector<double> fwd, bwd, tot;
  TrainResult res;
  Tensor m, z;
  const int passes = a.warmup + a.repeats;
  for (int it = 0; it < passes; ++it) {
    m = it + 1 < passes ? job.m0.clone() : job.m0;
    z = it + 1 < passes ? job.z0.clone() : job.z0;
    if (it + 1 == passes) job.ifile = TensorFile();
    Status st = job.stack.train_step(m, z, job.msa_mask, job.pair_mask, gm, gz, opts, &res);
    if (!st.ok()) return fail(st);
    if (it >= a.warmup) {
      fwd.push_back(res.forward_ms);
      bwd.push_back(res.backward_ms);
      tot.push_back(res.forward_ms + res.backward_ms);
    }
  }
  const int64_t rss = peak_rss_bytes();
  if (!a.out.empty()) {
    TensorFile out;
    out.metadata["format"] = "foldcube-output/1";
    out.metadata["config"] = cfg.to_json();
    out.put("output.m", m);
    out.put("output.z", z);
    out.put("grad.input.m", res.grad_m);
    out.put("grad.input.z", res.grad_z);
    for (const auto& [name, t] : res.grad_params) out.put("grad.param." + name, t);
    Status st = write_safetensors(a.out, out);
    if (!st.ok()) return fail(st);
  }
  std::string policy = opts.policy.empty() ? "none" : "";
  for (size_t i = 0; i < opts.policy.size(); ++i)
    policy += std::string(i ? "," : "") + recompute_name(opts.policy[i]);
  if (!a.quiet) {
    std::printf(
        "foldcube run (training step, %s): Evoformer %lld block(s), s=%lld r=%lld, "
        "policy %s, %d thread(s)\n",
        a.train ? "dropout on" : "eval mode, no dropout", static_cast<long long>(cfg.no_blocks),
        static_cast<long long>(s), static_cast<long long>(r), policy.c_str(), num_threads());
    std::printf("  time        %10.1f ms  (forward %.1f + backward %.1f; median of %d)\n",
                median(tot), median(fwd), median(bwd), a.repeats);
    std::printf("  activations %9.1f MiB  (kept from forward for backward)\n",
                res.activation_bytes / 1048576.0);
    std::printf("  step peak   %9.1f MiB  (tracked, above weights and inputs)\n",
                res.peak_bytes / 1048576.0);
    std::printf("  peak RSS    %9.1f MiB\n", rss / 1048576.0);
    if (!a.out.empty()) std::printf("  wrote %s\n", a.out.c_str());
  }
  if (!a.report.empty()) {
    nlohmann::json j;
    j["time_ms"] = median(tot);
    j["forward_ms"] = median(fwd);
    j["backward_ms"] = median(bwd);
    j["activation_bytes"] = res.activation_bytes;
    j["step_peak_bytes"] = res.peak_bytes;
    j["peak_tracked_bytes"] = mem_stats().peak_bytes;
    j["peak_rss_bytes"] = rss;
    j["policy"] = policy;
    j["s"] = s;
    j["r"] = r;
    j["blocks"] = cfg.no_blocks;
    j["threads"] = num_threads();
    std::ofstream f(a.report);
    f << j.dump(2) << "\n";
    if (!f) return fail(Status::IOError("cannot write report " + a.report));
  }
  return 0;
}
}  // namespace

}  // namespace fc::app
