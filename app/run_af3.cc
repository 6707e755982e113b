// `foldcube run --stack pairformer|msa_module`: an AF3 trunk stack (Boltz state dict) on one
// process; the library call is af3_run (foldcube/af3.h).
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "exec/af3_dap.h"
#include "foldcube/af3.h"
#include "foldcube/memory.h"
#include "foldcube/parallel.h"
#include "foldcube/plan.h"
#include "foldcube/planner.h"
#include "foldcube/runtime.h"
#include "model/block_table.h"
#include "plan/table_cost.h"

namespace fc::app {

namespace {
Status af3_spec(const RunArgs& a, Af3RunSpec* spec) {
  if (a.dp > 1 || !a.plan.empty())
    return Status::InvalidArgument("the AF3 stacks run without --dp or --plan yet");
  if (!a.memory_budget.empty())
    FC_RETURN_IF_ERROR(parse_bytes(a.memory_budget, &spec->memory_bytes));
  spec->stack = a.stack;
  spec->weights = a.weights;
  spec->inputs = a.inputs;
  spec->training = a.train || a.backward || !a.grad_outputs.empty() || !a.policy.empty();
  spec->dropout = a.train;
  spec->grad_outputs = a.grad_outputs;
  spec->n = a.r;
  spec->n_msa = a.s;
  spec->blocks = a.blocks;
  spec->seed = a.seed;
  spec->repeats = std::max(a.repeats, 1);
  spec->chunk = a.chunk;
  FC_RETURN_IF_ERROR(parse_compute_dtype(a.dtype, &spec->dtype));
  if (!a.chunk_target.empty())
    FC_RETURN_IF_ERROR(parse_bytes(a.chunk_target, &spec->chunk_target_bytes));
  for (const std::string& p : split(a.policy, ',')) {
    Recompute r;
    FC_RETURN_IF_ERROR(parse_recompute(p, &r));
    spec->policy.push_back(r);
  }
  return Status::OK();
}

Status write_report(const std::string& path, const Af3RunReport& rep, const Af3RunSpec& spec,
                    nlohmann::json j = nlohmann::json::object()) {
  const bool training = spec.training;
  j["stack"] = rep.stack;
  j["dtype"] = spec.dtype == DType::BF16 ? "bf16" : "fp32";
  j["n"] = rep.n;
  if (rep.stack == "msa_module") j["n_msa"] = rep.n_msa;
  j["training"] = training;
  j["time_ms"] = rep.time_ms;
  if (training) {
    j["forward_ms"] = rep.forward_ms;
    j["backward_ms"] = rep.backward_ms;
    j["activation_bytes"] = rep.activation_bytes;
  }
  j["peak_tracked_bytes"] = rep.peak_tracked_bytes;
  if (rep.planned_peak_bytes > 0) {
    j["memory_plan"] = {{"planned_peak_bytes", rep.planned_peak_bytes},
                        {"measured_peak_bytes", rep.measured_peak_bytes},
                        {"chunk_target_bytes", rep.chunk_target_bytes},
                        {"least_budget_bytes", rep.least_budget_bytes}};
    if (!rep.policy.empty()) j["memory_plan"]["policy"] = rep.policy;
  }
  j["peak_rss_bytes"] = peak_rss_bytes();
  j["threads"] = num_threads();
  std::ofstream f(path);
  f << j.dump(2) << "\n";
  if (!f) return Status::IOError("cannot write report " + path);
  return Status::OK();
}

// `--dap N` under `mpirun -np N`: every rank builds the stack, rank 0 reads the inputs and writes
// the outputs and the report with every rank's figures.
int run_af3_dap(const RunArgs& a, const Af3RunSpec& spec) {
  if (const Status st = start_dap_mpi(a); !st.ok()) return fail(st);
  const Comm world = Comm::world();
  Status st;
  st = check_dap_ranks(a, world);
  if (st.ok()) st = check_same_flags(a, world, "--dap");
  st = world.agree(st, true);
  Af3DapRunReport rep;
  if (st.ok()) st = af3_dap_run(spec, world, &rep);
  if (st.ok() && world.rank() == 0) {
    const Af3RunReport& r = rep.run;
    if (!a.out.empty()) st = write_safetensors(a.out, r.out);
    if (st.ok() && !a.quiet) {
      std::printf("foldcube run: %s, n=%lld%s, %s%s, DAP over %d ranks, %d thread(s) per rank\n",
                  r.stack.c_str(), static_cast<long long>(r.n),
                  r.stack == "msa_module" ? (", N_msa=" + std::to_string(r.n_msa)).c_str() : "",
                  spec.training ? "training step" : "forward",
                  spec.dtype == DType::BF16 ? " (bf16)" : "", a.dap, num_threads());
      std::printf("  time        %10.1f ms\n", r.time_ms);
      if (spec.training)
        std::printf("  forward %.1f ms, backward %.1f ms\n", r.forward_ms, r.backward_ms);
      auto row = [](const char* what, const std::vector<int64_t>& v) {
        std::printf("  %-34s", what);
        for (int64_t b : v) std::printf(" %9.1f", b / 1048576.0);
        std::printf("\n");
      };
      row("tracked peak per rank (MiB)", rep.rank_peak_bytes);
      if (!rep.rank_planned_bytes.empty()) {
        row("  estimate per rank (MiB)", rep.rank_planned_bytes);
        std::printf("  memory budget %s: chunk target %.1f MiB%s%s, least budget %.1f MiB\n",
                    a.memory_budget.c_str(), r.chunk_target_bytes / 1048576.0,
                    r.policy.empty() ? "" : ", policy ", r.policy.c_str(),
                    r.least_budget_bytes / 1048576.0);
      }
      row("  above the call's start (MiB)", rep.rank_work_peak_bytes);
      row("shards of the streams (MiB)", rep.rank_shard_bytes);
      if (spec.training) row("activations per rank (MiB)", rep.rank_activation_bytes);
      row("sent in the blocks (MiB)", rep.rank_sent_bytes);
      std::printf("  forward model: %.2f MiB per rank and block\n",
                  rep.block_sent_bytes_model / 1048576.0);
      if (!a.out.empty()) std::printf("  wrote %s\n", a.out.c_str());
    }
    if (st.ok() && !a.report.empty()) {
      nlohmann::json j;
      j["dap"] = a.dap;
      j["rank_peak_tracked_bytes"] = rep.rank_peak_bytes;
      j["rank_work_peak_bytes"] = rep.rank_work_peak_bytes;
      j["rank_shard_bytes"] = rep.rank_shard_bytes;
      j["rank_sent_bytes"] = rep.rank_sent_bytes;
      j["blocks"] = rep.blocks;
      j["block_sent_bytes_model"] = rep.block_sent_bytes_model;
      if (spec.training) j["rank_activation_bytes"] = rep.rank_activation_bytes;
      if (!rep.rank_planned_bytes.empty()) j["rank_planned_bytes"] = rep.rank_planned_bytes;
      st = write_report(a.report, r, spec, j);
    }
  }
  return end_mpi(world, world.agree(st, true));
}
}  // namespace

bool is_af3_run(const RunArgs& a) {
  if (a.stack == "pairformer" || a.stack == "msa_module") return true;
  if (a.stack != "auto" || a.weights.empty()) return false;
  std::string kind;
  return af3_stack_of_file(a.weights, &kind).ok() && !kind.empty();
}

int run_af3(const RunArgs& a) {
  set_num_threads(a.threads);
  Af3RunSpec spec;
  if (Status st = af3_spec(a, &spec); !st.ok()) return fail(st);
  if (a.dap > 0 || mpi_launched_world_size() > 1) return run_af3_dap(a, spec);
  Af3RunReport rep;
  if (Status st = af3_run(spec, &rep); !st.ok()) return fail(st);
  if (!a.out.empty())
    if (Status st = write_safetensors(a.out, rep.out); !st.ok()) return fail(st);
  if (!a.quiet) {
    std::printf("foldcube run: %s, n=%lld%s, %s%s, %d thread(s)\n", rep.stack.c_str(),
                static_cast<long long>(rep.n),
                rep.stack == "msa_module" ? (", N_msa=" + std::to_string(rep.n_msa)).c_str() : "",
                spec.training ? "training step" : "forward",
                spec.dtype == DType::BF16 ? " (bf16)" : "", num_threads());
    std::printf("  time        %10.1f ms\n", rep.time_ms);
    if (spec.training)
      std::printf("  forward %.1f ms, backward %.1f ms, activations %.1f MiB\n", rep.forward_ms,
                  rep.backward_ms, rep.activation_bytes / 1048576.0);
    if (rep.planned_peak_bytes > 0)
      std::printf(
          "  budget %s: planned peak %.1f MiB, measured %.1f MiB (chunk target %.1f MiB%s%s)\n",
          a.memory_budget.c_str(), rep.planned_peak_bytes / 1048576.0,
          rep.measured_peak_bytes / 1048576.0, rep.chunk_target_bytes / 1048576.0,
          rep.policy.empty() ? "" : ", policy ", rep.policy.c_str());
    std::printf("  tracked peak %9.1f MiB\n  peak RSS    %9.1f MiB\n",
                rep.peak_tracked_bytes / 1048576.0, peak_rss_bytes() / 1048576.0);
    if (!a.out.empty()) std::printf("  wrote %s\n", a.out.c_str());
  }
  if (!a.report.empty())
    if (Status st = write_report(a.report, rep, spec); !st.ok()) return fail(st);
  return 0;
}

namespace {
// The cost model's time of the plan row (table_module_costs): blocks x the modules' forward, and
// training their backward plus what the policy re-runs (module: the rebuilds; block: the forward).
double af3_time_ms(const Af3PlanRequest& q, const Af3PlanRow& row, const DeviceProfile& dev) {
  const bool pf = q.cfg.kind == "pairformer";
  const EvoformerConfig t = af3_trunk_config(q.cfg);
  const int64_t blocks = q.blocks > 0 ? q.blocks : q.cfg.no_blocks;
  double ms = 0;
  for (const ModuleCost& c :
       table_module_costs(pf ? kPairformerBlock : kMsaModuleBlock, t, pf ? 1 : q.n_msa, q.n,
                          q.chunk, row.chunk_target_bytes, q.train, dev)) {
    ms += c.forward_ms;
    if (!q.train) continue;
    ms += c.backward_ms;
    if (row.policy == Recompute::kModule) ms += c.rebuild_ms;
    if (row.policy == Recompute::kBlock) ms += c.forward_ms;
  }
  return blocks * ms;
}
}  // namespace

int plan_af3(const PlanArgs& a) {
  Af3PlanRequest q;
  if (!a.weights.empty()) {
    TensorFile w;
    Status st = read_safetensors(a.weights, &w);
    if (st.ok()) st = Af3Config::from_weights(w, &q.cfg).WithContext(a.weights);
    if (!st.ok()) return fail(st);
    if (q.cfg.kind != a.stack)
      return fail(Status::InvalidArgument("--stack " + a.stack + ", but " + a.weights +
                                          " holds a " + q.cfg.kind + " state dict"));
  } else {
    q.cfg.kind = a.stack;
    if (a.stack == "msa_module") q.cfg.no_blocks = 4;  // Boltz-2 / AF3 defaults otherwise
  }
  if (a.devices > 1 || a.dap > 1 || a.dp > 1 || a.bucket || !a.buckets.empty() ||
      !a.cache.empty() || !a.config.empty() || a.calibrate)
    return fail(Status::InvalidArgument("plan --stack " + a.stack +
                                        ": one device, no --dap/--dp/--bucket/--cache/--config/"
                                        "--calibrate (a memory plan with time estimates, yet)"));
  q.n = a.r;
  q.n_msa = a.s;
  q.blocks = a.blocks;
  q.train = a.train;
  q.chunk = a.chunk;
  q.threads = num_threads();
  Status st = Status::OK();
  if (!a.dtype.empty())
    st = parse_compute_dtype(a.dtype, &q.dtype).WithContext("plan --stack " + a.stack);
  if (st.ok() && !a.chunk_target.empty()) st = parse_bytes(a.chunk_target, &q.chunk_target_bytes);
  if (st.ok() && !a.memory.empty()) st = parse_bytes(a.memory, &q.memory_bytes);
  for (const std::string& p : split(a.policy, ',')) {
    if (!st.ok()) break;
    q.policy.emplace_back();
    st = parse_recompute(p, &q.policy.back());
  }
  Af3Plan plan;
  if (st.ok()) st = af3_plan(q, &plan);
  // Time estimates from --profile, else this machine's cached profile when there is one.
  DeviceProfile dev;
  bool timed = false;
  if (st.ok()) {
    const std::string path = a.profile.empty() ? default_profile_path() : a.profile;
    if (!a.profile.empty() || std::ifstream(path).good()) {
      st = load_or_calibrate_profile(path, false, &dev);
      // The cost model prices the profile's precision: no estimate for a dtype it was not
      // measured in.
      timed = st.ok() && dev.dtype == q.dtype;
    }
  }
  if (!st.ok()) return fail(st);
  std::vector<double> row_ms(plan.rows.size(), 0.0);
  if (timed)
    for (size_t i = 0; i < plan.rows.size(); ++i) row_ms[i] = af3_time_ms(q, plan.rows[i], dev);
  nlohmann::json j;
  j["stack"] = q.cfg.kind;
  j["n"] = q.n;
  if (q.cfg.kind == "msa_module") j["n_msa"] = q.n_msa;
  j["blocks"] = q.blocks;
  j["train"] = q.train;
  j["dtype"] = q.dtype == DType::BF16 ? "bf16" : "fp32";
  j["memory_bytes"] = q.memory_bytes;
  j["input_bytes"] = plan.input_bytes;
  j["chosen"] = plan.chosen;
  for (const Af3PlanRow& r : plan.rows) {
    nlohmann::json row = {{"chunk_target_bytes", r.chunk_target_bytes},
                          {"param_bytes", r.param_bytes},
                          {"peak_bytes", r.peak_bytes},
                          {"fits", r.fits}};
    if (q.train) {
      row["policy"] = recompute_name(r.policy);
      row["activation_bytes"] = r.activation_bytes;
    }
    if (timed) row["time_ms_estimate"] = row_ms[&r - plan.rows.data()];
    j["rows"].push_back(row);
  }
  if (a.json) {
    std::printf("%s\n", j.dump(2).c_str());
  } else {
    std::printf("foldcube plan: %s, n=%lld%s, %lld block(s), %s, %s (memory model; %s)\n",
                q.cfg.kind.c_str(), static_cast<long long>(q.n),
                q.cfg.kind == "msa_module" ? (", N_msa=" + std::to_string(q.n_msa)).c_str() : "",
                static_cast<long long>(q.blocks), q.train ? "training step" : "inference",
                q.dtype == DType::BF16 ? "bf16" : "fp32",
                timed ? ("time from profile " + dev.name).c_str() : "no time estimate");
    for (size_t i = 0; i < plan.rows.size(); ++i) {
      const Af3PlanRow& r = plan.rows[i];
      std::printf(
          "  %-7s weights %9.1f MiB  inputs %9.1f MiB  peak %9.1f MiB%s%s\n",
          q.train ? recompute_name(r.policy) : "forward", r.param_bytes / 1048576.0,
          plan.input_bytes / 1048576.0, r.peak_bytes / 1048576.0,
          q.train
              ? (", activations " + std::to_string(r.activation_bytes / 1048576) + " MiB").c_str()
              : "",
          static_cast<int>(i) == plan.chosen ? "  <- chosen" : (r.fits ? "" : "  (over)"));
      if (timed) std::printf("          time %10.1f ms (cost model)\n", row_ms[i]);
    }
  }
  if (!a.out.empty()) {
    std::ofstream f(a.out);
    f << j.dump(2) << "\n";
    if (!f) return fail(Status::IOError("cannot write plan " + a.out));
  }
  return plan.chosen >= 0 ? 0 : 3;
}

}  // namespace fc::app
