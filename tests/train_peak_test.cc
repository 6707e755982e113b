// The peak-memory model of the training step (stack_step_peak_bytes, include/foldcube/plan.h)
// against the tracking allocator: TrainResult::peak_bytes for each recompute policy and mixed
// plans, at small configs and at AF2 model_1 dims.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "foldcube/model.h"
#include "foldcube/plan.h"
#include "foldcube/runtime.h"
#include "plan/memory_model.h"
#include "test_util.h"

namespace fc {
namespace {

EvoformerConfig small_cfg() { return test::small_config(); }

struct Case {
  bool af2;  // AF2 model_1 dims, else small_cfg
  int64_t s, r, blocks;
  std::vector<Recompute> policy;  // one for all blocks, or one per block
  int threads = 0;                // 0 = the test's default
};

std::string case_name(const Case& c) {
  std::string n = std::string(c.af2 ? "af2" : "small") + "_s" + std::to_string(c.s) + "_r" +
                  std::to_string(c.r) + "_b" + std::to_string(c.blocks);
  for (Recompute p : c.policy) n += std::string("_") + recompute_name(p);
  if (c.threads > 0) n += "_t" + std::to_string(c.threads);
  return n;
}
// Test parameters print as their readable name (gtest would print the raw struct bytes).
void PrintTo(const Case& p, std::ostream* os) { *os << case_name(p); }

class TrainPeak : public ::testing::TestWithParam<Case> {};

TEST_P(TrainPeak, PeakBytesMatchAllocator) {
  const Case c = GetParam();
  const int saved_threads = num_threads();
  if (c.threads > 0) set_num_threads(c.threads);
  EvoformerConfig cfg = c.af2 ? EvoformerConfig() : small_cfg();
  cfg.no_blocks = c.blocks;
  EvoformerStack stack = EvoformerStack::random(cfg, 5);
  Tensor m = Tensor::full({c.s, c.r, cfg.c_m}, 0.3f), z = Tensor::full({c.r, c.r, cfg.c_z}, -0.2f);
  Tensor gm = Tensor::full(m.shape(), 1.f), gz = Tensor::full(z.shape(), 1.f);
  TrainOptions opts;
  opts.policy = c.policy;
  TrainResult res;
  ASSERT_TRUE(stack.train_step(m, z, Tensor(), Tensor(), gm, gz, opts, &res).ok());
  const int64_t predicted = stack_step_peak_bytes(cfg, c.s, c.r, c.blocks, c.policy, num_threads());
  set_num_threads(saved_threads);
  // The model replays the allocation sequence, so it is exact; 5 % is the requirement.
  EXPECT_EQ(res.peak_bytes, predicted);
  EXPECT_NEAR(static_cast<double>(predicted), static_cast<double>(res.peak_bytes),
              0.05 * static_cast<double>(res.peak_bytes));
  EXPECT_EQ(res.activation_bytes, stack_activation_bytes(cfg, c.s, c.r, c.blocks, c.policy));
}

using R = Recompute;
INSTANTIATE_TEST_SUITE_P(
    Policies, TrainPeak,
    ::testing::Values(Case{false, 6, 10, 3, {R::kNone}}, Case{false, 6, 10, 3, {R::kModule}},
                      Case{false, 6, 10, 3, {R::kBlock}}, Case{false, 9, 13, 2, {R::kNone}},
                      Case{false, 9, 13, 2, {R::kModule}}, Case{false, 9, 13, 2, {R::kBlock}},
                      Case{false, 1, 5, 1, {R::kNone}}, Case{false, 1, 5, 1, {R::kModule}},
                      Case{false, 1, 5, 1, {R::kBlock}}, Case{false, 20, 8, 2, {R::kModule}},
                      Case{false, 5, 7, 3, {R::kBlock, R::kModule, R::kNone}},
                      Case{false, 7, 11, 4, {R::kNone, R::kBlock, R::kModule, R::kBlock}},
                      Case{false, 6, 10, 3, {R::kNone}, 1}, Case{false, 6, 10, 2, {R::kBlock}, 1},
                      Case{false, 6, 10, 2, {R::kModule, R::kNone}, 1},
                      Case{true, 8, 16, 2, {R::kNone}}, Case{true, 8, 16, 2, {R::kModule}},
                      Case{true, 8, 16, 2, {R::kBlock}},
                      Case{true, 8, 16, 2, {R::kBlock, R::kModule}},
                      Case{true, 4, 24, 2, {R::kNone, R::kBlock}},
                      // r = 64 at AF2 dims: the outer product mean runs in several chunks.
                      Case{true, 2, 64, 1, {R::kNone}}),
    [](const auto& info) { return case_name(info.param); });

TEST(TrainPeakModel, AtAf2Dims) {
  const EvoformerConfig cfg;  // AF2 model_1
  // With 48 blocks the activations dominate; with few blocks the recompute of a whole block
  // (its full kNone state) makes `block` peak above `module`.
  const int64_t none = stack_step_peak_bytes(cfg, 128, 256, 48, {R::kNone}, 2);
  const int64_t module = stack_step_peak_bytes(cfg, 128, 256, 48, {R::kModule}, 2);
  const int64_t block = stack_step_peak_bytes(cfg, 128, 256, 48, {R::kBlock}, 2);
  EXPECT_GT(none, module);
  EXPECT_GT(module, block);
  EXPECT_GT(stack_step_peak_bytes(cfg, 128, 256, 2, {R::kBlock}, 2),
            stack_step_peak_bytes(cfg, 128, 256, 2, {R::kModule}, 2));
  for (R p : {R::kNone, R::kModule, R::kBlock}) {
    const int64_t fp32 = stack_step_peak_bytes(cfg, 128, 256, 4, {p}, 2);
    EXPECT_GE(fp32, stack_activation_bytes(cfg, 128, 256, 4, {p}));
    EXPECT_EQ(stack_step_peak_bytes(cfg, 128, 256, 4, {p}, 2, 2), fp32 / 2);
  }
  // More threads only add per-thread attention scratch.
  EXPECT_GE(stack_step_peak_bytes(cfg, 128, 256, 48, {R::kBlock}, 8), block);
}

}  // namespace
}  // namespace fc
