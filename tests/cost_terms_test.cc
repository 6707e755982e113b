// Cost-model terms of issues 20 and 16: the attentions' per-score work (a fused kernel's score
// rate, an unfused attention's passes over the scores), the tied fit scales `compute` and
// `memory`, the fit table's threads and stack columns, and fits whose rows run at several thread
// counts (each with its own calibrated start profile).
#include <gtest/gtest.h>

#include <string>

#include "foldcube/planner.h"
#include "plan/profile_fit.h"

namespace fc {
namespace {

DeviceProfile peak_profile(double gflops, double gbps, int threads) {
  DeviceProfile p;
  const std::string j = R"({"name": "terms", "devices": 4, "dtype": "fp32", "threads": )" +
                        std::to_string(threads) + R"(, "peak_gflops": )" + std::to_string(gflops) +
                        R"(, "peak_mem_gbps": )" + std::to_string(gbps) +
                        R"(, "link_gbps": 20, "link_latency_us": 5, "memory_gb": 1000})";
  EXPECT_TRUE(DeviceProfile::from_json(j, &p).ok());
  return p;
}

const ModuleCost& module(const std::vector<ModuleCost>& c, const std::string& name) {
  for (const ModuleCost& m : c)
    if (m.name == name) return m;
  ADD_FAILURE() << "no module " << name;
  return c.front();
}

// An unfused attention moves passes x B*H*L*L scores through memory: exactly that time more, in
// the forward and (with its own count) the backward, at the profile's bandwidths.
TEST(CostTerms, UnfusedAttentionChargesItsScorePasses) {
  EvoformerConfig cfg;
  const int64_t s = 8, r = 16;
  const DeviceProfile fused = peak_profile(1000, 100, 1);
  DeviceProfile unfused = fused;
  unfused.attention_score_passes = 8;
  unfused.attention_bwd_score_passes = 6;
  const auto a = block_module_costs(cfg, s, r, 0, 0, true, fused);
  const auto b = block_module_costs(cfg, s, r, 0, 0, true, unfused);
  const double scores = static_cast<double>(s) * cfg.no_heads_msa * r * r;  // row attention
  const double fwd_ms = 8 * scores * 4 / (fused.mem_gbps * 1e9) * 1e3;
  const double bwd_ms = 6 * scores * 4 / (fused.mem_bwd_gbps * 1e9) * 1e3;
  EXPECT_NEAR(module(b, "msa_att_row").forward_ms - module(a, "msa_att_row").forward_ms, fwd_ms,
              1e-9);
  EXPECT_NEAR(module(b, "msa_att_row").backward_ms - module(a, "msa_att_row").backward_ms, bwd_ms,
              1e-9);
  // Policy module rebuilds the attention: its score passes too.
  EXPECT_NEAR(module(b, "msa_att_row").rebuild_ms - module(a, "msa_att_row").rebuild_ms, fwd_ms,
              1e-9);
  EXPECT_DOUBLE_EQ(module(b, "msa_transition").forward_ms, module(a, "msa_transition").forward_ms);
}

// The bias add of an unfused attention with a pair bias is its own pass over the scores
// (attention_bias_score_passes): charged on the biased attentions only (the row and triangle
// attentions), not on the column attention.
TEST(CostTerms, BiasAddPassesChargeTheBiasedAttentionsOnly) {
  EvoformerConfig cfg;
  const int64_t s = 8, r = 16;
  DeviceProfile base = peak_profile(1000, 100, 1);
  base.attention_score_passes = 6;
  base.attention_bwd_score_passes = 9;
  DeviceProfile biased = base;
  biased.attention_bias_score_passes = 2;
  biased.attention_bias_bwd_score_passes = 1;
  const auto a = block_module_costs(cfg, s, r, 0, 0, true, base);
  const auto b = block_module_costs(cfg, s, r, 0, 0, true, biased);
  const double row = static_cast<double>(s) * cfg.no_heads_msa * r * r;
  const double tri = static_cast<double>(r) * cfg.no_heads_pair * r * r;
  for (const auto& [name, scores] : {std::pair<std::string, double>{"msa_att_row", row},
                                     {"tri_att_start", tri},
                                     {"tri_att_end", tri}}) {
    EXPECT_NEAR(module(b, name).forward_ms - module(a, name).forward_ms,
                2 * scores * 4 / (base.mem_gbps * 1e9) * 1e3, 1e-9)
        << name;
    EXPECT_NEAR(module(b, name).backward_ms - module(a, name).backward_ms,
                1 * scores * 4 / (base.mem_bwd_gbps * 1e9) * 1e3, 1e-9)
        << name;
  }
  EXPECT_DOUBLE_EQ(module(b, "msa_att_col").forward_ms, module(a, "msa_att_col").forward_ms);
  EXPECT_DOUBLE_EQ(module(b, "msa_att_col").backward_ms, module(a, "msa_att_col").backward_ms);
  DeviceProfile back;
  ASSERT_TRUE(DeviceProfile::from_json(biased.to_json(), &back).ok());
  EXPECT_EQ(back.attention_bias_score_passes, 2);
  EXPECT_EQ(back.attention_bias_bwd_score_passes, 1);
  biased.attention_bias_bwd_score_passes = -1;
  EXPECT_FALSE(biased.validate().ok());
}

// The global column attention runs H queries of one head over s keys per residue column:
// r * H * s scores, each at the fused kernel's per-score rate.
TEST(CostTerms, GlobalAttentionHasHQueriesOverSKeys) {
  EvoformerConfig cfg;
  cfg.c_m = 64;
  cfg.c_hidden_msa_att = 8;
  const int64_t s = 64, r = 16;
  const DeviceProfile base = peak_profile(1000, 100, 1);
  DeviceProfile scored = base;
  scored.attention_score_gps = 2;  // 2e9 scores/s
  scored.attention_bwd_score_gps = 1;
  const auto a = block_module_costs(cfg, s, r, 0, 0, true, base, true);
  const auto b = block_module_costs(cfg, s, r, 0, 0, true, scored, true);
  const double scores = static_cast<double>(r) * cfg.no_heads_msa * s;
  EXPECT_NEAR(module(b, "msa_att_col").forward_ms - module(a, "msa_att_col").forward_ms,
              scores / 2e9 * 1e3, 1e-9);
  EXPECT_NEAR(module(b, "msa_att_col").backward_ms - module(a, "msa_att_col").backward_ms,
              scores / 1e9 * 1e3, 1e-9);
}

// `compute` is every FLOP scale at once and `memory` every bandwidth scale, forward and
// backward: the same profile as the per-class scales with one value.
TEST(CostTerms, TiedScalesEqualTheClassScalesTogether) {
  DeviceProfile start = peak_profile(1000, 100, 1);
  start.attention_score_gps = 3, start.attention_bwd_score_gps = 2;
  DeviceProfile tied, each;
  ASSERT_TRUE(apply_fit_parameters(start, {{"compute", 0, 1.7}, {"memory", 0, 0.6}}, &tied).ok());
  std::vector<FitParameter> per;
  for (const char* k : {"gemm", "gemm_bwd", "batched", "attention", "attention_bwd"})
    per.push_back({k, 0, 1.7});
  per.push_back({"mem", 0, 0.6});
  per.push_back({"mem_bwd", 0, 0.6});
  ASSERT_TRUE(apply_fit_parameters(start, per, &each).ok());
  each.attention_score_gps *= 1.7, each.attention_bwd_score_gps *= 1.7;
  EXPECT_EQ(tied.to_json(), each.to_json());
}

TEST(CostTerms, FitTableReadsThreadsAndStackColumns) {
  std::vector<FitRow> rows;
  Status st = parse_fit_table(
      "s,r,blocks,train,policy,devices,dap,dtype,time_ms,peak_mb,activation_mb,threads,stack\n"
      "1024,256,4,1,,1,1,fp16,2306,3236,1166,,extra_msa\n"
      "32,64,2,1,none,1,1,fp32,900,,,2,evoformer\n"
      "32,64,2,1,none,1,1,fp32,900,,,,\n",
      "t.csv", &rows);
  ASSERT_TRUE(st.ok()) << st.message();
  ASSERT_EQ(rows.size(), 3u);
  EXPECT_TRUE(rows[0].extra_msa);
  EXPECT_EQ(rows[0].threads, 0);
  EXPECT_FALSE(rows[1].extra_msa);
  EXPECT_EQ(rows[1].threads, 2);
  EXPECT_EQ(rows[2].threads, 0);
  // threads alone (12 columns) is a header too.
  st = parse_fit_table(
      "s,r,blocks,train,policy,devices,dap,dtype,time_ms,peak_mb,activation_mb,threads\n"
      "32,64,2,1,none,1,1,fp32,900,,,1\n",
      "t.csv", &rows);
  ASSERT_TRUE(st.ok()) << st.message();
  EXPECT_EQ(rows[0].threads, 1);
  st = parse_fit_table(
      "s,r,blocks,train,policy,devices,dap,dtype,time_ms,peak_mb,activation_mb,threads,stack\n"
      "32,64,2,1,none,1,1,fp32,900,,,1,pairformer\n",
      "bad.csv", &rows);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.message().find("bad.csv:2: column stack: 'pairformer'"), std::string::npos)
      << st.message();
  st = parse_fit_table(
      "s,r,blocks,train,policy,devices,dap,dtype,time_ms,peak_mb,activation_mb,threads,stack\n"
      "32,64,2,1,none,1,1,fp32,900,,,0,\n",
      "bad.csv", &rows);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.message().find("column threads: '0' is out of range"), std::string::npos)
      << st.message();
}

