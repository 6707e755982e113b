// `foldcube plan`: the planner's choice (or a fixed policy's evaluation) and its estimates.
#include "foldcube/plan.h"

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "commands.h"
#include "foldcube/memory.h"
#include "foldcube/parallel.h"
#include "foldcube/planner.h"
#include "foldcube/runtime.h"
#include "model/block_table.h"
#include "plan/partition_cost.h"

namespace fc::app {

Status parse_buckets(const std::string& text, std::vector<int64_t>* out) {
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    try {
      size_t used = 0;
      const long long v = std::stoll(item, &used);
      if (used != item.size() || v < 1) throw std::invalid_argument(item);
      out->push_back(v);
    } catch (...) {
      return Status::InvalidArgument("bad bucket '" + item + "' in --buckets");
    }
  }
  return Status::OK();
}

namespace {

double mib(int64_t b) { return static_cast<double>(b) / 1048576.0; }

// This process's peak resident set so far (rank 0's under MPI).
int64_t peak_rss_bytes() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<int64_t>(u.ru_maxrss) * 1024;  // Linux: KiB
}

Status read_text(const std::string& path, std::string* out) {
  std::ifstream f(path);
  if (!f) return Status::NotFound("cannot read " + path);
  std::stringstream ss;
  ss << f.rdbuf();
  *out = ss.str();
  return Status::OK();
}

// The plan a `run --plan` job runs on `ranks` ranks (1: no MPI launcher), with its estimates on
// this machine's profile (or --plan-profile; `loaded`: that profile already read, with its
// measured link) and this run's thread count.
Status prepare_plan(const RunArgs& a, int ranks, Plan* out, DeviceProfile* dev_out,
                    const DeviceProfile* loaded = nullptr) {
  const bool training = a.backward || a.train || !a.grad_outputs.empty() || !a.policy.empty();
  if (!a.policy.empty() || a.chunk > 0)
    return Status::InvalidArgument(
        "--plan chooses the recompute policies and chunk sizes; drop --policy / --chunk");
  if (a.train)
    return Status::InvalidArgument(
        "--plan models the step without dropout; use --backward instead of --train");
  if (a.dap > 0 || a.dp > 1)
    return Status::InvalidArgument(
        "--plan takes the DAP and DP degrees from the plan; drop --dap / --dp (launch "
        "mpirun -np dap*dp)");
  if (!a.weights.empty() || !a.inputs.empty() || !a.grad_outputs.empty() || !a.out.empty())
    return Status::InvalidArgument(
        "--plan runs the Evoformer (or with --stack extra_msa the ExtraMSA) stack on random "
        "weights and inputs (--s, --r, --blocks, --config, --seed); drop --weights, --inputs, "
        "--grad-outputs, --out");
  const bool stack_given = !a.stack.empty() && a.stack != "auto";
  if (stack_given && a.stack != "evoformer" && a.stack != "extra_msa")
    return Status::InvalidArgument("--plan runs --stack evoformer or extra_msa, not '" + a.stack +
                                   "'");
  const bool extra_msa = a.stack == "extra_msa";
  DType dtype = DType::F32;  // --dtype: the engine's fp32 or bf16 (ForwardOptions/TrainOptions)
  FC_RETURN_IF_ERROR(parse_compute_dtype(a.dtype, &dtype));
  DeviceProfile dev;
  if (loaded != nullptr)
    dev = *loaded;
  else
    FC_RETURN_IF_ERROR(load_or_calibrate_profile(a.plan_profile, false, &dev));
  dev.threads = num_threads();  // memory (per-thread scratch) follows this run's threads
  profile_for_ranks(ranks, &dev);
  int64_t budget = 0;
  if (!a.memory_budget.empty()) FC_RETURN_IF_ERROR(parse_bytes(a.memory_budget, &budget));
  Plan plan;
  if (a.plan == "auto") {
    if (budget <= 0)
      return Status::InvalidArgument("--plan auto needs --memory-budget (e.g. 2GiB)");
    PlanRequest req;
    req.extra_msa = extra_msa;
    if (extra_msa && a.config.empty()) {  // AF2's extra-MSA stack, as `foldcube plan`
      req.cfg.c_m = 64;
      req.cfg.c_hidden_msa_att = 8;
    }
    if (!a.config.empty()) FC_RETURN_IF_ERROR(EvoformerConfig::from_json_file(a.config, &req.cfg));
    req.cfg.no_blocks = a.blocks;
    req.s = a.s;
    req.r = a.r;
    req.training = training;
    req.profile = dev;
    req.devices = ranks;
    req.memory_bytes = budget;
    req.dtype = dtype;
    req.element_bytes = 0;  // the engine's layout
    // Every rank of the job takes part: inference runs DAP over all of them; training takes the
    // fastest split dap x dp = ranks (ties: more DAP, the smaller peak per rank).
    FC_RETURN_IF_ERROR(make_plan_for_ranks(req, ranks, &plan));
  } else {
    std::string text;
    Status st = read_text(a.plan, &text);
    if (st.ok()) st = Plan::from_json(text, &plan);
    if (!st.ok()) return Status::InvalidArgument(a.plan + ": " + st.message());
    if (!a.config.empty()) {  // the plan carries its config; a different --config is a mistake
      EvoformerConfig given;
      FC_RETURN_IF_ERROR(EvoformerConfig::from_json_file(a.config, &given));
      given.no_blocks = plan.cfg.no_blocks;
      if (given.to_json() != plan.cfg.to_json())
        return Status::InvalidArgument(a.plan + " was made for another config than " + a.config +
                                       " (plan: " + plan.cfg.to_json() + ")");
    }
    if (training && !plan.training)
      return Status::InvalidArgument(a.plan + " is an inference plan; drop --backward");
    if (stack_given && extra_msa != plan.extra_msa)
      return Status::InvalidArgument(a.plan + " is a plan of the " +
                                     (plan.extra_msa ? "extra_msa" : "evoformer") +
                                     " stack, not of --stack " + a.stack);
    const int need = plan.dap * plan.dp;
    if (need != ranks)
      return Status::InvalidArgument(
          a.plan + " has dap=" + std::to_string(plan.dap) + ", dp=" + std::to_string(plan.dp) +
          ": it runs on " + std::to_string(need) + " MPI rank(s), this job has " +
          std::to_string(ranks) + " (mpirun -np " + std::to_string(need) + " foldcube run --plan " +
          a.plan + " ...)");
    plan.threads = num_threads();
    if (budget > 0) plan.memory_limit_bytes = budget;
    FC_RETURN_IF_ERROR(evaluate_plan(dev, &plan));  // this machine's estimates for the choices
  }
  // The engine runs fp32, or bf16 on its own layout (element_bytes 0: f32 buffers, bf16 GEMM
  // inputs and kept layer inputs); the plan's dtype is the run's unless --dtype says otherwise.
  if (plan.dtype == DType::F16 || (plan.dtype == DType::BF16 && plan.element_bytes != 0))
    return Status::InvalidArgument(
        std::string("the engine runs fp32, or bf16 with f32 buffers (plan --dtype bf16 "
                    "--element-bytes 0); this plan is for ") +
        plan_dtype_name(plan.dtype) + " with " + std::to_string(plan.element_bytes) +
        "-byte buffers");
  if (a.dtype_given && dtype != plan.dtype)
    return Status::InvalidArgument(a.plan + " is a plan for " + plan_dtype_name(plan.dtype) +
                                   ", not --dtype " + a.dtype + " (make one with foldcube plan " +
                                   "--dtype " + a.dtype + ")");
  if (plan.threads != num_threads())
    return Status::InvalidArgument("the plan is for " + std::to_string(plan.threads) +
                                   " thread(s), this run has " + std::to_string(num_threads()));
  if (plan.dap * plan.dp > 1 && plan.r != plan.r_real)
    return Status::InvalidArgument("a bucketed plan (r_real < r) runs in one process only");
  if (a.profile && plan.dap < 2)
    return Status::InvalidArgument(
        "--plan --profile times the layers of a DAP plan (dap > 1); this plan has dap=" +
        std::to_string(plan.dap));
  *out = std::move(plan);
  *dev_out = dev;
  return Status::OK();
}

