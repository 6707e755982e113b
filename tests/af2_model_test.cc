// The whole AlphaFold2 model against OpenFold's golden model cases: every traced stage of every
// recycling pass, and every output of the last pass, within the golden README's tolerances.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "foldcube/alphafold.h"
#include "foldcube/io.h"
#include "test_util.h"

namespace fc {
namespace {

// The golden metric for one tensor (float or integer-like); non-finite values fail.
double golden_metric(const Tensor& x, const Tensor& ref) {
  Tensor a = x.dtype() == DType::I64 ? Tensor() : x.to(DType::F64);
  Tensor b = ref.dtype() == DType::I64 ? Tensor() : ref.to(DType::F64);
  if (!a.defined() || !b.defined()) return INFINITY;
  double ss = 0, mx = 0;
  for (int64_t i = 0; i < b.numel(); ++i) {
    const double u = a.data<double>()[i], v = b.data<double>()[i];
    if (!std::isfinite(u) || !std::isfinite(v)) return INFINITY;
    ss += v * v;
    mx = std::max(mx, std::abs(u - v));
  }
  return mx / std::max(std::sqrt(ss / std::max<int64_t>(b.numel(), 1)), 1.0);
}

bool structure_group(const std::string& name) {
  for (const char* s : {"sm.frames", "sm.sidechain_frames", "sm.positions", "sm.angles",
                        "final_atom_positions", "final_affine_tensor"})
    if (name.find(s) != std::string::npos) return true;
  return false;
}

std::string golden_path(const std::string& name) {
  std::string p = test::data_path(name + ".safetensors");
  if (std::filesystem::exists(p)) return p;
  return std::string(FOLDCUBE_TEST_DATA_DIR) + "/../../../shared/golden/" + name + ".safetensors";
}

class Af2Model : public ::testing::TestWithParam<std::string> {};

TEST_P(Af2Model, EveryTraceAndOutputMatchesOpenFold) {
  const std::string path = golden_path(GetParam());
  if (!std::filesystem::exists(path)) GTEST_SKIP() << "golden file not found: " << path;
  TensorFile f;
  Status st = read_safetensors(path, &f);
  ASSERT_TRUE(st.ok()) << st.ToString();
  AlphaFoldConfig cfg;
  st = alphafold_config_from_weights(f, &cfg);
  ASSERT_TRUE(st.ok()) << st.ToString();
  AlphaFold model;
  st = AlphaFold::load(cfg, f, &model);
  ASSERT_TRUE(st.ok()) << st.ToString();
  FeatureDict feats;
  for (const std::string& n : f.names)
    if (n.rfind("feature.", 0) == 0) feats[n.substr(8)] = f.tensors.at(n);

  // Per-index stages (templates, structure-module layers) are stacked along a new first axis.
  std::map<std::string, std::vector<Tensor>> stacked;
  std::set<std::string> seen;
  double worst = 0;
  std::string worst_name;
  auto check = [&](const std::string& name, const Tensor& x) {
    ASSERT_TRUE(f.has(name)) << "no golden tensor " << name;
    const Tensor& ref = f.tensors.at(name);
    ASSERT_EQ(x.shape(), ref.shape()) << name;
    const double e = golden_metric(x, ref);
    const double tol = structure_group(name) ? 5e-4 : 1e-4;
    EXPECT_LT(e, tol) << name;
    seen.insert(name);
    if (e > worst) worst = e, worst_name = name;
  };
  AlphaFoldOptions opts;
  opts.trace = [&](int pass, const std::string& stage, int index, const Tensor& v) {
    const std::string name = "trace.iter" + std::to_string(pass) + "." + stage;
    if (index < 0)
      check(name, v);
    else
      stacked[name].push_back(v.clone());
  };
  std::map<std::string, Tensor> out;
  st = model.forward(feats, &out, opts);
  ASSERT_TRUE(st.ok()) << st.ToString();
  for (const auto& [name, parts] : stacked) {
    Shape shape = parts[0].shape();
    shape.insert(shape.begin(), static_cast<int64_t>(parts.size()));
    Tensor all = Tensor::empty(shape);
    for (size_t i = 0; i < parts.size(); ++i)
      all.select(0, static_cast<int64_t>(i)).copy_from(parts[i]);
    check(name, all);
  }
  for (const auto& [name, t] : out) {
    if (name == "num_recycles") {
      EXPECT_EQ(t.data<int64_t>()[0], f.tensors.at("output.num_recycles").data<int64_t>()[0]);
      continue;
    }
    if (name == "ptm_score") {
      const double ref = f.tensors.at("output.ptm_score").to(DType::F64).data<double>()[0];
      EXPECT_LT(std::abs(t.f32()[0] - ref) / std::abs(ref), 1e-4);
      seen.insert("output.ptm_score");
      continue;
    }
    check("output." + name, t);
  }
  // Every golden trace and output was compared.
  for (const std::string& n : f.names)
    if ((n.rfind("trace.", 0) == 0 || n.rfind("output.", 0) == 0) && !seen.count(n) &&
        n != "output.num_recycles")
      ADD_FAILURE() << "golden tensor not produced: " << n;
  std::printf("%s: worst err %.3g (%s)\n", GetParam().c_str(), worst, worst_name.c_str());
}

INSTANTIATE_TEST_SUITE_P(Golden, Af2Model, ::testing::Values("af2_model_tiny", "af2_model_af2dims"),
                         [](const ::testing::TestParamInfo<std::string>& p) { return p.param; });

}  // namespace
}  // namespace fc