// A policy mix (the seeds' Autodist rows): the blocks' policies in the order given, every block
// counted; a mix that does not count the blocks, or without a DAP degree, is refused.
TEST(CostTerms, FitTableReadsPolicyMixes) {
  const std::string h = "s,r,blocks,train,policy,devices,dap,dtype,time_ms,peak_mb,activation_mb\n";
  std::vector<FitRow> rows;
  ASSERT_TRUE(
      parse_fit_table(h + "128,256,48,1,none:37+block:11,2,2,fp16,1915.13,36554,\n", "t.csv", &rows)
          .ok());
  ASSERT_EQ(rows[0].policy_counts.size(), 2u);
  EXPECT_FALSE(rows[0].policy.has_value());
  Plan p;
  ASSERT_TRUE(resolve_row_plan(EvoformerConfig{}, peak_profile(1000, 100, 1), rows[0], &p).ok());
  ASSERT_EQ(p.policy.size(), 48u);
  EXPECT_EQ(p.policy[36], Recompute::kNone);
  EXPECT_EQ(p.policy[37], Recompute::kBlock);
  EXPECT_EQ(p.dap, 2);
  for (const char* bad :
       {"128,256,48,1,none:37+block:10,2,2,fp16,,,\n", "128,256,48,1,none:48,2,,fp16,,,\n",
        "128,256,48,1,none:x,2,2,,,,\n", "128,256,48,1,tiny:48,2,2,,,,\n"}) {
    const Status st = parse_fit_table(h + bad, "bad.csv", &rows);
    ASSERT_FALSE(st.ok()) << bad;
    EXPECT_NE(st.message().find("bad.csv:2: column"), std::string::npos) << st.message();
  }
}

