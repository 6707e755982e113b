// `foldcube plan` end to end: the JSON fields, fixed policies, buckets, and one-line errors.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "test_util.h"

namespace fc {
namespace {

using test::Result;
using test::run_cli;

// A fixed device profile, so the tests never calibrate. One file per test process, written once:
// CTest runs the tests of this binary in parallel processes, and a shared file rewritten by one
// could be read half-written by another.
std::string profile_path() {
  static const std::string path = [] {
    const std::string p = test::temp_file("profile.json");
    std::ofstream(p) << R"({"name": "cli-test", "threads": 2, "gemm_gflops": 400,
    "gemm_half_rows": 300, "gemm_bwd_gflops": 300, "batched_gflops": 250,
    "attention_gflops": 250, "attention_bwd_gflops": 150, "attention_len_exp": 0.2,
    "mem_gbps": 15, "link_gbps": 10, "link_latency_us": 20, "devices": 4})";
    return p;
  }();
  return path;
}

void expect_user_error(const Result& r, const std::string& needle) {
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_EQ(std::count(r.out.begin(), r.out.end(), '\n'), 1) << r.out;
  EXPECT_NE(r.out.find("foldcube: error:"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(needle), std::string::npos) << "wanted '" << needle << "' in: " << r.out;
}

TEST(PlannerCli, SearchJson) {
  Result r = run_cli(
      "plan --s 128 --r 256 --blocks 48 --train --memory 20GiB --devices 1 "
      "--profile " +
      profile_path() + " --json");
  ASSERT_EQ(r.code, 0) << r.out;
  nlohmann::json j = nlohmann::json::parse(r.out);
  for (const char* key : {"time_ms_estimate", "peak_bytes_estimate", "activation_bytes_estimate",
                          "search_ms", "policy", "module_chunks", "dap", "dp", "dtype"})
    EXPECT_TRUE(j.contains(key)) << key;
  EXPECT_EQ(j["policy"].size(), 48u);
  EXPECT_GT(j["time_ms_estimate"].get<double>(), 0);
  EXPECT_LE(j["peak_bytes_estimate"].get<int64_t>(), int64_t{20} << 30);
  EXPECT_LT(j["search_ms"].get<double>(), 3000 * test::kTimeScale);  // docs: well under 1 s
  EXPECT_TRUE(j["fits"].get<bool>());
}

// `plan --stack extra_msa [--train]`: the ExtraMSA stack's plans (AF2 extra-MSA dims by default).
TEST(PlannerCli, ExtraMsaTraining) {
  Result r = run_cli(
      "plan --stack extra_msa --train --s 512 --r 128 --blocks 4 --memory 4GiB "
      "--profile " +
      profile_path() + " --json");
  ASSERT_EQ(r.code, 0) << r.out;
  nlohmann::json j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["stack"].get<std::string>(), "extra_msa");
  EXPECT_EQ(j["config"]["c_m"].get<int>(), 64);
  EXPECT_EQ(j["policy"].size(), 4u);
  EXPECT_EQ(j["dap"].get<int>(), 1);
  EXPECT_TRUE(j["module_chunks"].contains("msa_att_col"));
  EXPECT_TRUE(j["fits"].get<bool>());
  r = run_cli("plan --stack extra_msa --s 512 --r 128 --memory 4GiB --profile " + profile_path() +
              " --json");
  ASSERT_EQ(r.code, 0) << r.out;
  j = nlohmann::json::parse(r.out);
  EXPECT_FALSE(j["training"].get<bool>());
  EXPECT_EQ(j["stack"].get<std::string>(), "extra_msa");
}

// The AF3 stacks: the memory plan with the cost model's time per row (table_module_costs), more
// for the policies that re-run work.
TEST(PlannerCli, Af3StackTimeEstimates) {
  Result r = run_cli("plan --stack pairformer --r 64 --blocks 2 --train --json --profile " +
                     profile_path());
  ASSERT_EQ(r.code, 0) << r.out;
  const nlohmann::json j = nlohmann::json::parse(r.out);
  ASSERT_EQ(j["rows"].size(), 3u);
  const double none = j["rows"][0]["time_ms_estimate"].get<double>();
  EXPECT_GT(none, 0);
  for (int i : {1, 2}) EXPECT_GT(j["rows"][i]["time_ms_estimate"].get<double>(), none);
}

