// ExtraMSA stack: golden check against the OpenFold float64 reference (extra_tiny), robustness to a
// fully masked MSA column, user errors for bad weights/metadata, and the global column
// attention's stated workspace against the tracking allocator.
#include "foldcube/extra_msa.h"

#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <optional>
#include <string>

#include "foldcube/io.h"
#include "foldcube/memory.h"
#include "foldcube/runtime.h"
#include "model/modules.h"
#include "test_util.h"

namespace fc {
namespace {

const char* kFile = "extra_tiny.safetensors";

struct Golden {
  TensorFile f;
  EvoformerConfig cfg;
  Tensor m, z, msa_mask, pair_mask;  // inputs; m, z are fresh copies
};

void load_golden(Golden* g) {
  ASSERT_TRUE(read_safetensors(test::data_path(kFile), &g->f).ok());
  Status st = EvoformerConfig::from_metadata(g->f.metadata, &g->cfg);
  ASSERT_TRUE(st.ok()) << st.ToString();
  ASSERT_TRUE(g->f.get_f32("input.m", {}, &g->m).ok());
  ASSERT_TRUE(g->f.get_f32("input.z", {}, &g->z).ok());
  ASSERT_TRUE(g->f.get_f32("input.msa_mask", {}, &g->msa_mask).ok());
  ASSERT_TRUE(g->f.get_f32("input.pair_mask", {}, &g->pair_mask).ok());
  g->m = g->m.clone();
  g->z = g->z.clone();
}

bool all_finite(const Tensor& t) {
  const float* p = t.f32();
  for (int64_t i = 0; i < t.numel(); ++i)
    if (!std::isfinite(p[i])) return false;
  return true;
}

class GoldenExtraMsa : public ::testing::TestWithParam<int64_t> {};

TEST_P(GoldenExtraMsa, OutputsAndBlock0Traces) {
  Golden g;
  ASSERT_NO_FATAL_FAILURE(load_golden(&g));
  EXPECT_EQ(g.cfg.c_m, 16);  // c_e
  ExtraMsaStack stack;
  Status st = ExtraMsaStack::load(g.cfg, g.f, &stack);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(stack.global_eps(), 1e-8f);

  std::map<std::string, Tensor> traces;
  ForwardOptions opts;
  opts.chunk = GetParam();
  opts.trace = [&](int block, const std::string& module, const std::string& stream,
                   const Tensor& v) {
    if (block == 0) traces["trace.block0." + module + "." + stream] = v.clone();
  };
  st = stack.forward(g.m, g.z, g.msa_mask, g.pair_mask, opts);
  ASSERT_TRUE(st.ok()) << st.ToString();

  int checked = 0;
  for (const std::string& name : g.f.names) {
    if (name.rfind("trace.block0.", 0) != 0) continue;
    ASSERT_TRUE(traces.count(name)) << "no trace produced for " << name;
    EXPECT_LT(test::golden_err(traces[name], g.f.tensors.at(name)), 1e-4) << name;
    ++checked;
  }
  EXPECT_EQ(checked, 9);
  EXPECT_LT(test::golden_err(g.m, g.f.tensors.at("output.m")), 1e-4);
  EXPECT_LT(test::golden_err(g.z, g.f.tensors.at("output.z")), 1e-4);
}

INSTANTIATE_TEST_SUITE_P(Chunks, GoldenExtraMsa, ::testing::Values(0, 1, 5),
                         [](const auto& info) { return "chunk" + std::to_string(info.param); });

// A residue whose MSA column is entirely masked: the global attention's mean is 0 / eps and every
// key is masked; the result must stay finite, for any chunking.
TEST(ExtraMsa, FullyMaskedColumnIsFinite) {
  for (int64_t chunk : {0, 1, 5}) {
    Golden g;
    ASSERT_NO_FATAL_FAILURE(load_golden(&g));
    ExtraMsaStack stack;
    ASSERT_TRUE(ExtraMsaStack::load(g.cfg, g.f, &stack).ok());
    Tensor mask = g.msa_mask.clone();
    const int64_t s = mask.dim(0), r = mask.dim(1), col = 3;
    for (int64_t i = 0; i < s; ++i) mask.f32()[i * r + col] = 0.f;
    ForwardOptions opts;
    opts.chunk = chunk;
    opts.trace = [&](int, const std::string& module, const std::string&, const Tensor& v) {
      EXPECT_TRUE(all_finite(v)) << module << " (chunk " << chunk << ")";
    };
    Status st = stack.forward(g.m, g.z, mask, g.pair_mask, opts);
    ASSERT_TRUE(st.ok()) << st.ToString();
    EXPECT_TRUE(all_finite(g.m));
    EXPECT_TRUE(all_finite(g.z));
  }
}

TEST(ExtraMsa, MissingParameterIsNamed) {
  Golden g;
  ASSERT_NO_FATAL_FAILURE(load_golden(&g));
  const std::string name = "blocks.0.msa_att_col.global_attention.linear_k.weight";
  ASSERT_EQ(g.f.tensors.erase(name), 1u);
  ExtraMsaStack stack;
  Status st = ExtraMsaStack::load(g.cfg, g.f, &stack);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.message().find(name), std::string::npos) << st.ToString();
}

TEST(ExtraMsa, MisShapedParameterIsNamed) {
  Golden g;
  ASSERT_NO_FATAL_FAILURE(load_golden(&g));
  // One shared value head [C, c_e]; a per-head [H*C, c_e] weight (Evoformer layout) is rejected.
  const std::string name = "blocks.0.msa_att_col.global_attention.linear_v.weight";
  g.f.put(name, g.f.tensors.at("blocks.0.msa_att_col.global_attention.linear_q.weight"));
  ExtraMsaStack stack;
  Status st = ExtraMsaStack::load(g.cfg, g.f, &stack);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.message().find(name), std::string::npos) << st.ToString();
}

