// The feature pipeline against OpenFold's golden feature cases (tests/data/feat_*): stage 1
// (raw.*) exactly, stage 2 with the recorded random decisions (feature.*) and the deterministic
// variant (feature_det.*), integers exact and floats within 3e-7; the CLI on the same files; the
// fast nearest-centre search against its naive reference; seeded decisions are valid.
#include "foldcube/features.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>
#include <random>
#include <string>

#include "foldcube/io.h"
#include "test_util.h"

namespace fc {
namespace {

struct Case {
  const char* name;
  int64_t max_msa_clusters, max_extra_msa;
};
const Case kCases[] = {{"feat_small", 16, 32}, {"feat_deep", 8, 24}, {"feat_shallow", 16, 8}};

std::string case_name(const ::testing::TestParamInfo<Case>& info) { return info.param.name; }
// Failure messages print the case by name (gtest would print the raw struct bytes).
void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

FeatureConfig config_of(const Case& c) {
  FeatureConfig cfg;
  cfg.max_msa_clusters = c.max_msa_clusters;
  cfg.max_extra_msa = c.max_extra_msa;
  return cfg;
}

// Every tensor of ref under ref_prefix equals got's under got_prefix: same dtype and shape,
// integers exact, floats within tol. Reports the first mismatch of each tensor.
void expect_same(const TensorFile& got, const std::string& got_prefix, const TensorFile& ref,
                 const std::string& ref_prefix, double tol) {
  int compared = 0;
  for (const std::string& name : ref.names) {
    if (name.rfind(ref_prefix, 0) != 0) continue;
    const std::string short_name = name.substr(ref_prefix.size());
    const Tensor& r = ref.tensors.at(name);
    auto it = got.tensors.find(got_prefix + short_name);
    ASSERT_NE(it, got.tensors.end()) << "missing " << got_prefix + short_name;
    const Tensor& g = it->second;
    ++compared;
    ASSERT_EQ(dtype_name(g.dtype()), std::string(dtype_name(r.dtype()))) << name;
    ASSERT_EQ(shape_str(g.shape()), shape_str(r.shape())) << name;
    const int64_t n = r.numel();
    if (r.dtype() == DType::F32) {
      double worst = 0;
      int64_t at = -1;
      for (int64_t i = 0; i < n; ++i) {
        const double d = std::abs(double(g.data<float>()[i]) - r.data<float>()[i]);
        if (d > worst) worst = d, at = i;
      }
      EXPECT_LE(worst, tol) << name << " at flat index " << at << ": " << g.data<float>()[at]
                            << " vs " << r.data<float>()[at];
    } else {
      EXPECT_EQ(std::memcmp(g.data<char>(), r.data<char>(), r.nbytes()), 0) << name;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t a = r.dtype() == DType::I32 ? g.data<int32_t>()[i] : g.data<int64_t>()[i];
        const int64_t b = r.dtype() == DType::I32 ? r.data<int32_t>()[i] : r.data<int64_t>()[i];
        if (a != b) {
          ADD_FAILURE() << name << " first differs at flat index " << i << ": " << a << " vs " << b;
          break;
        }
      }
    }
  }
  EXPECT_GT(compared, 10);
  int produced = 0;
  for (const std::string& name : got.names) produced += name.rfind(got_prefix, 0) == 0;
  EXPECT_EQ(produced, compared) << "extra tensors under " << got_prefix;
}

class FeatureGolden : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    const std::string base = test::data_path(GetParam().name);
    ASSERT_TRUE(read_safetensors(base + ".safetensors", &golden_).ok());
    std::vector<FastaRecord> fasta;
    Status st = read_fasta(base + ".fasta", &fasta);
    ASSERT_TRUE(st.ok()) << st.message();
    ASSERT_EQ(fasta.size(), 1u);
    st = read_msa(base + ".a3m", &msa_);
    ASSERT_TRUE(st.ok()) << st.message();
    st = make_raw_features(fasta[0], msa_, base + ".a3m", &raw_);
    ASSERT_TRUE(st.ok()) << st.message();
  }
  TensorFile golden_;
  Msa msa_;
  RawFeatures raw_;
};

TEST_P(FeatureGolden, RawFeaturesExact) {
  TensorFile got;
  put_raw_tensors(raw_, "raw.", &got);
  expect_same(got, "raw.", golden_, "raw.", 0.0);
  const Tensor& map = golden_.tensors.at("aux.a3m_record_to_msa_row");
  ASSERT_EQ(map.numel(), msa_.num_records());
  for (int64_t i = 0; i < map.numel(); ++i)
    EXPECT_EQ(raw_.record_to_row[i], map.data<int64_t>()[i]) << "A3M record " << i;
}

