// The foldcube CLI end to end: golden files as weights and inputs, the embedded default job, the
// report JSON, and one-line errors with non-zero exit codes for bad input.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>

#include "foldcube/io.h"
#include "test_util.h"

namespace fc {
namespace {

using test::Result;
using test::run_cli;

std::string tmp(const std::string& name) { return test::temp_file(name); }

// Lines of CLI output, not counting a sanitizer build's own diagnostics ("==pid==WARNING: ...").
int count_lines(const std::string& s) {
  int n = 0;
  for (size_t b = 0; b < s.size();) {
    const size_t e = std::min(s.find('\n', b), s.size());
    n += s.compare(b, 2, "==") != 0;
    b = e + 1;
  }
  return n;
}

// Asserts a clean user error: exit code 1, exactly one line, "foldcube: error:" and `needle`.
void expect_user_error(const Result& r, const std::string& needle) {
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_EQ(count_lines(r.out), 1) << r.out;
  EXPECT_NE(r.out.find("foldcube: error:"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(needle), std::string::npos) << "wanted '" << needle << "' in: " << r.out;
}

TEST(Cli, GoldenFileAsWeightsAndInputs) {
  const std::string g = test::data_path("evo_tiny.safetensors");
  const std::string out = tmp("out.safetensors"), rep = tmp("report.json");
  Result r = run_cli("run --weights " + g + " --inputs " + g + " --out " + out + " --report " +
                     rep + " --threads 2");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("tracked peak"), std::string::npos);
  TensorFile ref, got;
  ASSERT_TRUE(read_safetensors(g, &ref).ok());
  ASSERT_TRUE(read_safetensors(out, &got).ok());
  for (const char* name : {"output.m", "output.z", "output.s"}) {
    ASSERT_TRUE(got.has(name)) << name;
    EXPECT_EQ(got.tensors[name].dtype(), DType::F32);
    EXPECT_LT(test::golden_err(got.tensors[name], ref.tensors[name]), 1e-4) << name;
  }
  std::ifstream f(rep);
  nlohmann::json j = nlohmann::json::parse(f);
  for (const char* key : {"time_ms", "peak_tracked_bytes", "peak_rss_bytes"}) {
    ASSERT_TRUE(j.contains(key)) << key;
    EXPECT_GT(j[key].get<double>(), 0) << key;
  }
}

TEST(Cli, ExtraMsaGoldenFileDetectedFromMetadata) {
  const std::string g = test::data_path("extra_tiny.safetensors");
  const std::string out = tmp("extra_out.safetensors");
  Result r = run_cli("run --weights " + g + " --inputs " + g + " --out " + out);
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("ExtraMSA"), std::string::npos) << r.out;
  TensorFile ref, got;
  ASSERT_TRUE(read_safetensors(g, &ref).ok());
  ASSERT_TRUE(read_safetensors(out, &got).ok());
  for (const char* name : {"output.m", "output.z"})
    EXPECT_LT(test::golden_err(got.tensors[name], ref.tensors[name]), 1e-4) << name;
  EXPECT_FALSE(got.has("output.s"));
  expect_user_error(run_cli("run --weights " + g + " --stack pairformer"), "pairformer");
}

// `run --stack extra_msa --grad-outputs G`: a training step of the ExtraMSA stack whose output file
// holds the golden gradients; G's tensors are each optional, grad.output.s is refused.
TEST(Cli, ExtraMsaTrainingStepGolden) {
  const std::string g = test::data_path("extra_tiny.safetensors");
  TensorFile ref;
  ASSERT_TRUE(read_safetensors(g, &ref).ok());
  TensorFile go;
  go.put("grad.output.m", ref.tensors.at("probe.m"));
  go.put("grad.output.z", ref.tensors.at("probe.z"));
  const std::string gfile = tmp("extra_grad_out.safetensors"), out = tmp("extra_train.safetensors");
  ASSERT_TRUE(write_safetensors(gfile, go).ok());
  Result r = run_cli("run --stack extra_msa --weights " + g + " --inputs " + g +
                     " --grad-outputs " + gfile + " --out " + out + " --policy module");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("ExtraMSA"), std::string::npos) << r.out;
  TensorFile got;
  ASSERT_TRUE(read_safetensors(out, &got).ok());
  EXPECT_FALSE(got.has("output.s"));
  int grads = 0;
  for (const std::string& name : got.names) {
    if (name.rfind("grad.", 0) != 0) continue;
    ASSERT_TRUE(ref.has(name)) << name;
    EXPECT_LT(test::golden_err(got.tensors[name], ref.tensors[name]), 2e-4) << name;
    ++grads;
  }
  EXPECT_EQ(grads, 2 + 93);  // grad.input.m, .z and every parameter
  for (const char* name : {"output.m", "output.z"})
    EXPECT_LT(test::golden_err(got.tensors[name], ref.tensors[name]), 1e-4) << name;

