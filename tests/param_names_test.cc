// Parameter-name maps: AlphaFold .npz keys -> OpenFold state dict (bit-exact against the golden
// state dicts, and agreeing with the golden files' own key table), the reverse map's round trip,
// the OpenFold and Boltz name lists against the golden files, mapping errors, and the CLI running
// the Evoformer and Extra-MSA stacks from .npz weights bit for bit as from safetensors.
#include "io/param_names.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "foldcube/alphafold.h"
#include "foldcube/io.h"
#include "foldcube/memory.h"
#include "npz_util.h"
#include "test_util.h"

namespace fc {
namespace {

bool is_param_name(const std::string& n) {
  for (const char* p : {"feature.", "output.", "trace.", "const.", "input.", "probe.", "grad."})
    if (n.rfind(p, 0) == 0) return false;
  return true;
}

// The parameters of a golden file (file order) and its metadata.
TensorFile golden_params(const std::string& path) {
  TensorFile all, f;
  const Status st = read_safetensors(path, &all);
  EXPECT_TRUE(st.ok()) << st.ToString();
  for (const std::string& n : all.names)
    if (is_param_name(n)) f.put(n, all.tensors.at(n));
  f.metadata = std::move(all.metadata);
  return f;
}

bool same_bits(const Tensor& a, const Tensor& b) {
  if (a.shape() != b.shape() || a.dtype() != b.dtype()) return false;
  const Tensor ca = a.contiguous(), cb = b.contiguous();
  return std::memcmp(ca.data<char>(), cb.data<char>(), ca.nbytes()) == 0;
}

// Every tensor of `want` is in `got` with the same bits, and `got` has nothing else.
void expect_same_tensors(const TensorFile& got, const TensorFile& want) {
  EXPECT_EQ(got.tensors.size(), want.tensors.size());
  for (const auto& [name, t] : want.tensors) {
    auto it = got.tensors.find(name);
    ASSERT_NE(it, got.tensors.end()) << name;
    EXPECT_TRUE(same_bits(it->second, t))
        << name << " " << shape_str(it->second.shape()) << " vs " << shape_str(t.shape());
  }
}

struct Case {
  const char* name;
  std::string dir;  // where the pair of files lives
};
std::string case_name(const ::testing::TestParamInfo<Case>& info) { return info.param.name; }
void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

// af2_model_tiny is in tests/data; af2_model_af2dims (AF2 model_1_ptm widths, 28 + 42 MB) is read
// from the shared golden folder when it exists.
const std::string kSharedGolden = "/work/shared/golden";
const Case kCases[] = {{"tiny", test::data_dir()}, {"af2dims", kSharedGolden}};

class Af2NpzTest : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    const std::string base = GetParam().dir + "/af2_model_" + GetParam().name;
    npz_ = base + ".npz";
    st_ = base + ".safetensors";
    if (!std::filesystem::exists(npz_) || !std::filesystem::exists(st_))
      GTEST_SKIP() << npz_ << " or " << st_ << " not present";
  }
  std::string npz_, st_;
};

TEST_P(Af2NpzTest, MappedNpzEqualsTheGoldenStateDictExactly) {
  TensorFile mapped;
  int64_t peak = 0;  // tracked bytes above the start while reading and mapping
  {
    MemoryScope scope;
    const Status st = read_weights(npz_, &mapped);
    ASSERT_TRUE(st.ok()) << st.ToString();
    peak = scope.peak_above_start();
  }
  // Never two copies: at most the parameters plus the largest AF2 array in transit.
  TensorFile npz;
  ASSERT_TRUE(read_npz(npz_, &npz).ok());
  int64_t total = 0, largest = 0;
  for (const auto& [name, t] : npz.tensors) {
    total += static_cast<int64_t>(t.nbytes());
    largest = std::max(largest, static_cast<int64_t>(t.nbytes()));
  }
  EXPECT_LE(peak, total + largest);
  const TensorFile golden = golden_params(st_);
  ASSERT_GT(golden.tensors.size(), 300u);
  expect_same_tensors(mapped, golden);
  for (const auto& [name, t] : mapped.tensors) EXPECT_TRUE(t.is_contiguous()) << name;
}

