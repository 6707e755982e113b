// `mpirun -np N foldcube run ... --dap N` end to end: the same outputs as one process, the
// per-rank report, and failures that end the whole job quickly with a message naming the rank.
// Every launch runs under `timeout`, so a hang fails the test instead of blocking the suite.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "foldcube/io.h"
#include "test_util.h"

namespace fc {
namespace {

struct Result {
  int code;
  std::string out;  // stdout + stderr
  double seconds;
};

Result run(const std::string& cmd) {
  const auto t0 = std::chrono::steady_clock::now();
  FILE* p = popen(("timeout 90 " + cmd + " 2>&1").c_str(), "r");
  Result r{-1, "", 0};
  if (!p) return r;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) r.out.append(buf, n);
  const int st = pclose(p);
  r.code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

std::string cli() { return FOLDCUBE_CLI_PATH; }
std::string mpirun(int np) {
  return std::string(FOLDCUBE_MPIEXEC) + " -np " + std::to_string(np) + " --oversubscribe ";
}
std::string tmp(const std::string& name) { return ::testing::TempDir() + "/fc_dap_cli_" + name; }

// Outputs of two runs agree within 1e-5 (golden metric) for m, z and s.
void expect_same_outputs(const std::string& a, const std::string& b) {
  TensorFile fa, fb;
  ASSERT_TRUE(read_safetensors(a, &fa).ok());
  ASSERT_TRUE(read_safetensors(b, &fb).ok());
  for (const char* name : {"output.m", "output.z", "output.s"}) {
    ASSERT_TRUE(fa.has(name) && fb.has(name)) << name;
    EXPECT_LT(test::golden_err(fa.tensors.at(name), fb.tensors.at(name)), 1e-5) << name;
  }
}

TEST(DapCli, GoldenFileMatchesSingleProcess) {
  const std::string g = test::data_path("evo_tiny.safetensors");
  const std::string o1 = tmp("single.safetensors"), o2 = tmp("dap.safetensors"),
                    rep = tmp("report.json");
  Result r1 = run(cli() + " run --weights " + g + " --inputs " + g + " --out " + o1 +
                  " --threads 1 --quiet");
  ASSERT_EQ(r1.code, 0) << r1.out;
  Result r2 = run(mpirun(2) + cli() + " run --weights " + g + " --inputs " + g + " --out " + o2 +
                  " --report " + rep + " --threads 1 --dap 2");
  ASSERT_EQ(r2.code, 0) << r2.out;
  EXPECT_NE(r2.out.find("rank 1"), std::string::npos) << r2.out;  // per-rank peaks printed
  expect_same_outputs(o2, o1);
  nlohmann::json j = nlohmann::json::parse(std::ifstream(rep));
  EXPECT_EQ(j["dap"], 2);
  ASSERT_EQ(j["rank_peak_tracked_bytes"].size(), 2u);
  EXPECT_GT(j["rank_peak_tracked_bytes"][1].get<int64_t>(), 0);
  EXPECT_EQ(j["block_sent_bytes_per_rank"], j["block_sent_bytes_per_rank_model"]);
}

// Random weights and inputs, s and r not multiples of the rank count (padding).
TEST(DapCli, RandomJobWithPaddingMatchesSingleProcess) {
  const std::string o1 = tmp("rand1.safetensors"), o3 = tmp("rand3.safetensors");
  const std::string job = " run --s 5 --r 7 --blocks 1 --seed 3 --threads 1 --quiet --out ";
  Result r1 = run(cli() + job + o1);
  ASSERT_EQ(r1.code, 0) << r1.out;
  Result r3 = run(mpirun(3) + cli() + job + o3 + " --dap 3");
  ASSERT_EQ(r3.code, 0) << r3.out;
  expect_same_outputs(o3, o1);
}

// A missing file on rank 0 ends the job: message naming the rank and the file, exit code != 0,
// well within the timeout (the other ranks are waiting in a broadcast).
TEST(DapCli, ErrorOnRankZeroEndsTheJob) {
  Result r = run(mpirun(2) + cli() + " run --weights /nonexistent/w.safetensors --dap 2");
  EXPECT_NE(r.code, 0) << r.out;
  EXPECT_NE(r.code, 124) << "timed out: " << r.out;
  EXPECT_NE(r.out.find("rank 0: "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("/nonexistent/w.safetensors"), std::string::npos) << r.out;
  EXPECT_LT(r.seconds, 30) << r.out;
}

TEST(DapCli, MismatchedCommandLinesAreDetected) {
  Result r = run(std::string(FOLDCUBE_MPIEXEC) + " -np 1 " + cli() +
                 " run --s 4 --r 4 --blocks 1 --seed 1 --dap 2 : -np 1 " + cli() +
                 " run --s 4 --r 4 --blocks 1 --seed 2 --dap 2");
  EXPECT_NE(r.code, 0) << r.out;
  EXPECT_NE(r.code, 124) << "timed out: " << r.out;
  EXPECT_NE(r.out.find("rank 0: the ranks were started with different command lines"),
            std::string::npos)
      << r.out;
}

TEST(DapCli, RankCountMustMatchDap) {
  Result r = run(mpirun(2) + cli() + " run --s 4 --r 4 --blocks 1 --dap 3");
  EXPECT_NE(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("--dap 3 needs 3 MPI ranks, the job has 2"), std::string::npos) << r.out;
  Result r2 = run(mpirun(2) + cli() + " run --s 4 --r 4 --blocks 1");
  EXPECT_NE(r2.code, 0) << r2.out;
  EXPECT_NE(r2.out.find("pass --dap 2"), std::string::npos) << r2.out;
}

}  // namespace
}  // namespace fc