TEST_P(FeatureGolden, ModelFeaturesFromRecordedDecisions) {
  const FeatureConfig cfg = config_of(GetParam());
  FeatureDecisions dec;
  Status st = decisions_from_tensors(golden_, raw_, cfg, &dec);
  ASSERT_TRUE(st.ok()) << st.message();
  TensorFile got;
  std::vector<int64_t> assign;
  ASSERT_TRUE(make_model_features(raw_, cfg, dec, "feature.", &got, &assign).ok());
  expect_same(got, "feature.", golden_, "feature.", 3e-7);
  const Tensor& ref = golden_.tensors.at("aux.extra_cluster_assignment");
  ASSERT_EQ(int64_t(assign.size()), ref.numel());
  for (int64_t i = 0; i < ref.numel(); ++i)
    ASSERT_EQ(assign[i], ref.data<int64_t>()[i]) << "extra_cluster_assignment flat " << i;
}

TEST_P(FeatureGolden, DeterministicVariant) {
  FeatureConfig cfg = config_of(GetParam());
  cfg.deterministic = true;
  FeatureDecisions dec;
  draw_decisions(raw_, cfg, /*seed=*/12345, &dec);
  TensorFile got;
  std::vector<int64_t> assign;
  ASSERT_TRUE(make_model_features(raw_, cfg, dec, "feature_det.", &got, &assign).ok());
  expect_same(got, "feature_det.", golden_, "feature_det.", 3e-7);
  const Tensor& ref = golden_.tensors.at("aux_det.extra_cluster_assignment");
  for (int64_t i = 0; i < ref.numel(); ++i)
    ASSERT_EQ(assign[i], ref.data<int64_t>()[i]) << "aux_det.extra_cluster_assignment flat " << i;
}

// Our own seeded decisions are well formed (a valid permutation etc. passes the same checks
// as a file's), reproducible, seed-dependent, and mask about 15% of the centre positions.
TEST_P(FeatureGolden, SeededDecisionsAreValid) {
  const FeatureConfig cfg = config_of(GetParam());
  FeatureDecisions a, b, c;
  draw_decisions(raw_, cfg, 7, &a);
  draw_decisions(raw_, cfg, 7, &b);
  draw_decisions(raw_, cfg, 8, &c);
  EXPECT_EQ(a.msa_order, b.msa_order);
  EXPECT_EQ(a.bert_sample, b.bert_sample);
  EXPECT_NE(a.bert_sample, c.bert_sample);
  TensorFile f;
  const int64_t R = a.iters;
  Tensor order = Tensor::empty({R, a.rows}, DType::I64);
  std::copy(a.msa_order.begin(), a.msa_order.end(), order.data<int64_t>());
  Tensor mask = Tensor::empty({R, a.centres, a.cols});
  std::copy(a.bert_mask.begin(), a.bert_mask.end(), mask.data<float>());
  Tensor sample = Tensor::empty({R, a.centres, a.cols}, DType::I64);
  std::copy(a.bert_sample.begin(), a.bert_sample.end(), sample.data<int64_t>());
  Tensor eorder = Tensor::empty({R, a.extra_kept}, DType::I64);
  std::copy(a.extra_msa_order.begin(), a.extra_msa_order.end(), eorder.data<int64_t>());
  f.put("random.msa_order", order);
  f.put("random.bert_mask", mask);
  f.put("random.bert_sample", sample);
  f.put("random.extra_msa_order", eorder);
  FeatureDecisions back;
  Status st = decisions_from_tensors(f, raw_, cfg, &back);
  ASSERT_TRUE(st.ok()) << st.message();
  int64_t masked = 0;
  for (uint8_t m : a.bert_mask) masked += m;
  const double frac = double(masked) / a.bert_mask.size();
  EXPECT_GT(frac, 0.08);
  EXPECT_LT(frac, 0.22);
  TensorFile out;
  EXPECT_TRUE(make_model_features(raw_, cfg, a, "feature.", &out).ok());
}

INSTANTIATE_TEST_SUITE_P(Golden, FeatureGolden, ::testing::ValuesIn(kCases), case_name);

// The CLI on the golden inputs with --decisions = the golden file writes the golden raw.* and
// feature.*; --deterministic gives feature_det.*.
class FeatureCli : public ::testing::TestWithParam<Case> {};