// Prints (unless quiet) and writes the report of a planned run: the estimates beside the measured
// figures (for MPI jobs the max over ranks, with every rank's in rank_*).
// The layer timers of a DAP run beside the estimate's per-layer terms (run --plan --profile):
// per phase and layer, ms per pass summed over the blocks (measured: max over ranks per entry):
// the estimate (compute, own collectives, layout changes), the wall time of the layer and of its
// layout changes with the part inside collectives, and the process CPU time outside and inside
// the collectives (on a loaded machine the CPU time outside them is the steadier figure).
void print_layer_times(const Plan& plan, const DeviceProfile& dev, const PlanMeasurement& ms,
                       bool print, nlohmann::json* report) {
  const BlockTable& t = plan.extra_msa ? kExtraMsaBlock : kEvoformerBlock;
  const std::vector<StackLayerEstimate> est = estimate_stack_layers(plan, dev);
  if (print)
    std::printf(
        "\n  per layer, ms per pass summed over blocks (max over ranks)\n"
        "  %-9s %-18s|%8s %8s %8s %8s |%8s %8s %8s %8s |%8s %8s %8s %8s |%6s\n",
        "", "", "estimate", "", "", "", "wall", "", "", "", "CPU", "", "", "", "");
  if (print)
    std::printf("  %-9s %-18s|%8s %8s %8s %8s |%8s %8s %8s %8s |%8s %8s %8s %8s |%6s\n", "phase",
                "layer", "compute", "comm", "change", "all", "layer", "in coll", "change",
                "in coll", "layer", "in coll", "change", "in coll", "e/wall");
  std::string phase;
  double se = 0, sm = 0;
  auto total = [&] {
    if (print && !phase.empty())
      std::printf("  %-9s %-18s|%35.1f |%35.1f |%35s |%6.2f\n", phase.c_str(), "(sum)", se, sm, "",
                  sm > 0 ? se / sm : 0.0);
    se = sm = 0;
  };
  for (const LayerTimeRow& r : ms.layers) {
    if (r.phase != phase) total(), phase = r.phase;
    PhaseEstimate e;
    for (int i = 0; i < t.count; ++i)
      if (r.layer == t.layers[i].name)
        e = r.phase == "forward" ? est[i].fwd : r.phase == "backward" ? est[i].bwd : est[i].rec;
    const double ea = e.compute_ms + e.comm_ms + e.change_ms, mt = r.layer_ms + r.change_ms;
    se += ea, sm += mt;
    if (print)
      std::printf(
          "  %-9s %-18s|%8.1f %8.1f %8.1f %8.1f |%8.1f %8.1f %8.1f %8.1f |%8.1f %8.1f %8.1f %8.1f "
          "|%6.2f\n",
          r.phase.c_str(), r.layer.c_str(), e.compute_ms, e.comm_ms, e.change_ms, ea, r.layer_ms,
          r.layer_comm_ms, r.change_ms, r.change_comm_ms, r.layer_cpu_ms, r.layer_comm_cpu_ms,
          r.change_cpu_ms, r.change_comm_cpu_ms, mt > 0 ? ea / mt : 0.0);
    report->push_back({{"phase", r.phase},
                       {"layer", r.layer},
                       {"compute_ms_estimate", e.compute_ms},
                       {"comm_ms_estimate", e.comm_ms},
                       {"change_ms_estimate", e.change_ms},
                       {"layer_ms", r.layer_ms},
                       {"layer_comm_ms", r.layer_comm_ms},
                       {"change_ms", r.change_ms},
                       {"change_comm_ms", r.change_comm_ms},
                       {"layer_cpu_ms", r.layer_cpu_ms},
                       {"layer_comm_cpu_ms", r.layer_comm_cpu_ms},
                       {"change_cpu_ms", r.change_cpu_ms},
                       {"change_comm_cpu_ms", r.change_comm_cpu_ms}});
  }
  total();
}

