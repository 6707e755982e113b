// PDB / mmCIF / confidence JSON writers: fixed PDB columns re-read field by field, mmCIF loop
// shape, atomic writes, bad structures refused. (gemmi / Biopython read the files in the Python
// suite; here the columns are checked directly.)
#include "foldcube/structure_io.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "foldcube/io.h"
#include "foldcube/plots.h"
#include "test_util.h"

namespace fc {
namespace {

// The golden tiny model's last-pass prediction.
ProteinStructure golden_structure() {
  TensorFile f;
  EXPECT_TRUE(read_safetensors(test::data_path("af2_model_tiny.safetensors"), &f).ok());
  ProteinStructure p;
  const Tensor& aa = f.tensors.at("feature.aatype");  // [r, R]
  const int64_t r = aa.dim(0), R = aa.dim(1);
  for (int64_t i = 0; i < r; ++i) {
    p.aatype.push_back(aa.data<int64_t>()[i * R]);
    p.residue_index.push_back(f.tensors.at("feature.residue_index").data<int64_t>()[i * R] + 1);
  }
  const Tensor x = f.tensors.at("output.final_atom_positions").to(DType::F32);
  const Tensor m = f.tensors.at("output.final_atom_mask").to(DType::F32);
  const Tensor b = f.tensors.at("output.plddt").to(DType::F32);
  p.positions.assign(x.f32(), x.f32() + x.numel());
  p.mask.assign(m.f32(), m.f32() + m.numel());
  p.b_factors.assign(b.f32(), b.f32() + b.numel());
  return p;
}

TEST(StructureIo, PdbColumns) {
  const ProteinStructure p = golden_structure();
  std::string pdb;
  ASSERT_TRUE(to_pdb(p, &pdb).ok());
  std::istringstream in(pdb);
  std::string line;
  int atoms = 0;
  bool ter = false, end = false;
  int64_t expected_atoms = 0;
  for (float v : p.mask) expected_atoms += v > 0.5f;
  while (std::getline(in, line)) {
    if (line.rfind("ATOM", 0) == 0) {
      ASSERT_EQ(line.size(), 80u) << line;
      const int serial = std::stoi(line.substr(6, 5));
      EXPECT_EQ(serial, atoms + 1);
      const std::string atom = line.substr(12, 4), res = line.substr(17, 3);
      const int64_t resnum = std::stoll(line.substr(22, 4));
      const double x = std::stod(line.substr(30, 8)), b = std::stod(line.substr(60, 6));
      EXPECT_EQ(line[21], 'A');
      EXPECT_FALSE(atom.find_first_not_of(' ') == std::string::npos);
      EXPECT_EQ(line.substr(76, 2), " " + atom.substr(1, 1)) << line;  // element
      // Find the residue and check coordinates and B-factor.
      size_t i = 0;
      while (p.residue_index[i] != resnum) ++i;
      EXPECT_NEAR(b, p.b_factors[i], 0.006);
      bool found = false;
      for (int a = 0; a < 37; ++a)
        if (p.mask[i * 37 + a] > 0.5f && std::abs(p.positions[(i * 37 + a) * 3] - x) < 6e-4)
          found = true;
      EXPECT_TRUE(found) << line;
      EXPECT_EQ(res.size(), 3u);
      ++atoms;
    }
    ter |= line.rfind("TER", 0) == 0;
    end |= line == "END";
  }
  EXPECT_EQ(atoms, expected_atoms);
  EXPECT_TRUE(ter);
  EXPECT_TRUE(end);
}

TEST(StructureIo, MmcifLoopAndConfidenceJson) {
  const ProteinStructure p = golden_structure();
  std::string cif;
  ASSERT_TRUE(to_mmcif(p, "tiny model/1", &cif).ok());
  EXPECT_EQ(cif.rfind("data_tiny_model_1\n", 0), 0u);
  int fields = 0, rows = 0;
  std::istringstream in(cif);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("_atom_site.", 0) == 0) ++fields;
    if (line.rfind("ATOM ", 0) == 0) {
      std::istringstream w(line);
      int n = 0;
      for (std::string tok; w >> tok;) ++n;
      EXPECT_EQ(n, fields) << line;
      ++rows;
    }
  }
  EXPECT_EQ(fields, 18);
  EXPECT_GT(rows, 0);
  const std::vector<float> pae = {0.5f, 1.0f, 2.0f, 0.25f};
  const nlohmann::json j =
      nlohmann::json::parse(confidence_json({80.0f, 60.0f}, pae, 31.75f, 0.5f));
  EXPECT_DOUBLE_EQ(j["mean_plddt"].get<double>(), 70.0);
  EXPECT_EQ(j["pae"][1][0].get<float>(), 2.0f);
  EXPECT_EQ(j["max_pae"].get<float>(), 31.75f);
}