// Rows at 1 and 2 threads from two calibrations with the same fitted corrections: a fit on the
// 1-thread rows, given the 2-thread start profile, predicts the 2-thread rows exactly; a row at a
// thread count no profile has is an error naming it.
TEST(CostTerms, FitAppliesItsScalesToEveryThreadCount) {
  const EvoformerConfig cfg;
  const DeviceProfile one = peak_profile(1000, 100, 1), two = peak_profile(1800, 150, 2);
  const std::vector<FitParameter> truth_params = {
      {"compute", 0, 0.7}, {"memory", 0, 1.3}, {"module_overhead_us", 0, 40}};
  DeviceProfile t1, t2;
  ASSERT_TRUE(apply_fit_parameters(one, truth_params, &t1).ok());
  ASSERT_TRUE(apply_fit_parameters(two, truth_params, &t2).ok());
  std::vector<FitRow> fit_rows, held;
  int line = 2;
  for (int threads : {1, 2})
    for (const auto& [s, r, pol] :
         {std::tuple{16, 32, Recompute::kNone}, std::tuple{32, 64, Recompute::kModule},
          std::tuple{8, 96, Recompute::kBlock}}) {
      FitRow w;
      w.line = line++;
      w.s = s, w.r = r, w.blocks = 2, w.train = true, w.policy = pol, w.devices = 1, w.dap = 1;
      w.threads = threads;
      const DeviceProfile& t = threads == 1 ? t1 : t2;
      Plan p;
      ASSERT_TRUE(resolve_row_plan(cfg, t, w, &p).ok());
      RowPrediction pr;
      ASSERT_TRUE(predict_row(t, w, p, &pr).ok());
      w.time_ms = pr.time_ms;
      (threads == 1 ? fit_rows : held).push_back(w);
    }
  FitOptions o;
  o.params = {"compute", "memory", "module_overhead_us"};
  o.thread_profiles = {two};
  FitResult r;
  ASSERT_TRUE(fit_profile(cfg, one, fit_rows, o, &r).ok());
  ASSERT_EQ(r.thread_profiles.size(), 1u);
  for (const FitRow& w : held) {
    DeviceProfile d;
    ASSERT_TRUE(row_profile(r.profile, r.thread_profiles, w, &d).ok());
    EXPECT_EQ(d.threads, 2);
    Plan p;
    ASSERT_TRUE(resolve_row_plan(cfg, d, w, &p).ok());
    RowPrediction pr;
    ASSERT_TRUE(predict_row(d, w, p, &pr).ok());
    EXPECT_NEAR(pr.time_ms / *w.time_ms, 1.0, 1e-6) << "line " << w.line;
  }
  FitRow four = held[0];
  four.threads = 4;
  DeviceProfile d;
  const Status st = row_profile(r.profile, r.thread_profiles, four, &d);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.message().find("no profile for 4 threads"), std::string::npos) << st.message();
}

}  // namespace
}  // namespace fc
