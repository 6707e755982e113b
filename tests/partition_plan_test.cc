// The planner's per-layer partitions (src/plan/partition_cost.h): the search's time, its response
// to the link model, and the plan estimates of an explicit list (single process; the executor is
// tested over MPI in dap_partition_test.cc).
#include <gtest/gtest.h>

#include <chrono>
#include <string>

#include "exec/partition.h"
#include "foldcube/planner.h"
#include "model/block_table.h"
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

// Layouts carried across blocks (inference and training): an all-dap list enters at the block
// boundary (so pure DAP is unchanged); with a slow link the chosen plan re-evaluates to its
// estimate, and the carried per-block count sends fewer bytes (forward, and for training forward
// and backward) than returning every block to the boundary.
TEST(PartitionPlan, LayoutsCarryAcrossBlocks) {
  for (const BlockTable* t : {&kEvoformerBlock, &kExtraMsaBlock}) {
    const BlockLayouts e = partition_entry_layouts(*t, std::vector<Split>(t->count, Split::kDap));
    EXPECT_EQ(e.first, dap_boundary_m(*t));
    EXPECT_EQ(e.second, Shard::kPairRows);
  }
  for (bool training : {false, true}) {
    PlanRequest q = request(2, 0.01, training);
    Plan slow;
    ASSERT_TRUE(make_plan(q, &slow).ok());
    ASSERT_FALSE(slow.partitions.empty()) << training;
    Plan again = slow;
    ASSERT_TRUE(evaluate_plan(q.profile, &again).ok());
    EXPECT_NEAR(again.time_ms, slow.time_ms, 1e-6 * slow.time_ms) << training;
    std::vector<std::vector<Split>> lists;
    ASSERT_TRUE(resolve_partition(kEvoformerBlock, slow.partitions, 48, &lists).ok());
    int64_t carried = 0, boundary = 0;
    for (int b = 0; b < 48; ++b) {
      const PartitionEstimate c = estimate_partition_in_stack(slow, q.profile, lists, b);
      const PartitionEstimate o = estimate_partition(slow, q.profile, lists[b]);
      carried += c.sent_fwd_bytes + (training ? c.sent_bwd_bytes : 0);
      boundary += o.sent_fwd_bytes + (training ? o.sent_bwd_bytes : 0);
    }
    std::printf("[ info ] %s, slow link: %lld bytes carried vs %lld via the boundary\n",
                training ? "training" : "inference", static_cast<long long>(carried),
                static_cast<long long>(boundary));
    EXPECT_LT(carried, boundary) << training;
  }
}

// explain_splits (plan --explain-splits): the fastest list's terms add up to the difference of
// its plan's estimate to pure DAP's, and no single-layer row beats it. (With a fast link a list
// may now beat pure DAP: DAP's all-to-alls cost their CPU copies, which a whole-stream layer
// saves.)
TEST(PartitionPlan, ExplainedTermsAddUpToThePlanEstimate) {
  for (bool training : {false, true}) {
    PlanRequest q = request(2, 1000, training);
    q.profile.stream_gbps = 1000;  // and fast copies: the layout changes' CPU work too
    q.cfg.no_blocks = 4;
    q.split_auto = false;
    Plan p;
    ASSERT_TRUE(make_plan(q, &p).ok());
    const std::vector<SplitTerms> rows = explain_splits(q.profile, p);
    ASSERT_GT(rows.size(), 1u);
    const SplitTerms& best = rows.back();
    for (const SplitTerms& r : rows) EXPECT_GE(r.total_ms(), best.total_ms() - 1e-9);
    Plan listed = p;
    std::vector<LayerSplit> list;
    for (int i = 0; i < kEvoformerBlock.count; ++i)
      list.push_back({kEvoformerBlock.layers[i].name, best.splits[i]});
    listed.partitions = {list};
    ASSERT_TRUE(evaluate_plan(q.profile, &listed).ok());
    // (Plans carry layouts across blocks, the explanation counts each block from the boundary:
    // equal only when the list enters at the boundary.)
    if (partition_entry_layouts(kEvoformerBlock, best.splits) ==
        BlockLayouts(dap_boundary_m(kEvoformerBlock), Shard::kPairRows)) {
      EXPECT_NEAR(listed.time_ms - p.time_ms, best.total_ms(), 1e-6 * p.time_ms) << training;
    }
  }
}

// Plan p (pure DAP) with an explicit all-dap list of table t estimates exactly as p.
void expect_all_dap_list_as_pure_dap(const DeviceProfile& dev, Plan p, const BlockTable& t) {
  Plan listed = p;
  std::vector<LayerSplit> all;
  for (const LayerDesc& l : t) all.push_back({l.name, Split::kDap});
  listed.partitions = {all};
  ASSERT_TRUE(evaluate_plan(dev, &listed).ok());
  ASSERT_TRUE(evaluate_plan(dev, &p).ok());
  EXPECT_DOUBLE_EQ(listed.time_ms, p.time_ms);
  EXPECT_EQ(listed.peak_bytes, p.peak_bytes);
}

