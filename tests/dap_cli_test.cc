// `mpirun -np N foldcube run ... --dap N` end to end: the same outputs as one process, the
// per-rank report, and failures that end the whole job quickly with a message naming the rank.
// Every launch runs under `timeout`, so a hang fails the test instead of blocking the suite.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "foldcube/config.h"
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
  const std::string limit = std::to_string(static_cast<int>(90 * test::kTimeScale));
  FILE* p = popen(("timeout " + limit + " " + cmd + " 2>&1").c_str(), "r");
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

std::string cli() { return test::cli_path(); }
std::string mpirun(int np) {
  return std::string(test::mpiexec()) + " -np " + std::to_string(np) + " --oversubscribe ";
}
std::string tmp(const std::string& name) { return test::temp_file(name); }

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
  EXPECT_LT(r.seconds, 45 * test::kTimeScale) << r.out;  // below the timeout
}

TEST(DapCli, MismatchedCommandLinesAreDetected) {
  Result r = run(std::string(test::mpiexec()) + " -np 1 " + cli() +
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

// Every tensor of b (outputs, grad.input.*, grad.param.*) within tol of a (golden metric).
void expect_same_tensors(const std::string& a, const std::string& b, double tol) {
  TensorFile fa, fb;
  ASSERT_TRUE(read_safetensors(a, &fa).ok());
  ASSERT_TRUE(read_safetensors(b, &fb).ok());
  EXPECT_EQ(fa.names.size(), fb.names.size());
  for (const std::string& name : fa.names) {
    ASSERT_TRUE(fb.has(name)) << name;
    EXPECT_LT(test::golden_err(fb.tensors.at(name), fa.tensors.at(name)), tol) << name;
  }
}

// Training on the golden file with its probes as upstream gradients: 2 ranks == one process,
// every tensor of the output file (outputs, input and parameter gradients) within 1e-5; the
// report's backward bytes equal the model.
TEST(DapCli, TrainingMatchesSingleProcess) {
  const std::string g = test::data_path("evo_tiny.safetensors");
  TensorFile f, go;
  ASSERT_TRUE(read_safetensors(g, &f).ok());
  go.put("grad.output.m", f.tensors.at("probe.m"));
  go.put("grad.output.z", f.tensors.at("probe.z"));
  const std::string gfile = tmp("gout.safetensors");
  ASSERT_TRUE(write_safetensors(gfile, go).ok());
  const std::string job = " run --weights " + g + " --inputs " + g + " --grad-outputs " + gfile +
                          " --policy block,module --train --seed 4 --threads 1 --quiet --out ";
  const std::string o1 = tmp("train1.safetensors"), o2 = tmp("train2.safetensors");
  const std::string rep = tmp("train2.json");
  Result r1 = run(cli() + job + o1);
  ASSERT_EQ(r1.code, 0) << r1.out;
  Result r2 = run(mpirun(2) + cli() + job + o2 + " --dap 2 --report " + rep);
  ASSERT_EQ(r2.code, 0) << r2.out;
  expect_same_tensors(o1, o2, 1e-5);
  nlohmann::json j = nlohmann::json::parse(std::ifstream(rep));
  ASSERT_EQ(j["rank_activation_bytes"].size(), 2u);
  EXPECT_GT(j["rank_activation_bytes"][1].get<int64_t>(), 0);
  EXPECT_EQ(j["forward_sent_bytes_per_rank"], j["forward_sent_bytes_per_rank_model"]);
  EXPECT_EQ(j["backward_sent_bytes_per_rank"], j["backward_sent_bytes_per_rank_model"]);
}

// Every tensor of an ExtraMSA training step's output file within the golden tolerances of the
// extra_tiny reference f (outputs 1e-4; dL/d inputs and all 93 parameter gradients 2e-4).
void expect_extra_golden(const std::string& path, const TensorFile& f) {
  TensorFile got;
  ASSERT_TRUE(read_safetensors(path, &got).ok());
  int grads = 0;
  for (const std::string& name : got.names) {
    ASSERT_TRUE(f.has(name)) << name;
    const double tol = name.rfind("grad.", 0) == 0 ? 2e-4 : 1e-4;
    EXPECT_LT(test::golden_err(got.tensors.at(name), f.tensors.at(name)), tol) << name;
    grads += name.rfind("grad.", 0) == 0;
  }
  EXPECT_EQ(grads, 2 + 93);
}

// The ExtraMSA stack under DAP on 2 and 4 ranks (s = 10 padded to 12 on 4 ranks), forward and
// training: every tensor of the output file within the golden tolerances of the OpenFold
// reference (outputs, dL/d inputs, dL/d every parameter) and within 1e-5 of one process.
TEST(DapCli, ExtraMsaGoldenOnTwoAndFourRanks) {
  const std::string g = test::data_path("extra_tiny.safetensors");
  TensorFile f, go;
  ASSERT_TRUE(read_safetensors(g, &f).ok());
  go.put("grad.output.m", f.tensors.at("probe.m"));
  go.put("grad.output.z", f.tensors.at("probe.z"));
  const std::string gfile = tmp("extra_gout.safetensors");
  ASSERT_TRUE(write_safetensors(gfile, go).ok());
  const std::string fwd = " run --weights " + g + " --inputs " + g + " --threads 1 --quiet --out ";
  const std::string train = " run --stack extra_msa --weights " + g + " --inputs " + g +
                            " --grad-outputs " + gfile + " --threads 1 --quiet --out ";
  const std::string f1 = tmp("extra_f1.safetensors"), t1 = tmp("extra_t1.safetensors");
  ASSERT_EQ(run(cli() + fwd + f1).code, 0);
  ASSERT_EQ(run(cli() + train + t1 + " --policy module").code, 0);
  for (int n : {2, 4}) {
    SCOPED_TRACE("ranks " + std::to_string(n));
    const std::string fn = tmp("extra_f" + std::to_string(n) + ".safetensors");
    const std::string tn = tmp("extra_t" + std::to_string(n) + ".safetensors");
    Result rf = run(mpirun(n) + cli() + fwd + fn + " --dap " + std::to_string(n));
    ASSERT_EQ(rf.code, 0) << rf.out;
    // Gradients do not depend on the policy: none on 2 ranks, block on 4.
    const std::string rep = tmp("extra_t" + std::to_string(n) + ".json");
    Result rt = run(mpirun(n) + cli() + train + tn + " --dap " + std::to_string(n) +
                    (n == 2 ? " --policy none" : " --policy block") + " --report " + rep);
    ASSERT_EQ(rt.code, 0) << rt.out;
    nlohmann::json j = nlohmann::json::parse(std::ifstream(rep));
    EXPECT_EQ(j["stack"].get<std::string>(), "extra_msa");
    // The ExtraMSA block has the Evoformer's layouts and collectives: the same volume formula.
    EXPECT_EQ(j["forward_sent_bytes_per_rank"], j["forward_sent_bytes_per_rank_model"]);
    EXPECT_EQ(j["backward_sent_bytes_per_rank"], j["backward_sent_bytes_per_rank_model"]);
    expect_same_tensors(f1, fn, 1e-5);
    expect_same_tensors(t1, tn, 1e-5);
    expect_extra_golden(tn, f);
  }
}

// `--dtype bf16` under `--dap N` for the stacks, forward and training (evo_tiny and extra_tiny on
// 2 and 3 ranks; on 3 ranks s = 8 and 10 are padded to 9 and 12): every tensor of the output file
// within a normwise 2e-2 of the one-process bf16 run (tests/dap_bf16_test.cc: the tolerance, and
// the golden checks). --unfused with bf16 is refused under --dap; the AF3 trunk's bf16 training
// and budgets run.
TEST(DapCli, Bf16StacksMatchOneProcessBf16) {
  for (const char* file : {"evo_tiny.safetensors", "extra_tiny.safetensors"}) {
    SCOPED_TRACE(file);
    const std::string g = test::data_path(file);
    TensorFile f, go;
    ASSERT_TRUE(read_safetensors(g, &f).ok());
    go.put("grad.output.m", f.tensors.at("probe.m"));
    go.put("grad.output.z", f.tensors.at("probe.z"));
    const std::string gfile = tmp("bf16_gout.safetensors");
    ASSERT_TRUE(write_safetensors(gfile, go).ok());
    const std::string base =
        " run --weights " + g + " --inputs " + g + " --dtype bf16 --threads 1 --quiet";
    const std::string fwd = base + " --out ";
    const std::string train = base + " --grad-outputs " + gfile + " --policy module --out ";
    const std::string f1 = tmp("bf16_f1.safetensors"), t1 = tmp("bf16_t1.safetensors");
    ASSERT_EQ(run(cli() + fwd + f1).code, 0);
    ASSERT_EQ(run(cli() + train + t1).code, 0);
    for (int n : {2, 3}) {
      SCOPED_TRACE("ranks " + std::to_string(n));
      const std::string fn = tmp("bf16_fn.safetensors"), tn = tmp("bf16_tn.safetensors");
      const std::string dap = " --dap " + std::to_string(n);
      Result rf = run(mpirun(n) + cli() + fwd + fn + dap);
      ASSERT_EQ(rf.code, 0) << rf.out;
      Result rt = run(mpirun(n) + cli() + train + tn + dap);
      ASSERT_EQ(rt.code, 0) << rt.out;
      for (const auto& [one, many] : {std::make_pair(f1, fn), std::make_pair(t1, tn)}) {
        TensorFile a, b;
        ASSERT_TRUE(read_safetensors(one, &a).ok());
        ASSERT_TRUE(read_safetensors(many, &b).ok());
        EXPECT_EQ(a.names.size(), b.names.size());
        for (const std::string& name : a.names) {
          ASSERT_TRUE(b.has(name)) << name;
          // A gradient that is zero to rounding in the float64 reference (a LayerNorm bias whose
          // effect the softmax cancels) is summation noise in both runs: not compared.
          if (test::zero_to_rounding(f.tensors.at(name))) continue;
          EXPECT_LT(test::normwise_err(b.tensors.at(name), a.tensors.at(name)), 2e-2) << name;
        }
      }
    }
  }
  // The AF3 trunk's bf16 training and bf16 memory budgets run under DAP too (their accuracy and
  // bounds: DapAf3CliBf16Training, DapAf3CliBudget in tests/dap_af3_cli_test.cc).
  Result r = run(mpirun(2) + cli() +
                 " run --stack pairformer --r 8 --blocks 1 --dap 2 --dtype bf16 --backward");
  EXPECT_EQ(r.code, 0) << r.out;
  r = run(mpirun(2) + cli() +
          " run --stack msa_module --r 8 --s 4 --blocks 1 --dap 2 --dtype bf16 --memory-budget "
          "64MiB");
  EXPECT_EQ(r.code, 0) << r.out;
  r = run(mpirun(2) + cli() + " run --s 4 --r 4 --blocks 1 --dap 2 --dtype bf16 --unfused");
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_NE(r.out.find("drop --unfused"), std::string::npos) << r.out;
}

// Data parallelism: D = 2 groups of N = 1 and of N = 2 (4 ranks, oversubscribed) give the average
// of the two single-process steps' parameter gradients; rank 0 writes protein 0's outputs and
// input gradients. Protein 1 is protein 0's file with m scaled by 0.5; upstream gradients and
// dropout are seeded by --seed + g.
TEST(DapCli, DataParallelAveragesGradients) {
  const std::string g = test::data_path("evo_tiny.safetensors");
  TensorFile f;
  ASSERT_TRUE(read_safetensors(g, &f).ok());
  TensorFile p1;
  Tensor m = f.tensors.at("input.m").clone();
  for (int64_t i = 0; i < m.numel(); ++i) m.f32()[i] *= 0.5f;
  p1.put("input.m", m);
  for (const char* n : {"input.z", "input.msa_mask", "input.pair_mask"}) p1.put(n, f.tensors.at(n));
  const std::string in1 = tmp("protein1.safetensors");
  ASSERT_TRUE(write_safetensors(in1, p1).ok());
  const std::string common = " --weights " + g + " --train --policy module --threads 1 --quiet";
  const std::string s0 = tmp("dp_s0.safetensors"), s1 = tmp("dp_s1.safetensors");
  Result a = run(cli() + " run" + common + " --inputs " + g + " --seed 7 --out " + s0);
  ASSERT_EQ(a.code, 0) << a.out;
  Result b = run(cli() + " run" + common + " --inputs " + in1 + " --seed 8 --out " + s1);
  ASSERT_EQ(b.code, 0) << b.out;
  TensorFile f0, f1;
  ASSERT_TRUE(read_safetensors(s0, &f0).ok());
  ASSERT_TRUE(read_safetensors(s1, &f1).ok());
  for (int n : {1, 2}) {
    const std::string o = tmp("dp_" + std::to_string(n) + ".safetensors");
    Result r = run(mpirun(2 * n) + cli() + " run" + common + " --inputs " + g + "," + in1 +
                   " --seed 7 --dp 2 --dap " + std::to_string(n) + " --out " + o);
    ASSERT_EQ(r.code, 0) << r.out;
    TensorFile fo;
    ASSERT_TRUE(read_safetensors(o, &fo).ok());
    int params = 0;
    for (const std::string& name : f0.names) {
      ASSERT_TRUE(fo.has(name)) << name;
      const Tensor& got = fo.tensors.at(name);
      if (name.rfind("grad.param.", 0) == 0) {
        Tensor avg = f0.tensors.at(name).clone();
        const float* q = f1.tensors.at(name).f32();
        for (int64_t i = 0; i < avg.numel(); ++i) avg.f32()[i] = 0.5f * (avg.f32()[i] + q[i]);
        EXPECT_LT(test::golden_err(got, avg), 1e-5) << name << " N=" << n;
        ++params;
      } else {
        EXPECT_LT(test::golden_err(got, f0.tensors.at(name)), 1e-5) << name << " N=" << n;
      }
    }
    EXPECT_GT(params, 0);
  }
}

// A rank other than 0 fails during the job (its protein's file is missing) while the others wait
// in collectives: message naming that rank, non-zero exit, no hang.
TEST(DapCli, FailingRankDuringTrainingEndsTheJob) {
  const std::string g = test::data_path("evo_tiny.safetensors");
  Result r = run(mpirun(2) + cli() + " run --weights " + g + " --inputs " + g +
                 ",/nonexistent/p1.safetensors --backward --dp 2 --dap 1 --threads 1");
  EXPECT_NE(r.code, 0) << r.out;
  EXPECT_NE(r.code, 124) << "timed out: " << r.out;
  EXPECT_NE(r.out.find("rank 1: "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("/nonexistent/p1.safetensors"), std::string::npos) << r.out;
  EXPECT_LT(r.seconds, 45 * test::kTimeScale) << r.out;  // below the timeout
}

// A replica whose training step fails (protein 1 has a NaN in input.m, found by the step's input
// checks) while replica 0's step succeeds: every rank of both replicas ends with the error
// (the drivers agree on the world after each step), no rank waits in the gradient all-reduce.
TEST(DapCli, FailingReplicaStepEndsEveryRank) {
  const std::string g = test::data_path("evo_tiny.safetensors");
  TensorFile f, p1;
  ASSERT_TRUE(read_safetensors(g, &f).ok());
  Tensor m = f.tensors.at("input.m").clone();
  m.f32()[3] = std::nanf("");
  p1.put("input.m", m);
  for (const char* n : {"input.z", "input.msa_mask", "input.pair_mask"}) p1.put(n, f.tensors.at(n));
  const std::string in1 = tmp("nan_protein1.safetensors");
  ASSERT_TRUE(write_safetensors(in1, p1).ok());
  for (int n : {1, 2}) {
    Result r = run(mpirun(2 * n) + cli() + " run --weights " + g + " --inputs " + g + "," + in1 +
                   " --backward --dp 2 --dap " + std::to_string(n) + " --threads 1 --quiet");
    EXPECT_NE(r.code, 0) << r.out;
    EXPECT_NE(r.code, 124) << "timed out: " << r.out;
    EXPECT_NE(r.out.find("rank " + std::to_string(n) + ": "), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("input.m"), std::string::npos) << r.out;
    EXPECT_LT(r.seconds, 60) << r.out;
  }
}

// A rank that dies (SIGKILL, as the OOM killer would) in the middle of the job while the other
// computes: mpirun ends the whole job with a non-zero exit, no hang, and no output file appears
// (rank 0 writes it only at the end, via a temporary and a rename).
TEST(DapCli, KilledRankEndsTheJobWithoutOutput) {
  const std::string out = tmp("killed_" + std::to_string(getpid()) + ".safetensors");
  std::remove(out.c_str());
  // Rank 1 runs the same job in the background and is killed 1 s in; rank 0 just runs it.
  const std::string job = cli() + " run --dap 2 --s 64 --r 128 --blocks 8 --threads 1 --out " + out;
  const std::string script = "if [ \"$OMPI_COMM_WORLD_RANK\" = 1 ]; then " + job +
                             " & pid=$!; sleep 1; kill -9 $pid; wait $pid; else exec " + job +
                             "; fi";
  Result r = run(mpirun(2) + "sh -c '" + script + "'");
  EXPECT_NE(r.code, 0) << r.out;
  EXPECT_NE(r.code, 124) << "timed out: " << r.out;
  EXPECT_LT(r.seconds, 60) << r.out;
  std::ifstream f(out);
  EXPECT_FALSE(f.good()) << "output written by a job that lost a rank";
}

// ---- `run --plan` with DAP (docs/planner.md) ---------------------------------------------------

// A fixed device profile (no calibration): one thread, two devices, a link.
std::string plan_profile() {
  static const std::string path = [] {
    const std::string p = tmp("profile_" + std::to_string(getpid()) + ".json");
    std::ofstream(p) << R"({"name": "dap-cli-test", "threads": 1, "gemm_gflops": 400,
    "gemm_half_rows": 300, "gemm_bwd_gflops": 300, "batched_gflops": 250,
    "attention_gflops": 250, "attention_bwd_gflops": 150, "attention_len_exp": 0.2,
    "mem_gbps": 15, "link_gbps": 10, "link_latency_us": 20, "devices": 2})";
    return p;
  }();
  return path;
}

// `mpirun -np 2 foldcube run --plan auto` at a budget 0.2 MiB above the smallest feasible one
// (the finest choices), inference and a training step, AF2 dims, s and r not multiples of 2: the
// plan runs DAP over both ranks, every rank's figures are reported, measured peak (max over
// ranks) <= estimate <= budget, the inference estimate is exact, the training one within 7 %
// (the DAP training model's stated tolerance), the activation estimate exact; fp32 and bf16.
TEST(DapCli, RunPlanAutoOnTwoRanks) {
  for (const std::string dtype : {" --dtype fp32", " --dtype bf16"})
    for (const std::string mode : {"", " --backward"}) {
      SCOPED_TRACE(dtype + mode);
      const std::string args =
          " run --plan auto --s 7 --r 23 --blocks 2 --threads 1 --plan-profile " + plan_profile() +
          mode + dtype;
      Result r = run(mpirun(2) + cli() + args + " --memory-budget 1MiB");
      const std::string key = "smallest feasible budget is ";
      const size_t at = r.out.find(key);
      ASSERT_NE(at, std::string::npos) << r.out;
      EXPECT_NE(r.code, 0) << r.out;
      const double mib = std::stod(r.out.substr(at + key.size()));
      const int64_t budget = static_cast<int64_t>((mib + 0.2) * 1048576);
      const std::string rep = tmp("plan_auto.json");
      r = run(mpirun(2) + cli() + args + " --memory-budget " + std::to_string(budget) +
              " --report " + rep);
      ASSERT_EQ(r.code, 0) << r.out;
      EXPECT_NE(r.out.find("rank 1"), std::string::npos) << r.out;
      const nlohmann::json j = nlohmann::json::parse(std::ifstream(rep));
      EXPECT_EQ(j["dap"].get<int>() * j["dp"].get<int>(), 2) << mode;
      ASSERT_EQ(j["rank_peak_tracked_bytes"].size(), 2u);
      const int64_t meas = j["peak_tracked_bytes"].get<int64_t>();
      const int64_t est = j["peak_bytes_estimate"].get<int64_t>();
      EXPECT_EQ(meas, std::max(j["rank_peak_tracked_bytes"][0].get<int64_t>(),
                               j["rank_peak_tracked_bytes"][1].get<int64_t>()));
      EXPECT_LE(meas, est) << mode;
      EXPECT_LE(est, budget) << mode;
      if (mode.empty())
        EXPECT_EQ(est, meas);
      else
        EXPECT_LE(est - meas, meas * 7 / 100) << "estimate " << est << " measured " << meas;
      EXPECT_EQ(j["activation_bytes"], j["activation_bytes_estimate"]) << mode;
      EXPECT_TRUE(j["within_budget"].get<bool>());
      EXPECT_GT(j["time_ms"].get<double>(), 0);
    }
}

// The ExtraMSA stack's plans on 2 ranks (issue 16): `mpirun -np 2 run --plan auto --stack
// extra_msa` just above the smallest feasible budget, inference and training (s, r = 7, 23:
// padded shards): measured peak within the budget; inference peak = estimate, training at most
// 7 % below it (the Evoformer's DAP decomposition); activations per rank as estimated; fp32 and
// bf16.
TEST(DapCli, ExtraMsaPlanAutoOnTwoRanks) {
  for (const std::string dtype : {" --dtype fp32", " --dtype bf16"})
    for (const std::string mode : {"", " --backward"}) {
      SCOPED_TRACE(dtype + mode);
      const std::string args =
          " run --plan auto --stack extra_msa --s 7 --r 23 --blocks 2 --threads 1 "
          "--plan-profile " +
          plan_profile() + mode + dtype;
      Result r = run(mpirun(2) + cli() + args + " --memory-budget 1MiB");
      const std::string key = "smallest feasible budget is ";
      const size_t at = r.out.find(key);
      ASSERT_NE(at, std::string::npos) << r.out;
      const double mib = std::stod(r.out.substr(at + key.size()));
      const int64_t budget = static_cast<int64_t>((mib + 0.2) * 1048576);
      const std::string rep = tmp("extra_plan_auto.json");
      r = run(mpirun(2) + cli() + args + " --memory-budget " + std::to_string(budget) +
              " --report " + rep);
      ASSERT_EQ(r.code, 0) << r.out;
      EXPECT_NE(r.out.find("ExtraMSA"), std::string::npos) << r.out;
      const nlohmann::json j = nlohmann::json::parse(std::ifstream(rep));
      EXPECT_EQ(j["plan"]["stack"].get<std::string>(), "extra_msa");
      EXPECT_EQ(j["dap"].get<int>() * j["dp"].get<int>(), 2) << mode;
      const int64_t meas = j["peak_tracked_bytes"].get<int64_t>();
      const int64_t est = j["peak_bytes_estimate"].get<int64_t>();
      EXPECT_LE(meas, est) << mode;
      EXPECT_LE(est, budget) << mode;
      if (mode.empty())  // DAP inference: exact, as for the Evoformer
        EXPECT_EQ(est, meas);
      else
        EXPECT_LE(est - meas, meas * 7 / 100) << "estimate " << est << " measured " << meas;
      EXPECT_EQ(j["activation_bytes"], j["activation_bytes_estimate"]) << mode;
      EXPECT_TRUE(j["within_budget"].get<bool>());
    }
}

// The golden extra_tiny step under a DAP plan's choices: `foldcube plan --stack extra_msa --train
// --dap 2` at a tight budget picks the policies and the chunk target; `mpirun -np 2 run --dap 2`
// with them on the golden file gives outputs, input and parameter gradients within the golden
// tolerances.
TEST(DapCli, ExtraMsaGoldenUnderDapPlan) {
  const std::string g = test::data_path("extra_tiny.safetensors");
  TensorFile f, go;
  ASSERT_TRUE(read_safetensors(g, &f).ok());
  EvoformerConfig cfg;
  ASSERT_TRUE(EvoformerConfig::from_metadata(f.metadata, &cfg).ok());
  const std::string cfg_file = tmp("extra_tiny_cfg.json");
  std::ofstream(cfg_file) << cfg.to_json();
  go.put("grad.output.m", f.tensors.at("probe.m"));
  go.put("grad.output.z", f.tensors.at("probe.z"));
  const std::string gfile = tmp("extra_plan_gout.safetensors");
  ASSERT_TRUE(write_safetensors(gfile, go).ok());
  const Tensor& m = f.tensors.at("input.m");
  const std::string shape = " --s " + std::to_string(m.shape()[0]) + " --r " +
                            std::to_string(m.shape()[1]) + " --blocks " +
                            std::to_string(cfg.no_blocks);
  const std::string planargs = "plan --stack extra_msa --train --dap 2 --dp 1 --devices 2" + shape +
                               " --config " + cfg_file + " --profile " + plan_profile();
  Result r = run(cli() + " " + planargs + " --memory 1KiB");
  const std::string key = "smallest feasible budget is ";
  const size_t at = r.out.find(key);
  ASSERT_NE(at, std::string::npos) << r.out;
  const double mib = std::stod(r.out.substr(at + key.size()));
  const std::string plan = tmp("extra_dap_plan.json");
  r = run(cli() + " " + planargs + " --memory " +
          std::to_string(static_cast<int64_t>((mib + 0.05) * 1048576)) + " --out " + plan);
  ASSERT_EQ(r.code, 0) << r.out;
  const nlohmann::json p = nlohmann::json::parse(std::ifstream(plan));
  ASSERT_EQ(p["dap"].get<int>(), 2);
  std::string policy;
  for (const auto& x : p["policy"]) policy += (policy.empty() ? "" : ",") + x.get<std::string>();
  const int64_t target = p["chunk_target_bytes"].get<int64_t>();
  const std::string out = tmp("extra_dap_plan_out.safetensors");
  r = run(mpirun(2) + cli() + " run --dap 2 --stack extra_msa --weights " + g + " --inputs " + g +
          " --grad-outputs " + gfile + " --threads 1 --quiet --policy " + policy +
          (target > 0 ? " --chunk-target " + std::to_string(target) : "") + " --out " + out);
  ASSERT_EQ(r.code, 0) << r.out;
  expect_extra_golden(out, f);
}

// A saved plan with dap = 2: runs on 2 ranks (every policy, estimate within 7 % above the
// measured peak); the wrong rank count or no launcher is a one-line error, exit code != 0, no
// hang.
TEST(DapCli, RunSavedDapPlan) {
  const std::string plan = tmp("dap_plan.json"), rep = tmp("dap_plan_report.json");
  const std::string prof = " --plan-profile " + plan_profile() + " --threads 1";
  for (const char* policy : {"none", "module", "block"}) {
    Result r = run(cli() + " plan --train --s 8 --r 24 --blocks 2 --memory 1GiB --dap 2 --dp 1 " +
                   "--policy " + policy + " --profile " + plan_profile() + " --out " + plan);
    ASSERT_EQ(r.code, 0) << r.out;
    r = run(mpirun(2) + cli() + " run --plan " + plan + prof + " --quiet --report " + rep);
    ASSERT_EQ(r.code, 0) << r.out;
    const nlohmann::json j = nlohmann::json::parse(std::ifstream(rep));
    const int64_t meas = j["peak_tracked_bytes"].get<int64_t>();
    const int64_t est = j["peak_bytes_estimate"].get<int64_t>();
    EXPECT_LE(meas, est) << policy;
    EXPECT_LE(est - meas, meas * 7 / 100) << policy << ": estimate " << est << " measured " << meas;
    EXPECT_EQ(j["activation_bytes"], j["activation_bytes_estimate"]) << policy;
  }
  Result r = run(mpirun(3) + cli() + " run --plan " + plan + prof);
  EXPECT_NE(r.code, 0) << r.out;
  EXPECT_NE(r.code, 124) << "timed out: " << r.out;
  EXPECT_NE(r.out.find("runs on 2 MPI rank(s), this job has 3"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("rank 1"), std::string::npos) << "printed once, by rank 0: " << r.out;
  EXPECT_LT(r.seconds, 45 * test::kTimeScale) << r.out;  // below the timeout
  r = run(cli() + " run --plan " + plan + prof);
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_NE(r.out.find("mpirun -np 2"), std::string::npos) << r.out;
}

// Per-layer partitions end to end: `plan --split-policy auto` with a very slow link writes a plan
// with `partitions` (whole-stream layers save the link), `mpirun -np 2 run --plan` runs it
// (training, policy module) with the measured peak within the estimate and the kept activations
// as estimated, in fp32 and in bf16 (`plan --dtype bf16`: kept whole-stream inputs in bf16); a
// plan naming an unknown split is a one-line error.
TEST(DapCli, PlanWithPartitionsRunsOnTwoRanks) {
  const std::string prof = tmp("slow_link_" + std::to_string(getpid()) + ".json");
  std::ofstream(prof) << R"({"name": "slow-link", "threads": 1, "gemm_gflops": 400,
    "gemm_half_rows": 300, "gemm_bwd_gflops": 300, "batched_gflops": 250,
    "attention_gflops": 250, "attention_bwd_gflops": 150, "attention_len_exp": 0.2,
    "mem_gbps": 15, "link_gbps": 0.001, "link_latency_us": 20, "devices": 2})";
  const std::string plan = tmp("split_plan.json"), rep = tmp("split_plan_report.json");
  for (const std::string dtype : {"fp32", "bf16"}) {
    SCOPED_TRACE(dtype);
    Result r = run(cli() + " plan --train --s 8 --r 24 --blocks 2 --memory 1GiB --dap 2 --dp 1 " +
                   "--policy module --split-policy auto --profile " + prof + " --dtype " + dtype +
                   " --out " + plan);
    ASSERT_EQ(r.code, 0) << r.out;
    EXPECT_NE(r.out.find("partitions"), std::string::npos) << r.out;
    const nlohmann::json p = nlohmann::json::parse(std::ifstream(plan));
    ASSERT_TRUE(p.contains("partitions")) << p.dump();
    EXPECT_EQ(p["partitions"].size(), 2u);
    EXPECT_EQ(p["dtype"], dtype);
    r = run(mpirun(2) + cli() + " run --plan " + plan + " --plan-profile " + prof +
            " --threads 1 --quiet --report " + rep);
    ASSERT_EQ(r.code, 0) << r.out;
    const nlohmann::json j = nlohmann::json::parse(std::ifstream(rep));
    EXPECT_EQ(j["dtype"], dtype);
    EXPECT_LE(j["peak_tracked_bytes"].get<int64_t>(), j["peak_bytes_estimate"].get<int64_t>());
    EXPECT_EQ(j["activation_bytes"], j["activation_bytes_estimate"]);
  }
  nlohmann::json p = nlohmann::json::parse(std::ifstream(plan));
  p["partitions"][0][0]["split"] = "rows";
  std::ofstream(plan) << p.dump();
  const Result r =
      run(mpirun(2) + cli() + " run --plan " + plan + " --plan-profile " + prof + " --threads 1");
  EXPECT_NE(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("unknown split 'rows'"), std::string::npos) << r.out;
}