  // Only grad.output.m given: dL/d output.z is zero, the step runs.
  TensorFile only_m;
  only_m.put("grad.output.m", ref.tensors.at("probe.m"));
  ASSERT_TRUE(write_safetensors(gfile, only_m).ok());
  EXPECT_EQ(run_cli("run --weights " + g + " --inputs " + g + " --grad-outputs " + gfile).code, 0);
  // The ExtraMSA stack has no output.s.
  only_m.put("grad.output.s", Tensor::full({12, 4}, 1.f));
  ASSERT_TRUE(write_safetensors(gfile, only_m).ok());
  expect_user_error(run_cli("run --weights " + g + " --inputs " + g + " --grad-outputs " + gfile),
                    "grad.output.s");
}

// The Evoformer training step with grad.output.s: O holds output.s and the linear.* gradients.
TEST(Cli, EvoformerTrainingWithSingleGradient) {
  const std::string g = test::data_path("evo_tiny.safetensors");
  TensorFile ref;
  ASSERT_TRUE(read_safetensors(g, &ref).ok());
  const int64_t r = ref.tensors.at("input.m").dim(1);
  TensorFile go;
  go.put("grad.output.s", Tensor::full({r, 24}, 0.5f));
  const std::string gfile = tmp("evo_grad_s.safetensors"), out = tmp("evo_train_s.safetensors");
  ASSERT_TRUE(write_safetensors(gfile, go).ok());
  Result r1 = run_cli("run --weights " + g + " --inputs " + g + " --grad-outputs " + gfile +
                      " --out " + out);
  ASSERT_EQ(r1.code, 0) << r1.out;
  TensorFile got;
  ASSERT_TRUE(read_safetensors(out, &got).ok());
  EXPECT_LT(test::golden_err(got.tensors["output.s"], ref.tensors.at("output.s")), 1e-4);
  ASSERT_TRUE(got.has("grad.param.linear.weight"));
  ASSERT_TRUE(got.has("grad.param.linear.bias"));
  EXPECT_FLOAT_EQ(got.tensors["grad.param.linear.bias"].f32()[0], 0.5f * r);
  go.put("grad.output.s", Tensor::full({r, 23}, 0.5f));
  ASSERT_TRUE(write_safetensors(gfile, go).ok());
  expect_user_error(run_cli("run --weights " + g + " --inputs " + g + " --grad-outputs " + gfile),
                    "grad.output.s");
}

TEST(Cli, RandomDefaultJobSmall) {
  Result r = run_cli("run --s 4 --r 8 --blocks 1 --threads 1");
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("GFLOP/s"), std::string::npos) << r.out;
}

// The CLI waits passively in OpenMP unless the user chose a policy or a spin count (issue 18).
TEST(Cli, OpenMpWaitPolicyDefaultsToPassive) {
  const test::TempDir dir;
  const std::string rep = dir.path() + "/r.json";
  auto policy = [&](const std::string& env) {
    test::Result r = test::run_cli_env(env, "run --s 4 --r 8 --blocks 1 --quiet --report " + rep);
    EXPECT_EQ(r.code, 0) << r.out;
    std::ifstream f(rep);
    return nlohmann::json::parse(f)["omp_wait_policy"].get<std::string>();
  };
  EXPECT_EQ(policy("env -u OMP_WAIT_POLICY -u GOMP_SPINCOUNT"), "passive");
  EXPECT_EQ(policy("env OMP_WAIT_POLICY=active"), "active");
  EXPECT_EQ(policy("env -u OMP_WAIT_POLICY GOMP_SPINCOUNT=5000"), "");
}

TEST(Cli, MasksOptional) {
  // Inputs without masks: all-ones masks are used.
  TensorFile g, in;
  ASSERT_TRUE(read_safetensors(test::data_path("evo_tiny.safetensors"), &g).ok());
  in.put("input.m", g.tensors["input.m"]);
  in.put("input.z", g.tensors["input.z"]);
  ASSERT_TRUE(write_safetensors(tmp("nomask.safetensors"), in).ok());
  Result r = run_cli("run --weights " + test::data_path("evo_tiny.safetensors") + " --inputs " +
                     tmp("nomask.safetensors"));
  EXPECT_EQ(r.code, 0) << r.out;
}

