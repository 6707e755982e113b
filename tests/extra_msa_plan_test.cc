// Plans of the ExtraMSA stack (issue 16): inference and training plans, DAP and DP degrees, and the
// golden extra_tiny case run under the planned choices (policies, chunk targets), outputs and
// gradients within the golden tolerances, activations and step peak as the plan says.
#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "foldcube/extra_msa.h"
#include "foldcube/io.h"
#include "foldcube/plan.h"
#include "foldcube/planner.h"
#include "foldcube/runtime.h"
#include "plan/memory_model.h"
#include "test_util.h"

namespace fc {
namespace {

// A fixed profile (no calibration in unit tests), this process's thread count.
DeviceProfile fixed_profile(int devices = 1) {
  DeviceProfile p;
  p.name = "test";
  p.devices = devices;
  p.threads = num_threads();
  p.gemm_gflops = 400;
  p.gemm_half_rows = 300;
  p.gemm_bwd_gflops = 300;
  p.batched_gflops = 250;
  p.attention_gflops = 250;
  p.attention_bwd_gflops = 150;
  p.attention_len_exp = 0.2;
  p.mem_gbps = 15;
  p.link_gbps = 10;
  p.link_latency_us = 20;
  return p;
}

EvoformerConfig af2_extra_cfg(int64_t blocks) {  // AF2's extra-MSA stack: c_e = 64, 8 heads of 8
  EvoformerConfig cfg;
  cfg.c_m = 64;
  cfg.c_hidden_msa_att = 8;
  cfg.no_blocks = blocks;
  return cfg;
}

PlanRequest request(const EvoformerConfig& cfg, int64_t s, int64_t r, bool training, int64_t limit,
                    int devices = 1) {
  PlanRequest q;
  q.cfg = cfg;
  q.s = s;
  q.r = r;
  q.training = training;
  q.extra_msa = true;
  q.profile = fixed_profile(devices);
  q.memory_bytes = limit;
  return q;
}

// The smallest feasible budget the planner names when nothing fits.
int64_t smallest_budget(PlanRequest q) {
  q.memory_bytes = 1;
  Plan p;
  const Status st = make_plan(q, &p);
  EXPECT_EQ(st.code(), Status::Code::kOutOfMemory) << st.message();
  const std::string key = "smallest feasible budget is ";
  const size_t at = st.message().find(key);
  EXPECT_NE(at, std::string::npos) << st.message();
  if (at == std::string::npos) return 0;
  return static_cast<int64_t>((std::stod(st.message().substr(at + key.size())) + 0.05) * 1048576);
}

// Inference and training plans, the DAP and DP degrees of a 2-device request, their JSON round
// trip, and DAP's smaller per-rank activations.
TEST(ExtraMsaPlan, InferenceTrainingDapAndDp) {
  const EvoformerConfig cfg = af2_extra_cfg(4);
  const int64_t s = 1024, r = 128;
  Plan inf;
  ASSERT_TRUE(make_plan(request(cfg, s, r, false, int64_t{8} << 30), &inf).ok());
  EXPECT_TRUE(inf.extra_msa);
  EXPECT_FALSE(inf.training);
  EXPECT_GT(inf.time_ms, 0);
  // The forward's peak: weights, inputs, masks and the ExtraMSA table's largest workspace.
  const int64_t fwd = extra_msa_forward_peak_bytes(cfg, s, r, true, inf.chunk,
                                                   inf.chunk_target_bytes, num_threads());
  EXPECT_GT(inf.peak_bytes, fwd);
  // Tighter budgets chunk finer, and the plan still fits.
  Plan tight;
  const int64_t lo = smallest_budget(request(cfg, s, r, false, 0));
  ASSERT_GT(lo, 0);
  ASSERT_TRUE(make_plan(request(cfg, s, r, false, lo + (1 << 20)), &tight).ok());
  EXPECT_LE(tight.peak_bytes, lo + (1 << 20));
  EXPECT_LT(tight.peak_bytes, inf.peak_bytes);

  PlanRequest two = request(cfg, s, r, true, int64_t{16} << 30, 2);
  Plan one;
  ASSERT_TRUE(make_plan(request(cfg, s, r, true, int64_t{16} << 30), &one).ok());
  for (auto [dap, dp] : {std::pair{2, 1}, std::pair{1, 2}}) {
    SCOPED_TRACE("dap " + std::to_string(dap) + " dp " + std::to_string(dp));
    two.dap = dap;
    two.dp = dp;
    Plan p;
    const Status st = make_plan(two, &p);
    ASSERT_TRUE(st.ok()) << st.message();
    EXPECT_EQ(p.dap, dap);
    EXPECT_EQ(p.dp, dp);
    EXPECT_TRUE(p.extra_msa);
    Plan back;
    ASSERT_TRUE(Plan::from_json(p.to_json(), &back).ok());
    EXPECT_TRUE(back.extra_msa);
    EXPECT_EQ(back.dap, dap);
    if (dap == 2) {
      EXPECT_GT(p.comm_ms, 0);
      EXPECT_LT(p.time_ms, one.time_ms);
    }
  }
  // DAP activations per rank at the same policies and target: about half of one process's.
  Plan d = one;
  d.dap = 2;
  ASSERT_TRUE(evaluate_plan(fixed_profile(2), &d).ok());
  EXPECT_LT(static_cast<double>(d.activation_bytes), 0.55 * one.activation_bytes);
  // An inference DAP plan (the executor's default target per rank).
  PlanRequest inf2 = request(cfg, s, r, false, int64_t{8} << 30, 2);
  inf2.dap = 2;
  Plan pi;
  ASSERT_TRUE(make_plan(inf2, &pi).ok());
  EXPECT_EQ(pi.dap, 2);
  EXPECT_LT(pi.peak_bytes, inf.peak_bytes);
}

struct Golden {
  TensorFile f;
  EvoformerConfig cfg;
  Tensor m, z, msa_mask, pair_mask, probe_m, probe_z;
};

void load_golden(Golden* g) {
  ASSERT_TRUE(read_safetensors(test::data_path("extra_tiny.safetensors"), &g->f).ok());
  ASSERT_TRUE(EvoformerConfig::from_metadata(g->f.metadata, &g->cfg).ok());
  for (auto [name, t] :
       std::vector<std::pair<const char*, Tensor*>>{{"input.m", &g->m},
                                                    {"input.z", &g->z},
                                                    {"input.msa_mask", &g->msa_mask},
                                                    {"input.pair_mask", &g->pair_mask},
                                                    {"probe.m", &g->probe_m},
                                                    {"probe.z", &g->probe_z}})
    ASSERT_TRUE(g->f.get_f32(name, {}, t).ok()) << name;
}

// The golden extra_tiny step under the plans the planner makes at budgets from the smallest
// feasible one to a roomy one: outputs, dL/d inputs and every parameter gradient within the
// golden tolerances; the step's activations and peak (above the live bytes before it) are the
// plan's memory model's.
TEST(ExtraMsaPlan, GoldenUnderPlannedTrainingAndInference) {
  Golden g;
  ASSERT_NO_FATAL_FAILURE(load_golden(&g));
  ExtraMsaStack stack;
  ASSERT_TRUE(ExtraMsaStack::load(g.cfg, g.f, &stack).ok());
  const int64_t s = g.m.shape()[0], r = g.m.shape()[1];
  for (bool training : {true, false}) {
    const int64_t lo = smallest_budget(request(g.cfg, s, r, training, 0));
    ASSERT_GT(lo, 0);
    std::vector<Recompute> seen;
    for (int64_t limit : {lo + (16 << 10), lo + (lo >> 2), lo * 4}) {
      SCOPED_TRACE((training ? "training, budget " : "inference, budget ") + std::to_string(limit));
      Plan p;
      const Status st = make_plan(request(g.cfg, s, r, training, limit), &p);
      ASSERT_TRUE(st.ok()) << st.message();
      EXPECT_LE(p.peak_bytes, limit);
      Tensor m = g.m.clone(), z = g.z.clone();
      if (!training) {
        ASSERT_TRUE(stack.forward(m, z, g.msa_mask, g.pair_mask, to_forward_options(p)).ok());
        EXPECT_LT(test::golden_err(m, g.f.tensors.at("output.m")), 1e-4);
        EXPECT_LT(test::golden_err(z, g.f.tensors.at("output.z")), 1e-4);
        continue;
      }
      TrainResult res;
      const Status ts = stack.train_step(m, z, g.msa_mask, g.pair_mask, g.probe_m, g.probe_z,
                                         to_train_options(p), &res);
      ASSERT_TRUE(ts.ok()) << ts.ToString();
      EXPECT_EQ(res.activation_bytes, p.activation_bytes);
      EXPECT_EQ(res.peak_bytes,
                stack_step_peak_bytes(g.cfg, s, r, g.cfg.no_blocks, p.policy, num_threads(), 4,
                                      p.chunk, p.chunk_target_bytes, true));
      EXPECT_LT(test::golden_err(m, g.f.tensors.at("output.m")), 1e-4);
      EXPECT_LT(test::golden_err(z, g.f.tensors.at("output.z")), 1e-4);
      EXPECT_LT(test::golden_err(res.grad_m, g.f.tensors.at("grad.input.m")), 2e-4);
      EXPECT_LT(test::golden_err(res.grad_z, g.f.tensors.at("grad.input.z")), 2e-4);
      for (const auto& [name, t] : res.grad_params)
        EXPECT_LT(test::golden_err(t, g.f.tensors.at("grad.param." + name)), 2e-4) << name;
      seen.insert(seen.end(), p.policy.begin(), p.policy.end());
    }
    if (training) {  // the tightest budget needs recompute
      EXPECT_NE(std::count(seen.begin(), seen.end(), Recompute::kNone),
                static_cast<long>(seen.size()));
    }
  }
}

}  // namespace
}  // namespace fc