Status report_planned(const RunArgs& a, const Plan& plan, const DeviceProfile& dev,
                      const PlanMeasurement& ms, const std::vector<PlanMeasurement>& ranks) {
  const int64_t budget = plan.memory_limit_bytes;
  const bool within = budget <= 0 || ms.peak_tracked_bytes <= budget;
  if (!a.quiet) {
    std::printf(
        "foldcube run --plan %s: %s (%s), %s %lld block(s), s=%lld r=%lld, %d thread(s)%s, "
        "profile %s\n",
        a.plan.c_str(), plan.training ? "training step" : "inference", plan_dtype_name(plan.dtype),
        plan.extra_msa ? "ExtraMSA" : "Evoformer", static_cast<long long>(plan.cfg.no_blocks),
        static_cast<long long>(plan.s), static_cast<long long>(plan.r), num_threads(),
        ranks.size() > 1 ? " per rank" : "", plan.profile.c_str());
    if (ranks.size() > 1)
      std::printf("  DAP over %d rank(s) x %d data-parallel group(s); measured = max over ranks\n",
                  plan.dap, plan.dp);
    std::printf("  chunk %lld, chunk target %.2f MiB", static_cast<long long>(plan.chunk),
                mib(plan.chunk_target_bytes));
    if (plan.training) {
      std::printf(", recompute");
      for (Recompute p : plan.policy) std::printf(" %s", recompute_name(p));
    }
    std::printf("\n                 %12s %12s %8s\n", "estimate", "measured", "est/meas");
    auto row = [](const char* name, double e, double m, const char* unit) {
      std::printf("  %-14s %12.1f %12.1f %8.2f  %s\n", name, e, m, m > 0 ? e / m : 0.0, unit);
    };
    row("time", plan.time_ms, ms.time_ms, "ms");
    std::printf("  (CPU time %.1f ms per pass over %d thread(s): wall x threads = %.1f ms)\n",
                ms.cpu_ms, num_threads(), ms.time_ms * num_threads());
    if (plan.training) {
      row("forward", plan.forward_ms, ms.forward_ms, "ms");
      row("backward+rec.", plan.backward_ms + plan.recompute_ms, ms.backward_ms, "ms");
      row("activations", mib(plan.activation_bytes), mib(ms.activation_bytes), "MiB");
    }
    row("tracked peak", mib(plan.peak_bytes), mib(ms.peak_tracked_bytes), "MiB");
    std::printf("  peak RSS       %12s %12.1f %8s  MiB%s\n", "", mib(peak_rss_bytes()), "",
                ranks.size() > 1 ? " (rank 0)" : "");
    if (ranks.size() > 1)
      for (size_t k = 0; k < ranks.size(); ++k)
        std::printf("    rank %-3zu tracked peak %9.1f MiB, activations %9.1f MiB, %9.1f ms\n", k,
                    mib(ranks[k].peak_tracked_bytes), mib(ranks[k].activation_bytes),
                    ranks[k].time_ms);
    if (budget > 0)
      std::printf("  budget         %12.1f MiB: %s\n", mib(budget),
                  within ? "measured peak within" : "MEASURED PEAK EXCEEDS IT");
  }
  nlohmann::json layers = nlohmann::json::array();
  if (!ms.layers.empty()) print_layer_times(plan, dev, ms, !a.quiet, &layers);
  if (!a.report.empty()) {
    nlohmann::json j;
    j["plan"] = nlohmann::json::parse(plan.to_json());
    j["training"] = plan.training;
    j["dtype"] = plan_dtype_name(plan.dtype);
    j["time_ms_estimate"] = plan.time_ms;
    j["time_ms"] = ms.time_ms;
    j["cpu_ms"] = ms.cpu_ms;
    j["forward_ms_estimate"] = plan.forward_ms;
    j["forward_ms"] = ms.forward_ms;
    j["backward_ms_estimate"] = plan.backward_ms + plan.recompute_ms;
    j["backward_ms"] = ms.backward_ms;
    j["peak_bytes_estimate"] = plan.peak_bytes;
    j["peak_tracked_bytes"] = ms.peak_tracked_bytes;
    j["peak_rss_bytes"] = peak_rss_bytes();  // this process (rank 0)
    j["activation_bytes_estimate"] = plan.activation_bytes;
    j["activation_bytes"] = ms.activation_bytes;
    j["memory_budget_bytes"] = budget;
    j["within_budget"] = within;
    j["s"] = plan.s;
    j["r"] = plan.r;
    j["blocks"] = plan.cfg.no_blocks;
    j["threads"] = num_threads();
    j["dap"] = plan.dap;
    j["dp"] = plan.dp;
    j["ranks"] = static_cast<int>(ranks.size());
    if (!layers.empty()) j["layers"] = layers;
    for (const PlanMeasurement& m : ranks) {
      j["rank_peak_tracked_bytes"].push_back(m.peak_tracked_bytes);
      j["rank_activation_bytes"].push_back(m.activation_bytes);
      j["rank_time_ms"].push_back(m.time_ms);
      j["rank_cpu_ms"].push_back(m.cpu_ms);
    }
    std::ofstream f(a.report);
    f << j.dump(2) << "\n";
    if (!f) return Status::IOError("cannot write report " + a.report);
  }
  if (!within)
    return Status::Internal("measured peak " + std::to_string(ms.peak_tracked_bytes) +
                            " B exceeds the budget " + std::to_string(budget) + " B");
  return Status::OK();
}

}  // namespace

