// `foldcube run`: load or generate weights and inputs, run the Evoformer stack, report.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <vector>

#include "commands.h"
#include "core/rng.h"
#include "dist/comm.h"
#include "exec/dap.h"
#include "exec/dap_train.h"
#include "foldcube/extra_msa.h"
#include "foldcube/io.h"
#include "foldcube/memory.h"
#include "foldcube/model.h"
#include "foldcube/plan.h"
#include "foldcube/runtime.h"
#include "plan/memory_model.h"

namespace fc::app {

namespace {
// The output file of a run: output.m, output.z, output.s (when defined) and, for a training step
// (res non-null), grad.input.* and grad.param.<state_dict name>.
Status write_outputs(const std::string& path, const EvoformerConfig& cfg, const Tensor& m,
                     const Tensor& z, const Tensor& s_out, const TrainResult* res) {
  TensorFile out;
  out.metadata["format"] = "foldcube-output/1";
  out.metadata["config"] = cfg.to_json();
  out.put("output.m", m);
  out.put("output.z", z);
  if (s_out.defined()) out.put("output.s", s_out);
  if (res != nullptr) {
    out.put("grad.input.m", res->grad_m);
    out.put("grad.input.z", res->grad_z);
    for (const auto& [name, t] : res->grad_params) out.put("grad.param." + name, t);
  }
  return write_safetensors(path, out);
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
int run_dap(const RunArgs& a);

}  // namespace

namespace {
// --chunk-target in bytes (0 when not given); a user error when it is malformed or combined with
// --chunk or --memory-budget, which set the chunking themselves.
Status chunk_target_arg(const RunArgs& a, int64_t* out) {
  *out = 0;
  if (a.chunk_target.empty()) return Status::OK();
  if (a.chunk > 0 || !a.memory_budget.empty() || !a.plan.empty())
    return Status::InvalidArgument(
        "--chunk-target sets the chunking; drop --chunk, --memory-budget or --plan");
  return parse_bytes(a.chunk_target, out);
}
int64_t chunk_target_of(const RunArgs& a) {
  int64_t t = 0;
  return chunk_target_arg(a, &t).ok() ? t : 0;
}
}  // namespace

int run_command(const RunArgs& a) {
  if (a.model == "af2") return run_af2(a);
  int64_t chunk_target = 0;
  if (const Status st = chunk_target_arg(a, &chunk_target); !st.ok()) return fail(st);
  if (!a.plan.empty()) return run_planned(a);  // app/plan.cc
  set_num_threads(a.threads);
  if (a.dp > 1 && a.dap == 0)
    return fail(Status::InvalidArgument(
        "--dp D needs --dap N (mpirun -np D*N ... --dp D --dap N; --dap 1 for plain data "
        "parallelism)"));
  if (a.dap > 0 || dist::launched_world_size() > 1) return run_dap(a);
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
  opts.chunk_target_bytes = chunk_target;
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
  std::vector<double> times, cpu_times;  // wall and process CPU ms per timed pass
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
    const double cpu0 = process_cpu_ms();
    const auto t0 = std::chrono::steady_clock::now();
    mark = t0;
    st = job.extra ? job.extra_stack.forward(m, z, msa_mask, pair_mask, opts)
                   : stack.forward(m, z, msa_mask, pair_mask, &s_out, opts);
    const auto t1 = std::chrono::steady_clock::now();
    if (!st.ok()) return fail(st);
    peak_tracked = std::max(peak_tracked, scope.peak());
    inference_peak = std::max(inference_peak, scope.peak() - scope.start_live() + mz_bytes);
    if (it >= a.warmup) {
      times.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
      cpu_times.push_back(process_cpu_ms() - cpu0);
    }
  }
  const double time_ms = median(times);
  // The FLOP formula is the Evoformer block's; the ExtraMSA block's global attention differs.
  const double gflop = job.extra ? 0.0 : evoformer_block_flops(cfg, s, r) * cfg.no_blocks / 1e9;
  const int64_t param_bytes = job.extra ? job.extra_stack.param_bytes() : stack.param_bytes();
  const int64_t rss = peak_rss_bytes();

