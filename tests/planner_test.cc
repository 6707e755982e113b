// The planner: Plan JSON and validation, device profiles, the search against brute force (and the
// memory decomposition against stack_step_peak_bytes), infeasible budgets, buckets with padded
// inputs, and the plan cache.
#include "foldcube/planner.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "exec/dap.h"
#include "foldcube/plan.h"
#include "foldcube/runtime.h"
#include "plan/memory_model.h"
#include "test_util.h"

namespace fc {
namespace {

using R = Recompute;

EvoformerConfig small_cfg(int64_t blocks) {
  EvoformerConfig cfg = test::small_config();
  cfg.no_blocks = blocks;
  return cfg;
}

// A fixed profile (no calibration in unit tests).
DeviceProfile test_profile(int devices = 1) {
  DeviceProfile p;
  p.name = "test";
  p.devices = devices;
  p.threads = 2;
  p.gemm_gflops = 400;
  p.gemm_half_rows = 300;
  p.gemm_bwd_gflops = 300;
  p.batched_gflops = 250;
  p.attention_gflops = 250;
  p.attention_bwd_gflops = 150;
  p.attention_len_exp = 0.2;
  p.mem_gbps = 15;
  p.link_gbps = 10;
  p.link_latency_us = 20;
  return p;
}

PlanRequest train_request(const EvoformerConfig& cfg, int64_t s, int64_t r, int64_t limit) {
  PlanRequest q;
  q.cfg = cfg;
  q.s = s;
  q.r = r;
  q.training = true;
  q.profile = test_profile();
  q.memory_bytes = limit;
  return q;
}

Plan base_plan(const EvoformerConfig& cfg, int64_t s, int64_t r, std::vector<R> policy) {
  Plan p;
  p.cfg = cfg;
  p.s = s;
  p.r = p.r_real = r;
  p.training = true;
  p.policy = std::move(policy);
  p.threads = 2;
  return p;
}

TEST(Planner, PlanJsonRoundTripAndValidation) {
  const EvoformerConfig cfg = small_cfg(3);
  Plan p = base_plan(cfg, 6, 10, {R::kBlock, R::kModule, R::kNone});
  ASSERT_TRUE(evaluate_plan(test_profile(), &p).ok());
  Plan q;
  ASSERT_TRUE(Plan::from_json(p.to_json(), &q).ok());
  EXPECT_EQ(q.to_json(), p.to_json());
  EXPECT_EQ(q.policy, p.policy);
  EXPECT_EQ(to_train_options(q).policy, p.policy);
  EXPECT_EQ(q.module_chunks.size(), p.module_chunks.size());

  auto bad = [&](auto edit, const std::string& needle) {
    nlohmann::json j = nlohmann::json::parse(p.to_json());
    edit(j);
    Plan x;
    Status st = Plan::from_json(j.dump(), &x);
    EXPECT_FALSE(st.ok()) << needle;
    EXPECT_NE(st.message().find(needle), std::string::npos) << st.message();
  };
  bad([](auto& j) { j["policy"][1] = "sometimes"; }, "unknown recompute policy");
  bad([](auto& j) { j["policy"].erase(0); }, "2 recompute policies for 3 blocks");
  bad([](auto& j) { j["dap"] = 0; }, "dap and dp must be >= 1");
  bad([](auto& j) { j["dtype"] = "fp8"; }, "unknown dtype");
  bad([](auto& j) { j.erase("dp"); }, "missing 'dp'");
  bad([](auto& j) { j["r_real"] = 11; }, "r_real");
  Plan x;
  EXPECT_FALSE(Plan::from_json("{not json", &x).ok());
  EXPECT_FALSE(Plan::from_json("[1, 2]", &x).ok());
}

TEST(Planner, UserProfileFromPeaks) {
  DeviceProfile p;
  ASSERT_TRUE(DeviceProfile::from_json(
                  R"({"name": "a40", "devices": 4, "memory_gb": 40, "dtype": "fp16",
                      "peak_gflops": 150000, "peak_mem_gbps": 1500, "link_gbps": 100,
                      "link_latency_us": 10})",
                  &p)
                  .ok());
  EXPECT_EQ(p.memory_bytes, int64_t{40000000000});
  EXPECT_DOUBLE_EQ(p.gemm_gflops, 0.75 * 150000);
  EXPECT_DOUBLE_EQ(p.mem_gbps, 0.7 * 1500);
  DeviceProfile q;
  ASSERT_TRUE(DeviceProfile::from_json(p.to_json(), &q).ok());
  EXPECT_EQ(q.to_json(), p.to_json());
  Status st = DeviceProfile::from_json(R"({"peak_mem_gbps": 100})", &q);
  EXPECT_NE(st.message().find("peak_gflops"), std::string::npos) << st.message();
  st = DeviceProfile::from_json(R"({"peak_gflops": 1, "peak_mem_gbps": 1, "devices": 2})", &q);
  EXPECT_NE(st.message().find("link_gbps"), std::string::npos) << st.message();
  st = DeviceProfile::from_json(R"({"peak_gflops": 1, "peak_mem_gbps": 1, "dtype": "int4"})", &q);
  EXPECT_NE(st.message().find("dtype"), std::string::npos) << st.message();
  EXPECT_FALSE(DeviceProfile::from_json(R"({"peak_gflops": "fast"})", &q).ok());
}