// `run --plan`: in one process, or under `mpirun -np dap*dp` for a plan with DAP/DP (rank 0
// plans or reads and evaluates the plan and shares it; every rank runs its part and measures;
// rank 0 prints and reports the max over ranks). Errors before the run are rank 0's, printed
// once, and every rank exits 1; executor errors are the same on every rank.
int run_planned(const RunArgs& a) {
  set_num_threads(a.threads);
  PlanRunOptions ro;
  ro.seed = a.seed;
  ro.warmup = a.warmup;
  ro.repeats = a.repeats;
  ro.layer_times = a.profile;
  if (mpi_launched_world_size() == 1) {
    Plan plan;
    DeviceProfile dev;
    Status st = prepare_plan(a, 1, &plan, &dev);
    PlanMeasurement ms;
    if (st.ok()) st = run_plan_dap(plan, Comm(), ro, &ms);
    if (st.ok()) st = report_planned(a, plan, dev, ms, {ms});
    return st.ok() ? 0 : fail(st);
  }
  Status st = mpi_init();
  if (!st.ok()) return fail(st);
  const Comm world = Comm::world();
  auto end = [&](const Status& s) {  // every rank; rank 0 prints
    if (world.rank() == 0 && !s.ok()) fail(s);
    mpi_finalize();
    return s.ok() ? 0 : 1;
  };
  if (const Status st = check_same_flags(a, world, "--plan"); !st.ok()) return end(st);
  // This machine's collectives at this rank count, measured once and cached with the calibrated
  // profile (docs/planner.md, "Measured collectives"); a --plan-profile file is not rewritten.
  DeviceProfile loaded;  // rank 0's
  st =
      measure_profile_link(world, a.plan_profile, a.s, a.r, false, a.plan_profile.empty(), &loaded);
  if (!st.ok()) return end(st);
  Plan plan;
  DeviceProfile dev;  // rank 0's: the per-layer estimates of --profile
  std::string text;
  if (world.rank() == 0) {
    st = prepare_plan(a, world.size(), &plan, &dev, &loaded);
    if (st.ok()) text = plan.to_json();
  }
  st = world.agree(st);
  if (!st.ok()) return end(Status::InvalidArgument(st.message()));
  world.broadcast_string(&text, 0);
  if (world.rank() != 0) {
    st = Plan::from_json(text, &plan);
    FC_CHECK_MSG(st.ok(), "rank 0's plan does not parse");
  }
  std::vector<PlanMeasurement> all;
  PlanMeasurement max;
  st = run_plan_dap(plan, world, ro, nullptr, &all, &max);
  if (!st.ok()) return end(st);
  const bool within =
      plan.memory_limit_bytes <= 0 || max.peak_tracked_bytes <= plan.memory_limit_bytes;
  if (world.rank() == 0) st = report_planned(a, plan, dev, max, all);
  return end(world.rank() == 0 ? st : (within ? Status::OK() : Status::Internal("over budget")));
}