// The golden files list every AF2 key with its OpenFold name, transform and stacking (metadata
// npz_keys, written by the reference generator from OpenFold's importer); the table agrees.
TEST_P(Af2NpzTest, TableAgreesWithTheGoldenKeyList) {
  const TensorFile golden = golden_params(st_);
  const nlohmann::json keys = nlohmann::json::parse(golden.metadata.at("npz_keys"));
  const std::map<std::string, Af2Transform> transforms = {
      {"Other", Af2Transform::kIdentity},
      {"LinearWeight", Af2Transform::kLinear},
      {"LinearWeightMHA", Af2Transform::kHeadsIn},
      {"LinearBiasMHA", Af2Transform::kHeadsBias},
      {"LinearMHAOutputWeight", Af2Transform::kHeadsOut},
      {"LinearWeightOPM", Af2Transform::kOpmOut},
  };
  std::map<std::string, const Af2Param*> table;
  for (const Af2Param& p : af2_param_table()) table[p.af2] = &p;
  EXPECT_EQ(table.size(), af2_param_table().size());  // no key twice
  // These golden models have every optional part (templates, pTM head): the whole table.
  EXPECT_EQ(keys.size(), table.size());
  for (const auto& [key, info] : keys.items()) {
    SCOPED_TRACE(key);
    auto it = table.find(key);
    ASSERT_NE(it, table.end());
    EXPECT_EQ(it->second->openfold, info["openfold"].get<std::string>());
    EXPECT_EQ(it->second->stacked, info["stacked"].get<bool>());
    EXPECT_EQ(it->second->transform, transforms.at(info["transform"].get<std::string>()));
  }
}

TEST_P(Af2NpzTest, ReverseMapRoundTrips) {
  TensorFile npz;
  ASSERT_TRUE(read_npz(npz_, &npz).ok());
  const TensorFile golden = golden_params(st_);
  const nlohmann::json dims = nlohmann::json::parse(golden.metadata.at("dims"));
  const int64_t pointwise_heads = dims["template_pointwise_attention"]["no_heads"].get<int64_t>();

  // state dict -> AF2 keys: exactly the archive.
  TensorFile back;
  Status st = openfold_to_af2(golden, pointwise_heads, &back);
  ASSERT_TRUE(st.ok()) << st.ToString();
  expect_same_tensors(back, npz);
  // AF2 keys -> state dict -> AF2 keys.
  TensorFile sd, again;
  st = af2_to_openfold(TensorFile(npz), "npz", &sd);
  ASSERT_TRUE(st.ok()) << st.ToString();
  st = openfold_to_af2(sd, pointwise_heads, &again);
  ASSERT_TRUE(st.ok()) << st.ToString();
  expect_same_tensors(again, npz);
}

TEST_P(Af2NpzTest, OpenFoldNameListIsTheGoldenStateDict) {
  const TensorFile golden = golden_params(st_);
  const nlohmann::json dims = nlohmann::json::parse(golden.metadata.at("dims"));
  Af2ModelLayout layout;
  layout.evoformer_blocks = dims["evoformer"]["no_blocks"].get<int>();
  layout.extra_msa_blocks = dims["extra_msa_stack"]["no_blocks"].get<int>();
  layout.template_blocks = dims["template_pair_stack"]["no_blocks"].get<int>();
  const std::vector<std::string> names = openfold_param_names(layout);
  EXPECT_EQ(std::set<std::string>(names.begin(), names.end()),
            std::set<std::string>(golden.names.begin(), golden.names.end()));
  EXPECT_EQ(names.size(), golden.names.size());
  EXPECT_TRUE(check_param_names(golden, names, "golden").ok());
  // Without the optional parts, their names go.
  layout.templates = false;
  layout.tm_head = false;
  for (const std::string& n : openfold_param_names(layout)) {
    EXPECT_EQ(n.find("template"), std::string::npos) << n;
    EXPECT_EQ(n.find("aux_heads.tm"), std::string::npos) << n;
  }
}

