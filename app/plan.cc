// `foldcube plan`: the planner's choice (or a fixed policy's evaluation) and its estimates.
#include "foldcube/plan.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "commands.h"
#include "core/rng.h"
#include "foldcube/memory.h"
#include "foldcube/planner.h"
#include "foldcube/runtime.h"

namespace fc::app {

namespace {
int fail(const Status& st) {
  std::fprintf(stderr, "foldcube: error: %s\n", st.message().c_str());
  return 1;
}

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

Tensor random_tensor(const Shape& shape, uint64_t seed) {
  Tensor t = Tensor::empty(shape);
  float* p = t.f32();
  const int64_t n = t.numel();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) p[i] = uniform_pm1(seed, i) * 1.7320508f;  // unit variance
  return t;
}

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
  int64_t peak_tracked_bytes = 0;  // absolute tracked peak: weights, inputs, masks, work
  int64_t activation_bytes = 0;    // training: kept from forward for backward
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

// Runs `plan` on random weights and inputs (all-ones masks) in this process. Only the tensors the
// planner's base accounts for are live: weights, m, z, masks and, for training, the output
// gradients; inputs are regenerated before every pass (untimed).
Status run_plan(const Plan& plan, uint64_t seed, int warmup, int repeats, Measured* out) {
  if (plan.dap > 1 || plan.dp > 1)
    return Status::InvalidArgument("this plan has dap=" + std::to_string(plan.dap) +
                                   ", dp=" + std::to_string(plan.dp) +
                                   "; run --plan executes single-process plans only");
  if (plan.dtype != "fp32")
    return Status::InvalidArgument("the engine runs fp32; this plan is for " + plan.dtype);
  if (plan.threads != num_threads())
    return Status::InvalidArgument("the plan is for " + std::to_string(plan.threads) +
                                   " thread(s), this run has " + std::to_string(num_threads()));
  const EvoformerConfig& cfg = plan.cfg;
  const int64_t s = plan.s, r = plan.r;
  EvoformerStack stack = EvoformerStack::random(cfg, seed);
  const Tensor msa_mask = Tensor::full({s, r}, 1.f), pair_mask = Tensor::full({r, r}, 1.f);
  Tensor gm, gz;
  if (plan.training) {
    gm = random_tensor({s, r, cfg.c_m}, seed * 2 + 3);
    gz = random_tensor({r, r, cfg.c_z}, seed * 2 + 4);
  }
  std::vector<double> tot, fwd, bwd;
  for (int it = 0; it < warmup + repeats; ++it) {
    Tensor m = random_tensor({s, r, cfg.c_m}, seed * 2 + 1);
    Tensor z = random_tensor({r, r, cfg.c_z}, seed * 2 + 2);
    MemoryScope scope;
    if (plan.training) {
      TrainOptions o = to_train_options(plan);
      o.seed = seed;
      TrainResult res;
      FC_RETURN_IF_ERROR(stack.train_step(m, z, msa_mask, pair_mask, gm, gz, o, &res));
      if (it >= warmup) {
        fwd.push_back(res.forward_ms);
        bwd.push_back(res.backward_ms);
        tot.push_back(res.forward_ms + res.backward_ms);
      }
      out->activation_bytes = res.activation_bytes;
    } else {
      Tensor s_out;
      const auto t0 = std::chrono::steady_clock::now();
      FC_RETURN_IF_ERROR(
          stack.forward(m, z, msa_mask, pair_mask, &s_out, to_forward_options(plan)));
      const double ms =
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      if (it >= warmup) tot.push_back(ms), fwd.push_back(ms);
    }
    out->peak_tracked_bytes = std::max(out->peak_tracked_bytes, scope.peak());
  }
  out->time_ms = median(tot);
  out->forward_ms = median(fwd);
  out->backward_ms = median(bwd);
  return Status::OK();
}
}  // namespace

