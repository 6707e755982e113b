// `mpirun -np N foldcube run --stack pairformer|msa_module --dap N`: the AF3 trunk with the single
// stream sharded by tokens, m by sequences / residues and z by rows gives Boltz's golden outputs
// and gradients (README tolerances) and the one-process ones (1e-5), under every recompute policy
// and chunking, on 2 ranks and (Pairformer) 4 oversubscribed ranks; with dropout, the one-process
// run with the same seed.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <string>

#include "foldcube/io.h"
#include "test_util.h"

namespace fc {
namespace {

struct Af3DapCase {
  std::string file;    // tests/data
  int np;              // ranks
  std::string policy;  // "" = forward; none | module | block = training step
  int64_t chunk;       // 0 = automatic
};
std::string CaseName(const Af3DapCase& c) {
  return c.file.substr(0, c.file.find('.')) + "_np" + std::to_string(c.np) + "_" +
         (c.policy.empty() ? "forward" : c.policy) + "_chunk" + std::to_string(c.chunk);
}
void PrintTo(const Af3DapCase& c, std::ostream* os) { *os << CaseName(c); }

// Runs the case on np ranks (0: one process) with `extra` flags and reads its output file.
TensorFile run_case(const Af3DapCase& c, int np, const std::string& extra = "") {
  const std::string g = test::golden_path(c.file);
  const std::string out =
      test::temp_file(CaseName(c) + "_" + std::to_string(np) + (extra.empty() ? "" : "_x") + ".st");
  std::string args = "run --weights " + g + " --inputs " + g + " --out " + out +
                     " --threads 1 --quiet --chunk " + std::to_string(c.chunk) + extra;
  if (!c.policy.empty()) args += " --grad-outputs " + g + " --policy " + c.policy;
  const std::string report = out + ".json";
  if (np > 0) args += " --dap " + std::to_string(np) + " --report " + report;
  const test::Result r = test::run_mpi_cli(np, args);
  EXPECT_EQ(r.code, 0) << r.out;
  if (r.code == 0 && np > 0 && c.policy.empty()) {  // the forward sent what the table says
    std::ifstream in(report);
    const nlohmann::json j = nlohmann::json::parse(in);
    const int64_t model = j["blocks"].get<int64_t>() * j["block_sent_bytes_model"].get<int64_t>();
    EXPECT_GT(model, 0);
    for (const auto& sent : j["rank_sent_bytes"]) EXPECT_EQ(sent.get<int64_t>(), model);
  }
  TensorFile f;
  if (r.code == 0) {
    EXPECT_TRUE(read_safetensors(out, &f).ok()) << out;
  }
  return f;
}

// The limit against one process: 1e-5, except for the gradients that are mathematically zero
// (README: a per-row constant added to softmax logits), which hold summation noise of the
// magnitude of the golden limit.
double one_process_limit(const std::string& name) {
  for (const char* zero : {"attention.proj_z.0.bias", "pair_weighted_averaging.norm_z.bias"})
    if (name.size() >= std::strlen(zero) &&
        name.compare(name.size() - std::strlen(zero), std::string::npos, zero) == 0)
      return 2e-4;
  return 1e-5;
}

// The golden file's tensor `name` (F32).
Tensor golden(const TensorFile& f, const std::string& name) {
  Tensor t;
  EXPECT_TRUE(f.get_f32(name, {}, &t).ok()) << name;
  return t;
}

class DapAf3Cli : public ::testing::TestWithParam<Af3DapCase> {};

TEST_P(DapAf3Cli, GoldenAndOneProcess) {
  const Af3DapCase& c = GetParam();
  const std::string path = test::golden_path(c.file);
  if (path.empty()) GTEST_SKIP() << c.file << " not present (shared/golden)";
  TensorFile ref;
  ASSERT_TRUE(read_safetensors(path, &ref).ok());
  const TensorFile one = run_case(c, 0), dap = run_case(c, c.np);
  ASSERT_FALSE(one.names.empty());
  ASSERT_FALSE(dap.names.empty());
  const bool pf = c.file.rfind("pairformer", 0) == 0;
  // Outputs at the unpadded positions (README "Masks").
  std::map<std::string, Tensor> keep = {{"output.z", golden(ref, "input.pair_mask")}};
  if (pf) keep["output.s"] = golden(ref, "input.mask");
  for (const auto& [name, mask] : keep) {
    ASSERT_TRUE(dap.has(name)) << name;
    EXPECT_LT(test::masked_err(dap.tensors.at(name), ref.tensors.at(name), mask), 1e-4) << name;
    EXPECT_LT(test::masked_err(dap.tensors.at(name), one.tensors.at(name), mask), 1e-5) << name;
  }
  if (c.policy.empty()) return;
  // Every golden gradient, compared everywhere (README limit 2e-4).
  int checked = 0;
  for (const std::string& name : ref.names) {
    if (name.rfind("grad.", 0) != 0) continue;
    ASSERT_TRUE(dap.has(name)) << "no gradient produced for " << name;
    EXPECT_LT(test::golden_err(dap.tensors.at(name), ref.tensors.at(name)), 2e-4) << name;
    EXPECT_LT(test::golden_err(dap.tensors.at(name), one.tensors.at(name)), one_process_limit(name))
        << name;
    ++checked;
  }
  EXPECT_GT(checked, 40);
}

INSTANTIATE_TEST_SUITE_P(
    Cases, DapAf3Cli,
    ::testing::Values(Af3DapCase{"pairformer_tiny.safetensors", 2, "", 0},
                      Af3DapCase{"pairformer_tiny.safetensors", 2, "", 3},
                      Af3DapCase{"pairformer_tiny.safetensors", 4, "", 0},
                      Af3DapCase{"pairformer_tiny.safetensors", 2, "none", 0},
                      Af3DapCase{"pairformer_tiny.safetensors", 2, "module", 3},
                      Af3DapCase{"pairformer_tiny.safetensors", 2, "block", 1},
                      Af3DapCase{"pairformer_tiny.safetensors", 4, "module", 0},
                      Af3DapCase{"pairformer_af3dims.safetensors", 2, "", 0},
                      Af3DapCase{"pairformer_af3dims.safetensors", 2, "module", 3},
                      Af3DapCase{"msa_module_tiny.safetensors", 2, "", 0},
                      Af3DapCase{"msa_module_tiny.safetensors", 2, "", 3},
                      Af3DapCase{"msa_module_tiny.safetensors", 2, "none", 0},
                      Af3DapCase{"msa_module_tiny.safetensors", 2, "module", 1},
                      Af3DapCase{"msa_module_tiny.safetensors", 2, "block", 3}),
    [](const auto& info) { return CaseName(info.param); });

// `--dtype bf16` (the forward): the shards take bf16 GEMM inputs where one process does (the
// triangle and outer products on the gathered bf16 values, the single attention's projections
// and attention products), so the DAP output is within kDapVsOneBf16 of the one-process bf16 run
// (measured: bit-identical in every case since the SwiGLU transitions' bf16 form; the bf16
// effect itself is ~1e-2) and within the bf16 forward tolerance (tests/fused_test.cc
// kBf16GoldenTol, normwise) of Boltz's float64 outputs at the unpadded positions; fp32 and bf16
// differ (the bf16 path ran).
constexpr double kDapVsOneBf16 = 1e-5, kBf16GoldenTol = 1e-2;
// t with the positions keep [numel / c] marks 0 set to 0 (c trailing channels per position).
Tensor masked_copy(const Tensor& t, const Tensor& keep) {
  Tensor out = t.to(DType::F32).contiguous().clone();
  const Tensor k = keep.to(DType::F32).contiguous();
  const int64_t c = out.numel() / k.numel();
  for (int64_t i = 0; i < out.numel(); ++i)
    if (k.f32()[i / c] == 0) out.f32()[i] = 0;
  return out;
}
// Case c's golden file, its one-process and DAP bf16 runs and its DAP fp32 run, and the unpadded
// positions of each output (README "Masks"); false when the golden file is not present.
struct Bf16Runs {
  TensorFile ref, one, dap, f32;
  std::map<std::string, Tensor> keep;
};
bool bf16_runs(const Af3DapCase& c, Bf16Runs* r) {
  const std::string path = test::golden_path(c.file);
  if (path.empty()) return false;
  EXPECT_TRUE(read_safetensors(path, &r->ref).ok());
  r->one = run_case(c, 0, " --dtype bf16");
  r->dap = run_case(c, c.np, " --dtype bf16");
  r->f32 = run_case(c, c.np);
  r->keep = {{"output.z", golden(r->ref, "input.pair_mask")}};
  if (c.file.rfind("pairformer", 0) == 0) r->keep["output.s"] = golden(r->ref, "input.mask");
  return true;
}
// The bf16 cases' fixture: the runs of the case (skipped when its golden file is not present).
class Bf16Case : public ::testing::TestWithParam<Af3DapCase> {
 protected:
  void SetUp() override {
    if (!bf16_runs(GetParam(), &runs_)) GTEST_SKIP() << GetParam().file << " not present";
    ASSERT_FALSE(runs_.one.names.empty() || runs_.dap.names.empty() || runs_.f32.names.empty());
  }
  Bf16Runs runs_;
};
class DapAf3CliBf16 : public Bf16Case {};

TEST_P(DapAf3CliBf16, ForwardMatchesGoldenAndOneProcessBf16) {
  const Af3DapCase& c = GetParam();
  const TensorFile &ref = runs_.ref, &one = runs_.one, &dap = runs_.dap, &f32 = runs_.f32;
  const std::map<std::string, Tensor>& keep = runs_.keep;
  for (const auto& [name, mask] : keep) {
    const Tensor& d = dap.tensors.at(name);
    const double vs_one = test::masked_err(d, one.tensors.at(name), mask);
    const Tensor gold = masked_copy(ref.tensors.at(name), mask);
    const double golden_one = test::normwise_err(masked_copy(one.tensors.at(name), mask), gold);
    const double golden_dap = test::normwise_err(masked_copy(d, mask), gold);
    std::printf(
        "[ info ] %s %s bf16: vs one process %.2e, normwise vs Boltz %.2e (one process "
        "%.2e), fp32 vs bf16 %.2e\n",
        CaseName(c).c_str(), name.c_str(), vs_one, golden_dap, golden_one,
        test::masked_err(f32.tensors.at(name), d, mask));
    EXPECT_LT(vs_one, kDapVsOneBf16) << name;
    EXPECT_LT(golden_dap, kBf16GoldenTol) << name;
    EXPECT_GT(test::masked_err(f32.tensors.at(name), d, mask), 100 * kDapVsOneBf16) << name;
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, DapAf3CliBf16,
                         ::testing::Values(Af3DapCase{"pairformer_tiny.safetensors", 2, "", 0},
                                           Af3DapCase{"pairformer_tiny.safetensors", 4, "", 3},
                                           Af3DapCase{"pairformer_af3dims.safetensors", 2, "", 0},
                                           Af3DapCase{"msa_module_tiny.safetensors", 2, "", 0},
                                           Af3DapCase{"msa_module_tiny.safetensors", 3, "", 0}),
                         [](const auto& info) { return CaseName(info.param); });

// `--dtype bf16` training (`--policy`): the shards round where one process rounds (bf16 kept
// state, bf16 GEMM inputs, the single attention's shard form too, which sums every token's
// dL/d k | v over the shards before rounding it), so every output and gradient is within the bf16
// training tolerances (tests/train_bf16_test.cc) of Boltz's float64 ones and within
// kDapVsOneTrainTol of the one-process bf16 step. Measured (normwise, worst tensor): 2.7e-7 –
// 3.3e-7 for pairformer_tiny and msa_module_tiny on 2, 3 and 4 ranks; 1.3e-4 for
// pairformer_af3dims (f32-order differences between the shard and one-process forms at AF3
// dimensions flip a few bf16 roundings, which the backward carries; as for the AF2 stacks).
// Gradients that are zero to rounding in the golden file are noise of either sign there and left
// out of the comparison to one process. fp32 and bf16 differ.
constexpr double kBf16OutTol = 2e-2, kBf16InputGradTol = 0.1, kBf16ParamGradTol = 0.3;
constexpr double kDapVsOneTrainTol = 1e-3;
class DapAf3CliBf16Training : public Bf16Case {};

TEST_P(DapAf3CliBf16Training, MatchesGoldenAndOneProcessBf16) {
  const Af3DapCase& c = GetParam();
  const TensorFile &ref = runs_.ref, &one = runs_.one, &dap = runs_.dap, &f32 = runs_.f32;
  const std::map<std::string, Tensor>& keep = runs_.keep;
  double out = 0, in_grad = 0, param_grad = 0, vs_one = 0, vs_f32 = 0;
  for (const auto& [name, mask] : keep) {
    const Tensor gold = masked_copy(ref.tensors.at(name), mask);
    out = std::max(out, test::normwise_err(masked_copy(dap.tensors.at(name), mask), gold));
    vs_one = std::max(vs_one, test::normwise_err(masked_copy(dap.tensors.at(name), mask),
                                                 masked_copy(one.tensors.at(name), mask)));
    vs_f32 = std::max(vs_f32, test::normwise_err(masked_copy(dap.tensors.at(name), mask),
                                                 masked_copy(f32.tensors.at(name), mask)));
  }
  int checked = 0;
  for (const std::string& name : ref.names) {
    if (name.rfind("grad.", 0) != 0) continue;
    ASSERT_TRUE(dap.has(name)) << name;
    const Tensor& r = ref.tensors.at(name);
    const std::string scale = test::noise_scale_name(name);
    const double e =
        test::param_grad_err(dap.tensors.at(name), r, ref.has(scale) ? ref.tensors.at(scale) : r);
    const bool param = name.rfind("grad.param.", 0) == 0;
    EXPECT_LT(e, param ? kBf16ParamGradTol : kBf16InputGradTol) << name;
    (param ? param_grad : in_grad) = std::max(param ? param_grad : in_grad, e);
    if (!test::zero_to_rounding(r)) {
      const double x = test::normwise_err(dap.tensors.at(name), one.tensors.at(name));
      EXPECT_LT(x, kDapVsOneTrainTol) << name;
      vs_one = std::max(vs_one, x);
    }
    ++checked;
  }
  EXPECT_GT(checked, 40);
  std::printf(
      "[ info ] %s bf16 training: golden out %.2e in-grad %.2e param-grad %.2e; vs one process "
      "bf16 %.2e; vs DAP fp32 out %.2e\n",
      CaseName(c).c_str(), out, in_grad, param_grad, vs_one, vs_f32);
  EXPECT_LT(out, kBf16OutTol);
  EXPECT_LT(vs_one, kDapVsOneTrainTol);
  EXPECT_GT(vs_f32, 10 * kDapVsOneBf16);  // the bf16 path ran
}

INSTANTIATE_TEST_SUITE_P(
    Cases, DapAf3CliBf16Training,
    ::testing::Values(Af3DapCase{"pairformer_tiny.safetensors", 2, "none", 0},
                      Af3DapCase{"pairformer_tiny.safetensors", 4, "module", 3},
                      Af3DapCase{"pairformer_af3dims.safetensors", 2, "block", 0},
                      Af3DapCase{"msa_module_tiny.safetensors", 2, "module", 1},
                      Af3DapCase{"msa_module_tiny.safetensors", 3, "block", 0}),
    [](const auto& info) { return CaseName(info.param); });

// Random AF3-dimension weights and inputs whose token count (and MSA rows) 3 ranks do not divide:
// the padded tokens and sequences are masked and cropped, so every output and gradient equals
// the one-process one.
TEST(DapAf3CliPadding, RandomJobOnThreeRanksMatchesOneProcess) {
  for (const std::string job : {"--stack pairformer --r 13", "--stack msa_module --r 11 --s 5"}) {
    SCOPED_TRACE(job);
    std::map<int, TensorFile> outs;
    for (int np : {0, 3}) {
      const std::string out = test::temp_file("padded_np" + std::to_string(np) + ".st");
      const test::Result r = test::run_mpi_cli(
          np, "run " + job + " --blocks 1 --seed 5 --policy module --threads 1 --quiet --out " +
                  out + (np > 0 ? " --dap 3" : ""));
      ASSERT_EQ(r.code, 0) << r.out;
      ASSERT_TRUE(read_safetensors(out, &outs[np]).ok());
    }
    int compared = 0;
    for (const std::string& name : outs[0].names) {
      ASSERT_TRUE(outs[3].has(name)) << name;
      EXPECT_LT(test::golden_err(outs[3].tensors.at(name), outs[0].tensors.at(name)),
                one_process_limit(name))
          << name;
      ++compared;
    }
    EXPECT_GT(compared, 20);
  }
}

// Training with AF3 dropout (run --train --seed) under DAP draws the one-process masks: the
// per-row (per-column, per-MSA-row) masks are keyed by global rows, so every output and gradient
// equals the one-process run with the same seed, under every policy, on 2 and 4 ranks, with
// token and MSA-row counts the ranks do not divide (padded). Masks drawn by local rows would give
// rank 1.. the draws of rank 0's rows and differences of the order of the updates. Limit 5e-5:
// over two blocks the eval-mode step (--backward) differs from one process by up to 2.2e-5 (the
// sharded sums' order), with or without dropout.
struct Af3DropoutCase {
  std::string stack;   // pairformer | msa_module
  std::string policy;  // none | module | block
};
std::string DropoutName(const Af3DropoutCase& c) { return c.stack + "_" + c.policy; }
void PrintTo(const Af3DropoutCase& c, std::ostream* os) { *os << DropoutName(c); }

class DapAf3CliDropout : public ::testing::TestWithParam<Af3DropoutCase> {};

TEST_P(DapAf3CliDropout, MatchesOneProcessWithTheSameSeed) {
  const Af3DropoutCase& c = GetParam();
  const std::string job =
      c.stack == "pairformer" ? "--stack pairformer --r 13" : "--stack msa_module --r 11 --s 5";
  std::map<int, TensorFile> outs;
  for (int np : {0, 2, 4}) {
    const std::string out =
        test::temp_file("dropout_" + DropoutName(c) + "_np" + std::to_string(np) + ".st");
    const test::Result r =
        test::run_mpi_cli(np, "run " + job + " --blocks 2 --seed 11 --train --policy " + c.policy +
                                  " --threads 1 --quiet --out " + out +
                                  (np > 0 ? " --dap " + std::to_string(np) : ""));
    ASSERT_EQ(r.code, 0) << r.out;
    ASSERT_TRUE(read_safetensors(out, &outs[np]).ok());
  }
  for (int np : {2, 4}) {
    SCOPED_TRACE("np " + std::to_string(np));
    int compared = 0;
    for (const std::string& name : outs[0].names) {
      ASSERT_TRUE(outs[np].has(name)) << name;
      EXPECT_LT(test::golden_err(outs[np].tensors.at(name), outs[0].tensors.at(name)),
                std::max(5e-5, one_process_limit(name)))
          << name;
      ++compared;
    }
    EXPECT_GT(compared, 20);
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, DapAf3CliDropout,
                         ::testing::Values(Af3DropoutCase{"pairformer", "none"},
                                           Af3DropoutCase{"pairformer", "module"},
                                           Af3DropoutCase{"pairformer", "block"},
                                           Af3DropoutCase{"msa_module", "none"},
                                           Af3DropoutCase{"msa_module", "module"},
                                           Af3DropoutCase{"msa_module", "block"}),
                         [](const auto& info) { return DropoutName(info.param); });

// run --dap 2 --memory-budget: the per-rank estimate bounds every rank's measured tracked peak
// (and is within 25 % of the largest), a budget below the automatic forward's estimate lowers the
// chunk target and is met, training without --policy takes the least recompute whose estimate
// fits, and a budget nothing fits ends every rank with one message naming the least budget; in
// fp32 and in bf16 (--dtype bf16, forward and training).
TEST(DapAf3CliBudget, EstimateBoundsEveryRankAndTheBudgetIsMet) {
  const std::string report = test::temp_file("dap_budget.json");
  auto run = [&](const std::string& job, const std::string& budget, nlohmann::json* j) {
    const test::Result r = test::run_mpi_cli(
        2, "run " + job + " --blocks 1 --seed 3 --threads 1 --quiet --dap 2 --memory-budget " +
               budget + " --report " + report);
    if (r.code == 0) {
      std::ifstream in(report);
      *j = nlohmann::json::parse(in);
    }
    return r;
  };
  auto check = [](const nlohmann::json& j, int64_t budget) {
    const int64_t est = j["memory_plan"]["planned_peak_bytes"].get<int64_t>();
    const int64_t measured = j["memory_plan"]["measured_peak_bytes"].get<int64_t>();
    for (const auto& p : j["rank_peak_tracked_bytes"]) EXPECT_LE(p.get<int64_t>(), est);
    EXPECT_LE(est, measured + measured / 4);
    EXPECT_LE(measured, budget);
  };
  // fp32 and bf16 (the bf16 step's one-process plan inside the per-rank decomposition)
  for (const std::string job : {"--stack pairformer --r 40", "--stack msa_module --r 36 --s 20",
                                "--stack pairformer --r 40 --dtype bf16",
                                "--stack msa_module --r 36 --s 20 --dtype bf16"}) {
    SCOPED_TRACE(job);
    nlohmann::json free, tight, train, train_tight;
    ASSERT_EQ(run(job, "4GiB", &free).code, 0);
    check(free, int64_t{4} << 30);
    const int64_t est = free["memory_plan"]["planned_peak_bytes"].get<int64_t>();
    const int64_t least = free["memory_plan"]["least_budget_bytes"].get<int64_t>();
    ASSERT_LT(least, est) << "the automatic chunking is already the least";
    const int64_t mid = (least + est) / 2;
    ASSERT_EQ(run(job, std::to_string(mid), &tight).code, 0);
    check(tight, mid);
    EXPECT_LT(tight["memory_plan"]["chunk_target_bytes"].get<int64_t>(),
              free["memory_plan"]["chunk_target_bytes"].get<int64_t>());
    ASSERT_EQ(run(job + " --train", "4GiB", &train).code, 0);
    EXPECT_EQ(train["memory_plan"]["policy"], "none");
    check(train, int64_t{4} << 30);
    const int64_t none = train["memory_plan"]["planned_peak_bytes"].get<int64_t>();
    ASSERT_EQ(run(job + " --train", std::to_string(none - 1), &train_tight).code, 0);
    EXPECT_NE(train_tight["memory_plan"]["policy"], "none");
    check(train_tight, none - 1);
    const test::Result r = run(job, std::to_string(least - 1), &tight);
    EXPECT_NE(r.code, 0);
    EXPECT_NE(r.out.find("needs at least"), std::string::npos) << r.out;
  }
}

// User errors end every rank quickly with one message: a missing inputs file on rank 0, a rank
// count that is not --dap.
TEST(DapAf3CliErrors, RefusedWithOneMessage) {
  const std::string g = test::data_path("pairformer_tiny.safetensors");
  const std::string base =
      "run --weights " + g + " --threads 1 --quiet --out " + test::temp_file("refused.st");
  struct Case {
    int np;
    std::string args, message;
  };
  for (const Case& c : {Case{2, " --inputs /nonexistent.safetensors --dap 2", "rank 0: "},
                        Case{2, " --inputs " + g + " --dap 3", "needs 3 MPI ranks"}}) {
    const test::Result r = test::run_mpi_cli(c.np, base + c.args);
    EXPECT_NE(r.code, 0) << c.args << "\n" << r.out;
    EXPECT_NE(r.out.find(c.message), std::string::npos) << c.args << "\n" << r.out;
  }
}

}  // namespace
}  // namespace fc