INSTANTIATE_TEST_SUITE_P(Golden, Af2NpzTest, ::testing::ValuesIn(kCases), case_name);

TEST(ParamNames, BoltzNameListsAreTheGoldenStateDicts) {
  struct BoltzCase {
    std::string path;
    BoltzModuleKind kind;
    int blocks;
  };
  const BoltzCase cases[] = {
      {test::data_path("pairformer_tiny.safetensors"), BoltzModuleKind::kPairformer, 2},
      {test::data_path("msa_module_tiny.safetensors"), BoltzModuleKind::kMsaModule, 2},
      {kSharedGolden + "/pairformer_af3dims.safetensors", BoltzModuleKind::kPairformer, 1},
  };
  for (const BoltzCase& c : cases) {
    SCOPED_TRACE(c.path);
    if (!std::filesystem::exists(c.path)) continue;  // the af3dims file: shared folder only
    const TensorFile golden = golden_params(c.path);
    EXPECT_EQ(boltz_param_names(c.kind, c.blocks), golden.names);  // state_dict order too
  }
}

TEST(ParamNames, MissingParameterIsNamed) {
  TensorFile f;
  f.put("layers.0.pre_norm_s.weight", Tensor::zeros({4}));
  const Status st =
      check_param_names(f, boltz_param_names(BoltzModuleKind::kPairformer, 1), "w.safetensors");
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.message().find("w.safetensors: parameter 'layers.0.pre_norm_s.bias' is missing"),
            std::string::npos)
      << st.message();
}

TEST(ParamNames, MappingErrorsNameTheKey) {
  const std::string root = "alphafold/alphafold_iteration/";
  struct Bad {
    std::string key;
    Shape shape;
    const char* expect;
  };
  const Bad cases[] = {
      {root + "evoformer/bogus//weights", {2, 2}, "unknown AlphaFold parameter"},
      {root + "evoformer/preprocess_1d//weights", {2, 2, 2}, "expected rank 2"},
      {root + "evoformer/evoformer_iteration/outer_product_mean//output_w",
       {1, 4, 4},
       "per block, expected rank 3"},
      {root + "evoformer/evoformer_iteration/pair_transition/transition1//bias",
       {},
       "no leading block axis"},
  };
  for (const Bad& b : cases) {
    SCOPED_TRACE(b.key);
    TensorFile npz, out;
    npz.put(b.key, Tensor::zeros(b.shape));
    const Status st = af2_to_openfold(std::move(npz), "p.npz", &out);
    ASSERT_FALSE(st.ok());
    EXPECT_NE(st.message().find("p.npz: "), std::string::npos) << st.message();
    EXPECT_NE(st.message().find(b.expect), std::string::npos) << st.message();
  }
  // Reverse: an unknown OpenFold name; a template pointwise attention without its head count.
  TensorFile sd, out;
  sd.put("evoformer.nonsense.weight", Tensor::zeros({2}));
  EXPECT_NE(openfold_to_af2(sd, 0, &out).message().find("has no AlphaFold key"), std::string::npos);
  TensorFile tp;
  tp.put("template_embedder.template_pointwise_att.mha.linear_q.weight", Tensor::zeros({4, 4}));
  EXPECT_NE(openfold_to_af2(tp, 0, &out).message().find("is not in the parameters"),
            std::string::npos);
  EXPECT_TRUE(openfold_to_af2(tp, 2, &out).ok());
}