namespace {
// The planner request of `foldcube plan`'s flags.
Status plan_request(const PlanArgs& a, PlanRequest* req) {
  if (a.stack != "evoformer" && a.stack != "extra_msa")
    return Status::InvalidArgument("unknown --stack '" + a.stack + "' (evoformer|extra_msa)");
  req->extra_msa = a.stack == "extra_msa";
  if (req->extra_msa && a.config.empty()) {  // AF2's extra-MSA stack: c_e = 64, 8 heads of 8
    req->cfg.c_m = 64;
    req->cfg.c_hidden_msa_att = 8;
  }
  if (!a.config.empty()) FC_RETURN_IF_ERROR(EvoformerConfig::from_json_file(a.config, &req->cfg));
  req->cfg.no_blocks = a.blocks;
  req->s = a.s;
  req->r = a.r;
  req->training = a.train;
  FC_RETURN_IF_ERROR(load_plan_profile(a.profile, a.calibrate, a.devices, &req->profile));
  req->devices = a.devices;
  if (!a.memory.empty()) FC_RETURN_IF_ERROR(parse_bytes(a.memory, &req->memory_bytes));
  if (!a.dtype.empty()) {
    DType t;
    FC_RETURN_IF_ERROR(parse_plan_dtype(a.dtype, &t));
    req->dtype = t;
  }
  if (a.element_bytes >= 0) req->element_bytes = a.element_bytes;
  if (!a.policy.empty()) {
    FC_RETURN_IF_ERROR(parse_recompute(a.policy, &req->policy));
    req->fixed_policy = true;
  }
  req->chunk = a.chunk;
  if (!a.chunk_target.empty()) {
    FC_RETURN_IF_ERROR(parse_bytes(a.chunk_target, &req->chunk_target));
    if (a.chunk > 0) return Status::InvalidArgument("give --chunk or --chunk-target, not both");
  }
  req->dap = a.dap;
  req->dp = a.dp;
  req->split_auto = a.split == "auto";
  req->bucket = a.bucket || !a.buckets.empty();
  if (!a.buckets.empty()) FC_RETURN_IF_ERROR(parse_buckets(a.buckets, &req->buckets));
  return Status::OK();
}

void print_plan(const PlanRequest& req, const Plan& plan, bool hit) {
  std::printf(
      "foldcube plan: %s%s, s=%lld r=%lld%s blocks=%lld, %s%s, %d device(s), profile %s\n",
      plan.training ? "training step" : "inference", plan.extra_msa ? " (ExtraMSA stack)" : "",
      static_cast<long long>(plan.s), static_cast<long long>(plan.r),
      plan.r != plan.r_real ? (" (bucket of r=" + std::to_string(plan.r_real) + ")").c_str() : "",
      static_cast<long long>(plan.cfg.no_blocks), plan_dtype_name(plan.dtype),
      plan.element_bytes > 0
          ? (", every buffer " + std::to_string(plan.element_bytes) + " B").c_str()
          : "",
      req.devices > 0 ? req.devices : req.profile.devices, plan.profile.c_str());
  std::printf(
      "  estimate    %10.1f ms per step (%.1f ms per protein; forward %.1f, backward "
      "%.1f, recompute %.1f, comm %.1f)\n",
      plan.time_ms, plan.time_per_protein_ms, plan.forward_ms, plan.backward_ms, plan.recompute_ms,
      plan.comm_ms);
  std::printf("  peak        %10.1f MiB per device (limit %.1f MiB)%s\n", mib(plan.peak_bytes),
              mib(plan.memory_limit_bytes), plan.fits ? "" : "  DOES NOT FIT");
  if (plan.training) {
    std::printf("  activations %10.1f MiB\n", mib(plan.activation_bytes));
    int counts[3] = {0, 0, 0};
    for (Recompute p : plan.policy) ++counts[static_cast<int>(p)];
    std::printf("  recompute   none x%d, module x%d, block x%d:", counts[0], counts[1], counts[2]);
    for (Recompute p : plan.policy) std::printf(" %c", recompute_name(p)[0]);
    std::printf("\n");
  }
  std::printf("  dap %d, dp %d, chunk %lld, chunk target %.2f MiB\n", plan.dap, plan.dp,
              static_cast<long long>(plan.chunk), mib(plan.chunk_target_bytes));
  if (!plan.partitions.empty()) {
    std::printf("  partitions ");
    for (const LayerSplit& ls : plan.partitions[0])
      std::printf(" %s=%s", ls.layer.c_str(), split_name(ls.split));
    std::printf("%s\n", plan.partitions.size() > 1 ? " (block 0)" : "");
  }
  std::printf("  chunks     ");
  for (const auto& [name, n] : plan.module_chunks)
    std::printf(" %s=%lld", name.c_str(), static_cast<long long>(n));
  std::printf("\n  search      %10.2f ms%s\n", plan.search_ms, hit ? " (from cache)" : "");
}
}  // namespace