class CliBadInput : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(read_safetensors(test::data_path("evo_tiny.safetensors"), &golden_).ok());
  }
  // Writes golden_ with `edit` applied and runs it as --weights and --inputs.
  Result run_edited(const std::string& name, const std::function<void(TensorFile*)>& edit) {
    TensorFile f = golden_;
    edit(&f);
    const std::string path = tmp(name);
    EXPECT_TRUE(write_safetensors(path, f).ok());
    return run_cli("run --weights " + path + " --inputs " + path);
  }
  static void drop(TensorFile* f, const std::string& name) {
    f->tensors.erase(name);
    f->names.erase(std::find(f->names.begin(), f->names.end(), name));
  }
  TensorFile golden_;
};

TEST_F(CliBadInput, MissingParameter) {
  expect_user_error(
      run_edited("missing.safetensors",
                 [](TensorFile* f) { drop(f, "blocks.1.pair_stack.tri_mul_in.linear_g.weight"); }),
      "blocks.1.pair_stack.tri_mul_in.linear_g.weight");
}

TEST_F(CliBadInput, MissingInput) {
  expect_user_error(run_edited("noinput.safetensors", [](TensorFile* f) { drop(f, "input.z"); }),
                    "input.z");
}

TEST_F(CliBadInput, WrongParameterShape) {
  expect_user_error(run_edited("shape.safetensors",
                               [](TensorFile* f) {
                                 f->tensors["blocks.0.msa_transition.linear_1.bias"] =
                                     Tensor::zeros({7});
                               }),
                    "blocks.0.msa_transition.linear_1.bias");
}

TEST_F(CliBadInput, WrongParameterDtype) {
  expect_user_error(run_edited("dtype.safetensors",
                               [](TensorFile* f) {
                                 Tensor& t = f->tensors["blocks.0.msa_att_row.linear_z.weight"];
                                 t = t.to(DType::F64);
                               }),
                    "F64");
}

TEST_F(CliBadInput, WrongInputShape) {
  expect_user_error(run_edited("inshape.safetensors",
                               [](TensorFile* f) {
                                 f->tensors["input.z"] = Tensor::zeros({12, 12, 5});
                               }),
                    "input.z");
}

TEST_F(CliBadInput, NonBinaryMask) {
  expect_user_error(run_edited("mask.safetensors",
                               [](TensorFile* f) {
                                 Tensor t = f->tensors["input.msa_mask"].clone();
                                 t.f32()[3] = 0.5f;
                                 f->tensors["input.msa_mask"] = t;
                               }),
                    "msa_mask");
}

TEST_F(CliBadInput, NanInput) {
  expect_user_error(run_edited("nan.safetensors",
                               [](TensorFile* f) {
                                 Tensor t = f->tensors["input.m"].clone();
                                 t.f32()[10] = std::nanf("");
                                 f->tensors["input.m"] = t;
                               }),
                    "non-finite");
}

// Zero-length axes (no sequences, no residues): refused with a clear error, not run on empty
// buffers. (Zero-size tensors themselves are valid safetensors: AcceptsEdgeCasesOfTheFormat.)
TEST_F(CliBadInput, ZeroLengthAxes) {
  expect_user_error(run_edited("s0.safetensors",
                               [](TensorFile* f) {
                                 f->tensors["input.m"] = Tensor::zeros({0, 12, 32});
                                 f->tensors["input.msa_mask"] = Tensor::zeros({0, 12});
                               }),
                    "empty dimension");
  expect_user_error(run_edited("r0.safetensors",
                               [](TensorFile* f) {
                                 f->tensors["input.m"] = Tensor::zeros({8, 0, 32});
                                 f->tensors["input.z"] = Tensor::zeros({0, 0, 16});
                                 f->tensors["input.msa_mask"] = Tensor::zeros({8, 0});
                                 f->tensors["input.pair_mask"] = Tensor::zeros({0, 0});
                               }),
                    "empty dimension");
}

// NaN in a parameter: refused at load, naming the tensor.
TEST_F(CliBadInput, NanParameter) {
  expect_user_error(run_edited("nanparam.safetensors",
                               [](TensorFile* f) {
                                 const std::string n = "blocks.0.msa_att_row.layer_norm_m.weight";
                                 Tensor t = f->tensors[n].clone();
                                 t.f32()[0] = std::nanf("");
                                 f->tensors[n] = t;
                               }),
                    "blocks.0.msa_att_row.layer_norm_m.weight");
}