TEST(ParamNames, SubmoduleStateDict) {
  TensorFile f;
  f.put("evoformer.blocks.0.x", Tensor::zeros({1}));
  f.put("evoformer.linear.weight", Tensor::zeros({1}));
  f.put("extra_msa_stack.blocks.0.x", Tensor::zeros({1}));
  f.metadata["k"] = "v";
  const TensorFile evo = submodule_state_dict(TensorFile(f), "evoformer");
  EXPECT_EQ(evo.names, (std::vector<std::string>{"blocks.0.x", "linear.weight"}));
  EXPECT_EQ(evo.metadata.at("k"), "v");
  // A file that already holds a stack alone is returned as it is.
  const TensorFile same = submodule_state_dict(TensorFile(evo), "evoformer");
  EXPECT_EQ(same.names, evo.names);
}

// ------------------------------------------------------------------------------------------ CLI

class ParamNamesCli : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = ::testing::TempDir() + "foldcube_pn_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string path(const std::string& name) const { return dir_ + "/" + name; }

  std::string dir_;
};

Tensor random_tensor(const Shape& shape, uint64_t seed) {
  Tensor t = Tensor::empty(shape);
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  for (int64_t i = 0; i < t.numel(); ++i) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    t.f32()[i] = static_cast<float>(static_cast<int64_t>(x >> 40) - (1 << 23)) / (1 << 23);
  }
  return t;
}

// The Evoformer and Extra-MSA stacks of af2_model_tiny run from the .npz weights give exactly the
// outputs they give from the golden safetensors file (the whole model's state dict plus features
// and traces: the CLI takes the stack's part). The npz file is named .bin: told by magic bytes.
TEST_F(ParamNamesCli, StacksFromNpzEqualStacksFromSafetensorsBitForBit) {
  const std::string npz = path("af2_params.bin");
  std::filesystem::copy_file(test::data_path("af2_model_tiny.npz"), npz);
  const std::string st = test::data_path("af2_model_tiny.safetensors");
  struct Stack {
    const char* name;
    int64_t c_m;
    int64_t s;
  };
  for (const Stack& k : {Stack{"evoformer", 32, 6}, Stack{"extra_msa", 16, 10}}) {
    SCOPED_TRACE(k.name);
    const int64_t r = 12;
    TensorFile in;
    in.put("input.m", random_tensor({k.s, r, k.c_m}, 1));
    in.put("input.z", random_tensor({r, r, 16}, 2));
    const std::string inputs = path(std::string(k.name) + "_in.safetensors");
    ASSERT_TRUE(write_safetensors(inputs, in).ok());
    TensorFile outs[2];
    const std::string weights[2] = {npz, st};
    for (int w = 0; w < 2; ++w) {
      const std::string out = path(std::string(k.name) + std::to_string(w) + ".safetensors");
      const test::Result res =
          test::run_cli("run --weights " + weights[w] + " --stack " + k.name + " --inputs " +
                        inputs + " --out " + out + " --threads 2");
      ASSERT_EQ(res.code, 0) << res.out;
      ASSERT_TRUE(read_safetensors(out, &outs[w]).ok());
    }
    ASSERT_TRUE(outs[0].has("output.m") && outs[0].has("output.z"));
    EXPECT_EQ(outs[0].has("output.s"), std::string(k.name) == "evoformer");
    expect_same_tensors(outs[0], outs[1]);
    for (const char* o : {"output.m", "output.z"}) {
      const Tensor& t = outs[0].tensors.at(o);
      EXPECT_FALSE(same_bits(t, in.tensors.at(std::string("input.") + (o + 7)))) << "no update";
    }
  }
}

