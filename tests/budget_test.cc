// Budget-driven inference plans: the predicted peak equals the tracked peak, the measured peak
// never exceeds the budget, results do not depend on the plan, and too-small budgets are refused
// with the smallest feasible one.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <set>
#include <string>
#include <vector>

#include "foldcube/memory.h"
#include "foldcube/model.h"
#include "foldcube/plan.h"
#include "foldcube/runtime.h"
#include "plan/memory_model.h"
#include "test_util.h"

namespace fc {
namespace {

EvoformerConfig cfg_small() {
  EvoformerConfig cfg;
  cfg.c_m = 64;
  cfg.c_z = 32;
  cfg.c_hidden_msa_att = 8;
  cfg.c_hidden_pair_att = 8;
  cfg.c_hidden_opm = 8;
  cfg.c_hidden_mul = 32;
  cfg.c_s = 16;
  cfg.no_blocks = 1;
  return cfg;
}

TEST(InferenceBudget, PredictedEqualsMeasuredAndFitsBudget) {
  const EvoformerConfig cfg = cfg_small();
  EvoformerStack stack = EvoformerStack::random(cfg, 3);
  const int64_t s = 24, r = 48;
  Tensor m0 = Tensor::full({s, r, cfg.c_m}, 0.25f), z0 = Tensor::full({r, r, cfg.c_z}, -0.5f);
  for (int64_t i = 0; i < m0.numel(); ++i) m0.f32()[i] = static_cast<float>((i * 37) % 19) / 19.f;
  Tensor ref_m, ref_z;
  int64_t min_feasible = 0;
  for (int64_t budget_mib : {64, 8, 6, 5, 4, 3, 2, 1}) {
    Tensor m = m0.clone(), z = z0.clone();
    const int64_t base = mem_stats().live_bytes;
    InferencePlan plan;
    Status st = plan_inference(cfg, s, r, false, base, budget_mib << 20, num_threads(), &plan);
    if (!st.ok()) {
      EXPECT_EQ(st.code(), Status::Code::kOutOfMemory);
      EXPECT_NE(st.message().find("smallest feasible budget"), std::string::npos) << st.message();
      min_feasible = budget_mib;
      break;
    }
    ForwardOptions opts;
    opts.chunk_target_bytes = plan.chunk_target_bytes;
    MemoryScope scope;
    Tensor s_out;
    ASSERT_TRUE(stack.forward(m, z, Tensor(), Tensor(), &s_out, opts).ok());
    EXPECT_EQ(scope.peak(), plan.predicted_peak_bytes) << budget_mib << " MiB";
    EXPECT_LE(scope.peak(), budget_mib << 20);
    if (!ref_m.defined()) {
      ref_m = m;
      ref_z = z;
    } else {  // chunking changes the split of the work, not the result
      const double dm = test::max_abs_diff(m.f32(), ref_m.f32(), m.numel());
      const double dz = test::max_abs_diff(z.f32(), ref_z.f32(), z.numel());
      EXPECT_LT(dm, 1e-4) << budget_mib;
      EXPECT_LT(dz, 1e-4) << budget_mib;
    }
  }
  EXPECT_GT(min_feasible, 0) << "the smallest budget should have been refused";
}

// The reported chunk loops follow the chunking: a forced chunk caps every loop, and a smaller
// chunk target never gives a loop more items per chunk.
TEST(InferenceBudget, ModuleChunking) {
  const EvoformerConfig cfg = cfg_small();
  const int64_t s = 24, r = 48;
  const std::vector<ModuleChunk> forced = forward_chunking(cfg, s, r, 5, 0, 2);
  std::set<std::string> modules;
  for (const ModuleChunk& c : forced) {
    modules.insert(c.module);
    EXPECT_EQ(c.items, std::min<int64_t>(5, c.length)) << c.module << " " << c.axis;
  }
  EXPECT_EQ(modules.size(), 9u);
  std::vector<ModuleChunk> prev = forward_chunking(cfg, s, r, 0, int64_t{1} << 30, 2);
  for (const ModuleChunk& c : prev) EXPECT_EQ(c.items, c.length) << c.module << " " << c.axis;
  for (int64_t target = int64_t{1} << 20; target >= 1; target /= 4) {
    const std::vector<ModuleChunk> cur = forward_chunking(cfg, s, r, 0, target, 2);
    ASSERT_EQ(cur.size(), prev.size());
    for (size_t i = 0; i < cur.size(); ++i) {
      EXPECT_GE(cur[i].items, 1);
      EXPECT_LE(cur[i].items, prev[i].items) << cur[i].module << " " << cur[i].axis;
    }
    prev = cur;
  }
  for (const ModuleChunk& c : prev) {
    if (c.axis.rfind("c_t", 0) != 0) {
      EXPECT_EQ(c.items, 1) << c.module << " " << c.axis;
    }
  }
  const std::vector<ModuleChunk> extra = forward_chunking(cfg, s, r, 0, 0, 2, true);
  EXPECT_TRUE(std::any_of(extra.begin(), extra.end(),
                          [](const ModuleChunk& c) { return c.module == "msa_att_col_global"; }));
}

TEST(InferenceBudget, ParseBytes) {
  int64_t b = 0;
  ASSERT_TRUE(parse_bytes("6GiB", &b).ok());
  EXPECT_EQ(b, int64_t{6} << 30);
  ASSERT_TRUE(parse_bytes("512 MiB", &b).ok());
  EXPECT_EQ(b, int64_t{512} << 20);
  ASSERT_TRUE(parse_bytes("40GB", &b).ok());
  EXPECT_EQ(b, int64_t{40000000000});
  ASSERT_TRUE(parse_bytes("1.5G", &b).ok());
  EXPECT_EQ(b, int64_t{3} << 29);
  ASSERT_TRUE(parse_bytes("1000", &b).ok());
  EXPECT_EQ(b, 1000);
  EXPECT_FALSE(parse_bytes("lots", &b).ok());
  EXPECT_FALSE(parse_bytes("5 parsecs", &b).ok());
  EXPECT_FALSE(parse_bytes("-1G", &b).ok());
  EXPECT_FALSE(parse_bytes("0", &b).ok());
}

}  // namespace
}  // namespace fc
