// The AF3 trunk (Boltz golden, shared/golden README "AF3 trunk cases"): SwiGLU kernels against
// their references, Pairformer and MSA-module outputs and block-0 traces at several chunk sizes.
#include "foldcube/af3.h"

#include <gtest/gtest.h>

#include <cctype>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "foldcube/io.h"
#include "kernels/backward.h"
#include "kernels/kernels.h"
#include "test_util.h"

namespace fc {
namespace {

// The golden metric over the positions where keep [numel / c] is 1 (c trailing channels per
// position): padded tokens have precision-dependent values (README "Masks").
double masked_err(const Tensor& x, const Tensor& ref, const Tensor& keep) {
  Tensor a = x.to(DType::F64), b = ref.to(DType::F64), k = keep.to(DType::F64);
  if (a.numel() != b.numel() || b.numel() % k.numel() != 0) return INFINITY;
  const int64_t c = b.numel() / k.numel();
  const double* pa = a.data<double>();  // [numel]
  const double* pb = b.data<double>();  // [numel]
  const double* pk = k.data<double>();  // [numel / c]
  double ss = 0, mx = 0;
  int64_t cnt = 0;
  for (int64_t i = 0; i < b.numel(); ++i) {
    if (pk[i / c] == 0) continue;
    if (!std::isfinite(pa[i])) return INFINITY;
    ss += pb[i] * pb[i];
    mx = std::max(mx, std::abs(pa[i] - pb[i]));
    ++cnt;
  }
  return mx / std::max(std::sqrt(ss / std::max<int64_t>(cnt, 1)), 1.0);
}

Tensor get(const TensorFile& f, const std::string& name) {
  Tensor t;
  EXPECT_TRUE(f.get_f32(name, {}, &t).ok()) << name;
  return t.clone();
}

// Where the file is: tests/data, else $FOLDCUBE_GOLDEN_DIR, else ../shared/golden beside the
// checkout (large cases), else "".
std::string golden_file(const std::string& name) {
  std::vector<std::string> paths = {test::data_path(name), std::string(FOLDCUBE_TEST_DATA_DIR) +
                                                               "/../../../shared/golden/" + name};
  if (const char* dir = std::getenv("FOLDCUBE_GOLDEN_DIR"))
    paths.push_back(std::string(dir) + "/" + name);
  for (const std::string& p : paths)
    if (std::filesystem::exists(p)) return p;
  return "";
}

TEST(SwiGluKernel, MatchesReference) {
  const int64_t rows = 37, n = 29, ld = 2 * n + 3;
  std::vector<float> a(rows * ld), b(rows * ld), dy(rows * n);
  for (size_t i = 0; i < a.size(); ++i) {
    a[i] = std::sin(0.37f * i) * 6.f;
    b[i] = std::cos(0.11f * i) * 2.f;
  }
  for (size_t i = 0; i < dy.size(); ++i) dy[i] = std::sin(0.7f * i);
  std::vector<float> fa = a, ra = a;
  kern::swiglu(fa.data(), ld, b.data() + 1, ld, rows, n);
  kern::ref::swiglu(ra.data(), ld, b.data() + 1, ld, rows, n);
  EXPECT_LT(test::max_abs_diff(fa.data(), ra.data(), rows * ld), 1e-5);
  std::vector<float> fda(rows * n), fdb(rows * n), rda(rows * n), rdb(rows * n);
  kern::swiglu_backward(a.data(), ld, b.data() + 1, ld, dy.data(), n, fda.data(), n, fdb.data(), n,
                        rows, n);
  kern::ref::swiglu_backward(a.data(), ld, b.data() + 1, ld, dy.data(), n, rda.data(), n,
                             rdb.data(), n, rows, n);
  EXPECT_LT(test::max_abs_diff(fda.data(), rda.data(), rows * n), 1e-5);
  EXPECT_LT(test::max_abs_diff(fdb.data(), rdb.data(), rows * n), 1e-5);
  // The reference backward against central differences of the reference forward.
  for (int64_t i : {0, 5, 17, 100}) {
    const int64_t r = i / n, j = i % n;
    auto f = [&](double da, double db) {
      float x = static_cast<float>(a[r * ld + j] + da),
            y = static_cast<float>(b[r * ld + j + 1] + db);
      kern::ref::swiglu(&x, 1, &y, 1, 1, 1);
      return static_cast<double>(x);
    };
    const double h = 1e-2;
    EXPECT_NEAR((f(h, 0) - f(-h, 0)) / (2 * h) * dy[i], rda[i], 2e-3 * (1 + std::abs(rda[i])));
    EXPECT_NEAR((f(0, h) - f(0, -h)) / (2 * h) * dy[i], rdb[i], 2e-3 * (1 + std::abs(rdb[i])));
  }
}

struct Af3Case {
  std::string file;
  int64_t chunk;  // 0 = automatic
};
std::string CaseName(const Af3Case& c) {
  return c.file.substr(0, c.file.find('.')) + "_chunk" + std::to_string(c.chunk);
}
void PrintTo(const Af3Case& p, std::ostream* os) { *os << CaseName(p); }

class GoldenPairformer : public ::testing::TestWithParam<Af3Case> {};

TEST_P(GoldenPairformer, OutputsAndBlock0Traces) {
  const std::string path = golden_file(GetParam().file);
  if (path.empty()) GTEST_SKIP() << GetParam().file << " not present (shared/golden)";
  TensorFile f;
  ASSERT_TRUE(read_safetensors(path, &f).ok());
  Af3Config cfg;
  Status st = Af3Config::from_weights(f, &cfg);
  ASSERT_TRUE(st.ok()) << st.ToString();
  ASSERT_EQ(cfg.kind, "pairformer");
  PairformerStack stack;
  st = PairformerStack::load(cfg, f, &stack);
  ASSERT_TRUE(st.ok()) << st.ToString();
  Tensor s = get(f, "input.s"), z = get(f, "input.z"), mask = get(f, "input.mask");
  const Tensor pair_mask = get(f, "input.pair_mask");
  std::map<std::string, Tensor> traces;
  ForwardOptions opts;
  opts.chunk = GetParam().chunk;
  opts.trace = [&](int block, const std::string& module, const std::string& stream,
                   const Tensor& v) {
    if (block == 0) traces["trace.block0." + module + "." + stream] = v.clone();
  };
  st = stack.forward(s, z, mask, opts);
  ASSERT_TRUE(st.ok()) << st.ToString();
  int checked = 0;
  for (const std::string& name : f.names) {
    if (name.rfind("trace.block0.", 0) != 0) continue;
    ASSERT_TRUE(traces.count(name)) << name;
    const bool is_s = name.back() == 's';
    EXPECT_LT(masked_err(traces[name], f.tensors.at(name), is_s ? mask : pair_mask), 1e-4) << name;
    ++checked;
  }
  EXPECT_EQ(checked, 7);
  EXPECT_LT(masked_err(s, f.tensors.at("output.s"), mask), 1e-4);
  EXPECT_LT(masked_err(z, f.tensors.at("output.z"), pair_mask), 1e-4);
  EXPECT_TRUE(test::all_finite(s) && test::all_finite(z));
}

INSTANTIATE_TEST_SUITE_P(Cases, GoldenPairformer,
                         ::testing::Values(Af3Case{"pairformer_tiny.safetensors", 0},
                                           Af3Case{"pairformer_tiny.safetensors", 1},
                                           Af3Case{"pairformer_tiny.safetensors", 3},
                                           Af3Case{"pairformer_af3dims.safetensors", 0},
                                           Af3Case{"pairformer_af3dims.safetensors", 3}),
                         [](const auto& info) { return CaseName(info.param); });

class GoldenMsaModule : public ::testing::TestWithParam<Af3Case> {};

TEST_P(GoldenMsaModule, OutputsAndBlock0Traces) {
  TensorFile f;
  ASSERT_TRUE(read_safetensors(test::data_path(GetParam().file), &f).ok());
  Af3Config cfg;
  Status st = Af3Config::from_weights(f, &cfg);
  ASSERT_TRUE(st.ok()) << st.ToString();
  ASSERT_EQ(cfg.kind, "msa_module");
  MsaModule mod;
  st = MsaModule::load(cfg, f, &mod);
  ASSERT_TRUE(st.ok()) << st.ToString();
  Tensor z = get(f, "input.z"), emb = get(f, "input.emb"), msa_mask = get(f, "input.msa_mask");
  const Tensor tok = get(f, "input.token_pad_mask"), pair_mask = get(f, "input.pair_mask");
  Tensor feat;
  st = msa_features(f.tensors.at("input.msa"), get(f, "input.has_deletion"),
                    get(f, "input.deletion_value"), get(f, "input.msa_paired"), &feat);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(test::golden_err(feat, f.tensors.at("input.msa_feat")), 0.0);
  std::map<std::string, Tensor> traces;
  ForwardOptions opts;
  opts.chunk = GetParam().chunk;
  opts.trace = [&](int block, const std::string& module, const std::string& stream,
                   const Tensor& v) {
    if (block == -1) traces["trace." + module + "." + stream] = v.clone();
    if (block == 0) traces["trace.block0." + module + "." + stream] = v.clone();
  };
  st = mod.forward(z, emb, feat, msa_mask, tok, opts);
  ASSERT_TRUE(st.ok()) << st.ToString();
  int checked = 0;
  for (const std::string& name : f.names) {
    if (name.rfind("trace.", 0) != 0) continue;
    ASSERT_TRUE(traces.count(name)) << name;
    const bool is_m = name.back() == 'm';
    EXPECT_LT(masked_err(traces[name], f.tensors.at(name), is_m ? msa_mask : pair_mask), 1e-4)
        << name;
    ++checked;
  }
  EXPECT_EQ(checked, 9);
  EXPECT_LT(masked_err(z, f.tensors.at("output.z"), pair_mask), 1e-4);
  EXPECT_TRUE(test::all_finite(z));
}

INSTANTIATE_TEST_SUITE_P(Cases, GoldenMsaModule,
                         ::testing::Values(Af3Case{"msa_module_tiny.safetensors", 0},
                                           Af3Case{"msa_module_tiny.safetensors", 1},
                                           Af3Case{"msa_module_tiny.safetensors", 3}),
                         [](const auto& info) { return CaseName(info.param); });

// ---- Training: every gradient against the golden, per policy and chunking ----------------------

struct Af3TrainCase {
  std::string file;
  std::string policy;  // none | module | block
  int64_t chunk;       // 0 = automatic
};
std::string CaseName(const Af3TrainCase& c) {
  return c.file.substr(0, c.file.find('.')) + "_" + c.policy + "_chunk" + std::to_string(c.chunk);
}
void PrintTo(const Af3TrainCase& p, std::ostream* os) { *os << CaseName(p); }

// Checks every grad.* tensor of f (README limit 2e-4, compared everywhere) against `got`.
void expect_grads(const TensorFile& f, const std::map<std::string, Tensor>& got) {
  ASSERT_EQ(f.metadata.at("mode").rfind("eval", 0), 0u) << "golden gradients must be dropout-free";
  int checked = 0;
  for (const std::string& name : f.names) {
    if (name.rfind("grad.", 0) != 0) continue;
    auto it = got.find(name);
    ASSERT_TRUE(it != got.end()) << "no gradient produced for " << name;
    EXPECT_LT(test::golden_err(it->second, f.tensors.at(name)), 2e-4) << name;
    ++checked;
  }
  EXPECT_EQ(checked, static_cast<int>(got.size()));
}

class GoldenAf3Training : public ::testing::TestWithParam<Af3TrainCase> {};

TEST_P(GoldenAf3Training, EveryGradient) {
  const Af3TrainCase& tc = GetParam();
  TensorFile f;
  ASSERT_TRUE(read_safetensors(test::data_path(tc.file), &f).ok());
  Af3Config cfg;
  ASSERT_TRUE(Af3Config::from_weights(f, &cfg).ok());
  TrainOptions opts;
  opts.policy.resize(1);
  ASSERT_TRUE(parse_recompute(tc.policy, &opts.policy[0]).ok());
  opts.chunk = tc.chunk;
  TrainResult res;
  std::map<std::string, Tensor> got;
  if (cfg.kind == "pairformer") {
    PairformerStack stack;
    ASSERT_TRUE(PairformerStack::load(cfg, f, &stack).ok());
    Tensor s = get(f, "input.s"), z = get(f, "input.z");
    const Status st = stack.train_step(s, z, get(f, "input.mask"), get(f, "probe.s"),
                                       get(f, "probe.z"), opts, &res);
    ASSERT_TRUE(st.ok()) << st.ToString();
    EXPECT_LT(masked_err(s, f.tensors.at("output.s"), get(f, "input.mask")), 1e-4);
    EXPECT_LT(masked_err(z, f.tensors.at("output.z"), get(f, "input.pair_mask")), 1e-4);
    got["grad.input.s"] = res.grad_m;
  } else {
    MsaModule mod;
    ASSERT_TRUE(MsaModule::load(cfg, f, &mod).ok());
    Tensor z = get(f, "input.z"), grad_emb;
    const Status st =
        mod.train_step(z, get(f, "input.emb"), get(f, "input.msa_feat"), get(f, "input.msa_mask"),
                       get(f, "input.token_pad_mask"), get(f, "probe.z"), opts, &res, &grad_emb);
    ASSERT_TRUE(st.ok()) << st.ToString();
    EXPECT_LT(masked_err(z, f.tensors.at("output.z"), get(f, "input.pair_mask")), 1e-4);
    got["grad.input.emb"] = grad_emb;
    got["grad.trace.embed.m"] = res.grad_m;
  }
  got["grad.input.z"] = res.grad_z;
  for (const auto& [name, t] : res.grad_params) got["grad.param." + name] = t;
  expect_grads(f, got);
}

INSTANTIATE_TEST_SUITE_P(Cases, GoldenAf3Training,
                         ::testing::Values(Af3TrainCase{"pairformer_tiny.safetensors", "none", 0},
                                           Af3TrainCase{"pairformer_tiny.safetensors", "module", 0},
                                           Af3TrainCase{"pairformer_tiny.safetensors", "block", 0},
                                           Af3TrainCase{"pairformer_tiny.safetensors", "none", 1},
                                           Af3TrainCase{"pairformer_tiny.safetensors", "module", 3},
                                           Af3TrainCase{"msa_module_tiny.safetensors", "none", 0},
                                           Af3TrainCase{"msa_module_tiny.safetensors", "module", 0},
                                           Af3TrainCase{"msa_module_tiny.safetensors", "block", 0},
                                           Af3TrainCase{"msa_module_tiny.safetensors", "none", 1},
                                           Af3TrainCase{"msa_module_tiny.safetensors", "module",
                                                        3}),
                         [](const auto& info) { return CaseName(info.param); });

// ---- CLI: `foldcube run --stack pairformer|msa_module` with the golden files as inputs ---------

#ifdef FOLDCUBE_CLI_PATH
struct Af3CliCase {
  std::string file;
  std::string flags;  // stack / training flags
};
std::string CaseName(const Af3CliCase& c) {
  std::string n = c.file.substr(0, c.file.find('.'));
  if (c.flags.empty()) n += "_auto";
  for (char ch : c.flags)
    if (std::isalnum(static_cast<unsigned char>(ch)))
      n += ch;
    else if (ch == ' ')
      n += '_';
  return n;
}
void PrintTo(const Af3CliCase& p, std::ostream* os) { *os << CaseName(p); }

class Af3Cli : public ::testing::TestWithParam<Af3CliCase> {};

// The golden file serves as weights, inputs and grad outputs (its probe.* tensors); the output
// file holds every golden output and gradient under the golden names.
TEST_P(Af3Cli, WritesGoldenNames) {
  const Af3CliCase& c = GetParam();
  const std::string golden = test::data_path(c.file);
  test::TempDir dir;
  const std::string out = dir.file("out.safetensors");
  const bool training = c.flags.find("--grad-outputs") != std::string::npos;
  const test::Result r =
      test::run_cli("run --weights " + golden + " --inputs " + golden + " --out " + out + " " +
                    c.flags + (training ? " " + golden : "") + " --report " + dir.file("r.json"));
  ASSERT_EQ(r.code, 0) << r.out;
  TensorFile f, o;
  ASSERT_TRUE(read_safetensors(golden, &f).ok());
  ASSERT_TRUE(read_safetensors(out, &o).ok());
  const bool pf = f.metadata.at("kind") == "pairformer";
  const Tensor pm = get(f, "input.pair_mask");
  EXPECT_LT(masked_err(o.tensors.at("output.z"), f.tensors.at("output.z"), pm), 1e-4);
  if (pf) {
    EXPECT_LT(masked_err(o.tensors.at("output.s"), f.tensors.at("output.s"), get(f, "input.mask")),
              1e-4);
  }
  int grads = 0;
  for (const std::string& name : f.names) {
    if (name.rfind("grad.", 0) != 0 || !training) continue;
    ASSERT_TRUE(o.has(name)) << name;
    EXPECT_LT(test::golden_err(o.tensors.at(name), f.tensors.at(name)), 2e-4) << name;
    ++grads;
  }
  EXPECT_EQ(grads > 0, training);
}

INSTANTIATE_TEST_SUITE_P(
    Cases, Af3Cli,
    ::testing::Values(Af3CliCase{"pairformer_tiny.safetensors", ""},
                      Af3CliCase{"pairformer_tiny.safetensors",
                                 "--stack pairformer --policy module --chunk 3 --grad-outputs"},
                      Af3CliCase{"msa_module_tiny.safetensors", "--stack msa_module --chunk 1"},
                      Af3CliCase{"msa_module_tiny.safetensors",
                                 "--stack msa_module --policy block --grad-outputs"}),
    [](const auto& info) { return CaseName(info.param); });

TEST(Af3CliErrors, StackMismatchIsAUserError) {
  const std::string golden = test::data_path("pairformer_tiny.safetensors");
  const test::Result r =
      test::run_cli("run --stack msa_module --weights " + golden + " --inputs " + golden);
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_NE(r.out.find("holds a pairformer state dict"), std::string::npos) << r.out;
}
#endif

}  // namespace
}  // namespace fc