// The whole AlphaFold model loaded from the .npz gives bit for bit the outputs it gives from the
// golden state dict, each with the config inferred from its own file (the .npz reader keeps the
// template pointwise-attention head count, which the flattened state dict does not show).
TEST(ParamNames, AlphaFoldFromNpzEqualsAlphaFoldFromSafetensors) {
  TensorFile golden, mapped;
  ASSERT_TRUE(read_safetensors(test::data_path("af2_model_tiny.safetensors"), &golden).ok());
  const Status st = read_weights(test::data_path("af2_model_tiny.npz"), &mapped);
  ASSERT_TRUE(st.ok()) << st.ToString();
  AlphaFoldConfig cfg;
  ASSERT_TRUE(alphafold_config_from_weights(golden, &cfg).ok());
  AlphaFoldConfig cfg_npz;
  ASSERT_TRUE(alphafold_config_from_weights(mapped, &cfg_npz).ok());
  EXPECT_EQ(cfg_npz.template_att_heads, cfg.template_att_heads);
  EXPECT_EQ(cfg_npz.template_att_hidden, cfg.template_att_hidden);
  // The structure-module layer count is in neither file's shapes: AF2's 8 for an .npz; the tiny
  // golden model has 2 (its metadata says so).
  EXPECT_EQ(cfg_npz.structure_layers, 8);
  cfg_npz.structure_layers = cfg.structure_layers;
  AlphaFold from_st, from_npz;
  ASSERT_TRUE(AlphaFold::load(cfg, golden, &from_st).ok());
  const Status load = AlphaFold::load(cfg_npz, mapped, &from_npz);
  ASSERT_TRUE(load.ok()) << load.ToString();
  FeatureDict feats;
  for (const std::string& n : golden.names)
    if (n.rfind("feature.", 0) == 0) feats[n.substr(8)] = golden.tensors.at(n);
  std::map<std::string, Tensor> a, b;
  ASSERT_TRUE(from_st.forward(feats, &a).ok());
  ASSERT_TRUE(from_npz.forward(feats, &b).ok());
  ASSERT_EQ(a.size(), b.size());
  for (const auto& [name, t] : a) {
    ASSERT_TRUE(b.count(name)) << name;
    EXPECT_TRUE(same_bits(t, b.at(name))) << name;
  }
  EXPECT_GT(a.count("final_atom_positions"), 0u);
}

// run --model af2 from the AlphaFold .npz of af2_model_af2dims gives bit for bit the outputs of
// the run from the golden safetensors. (At AF2 widths every count the parameters do not hold, the
// template pointwise-attention heads, is AlphaFold's default; the tiny case's is not.)
TEST_F(ParamNamesCli, AlphaFoldModelFromNpzEqualsFromSafetensors) {
  const std::string base = kSharedGolden + "/af2_model_af2dims";
  if (!std::filesystem::exists(base + ".npz") || !std::filesystem::exists(base + ".safetensors"))
    GTEST_SKIP() << base << ".npz/.safetensors not present";
  TensorFile outs[2];
  const std::string weights[2] = {base + ".npz", base + ".safetensors"};
  for (int w = 0; w < 2; ++w) {
    const std::string out = path("af2_" + std::to_string(w) + ".safetensors");
    const test::Result res =
        test::run_cli("run --model af2 --recycles 0 --threads 2 --weights " + weights[w] +
                      " --features " + base + ".safetensors --out " + out);
    ASSERT_EQ(res.code, 0) << res.out;
    ASSERT_TRUE(read_safetensors(out, &outs[w]).ok());
  }
  EXPECT_TRUE(outs[0].has("output.final_atom_positions"));
  expect_same_tensors(outs[0], outs[1]);
}

TEST_F(ParamNamesCli, BadNpzWeightsAreOneLineErrors) {
  const std::string npz = path("bad.npz");
  TensorFile f;
  f.put("alphafold/alphafold_iteration/evoformer/unknown//weights", Tensor::zeros({2, 2}));
  std::ofstream(npz, std::ios::binary) << test::npz_of(f);
  test::Result r = test::run_cli("run --weights " + npz + " --s 4 --r 4");
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_NE(r.out.find("foldcube: error: " + npz + ": unknown AlphaFold parameter"),
            std::string::npos)
      << r.out;
  std::ofstream(path("cut.npz"), std::ios::binary)
      << test::npz_of(f).substr(0, 100);  // truncated archive
  r = test::run_cli("run --weights " + path("cut.npz") + " --s 4 --r 4");
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_NE(r.out.find("not a readable zip archive"), std::string::npos) << r.out;
}

}  // namespace
}  // namespace fc