// Metadata claiming a huge (valid) config: a one-line error, not an abort after a 17 TB allocation.
TEST_F(CliBadInput, AbsurdConfigInMetadata) {
  expect_user_error(run_edited("hugecfg.safetensors",
                               [](TensorFile* f) {
                                 f->metadata["c_m"] = "1048576";
                                 f->metadata.erase("config");
                               }),
                    "config and weights do not match");
}

TEST_F(CliBadInput, ConfigInconsistentWithWeights) {
  const std::string cfg = tmp("cfg.json");
  std::ofstream(cfg) << R"({"c_m": 64, "c_z": 16, "no_blocks": 2})";
  Result r =
      run_cli("run --weights " + test::data_path("evo_tiny.safetensors") + " --config " + cfg);
  expect_user_error(r, "shape");
  std::ofstream(cfg) << R"({"c_m": 32, "c_z": 16, "c_hidden_msa_att": 8, "no_heads_msa": 4,
    "c_hidden_pair_att": 8, "no_heads_pair": 2, "c_hidden_opm": 8, "c_hidden_mul": 16,
    "transition_n": 4, "c_s": 24, "no_blocks": 1})";
  expect_user_error(
      run_cli("run --weights " + test::data_path("evo_tiny.safetensors") + " --config " + cfg),
      "no_blocks");
}

