// The planner's per-layer partitions (src/plan/partition_cost.h): the search's time, its response
// to the link model, and the plan estimates of an explicit list (single process; the executor is
// tested over MPI in dap_partition_test.cc).
#include <gtest/gtest.h>

#include <chrono>

#include "exec/partition.h"
#include "foldcube/planner.h"
#include "plan/partition_cost.h"

namespace fc {
namespace {

DeviceProfile profile(int devices, double link_gbps) {
  DeviceProfile p;
  p.name = "test";
  p.devices = devices;
  p.threads = 1;
  p.memory_bytes = int64_t{64} << 30;
  p.gemm_gflops = 100;
  p.gemm_half_rows = 300;
  p.gemm_bwd_gflops = 80;
  p.batched_gflops = 60;
  p.attention_gflops = 60;
  p.attention_bwd_gflops = 40;
  p.attention_len_exp = 0.2;
  p.mem_gbps = 10;
  p.link_gbps = link_gbps;
  p.link_latency_us = 20;
  return p;
}

PlanRequest request(int devices, double link_gbps, bool training) {
  PlanRequest q;
  q.cfg.no_blocks = 48;  // AF2 model_1 dimensions
  q.s = 128;
  q.r = 256;
  q.training = training;
  q.profile = profile(devices, link_gbps);
  q.dap = devices;
  q.split_auto = true;
  return q;
}

// 48 blocks on 4 devices, inference and training: the whole search (DAP/DP degrees, recompute,
// chunks, then the per-layer splits) under one second, and the chosen lists resolve.
TEST(PartitionPlan, SearchOf48BlocksOn4DevicesUnderOneSecond) {
  for (bool training : {false, true}) {
    Plan p;
    const auto t0 = std::chrono::steady_clock::now();
    ASSERT_TRUE(make_plan(request(4, 0.05, training), &p).ok());
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("[ info ] training %d: search %.3f s, %zu partition lists\n", training, s,
                p.partitions.size());
    EXPECT_LT(s, 1.0);
    std::vector<std::vector<Split>> splits;
    EXPECT_TRUE(resolve_partition(kEvoformerBlock, p.partitions, 48, &splits).ok());
  }
}

// A fast link keeps pure DAP (its layout changes move less than whole streams); a very slow link
// makes whole-stream layers (no per-layer collectives) pay, and the plan's estimate is then below
// pure DAP's.
TEST(PartitionPlan, ChoiceFollowsTheLinkModel) {
  Plan fast;
  ASSERT_TRUE(make_plan(request(2, 1000, true), &fast).ok());
  EXPECT_TRUE(fast.partitions.empty());
  PlanRequest slow_req = request(2, 0.01, true);
  Plan slow, dap;
  ASSERT_TRUE(make_plan(slow_req, &slow).ok());
  slow_req.split_auto = false;
  ASSERT_TRUE(make_plan(slow_req, &dap).ok());
  ASSERT_FALSE(slow.partitions.empty());
  EXPECT_LT(slow.time_ms, dap.time_ms);
  // Re-evaluating the chosen plan gives the same estimates.
  Plan again = slow;
  ASSERT_TRUE(evaluate_plan(slow_req.profile, &again).ok());
  EXPECT_NEAR(again.time_ms, slow.time_ms, 1e-6 * slow.time_ms);
  EXPECT_EQ(again.peak_bytes, slow.peak_bytes);
}

// An explicit all-dap list is estimated exactly as pure DAP.
TEST(PartitionPlan, AllDapListEstimatesAsPureDap) {
  PlanRequest q = request(2, 1, true);
  q.split_auto = false;
  Plan p;
  ASSERT_TRUE(make_plan(q, &p).ok());
  Plan listed = p;
  std::vector<LayerSplit> all;
  for (const LayerDesc& l : kEvoformerBlock) all.push_back({l.name, Split::kDap});
  listed.partitions = {all};
  ASSERT_TRUE(evaluate_plan(q.profile, &listed).ok());
  ASSERT_TRUE(evaluate_plan(q.profile, &p).ok());
  EXPECT_DOUBLE_EQ(listed.time_ms, p.time_ms);
  EXPECT_EQ(listed.peak_bytes, p.peak_bytes);
}

}  // namespace
}  // namespace fc