// A training plan's peak is the memory model's step peak above a fixed base (weights, inputs).
// The backward and training calibration fields round-trip; absent ones take their defaults.
TEST(Planner, ProfileTrainingFieldsRoundTrip) {
  DeviceProfile p = test_profile();
  p.gemm_bwd_half_rows = 40;
  p.gemm_half_cols = 11;
  p.mem_bwd_gbps = 12;
  p.train_fwd_factor = 1.25;
  p.train_bwd_factor = 1.3;
  p.chunk_overhead_us = 100;
  p.module_kernels = 14.5;
  DeviceProfile q;
  ASSERT_TRUE(DeviceProfile::from_json(p.to_json(), &q).ok());
  EXPECT_EQ(q.gemm_bwd_half_rows, 40);
  EXPECT_EQ(q.gemm_half_cols, 11);
  EXPECT_EQ(q.mem_bwd_gbps, 12);
  EXPECT_EQ(q.train_fwd_factor, 1.25);
  EXPECT_EQ(q.train_bwd_factor, 1.3);
  EXPECT_EQ(q.chunk_overhead_us, 100);
  EXPECT_EQ(q.module_kernels, 14.5);
  ASSERT_TRUE(DeviceProfile::from_json(R"({"peak_gflops": 100, "peak_mem_gbps": 10,
      "gemm_half_rows": 50})",
                                       &q)
                  .ok());
  EXPECT_EQ(q.gemm_bwd_half_rows, 50);  // the forward's
  EXPECT_EQ(q.mem_bwd_gbps, q.mem_gbps);
  EXPECT_EQ(q.train_fwd_factor, 1.0);
  const Status st = DeviceProfile::from_json(R"({"peak_gflops": 100, "peak_mem_gbps": 10,
      "train_bwd_factor": -1})",
                                             &q);
  EXPECT_NE(st.message().find("train_bwd_factor"), std::string::npos) << st.message();
  // A smaller training channel group (finer chunk target) costs more: narrow projections.
  EvoformerConfig cfg;
  cfg.no_blocks = 1;
  p.gemm_half_cols = 8;
  const std::vector<int64_t> tg = training_chunk_targets(cfg, 32, 128);
  auto step_ms = [&](int64_t target) {
    double t = 0;
    for (const ModuleCost& c : block_module_costs(cfg, 32, 128, 0, target, true, p))
      t += c.forward_ms + c.backward_ms;
    return t;
  };
  EXPECT_GT(step_ms(tg.front()), step_ms(tg.back()));
}