// Raw byte-level damage to a real file.
std::string golden_bytes() {
  std::ifstream f(test::data_path("evo_tiny.safetensors"), std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

Result run_bytes(const std::string& name, const std::string& bytes) {
  const std::string path = tmp(name);
  std::ofstream(path, std::ios::binary) << bytes;
  return run_cli("run --weights " + path + " --inputs " + path);
}

TEST(CliHostileFile, Truncated) {
  const std::string b = golden_bytes();
  expect_user_error(run_bytes("trunc.safetensors", b.substr(0, b.size() / 2)), "trunc");
}

TEST(CliHostileFile, HeaderLengthBeyondFile) {
  std::string b = golden_bytes();
  const uint64_t n = b.size() + 100;
  std::memcpy(b.data(), &n, 8);
  Result r = run_bytes("hdrlen.safetensors", b);
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_EQ(count_lines(r.out), 1) << r.out;
}

TEST(CliHostileFile, NonJsonHeader) {
  std::string b = golden_bytes();
  b[8] = '#';
  Result r = run_bytes("json.safetensors", b);
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_EQ(count_lines(r.out), 1) << r.out;
}

TEST(CliHostileFile, OffsetsOutOfRangeAndOverlapping) {
  std::string b = golden_bytes();
  uint64_t n;
  std::memcpy(&n, b.data(), 8);
  std::string header = b.substr(8, n);
  nlohmann::ordered_json j = nlohmann::ordered_json::parse(header);
  auto rewrite = [&](const nlohmann::ordered_json& jj) {
    std::string h = jj.dump();
    h.resize(n, ' ');
    return b.substr(0, 8) + h + b.substr(8 + n);
  };
  nlohmann::ordered_json far = j;
  far["input.m"]["data_offsets"][1] =
      far["input.m"]["data_offsets"][1].get<uint64_t>() + (1ull << 40);
  Result r = run_bytes("range.safetensors", rewrite(far));
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_EQ(count_lines(r.out), 1) << r.out;
  nlohmann::ordered_json ov = j;
  ov["input.z"]["data_offsets"] = ov["input.m"]["data_offsets"];
  ov["input.z"]["shape"] = ov["input.m"]["shape"];
  r = run_bytes("overlap.safetensors", rewrite(ov));
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_NE(r.out.find("overlap"), std::string::npos) << r.out;
}

TEST(Cli, MemoryBudget) {
  expect_user_error(run_cli("run --s 16 --r 24 --blocks 1 --memory-budget 1MiB"),
                    "smallest feasible budget");
  expect_user_error(run_cli("run --s 16 --r 24 --blocks 1 --memory-budget lots"), "lots");
  const std::string rep = tmp("budget.json");
  Result r = run_cli("run --s 16 --r 24 --blocks 1 --memory-budget 64MiB --report " + rep);
  ASSERT_EQ(r.code, 0) << r.out;
  std::ifstream f(rep);
  nlohmann::json j = nlohmann::json::parse(f);
  EXPECT_EQ(j["memory_budget_bytes"].get<int64_t>(), int64_t{64} << 20);
  EXPECT_LE(j["peak_tracked_bytes"].get<int64_t>(), int64_t{64} << 20);
  EXPECT_EQ(j["predicted_peak_bytes"].get<int64_t>(), j["peak_tracked_bytes"].get<int64_t>());
  EXPECT_GT(j["chunk_target_bytes"].get<int64_t>(), 0);
  ASSERT_EQ(j["module_chunks"].size(), 9u) << j.dump();
  for (const auto& [module, loops] : j["module_chunks"].items())
    for (const auto& l : loops) {
      EXPECT_GE(l["items"].get<int64_t>(), 1) << module;
      EXPECT_LE(l["items"].get<int64_t>(), l["length"].get<int64_t>()) << module;
    }
}

// `run --backward --profile`: every module's training forward and backward time (policy block
// also its re-run), summing to no more than the step, in the report and on stdout.
TEST(Cli, TrainingProfilePerModule) {
  const std::string rep = tmp("train_profile.json");
  Result r = run_cli(
      "run --s 8 --r 16 --blocks 2 --backward --policy none,block --profile --warmup 0 --report " +
      rep);
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("recompute ms"), std::string::npos) << r.out;
  std::ifstream f(rep);
  nlohmann::json j = nlohmann::json::parse(f);
  ASSERT_EQ(j["module_ms"].size(), 9u) << j.dump();
  double fwd = 0, bwd = 0, re = 0;
  for (const auto& [module, t] : j["module_ms"].items()) {
    EXPECT_GT(t["forward"].get<double>(), 0) << module;
    EXPECT_GT(t["backward"].get<double>(), 0) << module;
    EXPECT_GT(t["recompute"].get<double>(), 0) << module;  // block 1 re-runs its forward
    fwd += t["forward"].get<double>(), bwd += t["backward"].get<double>();
    re += t["recompute"].get<double>();
  }
  EXPECT_LE(fwd, j["forward_ms"].get<double>());
  EXPECT_LE(bwd + re, j["backward_ms"].get<double>());
}

TEST(Cli, MissingFileAndBadFlags) {
  expect_user_error(run_cli("run --weights /nonexistent/w.safetensors"),
                    "/nonexistent/w.safetensors");
  Result r = run_cli("run --s -3");
  EXPECT_EQ(r.code, 2) << r.out;
  r = run_cli("frobnicate");
  EXPECT_EQ(r.code, 2) << r.out;
}

// Sizes from flags are allocated through the checked path: an absurd random job is a one-line
// user error (exit 1), not an abort.
TEST(Cli, AbsurdSizesAreAUserError) {
  const char* asan = std::getenv("ASAN_OPTIONS");  // sanitizer builds: return null, not abort
  setenv("ASAN_OPTIONS",
         ((asan ? std::string(asan) + ":" : std::string()) + "allocator_may_return_null=1").c_str(),
         1);
  Result r = run_cli("run --s 1048576 --r 1048576 --blocks 1");
  expect_user_error(r, "input.m");
  EXPECT_NE(r.out.find("cannot allocate"), std::string::npos) << r.out;
}

// Starts `foldcube run` (a job far longer than the test waits) with its output at `out` and its
// stdout/stderr in `log`, and sends it a SIGINT one second after the start.
int interrupted_run(const std::string& out, const std::string& log) {
  const pid_t pid = fork();
  if (pid < 0) return -1;
  if (pid == 0) {
    std::freopen(log.c_str(), "w", stdout);
    dup2(fileno(stdout), STDERR_FILENO);
    execl(test::cli_path(), test::cli_path(), "run", "--s", "128", "--r", "256", "--blocks", "8",
          "--threads", "1", "--out", out.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  std::this_thread::sleep_for(std::chrono::seconds(1));
  if (kill(pid, SIGINT) != 0) return -1;
  int st = 0;
  if (waitpid(pid, &st, 0) != pid) return -1;
  return st;
}

std::string read_all(const std::string& path) {
  std::ifstream f(path);
  return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

// Ctrl-C during a run stops it at the next module boundary: exit code 130, a message saying so,
// and the file at --out keeps its previous contents (outputs go to a temporary that is renamed
// only when complete; none was started).
TEST(CliInterrupt, SigintStopsTheRunAndKeepsPreviousOutput) {
  const std::string out = tmp("sigint_" + std::to_string(getpid()) + ".safetensors");
  const std::string log = tmp("sigint_" + std::to_string(getpid()) + ".log");
  std::ofstream(out) << "previous";
  const int st = interrupted_run(out, log);
  const std::string said = read_all(log);
  ASSERT_TRUE(WIFEXITED(st)) << st << said;
  EXPECT_EQ(WEXITSTATUS(st), 130) << said;
  EXPECT_NE(said.find("foldcube: interrupted"), std::string::npos) << said;
  EXPECT_EQ(read_all(out), "previous");
  std::remove(out.c_str());
  std::remove(log.c_str());
}

}  // namespace
}  // namespace fc