TEST(PlannerCli, FixedPolicyAndDevices) {
  Result r =
      run_cli("plan --train --memory 40GB --policy block --profile " + profile_path() + " --json");
  ASSERT_EQ(r.code, 0) << r.out;
  nlohmann::json j = nlohmann::json::parse(r.out);
  for (const auto& p : j["policy"]) EXPECT_EQ(p.get<std::string>(), "block");
  EXPECT_LE(j["dap"].get<int>() * j["dp"].get<int>(), 4);
  // A fixed policy that does not fit: the plan is printed, flagged, exit code 3.
  r = run_cli("plan --train --memory 4GiB --policy none --devices 1 --profile " + profile_path() +
              " --json");
  EXPECT_EQ(r.code, 3) << r.out;
  EXPECT_FALSE(nlohmann::json::parse(r.out)["fits"].get<bool>());
}

TEST(PlannerCli, HumanOutputAndBucket) {
  Result r =
      run_cli("plan --r 300 --bucket --memory 8GiB --dtype bf16 --profile " + profile_path());
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("estimate"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("r=512 (bucket of r=300)"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("bf16"), std::string::npos) << r.out;
}

TEST(PlannerCli, Errors) {
  const std::string p = " --profile " + profile_path();
  expect_user_error(run_cli("plan --train --devices 1 --memory 1GiB" + p),
                    "smallest feasible budget");
  expect_user_error(run_cli("plan --train --memory 40GB --policy sometimes" + p),
                    "unknown recompute policy");
  expect_user_error(run_cli("plan --memory 40GB --dtype fp8" + p), "unknown dtype");
  expect_user_error(run_cli("plan --memory lots" + p), "cannot read a size");
  expect_user_error(run_cli("plan --memory 40GB --profile /nonexistent/p.json"), "not found");
  expect_user_error(run_cli("plan --memory 40GB --r 6000 --bucket" + p), "largest bucket");
  expect_user_error(run_cli("plan --memory 40GB --buckets 64,x" + p), "bad bucket");
  expect_user_error(run_cli("plan --memory 40GB --policy block" + p), "training plans only");
  const std::string bad = test::temp_file("bad_profile.json");
  std::ofstream(bad) << R"({"gemm_gflops": -3})";
  expect_user_error(run_cli("plan --memory 40GB --profile " + bad), "profile");
}

}  // namespace
}  // namespace fc

