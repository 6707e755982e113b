// `foldcube run`: flags to a library job (foldcube/runner.h, foldcube/parallel.h), then the
// human summary, the JSON report and the exit code. Everything that runs lives in the library.
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <vector>

#include "commands.h"
#include "foldcube/memory.h"
#include "foldcube/model.h"
#include "foldcube/parallel.h"
#include "foldcube/plan.h"
#include "foldcube/runner.h"
#include "foldcube/runtime.h"
#include "io/param_names.h"
#include "plan/memory_model.h"

namespace fc::app {

namespace {
double mib(int64_t b) { return b / 1048576.0; }

bool is_training(const RunArgs& a) {
  return a.backward || a.train || !a.grad_outputs.empty() || !a.policy.empty();
}

Status write_report(const std::string& path, const nlohmann::json& j) {
  std::ofstream f(path);
  f << j.dump(2) << "\n";
  if (!f) return Status::IOError("cannot write report " + path);
  return Status::OK();
}

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

JobSpec job_spec(const RunArgs& a) {
  JobSpec spec;
  spec.weights = a.weights;
  spec.inputs = a.inputs;
  spec.config = a.config;
  spec.stack = a.stack;
  spec.grad_outputs = a.grad_outputs;
  spec.s = a.s;
  spec.r = a.r;
  spec.blocks = a.blocks;
  spec.seed = a.seed;
  return spec;
}

// The run's options from the flags (chunking, budget, passes, training policy and dropout).
Status run_options(const RunArgs& a, RunOptions* o) {
  FC_RETURN_IF_ERROR(chunk_target_arg(a, &o->chunk_target_bytes));
  o->chunk = a.chunk;
  o->warmup = a.warmup;
  o->repeats = a.repeats;
  o->profile = a.profile;
  o->fused = !a.unfused;
  FC_RETURN_IF_ERROR(parse_compute_dtype(a.dtype, &o->dtype));
  o->dropout = a.train;
  o->seed = a.seed;
  if (!a.memory_budget.empty()) FC_RETURN_IF_ERROR(parse_bytes(a.memory_budget, &o->memory_budget));
  return parse_policy(a.policy, &o->policy);
}

// ---- One process: forward --------------------------------------------------------------------
void print_forward(const RunArgs& a, const RunOptions& o, const Job& job, const ForwardReport& f) {
  const EvoformerConfig& cfg = job.cfg;
  const bool extra = job.kind == StackKind::kExtraMsa;
  const int64_t s = f.m.dim(0), r = f.m.dim(1);
  std::printf("foldcube run: %s %lld block(s), s=%lld r=%lld c_m=%lld c_z=%lld, %d thread(s)%s%s\n",
              extra ? "ExtraMSA" : "Evoformer", static_cast<long long>(cfg.no_blocks),
              static_cast<long long>(s), static_cast<long long>(r), static_cast<long long>(cfg.c_m),
              static_cast<long long>(cfg.c_z), num_threads(),
              a.weights.empty() ? ", random weights" : "",
              o.dtype == DType::BF16 ? ", bf16 GEMM inputs" : (o.fused ? "" : ", unfused"));
  if (f.gflop > 0)
    std::printf("  time        %10.1f ms  (median of %d; %.1f GFLOP, %.1f GFLOP/s)\n", f.time_ms,
                a.repeats, f.gflop, f.gflop / (f.time_ms / 1e3));
  else
    std::printf("  time        %10.1f ms  (median of %d)\n", f.time_ms, a.repeats);
  std::printf("  tracked peak %9.1f MiB  (all tensors: weights %.1f MiB, inputs, masks, work)\n",
              mib(f.peak_tracked_bytes), mib(f.param_bytes));
  std::printf("  inference   %9.1f MiB  (m+z+workspace = %.2f x bytes of m+z = %.1f MiB)\n",
              mib(f.inference_peak_bytes), static_cast<double>(f.inference_peak_bytes) / f.mz_bytes,
              mib(f.mz_bytes));
  std::printf("  peak RSS    %9.1f MiB\n", mib(f.peak_rss_bytes));
  for (size_t k = 0; k < f.module_ms.size(); ++k) {
    const auto& [module, ms] = f.module_ms[k];
    const double cpu = k < f.module_cpu_ms.size() ? f.module_cpu_ms[k].second : 0.0;
    std::string chunks;  // "items/length" per chunk loop of the module
    for (const ModuleChunk& c : f.chunking)
      if (c.module == module)
        chunks.append(" ")
            .append(std::to_string(c.items))
            .append("/")
            .append(std::to_string(c.length));
    std::printf("    %-20s %9.1f ms  (CPU %9.1f ms)  chunks%s\n", module.c_str(), ms, cpu,
                chunks.c_str());
  }
  if (o.memory_budget > 0)
    std::printf(
        "  budget      %9.1f MiB  (chunk target %.2f MiB; predicted peak %.1f MiB, "
        "measured %.1f MiB)\n",
        mib(o.memory_budget), mib(f.plan.chunk_target_bytes), mib(f.plan.predicted_peak_bytes),
        mib(f.peak_tracked_bytes));
  if (!a.out.empty()) std::printf("  wrote %s\n", a.out.c_str());
}

nlohmann::json forward_report_json(const RunArgs& a, const RunOptions& o, const Job& job,
                                   const ForwardReport& f) {
  const EvoformerConfig& cfg = job.cfg;
  nlohmann::json j;
  j["time_ms"] = f.time_ms;
  const char* wait = std::getenv("OMP_WAIT_POLICY");
  j["omp_wait_policy"] = wait ? wait : "";
  if (o.memory_budget > 0) {
    j["memory_budget_bytes"] = o.memory_budget;
    j["chunk_target_bytes"] = f.plan.chunk_target_bytes;
    j["predicted_peak_bytes"] = f.plan.predicted_peak_bytes;
  }
  j["times_ms"] = f.times_ms;
  j["cpu_times_ms"] = f.cpu_times_ms;
  j["cpu_ms"] = f.cpu_ms;
  j["peak_tracked_bytes"] = f.peak_tracked_bytes;
  j["peak_rss_bytes"] = f.peak_rss_bytes;
  j["inference_peak_bytes"] = f.inference_peak_bytes;
  j["param_bytes"] = f.param_bytes;
  j["stack"] = stack_kind_name(job.kind);
  j["mz_bytes"] = f.mz_bytes;
  j["gflop"] = f.gflop;
  j["gflops_per_s"] = f.gflop / (f.time_ms / 1e3);
  j["s"] = f.m.dim(0);
  j["r"] = f.m.dim(1);
  j["blocks"] = cfg.no_blocks;
  j["threads"] = num_threads();
  j["chunk"] = a.chunk;
  j["fused"] = o.fused;
  j["dtype"] = o.dtype == DType::BF16 ? "bf16" : "fp32";
  j["chunk_target_bytes_used"] = f.chunk_target_bytes_used;
  for (const ModuleChunk& c : f.chunking)
    j["module_chunks"][c.module].push_back(
        {{"axis", c.axis}, {"length", c.length}, {"items", c.items}});
  j["config"] = nlohmann::json::parse(cfg.to_json());
  if (a.profile)
    for (const auto& [module, ms] : f.module_ms) j["module_ms"][module] = ms;
  for (const auto& [module, ms] : f.module_cpu_ms) j["module_cpu_ms"][module] = ms;
  return j;
}

int forward_command(const RunArgs& a, const RunOptions& o, Job& job) {
  ForwardReport f;
  Status st = run_forward(&job, o, &f);
  if (st.ok() && !a.out.empty()) st = write_outputs(a.out, job.cfg, f.m, f.z, f.s_out, nullptr);
  if (!st.ok()) return fail(st);
  if (!a.quiet) print_forward(a, o, job, f);
  if (!a.report.empty()) {
    st = write_report(a.report, forward_report_json(a, o, job, f));
    if (!st.ok()) return fail(st);
  }
  return 0;
}

// The memory model's activation and step-peak bytes of this step (exact without dropout).
std::pair<int64_t, int64_t> training_model_bytes(const RunOptions& o, const Job& job,
                                                 const TrainReport& t) {
  const bool extra = job.kind == StackKind::kExtraMsa;
  const int64_t s = t.m.dim(0), r = t.m.dim(1), nb = job.cfg.no_blocks;
  return {stack_activation_bytes(job.cfg, s, r, nb, o.policy, 4, o.chunk, o.chunk_target_bytes,
                                 extra, o.dtype),
          stack_step_peak_bytes(job.cfg, s, r, nb, o.policy, num_threads(), 4, o.chunk,
                                o.chunk_target_bytes, extra, o.dtype)};
}

// ---- One process: training step (--backward, --grad-outputs, --policy, --train) --------------
void print_training(const RunArgs& a, const RunOptions& o, const Job& job, const TrainReport& t) {
  std::printf(
      "foldcube run (training step, %s%s): %s %lld block(s), s=%lld r=%lld, "
      "policy %s, %d thread(s)\n",
      a.train ? "dropout on" : "eval mode, no dropout",
      o.dtype == DType::BF16 ? ", bf16 kept inputs" : "",
      job.kind == StackKind::kExtraMsa ? "ExtraMSA" : "Evoformer",
      static_cast<long long>(job.cfg.no_blocks), static_cast<long long>(t.m.dim(0)),
      static_cast<long long>(t.m.dim(1)), policy_string(o.policy).c_str(), num_threads());
  std::printf("  time        %10.1f ms  (forward %.1f + backward %.1f; median of %d)\n",
              median(t.total_ms), median(t.forward_ms), median(t.backward_ms), a.repeats);
  const auto [act_model, peak_model] = training_model_bytes(o, job, t);
  std::printf("  activations %9.1f MiB  (kept from forward for backward; memory model %.1f MiB)\n",
              mib(t.result.activation_bytes), mib(act_model));
  std::printf(
      "  step peak   %9.1f MiB  (tracked, above weights and inputs; memory model %.1f MiB)\n",
      mib(t.result.peak_bytes), mib(peak_model));
  std::printf("  peak RSS    %9.1f MiB\n", mib(t.peak_rss_bytes));
  if (a.profile) {
    std::printf("  per module (all blocks, mean of %d pass(es)):\n", a.repeats);
    std::printf("    %-20s %12s %12s %12s\n", "module", "forward ms", "backward ms",
                "recompute ms");
    for (const ModuleTime& m : t.module_ms)
      std::printf("    %-20s %12.1f %12.1f %12.1f\n", m.module.c_str(), m.forward_ms, m.backward_ms,
                  m.recompute_ms);
  }
  if (!a.out.empty()) std::printf("  wrote %s\n", a.out.c_str());
}

nlohmann::json training_report_json(const RunOptions& o, const Job& job, const TrainReport& t) {
  nlohmann::json j;
  const auto [act_model, peak_model] = training_model_bytes(o, job, t);
  j["activation_bytes_model"] = act_model;
  j["step_peak_bytes_model"] = peak_model;
  for (const ModuleTime& m : t.module_ms)
    j["module_ms"][m.module] = {
        {"forward", m.forward_ms}, {"backward", m.backward_ms}, {"recompute", m.recompute_ms}};
  j["time_ms"] = median(t.total_ms);
  j["forward_ms"] = median(t.forward_ms);
  j["backward_ms"] = median(t.backward_ms);
  j["cpu_ms"] = median(t.cpu_ms);
  j["activation_bytes"] = t.result.activation_bytes;
  j["step_peak_bytes"] = t.result.peak_bytes;
  j["peak_tracked_bytes"] = t.peak_tracked_bytes;
  j["peak_rss_bytes"] = t.peak_rss_bytes;
  j["policy"] = policy_string(o.policy);
  j["dtype"] = o.dtype == DType::BF16 ? "bf16" : "fp32";
  j["stack"] = stack_kind_name(job.kind);
  j["s"] = t.m.dim(0);
  j["r"] = t.m.dim(1);
  j["blocks"] = job.cfg.no_blocks;
  j["threads"] = num_threads();
  return j;
}

int training_command(const RunArgs& a, const RunOptions& o, const JobSpec& spec, Job& job) {
  Tensor gm, gz, gs;  // dL/d output.m, output.z, output.s (undefined: zero)
  Status st = load_grad_outputs(spec, job, &gm, &gz, &gs);
  TrainReport t;
  if (st.ok()) st = run_training(&job, gm, gz, gs, o, &t);
  if (st.ok() && !a.out.empty())
    st = write_outputs(a.out, job.cfg, t.m, t.z, t.result.s, &t.result);
  if (!st.ok()) return fail(st);
  if (!a.quiet) print_training(a, o, job, t);
  if (!a.report.empty()) {
    st = write_report(a.report, training_report_json(o, job, t));
    if (!st.ok()) return fail(st);
  }
  return 0;
}

// ---- DAP / DP under mpirun -------------------------------------------------------------------

void print_dap_forward(const RunArgs& a, const DapForwardReport& d) {
  const EvoformerConfig& cfg = d.cfg;
  std::printf(
      "foldcube run: %s %lld block(s), s=%lld r=%lld c_m=%lld c_z=%lld, DAP over %d "
      "ranks (padded s=%lld r=%lld), %d thread(s) per rank%s\n",
      d.kind == StackKind::kExtraMsa ? "ExtraMSA" : "Evoformer",
      static_cast<long long>(cfg.no_blocks), static_cast<long long>(d.s),
      static_cast<long long>(d.r), static_cast<long long>(cfg.c_m), static_cast<long long>(cfg.c_z),
      a.dap, static_cast<long long>(d.s_pad), static_cast<long long>(d.r_pad), num_threads(),
      a.weights.empty() ? ", random weights" : "");
  std::printf("  time        %10.1f ms  (median of %d)\n", d.time_ms, a.repeats);
  for (int k = 0; k < a.dap; ++k)
    std::printf(
        "  rank %-3d tracked peak %9.1f MiB  (%.1f MiB above weights and inputs; shards of m+z "
        "%.1f MiB; peak RSS %.1f MiB)\n",
        k, mib(d.rank_peak_tracked_bytes[k]), mib(d.rank_work_peak_bytes[k]),
        mib(d.rank_shard_bytes[k]), mib(d.rank_peak_rss_bytes[k]));
  std::printf(
      "  sent/block  %9.3f MiB per rank  (model %.3f MiB: all-to-all %.3f, all-gather %.3f)\n",
      mib(d.block_sent_bytes), mib(d.block_sent_bytes_model), mib(d.block_all_to_all_bytes_model),
      mib(d.block_all_gather_bytes_model));
  std::printf("  in collectives (blocks, last pass): rank 0..%d:", a.dap - 1);
  for (double ms : d.rank_block_collective_ms) std::printf(" %.1f", ms);
  std::printf(" ms\n");
  if (!a.out.empty()) std::printf("  wrote %s\n", a.out.c_str());
}

nlohmann::json dap_forward_report_json(const RunArgs& a, const DapForwardReport& d) {
  nlohmann::json j;
  j["time_ms"] = d.time_ms;
  j["times_ms"] = d.times_ms;
  j["dap"] = a.dap;
  j["dtype"] = a.dtype;
  j["rank_block_collective_ms"] = d.rank_block_collective_ms;
  j["peak_tracked_bytes"] = d.rank_peak_tracked_bytes[0];
  j["rank_peak_tracked_bytes"] = d.rank_peak_tracked_bytes;
  j["rank_work_peak_bytes"] = d.rank_work_peak_bytes;
  j["rank_peak_rss_bytes"] = d.rank_peak_rss_bytes;
  j["rank_shard_bytes"] = d.rank_shard_bytes;
  j["peak_rss_bytes"] = d.rank_peak_rss_bytes[0];
  j["block_sent_bytes_per_rank"] = d.block_sent_bytes;
  j["block_sent_bytes_per_rank_model"] = d.block_sent_bytes_model;
  j["block_all_to_all_bytes_model"] = d.block_all_to_all_bytes_model;
  j["block_all_gather_bytes_model"] = d.block_all_gather_bytes_model;
  j["s"] = d.s;
  j["r"] = d.r;
  j["s_pad"] = d.s_pad;
  j["r_pad"] = d.r_pad;
  j["blocks"] = d.cfg.no_blocks;
  j["threads"] = num_threads();
  j["chunk"] = a.chunk;
  j["stack"] = stack_kind_name(d.kind);
  j["config"] = nlohmann::json::parse(d.cfg.to_json());
  return j;
}

// `--dap N` inference: rank 0 reads the files and writes the outputs and the report.
Status dap_forward_command(const RunArgs& a, const RunOptions& o, const Comm& world) {
  if (a.dp > 1)
    return Status::InvalidArgument(
        "--dp is for training (--backward, --train, --grad-outputs or --policy); the forward runs "
        "one protein");
  DapForwardReport d;
  FC_RETURN_IF_ERROR(run_dap(world, job_spec(a), o, &d));
  Status st;
  if (world.rank() == 0) {
    if (!a.out.empty()) st = write_outputs(a.out, d.cfg, d.m, d.z, d.s_out, nullptr);
    if (st.ok() && !a.quiet) print_dap_forward(a, d);
    if (st.ok() && !a.report.empty()) st = write_report(a.report, dap_forward_report_json(a, d));
  }
  return world.agree(st, true);
}

void print_dap_training(const RunArgs& a, const RunOptions& o, const DapTrainReport& t, int ranks) {
  const int D = a.dp;
  std::printf(
      "foldcube run (training step, %s): %s %lld block(s), s=%lld r=%lld, policy %s, "
      "DAP over %d ranks (padded s=%lld r=%lld)%s, %d thread(s) per rank\n",
      a.train ? "dropout on" : "eval mode, no dropout",
      t.kind == StackKind::kExtraMsa ? "ExtraMSA" : "Evoformer",
      static_cast<long long>(t.cfg.no_blocks), static_cast<long long>(t.s),
      static_cast<long long>(t.r), policy_string(o.policy).c_str(), a.dap,
      static_cast<long long>(t.s_pad), static_cast<long long>(t.r_pad),
      D > 1 ? (" x " + std::to_string(D) + " data-parallel groups").c_str() : "", num_threads());
  std::printf("  time        %10.1f ms  (forward %.1f + backward %.1f; median of %d)\n",
              median(t.total_ms), median(t.forward_ms), median(t.backward_ms), a.repeats);
  for (int k = 0; k < ranks; ++k)
    std::printf(
        "  rank %-3d activations %9.1f MiB  step peak %9.1f MiB  (shards of m+z %.1f MiB; "
        "peak RSS %.1f MiB)\n",
        k, mib(t.rank_activation_bytes[k]), mib(t.rank_step_peak_bytes[k]),
        mib(t.rank_shard_bytes[k]), mib(t.rank_peak_rss_bytes[k]));
  std::printf(
      "  sent/rank   forward %.3f MiB (model %.3f), backward %.3f MiB (model %.3f), "
      "gradient all-reduce %.3f MiB\n",
      mib(t.forward_sent_bytes), mib(t.forward_sent_bytes_model), mib(t.backward_sent_bytes),
      mib(t.backward_sent_bytes_model), mib(t.grad_all_reduce_bytes));
  std::printf("  in collectives (last pass, forward + backward): rank 0..%d:", ranks - 1);
  for (int k = 0; k < ranks; ++k)
    std::printf(" %.1f+%.1f", t.rank_forward_collective_ms[k], t.rank_backward_collective_ms[k]);
  std::printf(" ms\n");
  if (!a.out.empty()) std::printf("  wrote %s\n", a.out.c_str());
}

nlohmann::json dap_training_report_json(const RunArgs& a, const RunOptions& o,
                                        const DapTrainReport& t) {
  nlohmann::json j;
  j["stack"] = stack_kind_name(t.kind);
  j["time_ms"] = median(t.total_ms);
  j["forward_ms"] = median(t.forward_ms);
  j["backward_ms"] = median(t.backward_ms);
  j["rank_forward_collective_ms"] = t.rank_forward_collective_ms;
  j["rank_backward_collective_ms"] = t.rank_backward_collective_ms;
  j["dap"] = a.dap;
  j["dp"] = a.dp;
  j["policy"] = policy_string(o.policy);
  j["dtype"] = o.dtype == DType::BF16 ? "bf16" : "fp32";
  j["activation_bytes"] = t.rank_activation_bytes[0];
  j["step_peak_bytes"] = t.rank_step_peak_bytes[0];
  j["rank_activation_bytes"] = t.rank_activation_bytes;
  j["rank_step_peak_bytes"] = t.rank_step_peak_bytes;
  j["rank_shard_bytes"] = t.rank_shard_bytes;
  j["rank_peak_rss_bytes"] = t.rank_peak_rss_bytes;
  j["forward_sent_bytes_per_rank"] = t.forward_sent_bytes;
  j["forward_sent_bytes_per_rank_model"] = t.forward_sent_bytes_model;
  j["backward_sent_bytes_per_rank"] = t.backward_sent_bytes;
  j["backward_sent_bytes_per_rank_model"] = t.backward_sent_bytes_model;
  j["grad_all_reduce_bytes_per_rank"] = t.grad_all_reduce_bytes;
  j["s"] = t.s;
  j["r"] = t.r;
  j["s_pad"] = t.s_pad;
  j["r_pad"] = t.r_pad;
  j["blocks"] = t.cfg.no_blocks;
  j["threads"] = num_threads();
  return j;
}

// Training under `--dap N [--dp D]` (run_dap_training): world rank 0 writes its protein's outputs
// and input gradients and the averaged parameter gradients.
Status dap_training_command(const RunArgs& a, const RunOptions& o, const Comm& world) {
  DapTrainReport t;
  FC_RETURN_IF_ERROR(run_dap_training(world, a.dap, a.dp, job_spec(a), o, &t));
  Status st;
  if (world.rank() == 0) {
    if (!a.out.empty()) st = write_outputs(a.out, t.cfg, t.m, t.z, t.result.s, &t.result);
    if (st.ok() && !a.quiet) print_dap_training(a, o, t, world.size());
    if (st.ok() && !a.report.empty())
      st = write_report(a.report, dap_training_report_json(a, o, t));
  }
  return world.agree(st, true);
}

// The flags every rank checks before the job: rank count, identical command lines, options.
Status check_dap_flags(const RunArgs& a, const Comm& world, RunOptions* o) {
  FC_RETURN_IF_ERROR(check_dap_ranks(a, world));
  FC_RETURN_IF_ERROR(check_same_flags(a, world, "--dap"));
  if (!a.memory_budget.empty() || a.profile)
    return Status::InvalidArgument("--dap does not support --memory-budget or --profile yet");
  FC_RETURN_IF_ERROR(run_options(a, o));
  if (o->dtype == DType::BF16 && !o->fused)
    return Status::InvalidArgument("--dtype bf16 runs the fused path; drop --unfused");
  return Status::OK();
}

// `--dap N` under `mpirun -np N` (x D with --dp D): any rank's error ends every rank with
// "rank K: <message>" printed once.
int dap_command(const RunArgs& a) {
  if (const Status st = start_dap_mpi(a); !st.ok()) return fail(st);
  const Comm world = Comm::world();
  RunOptions o;
  Status st = world.agree(check_dap_flags(a, world, &o), true);
  if (st.ok())
    st = is_training(a) ? dap_training_command(a, o, world) : dap_forward_command(a, o, world);
  return end_mpi(world, st);
}
}  // namespace

Status check_dap_ranks(const RunArgs& a, const Comm& world) {
  const int ranks = a.dap * a.dp;
  if (world.size() == ranks) return Status::OK();
  return Status::InvalidArgument(
      (a.dp > 1 ? "--dp " + std::to_string(a.dp) + " --dap " + std::to_string(a.dap)
                : "--dap " + std::to_string(a.dap)) +
      " needs " + std::to_string(ranks) + " MPI ranks, the job has " +
      std::to_string(world.size()) + " (mpirun -np " + std::to_string(ranks) + ")");
}

Status check_same_flags(const RunArgs& a, const Comm& world, const char* job) {
  if (world.all_equal(run_args_hash(a))) return Status::OK();
  return Status::InvalidArgument(
      std::string("the ranks were started with different command lines; every rank of a ") + job +
      " job needs the same flags");
}

Status start_dap_mpi(const RunArgs& a) {
  const int launched = mpi_launched_world_size();
  if (a.dap == 0)
    return Status::InvalidArgument("started by an MPI launcher with " + std::to_string(launched) +
                                   " ranks: pass --dap " + std::to_string(launched));
  return a.dap > 1 || launched > 1 ? mpi_init() : Status::OK();
}

int end_mpi(const Comm& world, const Status& st) {
  if (!st.ok() && world.rank() == 0) fail(st);
  mpi_finalize();
  return st.ok() ? 0 : 1;
}

int run_command(const RunArgs& a) {
  if (a.dtype != "fp32" && is_training(a) && a.model == "af2")
    return fail(Status::InvalidArgument(
        "--dtype bf16 with --backward/--train: the stacks only (Evoformer, ExtraMSA, Pairformer, "
        "MSA module), not the whole AF2 model"));
  if (a.model == "af2") return run_af2(a);
  if (is_af3_run(a)) return run_af3(a);
  int64_t chunk_target = 0;
  if (const Status st = chunk_target_arg(a, &chunk_target); !st.ok()) return fail(st);
  if (!a.plan.empty()) return run_planned(a);  // app/plan.cc
  set_num_threads(a.threads);
  if (a.dp > 1 && a.dap == 0)
    return fail(Status::InvalidArgument(
        "--dp D needs --dap N (mpirun -np D*N ... --dp D --dap N; --dap 1 for plain data "
        "parallelism)"));
  if (a.dap > 0 || mpi_launched_world_size() > 1) return dap_command(a);
  const JobSpec spec = job_spec(a);
  Job job;
  Status st = load_job(spec, &job);
  if (!st.ok()) return fail(st);
  const bool training = is_training(a);
  if (job.kind == StackKind::kExtraMsa && !a.memory_budget.empty())
    return fail(Status::InvalidArgument("--memory-budget is not supported for the ExtraMSA stack"));
  RunOptions o;
  st = run_options(a, &o);
  if (!st.ok()) return fail(st);
  return training ? training_command(a, o, spec, job) : forward_command(a, o, job);
}

// Hash of every flag of `run`: ranks of one job must agree on all of them.
uint64_t run_args_hash(const RunArgs& a) {
  std::string k;
  for (const std::string* f : {&a.weights, &a.inputs, &a.config, &a.out, &a.report, &a.chunk_target,
                               &a.grad_outputs, &a.policy, &a.stack, &a.memory_budget, &a.plan,
                               &a.plan_profile, &a.model, &a.features, &a.dtype})
    k += *f + '\x1f';
  for (int64_t v :
       {a.s, a.r, a.blocks, static_cast<int64_t>(a.seed), static_cast<int64_t>(a.threads), a.chunk,
        static_cast<int64_t>(a.repeats), static_cast<int64_t>(a.warmup),
        static_cast<int64_t>(a.quiet), static_cast<int64_t>(a.profile),
        static_cast<int64_t>(a.backward), static_cast<int64_t>(a.train),
        static_cast<int64_t>(a.dap), static_cast<int64_t>(a.dp), static_cast<int64_t>(a.unfused),
        static_cast<int64_t>(a.recycles), a.extra, a.templates,
        static_cast<int64_t>(a.replicate_weights)})
    k += std::to_string(v) + '\x1f';
  k += std::to_string(a.recycle_tolerance);
  uint64_t h = 1469598103934665603ull;  // FNV-1a, 64 bit
  for (unsigned char c : k) h = (h ^ c) * 1099511628211ull;
  return h;
}

}  // namespace fc::app