// The calibrated narrow-projection table and the stream rate round-trip, are validated, and set
// the training triangle multiplication's cost: a group four times narrower at a 4x slower table
// rate costs more, and LN_in(z) sweeps per group are charged at stream_gbps.
TEST(Planner, NarrowTableAndStreamRate) {
  DeviceProfile p = test_profile();
  p.narrow_gemm = {{4, 20, 25}, {16, 80, 90}, {64, 200, 210}};
  p.stream_gbps = 5;
  DeviceProfile q;
  ASSERT_TRUE(DeviceProfile::from_json(p.to_json(), &q).ok());
  EXPECT_EQ(q.narrow_gemm, p.narrow_gemm);
  EXPECT_EQ(q.stream_gbps, p.stream_gbps);
  for (const char* bad : {R"([[4, 20, 25], [4, 80, 90]])", R"([[4, 0, 25]])", R"([[0, 1, 1]])"}) {
    nlohmann::json j = nlohmann::json::parse(p.to_json());
    j["narrow_gemm"] = nlohmann::json::parse(bad);
    const Status st = DeviceProfile::from_json(j.dump(), &q);
    EXPECT_NE(st.message().find("narrow_gemm"), std::string::npos) << bad << ": " << st.message();
  }
  nlohmann::json j = nlohmann::json::parse(p.to_json());
  j["stream_gbps"] = -1;
  EXPECT_NE(DeviceProfile::from_json(j.dump(), &q).message().find("stream_gbps"),
            std::string::npos);
  // A user profile without the fields: the stream rate defaults to mem_gbps.
  ASSERT_TRUE(DeviceProfile::from_json(R"({"peak_gflops": 100, "peak_mem_gbps": 10})", &q).ok());
  EXPECT_EQ(q.stream_gbps, q.mem_gbps);
  EXPECT_TRUE(q.narrow_gemm.empty());

  EvoformerConfig cfg;
  cfg.no_blocks = 1;
  const int64_t s = 32, r = 128, rr = r * r;
  auto tri_mul = [&](const DeviceProfile& d, int64_t target) {
    for (const ModuleCost& c : block_module_costs(cfg, s, r, 0, target, true, d))
      if (c.name == "tri_mul_out") return c;
    return ModuleCost{};
  };
  // Channel groups at these targets (4 r^2 floats per channel): 16 channels, and 1 channel.
  const int64_t wide = 16 * 4 * rr * 4, narrow = 4 * rr * 4;
  const ModuleCost w = tri_mul(p, wide), n = tri_mul(p, narrow);
  EXPECT_GT(n.forward_ms, w.forward_ms);
  EXPECT_GT(n.backward_ms, w.backward_ms);
  // Without the table (a user profile), halving the stream rate adds exactly the sweep time:
  // groups x r^2 c_z floats forward, five times that backward (times the training factors, 1
  // here). With the table its DRAM-sized measurements contain the sweeps: no change.
  DeviceProfile slow = p;
  slow.stream_gbps = p.stream_gbps / 2;
  EXPECT_EQ(tri_mul(slow, narrow).forward_ms, n.forward_ms);
  DeviceProfile user = p, user_slow = slow;
  user.narrow_gemm.clear(), user_slow.narrow_gemm.clear();
  user.gemm_half_cols = user_slow.gemm_half_cols = 8;
  const ModuleCost nu = tri_mul(user, narrow), ns = tri_mul(user_slow, narrow);
  const double sweep_ms = 128.0 * rr * cfg.c_z * 4 / (p.stream_gbps * 1e9) * 1e3;
  EXPECT_NEAR(ns.forward_ms - nu.forward_ms, sweep_ms, 1e-6 * sweep_ms);
  EXPECT_NEAR(ns.backward_ms - nu.backward_ms, 5 * sweep_ms, 1e-6 * sweep_ms);
}

// Calibrated tables by row count and by working set: validated like narrow_gemm; the working-set
// rate charges big chunks' memory-bound passes; the search keeps training targets inside the
// largest calibrated working set.
TEST(Planner, RowAndWorkingSetTables) {
  DeviceProfile p = test_profile();
  p.gemm_by_rows = {{16, 50, 60}, {256, 300, 250}, {8192, 400, 300}};
  p.mem_by_size = {{4 << 20, 60, 50}, {256 << 20, 20, 15}};
  DeviceProfile q;
  ASSERT_TRUE(DeviceProfile::from_json(p.to_json(), &q).ok());
  EXPECT_EQ(q.gemm_by_rows, p.gemm_by_rows);
  EXPECT_EQ(q.mem_by_size, p.mem_by_size);
  for (const char* key : {"gemm_by_rows", "mem_by_size"}) {
    nlohmann::json j = nlohmann::json::parse(p.to_json());
    j[key] = nlohmann::json::parse("[[8, 1, 1], [4, 1, 1]]");
    EXPECT_NE(DeviceProfile::from_json(j.dump(), &q).message().find(key), std::string::npos);
  }
  EvoformerConfig cfg;
  cfg.no_blocks = 1;
  auto step_ms = [&](const DeviceProfile& d, int64_t target) {
    double t = 0;
    for (const ModuleCost& c : block_module_costs(cfg, 32, 128, 0, target, true, d))
      t += c.forward_ms + c.backward_ms;
    return t;
  };
  // Slower memory at big working sets: the whole-axis target costs more than with flat rates.
  DeviceProfile flat = p;
  flat.mem_by_size = {{4 << 20, 60, 50}, {256 << 20, 60, 50}};
  const int64_t whole = training_chunk_targets(cfg, 32, 128).back();
  EXPECT_GT(step_ms(p, whole), step_ms(flat, whole));
  // The search stays within the largest calibrated working set (here 4 MiB) when a roomy budget
  // would otherwise take the whole-axis target.
  PlanRequest req = train_request(cfg, 32, 128, int64_t{1} << 40);
  req.profile = p;
  req.profile.mem_by_size = {{1 << 20, 60, 50}, {4 << 20, 40, 30}};
  Plan plan;
  ASSERT_TRUE(make_plan(req, &plan).ok());
  EXPECT_LE(plan.chunk_target_bytes, int64_t{4} << 20);
  req.profile.mem_by_size.clear();
  ASSERT_TRUE(make_plan(req, &plan).ok());
  EXPECT_EQ(plan.chunk_target_bytes, whole);
}

