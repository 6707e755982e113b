// bf16 training (TrainOptions::dtype = BF16, BlockContext::store): the layer inputs kept for the
// backward in bf16, each layer reading its streams rounded to bf16. Checks: gradients of the golden
// cases within a normwise tolerance of the float64 reference and bit-identical across recompute
// policies (every recompute sees the same rounded inputs); the memory model byte-exact against
// the allocator in bf16 (activations and step peak, Evoformer and ExtraMSA, chunked), and
// different from the fp32 model (so a model that ignores the dtype fails); the CLI flag. The AF3
// Pairformer and MSA module golden cases too.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "foldcube/af3.h"
#include "foldcube/extra_msa.h"
#include "foldcube/io.h"
#include "foldcube/model.h"
#include "foldcube/plan.h"
#include "foldcube/runtime.h"
#include "plan/memory_model.h"
#include "test_util.h"

namespace fc {
namespace {

using R = Recompute;

// Normwise tolerances of a bf16 training step against the float64 reference, per tensor:
// outputs and dL/d inputs (worst measured 8.4e-3 and 4.2e-2, docs/benchmarks.md) and every
// parameter gradient (worst measured 9.7e-2, evo_tiny's pair_transition.layer_norm.weight: a sum
// over all rows). A gradient that is zero to rounding in the reference is measured as noise
// against its LayerNorm's weight gradient (test::param_grad_err): as ||x|| alone it was 0.15 on
// one process and 0.31 under DAP on another machine's kernels, a unit-dependent number.
constexpr double kBf16OutTol = 2e-2;
constexpr double kBf16InputGradTol = 0.1;
constexpr double kBf16ParamGradTol = 0.3;

// A gradient's error against the golden file's `name`: normwise, or the noise of a gradient
// that is zero to rounding there against its LayerNorm's weight gradient (test_util.h).
double grad_err(const TensorFile& f, const std::string& name, const Tensor& x) {
  const Tensor& ref = f.tensors.at(name);
  const std::string scale = test::noise_scale_name(name);
  return test::param_grad_err(x, ref, f.has(scale) ? f.tensors.at(scale) : ref);
}

using test::bit_equal;

struct Step {
  Tensor m, z;
  TrainResult r;
};

template <typename Stack>
Step golden_step(const TensorFile& f, const Stack& stack, const TrainOptions& opts) {
  Step out;
  Tensor m, z, mm, pm, pr_m, pr_z;
  EXPECT_TRUE(f.get_f32("input.m", {}, &m).ok());
  EXPECT_TRUE(f.get_f32("input.z", {}, &z).ok());
  out.m = m.clone();  // the step updates them in place
  out.z = z.clone();
  EXPECT_TRUE(f.get_f32("input.msa_mask", {}, &mm).ok());
  EXPECT_TRUE(f.get_f32("input.pair_mask", {}, &pm).ok());
  EXPECT_TRUE(f.get_f32("probe.m", {}, &pr_m).ok());
  EXPECT_TRUE(f.get_f32("probe.z", {}, &pr_z).ok());
  const Status st = stack.train_step(out.m, out.z, mm, pm, pr_m, pr_z, opts, &out.r);
  EXPECT_TRUE(st.ok()) << st.ToString();
  return out;
}

// Worst normwise errors of a step against the golden file: outputs, dL/d inputs, parameter
// gradients.
struct Errors {
  double out = 0, input_grad = 0, param_grad = 0;
};
Errors step_errors(const TensorFile& f, const Step& s) {
  Errors e;
  e.out = std::max(test::normwise_err(s.m, f.tensors.at("output.m")),
                   test::normwise_err(s.z, f.tensors.at("output.z")));
  e.input_grad = std::max(test::normwise_err(s.r.grad_m, f.tensors.at("grad.input.m")),
                          test::normwise_err(s.r.grad_z, f.tensors.at("grad.input.z")));
  for (const auto& [name, g] : s.r.grad_params)
    e.param_grad = std::max(e.param_grad, grad_err(f, "grad.param." + name, g));
  return e;
}

template <typename Stack>
void check_golden(const std::string& file) {
  TensorFile f;
  ASSERT_TRUE(read_safetensors(test::data_path(file), &f).ok());
  EvoformerConfig cfg;
  ASSERT_TRUE(EvoformerConfig::from_metadata(f.metadata, &cfg).ok());
  Stack stack;
  ASSERT_TRUE(Stack::load(cfg, f, &stack).ok());
  const std::vector<std::vector<R>> policies = test::golden_policy_sets(cfg.no_blocks);
  const Errors e32 = step_errors(f, golden_step(f, stack, TrainOptions()));
  Step base;
  Errors e16;
  for (size_t pi = 0; pi < policies.size(); ++pi) {
    SCOPED_TRACE("policy set " + std::to_string(pi));
    TrainOptions opts;
    opts.dtype = DType::BF16;
    opts.policy = policies[pi];
    Step s = golden_step(f, stack, opts);
    const Errors e = step_errors(f, s);
    EXPECT_LT(e.out, kBf16OutTol);
    EXPECT_LT(e.input_grad, kBf16InputGradTol);
    EXPECT_LT(e.param_grad, kBf16ParamGradTol);
    EXPECT_GT(e.out, 10 * e32.out);  // the bf16 path did run
    e16 = e;
    if (pi == 0) {
      base = std::move(s);
      continue;
    }
    EXPECT_TRUE(bit_equal(s.m, base.m));
    EXPECT_TRUE(bit_equal(s.r.grad_m, base.r.grad_m));
    EXPECT_TRUE(bit_equal(s.r.grad_z, base.r.grad_z));
    for (size_t i = 0; i < s.r.grad_params.size(); ++i)
      EXPECT_TRUE(bit_equal(s.r.grad_params[i].second, base.r.grad_params[i].second))
          << s.r.grad_params[i].first;
  }
  std::printf(
      "%s training, worst normwise error fp32 | bf16: outputs %.2e | %.2e, input gradients "
      "%.2e | %.2e, parameter gradients %.2e | %.2e\n",
      file.c_str(), e32.out, e16.out, e32.input_grad, e16.input_grad, e32.param_grad,
      e16.param_grad);
}

TEST(TrainBf16Golden, EvoTiny) { check_golden<EvoformerStack>("evo_tiny.safetensors"); }
TEST(TrainBf16Golden, EvoAf2Dims) { check_golden<EvoformerStack>("evo_af2dims.safetensors"); }
TEST(TrainBf16Golden, ExtraTiny) { check_golden<ExtraMsaStack>("extra_tiny.safetensors"); }

// ---- AF3 Pairformer and MSA module ------------------------------------------------------------
// The same layer units in bf16 (and the SwiGLU transition's bf16 path): the golden cases within
// the tolerances above, against Boltz's float64 and against the one-process fp32 step, gradients
// bit-identical across policies. Measured worst (normwise; docs/af3.md): pairformer_tiny outputs
// 9.9e-3, dL/d inputs 1.6e-2, parameter gradients 2.5e-2; msa_module_tiny 9.8e-3, 1.7e-2,
// 3.6e-2; pairformer_af3dims (../shared/golden) 6.8e-3, 8.3e-3, 1.4e-2. Their memory model in
// bf16: Af3TrainMemory (tests/af3_test.cc).

Tensor get(const TensorFile& f, const std::string& name) {
  Tensor t;
  EXPECT_TRUE(f.get_f32(name, {}, &t).ok()) << name;
  return t.clone();
}

// Normwise error over the rows kept by `keep` (the golden outputs of padded tokens are not
// compared, as in tests/af3_test.cc).
double masked_normwise(const Tensor& x, const Tensor& ref, const Tensor& keep) {
  const Tensor a = x.to(DType::F64), b = ref.to(DType::F64), k = keep.to(DType::F64);
  const int64_t c = b.numel() / k.numel();
  double num = 0, den = 0;
  for (int64_t i = 0; i < b.numel(); ++i) {
    if (k.data<double>()[i / c] == 0) continue;
    const double d = a.data<double>()[i] - b.data<double>()[i];
    num += d * d;
    den += b.data<double>()[i] * b.data<double>()[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

// One step's outputs (masked golden metric inputs) and gradients by golden name.
struct Af3Step {
  std::map<std::string, Tensor> out, grads;
};

Af3Step af3_step(const TensorFile& f, const Af3Config& cfg, const TrainOptions& opts) {
  Af3Step st;
  TrainResult res;
  if (cfg.kind == "pairformer") {
    PairformerStack stack;
    EXPECT_TRUE(PairformerStack::load(cfg, f, &stack).ok());
    Tensor s = get(f, "input.s"), z = get(f, "input.z");
    const Status ok = stack.train_step(s, z, get(f, "input.mask"), get(f, "probe.s"),
                                       get(f, "probe.z"), opts, &res);
    EXPECT_TRUE(ok.ok()) << ok.ToString();
    st.out["output.s"] = s;
    st.out["output.z"] = z;
    st.grads["grad.input.s"] = res.grad_m;
  } else {
    MsaModule mod;
    EXPECT_TRUE(MsaModule::load(cfg, f, &mod).ok());
    Tensor z = get(f, "input.z"), grad_emb;
    const Status ok =
        mod.train_step(z, get(f, "input.emb"), get(f, "input.msa_feat"), get(f, "input.msa_mask"),
                       get(f, "input.token_pad_mask"), get(f, "probe.z"), opts, &res, &grad_emb);
    EXPECT_TRUE(ok.ok()) << ok.ToString();
    st.out["output.z"] = z;
    st.grads["grad.input.emb"] = grad_emb;
    st.grads["grad.trace.embed.m"] = res.grad_m;
  }
  st.grads["grad.input.z"] = res.grad_z;
  for (const auto& [name, t] : res.grad_params) st.grads["grad.param." + name] = t;
  return st;
}

void check_af3_golden(const std::string& file) {
  const std::string path = test::golden_path(file);
  if (path.empty()) GTEST_SKIP() << file << " not present (shared/golden)";
  TensorFile f;
  ASSERT_TRUE(read_safetensors(path, &f).ok());
  Af3Config cfg;
  ASSERT_TRUE(Af3Config::from_weights(f, &cfg).ok());
  const Tensor pair_mask = get(f, "input.pair_mask");
  const Tensor mask = cfg.kind == "pairformer" ? get(f, "input.mask") : Tensor();
  const Af3Step f32 = af3_step(f, cfg, TrainOptions());  // the one-process fp32 step
  Af3Step base;
  double worst_out = 0, worst_in = 0, worst_param = 0, vs_f32 = 0;
  for (const std::vector<R>& policy : test::golden_policy_sets(cfg.no_blocks)) {
    SCOPED_TRACE(recompute_name(policy[0]));
    TrainOptions opts;
    opts.dtype = DType::BF16;
    opts.policy = policy;
    Af3Step s = af3_step(f, cfg, opts);
    for (const auto& [name, t] : s.out) {
      const double e =
          masked_normwise(t, f.tensors.at(name), name == "output.s" ? mask : pair_mask);
      EXPECT_LT(e, kBf16OutTol) << name;
      worst_out = std::max(worst_out, e);
      const double x = masked_normwise(t, f32.out.at(name), name == "output.s" ? mask : pair_mask);
      EXPECT_LT(x, kBf16OutTol) << name << " vs fp32";
      vs_f32 = std::max(vs_f32, x);
    }
    int checked = 0;
    for (const std::string& name : f.names) {
      if (name.rfind("grad.", 0) != 0) continue;
      ASSERT_TRUE(s.grads.count(name)) << name;
      const double e = grad_err(f, name, s.grads.at(name));
      const bool param = name.rfind("grad.param.", 0) == 0;
      EXPECT_LT(e, param ? kBf16ParamGradTol : kBf16InputGradTol) << name;
      (param ? worst_param : worst_in) = std::max(param ? worst_param : worst_in, e);
      // Against fp32: not the gradients that are zero to rounding (there both are noise).
      if (!test::zero_to_rounding(f.tensors.at(name))) {
        const double x = test::normwise_err(s.grads.at(name), f32.grads.at(name));
        EXPECT_LT(x, param ? kBf16ParamGradTol : kBf16InputGradTol) << name << " vs fp32";
        vs_f32 = std::max(vs_f32, x);
      }
      ++checked;
    }
    EXPECT_EQ(checked, static_cast<int>(s.grads.size()));
    if (base.grads.empty()) {
      base = std::move(s);
      continue;
    }
    for (const auto& [name, t] : s.grads) EXPECT_TRUE(bit_equal(t, base.grads.at(name))) << name;
  }
  EXPECT_GT(worst_out, 1e-4);  // the bf16 path ran (fp32 is within 1e-5 of Boltz)
  std::printf(
      "%s bf16 training, worst normwise error: outputs %.2e, input gradients %.2e, "
      "parameter gradients %.2e; against the fp32 step %.2e\n",
      file.c_str(), worst_out, worst_in, worst_param, vs_f32);
}

TEST(TrainBf16Af3Golden, PairformerTiny) { check_af3_golden("pairformer_tiny.safetensors"); }
TEST(TrainBf16Af3Golden, MsaModuleTiny) { check_af3_golden("msa_module_tiny.safetensors"); }
TEST(TrainBf16Af3Golden, PairformerAf3Dims) { check_af3_golden("pairformer_af3dims.safetensors"); }

// ---- Memory model ------------------------------------------------------------------------------

struct MemCase {
  bool extra_msa;
  int64_t s, r, blocks;
  std::vector<R> policy;
  int64_t chunk = 0;
};
std::string mem_case_name(const MemCase& c) {
  std::string n = std::string(c.extra_msa ? "extra" : "evo") + "_s" + std::to_string(c.s) + "_r" +
                  std::to_string(c.r) + "_b" + std::to_string(c.blocks);
  for (R p : c.policy) n += std::string("_") + recompute_name(p);
  if (c.chunk > 0) n += "_chunk" + std::to_string(c.chunk);
  return n;
}
void PrintTo(const MemCase& c, std::ostream* os) { *os << mem_case_name(c); }

class TrainBf16Memory : public ::testing::TestWithParam<MemCase> {};

template <typename Stack>
TrainResult random_step(const EvoformerConfig& cfg, const MemCase& c, DType dtype) {
  Stack stack = Stack::random(cfg, 5);
  Tensor m = Tensor::full({c.s, c.r, cfg.c_m}, 0.3f), z = Tensor::full({c.r, c.r, cfg.c_z}, -0.2f);
  Tensor gm = Tensor::full(m.shape(), 1.f), gz = Tensor::full(z.shape(), 1.f);
  TrainOptions opts;
  opts.policy = c.policy;
  opts.chunk = c.chunk;
  opts.dtype = dtype;
  TrainResult res;
  EXPECT_TRUE(stack.train_step(m, z, Tensor(), Tensor(), gm, gz, opts, &res).ok());
  return res;
}

TEST_P(TrainBf16Memory, ActivationAndPeakMatchAllocator) {
  const MemCase c = GetParam();
  EvoformerConfig cfg = test::small_config();
  if (c.extra_msa) cfg.c_m = 16;
  cfg.no_blocks = c.blocks;
  const TrainResult res = c.extra_msa ? random_step<ExtraMsaStack>(cfg, c, DType::BF16)
                                      : random_step<EvoformerStack>(cfg, c, DType::BF16);
  MemoryQuery q;
  q.cfg = cfg;
  q.s = c.s, q.r = c.r, q.blocks = c.blocks, q.policy = c.policy, q.chunk = c.chunk;
  q.threads = num_threads();
  q.extra_msa = c.extra_msa;
  q.dtype = DType::BF16;
  int64_t act = 0, peak = 0, act32 = 0, peak32 = 0;
  ASSERT_TRUE(stack_activation_bytes(q, &act).ok());
  ASSERT_TRUE(stack_step_peak_bytes(q, &peak).ok());
  EXPECT_EQ(res.activation_bytes, act);
  EXPECT_EQ(res.peak_bytes, peak);
  q.dtype = DType::F32;
  ASSERT_TRUE(stack_activation_bytes(q, &act32).ok());
  ASSERT_TRUE(stack_step_peak_bytes(q, &peak32).ok());
  EXPECT_LT(act, act32);  // the kept inputs count 2 bytes each, not 4
  EXPECT_NE(peak, peak32);
  // Under policies module and block the kept bytes are the stream copies alone: exactly halved.
  bool only_inputs = true;
  for (R p : c.policy) only_inputs = only_inputs && p != R::kNone;
  if (only_inputs) {
    EXPECT_EQ(2 * act, act32);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Policies, TrainBf16Memory,
    ::testing::Values(MemCase{false, 6, 10, 3, {R::kNone}}, MemCase{false, 6, 10, 3, {R::kModule}},
                      MemCase{false, 6, 10, 3, {R::kBlock}},
                      MemCase{false, 5, 7, 3, {R::kBlock, R::kModule, R::kNone}},
                      MemCase{false, 7, 11, 4, {R::kNone, R::kBlock, R::kModule, R::kBlock}},
                      MemCase{false, 9, 13, 2, {R::kModule}, 3},
                      MemCase{false, 1, 5, 1, {R::kBlock}}, MemCase{true, 6, 10, 2, {R::kNone}},
                      MemCase{true, 6, 10, 2, {R::kModule}}, MemCase{true, 6, 10, 2, {R::kBlock}},
                      MemCase{true, 5, 7, 3, {R::kBlock, R::kModule, R::kNone}, 2}),
    [](const auto& info) { return mem_case_name(info.param); });

// The CLI's and Python's dtype spelling: "fp32" and "bf16" only, anything else one message.
TEST(TrainBf16, ComputeDtypeSpellings) {
  DType t = DType::F64;
  ASSERT_TRUE(parse_compute_dtype("fp32", &t).ok());
  EXPECT_EQ(t, DType::F32);
  ASSERT_TRUE(parse_compute_dtype("bf16", &t).ok());
  EXPECT_EQ(t, DType::BF16);
  for (const char* bad : {"fp16", "BF16", "", "bf16 "}) {
    const Status st = parse_compute_dtype(bad, &t);
    EXPECT_FALSE(st.ok()) << bad;
    EXPECT_NE(st.message().find("expected 'fp32' or 'bf16'"), std::string::npos) << st.message();
  }
  EXPECT_EQ(t, DType::BF16);  // unchanged by the errors
}

// A dtype the step does not run is a user error, in the options and in the memory query.
TEST(TrainBf16, UnsupportedDtypeIsUserError) {
  EvoformerConfig cfg = test::small_config();
  cfg.no_blocks = 1;
  EvoformerStack stack = EvoformerStack::random(cfg, 1);
  Tensor m = Tensor::full({3, 5, cfg.c_m}, 0.1f), z = Tensor::full({5, 5, cfg.c_z}, 0.1f);
  TrainOptions opts;
  opts.dtype = DType::F16;
  TrainResult res;
  const Status st = stack.train_step(m, z, Tensor(), Tensor(), Tensor::full(m.shape(), 1.f),
                                     Tensor::full(z.shape(), 1.f), opts, &res);
  EXPECT_FALSE(st.ok());
  MemoryQuery q;
  q.cfg = cfg, q.s = 3, q.r = 5, q.dtype = DType::F16;
  int64_t out = 0;
  EXPECT_FALSE(stack_activation_bytes(q, &out).ok());
}

// `run --dtype bf16 --backward` runs and reports bf16 with the model's bytes equal to the measured
// ones; with the AF3 stacks too (one process; under DAP: tests/dap_af3_cli_test.cc), where the
// bf16 step differs from the fp32 one and --memory-budget plans it (planned peak in the report).
TEST(TrainBf16Cli, RunBackward) {
  const std::string report = test::temp_file("train_bf16_report.json");
  const test::Result r = test::run_cli(
      "run --s 6 --r 10 --blocks 2 --quiet --backward --dtype bf16 --policy module --report " +
      report);
  ASSERT_EQ(r.code, 0) << r.out;
  std::ifstream f(report);
  const nlohmann::json j = nlohmann::json::parse(f);
  EXPECT_EQ(j["dtype"], "bf16");
  EXPECT_EQ(j["activation_bytes"], j["activation_bytes_model"]);
  EXPECT_EQ(j["step_peak_bytes"], j["step_peak_bytes_model"]);
  for (const std::string stack : {"pairformer", "msa_module"}) {
    SCOPED_TRACE(stack);
    std::map<std::string, TensorFile> outs;
    for (const std::string dtype : {"fp32", "bf16"}) {
      const std::string out = test::temp_file("train_bf16_" + stack + dtype + ".st");
      const std::string rep = out + ".json";
      const test::Result af3 = test::run_cli(
          "run --stack " + stack + " --r 10 --s 4 --blocks 1 --quiet --backward --policy module " +
          "--memory-budget 1GiB --dtype " + dtype + " --out " + out + " --report " + rep);
      ASSERT_EQ(af3.code, 0) << af3.out;
      std::ifstream rf(rep);
      const nlohmann::json rj = nlohmann::json::parse(rf);
      EXPECT_EQ(rj["dtype"], dtype);
      EXPECT_TRUE(rj["training"].get<bool>());
      EXPECT_GT(rj["memory_plan"]["planned_peak_bytes"].get<int64_t>(), 0);
      ASSERT_TRUE(read_safetensors(out, &outs[dtype]).ok());
    }
    const Tensor& a = outs["bf16"].tensors.at("grad.input.z");
    const Tensor& b = outs["fp32"].tensors.at("grad.input.z");
    EXPECT_GT(test::normwise_err(a, b), 1e-4);  // the bf16 step ran
    EXPECT_LT(test::normwise_err(a, b), kBf16InputGradTol);
  }
}

}  // namespace
}  // namespace fc