  if (!a.out.empty()) {
    st = write_outputs(a.out, cfg, m, z, s_out, nullptr);
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
    j["cpu_times_ms"] = cpu_times;
    j["cpu_ms"] = median(cpu_times);
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
  opts.chunk_target_bytes = chunk_target_of(a);
  opts.dropout = a.train;
  opts.seed = a.seed;
  opts.profile = a.profile;
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
  std::vector<ModuleTime> module_ms;  // --profile: summed over the timed passes, then averaged
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
      for (const ModuleTime& t : res.module_ms) {
        auto e = std::find_if(module_ms.begin(), module_ms.end(),
                              [&](const ModuleTime& x) { return x.module == t.module; });
        if (e == module_ms.end()) e = module_ms.insert(module_ms.end(), ModuleTime{t.module});
        e->forward_ms += t.forward_ms / a.repeats;
        e->backward_ms += t.backward_ms / a.repeats;
        e->recompute_ms += t.recompute_ms / a.repeats;
      }
    }
  }
  const int64_t rss = peak_rss_bytes();
  if (!a.out.empty()) {
    const Status st = write_outputs(a.out, cfg, m, z, Tensor(), &res);
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
    if (a.profile) {
      std::printf("  per module (all blocks, mean of %d pass(es)):\n", a.repeats);
      std::printf("    %-20s %12s %12s %12s\n", "module", "forward ms", "backward ms",
                  "recompute ms");
      for (const ModuleTime& t : module_ms)
        std::printf("    %-20s %12.1f %12.1f %12.1f\n", t.module.c_str(), t.forward_ms,
                    t.backward_ms, t.recompute_ms);
    }
    if (!a.out.empty()) std::printf("  wrote %s\n", a.out.c_str());
  }
  if (!a.report.empty()) {
    nlohmann::json j;
    for (const ModuleTime& t : module_ms)
      j["module_ms"][t.module] = {
          {"forward", t.forward_ms}, {"backward", t.backward_ms}, {"recompute", t.recompute_ms}};
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

// Hash of every flag of `run`: ranks of one job must agree on all of them.
uint64_t run_args_hash(const RunArgs& a) {
  std::string k;
  for (const std::string* f :
       {&a.weights, &a.inputs, &a.config, &a.out, &a.report, &a.chunk_target, &a.grad_outputs,
        &a.policy, &a.stack, &a.memory_budget, &a.plan, &a.plan_profile})
    k += *f + '\x1f';
  for (int64_t v :
       {a.s, a.r, a.blocks, static_cast<int64_t>(a.seed), static_cast<int64_t>(a.threads), a.chunk,
        static_cast<int64_t>(a.repeats), static_cast<int64_t>(a.warmup),
        static_cast<int64_t>(a.quiet), static_cast<int64_t>(a.profile),
        static_cast<int64_t>(a.backward), static_cast<int64_t>(a.train),
        static_cast<int64_t>(a.dap), static_cast<int64_t>(a.dp)})
    k += std::to_string(v) + '\x1f';
  uint64_t h = 1469598103934665603ull;  // FNV-1a, 64 bit
  for (unsigned char c : k) h = (h ^ c) * 1099511628211ull;
  return h;
}

namespace {

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  for (size_t p = 0, q; p <= s.size(); p = q + 1) {
    q = s.find(',', p);
    if (q == std::string::npos) q = s.size();
    out.push_back(s.substr(p, q - p));
  }
  return out;
}

Status parse_policy(const std::string& list, std::vector<Recompute>* out) {
  out->clear();
  if (list.empty()) return Status::OK();
  for (const std::string& p : split_list(list)) {
    Recompute rc;
    FC_RETURN_IF_ERROR(parse_recompute(p, &rc));
    out->push_back(rc);
  }
  return Status::OK();
}

// Training under `--dap N [--dp D]`: D DAP groups of N ranks (group g = world ranks g*N ..). The
// root of group g reads protein g (its entry of --inputs / --grad-outputs, or random inputs and
// upstream gradients seeded by --seed + g, as one process with that seed would make them; dropout
// seeded likewise); world rank 0's weights go to every rank. Each group runs dap_train_step; the
// parameter gradients (summed over the group) are averaged over the D groups, as DDP does. World
// rank 0 writes its protein's outputs and input gradients and the averaged parameter gradients.
template <typename Die>
int run_dap_training(const RunArgs& a, const dist::Communicator& world, const Die& die) {
  const int N = a.dap, D = a.dp, me = world.rank(), grp = me / N;
  const dist::Communicator dap = world.dap_group(N), dp = world.dp_group(N);
  const std::vector<std::string> inputs = split_list(a.inputs);
  const std::vector<std::string> gouts = split_list(a.grad_outputs);
  for (const auto* l : {&inputs, &gouts})
    if (l->size() != 1 && static_cast<int>(l->size()) != D) {
      if (me == 0)
        die(Status::InvalidArgument("--inputs and --grad-outputs take one file or --dp (" +
                                    std::to_string(D) + ") comma-separated files, got " +
                                    std::to_string(l->size())));
      world.barrier();
    }
  TrainOptions opts;
  opts.chunk = a.chunk;
  opts.chunk_target_bytes = chunk_target_of(a);
  opts.dropout = a.train;
  opts.seed = a.seed + static_cast<uint64_t>(grp);
  if (const Status st = parse_policy(a.policy, &opts.policy); !st.ok()) {
    if (me == 0) die(st);
    world.barrier();
  }
  Job job;
  Tensor gm, gz;
  if (dap.rank() == 0) {
    RunArgs ga = a;
    ga.inputs = inputs.size() == 1 ? inputs[0] : inputs[grp];
    ga.seed = opts.seed;
    Status st = setup_job(ga, &job);
    if (st.ok() && job.extra)
      st = Status::InvalidArgument("--dap supports the Evoformer stack only");
    const std::string g = gouts.size() == 1 ? gouts[0] : gouts[grp];
    if (st.ok() && !g.empty()) {
      TensorFile f;
      st = read_safetensors(g, &f);
      if (st.ok()) st = f.get_f32("grad.output.m", job.m0.shape(), &gm);
      if (st.ok()) st = f.get_f32("grad.output.z", job.z0.shape(), &gz);
    } else if (st.ok()) {
      gm = random_tensor(job.m0.shape(), ga.seed * 2 + 3);
      gz = random_tensor(job.z0.shape(), ga.seed * 2 + 4);
    }
    if (!st.ok()) die(st);
  }
  if (const Status st = dap_share_stack(world, &job.stack); !st.ok()) die(st);
  const EvoformerConfig& cfg = job.stack.config();

  std::vector<double> fwd, bwd, tot;
  TrainResult res;
  DapTrainStats stats;
  Tensor m, z;
  const int passes = a.warmup + a.repeats;
  for (int it = 0; it < passes; ++it) {
    if (dap.rank() == 0) {
      const bool last = it + 1 == passes;
      m = last ? std::move(job.m0) : job.m0.clone();
      z = last ? std::move(job.z0) : job.z0.clone();
      if (last) job.ifile = TensorFile();
    }
    world.barrier();
    const Status st = dap_train_step(job.stack, dap, m, z, job.msa_mask, job.pair_mask, gm, gz,
                                     opts, &stats, &res);
    if (!st.ok()) die(st);
    if (it >= a.warmup) {
      fwd.push_back(res.forward_ms);
      bwd.push_back(res.backward_ms);
      tot.push_back(res.forward_ms + res.backward_ms);
    }
  }
  if (D > 1) {
    const float inv = 1.f / static_cast<float>(D);
    for (auto& [name, t] : res.grad_params) {
      if (!t.is_contiguous()) die(Status::Internal("gradient " + name + " is not contiguous"));
      dp.all_reduce(t.f32(), t.numel());
      float* p = t.f32();
      for (int64_t i = 0; i < t.numel(); ++i) p[i] *= inv;
    }
  }
  const std::vector<int64_t> act = world.all_gather_i64(stats.activation_bytes);
  const std::vector<int64_t> peak = world.all_gather_i64(stats.peak_bytes);
  const std::vector<int64_t> shard = world.all_gather_i64(stats.shard_bytes);
  const std::vector<int64_t> rss = world.all_gather_i64(peak_rss_bytes());
  // Time inside the blocks' collectives (last pass), forward and backward, in microseconds.
  const std::vector<int64_t> fwd_us =
      world.all_gather_i64(static_cast<int64_t>(stats.forward.total_seconds() * 1e6));
  const std::vector<int64_t> bwd_us = world.all_gather_i64(static_cast<int64_t>(
      (stats.backward.total_seconds() + stats.grad_reduce.total_seconds()) * 1e6));
  if (me == 0) {
    const int64_t s = m.dim(0), r = m.dim(1);
    const DapLayout l = dap_layout(s, r, N, 0);
    std::string policy = opts.policy.empty() ? "none" : "";
    for (size_t i = 0; i < opts.policy.size(); ++i)
      policy += std::string(i ? "," : "") + recompute_name(opts.policy[i]);
    const int64_t nb = std::max<int64_t>(cfg.no_blocks, 1);
    const DapBlockVolume fv = dap_block_volume(cfg, l);
    int64_t bwd_model = 0;
    for (int b = 0; b < cfg.no_blocks; ++b) {
      bwd_model += dap_block_backward_volume(cfg, l, policy_of(opts, b)).total();
    }
    if (!a.out.empty()) {
      const Status st = write_outputs(a.out, cfg, m, z, Tensor(), &res);
      if (!st.ok()) die(st);
    }
    if (!a.quiet) {
      std::printf(
          "foldcube run (training step, %s): Evoformer %lld block(s), s=%lld r=%lld, policy %s, "
          "DAP over %d ranks (padded s=%lld r=%lld)%s, %d thread(s) per rank\n",
          a.train ? "dropout on" : "eval mode, no dropout", static_cast<long long>(cfg.no_blocks),
          static_cast<long long>(s), static_cast<long long>(r), policy.c_str(), N,
          static_cast<long long>(l.s_pad), static_cast<long long>(l.r_pad),
          D > 1 ? (" x " + std::to_string(D) + " data-parallel groups").c_str() : "",
          num_threads());
      std::printf("  time        %10.1f ms  (forward %.1f + backward %.1f; median of %d)\n",
                  median(tot), median(fwd), median(bwd), a.repeats);
      for (int k = 0; k < world.size(); ++k)
        std::printf(
            "  rank %-3d activations %9.1f MiB  step peak %9.1f MiB  (shards of m+z %.1f MiB; "
            "peak RSS %.1f MiB)\n",
            k, act[k] / 1048576.0, peak[k] / 1048576.0, shard[k] / 1048576.0, rss[k] / 1048576.0);
      std::printf(
          "  sent/rank   forward %.3f MiB (model %.3f), backward %.3f MiB (model %.3f), "
          "gradient all-reduce %.3f MiB\n",
          stats.forward.total_bytes() / 1048576.0, nb * fv.total() / 1048576.0,
          stats.backward.total_bytes() / 1048576.0, bwd_model / 1048576.0,
          stats.grad_reduce.total_bytes() / 1048576.0);
      std::printf("  in collectives (last pass, forward + backward): rank 0..%d:",
                  world.size() - 1);
      for (int k = 0; k < world.size(); ++k)
        std::printf(" %.1f+%.1f", fwd_us[k] / 1e3, bwd_us[k] / 1e3);
      std::printf(" ms\n");
      if (!a.out.empty()) std::printf("  wrote %s\n", a.out.c_str());
    }
    if (!a.report.empty()) {
      nlohmann::json j;
      j["time_ms"] = median(tot);
      j["forward_ms"] = median(fwd);
      j["backward_ms"] = median(bwd);
      j["rank_forward_collective_ms"] = nlohmann::json::array();
      j["rank_backward_collective_ms"] = nlohmann::json::array();
      for (int k = 0; k < world.size(); ++k) {
        j["rank_forward_collective_ms"].push_back(fwd_us[k] / 1e3);
        j["rank_backward_collective_ms"].push_back(bwd_us[k] / 1e3);
      }
      j["dap"] = N;
      j["dp"] = D;
      j["policy"] = policy;
      j["activation_bytes"] = act[0];
      j["step_peak_bytes"] = peak[0];
      j["rank_activation_bytes"] = act;
      j["rank_step_peak_bytes"] = peak;
      j["rank_shard_bytes"] = shard;
      j["rank_peak_rss_bytes"] = rss;
      j["forward_sent_bytes_per_rank"] = stats.forward.total_bytes();
      j["forward_sent_bytes_per_rank_model"] = nb * fv.total();
      j["backward_sent_bytes_per_rank"] = stats.backward.total_bytes();
      j["backward_sent_bytes_per_rank_model"] = bwd_model;
      j["grad_all_reduce_bytes_per_rank"] = stats.grad_reduce.total_bytes();
      j["s"] = s;
      j["r"] = r;
      j["s_pad"] = l.s_pad;
      j["r_pad"] = l.r_pad;
      j["blocks"] = cfg.no_blocks;
      j["threads"] = num_threads();
      std::ofstream f(a.report);
      f << j.dump(2) << "\n";
      if (!f) die(Status::IOError("cannot write report " + a.report));
    }
  }
  dist::finalize();
  return 0;
}

// `--dap N` under `mpirun -np N`: rank 0 reads the weights and inputs, every rank runs its shard
// (exec/dap.h), rank 0 writes the outputs and the report. Any error ends the whole job with
// "rank K: <message>" (MPI_Abort), so no rank is left waiting.
int run_dap(const RunArgs& a) {
  const int launched = dist::launched_world_size();
  if (a.dap == 0)
    return fail(Status::InvalidArgument("started by an MPI launcher with " +
                                        std::to_string(launched) + " ranks: pass --dap " +
                                        std::to_string(launched)));
  if (a.dap > 1 || launched > 1) {
    const Status st = dist::init(nullptr, nullptr);
    if (!st.ok()) return fail(st);
  }
  const dist::Communicator comm = dist::Communicator::world();
  const int me = comm.rank();
  auto die = [&](const Status& st) {
    std::fprintf(stderr, "foldcube: error: rank %d: %s\n", me, st.message().c_str());
    dist::abort_job(1);
  };
  const int ranks = a.dap * a.dp;
  if (comm.size() != ranks)
    die(Status::InvalidArgument(
        (a.dp > 1 ? "--dp " + std::to_string(a.dp) + " --dap " + std::to_string(a.dap)
                  : "--dap " + std::to_string(a.dap)) +
        " needs " + std::to_string(ranks) + " MPI ranks, the job has " +
        std::to_string(comm.size()) + " (mpirun -np " + std::to_string(ranks) + ")"));
  if (!comm.all_equal(run_args_hash(a))) {
    // Rank 0 reports; the others wait for its abort.
    if (me == 0)
      die(Status::InvalidArgument(
          "the ranks were started with different command lines; every rank of a --dap job needs "
          "the same flags"));
    comm.barrier();
  }
  const bool training = a.backward || a.train || !a.grad_outputs.empty() || !a.policy.empty();
  if (!a.memory_budget.empty() || a.profile)
    die(Status::InvalidArgument("--dap does not support --memory-budget or --profile yet"));
  if (training) return run_dap_training(a, comm, die);
  if (a.dp > 1)
    die(
        Status::InvalidArgument("--dp is for training (--backward, --train, --grad-outputs or "
                                "--policy); the forward runs one protein"));

  Job job;
  if (me == 0) {
    const Status st = setup_job(a, &job);
    if (!st.ok()) die(st);
    if (job.extra) die(Status::InvalidArgument("--dap supports the Evoformer stack only"));
  }
  Status st = dap_share_stack(comm, &job.stack);
  if (!st.ok()) die(st);
  const EvoformerConfig& cfg = job.stack.config();

  DapOptions opts;
  opts.chunk = a.chunk;
  opts.chunk_target_bytes = chunk_target_of(a);
  DapStats stats;
  std::vector<double> times;
  Tensor m, z, s_out;
  int64_t peak = 0, work_peak = 0;
  const int passes = a.warmup + a.repeats;
  for (int it = 0; it < passes; ++it) {
    if (me == 0) {
      const bool last = it + 1 == passes;
      m = last ? std::move(job.m0) : job.m0.clone();
      z = last ? std::move(job.z0) : job.z0.clone();
      if (last) job.ifile = TensorFile();
    }
    comm.barrier();
    const auto t0 = std::chrono::steady_clock::now();
    st = dap_forward(job.stack, comm, m, z, job.msa_mask, job.pair_mask, &s_out, opts, &stats);
    const auto t1 = std::chrono::steady_clock::now();
    if (!st.ok()) die(st);
    peak = std::max(peak, stats.peak_bytes);
    work_peak = std::max(work_peak, stats.work_peak_bytes);
    if (it >= a.warmup) times.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  const std::vector<int64_t> peaks = comm.all_gather_i64(peak);
  const std::vector<int64_t> work = comm.all_gather_i64(work_peak);
  const std::vector<int64_t> rss = comm.all_gather_i64(peak_rss_bytes());
  const std::vector<int64_t> shard = comm.all_gather_i64(stats.shard_bytes);
  // Time inside the collectives of the blocks (last pass), in microseconds.
  const std::vector<int64_t> comm_us =
      comm.all_gather_i64(static_cast<int64_t>(stats.blocks.total_seconds() * 1e6));
  if (me == 0) {
    const int64_t s = m.dim(0), r = m.dim(1);
    const DapLayout l = dap_layout(s, r, a.dap, 0);
    const DapBlockVolume model = dap_block_volume(cfg, l);
    const double time_ms = median(times);
    const int64_t measured = stats.blocks.total_bytes() / std::max<int64_t>(cfg.no_blocks, 1);
    if (!a.out.empty()) {
      st = write_outputs(a.out, cfg, m, z, s_out, nullptr);
      if (!st.ok()) die(st);
    }
    if (!a.quiet) {
      std::printf(
          "foldcube run: Evoformer %lld block(s), s=%lld r=%lld c_m=%lld c_z=%lld, DAP over %d "
          "ranks (padded s=%lld r=%lld), %d thread(s) per rank%s\n",
          static_cast<long long>(cfg.no_blocks), static_cast<long long>(s),
          static_cast<long long>(r), static_cast<long long>(cfg.c_m),
          static_cast<long long>(cfg.c_z), a.dap, static_cast<long long>(l.s_pad),
          static_cast<long long>(l.r_pad), num_threads(),
          a.weights.empty() ? ", random weights" : "");
      std::printf("  time        %10.1f ms  (median of %d)\n", time_ms, a.repeats);
      for (int k = 0; k < a.dap; ++k)
        std::printf(
            "  rank %-3d tracked peak %9.1f MiB  (%.1f MiB above weights and inputs; shards of m+z "
            "%.1f MiB; peak RSS %.1f MiB)\n",
            k, peaks[k] / 1048576.0, work[k] / 1048576.0, shard[k] / 1048576.0, rss[k] / 1048576.0);
      std::printf(
          "  sent/block  %9.3f MiB per rank  (model %.3f MiB: all-to-all %.3f, all-gather %.3f)\n",
          measured / 1048576.0, model.total() / 1048576.0, model.all_to_all_bytes / 1048576.0,
          model.all_gather_bytes / 1048576.0);
      std::printf("  in collectives (blocks, last pass): rank 0..%d:", a.dap - 1);
      for (int64_t us : comm_us) std::printf(" %.1f", us / 1e3);
      std::printf(" ms\n");
      if (!a.out.empty()) std::printf("  wrote %s\n", a.out.c_str());
    }
    if (!a.report.empty()) {
      nlohmann::json j;
      j["time_ms"] = time_ms;
      j["times_ms"] = times;
      j["dap"] = a.dap;
      j["rank_block_collective_ms"] = nlohmann::json::array();
      for (int64_t us : comm_us) j["rank_block_collective_ms"].push_back(us / 1e3);
      j["peak_tracked_bytes"] = peaks[0];
      j["rank_peak_tracked_bytes"] = peaks;
      j["rank_work_peak_bytes"] = work;
      j["rank_peak_rss_bytes"] = rss;
      j["rank_shard_bytes"] = shard;
      j["peak_rss_bytes"] = rss[0];
      j["block_sent_bytes_per_rank"] = measured;
      j["block_sent_bytes_per_rank_model"] = model.total();
      j["block_all_to_all_bytes_model"] = model.all_to_all_bytes;
      j["block_all_gather_bytes_model"] = model.all_gather_bytes;
      j["s"] = s;
      j["r"] = r;
      j["s_pad"] = l.s_pad;
      j["r_pad"] = l.r_pad;
      j["blocks"] = cfg.no_blocks;
      j["threads"] = num_threads();
      j["chunk"] = a.chunk;
      j["stack"] = "evoformer";
      j["config"] = nlohmann::json::parse(cfg.to_json());
      std::ofstream f(a.report);
      f << j.dump(2) << "\n";
      if (!f) die(Status::IOError("cannot write report " + a.report));
    }
  }
  dist::finalize();
  return 0;
}
}  // namespace

}  // namespace fc::app