TEST(Planner, DecompositionMatchesMemoryModel) {
  for (bool af2 : {false, true}) {
    EvoformerConfig cfg = af2 ? EvoformerConfig() : small_cfg(5);
    cfg.no_blocks = 5;
    const int64_t s = af2 ? 8 : 7, r = af2 ? 32 : 11;
    int64_t first_base = 0;
    for (int code = 0; code < 243; code += 7) {
      std::vector<R> pol;
      for (int b = 0, c = code; b < 5; ++b, c /= 3) pol.push_back(static_cast<R>(c % 3));
      // A fixed-policy request evaluates the same order through the search path.
      Plan p = base_plan(cfg, s, r, pol);
      ASSERT_TRUE(evaluate_plan(test_profile(), &p).ok());
      const int64_t base = p.peak_bytes - stack_step_peak_bytes(cfg, s, r, 5, pol, 2);
      if (code == 0) first_base = base;
      EXPECT_EQ(base, first_base);  // weights and inputs, whatever the policies
    }
  }
}

// Exhaustive search over 3^B orders times the chunk targets against make_plan on the same model
// (extra_msa: the ExtraMSA stack's plans; dtype BF16: the bf16 kept inputs of `run --dtype bf16`).
void expect_optimal(const EvoformerConfig& cfg, int64_t s, int64_t r, bool extra_msa = false,
                    DType dtype = DType::F32) {
  const int B = static_cast<int>(cfg.no_blocks);
  std::vector<Plan> all;
  int total = 1;
  for (int b = 0; b < B; ++b) total *= 3;
  int64_t lo = INT64_MAX, hi = 0;
  const std::vector<int64_t> targets = training_chunk_targets(cfg, s, r, extra_msa);
  for (int64_t tgt : targets)
    for (int code = 0; code < total; ++code) {
      std::vector<R> pol;
      for (int b = 0, c = code; b < B; ++b, c /= 3) pol.push_back(static_cast<R>(c % 3));
      Plan p = base_plan(cfg, s, r, pol);
      p.extra_msa = extra_msa;
      p.dtype = dtype;
      p.chunk_target_bytes = tgt;
      ASSERT_TRUE(evaluate_plan(test_profile(), &p).ok());
      lo = std::min(lo, p.peak_bytes);
      hi = std::max(hi, p.peak_bytes);
      all.push_back(p);
    }
  for (int i = 0; i <= 12; ++i) {
    const int64_t limit = lo + (hi - lo) * i / 12;
    double best = INFINITY;
    for (const Plan& p : all)
      if (p.peak_bytes <= limit) best = std::min(best, p.time_ms);
    Plan got;
    PlanRequest req = train_request(cfg, s, r, limit);
    req.extra_msa = extra_msa;
    req.dtype = dtype;
    Status st = make_plan(req, &got);
    ASSERT_TRUE(st.ok()) << st.message();
    EXPECT_EQ(got.extra_msa, extra_msa);
    EXPECT_LE(got.peak_bytes, limit);
    EXPECT_NEAR(got.time_ms, best, 1e-9 * best) << "limit " << limit;
    // The plan's own peak is the memory model's.
    Plan check = base_plan(cfg, s, r, got.policy);
    check.extra_msa = extra_msa;
    check.dtype = dtype;
    check.chunk_target_bytes = got.chunk_target_bytes;
    ASSERT_TRUE(evaluate_plan(test_profile(), &check).ok());
    EXPECT_EQ(check.peak_bytes, got.peak_bytes);
  }
  Plan none;
  PlanRequest req = train_request(cfg, s, r, lo - 1);
  req.extra_msa = extra_msa;
  req.dtype = dtype;
  Status st = make_plan(req, &none);
  EXPECT_EQ(st.code(), Status::Code::kOutOfMemory);
  EXPECT_NE(st.message().find("smallest feasible budget"), std::string::npos) << st.message();
}

TEST(Planner, SearchIsOptimalSmallConfig) {
  expect_optimal(small_cfg(4), 7, 11);
  expect_optimal(small_cfg(5), 20, 8);
}

// Under BF16 storage a block that is not the last widens its bf16 outputs in its backward, and the
// input it holds for the previous block is a bf16 kept one: the search's position decomposition
// takes per-position terms and stays exact.
TEST(Planner, SearchIsOptimalBf16) {
  expect_optimal(small_cfg(4), 7, 11, false, DType::BF16);
  EvoformerConfig extra = small_cfg(4);
  extra.c_m = 16;
  expect_optimal(extra, 7, 11, true, DType::BF16);
}