// An explicit all-dap list is estimated exactly as pure DAP.
TEST(PartitionPlan, AllDapListEstimatesAsPureDap) {
  PlanRequest q = request(2, 1, true);
  q.split_auto = false;
  Plan p;
  ASSERT_TRUE(make_plan(q, &p).ok());
  expect_all_dap_list_as_pure_dap(q.profile, p, kEvoformerBlock);
}

// A DAP shard's triangle products are [r_loc, r_loc] blocks over K = r: with the calibrated
// batched_by_rows table the inference forward charges them at the rate of M = r_loc (here 128:
// 60 against 90 GFLOP/s at r = 256), on both triangle multiplications and only there; pure DAP
// and an all-dap list agree; training and profiles without the table are unchanged.
TEST(PartitionPlan, DapShardTriMulProductsAtTheShardsRate) {
  PlanRequest q = request(2, 1, false);
  q.cfg.no_blocks = 2;
  q.split_auto = false;
  Plan flat;
  ASSERT_TRUE(make_plan(q, &flat).ok());
  q.profile.batched_by_rows = {{64, 40, 40}, {128, 60, 60}, {256, 90, 90}};
  Plan shard;
  ASSERT_TRUE(make_plan(q, &shard).ok());
  const double extra = 2.0 * 128 * 256 * 256 * q.cfg.c_hidden_mul * (1 / 60.0 - 1 / 90.0) * 1e-6;
  for (const LayerDesc& l : kEvoformerBlock) {
    const double e = dap_shard_extra_ms(l, q.cfg, 128, 256, 2, false, q.profile);
    EXPECT_DOUBLE_EQ(e, l.kind == LayerKind::kTriangleMultiplication ? extra : 0.0) << l.name;
    EXPECT_EQ(dap_shard_extra_ms(l, q.cfg, 128, 256, 2, true, q.profile), 0.0) << l.name;
    EXPECT_EQ(dap_shard_extra_ms(l, q.cfg, 128, 256, 1, false, q.profile), 0.0) << l.name;
  }
  EXPECT_NEAR(shard.forward_ms - flat.forward_ms, 2 * 2 * extra, 1e-6 * shard.forward_ms);
  expect_all_dap_list_as_pure_dap(q.profile, shard, kEvoformerBlock);
  DeviceProfile read;
  ASSERT_TRUE(DeviceProfile::from_json(q.profile.to_json(), &read).ok());
  EXPECT_EQ(read.batched_by_rows, q.profile.batched_by_rows);
}

// Per-block lists under a memory limit: with a slow link (whole-stream layers pay) and limits
// between pure DAP's peak and the unconstrained choice's, every plan fits its limit, is no slower
// than pure DAP under the same limit, and the estimate of its per-block lists is the search's;
// somewhere in that range the blocks get different lists.
TEST(PartitionPlan, PerBlockListsFitTheMemoryLimit) {
  PlanRequest q = request(2, 0.01, true);
  q.cfg.no_blocks = 8;
  Plan free_plan;
  ASSERT_TRUE(make_plan(q, &free_plan).ok());
  ASSERT_FALSE(free_plan.partitions.empty());
  q.split_auto = false;
  Plan dap;
  ASSERT_TRUE(make_plan(q, &dap).ok());
  int differing = 0;
  for (int k = 1; k <= 8; ++k) {
    PlanRequest lim = q;
    lim.memory_bytes = dap.peak_bytes + (free_plan.peak_bytes - dap.peak_bytes) * k / 8;
    Plan d, p;
    ASSERT_TRUE(make_plan(lim, &d).ok());
    lim.split_auto = true;
    ASSERT_TRUE(make_plan(lim, &p).ok());
    EXPECT_LE(p.peak_bytes, lim.memory_bytes) << k;
    EXPECT_LE(p.time_ms, d.time_ms + 1e-9) << k;
    Plan again = p;
    ASSERT_TRUE(evaluate_plan(lim.profile, &again).ok());
    EXPECT_NEAR(again.time_ms, p.time_ms, 1e-6 * p.time_ms) << k;
    bool differ = false;
    for (const auto& list : p.partitions) differ = differ || list != p.partitions[0];
    differing += differ;
    std::printf("[ info ] limit %d/8: %zu lists, %s, %.1f ms vs dap %.1f ms\n", k,
                p.partitions.size(), differ ? "differing" : "all equal", p.time_ms, d.time_ms);
  }
  EXPECT_GT(differing, 0);
}

