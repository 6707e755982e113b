// The analytic activation-memory model (include/foldcube/plan.h) against the tracking allocator,
// for each recompute policy and a mixed plan.
#include <gtest/gtest.h>

#include "foldcube/model.h"
#include "foldcube/plan.h"
#include "plan/memory_model.h"
#include "test_util.h"

namespace fc {
namespace {

EvoformerConfig small_cfg() {
  EvoformerConfig cfg = test::small_config();
  cfg.no_blocks = 3;
  return cfg;
}

struct Case {
  int64_t s, r;
  std::vector<Recompute> policy;
};

std::string CaseName(const Case& c) {
  std::string n = "s" + std::to_string(c.s) + "_r" + std::to_string(c.r);
  for (Recompute p : c.policy) n += std::string("_") + recompute_name(p);
  return n;
}
// Test parameters print as their readable name (gtest would print the raw struct bytes).
void PrintTo(const Case& p, std::ostream* os) { *os << CaseName(p); }

class TrainMemory : public ::testing::TestWithParam<Case> {};

TEST_P(TrainMemory, ActivationBytesMatchAllocator) {
  const Case c = GetParam();
  const EvoformerConfig cfg = small_cfg();
  EvoformerStack stack = EvoformerStack::random(cfg, 11);
  Tensor m = Tensor::full({c.s, c.r, cfg.c_m}, 0.3f), z = Tensor::full({c.r, c.r, cfg.c_z}, -0.2f);
  Tensor gm = Tensor::full(m.shape(), 1.f), gz = Tensor::full(z.shape(), 1.f);
  TrainOptions opts;
  opts.policy = c.policy;
  TrainResult res;
  ASSERT_TRUE(stack.train_step(m, z, Tensor(), Tensor(), gm, gz, opts, &res).ok());
  EXPECT_EQ(res.activation_bytes, stack_activation_bytes(cfg, c.s, c.r, cfg.no_blocks, c.policy));
  EXPECT_GE(res.peak_bytes, res.activation_bytes);
}

INSTANTIATE_TEST_SUITE_P(
    Policies, TrainMemory,
    ::testing::Values(Case{6, 10, {Recompute::kNone}}, Case{6, 10, {Recompute::kModule}},
                      Case{6, 10, {Recompute::kBlock}}, Case{9, 13, {Recompute::kBlock}},
                      Case{5, 7, {Recompute::kBlock, Recompute::kModule, Recompute::kNone}}),
    [](const auto& info) { return CaseName(info.param); });

TEST(TrainMemoryModel, PolicyOrderingAtAf2Dims) {
  const EvoformerConfig cfg;  // AF2 model_1
  const int64_t none = block_activation_bytes(cfg, 128, 256, Recompute::kNone);
  const int64_t module = block_activation_bytes(cfg, 128, 256, Recompute::kModule);
  const int64_t block = block_activation_bytes(cfg, 128, 256, Recompute::kBlock);
  EXPECT_GT(none, module);
  EXPECT_GT(module, block);
  EXPECT_EQ(block, (128 * 256 * 256 + 256 * 256 * 128) * 4);
  EXPECT_EQ(block_activation_bytes(cfg, 128, 256, Recompute::kBlock, 2), block / 2);
}

}  // namespace
}  // namespace fc