// The ExtraMSA stack: the same search over its block table, and the plan keeps its stack through
// JSON.
TEST(Planner, SearchIsOptimalExtraMsa) {
  EvoformerConfig cfg = small_cfg(4);
  cfg.c_m = 16;
  expect_optimal(cfg, 9, 11, true);
  EvoformerConfig af2;  // AF2 extra-MSA dims: c_e = 64, 8 heads of 8
  af2.c_m = 64;
  af2.c_hidden_msa_att = 8;
  af2.no_blocks = 4;
  expect_optimal(af2, 64, 24, true);
  Plan p = base_plan(af2, 64, 24, std::vector<R>(4, R::kModule));
  p.extra_msa = true;
  ASSERT_TRUE(evaluate_plan(test_profile(), &p).ok());
  Plan back;
  ASSERT_TRUE(Plan::from_json(p.to_json(), &back).ok());
  EXPECT_TRUE(back.extra_msa);
  EXPECT_EQ(back.policy, p.policy);
  // DAP and inference plans of the ExtraMSA stack (issue 16; ExtraMsaPlan.*).
  p.dap = 2;
  EXPECT_TRUE(p.validate().ok());
  PlanRequest q = train_request(af2, 64, 24, int64_t{1} << 34);
  q.extra_msa = true;
  q.training = false;
  Plan inf;
  EXPECT_TRUE(make_plan(q, &inf).ok());
}

TEST(Planner, SearchIsOptimalAf2Dims) {
  EvoformerConfig cfg;
  cfg.no_blocks = 5;
  expect_optimal(cfg, 16, 48);
}

TEST(Planner, FortyEightBlocksUnderASecond) {
  EvoformerConfig cfg;  // AF2 model_1, 48 blocks
  PlanRequest q = train_request(cfg, 128, 256, int64_t{20} << 30);
  q.profile = test_profile(4);
  const auto t0 = std::chrono::steady_clock::now();
  Plan p;
  ASSERT_TRUE(make_plan(q, &p).ok());
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_LT(ms, 3000 * test::kTimeScale);  // typically well under 1 s; generous on a busy host
  EXPECT_LE(p.peak_bytes, q.memory_bytes);
  EXPECT_EQ(p.policy.size(), 48u);
  EXPECT_LE(p.dap * p.dp, 4);
  // Nothing fits: the error names the smallest feasible budget, and that budget works.
  q.memory_bytes = int64_t{1} << 30;
  q.profile = test_profile(1);
  Status st = make_plan(q, &p);
  ASSERT_EQ(st.code(), Status::Code::kOutOfMemory);
  EXPECT_NE(st.message().find("smallest feasible budget"), std::string::npos);
}

TEST(Planner, FixedPolicyAndRequestErrors) {
  EvoformerConfig cfg;
  PlanRequest q = train_request(cfg, 128, 256, int64_t{40} << 30);
  q.fixed_policy = true;
  for (R pol : {R::kNone, R::kModule, R::kBlock}) {
    q.policy = pol;
    Plan p;
    ASSERT_TRUE(make_plan(q, &p).ok());
    EXPECT_EQ(p.policy, std::vector<R>(48, pol));
    EXPECT_EQ(p.activation_bytes,
              stack_activation_bytes(cfg, 128, 256, 48, {pol}, 4, 0, p.chunk_target_bytes));
  }
  Plan p;
  q.fixed_policy = false;
  q.dap = 2;  // one device only
  EXPECT_FALSE(make_plan(q, &p).ok());
  q.dap = 0;
  q.dtype = DType::F64;  // not a planner precision
  EXPECT_FALSE(make_plan(q, &p).ok());
  q.dtype.reset();
  q.memory_bytes = 0;
  EXPECT_NE(make_plan(q, &p).message().find("memory limit"), std::string::npos);
  q.memory_bytes = int64_t{40} << 30;
  q.training = false;
  q.fixed_policy = true;
  EXPECT_FALSE(make_plan(q, &p).ok());
}

// Training: with room the whole-axis target (fastest) wins; a budget below the unchunked peaks
// of every order forces a finer target, at a higher estimated time.
TEST(Planner, TrainingChunkSearch) {
  EvoformerConfig cfg;
  cfg.no_blocks = 4;
  const std::vector<int64_t> targets = training_chunk_targets(cfg, 32, 128);
  ASSERT_GE(targets.size(), 3u);
  for (size_t i = 1; i < targets.size(); ++i) EXPECT_GT(targets[i], targets[i - 1]);
  Plan roomy, tight;
  ASSERT_TRUE(make_plan(train_request(cfg, 32, 128, int64_t{40} << 30), &roomy).ok());
  EXPECT_EQ(roomy.chunk_target_bytes, targets.back());
  EXPECT_EQ(roomy.policy, std::vector<R>(4, R::kNone));
  // The smallest unchunked peak over all 3^4 orders, minus one byte.
  int64_t limit = INT64_MAX;
  for (int code = 0; code < 81; ++code) {
    std::vector<R> pol;
    for (int b = 0, c = code; b < 4; ++b, c /= 3) pol.push_back(static_cast<R>(c % 3));
    Plan whole = base_plan(cfg, 32, 128, pol);
    whole.chunk_target_bytes = targets.back();
    ASSERT_TRUE(evaluate_plan(test_profile(), &whole).ok());
    limit = std::min(limit, whole.peak_bytes - 1);
  }
  Status st = make_plan(train_request(cfg, 32, 128, limit), &tight);
  ASSERT_TRUE(st.ok()) << st.message();
  EXPECT_LT(tight.chunk_target_bytes, targets.back());
  EXPECT_LE(tight.peak_bytes, limit);
  EXPECT_GT(tight.time_ms, roomy.time_ms);
  const TrainOptions to = to_train_options(tight);
  EXPECT_EQ(to.chunk_target_bytes, tight.chunk_target_bytes);
  EXPECT_EQ(tight.peak_bytes - stack_step_peak_bytes(cfg, 32, 128, 4, tight.policy, 2, 4, 0,
                                                     tight.chunk_target_bytes),
            roomy.peak_bytes - stack_step_peak_bytes(cfg, 32, 128, 4, roomy.policy, 2, 4, 0,
                                                     roomy.chunk_target_bytes));
  // A forced chunk is searched over the policies only.
  PlanRequest q = train_request(cfg, 32, 128, int64_t{40} << 30);
  q.chunk = 8;
  ASSERT_TRUE(make_plan(q, &tight).ok());
  EXPECT_EQ(tight.chunk, 8);
}