namespace {
// explain_splits as a table: one row per layer and non-DAP split, then the fastest whole list.
void print_split_terms(const DeviceProfile& dev, const Plan& plan) {
  if (plan.dap < 2) {
    std::printf("  splits: DAP degree 1, nothing to partition\n");
    return;
  }
  double link = 0, lat = 0;
  dap_link_terms(dev, plan, &link, &lat);
  std::printf("  pure DAP's layer collectives per step: link %.1f ms + latency %.1f ms\n", link,
              lat);
  std::printf("  %-24s %-10s %10s %10s %10s %10s %11s\n", "layer", "split", "compute", "link",
              "latency", "total", "+peak MiB");
  const std::vector<SplitTerms> rows = explain_splits(dev, plan);
  const BlockTable& t = plan.extra_msa ? kExtraMsaBlock : kEvoformerBlock;
  for (size_t k = 0; k < rows.size(); ++k) {
    const SplitTerms& r = rows[k];
    std::string layer = "best list", split;
    for (int i = 0; i < t.count; ++i)
      if (k + 1 < rows.size() && r.splits[i] != Split::kDap)
        layer = t.layers[i].name, split = split_name(r.splits[i]);
    std::printf("  %-24s %-10s %+10.1f %+10.1f %+10.1f %+10.1f %+11.1f\n", layer.c_str(),
                split.c_str(), r.compute_ms, r.link_ms, r.latency_ms, r.total_ms(),
                mib(r.extra_peak_bytes));
    if (k + 1 == rows.size()) {
      std::printf("    ");
      for (int i = 0; i < t.count; ++i)
        std::printf(" %s=%s", t.layers[i].name, split_name(r.splits[i]));
      std::printf("\n");
    }
  }
}
}  // namespace

int plan_command(const PlanArgs& a) {
  if (a.stack == "pairformer" || a.stack == "msa_module") return plan_af3(a);
  PlanRequest req;
  Status st = plan_request(a, &req);
  Plan plan;
  bool hit = false;
  if (st.ok())
    st = a.cache.empty() ? make_plan(req, &plan) : cached_plan(req, a.cache, &plan, &hit);
  if (!st.ok()) return fail(st);
  if (a.json)
    std::printf("%s\n", plan.to_json().c_str());
  else
    print_plan(req, plan, hit);
  if (a.explain_splits) print_split_terms(req.profile, plan);
  if (!a.out.empty()) {
    std::ofstream f(a.out);
    f << plan.to_json() << "\n";
    if (!f) return fail(Status::IOError("cannot write plan " + a.out));
  }
  return plan.fits ? 0 : 3;
}

namespace {
std::string temp_path(const char* tag) {
  return "/tmp/foldcube_" + std::string(tag) + "_" + std::to_string(getpid()) + ".json";
}

// One table row: a plan, its estimate and (when it fits) its measurement in a fresh process (under
// `mpirun -np dap*dp` for a DAP/DP plan; then the peak is the largest rank's).
struct BenchRow {
  std::string name;
  Plan plan;
  bool measured = false;
  std::string note{};  // why a row that fits was not measured
  double time_ms = 0, cpu_ms = 0;
  int64_t peak_bytes = 0;                        // the largest rank's
  nlohmann::json rank_peaks = nlohmann::json();  // every rank's (DAP/DP rows)
};

Status measure_row(const std::string& exe, const std::string& profile, BenchRow* row) {
  const std::string plan_path = temp_path("plan"), report = temp_path("report");
  {
    std::ofstream f(plan_path);
    f << row->plan.to_json() << "\n";
    if (!f) return Status::IOError("cannot write " + plan_path);
  }
  const int ranks = row->plan.dap * row->plan.dp;
  const std::string launch = ranks > 1
                                 ? "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 "
                                   "OMP_WAIT_POLICY=passive mpirun --oversubscribe "
                                   "--bind-to none -np " +
                                       std::to_string(ranks) + " "
                                 : "";
  const std::string cmd = launch + "'" + exe + "' run --quiet --warmup 1 --repeats 1 --threads " +
                          std::to_string(row->plan.threads) + " --plan " + plan_path +
                          " --plan-profile '" + profile + "'" +
                          (row->plan.training ? " --backward" : "") + " --report " + report;
  const int rc = std::system(cmd.c_str());
  std::remove(plan_path.c_str());
  if (rc != 0) return Status::Internal("benchmark row failed: " + cmd);
  std::ifstream f(report);
  const nlohmann::json j = nlohmann::json::parse(f, nullptr, false);
  std::remove(report.c_str());
  if (j.is_discarded()) return Status::Internal("unreadable report from: " + cmd);
  row->time_ms = j["time_ms"].get<double>();
  row->cpu_ms = j["cpu_ms"].get<double>();
  row->peak_bytes = j["peak_tracked_bytes"].get<int64_t>();
  if (j.contains("rank_peak_tracked_bytes")) row->rank_peaks = j["rank_peak_tracked_bytes"];
  row->measured = true;
  return Status::OK();
}
}  // namespace