TEST(ExtraMsa, EvoformerWeightsAreRejected) {
  TensorFile f;
  ASSERT_TRUE(read_safetensors(test::data_path("evo_tiny.safetensors"), &f).ok());
  EvoformerConfig cfg;
  ASSERT_TRUE(EvoformerConfig::from_metadata(f.metadata, &cfg).ok());
  ExtraMsaStack stack;
  Status st = ExtraMsaStack::load(cfg, f, &stack);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.message().find("msa_att_col.layer_norm_m"), std::string::npos) << st.ToString();
}

TEST(ExtraMsa, MetadataVariantsAndEps) {
  Golden g;
  ASSERT_NO_FATAL_FAILURE(load_golden(&g));
  ExtraMsaStack stack;
  g.f.metadata["constants"] = R"({"global_attention_eps": 1e-6})";
  ASSERT_TRUE(ExtraMsaStack::load(g.cfg, g.f, &stack).ok());
  EXPECT_EQ(stack.global_eps(), 1e-6f);
  g.f.metadata["constants"] = R"({"global_attention_eps": 0})";
  EXPECT_FALSE(ExtraMsaStack::load(g.cfg, g.f, &stack).ok());
  g.f.metadata.erase("constants");
  g.f.metadata["config"] = R"({"opm_first": true})";
  Status st = ExtraMsaStack::load(g.cfg, g.f, &stack);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.message().find("opm_first"), std::string::npos) << st.ToString();
  g.f.metadata.clear();  // weights without metadata: OpenFold's default eps
  ASSERT_TRUE(ExtraMsaStack::load(g.cfg, g.f, &stack).ok());
  EXPECT_EQ(stack.global_eps(), ExtraMsaStack::kDefaultGlobalEps);
}

