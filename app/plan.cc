// `foldcube plan`: the planner's choice (or a fixed policy's evaluation) and its estimates.
#include "foldcube/plan.h"

#include <cstdio>
#include <fstream>
#include <sstream>

#include "commands.h"
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
}  // namespace

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
