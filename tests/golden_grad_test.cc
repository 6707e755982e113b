// Training step against the OpenFold float64 reference: outputs, dL/d inputs and dL/d every
// parameter (loss L = sum(out.m * probe.m) + sum(out.z * probe.z)), for every recompute policy;
// and gradients bit-identical across policies.
#include <gtest/gtest.h>

#include <cstring>
#include <map>
#include <string>

#include "foldcube/io.h"
#include "foldcube/model.h"
#include "test_util.h"

namespace fc {
namespace {

struct StepResult {
  Tensor m, z;
  TrainResult r;
};

StepResult run_step(const TensorFile& f, const EvoformerStack& stack, const TrainOptions& opts) {
  StepResult out;
  Tensor m, z, mm, pm, pr_m, pr_z;
  EXPECT_TRUE(f.get_f32("input.m", {}, &m).ok());
  EXPECT_TRUE(f.get_f32("input.z", {}, &z).ok());
  EXPECT_TRUE(f.get_f32("input.msa_mask", {}, &mm).ok());
  EXPECT_TRUE(f.get_f32("input.pair_mask", {}, &pm).ok());
  EXPECT_TRUE(f.get_f32("probe.m", {}, &pr_m).ok());
  EXPECT_TRUE(f.get_f32("probe.z", {}, &pr_z).ok());
  out.m = m.clone();
  out.z = z.clone();
  Status st = stack.train_step(out.m, out.z, mm, pm, pr_m, pr_z, opts, &out.r);
  EXPECT_TRUE(st.ok()) << st.ToString();
  return out;
}

using test::bit_equal;

class GoldenGrad : public ::testing::TestWithParam<std::string> {};

TEST_P(GoldenGrad, AllPoliciesMatchReferenceAndEachOther) {
  TensorFile f;
  ASSERT_TRUE(read_safetensors(test::data_path(GetParam()), &f).ok());
  EvoformerConfig cfg;
  ASSERT_TRUE(EvoformerConfig::from_metadata(f.metadata, &cfg).ok());
  EvoformerStack stack;
  ASSERT_TRUE(EvoformerStack::load(cfg, f, &stack).ok());

  std::vector<std::vector<Recompute>> policies = {
      {Recompute::kNone}, {Recompute::kModule}, {Recompute::kBlock}};
  if (cfg.no_blocks >= 2) {
    std::vector<Recompute> mixed(cfg.no_blocks, Recompute::kNone);
    mixed[0] = Recompute::kBlock;
    mixed[1] = Recompute::kModule;
    policies.push_back(mixed);
  }
  StepResult base;
  for (size_t pi = 0; pi < policies.size(); ++pi) {
    TrainOptions opts;
    opts.policy = policies[pi];
    SCOPED_TRACE("policy set " + std::to_string(pi) + " first=" + recompute_name(policies[pi][0]));
    StepResult res = run_step(f, stack, opts);
    EXPECT_LT(test::golden_err(res.m, f.tensors.at("output.m")), 1e-4);
    EXPECT_LT(test::golden_err(res.z, f.tensors.at("output.z")), 1e-4);
    EXPECT_LT(test::golden_err(res.r.grad_m, f.tensors.at("grad.input.m")), 2e-4);
    EXPECT_LT(test::golden_err(res.r.grad_z, f.tensors.at("grad.input.z")), 2e-4);
    int matched = 0, expected = 0;
    for (const std::string& n : f.names) expected += n.rfind("grad.param.", 0) == 0;
    for (const auto& [name, g] : res.r.grad_params) {
      auto it = f.tensors.find("grad.param." + name);
      ASSERT_NE(it, f.tensors.end()) << "no reference gradient for " << name;
      EXPECT_LT(test::golden_err(g, it->second), 2e-4) << name;
      ++matched;
    }
    EXPECT_EQ(matched, expected);
    EXPECT_GT(res.r.activation_bytes, 0);
    if (pi == 0) {
      base = std::move(res);
      continue;
    }
    EXPECT_TRUE(bit_equal(res.r.grad_m, base.r.grad_m));
    EXPECT_TRUE(bit_equal(res.r.grad_z, base.r.grad_z));
    for (size_t i = 0; i < res.r.grad_params.size(); ++i)
      EXPECT_TRUE(bit_equal(res.r.grad_params[i].second, base.r.grad_params[i].second))
          << res.r.grad_params[i].first;
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, GoldenGrad,
                         ::testing::Values("evo_tiny.safetensors", "evo_af2dims.safetensors"),
                         [](const auto& info) {
                           return info.param.substr(0, info.param.find('.'));
                         });

}  // namespace
}  // namespace fc