// The ExtraMSA stack (AF2: c_e = 64, 8 heads of 8, 4 blocks, s = 1024 extra sequences): the
// search evaluates its block table's splits; an all-dap list estimates as pure DAP; a slow link
// makes whole-stream layers pay as for the Evoformer, and the lists resolve against its table.
TEST(PartitionPlan, ExtraMsaStackIsSearched) {
  auto extra = [](double link_gbps) {
    PlanRequest q = request(2, link_gbps, true);
    q.extra_msa = true;
    q.cfg.c_m = 64, q.cfg.c_hidden_msa_att = 8, q.cfg.no_blocks = 4;
    q.s = 1024;
    return q;
  };
  PlanRequest q = extra(0.01);
  Plan slow, dap;
  ASSERT_TRUE(make_plan(q, &slow).ok());
  q.split_auto = false;
  ASSERT_TRUE(make_plan(q, &dap).ok());
  ASSERT_FALSE(slow.partitions.empty());
  EXPECT_LT(slow.time_ms, dap.time_ms);
  std::vector<std::vector<Split>> splits;
  EXPECT_TRUE(resolve_partition(kExtraMsaBlock, slow.partitions, 4, &splits).ok());
  expect_all_dap_list_as_pure_dap(q.profile, dap, kExtraMsaBlock);
}

// Channel-parallel triangle multiplication and OPM: on N ranks their compute is below the whole
// layer's (the products, LN_out, linear_z; the outer product and linear_out shrink) and above
// 1/N of it (LN_in, the gate, b's projection stay whole); the triangle multiplication adds its
// LayerNorm statistics (two all-reduces of r^2 floats) to the sum of the partial updates.
TEST(PartitionPlan, ChannelSplitsOfTriMulAndOpmAreCosted) {
  PlanRequest q = request(4, 1, false);
  q.split_auto = false;
  Plan p;
  ASSERT_TRUE(make_plan(q, &p).ok());
  const BlockTable& t = kEvoformerBlock;
  for (const char* name : {"tri_mul_out", "outer_product_mean"}) {
    const int i = static_cast<int>(find_layer(t, name) - t.layers);
    std::vector<Split> rep(t.count, Split::kDap), ch(t.count, Split::kDap);
    rep[i] = Split::kReplicated, ch[i] = Split::kChannels;
    const PartitionEstimate a = estimate_partition(p, q.profile, rep);
    const PartitionEstimate b = estimate_partition(p, q.profile, ch);
    std::vector<Split> dap(t.count, Split::kDap);
    const PartitionEstimate d = estimate_partition(p, q.profile, dap);
    // a - d = W (1 - 1/N) for the whole layer's W, b - d = C - W/N (>= 0; the OPM's C = W/N)
    // + the partial-sum passes (copy_fwd_ms).
    EXPECT_LT(b.fwd_ms, a.fwd_ms) << name;
    EXPECT_GE(b.fwd_ms, d.fwd_ms) << name;
    EXPECT_GT(b.fwd_ms + b.copy_fwd_ms, d.fwd_ms + d.copy_fwd_ms) << name;
    const int64_t wz = int64_t{256} * 256 * 128, rr = int64_t{256} * 256, n = 4;
    const int64_t stats = std::string(name) == "tri_mul_out" ? 2 * (2 * (n - 1) * rr / n) : 0;
    // replicated: the all-gather of z (and m for the OPM); channels: that plus the partial sums,
    // a reduce-scatter into the next layer's shard of z ((n-1)/n of z).
    EXPECT_EQ(b.sent_fwd_bytes - a.sent_fwd_bytes, ((n - 1) * (wz / n) + stats) * 4) << name;
  }
}

// A channel-parallel triangle multiplication runs its training forward in inference too (the form
// with LN_out's channel sums): its inference compute on a rank is that form's forward at c_t / N
// channels (not the inference form's), plus the statistics' two reads of its products.
TEST(PartitionPlan, ChannelTriMulInInferenceIsCostedAsTheTrainingForwardItRuns) {
  for (int n : {2, 4}) {
    PlanRequest q = request(n, 1, false);
    q.split_auto = false;
    q.profile.stream_gbps = 20;
    Plan p;
    ASSERT_TRUE(make_plan(q, &p).ok());
    const BlockTable& t = kEvoformerBlock;
    const int i = static_cast<int>(find_layer(t, "tri_mul_out") - t.layers);
    std::vector<Split> ch(t.count, Split::kDap);
    ch[i] = Split::kChannels;
    EvoformerConfig c = p.cfg;
    c.c_hidden_mul = (c.c_hidden_mul + n - 1) / n;
    DeviceProfile d = q.profile;
    d.dtype = p.dtype;
    d.element_bytes = p.element_bytes;
    d.train_fwd_factor = 1;  // the form keeps no state: the factor does not apply
    q.profile.train_fwd_factor = 1.3;
    const PartitionEstimate b = estimate_partition(p, q.profile, ch);
    const double train =
        block_module_costs(c, p.s, p.r, p.chunk, p.chunk_target_bytes, true, d)[i].forward_ms;
    const double stats_ms = 2.0 * c.c_hidden_mul * p.r * p.r * 4 / (20 * 1e9) * 1e3;
    EXPECT_NEAR(b.layers[i].fwd_ms, train + stats_ms, 1e-9 * train) << n;
    const double infer =
        block_module_costs(c, p.s, p.r, p.chunk, p.chunk_target_bytes, false, d)[i].forward_ms;
    EXPECT_NE(train, infer) << n;
  }
}

}  // namespace
}  // namespace fc