TEST(Planner, InferenceChunkSearchFitsBudget) {
  EvoformerConfig cfg;
  PlanRequest q;
  q.cfg = cfg;
  q.s = 128;
  q.r = 512;
  q.profile = test_profile();
  q.memory_bytes = int64_t{8} << 30;
  Plan roomy, tight;
  ASSERT_TRUE(make_plan(q, &roomy).ok());
  const int64_t weights_and_inputs =
      roomy.peak_bytes -
      forward_peak_bytes(cfg, 128, 512, true, roomy.chunk, roomy.chunk_target_bytes, 2);
  const int64_t finest = forward_peak_bytes(cfg, 128, 512, true, 0, 16 << 10, 2);
  q.memory_bytes =
      weights_and_inputs + (finest + forward_peak_bytes(cfg, 128, 512, true, 0, 0, 2)) / 2;
  Status st = make_plan(q, &tight);
  ASSERT_TRUE(st.ok()) << st.message();
  EXPECT_LE(tight.peak_bytes, q.memory_bytes);
  EXPECT_LT(tight.peak_bytes, roomy.peak_bytes);
  EXPECT_GE(tight.time_ms, roomy.time_ms);  // smaller chunks: smaller GEMMs
  ForwardOptions fo = to_forward_options(tight);
  EXPECT_EQ(fo.chunk_target_bytes, tight.chunk_target_bytes);
}

TEST(Planner, DapCommunicationVolume) {
  EvoformerConfig cfg;
  EXPECT_EQ(dap_block_comm(cfg, 128, 256, 1, 4).all_to_all_bytes, 0);
  // Sent + received = twice what each rank sends (docs/dap.md: 84 MiB sent at N = 2, 90 MiB at
  // N = 4 for (128, 256)), padded shapes included.
  EXPECT_EQ(dap_block_comm(cfg, 128, 256, 2, 4).all_to_all_bytes, 2 * (48 << 20));
  EXPECT_EQ(dap_block_comm(cfg, 128, 256, 2, 4).all_gather_bytes, 2 * (36 << 20));
  EXPECT_EQ(dap_block_comm(cfg, 128, 256, 4, 4).all_to_all_bytes, 2 * (36 << 20));
  for (int n : {2, 3, 4})
    for (auto [s, r] : {std::pair<int64_t, int64_t>{128, 256}, {5, 7}, {33, 70}}) {
      const DapBlockVolume v = dap_block_volume(cfg, dap_layout(s, r, n, 0));
      const DapComm c = dap_block_comm(cfg, s, r, n, 4);
      EXPECT_EQ(c.all_to_all_bytes, 2 * v.all_to_all_bytes);
      EXPECT_EQ(c.all_gather_bytes, 2 * v.all_gather_bytes);
      EXPECT_EQ(dap_block_comm(cfg, s, r, n, 2).all_gather_bytes, v.all_gather_bytes);
    }
  // The backward per policy: docs/dap.md's measured (counted = model) bytes sent per rank at
  // (32, 64): N = 2: 7.875 / 10.0 / 13.125 MiB, N = 4: 9.188 / 12.375 / 14.812 MiB.
  const double sent[2][3] = {{7.875, 10.0, 13.125}, {9.1875, 12.375, 14.8125}};
  for (int i = 0; i < 2; ++i)
    for (int p = 0; p < 3; ++p) {
      const DapComm b = dap_block_backward_comm(cfg, 32, 64, i == 0 ? 2 : 4, 4, static_cast<R>(p));
      EXPECT_NEAR((b.all_to_all_bytes + b.all_gather_bytes) / 2 / 1048576.0, sent[i][p], 0.001)
          << i << " " << p;
    }
}