TEST_P(FeatureCli, GoldenInputsGiveGoldenFeatures) {
  const Case& c = GetParam();
  const std::string base = test::data_path(c.name);
  const std::string out = ::testing::TempDir() + "/fc_features_" + c.name + ".safetensors";
  const std::string sizes = " --max-msa-clusters " + std::to_string(c.max_msa_clusters) +
                            " --max-extra-msa " + std::to_string(c.max_extra_msa);
  test::Result r =
      test::run_cli("features --fasta " + base + ".fasta --msa " + base + ".a3m --out " + out +
                    sizes + " --decisions " + base + ".safetensors");
  ASSERT_EQ(r.code, 0) << r.out;
  TensorFile golden, got;
  ASSERT_TRUE(read_safetensors(base + ".safetensors", &golden).ok());
  ASSERT_TRUE(read_safetensors(out, &got).ok());
  expect_same(got, "raw.", golden, "raw.", 0.0);
  expect_same(got, "feature.", golden, "feature.", 3e-7);
  // String features (domain name, species identifiers) as OpenFold's.
  const auto want = nlohmann::json::parse(golden.metadata.at("raw_strings"));
  const auto have = nlohmann::json::parse(got.metadata.at("raw_strings"));
  for (const char* key : {"domain_name", "sequence", "msa_species_identifiers",
                          "template_domain_names", "template_sequence"})
    EXPECT_EQ(have.at(key), want.at(key)) << key;
  r = test::run_cli("features --fasta " + base + ".fasta --msa " + base + ".a3m --out " + out +
                    sizes + " --deterministic");
  ASSERT_EQ(r.code, 0) << r.out;
  ASSERT_TRUE(read_safetensors(out, &got).ok());
  expect_same(got, "feature.", golden, "feature_det.", 3e-7);
}

INSTANTIATE_TEST_SUITE_P(Golden, FeatureCli, ::testing::ValuesIn(kCases), case_name);

TEST(FeatureCli, UserErrorsAreOneLine) {
  const std::string base = test::data_path("feat_small");
  const std::string out = ::testing::TempDir() + "/fc_features_err.safetensors";
  test::Result r = test::run_cli("features --fasta " + base + ".fasta --msa " +
                                 test::data_path("feat_deep.a3m") + " --out " + out);
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_NE(r.out.find("foldcube: error: "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("feat_deep.a3m: the MSA has 56 aligned columns, the FASTA query has 48"),
            std::string::npos)
      << r.out;
  EXPECT_EQ(std::count(r.out.begin(), r.out.end(), '\n'), 1) << r.out;
  r = test::run_cli("features --fasta " + base + ".fasta --msa " + base + ".a3m --out " + out +
                    " --deterministic --decisions " + base + ".safetensors");
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_NE(r.out.find("exclude each other"), std::string::npos) << r.out;
  // Decisions for another MSA size: a shape error naming the tensor.
  r = test::run_cli("features --fasta " + base + ".fasta --msa " + base + ".a3m --out " + out +
                    " --max-msa-clusters 8 --decisions " + base + ".safetensors");
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_NE(r.out.find("random.bert_mask"), std::string::npos) << r.out;
  // A directory as the MSA, a missing FASTA.
  r = test::run_cli("features --fasta " + base + ".fasta --msa " + ::testing::TempDir() +
                    " --out " + out);
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_NE(r.out.find("not a regular file"), std::string::npos) << r.out;
  r = test::run_cli("features --fasta /no/such.fasta --msa " + base + ".a3m --out " + out);
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_NE(r.out.find("/no/such.fasta: no such file"), std::string::npos) << r.out;
}

// The vectorised, threaded nearest-centre search equals the naive formula, ties included.
TEST(NearestCentres, FastMatchesReference) {
  std::mt19937 gen(5);
  for (int64_t cols : {1, 7, 64, 301}) {
    const int64_t ne = 97, sc = 33;
    std::vector<uint8_t> extra(ne * cols), centres(sc * cols);
    std::uniform_int_distribution<int> tok(0, 22), few(0, 3);
    for (auto& t : extra) t = static_cast<uint8_t>(few(gen) == 0 ? 21 : tok(gen) % 22);
    for (auto& t : centres) t = static_cast<uint8_t>(few(gen) == 0 ? tok(gen) : few(gen));
    for (auto& t : extra) t = t < 4 || t > 20 ? t : static_cast<uint8_t>(t % 4);
    std::vector<int64_t> fast(ne), ref(ne);
    nearest_centres(extra.data(), ne, centres.data(), sc, cols, fast.data());
    nearest_centres_ref(extra.data(), ne, centres.data(), sc, cols, ref.data());
    EXPECT_EQ(fast, ref) << "cols " << cols;
  }
}

}  // namespace
}  // namespace fc