TEST(ExtraMsa, ExportRoundTrip) {
  EvoformerConfig cfg;
  cfg.c_m = 16;
  cfg.c_z = 8;
  cfg.c_hidden_msa_att = 4;
  cfg.no_heads_msa = 2;
  cfg.c_hidden_pair_att = 4;
  cfg.no_heads_pair = 2;
  cfg.c_hidden_opm = 4;
  cfg.c_hidden_mul = 8;
  cfg.no_blocks = 2;
  ExtraMsaStack a = ExtraMsaStack::random(cfg, 7);
  TensorFile f;
  a.export_weights(&f);
  ExtraMsaStack b;
  Status st = ExtraMsaStack::load(cfg, f, &b);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(a.param_bytes(), b.param_bytes());
  Tensor m1 = Tensor::full({5, 7, cfg.c_m}, 0.3f), z1 = Tensor::full({7, 7, cfg.c_z}, -0.2f);
  Tensor m2 = m1.clone(), z2 = z1.clone();
  ASSERT_TRUE(a.forward(m1, z1, Tensor(), Tensor()).ok());
  ASSERT_TRUE(b.forward(m2, z2, Tensor(), Tensor()).ok());
  EXPECT_EQ(test::golden_err(m1, m2), 0.0);
  EXPECT_EQ(test::golden_err(z1, z2), 0.0);
}

// The ExtraMSA-specific modules' workspace (measured on block 1, between trace callbacks) equals
// the stated bytes: the global column attention under "msa_att_col_global", the masked MSA
// transition under "msa_transition" (same buffers as the Evoformer's). The shared modules are
// checked by model_memory_test.cc.
struct MemCase {
  int64_t s, r, chunk;
};

std::string MemName(const MemCase& c) {
  return "s" + std::to_string(c.s) + "_r" + std::to_string(c.r) + "_chunk" +
         std::to_string(c.chunk);
}
// Test parameters print as their readable name (gtest would print the raw struct bytes).
void PrintTo(const MemCase& p, std::ostream* os) { *os << MemName(p); }

class ExtraMsaMemory : public ::testing::TestWithParam<MemCase> {};

TEST_P(ExtraMsaMemory, WorkspaceMatchesTrackedPeak) {
  const MemCase mc = GetParam();
  EvoformerConfig cfg;  // AF2 extra-MSA widths (c_e 64, 8 heads x 8), smaller pair channels
  cfg.c_m = 64;
  cfg.c_z = 32;
  cfg.c_hidden_msa_att = 8;
  cfg.no_heads_msa = 8;
  cfg.c_hidden_pair_att = 8;
  cfg.c_hidden_opm = 8;
  cfg.c_hidden_mul = 32;
  cfg.no_blocks = 2;
  ExtraMsaStack stack = ExtraMsaStack::random(cfg, 11);
  Tensor m = Tensor::full({mc.s, mc.r, cfg.c_m}, 0.1f);
  Tensor z = Tensor::full({mc.r, mc.r, cfg.c_z}, 0.2f);

  BlockContext ctx;
  ctx.cfg = &cfg;
  ctx.s = mc.s;
  ctx.r = mc.r;
  ctx.chunk = mc.chunk;
  ctx.chunk_target_bytes = default_chunk_target_bytes(cfg, mc.s, mc.r);
  ctx.threads = num_threads();

  std::map<std::string, int64_t> measured;
  std::optional<MemoryScope> scope;
  ForwardOptions opts;
  opts.chunk = mc.chunk;
  opts.trace = [&](int block, const std::string& module, const std::string&, const Tensor&) {
    if (block == 1) measured[module] = scope->peak() - scope->start_live();
    scope.reset();
    scope.emplace();
  };
  scope.emplace();
  ASSERT_TRUE(stack.forward(m, z, Tensor(), Tensor(), opts).ok());
  scope.reset();
  ASSERT_EQ(measured.size(), 9u);
  EXPECT_EQ(measured["msa_att_col"], msa_column_global_attention_bytes(ctx));
  EXPECT_EQ(measured["msa_att_col"], module_workspace_bytes("msa_att_col_global", ctx));
  EXPECT_EQ(measured["msa_transition"], module_workspace_bytes("msa_transition", ctx));
}

INSTANTIATE_TEST_SUITE_P(Shapes, ExtraMsaMemory,
                         ::testing::Values(MemCase{64, 12, 0}, MemCase{40, 33, 3},
                                           MemCase{128, 16, 1}),
                         [](const auto& info) { return MemName(info.param); });

}  // namespace
}  // namespace fc
