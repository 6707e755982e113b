// The whole-model memory model (alphafold_forward_memory) against the tracked allocator, stage by
// stage, and the budget plan (plan_alphafold) against a measured forward.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "exec/af2_dap.h"
#include "foldcube/alphafold.h"
#include "foldcube/io.h"
#include "foldcube/memory.h"
#include "foldcube/runtime.h"
#include "model/af2/alphafold_impl.h"
#include "test_util.h"

namespace fc {
namespace {

// A small AlphaFold config (AF2 structure-module and head widths) so the forward is fast.
AlphaFoldConfig small_config(bool templates) {
  AlphaFoldConfig c = alphafold_model_1_ptm();
  c.evoformer.c_m = 32;
  c.evoformer.c_z = 16;
  c.evoformer.c_s = 48;
  c.evoformer.no_blocks = 2;
  c.extra_msa.c_m = 8;
  c.extra_msa.c_z = 16;
  c.extra_msa.no_blocks = 1;
  c.template_pair.c_z = 8;
  c.template_pair.no_blocks = 1;
  c.templates = templates;
  c.structure_layers = 2;
  return c;
}

struct MemCase {
  std::string name;
  int64_t r, S, E, T;
  int passes;
  bool templates;
  int64_t chunk;
  int64_t pair_block_bytes = 0;
  int64_t pad_to = 0;  // size bucket
  DType dtype = DType::F32;
};

// Failure messages print the case by name (gtest would print the raw struct bytes).
void PrintTo(const MemCase& c, std::ostream* os) { *os << c.name; }

class Af2Memory : public ::testing::TestWithParam<MemCase> {};

TEST_P(Af2Memory, EveryStageEqualsTheAllocator) {
  const MemCase& p = GetParam();
  AlphaFoldConfig cfg = small_config(p.templates);
  AlphaFold model;
  ASSERT_TRUE(AlphaFold::load(cfg, AlphaFold::random_weights(cfg, 5), &model).ok());
  const FeatureDict feats = random_alphafold_features(p.r, p.S, p.E, p.T, p.passes, 9);
  AlphaFoldDims dims;
  ASSERT_TRUE(alphafold_dims(cfg, feats, &dims).ok());
  AlphaFoldMemory mem;
  AlphaFoldOptions opts;
  opts.chunk = p.chunk;
  opts.pair_block_bytes = p.pair_block_bytes;
  opts.pad_to = p.pad_to;
  opts.dtype = p.dtype;
  if (p.pad_to > p.r) {
    dims.r_features = dims.r;
    dims.r = p.pad_to;
  }
  ASSERT_TRUE(alphafold_forward_memory(cfg, dims, opts, num_threads(), &mem).ok());

  std::vector<AlphaFoldStageStat> stats;
  opts.stats = &stats;
  std::map<std::string, Tensor> out;
  const int64_t live0 = mem_stats().live_bytes;
  int64_t peak = 0;
  {
    MemoryScope scope;
    ASSERT_TRUE(model.forward(feats, &out, opts).ok());
    peak = scope.peak() - live0;
  }
  ASSERT_EQ(stats.size(), mem.stages.size());
  if (p.pad_to > p.r) {
    // Padded: the stages run on the padded copy of the features, which the model counts; the
    // whole peak is an upper bound within the cropped outputs' bytes.
    EXPECT_GE(mem.peak_bytes, peak);
    EXPECT_LE(mem.peak_bytes, peak + peak / 10);
    return;
  }
  for (size_t i = 0; i < stats.size(); ++i) {
    SCOPED_TRACE("pass " + std::to_string(stats[i].pass) + " " + stats[i].stage);
    EXPECT_EQ(mem.stages[i].stage, stats[i].stage);
    EXPECT_EQ(mem.stages[i].entry_bytes, stats[i].entry_bytes);
    EXPECT_EQ(mem.stages[i].peak_bytes, stats[i].peak_bytes);
  }
  EXPECT_EQ(mem.peak_bytes, peak);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, Af2Memory,
    ::testing::Values(
        MemCase{"r24_templates_one_pass", 24, 6, 10, 2, 1, true, 0},
        MemCase{"r24_templates_three_passes", 24, 6, 10, 2, 3, true, 0},
        MemCase{"r40_no_templates_two_passes", 40, 5, 12, 0, 2, false, 0},
        MemCase{"r40_templates_chunk3", 40, 5, 12, 3, 2, true, 3},
        MemCase{"r70_pair_rows_in_blocks_of_3", 70, 4, 16, 1, 2, true, 0, 3 * 70 * 16 * 4},
        MemCase{"r30_padded_to_bucket_48", 30, 5, 12, 2, 2, true, 0, 0, 48},
        MemCase{"r40_templates_bf16", 40, 5, 12, 2, 2, true, 0, 0, 0, DType::BF16},
        MemCase{"r40_templates_chunk3_bf16", 40, 5, 12, 3, 1, true, 3, 0, 0, DType::BF16}),
    [](const ::testing::TestParamInfo<MemCase>& i) { return i.param.name; });

// A budget between the finest and the default chunking's peak: the plan fits it, the measured
// peak equals the plan's prediction, and results equal the unchunked run's within fp32 noise; a
// budget below the finest chunking is refused naming the smallest feasible budget.
TEST(Af2MemoryPlan, BudgetIsKeptAndTooSmallIsRefused) {
  AlphaFoldConfig cfg = small_config(true);
  AlphaFold model;
  ASSERT_TRUE(AlphaFold::load(cfg, AlphaFold::random_weights(cfg, 5), &model).ok());
  const FeatureDict feats = random_alphafold_features(64, 16, 64, 2, 1, 9);
  AlphaFoldDims dims;
  ASSERT_TRUE(alphafold_dims(cfg, feats, &dims).ok());
  AlphaFoldMemory fine, coarse;
  AlphaFoldOptions finest;
  finest.chunk_target_bytes = finest.pair_block_bytes = 1;
  ASSERT_TRUE(alphafold_forward_memory(cfg, dims, finest, num_threads(), &fine).ok());
  ASSERT_TRUE(alphafold_forward_memory(cfg, dims, {}, num_threads(), &coarse).ok());
  ASSERT_LT(fine.peak_bytes, coarse.peak_bytes);
  const int64_t base = 1000;
  const int64_t budget = base + (fine.peak_bytes + coarse.peak_bytes) / 2;
  AlphaFoldPlan plan;
  Status st = plan_alphafold(cfg, dims, base, budget, num_threads(), &plan);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_LE(plan.predicted_peak_bytes, budget);
  EXPECT_GT(plan.chunk_target_bytes, 0);

  std::map<std::string, Tensor> ref, got;
  ASSERT_TRUE(model.forward(feats, &ref).ok());
  AlphaFoldOptions opts;
  opts.chunk_target_bytes = plan.chunk_target_bytes;
  opts.pair_block_bytes = plan.pair_block_bytes;
  const int64_t live0 = mem_stats().live_bytes;
  int64_t peak = 0;
  {
    MemoryScope scope;
    ASSERT_TRUE(model.forward(feats, &got, opts).ok());
    peak = scope.peak() - live0;
  }
  EXPECT_EQ(base + peak, plan.predicted_peak_bytes);
  EXPECT_LT(test::golden_err(got.at("final_atom_positions"), ref.at("final_atom_positions")), 1e-4);

  st = plan_alphafold(cfg, dims, base, base + fine.peak_bytes - 1, num_threads(), &plan);
  EXPECT_EQ(st.code(), Status::Code::kOutOfMemory);
  EXPECT_NE(st.message().find("smallest feasible budget"), std::string::npos) << st.ToString();
}

// A template pair block holds its pair modules only (allocate_pair_layers): no MSA-layer tensor
// is allocated, and releasing a block frees exactly the pair layers' parameter bytes (the DAP
// block buffer of kTemplatePairBlock), on the golden model and on random weights.
TEST(Af2ModelWeights, TemplatePairBlocksHoldOnlyTheirPairLayers) {
  TensorFile f;
  ASSERT_TRUE(read_safetensors(test::data_path("af2_model_tiny.safetensors"), &f).ok());
  AlphaFoldConfig cfg;
  ASSERT_TRUE(alphafold_config_from_weights(f, &cfg).ok());
  ASSERT_TRUE(cfg.templates);
  for (bool random : {false, true}) {
    SCOPED_TRACE(random ? "random weights" : "golden weights");
    AlphaFold model;
    ASSERT_TRUE(AlphaFold::load(cfg, random ? AlphaFold::random_weights(cfg, 3) : f, &model).ok());
    AlphaFold::Impl& M = AlphaFoldAccess::impl(model);
    ASSERT_EQ(M.tmpl_blocks.size(), static_cast<size_t>(cfg.template_pair.no_blocks));
    for (TemplateBlock& b : M.tmpl_blocks) {
      EXPECT_FALSE(b.w.msa_att_row.ln_m.w.defined());
      EXPECT_FALSE(b.w.msa_att_col.mha.w_qkvg.defined());
      EXPECT_FALSE(b.w.msa_transition.l1.w.defined());
      EXPECT_FALSE(b.w.outer_product_mean.out.w.defined());
      EXPECT_TRUE(b.w.tri_mul_out.ab.w.defined());
      EXPECT_TRUE(b.w.pair_transition.l2.w.defined());
      const int64_t live = mem_stats().live_bytes;
      b.w = BlockWeights{};
      EXPECT_EQ(live - mem_stats().live_bytes,
                dap_block_buffer_bytes(kTemplatePairBlock, cfg.template_pair));
    }
  }
}

}  // namespace
}  // namespace fc

