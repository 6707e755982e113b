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
#include "core/rng.h"
#include "dist/comm.h"
#include "exec/dap.h"
#include "exec/dap_train.h"
#include "foldcube/memory.h"
#include "foldcube/planner.h"
#include "foldcube/runtime.h"

namespace fc::app {

namespace {
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

double mib(int64_t b) { return static_cast<double>(b) / 1048576.0; }

Status read_text(const std::string& path, std::string* out) {
  std::ifstream f(path);
  if (!f) return Status::NotFound("cannot read " + path);
  std::stringstream ss;
  ss << f.rdbuf();
  *out = ss.str();
  return Status::OK();
}

// Measured figures of one planned run (medians over the timed passes, peaks over all passes).
struct Measured {
  double time_ms = 0, forward_ms = 0, backward_ms = 0;
  double cpu_ms = 0;               // process CPU time (all threads) per timed pass, median
  int64_t peak_tracked_bytes = 0;  // absolute tracked peak: weights, inputs, masks, work
  int64_t activation_bytes = 0;    // training: kept from forward for backward
};

double cpu_now_ms() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return (u.ru_utime.tv_sec + u.ru_stime.tv_sec) * 1e3 +
         (u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e3;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

// Runs a plan with dap x dp = world.size() ranks through the DAP executor (exec/dap.h,
// exec/dap_train.h) and fills this rank's figures. Every rank builds the same random weights from
// `seed`; the root of DAP group g makes protein g's inputs and upstream gradients from seed + g
// (app/run.cc's convention) and passes no masks (the executor's all-ones masks). With dap = 1
// each replica runs the single-process forward or step (all-ones masks, as run_plan). Training
// with dp > 1 averages the parameter gradients over the replicas (timed with the backward).
// Errors are the executor's, the same on every rank.
Status run_plan_dap(const Plan& plan, const dist::Communicator& world, uint64_t seed, int warmup,
                    int repeats, Measured* out) {
  const int N = plan.dap, D = plan.dp, grp = world.rank() / N;
  const dist::Communicator dap = world.dap_group(N), dp = world.dp_group(N);
  const EvoformerConfig& cfg = plan.cfg;
  const int64_t s = plan.s, r = plan.r;
  const bool root = dap.rank() == 0;
  const uint64_t gseed = seed + static_cast<uint64_t>(grp);
  const EvoformerStack stack = EvoformerStack::random(cfg, seed);
  Tensor msa_mask, pair_mask;  // one rank per replica: [s, r], [r, r] ones as in run_plan
  if (N == 1) msa_mask = Tensor::full({s, r}, 1.f), pair_mask = Tensor::full({r, r}, 1.f);
  Tensor gm, gz;  // the group root's upstream gradients [s, r, c_m], [r, r, c_z]
  if (plan.training && root) {
    gm = random_tensor({s, r, cfg.c_m}, gseed * 2 + 3);
    gz = random_tensor({r, r, cfg.c_z}, gseed * 2 + 4);
  }
  std::vector<double> tot, fwd, bwd, cpu;
  for (int it = 0; it < warmup + repeats; ++it) {
    Tensor m, z;  // the group root's inputs [s, r, c_m], [r, r, c_z]; undefined elsewhere
    if (root) {
      m = random_tensor({s, r, cfg.c_m}, gseed * 2 + 1);
      z = random_tensor({r, r, cfg.c_z}, gseed * 2 + 2);
    }
    world.barrier();
    MemoryScope scope;
    const double c0 = cpu_now_ms();
    if (plan.training) {
      TrainOptions o = to_train_options(plan);
      o.seed = gseed;
      TrainResult res;
      DapTrainStats stats;
      if (N > 1) {
        FC_RETURN_IF_ERROR(
            dap_train_step(stack, dap, m, z, Tensor(), Tensor(), gm, gz, o, &stats, &res));
      } else {  // one rank per replica: the single-process step (its memory model is exact)
        FC_RETURN_IF_ERROR(stack.train_step(m, z, msa_mask, pair_mask, gm, gz, o, &res));
      }
      const auto t0 = std::chrono::steady_clock::now();
      if (D > 1)
        for (auto& [name, t] : res.grad_params) {
          if (!t.is_contiguous())
            return Status::Internal("gradient " + name + " is not contiguous");
          dp.all_reduce(t.f32(), t.numel());
          const float inv = 1.f / static_cast<float>(D);
          float* p = t.f32();
          for (int64_t i = 0; i < t.numel(); ++i) p[i] *= inv;
        }
      const double reduce_ms =
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      if (it >= warmup) {
        fwd.push_back(res.forward_ms);
        bwd.push_back(res.backward_ms + reduce_ms);
        tot.push_back(res.forward_ms + res.backward_ms + reduce_ms);
      }
      out->activation_bytes = res.activation_bytes;
    } else {
      DapOptions o;
      o.chunk = plan.chunk;
      o.chunk_target_bytes = plan.chunk_target_bytes;
      Tensor s_out;  // [r, c_s] on the group root
      const auto t0 = std::chrono::steady_clock::now();
      if (N > 1)
        FC_RETURN_IF_ERROR(dap_forward(stack, dap, m, z, Tensor(), Tensor(), &s_out, o));
      else
        FC_RETURN_IF_ERROR(
            stack.forward(m, z, msa_mask, pair_mask, &s_out, to_forward_options(plan)));
      const double ms =
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      if (it >= warmup) tot.push_back(ms), fwd.push_back(ms);
    }
    if (it >= warmup) cpu.push_back(cpu_now_ms() - c0);
    out->peak_tracked_bytes = std::max(out->peak_tracked_bytes, scope.peak());
  }
  out->cpu_ms = median(cpu);
  out->time_ms = median(tot);
  out->forward_ms = median(fwd);
  out->backward_ms = median(bwd);
  return Status::OK();
}

// Runs `plan` in this process alone: the one-rank case of run_plan_dap (random weights and inputs,
// all-ones masks; only the tensors the planner's base accounts for are live: weights, m, z, masks
// and, for training, the output gradients; inputs are regenerated before every pass, untimed).
Status run_plan(const Plan& plan, uint64_t seed, int warmup, int repeats, Measured* out) {
  return run_plan_dap(plan, dist::Communicator(), seed, warmup, repeats, out);
}

// With more than one device and no link rate in the profile, the ranks are taken to share this
// node's memory: link_gbps = mem_gbps / 2 (every byte is copied into and out of the shared
// segment), 5 us per collective call (docs/planner.md). `devices` is at least `ranks`.
void profile_for_ranks(int ranks, DeviceProfile* dev) {
  dev->devices = std::max(dev->devices, ranks);
  if (dev->devices > 1 && dev->link_gbps <= 0) {
    dev->link_gbps = dev->mem_gbps / 2;
    dev->link_latency_us = 5;
  }
}

// The plan a `run --plan` job runs on `ranks` ranks (1: no MPI launcher), with its estimates on
// this machine's profile (or --plan-profile) and this run's thread count.
Status prepare_plan(const RunArgs& a, int ranks, Plan* out) {
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
  if (!a.weights.empty() || !a.inputs.empty() || !a.grad_outputs.empty() || !a.out.empty() ||
      a.stack == "extra_msa" || a.profile)
    return Status::InvalidArgument(
        "--plan runs the Evoformer stack on random weights and inputs (--s, --r, --blocks, "
        "--config, --seed); drop --weights, --inputs, --grad-outputs, --out, --stack, --profile");
  DeviceProfile dev;
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
    if (!a.config.empty()) FC_RETURN_IF_ERROR(EvoformerConfig::from_json_file(a.config, &req.cfg));
    req.cfg.no_blocks = a.blocks;
    req.s = a.s;
    req.r = a.r;
    req.training = training;
    req.profile = dev;
    req.devices = ranks;
    req.memory_bytes = budget;
    req.dtype = DType::F32;
    // Every rank of the job takes part: inference runs DAP over all of them; training takes the
    // fastest split dap x dp = ranks (ties: more DAP, the smaller peak per rank).
    Status last;
    bool found = false;
    for (int d = ranks; d >= 1; --d) {
      if (ranks % d != 0 || (!training && d != ranks)) continue;
      req.dap = d;
      req.dp = ranks / d;
      Plan p;
      const Status st = make_plan(req, &p);
      if (!st.ok()) {
        if (!found && last.ok()) last = st;
        continue;
      }
      if (!found || p.time_per_protein_ms < plan.time_per_protein_ms) plan = std::move(p);
      found = true;
    }
    if (!found) return last;
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
  if (plan.dtype != DType::F32)
    return Status::InvalidArgument(std::string("the engine runs fp32; this plan is for ") +
                                   plan_dtype_name(plan.dtype));
  if (plan.threads != num_threads())
    return Status::InvalidArgument("the plan is for " + std::to_string(plan.threads) +
                                   " thread(s), this run has " + std::to_string(num_threads()));
  if (plan.dap * plan.dp > 1 && plan.r != plan.r_real)
    return Status::InvalidArgument("a bucketed plan (r_real < r) runs in one process only");
  *out = std::move(plan);
  return Status::OK();
}

// Prints (unless quiet) and writes the report of a planned run: the estimates beside the measured
// figures (for MPI jobs the max over ranks, with every rank's in rank_*).
Status report_planned(const RunArgs& a, const Plan& plan, const Measured& ms,
                      const std::vector<Measured>& ranks) {
  const int64_t budget = plan.memory_limit_bytes;
  const bool within = budget <= 0 || ms.peak_tracked_bytes <= budget;
  if (!a.quiet) {
    std::printf(
        "foldcube run --plan %s: %s, Evoformer %lld block(s), s=%lld r=%lld, %d thread(s)%s, "
        "profile %s\n",
        a.plan.c_str(), plan.training ? "training step" : "inference",
        static_cast<long long>(plan.cfg.no_blocks), static_cast<long long>(plan.s),
        static_cast<long long>(plan.r), num_threads(), ranks.size() > 1 ? " per rank" : "",
        plan.profile.c_str());
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
    if (ranks.size() > 1)
      for (size_t k = 0; k < ranks.size(); ++k)
        std::printf("    rank %-3zu tracked peak %9.1f MiB, activations %9.1f MiB, %9.1f ms\n", k,
                    mib(ranks[k].peak_tracked_bytes), mib(ranks[k].activation_bytes),
                    ranks[k].time_ms);
    if (budget > 0)
      std::printf("  budget         %12.1f MiB: %s\n", mib(budget),
                  within ? "measured peak within" : "MEASURED PEAK EXCEEDS IT");
  }
  if (!a.report.empty()) {
    nlohmann::json j;
    j["plan"] = nlohmann::json::parse(plan.to_json());
    j["training"] = plan.training;
    j["time_ms_estimate"] = plan.time_ms;
    j["time_ms"] = ms.time_ms;
    j["cpu_ms"] = ms.cpu_ms;
    j["forward_ms_estimate"] = plan.forward_ms;
    j["forward_ms"] = ms.forward_ms;
    j["backward_ms_estimate"] = plan.backward_ms + plan.recompute_ms;
    j["backward_ms"] = ms.backward_ms;
    j["peak_bytes_estimate"] = plan.peak_bytes;
    j["peak_tracked_bytes"] = ms.peak_tracked_bytes;
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
    for (const Measured& m : ranks) {
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

// Every rank's figures (all ranks call it) and their max.
std::vector<Measured> gather_measured(const dist::Communicator& world, const Measured& mine,
                                      Measured* max) {
  auto us = [](double ms) { return static_cast<int64_t>(std::llround(ms * 1e3)); };
  const std::vector<int64_t> t = world.all_gather_i64(us(mine.time_ms));
  const std::vector<int64_t> f = world.all_gather_i64(us(mine.forward_ms));
  const std::vector<int64_t> b = world.all_gather_i64(us(mine.backward_ms));
  const std::vector<int64_t> c = world.all_gather_i64(us(mine.cpu_ms));
  const std::vector<int64_t> p = world.all_gather_i64(mine.peak_tracked_bytes);
  const std::vector<int64_t> act = world.all_gather_i64(mine.activation_bytes);
  std::vector<Measured> all(world.size());
  *max = Measured();
  for (int k = 0; k < world.size(); ++k) {
    Measured& m = all[k];
    m.time_ms = t[k] / 1e3, m.forward_ms = f[k] / 1e3, m.backward_ms = b[k] / 1e3;
    m.cpu_ms = c[k] / 1e3, m.peak_tracked_bytes = p[k], m.activation_bytes = act[k];
    max->time_ms = std::max(max->time_ms, m.time_ms);
    max->forward_ms = std::max(max->forward_ms, m.forward_ms);
    max->backward_ms = std::max(max->backward_ms, m.backward_ms);
    max->cpu_ms = std::max(max->cpu_ms, m.cpu_ms);
    max->peak_tracked_bytes = std::max(max->peak_tracked_bytes, m.peak_tracked_bytes);
    max->activation_bytes = std::max(max->activation_bytes, m.activation_bytes);
  }
  return all;
}
}  // namespace

// `run --plan`: in one process, or under `mpirun -np dap*dp` for a plan with DAP/DP (rank 0
// plans or reads and evaluates the plan and shares it; every rank runs its part and measures;
// rank 0 prints and reports the max over ranks). Errors before the run are rank 0's, printed
// once, and every rank exits 1; executor errors are the same on every rank.
int run_planned(const RunArgs& a) {
  set_num_threads(a.threads);
  const int launched = dist::launched_world_size();
  if (launched == 1) {
    Plan plan;
    Status st = prepare_plan(a, 1, &plan);
    if (!st.ok()) return fail(st);
    Measured ms;
    st = run_plan(plan, a.seed, a.warmup, a.repeats, &ms);
    if (st.ok()) st = report_planned(a, plan, ms, {ms});
    return st.ok() ? 0 : fail(st);
  }
  Status st = dist::init(nullptr, nullptr);
  if (!st.ok()) return fail(st);
  const dist::Communicator world = dist::Communicator::world();
  const int me = world.rank();
  auto end = [&](const Status& s) {  // every rank; rank 0 prints
    if (me == 0 && !s.ok()) fail(s);
    dist::finalize();
    return s.ok() ? 0 : 1;
  };
  if (!world.all_equal(run_args_hash(a)))
    return end(Status::InvalidArgument(
        "the ranks were started with different command lines; every rank of a --plan job needs "
        "the same flags"));
  Plan plan;
  std::string err, text;
  if (me == 0) {
    st = prepare_plan(a, world.size(), &plan);
    if (st.ok())
      text = plan.to_json();
    else
      err = st.message();
  }
  world.broadcast_string(&err, 0);
  if (!err.empty()) return end(Status::InvalidArgument(err));
  world.broadcast_string(&text, 0);
  if (me != 0) {
    st = Plan::from_json(text, &plan);
    FC_CHECK_MSG(st.ok(), "rank 0's plan does not parse");
  }
  Measured mine;
  st = run_plan_dap(plan, world, a.seed, a.warmup, a.repeats, &mine);
  if (!world.all_equal(st.ok()))
    return end(Status::Internal("the ranks disagree on the executor's status: " + st.message()));
  if (!st.ok()) return end(st);
  Measured max;
  const std::vector<Measured> all = gather_measured(world, mine, &max);
  const bool within =
      plan.memory_limit_bytes <= 0 || max.peak_tracked_bytes <= plan.memory_limit_bytes;
  if (me == 0) st = report_planned(a, plan, max, all);
  return end(me == 0 ? st : (within ? Status::OK() : Status::Internal("over budget")));
}

int plan_command(const PlanArgs& a) {
  PlanRequest req;
  Status st;
  if (!a.config.empty()) {
    st = EvoformerConfig::from_json_file(a.config, &req.cfg);
    if (!st.ok()) return fail(st);
  }
  req.cfg.no_blocks = a.blocks;
  req.s = a.s;
  req.r = a.r;
  req.training = a.train;
  st = load_or_calibrate_profile(a.profile, a.calibrate, &req.profile);
  if (!st.ok()) return fail(st);
  req.devices = a.devices;
  // This machine's calibrated profile has no link rate: ranks on this node (profile_for_ranks).
  if (req.profile.calibrated && a.devices > 1) profile_for_ranks(a.devices, &req.profile);
  if (!a.memory.empty()) {
    st = parse_bytes(a.memory, &req.memory_bytes);
    if (!st.ok()) return fail(st);
  }
  if (!a.dtype.empty()) {
    DType t;
    st = parse_plan_dtype(a.dtype, &t);
    if (!st.ok()) return fail(st);
    req.dtype = t;
  }
  if (!a.policy.empty()) {
    st = parse_recompute(a.policy, &req.policy);
    if (!st.ok()) return fail(st);
    req.fixed_policy = true;
  }
  req.chunk = a.chunk;
  if (!a.chunk_target.empty()) {
    st = parse_bytes(a.chunk_target, &req.chunk_target);
    if (!st.ok()) return fail(st);
    if (a.chunk > 0)
      return fail(Status::InvalidArgument("give --chunk or --chunk-target, not both"));
  }
  req.dap = a.dap;
  req.dp = a.dp;
  req.bucket = a.bucket || !a.buckets.empty();
  if (!a.buckets.empty()) {
    st = parse_buckets(a.buckets, &req.buckets);
    if (!st.ok()) return fail(st);
  }
  Plan plan;
  bool hit = false;
  st = a.cache.empty() ? make_plan(req, &plan) : cached_plan(req, a.cache, &plan, &hit);
  if (!st.ok()) return fail(st);
  if (a.json) {
    std::printf("%s\n", plan.to_json().c_str());
  } else {
    std::printf(
        "foldcube plan: %s, s=%lld r=%lld%s blocks=%lld, %s, %d device(s), profile %s\n",
        plan.training ? "training step" : "inference", static_cast<long long>(plan.s),
        static_cast<long long>(plan.r),
        plan.r != plan.r_real ? (" (bucket of r=" + std::to_string(plan.r_real) + ")").c_str() : "",
        static_cast<long long>(plan.cfg.no_blocks), plan_dtype_name(plan.dtype),
        req.devices > 0 ? req.devices : req.profile.devices, plan.profile.c_str());
    std::printf(
        "  estimate    %10.1f ms per step (%.1f ms per protein; forward %.1f, backward "
        "%.1f, recompute %.1f, comm %.1f)\n",
        plan.time_ms, plan.time_per_protein_ms, plan.forward_ms, plan.backward_ms,
        plan.recompute_ms, plan.comm_ms);
    std::printf("  peak        %10.1f MiB per device (limit %.1f MiB)%s\n", mib(plan.peak_bytes),
                mib(plan.memory_limit_bytes), plan.fits ? "" : "  DOES NOT FIT");
    if (plan.training) {
      std::printf("  activations %10.1f MiB\n", mib(plan.activation_bytes));
      int counts[3] = {0, 0, 0};
      for (Recompute p : plan.policy) ++counts[static_cast<int>(p)];
      std::printf("  recompute   none x%d, module x%d, block x%d:", counts[0], counts[1],
                  counts[2]);
      for (Recompute p : plan.policy) std::printf(" %c", recompute_name(p)[0]);
      std::printf("\n");
    }
    std::printf("  dap %d, dp %d, chunk %lld, chunk target %.2f MiB\n", plan.dap, plan.dp,
                static_cast<long long>(plan.chunk), mib(plan.chunk_target_bytes));
    std::printf("  chunks     ");
    for (const auto& [name, n] : plan.module_chunks)
      std::printf(" %s=%lld", name.c_str(), static_cast<long long>(n));
    std::printf("\n  search      %10.2f ms%s\n", plan.search_ms, hit ? " (from cache)" : "");
  }
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

int bench_plan(const BenchArgs& a, const std::string& exe) {
  set_num_threads(a.threads);
  const std::string profile_path = a.profile.empty() ? default_profile_path() : a.profile;
  DeviceProfile dev;
  Status st = load_or_calibrate_profile(a.profile, false, &dev);
  if (!st.ok()) return fail(st);
  dev.threads = num_threads();
  dev.devices = 1;
  int64_t blocks = 2;
  if (!a.blocks.empty()) {
    const auto b = split(a.blocks, ',');
    if (b.size() != 1 || std::atoll(b[0].c_str()) < 1)
      return fail(Status::InvalidArgument("--blocks: one block count >= 1 with --plan"));
    blocks = std::atoll(b[0].c_str());
  }
  int64_t forced_budget = 0;
  if (!a.memory.empty()) {
    st = parse_bytes(a.memory, &forced_budget);
    if (!st.ok()) return fail(st);
  }
  // DAP rows run under mpirun (the same --threads per rank); without MPI their estimates only.
  const bool mpi = dist::have_mpi() && std::system("command -v mpirun > /dev/null 2>&1") == 0;
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
    // A budget that forces choices: a quarter of the way from the smallest feasible peak (the
    // finest chunk target) to the unconstrained plan's peak, unless --memory gives one.
    const std::vector<int64_t> targets = training_chunk_targets(req.cfg, req.s, req.r);
    int64_t budget = forced_budget;
    if (budget <= 0) {
      Plan roomy;
      req.memory_bytes = int64_t{1} << 50;
      st = make_plan(req, &roomy);
      if (!st.ok()) return fail(st);
      int64_t lo = roomy.peak_bytes;
      for (Recompute rc : {Recompute::kNone, Recompute::kModule, Recompute::kBlock}) {
        Plan p = roomy;
        p.policy.assign(blocks, rc);
        p.chunk = 0;
        p.chunk_target_bytes = targets.front();
        if (evaluate_plan(dev, &p).ok()) lo = std::min(lo, p.peak_bytes);
      }
      budget = lo + (roomy.peak_bytes - lo) / 4;
    }
    req.memory_bytes = budget;
    std::vector<BenchRow> rows;
    {
      BenchRow row{"planner", {}};
      st = make_plan(req, &row.plan);
      if (st.ok())
        rows.push_back(row);
      else
        std::fprintf(stderr, "foldcube: planner at %s: %s\n", shape.c_str(), st.message().c_str());
    }
    for (Recompute rc : {Recompute::kNone, Recompute::kModule, Recompute::kBlock})
      for (const auto& [tag, tgt] :
           {std::pair<const char*, int64_t>{"whole", targets.back()},
            {"auto", default_train_chunk_target_bytes(req.cfg, req.s, req.r)},
            {"finest", targets.front()}}) {
        BenchRow row{std::string(recompute_name(rc)) + ", " + tag, {}};
        Plan& p = row.plan;
        p.cfg = req.cfg;
        p.s = req.s;
        p.r = p.r_real = req.r;
        p.training = true;
        p.policy.assign(blocks, rc);
        p.chunk_target_bytes = tgt;
        p.threads = num_threads();
        p.memory_limit_bytes = budget;
        st = evaluate_plan(dev, &p);
        if (!st.ok()) return fail(st);
        rows.push_back(row);
      }
    // DAP over 2 ranks (issue 6's "DAP" and "DAP + chunk"): policy none, whole and finest chunk
    // targets, per-rank memory under the same budget; and the planner given 2 devices.
    {
      PlanRequest r2 = req;
      r2.devices = 2;
      profile_for_ranks(2, &r2.profile);
      BenchRow row{"planner, 2 devices", {}};
      st = make_plan(r2, &row.plan);
      if (st.ok())
        rows.push_back(row);
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
            DapRow{"DAP N=2 + chunk, module, auto", Recompute::kModule,
                   default_train_chunk_target_bytes(req.cfg, req.s, req.r)}}) {
        BenchRow d{dr.tag, {}};
        Plan& p = d.plan;
        p.cfg = req.cfg;
        p.s = req.s;
        p.r = p.r_real = req.r;
        p.training = true;
        p.policy.assign(blocks, dr.rc);
        p.chunk_target_bytes = dr.target;
        p.dap = 2;
        p.threads = num_threads();
        p.memory_limit_bytes = budget;
        st = evaluate_plan(r2.profile, &p);
        if (!st.ok()) return fail(st);
        rows.push_back(d);
      }
    }
    for (BenchRow& row : rows) {
      if (row.plan.fits && row.plan.dap * row.plan.dp > 1 && !mpi) {
        row.note = "estimate only: no MPI";
      } else if (row.plan.fits) {
        st = measure_row(exe, profile_path, &row);
        if (!st.ok()) return fail(st);
      }
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
            counts[0], counts[1], counts[2], mib(p.chunk_target_bytes), p.time_ms,
            mib(p.peak_bytes), p.fits ? ("yes (" + row.note + ")").c_str() : "no");
      std::fflush(stdout);
      all.push_back(
          {{"s", p.s},
           {"r", p.r},
           {"blocks", blocks},
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
           {"plan_json", nlohmann::json::parse(p.to_json())}});
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
