// AF2 structure-module geometry (residue constants, backbone updates, rigid-group frames, atom14
// and atom37 coordinates) and confidence (pLDDT, PAE, pTM) against the OpenFold golden model
// cases: every stage is recomputed from the traced inputs of the same layer and pass.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "foldcube/io.h"
#include "model/af2/confidence.h"
#include "model/af2/geometry.h"
#include "model/af2/residue_constants.h"
#include "model/af2/structure_module.h"
#include "test_util.h"

namespace fc {
namespace {

using af2::kAtom14;
using af2::kAtom37;
using af2::kRestypes;
using af2::kRigidGroups;

// The tiny case is in tests/data; the AF2-dimension case (8 layers) is read from ../shared/golden
// when it exists.
class Af2Structure : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    std::string path = test::data_path(GetParam() + ".safetensors");
    if (!std::filesystem::exists(path))
      path =
          std::string(test::data_dir()) + "/../../../shared/golden/" + GetParam() + ".safetensors";
    if (!std::filesystem::exists(path)) GTEST_SKIP() << "golden file not found: " << path;
    file_ = std::make_unique<TensorFile>();
    const Status st = read_safetensors(path, file_.get());
    ASSERT_TRUE(st.ok()) << st.ToString();
  }
  const Tensor& get(const std::string& name) {
    EXPECT_TRUE(file_->has(name)) << name;
    return file_->tensors.at(name);
  }
  // The F64 reference as doubles (contiguous).
  std::vector<double> f64(const std::string& name) {
    const Tensor t = get(name).contiguous();
    EXPECT_EQ(t.dtype(), DType::F64) << name;
    return std::vector<double>(t.data<double>(), t.data<double>() + t.numel());
  }
  int passes() { return static_cast<int>(get("feature.aatype").dim(1)); }
  std::vector<int64_t> aatype(int pass) {
    const Tensor& a = get("feature.aatype");  // [r, R]
    std::vector<int64_t> out(a.dim(0));
    for (int64_t i = 0; i < a.dim(0); ++i) out[i] = a.data<int64_t>()[i * a.dim(1) + pass];
    return out;
  }
  static std::string trace(int pass, const std::string& stage) {
    return "trace.iter" + std::to_string(pass) + "." + stage;
  }
  std::unique_ptr<TensorFile> file_;
};

// The golden README metric: max |x - ref| / max(rms(ref), 1); non-finite values fail.
double err(const float* x, const double* ref, int64_t n) {
  double ss = 0, mx = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(x[i]) || !std::isfinite(ref[i])) return INFINITY;
    ss += ref[i] * ref[i];
    mx = std::max(mx, std::abs(x[i] - ref[i]));
  }
  return mx / std::max(std::sqrt(ss / std::max<int64_t>(n, 1)), 1.0);
}

constexpr double kStructureTol = 5e-4;  // golden README: structure group, f32 engine