namespace fc {
namespace {

nlohmann::json read_json(const std::string& path) {
  std::ifstream f(path);
  return nlohmann::json::parse(f);
}

// The smallest feasible budget named by the planner's out-of-memory error, in MiB.
double smallest_budget_mib(const std::string& args) {
  const Result r = run_cli("run --plan auto --memory-budget 1MiB " + args);
  const std::string key = "smallest feasible budget is ";
  const size_t at = r.out.find(key);
  if (r.code != 1 || at == std::string::npos) return -1;
  return std::stod(r.out.substr(at + key.size()));
}

// `run --plan auto` at a budget just above the smallest feasible one (it forces the finest
// choices): the measured tracked peak stays within it, the report has the estimates beside the
// measurements, and the memory estimates are the allocator's figures, in fp32 and bf16
// (`run --plan auto --dtype bf16`: bf16 GEMM inputs, kept layer inputs in bf16).
TEST(PlannerCli, RunPlanAutoWithinBudget) {
  for (const std::string dtype : {"fp32", "bf16"})
    for (const std::string mode : {"", "--backward"}) {
      SCOPED_TRACE(dtype + " " + mode);
      const std::string args = "--s 8 --r 24 --blocks 2 --threads 2 --plan-profile " +
                               profile_path() + " --dtype " + dtype + " " + mode;
      const double mib = smallest_budget_mib(args);
      ASSERT_GT(mib, 0) << mode;
      const std::string report = test::temp_file("run_plan.json");
      const std::string budget = std::to_string(static_cast<int64_t>((mib + 0.2) * 1048576));
      const Result r =
          run_cli("run --plan auto --memory-budget " + budget + " " + args + " --report " + report);
      ASSERT_EQ(r.code, 0) << r.out;
      EXPECT_NE(r.out.find("estimate"), std::string::npos) << r.out;
      const nlohmann::json j = read_json(report);
      for (const char* key :
           {"time_ms_estimate", "time_ms", "peak_bytes_estimate", "peak_tracked_bytes",
            "activation_bytes_estimate", "activation_bytes"})
        EXPECT_TRUE(j.contains(key)) << key;
      EXPECT_LE(j["peak_tracked_bytes"].get<int64_t>(), j["memory_budget_bytes"].get<int64_t>());
      EXPECT_EQ(j["peak_tracked_bytes"], j["peak_bytes_estimate"]);  // exact (inference too)
      EXPECT_EQ(j["activation_bytes"], j["activation_bytes_estimate"]);
      EXPECT_EQ(j["training"].get<bool>(), !mode.empty());
      EXPECT_EQ(j["dtype"].get<std::string>(), dtype);
      EXPECT_EQ(j["plan"]["dtype"].get<std::string>(), dtype);
      EXPECT_GT(j["time_ms"].get<double>(), 0);
    }
}

// `run --plan auto --stack extra_msa` (AF2 extra-MSA dims) just above the smallest feasible budget,
// inference and training: within the budget, the tracked peak (and the training step's
// activations) the memory model's to the byte, fp32 and bf16; a saved ExtraMSA plan runs, and
// --stack evoformer with it is a user error.
TEST(PlannerCli, RunPlanAutoExtraMsa) {
  for (const std::string dtype : {"fp32", "bf16"})
    for (const std::string mode : {"", "--backward"}) {
      SCOPED_TRACE(dtype + " " + mode);
      const std::string args =
          "--stack extra_msa --s 24 --r 20 --blocks 2 --threads 2 --plan-profile " +
          profile_path() + " --dtype " + dtype + " " + mode;
      const double mib = smallest_budget_mib(args);
      ASSERT_GT(mib, 0) << mode;
      const std::string report = test::temp_file("run_plan_extra.json");
      const std::string budget = std::to_string(static_cast<int64_t>((mib + 0.2) * 1048576));
      const Result r =
          run_cli("run --plan auto --memory-budget " + budget + " " + args + " --report " + report);
      ASSERT_EQ(r.code, 0) << r.out;
      EXPECT_NE(r.out.find("ExtraMSA"), std::string::npos) << r.out;
      const nlohmann::json j = read_json(report);
      EXPECT_EQ(j["plan"]["stack"].get<std::string>(), "extra_msa");
      EXPECT_EQ(j["plan"]["dtype"].get<std::string>(), dtype);
      EXPECT_LE(j["peak_tracked_bytes"].get<int64_t>(), j["memory_budget_bytes"].get<int64_t>());
      EXPECT_EQ(j["peak_tracked_bytes"], j["peak_bytes_estimate"]);
      EXPECT_EQ(j["activation_bytes"], j["activation_bytes_estimate"]);
    }
  const std::string plan = test::temp_file("saved_extra_plan.json");
  Result r = run_cli(
      "plan --stack extra_msa --train --s 16 --r 12 --blocks 2 --memory 1GiB --policy block "
      "--devices 1 --profile " +
      profile_path() + " --out " + plan);
  ASSERT_EQ(r.code, 0) << r.out;
  const std::string prof = " --threads 2 --plan-profile " + profile_path();
  r = run_cli("run --plan " + plan + prof);
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("ExtraMSA"), std::string::npos) << r.out;
  expect_user_error(run_cli("run --plan " + plan + " --stack evoformer" + prof), "extra_msa");
}

// A saved plan runs as saved; bad combinations are one-line errors.
TEST(PlannerCli, RunSavedPlanAndErrors) {
  const std::string plan = test::temp_file("saved_plan.json");
  const std::string report = test::temp_file("run_saved.json");
  Result r = run_cli(
      "plan --train --s 8 --r 16 --blocks 2 --memory 1GiB --policy module --devices 1 "
      "--profile " +
      profile_path() + " --out " + plan);
  ASSERT_EQ(r.code, 0) << r.out;
  r = run_cli("run --plan " + plan + " --threads 2 --plan-profile " + profile_path() +
              " --report " + report);
  ASSERT_EQ(r.code, 0) << r.out;
  const nlohmann::json j = read_json(report);
  EXPECT_EQ(j["plan"]["policy"], nlohmann::json({"module", "module"}));
  EXPECT_EQ(j["activation_bytes"], j["activation_bytes_estimate"]);
  const std::string prof = " --plan-profile " + profile_path();
  expect_user_error(run_cli("run --plan auto --s 8 --r 16 --threads 2" + prof), "--memory-budget");
  expect_user_error(
      run_cli("run --plan auto --memory-budget 1GiB --policy block --threads 2" + prof),
      "drop --policy");
  expect_user_error(run_cli("run --plan /nonexistent.json --threads 2" + prof), "nonexistent");
  r = run_cli("plan --s 8 --r 16 --blocks 2 --memory 1GiB --devices 1 --profile " + profile_path() +
              " --out " + plan);
  ASSERT_EQ(r.code, 0) << r.out;
  expect_user_error(run_cli("run --plan " + plan + " --backward --threads 2" + prof),
                    "inference plan");
  // A plan for another config than the one given.
  const std::string cfg = ::testing::TempDir() + "/fc_plan_other_cfg.json";
  std::ofstream(cfg) << R"({"c_m": 64})";
  expect_user_error(run_cli("run --plan " + plan + " --threads 2 --config " + cfg + prof),
                    "was made for another config");
}

// `plan --dtype bf16` records the dtype and `run --plan` runs it (bf16 GEMM inputs): the tracked
// peak is the plan's to the byte; a --dtype that contradicts the plan, and plans the engine has no
// path for (fp16, or bf16 with 2-byte buffers), are user errors.
TEST(PlannerCli, RunSavedBf16Plan) {
  const std::string plan = test::temp_file("saved_bf16_plan.json");
  const std::string report = test::temp_file("run_saved_bf16.json");
  const std::string prof = " --threads 2 --plan-profile " + profile_path();
  const std::string make = "plan --s 8 --r 16 --blocks 2 --memory 1GiB --devices 1 --profile " +
                           profile_path() + " --out " + plan;
  Result r = run_cli(make + " --dtype bf16 --element-bytes 0");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_EQ(read_json(plan)["dtype"].get<std::string>(), "bf16");
  r = run_cli("run --plan " + plan + prof + " --report " + report);
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("inference (bf16)"), std::string::npos) << r.out;
  nlohmann::json j = read_json(report);
  EXPECT_EQ(j["dtype"].get<std::string>(), "bf16");
  EXPECT_EQ(j["peak_tracked_bytes"], j["peak_bytes_estimate"]);
  ASSERT_EQ(run_cli("run --plan " + plan + prof + " --dtype bf16").code, 0);
  expect_user_error(run_cli("run --plan " + plan + prof + " --dtype fp32"), "plan for bf16");
  ASSERT_EQ(run_cli(make + " --dtype fp32").code, 0);
  expect_user_error(run_cli("run --plan " + plan + prof + " --dtype bf16"),
                    "foldcube plan --dtype bf16");
  ASSERT_EQ(run_cli(make + " --dtype fp16 --element-bytes 2").code, 0);
  expect_user_error(run_cli("run --plan " + plan + prof), "this plan is for fp16");
  ASSERT_EQ(run_cli(make + " --dtype bf16 --element-bytes 2").code, 0);
  expect_user_error(run_cli("run --plan " + plan + prof), "2-byte buffers");
}

}  // namespace
}  // namespace fc