namespace fc {
namespace {

// `foldcube run --model af2 --memory-budget`: a budget that fits prints the prediction beside the
// measured peak (equal) and stays under the budget; one below the finest chunking is refused
// before any work, naming the smallest feasible budget.
TEST(Af2MemoryCli, BudgetFitsOrIsRefused) {
  const std::string job =
      "run --model af2 --r 32 --s 8 --extra 32 --templates 2 --blocks 1 --recycles 1 --threads 1 ";
  test::Result ok = test::run_cli(job + "--memory-budget 1GiB");
  ASSERT_EQ(ok.code, 0) << ok.out;
  double budget = 0, predicted = 0, measured = 0;
  const size_t at = ok.out.find("memory budget");
  ASSERT_NE(at, std::string::npos) << ok.out;
  ASSERT_EQ(
      std::sscanf(ok.out.c_str() + at,
                  "memory budget %lf MiB: predicted peak %lf MiB (at the %*s measured %lf MiB",
                  &budget, &predicted, &measured),
      3)
      << ok.out;
  EXPECT_EQ(predicted, measured) << ok.out;
  EXPECT_LE(measured, budget);
  test::Result refused = test::run_cli(job + "--memory-budget 1MiB");
  EXPECT_NE(refused.code, 0);
  EXPECT_NE(refused.out.find("smallest feasible budget"), std::string::npos) << refused.out;
  EXPECT_EQ(refused.out.find("foldcube run: AlphaFold2"), std::string::npos) << refused.out;
}

}  // namespace
}  // namespace fc
