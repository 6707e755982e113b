// `mpirun -np N foldcube run --model af2 --dap N`: the whole AlphaFold2 model with every rank
// holding only its shards of m and z gives the one-process outputs and OpenFold's golden outputs,
// and each rank's tracked peak drops with N. Every launch runs under `timeout`.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "exec/af2_dap.h"
#include "foldcube/io.h"
#include "test_util.h"

namespace fc {
namespace {

// `foldcube <args>` on np MPI ranks (np 0: without mpirun), under timeout.
test::Result launch(int np, const std::string& args) { return test::run_mpi_cli(np, args); }

// Worst golden-metric error over every output.<name> of `ref` (which `got` must all hold).
double worst_output_err(const std::string& got_path, const std::string& ref_path,
                        std::string* worst_name) {
  TensorFile got, ref;
  EXPECT_TRUE(read_safetensors(got_path, &got).ok()) << got_path;
  EXPECT_TRUE(read_safetensors(ref_path, &ref).ok()) << ref_path;
  double worst = 0;
  int compared = 0;
  for (const std::string& name : ref.names) {
    if (name.rfind("output.", 0) != 0) continue;
    if (!got.has(name)) {
      ADD_FAILURE() << "output not produced: " << name;
      continue;
    }
    const Tensor& r = ref.tensors.at(name);
    const Tensor& g = got.tensors.at(name);
    EXPECT_EQ(g.shape(), r.shape()) << name;
    if (g.shape() != r.shape()) continue;
    const double e = r.dtype() == DType::I64
                         ? (g.data<int64_t>()[0] == r.data<int64_t>()[0] ? 0.0 : 1.0)
                         : test::golden_err(g, r);
    if (e > worst) {
      worst = e;
      *worst_name = name;
    }
    ++compared;
  }
  EXPECT_GT(compared, 20);
  return worst;
}

// Runs `args --out <file>` on np ranks (0: one process without mpirun) and returns the worst
// output error against the file `ref` (infinity when the run failed), naming it in *name.
double run_and_compare(int np, const std::string& args, const std::string& ref, std::string* name) {
  const std::string out = test::temp_file("af2_np" + std::to_string(np) + ".safetensors");
  const test::Result r =
      launch(np, args + " --out " + out + (np > 0 ? " --dap " + std::to_string(np) : ""));
  EXPECT_EQ(r.code, 0) << r.out;
  if (r.code != 0) return std::numeric_limits<double>::infinity();
  return worst_output_err(out, ref, name);
}

// The golden af2_model_tiny file (r = 12, 6 clusters + 2 template rows, 10 extra rows, 3 passes)
// on 2 and 4 ranks (4: every row count padded): every output within 1e-4 of OpenFold (the
// README's tolerance, 5e-4 for the structure group) and within 1e-5 of one process.
TEST(DapAf2Cli, GoldenTinyOnTwoAndFourRanksMatchesOneProcessAndOpenFold) {
  const std::string g = test::data_path("af2_model_tiny.safetensors");
  const std::string one = test::temp_file("af2_one.safetensors");
  test::Result r1 = launch(0, "run --model af2 --weights " + g + " --features " + g + " --out " +
                                  one + " --threads 1 --quiet");
  ASSERT_EQ(r1.code, 0) << r1.out;
  for (int np : {2, 4}) {
    const std::string out = test::temp_file("af2_dap" + std::to_string(np) + ".safetensors");
    const std::string rep = test::temp_file("af2_dap" + std::to_string(np) + ".json");
    test::Result r =
        launch(np, "run --model af2 --weights " + g + " --features " + g + " --out " + out +
                       " --report " + rep + " --threads 1 --dap " + std::to_string(np));
    ASSERT_EQ(r.code, 0) << r.out;
    EXPECT_NE(r.out.find("forward tracked peak per rank"), std::string::npos) << r.out;
    std::string name;
    EXPECT_LT(worst_output_err(out, g, &name), 1e-4) << np << " ranks vs OpenFold: " << name;
    EXPECT_LT(worst_output_err(out, one, &name), 1e-5) << np << " ranks vs one process: " << name;
    nlohmann::json j = nlohmann::json::parse(std::ifstream(rep));
    EXPECT_EQ(j["dap"], np);
    ASSERT_EQ(j["rank_forward_peak_tracked_bytes"].size(), static_cast<size_t>(np));
    EXPECT_GT(j["rank_sent_bytes"][np - 1].get<int64_t>(), 0);
  }
}

// The golden af2_model_af2dims file (AF2 widths, r = 16, 8 + 2 rows, 12 extra rows, 2 passes) on
// 2 ranks, from ../shared/golden (or $FOLDCUBE_GOLDEN_DIR) when present: every output within 1e-4
// of OpenFold.
TEST(DapAf2Cli, GoldenAf2DimsOnTwoRanksMatchesOpenFold) {
  const char* dir = std::getenv("FOLDCUBE_GOLDEN_DIR");
  const std::string g =
      (dir ? std::string(dir) : std::string(test::data_dir()) + "/../../../shared/golden") +
      "/af2_model_af2dims.safetensors";
  if (!std::filesystem::exists(g)) GTEST_SKIP() << "golden file not found: " << g;
  std::string name;
  EXPECT_LT(run_and_compare(
                2, "run --model af2 --weights " + g + " --features " + g + " --threads 1 --quiet",
                g, &name),
            1e-4)
      << name;
}

// Random model and features with no size a multiple of 3 (r = 13, 5 clusters + 2 templates,
// 7 extra rows) on 3 ranks, 2 passes: every output within 1e-4 of one process (the angle
// normalisation of the structure module amplifies summation-order noise: 2.6e-5 in sm.angles).
TEST(DapAf2Cli, RandomJobWithPaddingOnThreeRanksMatchesOneProcess) {
  const std::string args =
      "run --model af2 --r 13 --s 5 --extra 7 --templates 2 --blocks 2 --recycles 1 --threads 1 "
      "--quiet";
  const std::string one = test::temp_file("af2_rand1.safetensors");
  const test::Result r1 = launch(0, args + " --out " + one);
  ASSERT_EQ(r1.code, 0) << r1.out;
  std::string name;
  EXPECT_LT(run_and_compare(3, args, one, &name), 1e-4) << name;
}

// Ranks started with different flags (here the recycling count) stop before any work, with one
// message, instead of running different models.
TEST(DapAf2Cli, MismatchedCommandLinesAreDetected) {
  const std::string args = "run --model af2 --r 8 --s 3 --extra 4 --templates 1 --blocks 1 --quiet";
  const std::string limit = std::to_string(static_cast<int>(120 * test::kTimeScale));
  const test::Result r = test::run_cli_env(
      "timeout " + limit + " " + std::string(test::mpiexec()) + " --oversubscribe -np 1",
      args + " --recycles 0 --dap 2 : -np 1 " + std::string(test::cli_path()) + " " + args +
          " --recycles 1 --dap 2");
  EXPECT_NE(r.code, 0) << r.out;
  EXPECT_NE(r.code, 124) << "timed out: " << r.out;
  EXPECT_NE(r.out.find("different command lines"), std::string::npos) << r.out;
}

// --dp D beside --model af2 --dap N (one feature set: nothing for data parallelism to split) ends
// the job with one message naming --dp, on the N ranks it used to run on while ignoring --dp
// and on the D*N ranks a training job would need; without mpirun too.
TEST(DapAf2Cli, DataParallelismIsRefusedNotIgnored) {
  const std::string args =
      "run --model af2 --r 8 --s 3 --extra 4 --templates 1 --blocks 1 --recycles 0 --quiet";
  for (const auto& [np, flags] :
       {std::pair{2, " --dap 2 --dp 2"}, {4, " --dap 2 --dp 2"}, {0, " --dp 2"}}) {
    const test::Result r = launch(np, args + flags);
    EXPECT_NE(r.code, 0) << np << flags << ": " << r.out;
    EXPECT_NE(r.code, 124) << "timed out: " << r.out;
    EXPECT_NE(r.out.find("--dp 2: --model af2 folds one feature set"), std::string::npos)
        << np << flags << ": " << r.out;
    EXPECT_EQ(r.out.find("mean pLDDT"), std::string::npos) << np << flags << ": ran: " << r.out;
  }
}

// The per-rank memory model beside the measurement: on 2 ranks the report's predicted forward
// peak of every rank equals its measured tracked peak to the byte (and the printout says so);
// --memory-budget X (per rank, between the finest chunking's peak and the default's) is planned
// from that model: every rank's peak within X, still equal to the prediction; a budget below the
// finest chunking is refused with the smallest feasible budget per rank; the same under --dtype
// bf16 (a budget between its own finest and default peaks kept, predicted = measured); an early
// stop is predicted for the passes run.
TEST(DapAf2Cli, MemoryModelEqualsEveryRankPeakAndPlansTheBudget) {
  const std::string args =
      "run --model af2 --r 64 --s 8 --extra 48 --templates 2 --blocks 1 --recycles 0 --threads 1 "
      "--dap 2 --report ";
  auto peaks = [](const std::string& rep, const char* key) {
    nlohmann::json j = nlohmann::json::parse(std::ifstream(rep));
    return j[key].get<std::vector<int64_t>>();
  };
  const std::string rep = test::temp_file("af2_model.json");
  test::Result r = launch(2, args + rep);
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("(= measured, to the byte)"), std::string::npos) << r.out;
  const std::vector<int64_t> got = peaks(rep, "rank_forward_peak_tracked_bytes");
  EXPECT_EQ(peaks(rep, "rank_predicted_forward_peak_bytes"), got);
  const std::vector<int64_t> base = peaks(rep, "rank_base_tracked_bytes");
  const int64_t top = std::max(got[0], got[1]);
  const std::string rep_b = test::temp_file("af2_model_budget.json");
  r = launch(2,
             args + rep_b + " --memory-budget " + std::to_string(base[0] + (top - base[0]) / 10));
  EXPECT_NE(r.code, 0) << r.out;
  const std::string key = "the smallest feasible budget per rank is ";
  const size_t at = r.out.find(key);
  ASSERT_NE(at, std::string::npos) << r.out;
  const int64_t finest = static_cast<int64_t>(std::stod(r.out.substr(at + key.size())) * 1048576);
  ASSERT_GT(top - finest, 1 << 18) << "no room between the finest and the default chunking";
  const int64_t budget = (finest + top) / 2;
  r = launch(2, args + rep_b + " --memory-budget " + std::to_string(budget));
  ASSERT_EQ(r.code, 0) << r.out;
  const std::vector<int64_t> got_b = peaks(rep_b, "rank_forward_peak_tracked_bytes");
  EXPECT_EQ(peaks(rep_b, "rank_predicted_forward_peak_bytes"), got_b);
  for (int64_t p : got_b) EXPECT_LE(p, budget);
  // bf16: its own finest and default peaks (its work buffers differ), a budget between them.
  r = launch(2, args + rep_b + " --dtype bf16");
  ASSERT_EQ(r.code, 0) << r.out;
  const std::vector<int64_t> top_h = peaks(rep_b, "rank_forward_peak_tracked_bytes");
  r = launch(2, args + rep_b + " --dtype bf16 --memory-budget " + std::to_string(base[0] + 1));
  ASSERT_NE(r.out.find(key), std::string::npos) << r.out;
  const int64_t finest_h =
      static_cast<int64_t>(std::stod(r.out.substr(r.out.find(key) + key.size())) * 1048576);
  const int64_t budget_h = (finest_h + std::max(top_h[0], top_h[1])) / 2;
  r = launch(2, args + rep_b + " --dtype bf16 --memory-budget " + std::to_string(budget_h));
  ASSERT_EQ(r.code, 0) << r.out;
  const std::vector<int64_t> got_h = peaks(rep_b, "rank_forward_peak_tracked_bytes");
  EXPECT_EQ(peaks(rep_b, "rank_predicted_forward_peak_bytes"), got_h);
  for (int64_t p : got_h) EXPECT_LE(p, budget_h);
  // An early stop (after the second of three passes) is predicted as a run of two passes.
  const std::string rep_e = test::temp_file("af2_model_early.json");
  r = launch(2,
             "run --model af2 --r 24 --s 5 --extra 8 --templates 1 --blocks 1 --recycles 2 "
             "--recycle-tolerance 1000 --threads 1 --dap 2 --report " +
                 rep_e);
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("2 pass(es)"), std::string::npos) << r.out;
  EXPECT_EQ(peaks(rep_e, "rank_predicted_forward_peak_bytes"),
            peaks(rep_e, "rank_forward_peak_tracked_bytes"));
}