int run_planned(const RunArgs& a) {
  set_num_threads(a.threads);
  const bool training = a.backward || a.train || !a.grad_outputs.empty() || !a.policy.empty();
  if (!a.policy.empty() || a.chunk > 0)
    return fail(Status::InvalidArgument(
        "--plan chooses the recompute policies and chunk sizes; drop --policy / --chunk"));
  if (a.train)
    return fail(Status::InvalidArgument(
        "--plan models the step without dropout; use --backward instead of --train"));
  if (a.dap > 0)
    return fail(Status::InvalidArgument("--plan runs single-process plans (no --dap yet)"));
  if (!a.weights.empty() || !a.inputs.empty() || !a.grad_outputs.empty() || !a.out.empty() ||
      a.stack == "extra_msa" || a.profile)
    return fail(Status::InvalidArgument(
        "--plan runs the Evoformer stack on random weights and inputs (--s, --r, --blocks, "
        "--config, --seed); drop --weights, --inputs, --grad-outputs, --out, --stack, --profile"));
  DeviceProfile dev;
  Status st = load_or_calibrate_profile(a.plan_profile, false, &dev);
  if (!st.ok()) return fail(st);
  dev.threads = num_threads();  // memory (per-thread scratch) follows this run's threads
  int64_t budget = 0;
  if (!a.memory_budget.empty()) {
    st = parse_bytes(a.memory_budget, &budget);
    if (!st.ok()) return fail(st);
  }
  Plan plan;
  if (a.plan == "auto") {
    if (budget <= 0)
      return fail(Status::InvalidArgument("--plan auto needs --memory-budget (e.g. 2GiB)"));
    PlanRequest req;
    if (!a.config.empty()) {
      st = EvoformerConfig::from_json_file(a.config, &req.cfg);
      if (!st.ok()) return fail(st);
    }
    req.cfg.no_blocks = a.blocks;
    req.s = a.s;
    req.r = a.r;
    req.training = training;
    req.profile = dev;
    req.devices = 1;
    req.memory_bytes = budget;
    req.dtype = "fp32";
    st = make_plan(req, &plan);
    if (!st.ok()) return fail(st);
  } else {
    std::string text;
    st = read_text(a.plan, &text);
    if (st.ok()) st = Plan::from_json(text, &plan);
    if (!st.ok()) return fail(Status::InvalidArgument(a.plan + ": " + st.message()));
    if (training && !plan.training)
      return fail(Status::InvalidArgument(a.plan + " is an inference plan; drop --backward"));
    plan.threads = num_threads();
    if (budget > 0) plan.memory_limit_bytes = budget;
    st = evaluate_plan(dev, &plan);  // this machine's estimates for the saved choices
    if (!st.ok()) return fail(st);
    budget = plan.memory_limit_bytes;
  }
  Measured ms;
  st = run_plan(plan, a.seed, a.warmup, a.repeats, &ms);
  if (!st.ok()) return fail(st);
  const bool within = budget <= 0 || ms.peak_tracked_bytes <= budget;
  if (!a.quiet) {
    std::printf(
        "foldcube run --plan %s: %s, Evoformer %lld block(s), s=%lld r=%lld, %d thread(s), "
        "profile %s\n",
        a.plan.c_str(), plan.training ? "training step" : "inference",
        static_cast<long long>(plan.cfg.no_blocks), static_cast<long long>(plan.s),
        static_cast<long long>(plan.r), num_threads(), plan.profile.c_str());
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
    if (plan.training) {
      row("forward", plan.forward_ms, ms.forward_ms, "ms");
      row("backward+rec.", plan.backward_ms + plan.recompute_ms, ms.backward_ms, "ms");
      row("activations", mib(plan.activation_bytes), mib(ms.activation_bytes), "MiB");
    }
    row("tracked peak", mib(plan.peak_bytes), mib(ms.peak_tracked_bytes), "MiB");
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
    std::ofstream f(a.report);
    f << j.dump(2) << "\n";
    if (!f) return fail(Status::IOError("cannot write report " + a.report));
  }
  if (!within)
    return fail(Status::Internal("measured peak " + std::to_string(ms.peak_tracked_bytes) +
                                 " B exceeds the budget " + std::to_string(budget) + " B"));
  return 0;
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
  if (!a.memory.empty()) {
    st = parse_bytes(a.memory, &req.memory_bytes);
    if (!st.ok()) return fail(st);
  }
  req.dtype = a.dtype;
  if (!a.policy.empty()) {
    st = parse_recompute(a.policy, &req.policy);
    if (!st.ok()) return fail(st);
    req.fixed_policy = true;
  }
  req.chunk = a.chunk;
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
        static_cast<long long>(plan.cfg.no_blocks), plan.dtype.c_str(),
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

}  // namespace fc::app