// `bench --plan` at a tiny shape: the four DAP rows and the planner with 2 devices are there, and
// the DAP rows (all fit in 1 GiB) were measured under mpirun with their peak (largest rank) within
// the estimate.
TEST(DapCli, BenchPlanHasDapRows) {
  const std::string rows = tmp("bench_plan.json");
  Result r =
      run(cli() + " bench --plan --shapes 8:16 --blocks 1 --threads 1 --memory 1GiB --profile " +
          plan_profile() + " --json " + rows);
  ASSERT_EQ(r.code, 0) << r.out;
  const nlohmann::json j = nlohmann::json::parse(std::ifstream(rows));
  int dap_rows = 0;
  for (const auto& row : j) {
    const std::string name = row["plan"].get<std::string>();
    if (name.rfind("DAP N=2", 0) != 0 && name != "planner, 2 devices") continue;
    ++dap_rows;
    if (name != "planner, 2 devices") {
      EXPECT_EQ(row["dap"].get<int>(), 2) << name;
    }
    if (!row["fits"].get<bool>()) continue;
    ASSERT_FALSE(row["peak_tracked_bytes"].is_null()) << name << ": not measured\n" << r.out;
    EXPECT_LE(row["peak_tracked_bytes"].get<int64_t>(), row["peak_bytes_estimate"].get<int64_t>())
        << name;
  }
  EXPECT_EQ(dap_rows, 5) << r.out;  // planner with 2 devices; DAP none / module, whole / chunked
}

}  // namespace
}  // namespace fc