namespace {
// A plan of fixed choices for a bench row (training, one policy for every block).
Plan fixed_plan(const PlanRequest& req, Recompute rc, int64_t target, int dap, int64_t budget) {
  Plan p;
  p.cfg = req.cfg;
  p.s = req.s;
  p.r = p.r_real = req.r;
  p.training = true;
  p.policy.assign(req.cfg.no_blocks, rc);
  p.chunk_target_bytes = target;
  p.dap = dap;
  p.threads = num_threads();
  p.memory_limit_bytes = budget;
  return p;
}

// A budget that forces choices: a quarter of the way from the smallest feasible peak (the finest
// chunk target) to the unconstrained plan's peak.
Status forcing_budget(PlanRequest req, const DeviceProfile& dev, int64_t finest, int64_t* out) {
  Plan roomy;
  req.memory_bytes = int64_t{1} << 50;
  FC_RETURN_IF_ERROR(make_plan(req, &roomy));
  int64_t lo = roomy.peak_bytes;
  for (Recompute rc : {Recompute::kNone, Recompute::kModule, Recompute::kBlock}) {
    Plan p = roomy;
    p.policy.assign(req.cfg.no_blocks, rc);
    p.chunk = 0;
    p.chunk_target_bytes = finest;
    if (evaluate_plan(dev, &p).ok()) lo = std::min(lo, p.peak_bytes);
  }
  *out = lo + (roomy.peak_bytes - lo) / 4;
  return Status::OK();
}

// The rows of one shape: the planner's plan, every fixed policy at the whole / automatic /
// finest chunk target, and (issue 6's "DAP" and "DAP + chunk") the planner given 2 devices and
// four DAP N=2 plans, per-rank memory under the same budget.
Status bench_rows(const PlanRequest& req, const DeviceProfile& dev, const std::string& shape,
                  std::vector<BenchRow>* rows) {
  const std::vector<int64_t> targets = training_chunk_targets(req.cfg, req.s, req.r);
  const int64_t budget = req.memory_bytes;
  const int64_t auto_target = default_train_chunk_target_bytes(req.cfg, req.s, req.r);
  BenchRow planner{"planner", {}};
  Status st = make_plan(req, &planner.plan);
  if (st.ok())
    rows->push_back(planner);
  else
    std::fprintf(stderr, "foldcube: planner at %s: %s\n", shape.c_str(), st.message().c_str());
  for (Recompute rc : {Recompute::kNone, Recompute::kModule, Recompute::kBlock})
    for (const auto& [tag, tgt] : {std::pair<const char*, int64_t>{"whole", targets.back()},
                                   {"auto", auto_target},
                                   {"finest", targets.front()}}) {
      BenchRow row{std::string(recompute_name(rc)) + ", " + tag,
                   fixed_plan(req, rc, tgt, 1, budget)};
      FC_RETURN_IF_ERROR(evaluate_plan(dev, &row.plan));
      rows->push_back(row);
    }
  PlanRequest r2 = req;
  r2.devices = 2;
  profile_for_ranks(2, &r2.profile);
  BenchRow two{"planner, 2 devices", {}};
  st = make_plan(r2, &two.plan);
  if (st.ok())
    rows->push_back(two);
  else
    std::fprintf(stderr, "foldcube: planner (2 devices) at %s: %s\n", shape.c_str(),
                 st.message().c_str());
  struct DapRow {
    const char* tag;
    Recompute rc;
    int64_t target;
  };
  for (const DapRow& dr :
       {DapRow{"DAP N=2, none, whole", Recompute::kNone, targets.back()},
        DapRow{"DAP N=2 + chunk, none, finest", Recompute::kNone, targets.front()},
        DapRow{"DAP N=2, module, whole", Recompute::kModule, targets.back()},
        DapRow{"DAP N=2 + chunk, module, auto", Recompute::kModule, auto_target}}) {
    BenchRow d{dr.tag, fixed_plan(req, dr.rc, dr.target, 2, budget)};
    FC_RETURN_IF_ERROR(evaluate_plan(r2.profile, &d.plan));
    rows->push_back(d);
  }
  return Status::OK();
}

// Prints one table row and returns its JSON.
nlohmann::json print_bench_row(const BenchRow& row, int64_t budget) {
  int counts[3] = {0, 0, 0};
  for (Recompute p : row.plan.policy) ++counts[static_cast<int>(p)];
  const Plan& p = row.plan;
  if (row.measured)
    std::printf(
        "| %lld | %lld | %.0f | %s | %d/%d/%d | %.2f | %.0f | %.0f | %.2f | %.0f | %.1f | %.1f "
        "| yes |\n",
        static_cast<long long>(p.s), static_cast<long long>(p.r), mib(budget), row.name.c_str(),
        counts[0], counts[1], counts[2], mib(p.chunk_target_bytes), p.time_ms, row.time_ms,
        p.time_ms / row.time_ms, row.cpu_ms, mib(p.peak_bytes), mib(row.peak_bytes));
  else
    std::printf(
        "| %lld | %lld | %.0f | %s | %d/%d/%d | %.2f | %.0f | — | — | — | %.1f | — | %s |\n",
        static_cast<long long>(p.s), static_cast<long long>(p.r), mib(budget), row.name.c_str(),
        counts[0], counts[1], counts[2], mib(p.chunk_target_bytes), p.time_ms, mib(p.peak_bytes),
        p.fits ? ("yes (" + row.note + ")").c_str() : "no");
  std::fflush(stdout);
  return {{"s", p.s},
          {"r", p.r},
          {"blocks", p.cfg.no_blocks},
          {"budget_bytes", budget},
          {"plan", row.name},
          {"time_ms_estimate", p.time_ms},
          {"time_ms", row.measured ? nlohmann::json(row.time_ms) : nlohmann::json()},
          {"cpu_ms", row.measured ? nlohmann::json(row.cpu_ms) : nlohmann::json()},
          {"peak_bytes_estimate", p.peak_bytes},
          {"peak_tracked_bytes", row.measured ? nlohmann::json(row.peak_bytes) : nlohmann::json()},
          {"fits", p.fits},
          {"dap", p.dap},
          {"dp", p.dp},
          {"rank_peak_tracked_bytes", row.rank_peaks},
          {"plan_json", nlohmann::json::parse(p.to_json())}};
}

// --blocks for `bench --plan`: one count (default 2).
Status bench_plan_blocks(const BenchArgs& a, int64_t* blocks) {
  *blocks = 2;
  if (a.blocks.empty()) return Status::OK();
  const auto b = split(a.blocks, ',');
  if (b.size() != 1 || std::atoll(b[0].c_str()) < 1)
    return Status::InvalidArgument("--blocks: one block count >= 1 with --plan");
  *blocks = std::atoll(b[0].c_str());
  return Status::OK();
}
}  // namespace

