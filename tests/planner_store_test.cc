// The planner's two memory notions (docs/planner.md, "Element size and store dtype"): the dtype of
// the kept layer inputs (foldcube's `run --dtype bf16 --backward`: f32 buffers, kept inputs in
// bf16) and a device element size that puts every buffer in 2 bytes (the seeds' fp16 GPUs,
// profiles with "element_bytes": 2). Checks: a bf16 training plan's activation and peak bytes are
// the bf16 run's tracked bytes; the seeds' fitted profile predicts the numbers it did before the
// split; element_bytes round-trips and is validated.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "foldcube/extra_msa.h"
#include "foldcube/memory.h"
#include "foldcube/model.h"
#include "foldcube/planner.h"
#include "foldcube/runtime.h"
#include "test_util.h"

namespace fc {
namespace {

using R = Recompute;

DeviceProfile cpu_profile() {
  DeviceProfile p;
  EXPECT_TRUE(DeviceProfile::from_json(
                  R"({"name": "cpu", "gemm_gflops": 100, "gemm_bwd_gflops": 80,
                      "batched_gflops": 60, "attention_gflops": 50, "attention_bwd_gflops": 40,
                      "mem_gbps": 10, "memory_bytes": 8000000000})",
                  &p)
                  .ok());
  p.threads = num_threads();
  return p;
}

struct StoreCase {
  bool extra_msa;
  R policy;
};
std::string store_case_name(const StoreCase& c) {
  return std::string(c.extra_msa ? "extra_" : "evo_") + recompute_name(c.policy);
}
void PrintTo(const StoreCase& c, std::ostream* os) { *os << store_case_name(c); }

class PlannerStore : public ::testing::TestWithParam<StoreCase> {};

template <typename Stack>
TrainResult run_step(const EvoformerConfig& cfg, int64_t s, int64_t r, const TrainOptions& opts) {
  Stack stack = Stack::random(cfg, 3);
  Tensor m = Tensor::full({s, r, cfg.c_m}, 0.3f), z = Tensor::full({r, r, cfg.c_z}, -0.2f);
  TrainResult res;
  EXPECT_TRUE(stack
                  .train_step(m, z, Tensor(), Tensor(), Tensor::full(m.shape(), 1.f),
                              Tensor::full(z.shape(), 1.f), opts, &res)
                  .ok());
  return res;
}

// `plan --dtype bf16 --train` describes `run --dtype bf16 --backward`: the plan's activation bytes
// are the run's, and its peak is the run's tracked step peak above the same base (weights,
// inputs, masks, output gradients) as the fp32 plan's above the fp32 run's.
TEST_P(PlannerStore, Bf16TrainingPlanIsTheBf16Run) {
  const StoreCase c = GetParam();
  EvoformerConfig cfg = test::small_config();
  if (c.extra_msa) cfg.c_m = 16;
  cfg.no_blocks = 3;
  const int64_t s = 6, r = 10;
  PlanRequest q;
  q.cfg = cfg;
  q.s = s, q.r = r;
  q.training = true;
  q.extra_msa = c.extra_msa;
  q.profile = cpu_profile();
  q.fixed_policy = true;
  q.policy = c.policy;
  q.chunk_target = 4 << 10;  // chunked: the kept inputs and the chunk buffers both matter
  Plan p32, p16;
  q.dtype = DType::F32;
  const Status st32 = make_plan(q, &p32);
  ASSERT_TRUE(st32.ok()) << st32.message();
  q.dtype = DType::BF16;
  const Status st16 = make_plan(q, &p16);
  ASSERT_TRUE(st16.ok()) << st16.message();
  EXPECT_EQ(p16.element_bytes, 0);
  const TrainOptions o32 = to_train_options(p32), o16 = to_train_options(p16);
  EXPECT_EQ(o32.dtype, DType::F32);
  EXPECT_EQ(o16.dtype, DType::BF16);
  const TrainResult r32 = c.extra_msa ? run_step<ExtraMsaStack>(cfg, s, r, o32)
                                      : run_step<EvoformerStack>(cfg, s, r, o32);
  const TrainResult r16 = c.extra_msa ? run_step<ExtraMsaStack>(cfg, s, r, o16)
                                      : run_step<EvoformerStack>(cfg, s, r, o16);
  EXPECT_EQ(p32.activation_bytes, r32.activation_bytes);
  EXPECT_EQ(p16.activation_bytes, r16.activation_bytes);
  EXPECT_LT(r16.activation_bytes, r32.activation_bytes);
  EXPECT_EQ(p16.peak_bytes - r16.peak_bytes, p32.peak_bytes - r32.peak_bytes);
}

