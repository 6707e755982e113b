// End-to-end check against the OpenFold float64 reference (tests/data/*.safetensors, copied from
// shared/golden): stack outputs and every block-0 module trace, for automatic and forced chunking.
#include <gtest/gtest.h>

#include <map>
#include <string>

#include "foldcube/io.h"
#include "foldcube/model.h"
#include "test_util.h"

namespace fc {
namespace {

struct GoldenCase {
  std::string file;
  int64_t chunk;  // 0 = automatic
};

std::string CaseName(const GoldenCase& c) {
  return c.file.substr(0, c.file.find('.')) + "_chunk" + std::to_string(c.chunk);
}
// Test parameters print as their readable name (gtest would print the raw struct bytes).
void PrintTo(const GoldenCase& p, std::ostream* os) { *os << CaseName(p); }

class GoldenEvoformer : public ::testing::TestWithParam<GoldenCase> {};

TEST_P(GoldenEvoformer, OutputsAndBlock0Traces) {
  const GoldenCase& gc = GetParam();
  TensorFile f;
  ASSERT_TRUE(read_safetensors(test::data_path(gc.file), &f).ok());
  EvoformerConfig cfg;
  Status st = EvoformerConfig::from_metadata(f.metadata, &cfg);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EvoformerStack stack;
  st = EvoformerStack::load(cfg, f, &stack);
  ASSERT_TRUE(st.ok()) << st.ToString();

  Tensor m, z, msa_mask, pair_mask;
  ASSERT_TRUE(f.get_f32("input.m", {}, &m).ok());
  ASSERT_TRUE(f.get_f32("input.z", {}, &z).ok());
  ASSERT_TRUE(f.get_f32("input.msa_mask", {}, &msa_mask).ok());
  ASSERT_TRUE(f.get_f32("input.pair_mask", {}, &pair_mask).ok());
  m = m.clone();
  z = z.clone();

  std::map<std::string, Tensor> traces;
  ForwardOptions opts;
  opts.chunk = gc.chunk;
  opts.trace = [&](int block, const std::string& module, const std::string& stream,
                   const Tensor& v) {
    if (block == 0) traces["trace.block0." + module + "." + stream] = v.clone();
  };
  Tensor s_out;
  st = stack.forward(m, z, msa_mask, pair_mask, &s_out, opts);
  ASSERT_TRUE(st.ok()) << st.ToString();

  int checked = 0;
  for (const std::string& name : f.names) {
    if (name.rfind("trace.block0.", 0) != 0) continue;
    ASSERT_TRUE(traces.count(name)) << "no trace produced for " << name;
    EXPECT_LT(test::golden_err(traces[name], f.tensors.at(name)), 1e-4) << name;
    ++checked;
  }
  EXPECT_EQ(checked, 9);
  EXPECT_LT(test::golden_err(m, f.tensors.at("output.m")), 1e-4);
  EXPECT_LT(test::golden_err(z, f.tensors.at("output.z")), 1e-4);
  EXPECT_LT(test::golden_err(s_out, f.tensors.at("output.s")), 1e-4);
}

INSTANTIATE_TEST_SUITE_P(Cases, GoldenEvoformer,
                         ::testing::Values(GoldenCase{"evo_tiny.safetensors", 0},
                                           GoldenCase{"evo_tiny.safetensors", 1},
                                           GoldenCase{"evo_tiny.safetensors", 5},
                                           GoldenCase{"evo_af2dims.safetensors", 0},
                                           GoldenCase{"evo_af2dims.safetensors", 7}),
                         [](const auto& info) { return CaseName(info.param); });

// The per-module trace metric must actually detect a wrong result (guards the harness itself).
TEST(GoldenHarness, DetectsPerturbation) {
  TensorFile f;
  ASSERT_TRUE(read_safetensors(test::data_path("evo_tiny.safetensors"), &f).ok());
  Tensor ref = f.tensors.at("output.z");
  Tensor x = ref.to(DType::F32);
  x.data<float>()[5] += 0.01f;
  EXPECT_GT(test::golden_err(x, ref), 1e-4);
}

}  // namespace
}  // namespace fc