// The seeds' collectives (docs/planner.md "The seeds' collectives"): the PASDAP form's volume by
// hand at (128, 256), N = 2, fp16, and the device copies at the stream rate; the fields
// round-trip and are validated.
TEST(Planner, SeedsPasdapCommunicationAndCopies) {
  EvoformerConfig cfg;
  const double m = 128.0 * 256 * 256, z = 256.0 * 256 * 128;
  // Forward: 2 m + 7 z all-to-all'd, each rank sends (N - 1) / N^2 = 1/4; gathers of the whole
  // z, the OPM's right operand [128, 256, 32], two [256, 256, 128] and two [256, 256, 4]: 1/2.
  const double a2a = (2 * m + 7 * z) / 4, gather = (z + 128.0 * 256 * 32 + 2 * z + 2 * z / 32) / 2;
  const DapComm f = pasdap_block_comm(cfg, 128, 256, 2, 2, false, Recompute::kNone);
  EXPECT_EQ(f.all_to_all_bytes, static_cast<int64_t>(2 * 2 * a2a));
  EXPECT_EQ(f.all_gather_bytes, static_cast<int64_t>(2 * 2 * gather));
  EXPECT_EQ(f.all_to_all_calls, 9);
  EXPECT_EQ(f.all_gather_calls, 6);
  EXPECT_EQ(f.dap, 2);
  // Backward: the same reversed; a block recompute doubles both, a module recompute the gathers.
  const DapComm bn = pasdap_block_comm(cfg, 128, 256, 2, 2, true, Recompute::kNone);
  const DapComm bm = pasdap_block_comm(cfg, 128, 256, 2, 2, true, Recompute::kModule);
  const DapComm bb = pasdap_block_comm(cfg, 128, 256, 2, 2, true, Recompute::kBlock);
  EXPECT_EQ(bn.all_to_all_bytes, f.all_to_all_bytes);
  EXPECT_EQ(bm.all_to_all_bytes, f.all_to_all_bytes);
  EXPECT_EQ(bm.all_gather_bytes, 2 * f.all_gather_bytes);
  EXPECT_EQ(bb.all_to_all_bytes, 2 * f.all_to_all_bytes);
  EXPECT_EQ(bb.all_to_all_calls, 18);
  EXPECT_EQ(pasdap_block_comm(cfg, 128, 256, 1, 2, false, Recompute::kNone).all_gather_bytes, 0);

  DeviceProfile d = test_profile();
  d.link_gbps = 100, d.link_latency_us = 0, d.stream_gbps = 50;
  const double link_ms = (f.all_to_all_bytes + f.all_gather_bytes) / 100e9 * 1e3;
  EXPECT_NEAR(comm_ms(f, d), link_ms, 1e-9);
  // 3 passes over each all-to-all's per-rank shard (T / N), 4 over each gathered tensor.
  d.collective_a2a_copies = 3, d.collective_gather_copies = 4;
  const double copied = 3 * (2 * m + 7 * z) / 2 * 2 + 4 * 2 * gather * 2;
  EXPECT_NEAR(comm_ms(f, d), link_ms + copied / 50e9 * 1e3, 1e-6);
  d.dap_form = "pasdap";
  DeviceProfile q;
  ASSERT_TRUE(DeviceProfile::from_json(d.to_json(), &q).ok());
  EXPECT_EQ(q.collective_a2a_copies, 3);
  EXPECT_EQ(q.collective_gather_copies, 4);
  EXPECT_EQ(q.dap_form, "pasdap");
  nlohmann::json j = nlohmann::json::parse(d.to_json());
  j["dap_form"] = "ring";
  EXPECT_NE(DeviceProfile::from_json(j.dump(), &q).message().find("dap_form"), std::string::npos);
  j = nlohmann::json::parse(d.to_json());
  j["collective_gather_copies"] = -1;
  EXPECT_NE(DeviceProfile::from_json(j.dump(), &q).message().find("collective_gather_copies"),
            std::string::npos);
}

// Per-rank DAP inference peak against the measurements of docs/dap.md (AF2 dims, one block, one
// thread per rank, rank 0's absolute tracked peak, which is every run's largest): within 10 %.
TEST(Planner, DapInferencePeakMatchesMeasured) {
  struct Row {
    int64_t s, r;
    int n;
    double rank0_mib;
  };
  for (const Row& row : {Row{64, 128, 2, 31.7}, Row{64, 128, 4, 27.7}, Row{128, 256, 2, 104.8},
                         Row{128, 256, 4, 88.8}}) {
    EvoformerConfig cfg;
    cfg.no_blocks = 1;
    Plan p;
    p.cfg = cfg;
    p.s = row.s;
    p.r = p.r_real = row.r;
    p.dap = row.n;
    p.threads = 1;
    ASSERT_TRUE(evaluate_plan(test_profile(4), &p).ok());
    const double est = p.peak_bytes / 1048576.0;
    std::printf("DAP (%lld, %lld) N=%d: estimate %.1f MiB, measured %.1f MiB\n",
                static_cast<long long>(row.s), static_cast<long long>(row.r), row.n, est,
                row.rank0_mib);
    EXPECT_NEAR(est, row.rank0_mib, 0.05);  // the model is exact; the figures are rounded
  }
}