INSTANTIATE_TEST_SUITE_P(Policies, PlannerStore,
                         ::testing::Values(StoreCase{false, R::kNone}, StoreCase{false, R::kModule},
                                           StoreCase{false, R::kBlock}, StoreCase{true, R::kNone},
                                           StoreCase{true, R::kBlock}),
                         [](const auto& info) { return store_case_name(info.param); });

// The seeds' fitted profile as of 2026-12-07 (fit A before the fp32 T1044 rows and the chunk
// launches; docs/planner.md), kept in tests/data so that these pins do not move with the fits.
std::string pinned_seeds_profile() {
  std::ifstream f(std::string(test::data_dir()) + "/seeds-fitted-fp16-2026-12-07.json");
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// The seeds' fitted profile (element_bytes 2: every buffer in fp16) gives the estimates it gave
// before the store dtype was split from the element size (pinned from main 5e87fcf's `foldcube
// plan ... --profile docs/profiles/seeds-fitted-fp16.json --json`, that profile now
// tests/data/seeds-fitted-fp16-2026-12-07.json); on the engine's layout
// (element_bytes 0) the same request is another plan.
TEST(PlannerStoreSeeds, FittedProfilePredictsAsBefore) {
  DeviceProfile dev;
  ASSERT_TRUE(DeviceProfile::from_json(pinned_seeds_profile(), &dev).ok());
  ASSERT_EQ(dev.element_bytes, 2);
  struct Row {
    int devices, dap;
    bool fixed;
    R policy;
    double time_ms;
    int64_t peak, activation;
  };
  const Row rows[] = {
      {1, 0, true, R::kModule, 3331.2608281003104, 7910712704, 7247757312},
      {2, 2, true, R::kBlock, 2076.093615544328, 1509103264, 805306368},
      {4, 0, false, R::kNone, 959.7359540779277, 8758134759, 8232370176},
  };
  for (const Row& w : rows) {
    PlanRequest q;
    q.cfg.no_blocks = 48;
    q.s = 128, q.r = 256;
    q.training = true;
    q.profile = dev;
    q.devices = w.devices;
    q.dap = w.dap;
    q.dp = 1;
    q.memory_bytes = 40000000000;
    q.fixed_policy = w.fixed;
    q.policy = w.policy;
    Plan p;
    ASSERT_TRUE(make_plan(q, &p).ok());
    EXPECT_NEAR(p.time_ms, w.time_ms, 1e-9 * w.time_ms) << w.devices;
    EXPECT_EQ(p.peak_bytes, w.peak) << w.devices;
    EXPECT_EQ(p.activation_bytes, w.activation) << w.devices;
    q.element_bytes = 0;  // foldcube's engine: f32 buffers, the kept inputs in 2 bytes
    Plan e;
    ASSERT_TRUE(make_plan(q, &e).ok());
    EXPECT_GT(e.peak_bytes, p.peak_bytes) << w.devices;
  }
}

// The search with its per-setting caches (terms shared by the DAP degrees, module costs by the
// chunk settings, the one-process peak from the position decomposition) returns the plans it
// returned before them: the seeds' Table 2/3 settings, pinned from main 5e87fcf's `foldcube plan
// --s S --r R --blocks 48 --train --devices N --memory 40GB --dp 1 --profile
// docs/profiles/seeds-fitted-fp16.json --json` (now tests/data/seeds-fitted-fp16-2026-12-07.json),
// and T1044's inference plan.
TEST(PlannerStoreSeeds, SearchChoosesThePlansItChoseBefore) {
  DeviceProfile dev;
  ASSERT_TRUE(DeviceProfile::from_json(pinned_seeds_profile(), &dev).ok());
  struct Row {
    int devices;
    int64_t s, r;
    int dap;
    int64_t target;
    const char* policy;
    double time_ms;
    int64_t peak;
  };
  const Row rows[] = {
      {2, 128, 256, 2, 838860800, "nnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnn",
       1479.5975864817644, 17174850986},
      {2, 512, 256, 2, 1744830464, "mnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnn",
       3421.6579904201826, 39467649163},
      {2, 512, 384, 2, 2617245696, "bbbbbbbbbbbbbbbbbbbmmnnnnnnnnnnnnnnnnnnnnnnnnnnn",
       7414.984258249616, 39957629886},
      {4, 128, 256, 4, 838860800, "nnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnn",
       959.7359540779277, 8758134759},
      {4, 512, 256, 4, 1744830464, "nnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnn",
       1925.0978759583068, 20266007486},
      {4, 512, 384, 4, 2617245696, "nnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnn",
       3402.639484564342, 33859205095},
  };
  for (const Row& w : rows) {
    PlanRequest q;
    q.cfg.no_blocks = 48;
    q.s = w.s, q.r = w.r;
    q.training = true;
    q.profile = dev;
    q.devices = w.devices;
    q.dp = 1;
    q.memory_bytes = 40000000000;
    Plan p;
    ASSERT_TRUE(make_plan(q, &p).ok());
    std::string pol;
    for (R x : p.policy) pol += recompute_name(x)[0];
    const std::string what =
        std::to_string(w.devices) + " devices, " + std::to_string(w.s) + ", " + std::to_string(w.r);
    EXPECT_EQ(p.dap, w.dap) << what;
    EXPECT_EQ(p.chunk_target_bytes, w.target) << what;
    EXPECT_EQ(pol, w.policy) << what;
    EXPECT_NEAR(p.time_ms, w.time_ms, 1e-9 * w.time_ms) << what;
    EXPECT_EQ(p.peak_bytes, w.peak) << what;
  }
  PlanRequest q;  // T1044: inference at (128, 2048) on 2 devices
  q.cfg.no_blocks = 48;
  q.s = 128, q.r = 2048;
  q.profile = dev;
  q.devices = 2;
  q.memory_bytes = 40000000000;
  Plan p;
  ASSERT_TRUE(make_plan(q, &p).ok());
  EXPECT_EQ(p.dap, 1);
  EXPECT_EQ(p.dp, 2);
  EXPECT_EQ(p.chunk, 0);
  EXPECT_EQ(p.chunk_target_bytes, 301989888);
  EXPECT_NEAR(p.time_ms, 172364.53091665354, 1e-9 * 172364.53);
  // 2903980928 on main 5e87fcf; the fused f32 triangle multiplication (h-fuse) no longer keeps
  // LN_in(z) whole, which lowers the inference workspace.
  EXPECT_EQ(p.peak_bytes, 2753182592);
}

TEST(PlannerStoreJson, ElementBytesRoundTripAndValidation) {
  DeviceProfile d = cpu_profile();
  EXPECT_EQ(d.element_bytes, 0);
  d.element_bytes = 2;
  DeviceProfile back;
  ASSERT_TRUE(DeviceProfile::from_json(d.to_json(), &back).ok());
  EXPECT_EQ(back.element_bytes, 2);
  nlohmann::json j = nlohmann::json::parse(d.to_json());
  j["element_bytes"] = 3;
  const Status bad = DeviceProfile::from_json(j.dump(), &back);
  EXPECT_FALSE(bad.ok());
  EXPECT_NE(bad.message().find("element_bytes"), std::string::npos) << bad.message();

  PlanRequest q;
  q.cfg = test::small_config();
  q.cfg.no_blocks = 2;
  q.s = 4, q.r = 8;
  q.training = true;
  q.profile = cpu_profile();
  q.element_bytes = 2;
  Plan p;
  ASSERT_TRUE(make_plan(q, &p).ok());
  EXPECT_EQ(p.element_bytes, 2);
  Plan pb;
  ASSERT_TRUE(Plan::from_json(p.to_json(), &pb).ok());
  EXPECT_EQ(pb.element_bytes, 2);
  EXPECT_EQ(pb.to_json(), p.to_json());
  q.element_bytes = 8;
  const Status st = make_plan(q, &p);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("element_bytes"), std::string::npos) << st.message();
  // A plan file without the key (written before it existed) is the engine's layout.
  nlohmann::json old = nlohmann::json::parse(pb.to_json());
  old.erase("element_bytes");
  ASSERT_TRUE(Plan::from_json(old.dump(), &pb).ok());
  EXPECT_EQ(pb.element_bytes, 0);
}

// run --plan grows the heap to the plan's peak before its passes (first-touch page faults are a
// one-time cost of the process): an untracked block, so the tracked live and peak bytes the
// memory model is checked against do not move; nothing is done unless the allocator reuses large
// blocks (as the CLI configures it).
TEST(HeapPrefault, LeavesTrackedBytesAlone) {
  const MemStats before = mem_stats();
  EXPECT_EQ(prefault_heap(0), 0.0);
  EXPECT_EQ(prefault_heap(-5), 0.0);
  configure_allocator({.reuse_large_blocks = true});  // the CLI's setting, process-wide
  MemoryScope scope;
  EXPECT_GE(prefault_heap(int64_t{64} << 20), 0.0);
  const MemStats after = mem_stats();
  EXPECT_EQ(after.live_bytes, before.live_bytes);
  EXPECT_EQ(after.peak_bytes, before.peak_bytes);
  EXPECT_EQ(scope.peak_above_start(), 0);
}

}  // namespace
}  // namespace fc