TEST_P(Af2Structure, ResidueTablesEqualOpenFoldConstants) {
  const af2::ResidueTables& T = af2::residue_tables();
  auto f32 = [&](const char* name) {
    const Tensor& t = get(std::string("const.") + name);
    EXPECT_EQ(t.dtype(), DType::F32);
    return t.f32();
  };
  auto i64 = [&](const char* name) {
    const Tensor& t = get(std::string("const.") + name);
    EXPECT_EQ(t.dtype(), DType::I64);
    return t.data<int64_t>();
  };
  const float* frames = f32("restype_rigid_group_default_frame");
  int frame_mismatch = 0;
  for (int i = 0; i < kRestypes * kRigidGroups * 16; ++i) {
    const float mine = (&T.default_frame[0][0][0][0])[i];
    // Built in double like AF2's; at most one float rounding apart.
    EXPECT_LE(std::abs(mine - frames[i]), 1.2e-7f * std::max(1.0f, std::abs(frames[i]))) << i;
    frame_mismatch += mine != frames[i];
  }
  EXPECT_EQ(frame_mismatch, 0) << "default frames differ in the last bit";
  const float* pos = f32("restype_atom14_rigid_group_positions");
  const float* m14 = f32("restype_atom14_mask");
  const float* m37 = f32("restype_atom37_mask");
  const int64_t* g14 = i64("restype_atom14_to_rigid_group");
  const int64_t* a14to37 = i64("restype_atom14_to_atom37");
  const int64_t* a37to14 = i64("restype_atom37_to_atom14");
  for (int rt = 0; rt < kRestypes; ++rt) {
    for (int a = 0; a < kAtom14; ++a) {
      const int k = rt * kAtom14 + a;
      EXPECT_EQ(T.atom14_mask[rt][a], m14[k]) << rt << " " << a;
      EXPECT_EQ(T.atom14_to_group[rt][a], g14[k]) << rt << " " << a;
      EXPECT_EQ(T.atom14_to_atom37[rt][a], a14to37[k]) << rt << " " << a;
      for (int c = 0; c < 3; ++c) EXPECT_EQ(T.atom14_group_positions[rt][a][c], pos[3 * k + c]);
    }
    for (int a = 0; a < kAtom37; ++a) {
      EXPECT_EQ(T.atom37_mask[rt][a], m37[rt * kAtom37 + a]) << rt << " " << a;
      EXPECT_EQ(T.atom37_to_atom14[rt][a], a37to14[rt * kAtom37 + a]) << rt << " " << a;
    }
  }
  EXPECT_STREQ(af2::restype_name(7), "GLY");
  EXPECT_STREQ(af2::restype_name(20), "UNK");
  EXPECT_EQ(af2::atom37_index("OXT"), 36);
  EXPECT_EQ(af2::atom37_index("XX"), -1);
}

TEST_P(Af2Structure, BackboneUpdatesGiveTheFrames) {
  for (int k = 0; k < passes(); ++k) {
    const std::vector<double> upd = f64(trace(k, "sm.bb_update"));  // [L, r, 6]
    const std::vector<double> ref = f64(trace(k, "sm.frames"));     // [L, r, 7]
    const int64_t r = get(trace(k, "sm.frames")).dim(1), L = get(trace(k, "sm.frames")).dim(0);
    std::vector<float> q(r * 4, 0.0f), t(r * 3, 0.0f);
    for (int64_t i = 0; i < r; ++i) q[4 * i] = 1.0f;
    for (int64_t l = 0; l < L; ++l) {
      std::vector<float> got(r * 7);
      for (int64_t i = 0; i < r; ++i) {
        float u[6];
        for (int c = 0; c < 6; ++c) u[c] = static_cast<float>(upd[(l * r + i) * 6 + c]);
        af2::backbone_update(&q[4 * i], &t[3 * i], u);
        for (int c = 0; c < 4; ++c) got[7 * i + c] = q[4 * i + c];
        for (int c = 0; c < 3; ++c) got[7 * i + 4 + c] = 10.0f * t[3 * i + c];  // nm -> A
      }
      EXPECT_LT(err(got.data(), ref.data() + l * r * 7, r * 7), kStructureTol)
          << "pass " << k << " layer " << l;
    }
  }
}