TEST(StructureIo, BadStructuresAndAtomicWrite) {
  ProteinStructure p = golden_structure();
  std::string s;
  ProteinStructure bad = p;
  bad.aatype[2] = 23;
  EXPECT_NE(to_pdb(bad, &s).message().find("aatype"), std::string::npos);
  bad = p;
  bad.positions[3 * 37 * 3 + 3] = NAN;  // residue 1, atom CA... present in every residue
  EXPECT_FALSE(to_pdb(bad, &s).ok());
  bad = p;
  bad.mask.pop_back();
  EXPECT_FALSE(to_mmcif(bad, "x", &s).ok());
  const std::string dir = testing::TempDir() + "/sio_" + std::to_string(::getpid());
  std::filesystem::create_directories(dir);
  ASSERT_TRUE(write_text_atomic(dir + "/a.txt", "hello\n").ok());
  std::ifstream f(dir + "/a.txt");
  std::string got;
  std::getline(f, got);
  EXPECT_EQ(got, "hello");
  EXPECT_FALSE(write_text_atomic(dir + "/missing/a.txt", "x").ok());
  EXPECT_EQ(std::distance(std::filesystem::directory_iterator(dir), {}), 1);  // no temp left
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace fc

namespace fc {
namespace {

// PNG width and height from the IHDR chunk; 0 when the file is not a PNG.
std::pair<uint32_t, uint32_t> png_size(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  unsigned char h[24] = {};
  f.read(reinterpret_cast<char*>(h), 24);
  if (!f || h[1] != 'P' || h[2] != 'N' || h[3] != 'G') return {0, 0};
  auto be = [&](int o) {
    return (uint32_t{h[o]} << 24) | (uint32_t{h[o + 1]} << 16) | (uint32_t{h[o + 2]} << 8) |
           h[o + 3];
  };
  return {be(16), be(20)};
}

TEST(Plots, PlddtPaeAndCoveragePngs) {
  TensorFile f;
  ASSERT_TRUE(read_safetensors(test::data_path("af2_model_tiny.safetensors"), &f).ok());
  const Tensor plddt = f.tensors.at("output.plddt").to(DType::F32);
  const Tensor pae = f.tensors.at("output.predicted_aligned_error").to(DType::F32);
  const int64_t r = plddt.numel();
  const std::string dir = testing::TempDir() + "/plots_" + std::to_string(::getpid());
  std::filesystem::create_directories(dir);
  std::vector<float> p(plddt.f32(), plddt.f32() + r), q(p);
  for (float& v : q) v = 100 - v;
  ASSERT_TRUE(plot_plddt(dir + "/plddt.png", {p, q}, {"model_1", "model_2"}).ok());
  ASSERT_TRUE(
      plot_pae(dir + "/pae.png", std::vector<float>(pae.f32(), pae.f32() + r * r), r, 31.75f).ok());
  std::vector<int8_t> msa(40 * r);  // [40, r]: rows share a decreasing prefix of the query
  for (int64_t s = 0; s < 40; ++s)
    for (int64_t j = 0; j < r; ++j)
      msa[s * r + j] = static_cast<int8_t>(j < r - s / 4 ? j % 20 : (s % 3 ? 21 : 5));
  ASSERT_TRUE(plot_msa_coverage(dir + "/coverage.png", msa, 40, r, 21).ok());
  EXPECT_EQ(png_size(dir + "/plddt.png"), (std::pair<uint32_t, uint32_t>{720, 380}));
  EXPECT_EQ(png_size(dir + "/pae.png"), (std::pair<uint32_t, uint32_t>{560, 480}));
  EXPECT_EQ(png_size(dir + "/coverage.png"), (std::pair<uint32_t, uint32_t>{760, 460}));
  EXPECT_FALSE(plot_pae(dir + "/bad.png", {1.0f, 2.0f}, 3, 31.75f).ok());
  EXPECT_FALSE(plot_msa_coverage(dir + "/bad.png", msa, 41, r, 21).ok());
  EXPECT_FALSE(plot_plddt(dir + "/nodir/x.png", {p}, {"m"}).ok());
  EXPECT_FALSE(std::filesystem::exists(dir + "/bad.png"));
  if (!std::getenv("FOLDCUBE_KEEP_PLOTS")) std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace fc
