// bf16 training (TrainOptions::dtype = BF16) of the AF3 Pairformer and MSA module: the same layer
// units as the Evoformer's (bf16 GEMM inputs, kept inputs in bf16), so the same checks as
// tests/train_bf16_test.cc: the golden cases within the bf16 normwise tolerances of the float64
// reference (outputs, dL/d inputs, parameter gradients), gradients bit-identical across recompute
// policies, and the memory model byte-exact against the allocator (activations and step peak).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "foldcube/af3.h"
#include "foldcube/io.h"
#include "foldcube/runtime.h"
#include "model/block_table.h"
#include "model/train.h"
#include "plan/memory_model.h"
#include "test_util.h"

namespace fc {
namespace {

using R = Recompute;

// The tolerances of tests/train_bf16_test.cc (docs/benchmarks.md), measured here at 9.3e-3
// (outputs), 1.6e-2 (dL/d inputs) and 7.4e-2 (parameter gradients) at worst.
constexpr double kOutTol = 2e-2;
constexpr double kInputGradTol = 0.1;
constexpr double kParamGradTol = 0.3;

Tensor get(const TensorFile& f, const std::string& name) {
  Tensor t;
  EXPECT_TRUE(f.get_f32(name, {}, &t).ok()) << name;
  return t.clone();
}

double norm2(const Tensor& x) {
  const Tensor a = x.to(DType::F64);
  double ss = 0;
  for (int64_t i = 0; i < a.numel(); ++i) ss += a.data<double>()[i] * a.data<double>()[i];
  return std::sqrt(ss);
}

// Normwise error, or the norm itself where the reference is zero to rounding.
double err(const Tensor& x, const Tensor& ref) {
  return norm2(ref) < 1e-6 ? norm2(x) : test::normwise_err(x, ref);
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
  TensorFile f;
  ASSERT_TRUE(read_safetensors(test::data_path(file), &f).ok());
  Af3Config cfg;
  ASSERT_TRUE(Af3Config::from_weights(f, &cfg).ok());
  const Tensor pair_mask = get(f, "input.pair_mask");
  const Tensor mask = cfg.kind == "pairformer" ? get(f, "input.mask") : Tensor();
  Af3Step base;
  double worst_out = 0, worst_in = 0, worst_param = 0;
  for (const std::vector<R>& policy : std::vector<std::vector<R>>{
           {R::kNone}, {R::kModule}, {R::kBlock}, {R::kModule, R::kBlock}}) {
    SCOPED_TRACE(recompute_name(policy[0]));
    TrainOptions opts;
    opts.dtype = DType::BF16;
    opts.policy = policy;
    Af3Step s = af3_step(f, cfg, opts);
    for (const auto& [name, t] : s.out) {
      const double e =
          masked_normwise(t, f.tensors.at(name), name == "output.s" ? mask : pair_mask);
      EXPECT_LT(e, kOutTol) << name;
      worst_out = std::max(worst_out, e);
    }
    int checked = 0;
    for (const std::string& name : f.names) {
      if (name.rfind("grad.", 0) != 0) continue;
      ASSERT_TRUE(s.grads.count(name)) << name;
      const double e = err(s.grads.at(name), f.tensors.at(name));
      const bool param = name.rfind("grad.param.", 0) == 0;
      EXPECT_LT(e, param ? kParamGradTol : kInputGradTol) << name;
      (param ? worst_param : worst_in) = std::max(param ? worst_param : worst_in, e);
      ++checked;
    }
    EXPECT_EQ(checked, static_cast<int>(s.grads.size()));
    if (base.grads.empty()) {
      base = std::move(s);
      continue;
    }
    for (const auto& [name, t] : s.grads)
      EXPECT_TRUE(test::bit_equal(t, base.grads.at(name))) << name;
  }
  std::printf(
      "%s bf16 training, worst normwise error: outputs %.2e, input gradients %.2e, "
      "parameter gradients %.2e\n",
      file.c_str(), worst_out, worst_in, worst_param);
}

TEST(TrainBf16Af3Golden, PairformerTiny) { check_af3_golden("pairformer_tiny.safetensors"); }
TEST(TrainBf16Af3Golden, MsaModuleTiny) { check_af3_golden("msa_module_tiny.safetensors"); }

// Memory model in bf16 against the allocator, Pairformer and MSA module, every policy; and
// different from the fp32 model (a model ignoring the dtype fails).
struct Af3Bf16MemCase {
  std::string kind;
  std::vector<R> policy;
  int64_t chunk;
};
std::string mem_name(const Af3Bf16MemCase& c) {
  std::string n = c.kind;
  for (R p : c.policy) n += std::string("_") + recompute_name(p);
  if (c.chunk > 0) n += "_chunk" + std::to_string(c.chunk);
  return n;
}
void PrintTo(const Af3Bf16MemCase& c, std::ostream* os) { *os << mem_name(c); }

class TrainBf16Af3Memory : public ::testing::TestWithParam<Af3Bf16MemCase> {};

TEST_P(TrainBf16Af3Memory, ActivationsAndPeakMatchAllocator) {
  const Af3Bf16MemCase& c = GetParam();
  Af3Config cfg;
  cfg.kind = c.kind;
  cfg.c_s = 24, cfg.c_z = 16, cfg.c_m = 8, cfg.no_heads_single = 4, cfg.no_heads_pair = 2;
  cfg.c_hidden_pair = 8, cfg.pwa_heads = 4, cfg.pwa_head_dim = 8, cfg.c_hidden_opm = 8;
  cfg.no_blocks = 3;
  ASSERT_TRUE(cfg.validate().ok());
  const int64_t n = 11, N = 5;
  const EvoformerConfig trunk = af3_trunk_config(cfg);
  TrainOptions opts;
  opts.policy = c.policy;
  opts.chunk = c.chunk;
  opts.dtype = DType::BF16;
  TrainResult res;
  Tensor z = Tensor::full({n, n, cfg.c_z}, 0.2f), gz = Tensor::full(z.shape(), 1.f);
  const bool pf = cfg.kind == "pairformer";
  const BlockTable& t = pf ? kPairformerBlock : kMsaModuleBlock;
  const int64_t s = pf ? 1 : N;
  if (pf) {
    const PairformerStack st = PairformerStack::random(cfg, 5);
    Tensor x = Tensor::full({n, cfg.c_s}, -0.3f), gx = Tensor::full(x.shape(), 1.f);
    ASSERT_TRUE(st.train_step(x, z, Tensor(), gx, gz, opts, &res).ok());
  } else {
    const MsaModule mod = MsaModule::random(cfg, 5);
    Tensor feat = Tensor::full({N, n, cfg.msa_feat}, 0.1f), emb = Tensor::full({n, cfg.c_s}, 0.5f);
    Tensor ge;
    ASSERT_TRUE(mod.train_step(z, emb, feat, Tensor(), Tensor(), gz, opts, &res, &ge).ok());
  }
  const int64_t target = default_train_chunk_target_bytes(trunk, s, n);
  const int th = num_threads();
  const int64_t peak16 = stack_step_peak_bytes(t, trunk, s, n, cfg.no_blocks, c.policy, th, 4,
                                               c.chunk, target, DType::BF16);
  EXPECT_EQ(res.activation_bytes, stack_activation_bytes(t, trunk, s, n, cfg.no_blocks, c.policy, 4,
                                                         c.chunk, target, DType::BF16));
  EXPECT_EQ(res.peak_bytes, peak16);
  EXPECT_NE(peak16, stack_step_peak_bytes(t, trunk, s, n, cfg.no_blocks, c.policy, th, 4, c.chunk,
                                          target, DType::F32));
}

INSTANTIATE_TEST_SUITE_P(Policies, TrainBf16Af3Memory,
                         ::testing::Values(Af3Bf16MemCase{"pairformer", {R::kNone}, 0},
                                           Af3Bf16MemCase{"pairformer", {R::kModule}, 0},
                                           Af3Bf16MemCase{
                                               "pairformer", {R::kBlock, R::kNone, R::kModule}, 2},
                                           Af3Bf16MemCase{"msa_module", {R::kNone}, 0},
                                           Af3Bf16MemCase{"msa_module", {R::kModule}, 3},
                                           Af3Bf16MemCase{"msa_module", {R::kBlock}, 0}),
                         [](const auto& info) { return mem_name(info.param); });

}  // namespace
}  // namespace fc