TEST_P(Af2Structure, FramesAtom14AndAtom37FromTracedAngles) {
  for (int k = 0; k < passes(); ++k) {
    const std::vector<int64_t> aa = aatype(k);
    const int64_t r = static_cast<int64_t>(aa.size());
    const std::vector<double> frames = f64(trace(k, "sm.frames"));              // [L, r, 7]
    const std::vector<double> angles = f64(trace(k, "sm.angles"));              // [L, r, 7, 2]
    const std::vector<double> sc = f64(trace(k, "sm.sidechain_frames"));        // [L, r, 8, 4, 4]
    const std::vector<double> pos = f64(trace(k, "sm.positions"));              // [L, r, 14, 3]
    const std::vector<double> final37 = f64(trace(k, "final_atom_positions"));  // [r, 37, 3]
    const int64_t L = get(trace(k, "sm.frames")).dim(0);
    std::vector<float> pos14(r * kAtom14 * 3);  // [r, 14, 3] of the last layer
    for (int64_t l = 0; l < L; ++l) {
      std::vector<float> rot(r * 9), trans(r * 3), ang(r * 14);  // [r, 3, 3], [r, 3], [r, 7, 2]
      for (int64_t i = 0; i < r; ++i) {
        float q[4];
        for (int c = 0; c < 4; ++c) q[c] = static_cast<float>(frames[(l * r + i) * 7 + c]);
        af2::quat_to_rot(q, &rot[9 * i]);
        for (int c = 0; c < 3; ++c)
          trans[3 * i + c] = static_cast<float>(frames[(l * r + i) * 7 + 4 + c]);
      }
      for (int64_t j = 0; j < r * 14; ++j) ang[j] = static_cast<float>(angles[l * r * 14 + j]);
      std::vector<float> got(r * kRigidGroups * 16);  // [r, 8, 4, 4]
      af2::torsion_angles_to_frames(aa.data(), rot.data(), trans.data(), ang.data(), r, got.data());
      EXPECT_LT(err(got.data(), sc.data() + l * r * 128, r * 128), kStructureTol)
          << "pass " << k << " layer " << l;
      af2::frames_to_atom14(aa.data(), got.data(), r, pos14.data());
      EXPECT_LT(err(pos14.data(), pos.data() + l * r * 42, r * 42), kStructureTol)
          << "pass " << k << " layer " << l;
    }
    std::vector<float> p37(r * kAtom37 * 3), m37(r * kAtom37);  // [r, 37, 3], [r, 37]
    af2::atom14_to_atom37(aa.data(), pos14.data(), r, p37.data(), m37.data());
    EXPECT_LT(err(p37.data(), final37.data(), r * 111), kStructureTol) << "pass " << k;
    const std::vector<double> mask = f64("output.final_atom_mask");
    for (int64_t j = 0; j < r * kAtom37; ++j) EXPECT_EQ(m37[j], mask[j]) << j;
    if (k + 1 < passes()) {
      // The next pass recycles the pseudo-beta positions of this pass's atoms.
      std::vector<float> pb(r * 3);
      af2::pseudo_beta(aa.data(), p37.data(), r, pb.data());
      const std::vector<double> ref = f64(trace(k + 1, "recycling_embedder.in_pseudo_beta"));
      EXPECT_LT(err(pb.data(), ref.data(), r * 3), kStructureTol) << "pass " << k + 1;
    }
  }
}

// pLDDT, PAE and pTM from the heads' logits (the last pass's outputs).
TEST_P(Af2Structure, ConfidenceFromLogits) {
  auto as_f32 = [&](const std::string& name) {
    const Tensor t = get(name).to(DType::F32);
    return std::vector<float>(t.f32(), t.f32() + t.numel());
  };
  const Tensor& lddt = get("output.lddt_logits");  // [r, 50]
  const int64_t r = lddt.dim(0), bins = lddt.dim(1);
  std::vector<float> plddt(r);
  af2::plddt_from_logits(as_f32("output.lddt_logits").data(), r, bins, plddt.data());
  const std::vector<double> ref_plddt = f64("output.plddt");
  EXPECT_LT(err(plddt.data(), ref_plddt.data(), r), 1e-4);

  const Tensor& tm = get("output.tm_logits");  // [r, r, 64]
  const int64_t tb = tm.dim(2);
  const std::vector<float> logits = as_f32("output.tm_logits");
  std::vector<float> probs(r * r * tb), pae(r * r);  // [r, r, 64], [r, r]
  float max_pae = 0;
  af2::predicted_aligned_error(logits.data(), r, tb, 31.0f, probs.data(), pae.data(), &max_pae);
  EXPECT_LT(err(probs.data(), f64("output.aligned_confidence_probs").data(), r * r * tb), 1e-4);
  EXPECT_LT(err(pae.data(), f64("output.predicted_aligned_error").data(), r * r), 1e-4);
  EXPECT_EQ(max_pae, static_cast<float>(f64("output.max_predicted_aligned_error")[0]));
  const double ptm = af2::predicted_tm_score(logits.data(), nullptr, r, tb, 31.0f);
  const double ref_ptm = f64("output.ptm_score")[0];
  EXPECT_LT(std::abs(ptm - ref_ptm) / ref_ptm, 1e-4) << ptm << " vs " << ref_ptm;
}

