// `foldcube fold` end to end on a golden feature case and the tiny golden parameters (.npz):
// outputs present and readable, the feature cache reused, a corrupt cache entry rebuilt, and the
// model on the fold's features equal to the model on the same features given directly.
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "test_util.h"

namespace fc {
namespace {

namespace fs = std::filesystem;

TEST(FoldCli, FastaMsaToRankedStructuresWithCache) {
  const test::TempDir dir;
  const std::string out = dir.path() + "/out", cache = dir.path() + "/cache";
  const std::string args =
      "fold --threads 1 --recycles 1 --fasta " + test::data_path("feat_small.fasta") + " --msa " +
      test::data_path("feat_small.a3m") + " --params " + test::data_path("af2_model_tiny.npz") +
      " --cache " + cache + " --out " + out;
  test::Result r = test::run_cli(args);
  ASSERT_EQ(r.code, 0) << r.out;
  const fs::path job = fs::path(out) / "feat_small";
  for (const char* f : {"ranked_0.pdb", "unrelaxed_af2_model_tiny.pdb",
                        "unrelaxed_af2_model_tiny.cif", "confidence_af2_model_tiny.json",
                        "ranking.json", "plddt.png", "pae_af2_model_tiny.png", "coverage.png"})
    EXPECT_TRUE(fs::exists(job / f)) << f;
  std::ifstream cj(job / "confidence_af2_model_tiny.json");
  const nlohmann::json conf = nlohmann::json::parse(cj);
  EXPECT_EQ(conf["plddt"].size(), 48u);  // feat_small has 48 residues
  EXPECT_EQ(conf["pae"].size(), 48u);
  EXPECT_EQ(r.out.find("(cache)"), std::string::npos) << r.out;
  // Second run: features from the cache, same structure.
  std::ifstream a(job / "ranked_0.pdb");
  const std::string first((std::istreambuf_iterator<char>(a)), {});
  r = test::run_cli(args);
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("(cache)"), std::string::npos) << r.out;
  std::ifstream b(job / "ranked_0.pdb");
  EXPECT_EQ(first, std::string((std::istreambuf_iterator<char>(b)), {}));
  // A corrupt cache entry is rebuilt, never used.
  for (const auto& e : fs::directory_iterator(cache)) {
    std::ofstream f(e.path(), std::ios::binary | std::ios::trunc);
    f << "garbage";
  }
  r = test::run_cli(args);
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_EQ(r.out.find("(cache)"), std::string::npos) << r.out;
  std::ifstream c(job / "ranked_0.pdb");
  EXPECT_EQ(first, std::string((std::istreambuf_iterator<char>(c)), {}));
  // Under a memory budget that fits: the same structure; under one that cannot fit: refused
  // before the model runs, naming the smallest feasible budget, and no structure written.
  r = test::run_cli(args + " --memory-budget 2GiB");
  ASSERT_EQ(r.code, 0) << r.out;
  std::ifstream d(job / "ranked_0.pdb");
  EXPECT_EQ(first, std::string((std::istreambuf_iterator<char>(d)), {}));
  // In a size bucket (48 residues padded to 64): the same atoms, coordinates within PDB rounding.
  r = test::run_cli(args + " --buckets 32,64,128");
  ASSERT_EQ(r.code, 0) << r.out;
  std::ifstream e(job / "ranked_0.pdb");
  const std::string bucketed((std::istreambuf_iterator<char>(e)), {});
  auto atoms = [](const std::string& pdb) {
    std::vector<std::array<double, 3>> xyz;
    std::istringstream in(pdb);
    for (std::string line; std::getline(in, line);)
      if (line.rfind("ATOM", 0) == 0)
        xyz.push_back({std::stod(line.substr(30, 8)), std::stod(line.substr(38, 8)),
                       std::stod(line.substr(46, 8))});
    return xyz;
  };
  const auto a0 = atoms(first), a1 = atoms(bucketed);
  ASSERT_EQ(a0.size(), a1.size());
  ASSERT_GT(a0.size(), 48u);
  double worst = 0;
  for (size_t i = 0; i < a0.size(); ++i)
    for (int c = 0; c < 3; ++c) worst = std::max(worst, std::abs(a0[i][c] - a1[i][c]));
  EXPECT_LT(worst, 0.01) << "largest coordinate difference (A)";
  r = test::run_cli(args + " --buckets 16,32");
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_NE(r.out.find("largest bucket"), std::string::npos) << r.out;
  const std::string out2 = dir.path() + "/out2";
  r = test::run_cli("fold --threads 1 --recycles 1 --fasta " + test::data_path("feat_small.fasta") +
                    " --msa " + test::data_path("feat_small.a3m") + " --params " +
                    test::data_path("af2_model_tiny.npz") + " --cache " + cache + " --out " + out2 +
                    " --memory-budget 4KiB");
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_NE(r.out.find("smallest feasible budget"), std::string::npos) << r.out;
  EXPECT_FALSE(fs::exists(fs::path(out2) / "feat_small" / "ranked_0.pdb"));
  // Bad input: a missing MSA file, an unknown model number.
  r = test::run_cli("fold --fasta " + test::data_path("feat_small.fasta") +
                    " --msa /nonexistent.a3m --params " + test::data_path("af2_model_tiny.npz") +
                    " --out " + out);
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_NE(r.out.find("foldcube: error:"), std::string::npos) << r.out;
  r = test::run_cli("fold --models 7 --fasta " + test::data_path("feat_small.fasta") +
                    " --params " + test::data_path("af2_model_tiny.npz") + " --out " + out);
  EXPECT_EQ(r.code, 1) << r.out;
}

}  // namespace
}  // namespace fc