TEST(Planner, BucketsAndCache) {
  int64_t b = 0;
  ASSERT_TRUE(bucket_residues(300, default_buckets(), &b).ok());
  EXPECT_EQ(b, 512);
  ASSERT_TRUE(bucket_residues(256, default_buckets(), &b).ok());
  EXPECT_EQ(b, 256);
  EXPECT_FALSE(bucket_residues(6000, default_buckets(), &b).ok());
  EXPECT_FALSE(bucket_residues(10, {64, 32}, &b).ok());

  PlanRequest q = train_request(small_cfg(3), 6, 21, int64_t{1} << 30);
  q.bucket = true;
  q.buckets = {16, 32, 64};
  const test::TempDir tmp;
  const std::string dir = tmp.file("plan_cache");
  Plan p1, p2;
  bool hit = true;
  ASSERT_TRUE(cached_plan(q, dir, &p1, &hit).ok());
  EXPECT_FALSE(hit);
  EXPECT_EQ(p1.r, 32);
  EXPECT_EQ(p1.r_real, 21);
  q.r = 30;  // same bucket, same key
  ASSERT_TRUE(cached_plan(q, dir, &p2, &hit).ok());
  EXPECT_TRUE(hit);
  EXPECT_EQ(p2.to_json(), p1.to_json());
  q.memory_bytes /= 2;  // another budget, another entry
  EXPECT_NE(plan_cache_key(q), plan_cache_key(train_request(small_cfg(3), 6, 21, 1 << 30)));
}

// Padded residues with zero masks leave the real residues' outputs unchanged.
TEST(Planner, PaddedForwardMatchesUnpadded) {
  const EvoformerConfig cfg = small_cfg(2);
  EvoformerStack stack = EvoformerStack::random(cfg, 11);
  const int64_t s = 5, r = 13, rp = 16;
  Tensor m = Tensor::empty({s, r, cfg.c_m}), z = Tensor::empty({r, r, cfg.c_z});
  for (int64_t i = 0; i < m.numel(); ++i) m.f32()[i] = std::sin(0.37f * i);
  for (int64_t i = 0; i < z.numel(); ++i) z.f32()[i] = std::cos(0.21f * i);
  Tensor msa_mask = Tensor::full({s, r}, 1.f), pair_mask = Tensor::full({r, r}, 1.f);
  msa_mask.f32()[2 * r + 4] = 0.f;  // a real masked position stays masked
  Tensor mp = m.clone(), zp = z.clone(), mmp = msa_mask.clone(), pmp = pair_mask.clone();
  ASSERT_TRUE(pad_residues(rp, &mp, &zp, &mmp, &pmp).ok());
  Tensor s_out, sp_out;
  ASSERT_TRUE(stack.forward(m, z, msa_mask, pair_mask, &s_out).ok());
  ASSERT_TRUE(stack.forward(mp, zp, mmp, pmp, &sp_out).ok());
  double dm = 0, dz = 0, scale = 0;
  for (int64_t i = 0; i < s; ++i)
    for (int64_t j = 0; j < r; ++j)
      for (int64_t c = 0; c < cfg.c_m; ++c) {
        const float a = m.f32()[(i * r + j) * cfg.c_m + c];
        dm = test::max_nan(dm, double(std::abs(a - mp.f32()[(i * rp + j) * cfg.c_m + c])));
        scale = test::max_nan(scale, double(std::abs(a)));
      }
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = 0; j < r; ++j)
      for (int64_t c = 0; c < cfg.c_z; ++c)
        dz = test::max_nan(dz, double(std::abs(z.f32()[(i * r + j) * cfg.c_z + c] -
                                               zp.f32()[(i * rp + j) * cfg.c_z + c])));
  std::printf("padded vs unpadded: max|dm| %.3g, max|dz| %.3g (max|m| %.3g)\n", dm, dz, scale);
  EXPECT_LT(dm, 1e-5 * std::max(scale, 1.0));
  EXPECT_LT(dz, 1e-5 * std::max(scale, 1.0));
  Tensor bad = Tensor::empty({3, 3});
  EXPECT_FALSE(pad_residues(8, &bad, &zp, &mmp, &pmp).ok());
  EXPECT_FALSE(pad_residues(4, &mp, &zp, &mmp, &pmp).ok());
}

}  // namespace
}  // namespace fc