// The whole structure module from the Evoformer outputs of each pass; every traced stage compared.
TEST_P(Af2Structure, StructureModuleReproducesEveryTrace) {
  af2::StructureModuleConfig cfg;
  cfg.no_blocks = get("trace.iter0.sm.frames").dim(0);
  ASSERT_TRUE(
      af2::structure_module_config_from_weights(shapes_of(*file_), "structure_module.", &cfg).ok());
  af2::StructureModuleWeights w;
  Status st = af2::load_structure_module(*file_, "structure_module.", cfg, &w);
  ASSERT_TRUE(st.ok()) << st.ToString();
  auto compare = [&](const Tensor& x, const std::string& name, double tol) -> double {
    const std::vector<double> ref = f64(name);
    EXPECT_EQ(x.numel(), static_cast<int64_t>(ref.size())) << name;
    if (x.numel() != static_cast<int64_t>(ref.size())) return INFINITY;
    const double e = err(x.f32(), ref.data(), x.numel());
    EXPECT_LT(e, tol) << name;
    return e;
  };
  double worst = 0;
  for (int k = 0; k < passes(); ++k) {
    const Tensor s = get(trace(k, "evoformer.s")).to(DType::F32);
    const Tensor z = get(trace(k, "evoformer.z")).to(DType::F32);
    const std::vector<int64_t> aa = aatype(k);
    const Tensor& seq_mask = get("feature.seq_mask");  // [r, R]
    std::vector<float> mask(aa.size());
    for (size_t i = 0; i < aa.size(); ++i) mask[i] = seq_mask.f32()[i * passes() + k];
    std::map<std::string, std::vector<double>> layered;  // per-layer traces, concatenated
    af2::StructureModuleOutput out;
    st = af2::structure_module_forward(w, cfg, s, z, aa.data(), mask.data(), &out,
                                       [&](const std::string& stage, int layer, const Tensor& v) {
                                         if (layer < 0) {
                                           worst =
                                               std::max(worst, compare(v, trace(k, stage), 1e-4));
                                           return;
                                         }
                                         std::vector<double>& acc = layered[stage];
                                         acc.insert(acc.end(), v.f32(), v.f32() + v.numel());
                                       });
    ASSERT_TRUE(st.ok()) << st.ToString();
    for (const auto& [stage, vals] : layered) {
      const std::vector<double> ref = f64(trace(k, stage));
      std::vector<float> got(vals.begin(), vals.end());
      ASSERT_EQ(got.size(), ref.size()) << stage;
      const double e = err(got.data(), ref.data(), static_cast<int64_t>(got.size()));
      EXPECT_LT(e, 1e-4) << trace(k, stage);
      worst = std::max(worst, e);
    }
    worst = std::max(worst, compare(out.states, trace(k, "sm.states"), 1e-4));
    worst = std::max(worst, compare(out.single, trace(k, "sm.single"), 1e-4));
    for (const auto& [t, name] : {std::pair{&out.frames, "sm.frames"},
                                  {&out.sidechain_frames, "sm.sidechain_frames"},
                                  {&out.unnormalized_angles, "sm.unnormalized_angles"},
                                  {&out.angles, "sm.angles"},
                                  {&out.positions, "sm.positions"}})
      worst = std::max(worst, compare(*t, trace(k, name), kStructureTol));
  }
  RecordProperty("worst_err", std::to_string(worst));
  std::printf("structure module: worst err %.3g over %d passes\n", worst, passes());
}

INSTANTIATE_TEST_SUITE_P(Golden, Af2Structure,
                         ::testing::Values("af2_model_tiny", "af2_model_af2dims"),
                         [](const ::testing::TestParamInfo<std::string>& p) { return p.param; });

}  // namespace
}  // namespace fc