int bench_plan(const BenchArgs& a, const std::string& exe) {
  set_num_threads(a.threads);
  const std::string profile_path = a.profile.empty() ? default_profile_path() : a.profile;
  DeviceProfile dev;
  Status st = load_or_calibrate_profile(a.profile, false, &dev);
  if (!st.ok()) return fail(st);
  dev.threads = num_threads();
  dev.devices = 1;
  int64_t blocks = 2, forced_budget = 0;
  st = bench_plan_blocks(a, &blocks);
  if (st.ok() && !a.memory.empty()) st = parse_bytes(a.memory, &forced_budget);
  if (!st.ok()) return fail(st);
  // DAP rows run under mpirun (the same --threads per rank); without MPI their estimates only.
  const bool mpi = mpi_available() && std::system("command -v mpirun > /dev/null 2>&1") == 0;
  std::printf(
      "foldcube bench --plan: training step, AF2 model_1 dims, %lld block(s), %d thread(s)%s, "
      "fp32, profile %s; peaks per device (DAP: the largest rank's)%s\n\n",
      static_cast<long long>(blocks), num_threads(), mpi ? " per rank" : "", dev.name.c_str(),
      mpi ? "" : "; no MPI: DAP rows are estimates only");
  std::printf(
      "| s | r | budget MiB | plan | recompute (n/m/b) | chunk target MiB | est. ms | meas. ms | "
      "est/meas | CPU ms | est. peak MiB | meas. peak MiB | fits |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  nlohmann::json all = nlohmann::json::array();
  for (const std::string& shape :
       split(a.shapes.empty() ? "128:256,512:256,512:384" : a.shapes, ',')) {
    const auto sr = split(shape, ':');
    if (sr.size() != 2 || std::atoll(sr[0].c_str()) < 1 || std::atoll(sr[1].c_str()) < 1)
      return fail(Status::InvalidArgument("bad shape '" + shape + "' (want s:r)"));
    PlanRequest req;
    req.cfg.no_blocks = blocks;
    req.s = std::atoll(sr[0].c_str());
    req.r = std::atoll(sr[1].c_str());
    req.training = true;
    req.profile = dev;
    req.devices = 1;
    req.dtype = DType::F32;
    req.memory_bytes = forced_budget;
    if (req.memory_bytes <= 0)
      st = forcing_budget(req, dev, training_chunk_targets(req.cfg, req.s, req.r).front(),
                          &req.memory_bytes);
    std::vector<BenchRow> rows;
    if (st.ok()) st = bench_rows(req, dev, shape, &rows);
    if (!st.ok()) return fail(st);
    for (BenchRow& row : rows) {
      if (row.plan.fits && row.plan.dap * row.plan.dp > 1 && !mpi) {
        row.note = "estimate only: no MPI";
      } else if (row.plan.fits) {
        st = measure_row(exe, profile_path, &row);
        if (!st.ok()) return fail(st);
      }
      all.push_back(print_bench_row(row, req.memory_bytes));
    }
  }
  if (!a.out_json.empty()) {
    std::ofstream f(a.out_json);
    f << all.dump(2) << "\n";
    if (!f) return fail(Status::IOError("cannot write " + a.out_json));
  }
  return 0;
}

}  // namespace fc::app
