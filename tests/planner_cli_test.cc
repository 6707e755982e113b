// `foldcube plan` end to end: the JSON fields, fixed policies, buckets, and one-line errors.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

namespace fc {
namespace {

struct Result {
  int code;
  std::string out;  // stdout + stderr
};

Result run_cli(const std::string& args) {
  const std::string cmd = std::string(FOLDCUBE_CLI_PATH) + " " + args + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  Result r{-1, ""};
  if (!p) return r;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) r.out.append(buf, n);
  const int st = pclose(p);
  r.code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  return r;
}

// A fixed device profile, so the tests never calibrate.
std::string profile_path() {
  const std::string path = ::testing::TempDir() + "/fc_planner_profile.json";
  std::ofstream(path) << R"({"name": "cli-test", "threads": 2, "gemm_gflops": 400,
    "gemm_half_rows": 300, "gemm_bwd_gflops": 300, "batched_gflops": 250,
    "attention_gflops": 250, "attention_bwd_gflops": 150, "attention_len_exp": 0.2,
    "mem_gbps": 15, "link_gbps": 10, "link_latency_us": 20, "devices": 4})";
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
  EXPECT_LT(j["search_ms"].get<double>(), 1000);
  EXPECT_TRUE(j["fits"].get<bool>());
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
  const std::string bad = ::testing::TempDir() + "/fc_bad_profile.json";
  std::ofstream(bad) << R"({"gemm_gflops": -3})";
  expect_user_error(run_cli("plan --memory 40GB --profile " + bad), "profile");
}

}  // namespace
}  // namespace fc