// Per-rank peaks: on 2 ranks with replicated weights each rank's forward peak above its weights
// and features is below the one-rank peak by at least half the one-rank shards of m and z (they
// halve; the work buffers follow the shard sizes); each rank's shards are half of m and z; writing
// the outputs (one shard at a time) adds at most one z shard to a rank's forward peak. With
// sharded weights (the default) each rank holds less, and its forward peak above that is at most
// one Evoformer block's buffer more.
TEST(DapAf2Cli, RankPeakDropsWithTwoRanks) {
  const std::string args =
      "run --model af2 --r 48 --s 16 --extra 32 --templates 2 --blocks 2 --recycles 1 "
      "--threads 1 --quiet --out " +
      test::temp_file("af2_peak.safetensors") + " --report ";
  const std::string rep1 = test::temp_file("af2_peak1.json");
  const std::string rep2 = test::temp_file("af2_peak2.json");
  test::Result r1 = launch(0, args + rep1 + " --dap 1");
  ASSERT_EQ(r1.code, 0) << r1.out;
  test::Result r2 = launch(2, args + rep2 + " --dap 2 --replicate-weights");
  ASSERT_EQ(r2.code, 0) << r2.out;
  const std::string rep3 = test::temp_file("af2_peak3.json");
  test::Result r3 = launch(2, args + rep3 + " --dap 2");
  ASSERT_EQ(r3.code, 0) << r3.out;
  nlohmann::json j3 = nlohmann::json::parse(std::ifstream(rep3));
  EXPECT_TRUE(j3["sharded_weights"].get<bool>());
  nlohmann::json j1 = nlohmann::json::parse(std::ifstream(rep1));
  nlohmann::json j2 = nlohmann::json::parse(std::ifstream(rep2));
  auto work = [](const nlohmann::json& j, int k) {
    return j["rank_forward_peak_tracked_bytes"][k].get<int64_t>() -
           j["rank_base_tracked_bytes"][k].get<int64_t>();
  };
  const int64_t one = work(j1, 0), shards1 = j1["rank_shard_bytes"][0].get<int64_t>();
  const int64_t m_bytes = 18 * 48 * 256 * 4, z_bytes = 48 * 48 * 128 * 4;  // whole m, z
  for (int k = 0; k < 2; ++k) {
    EXPECT_LE(work(j2, k), one - shards1 / 2) << "rank " << k << " of 2 vs " << one;
    EXPECT_LE(j2["rank_shard_bytes"][k].get<int64_t>(), (m_bytes + z_bytes) / 2);
    EXPECT_LE(j2["rank_output_write_peak_bytes"][k].get<int64_t>(),
              j2["rank_forward_peak_tracked_bytes"][k].get<int64_t>() + z_bytes / 2);
    EXPECT_LT(j3["rank_base_tracked_bytes"][k].get<int64_t>(),
              j2["rank_base_tracked_bytes"][k].get<int64_t>());
    EXPECT_LE(work(j3, k), work(j2, k) + dap_block_buffer_bytes(kEvoformerBlock,
                                                                alphafold_model_1_ptm().evoformer));
  }
}

}  // namespace
}  // namespace fc
