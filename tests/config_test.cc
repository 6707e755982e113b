// EvoformerConfig: golden metadata, validation, JSON round trip and bad input.
#include "foldcube/config.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "foldcube/io.h"
#include "test_util.h"

namespace fc {
namespace {

std::string data_path(const std::string& name) {
  return std::string(test::data_dir()) + "/" + name;
}

bool contains(const Status& st, const std::string& what) {
  return st.message().find(what) != std::string::npos;
}

void expect_same(const EvoformerConfig& a, const EvoformerConfig& b) {
  EXPECT_EQ(a.c_m, b.c_m);
  EXPECT_EQ(a.c_z, b.c_z);
  EXPECT_EQ(a.c_hidden_msa_att, b.c_hidden_msa_att);
  EXPECT_EQ(a.no_heads_msa, b.no_heads_msa);
  EXPECT_EQ(a.c_hidden_pair_att, b.c_hidden_pair_att);
  EXPECT_EQ(a.no_heads_pair, b.no_heads_pair);
  EXPECT_EQ(a.c_hidden_opm, b.c_hidden_opm);
  EXPECT_EQ(a.c_hidden_mul, b.c_hidden_mul);
  EXPECT_EQ(a.transition_n, b.transition_n);
  EXPECT_EQ(a.no_blocks, b.no_blocks);
  EXPECT_EQ(a.c_s, b.c_s);
  EXPECT_EQ(a.inf, b.inf);
  EXPECT_EQ(a.eps_ln, b.eps_ln);
  EXPECT_EQ(a.eps_opm, b.eps_opm);
}

// The golden README table.
struct GoldenSizes {
  const char* file;
  int64_t c_m, c_z, heads_msa, hidden_msa, heads_pair, hidden_pair, opm, mul, n, blocks, c_s;
};

TEST(EvoformerConfig, FromGoldenMetadata) {
  const GoldenSizes cases[] = {
      {"evo_tiny.safetensors", 32, 16, 4, 8, 2, 8, 8, 16, 4, 2, 24},
      {"evo_af2dims.safetensors", 256, 128, 8, 32, 4, 32, 32, 128, 4, 1, 384},
      {"extra_tiny.safetensors", 16, 16, 4, 8, 2, 8, 8, 16, 4, 1, 384},  // no c_s: default kept
  };
  for (const GoldenSizes& g : cases) {
    SCOPED_TRACE(g.file);
    TensorFile f;
    ASSERT_TRUE(read_safetensors(data_path(g.file), &f).ok());
    EvoformerConfig c;
    Status st = EvoformerConfig::from_metadata(f.metadata, &c);
    ASSERT_TRUE(st.ok()) << st.ToString();
    EXPECT_EQ(c.c_m, g.c_m);
    EXPECT_EQ(c.c_z, g.c_z);
    EXPECT_EQ(c.no_heads_msa, g.heads_msa);
    EXPECT_EQ(c.c_hidden_msa_att, g.hidden_msa);
    EXPECT_EQ(c.no_heads_pair, g.heads_pair);
    EXPECT_EQ(c.c_hidden_pair_att, g.hidden_pair);
    EXPECT_EQ(c.c_hidden_opm, g.opm);
    EXPECT_EQ(c.c_hidden_mul, g.mul);
    EXPECT_EQ(c.transition_n, g.n);
    EXPECT_EQ(c.no_blocks, g.blocks);
    EXPECT_EQ(c.c_s, g.c_s);
    EXPECT_EQ(c.inf, 1e9f);
    EXPECT_EQ(c.eps_ln, 1e-5f);  // not OpenFold's `eps` kwarg (1e-8, global attention)
    EXPECT_EQ(c.eps_opm, 1e-3f);
  }
}

TEST(EvoformerConfig, FromMetadataSeparateKeysAndErrors) {
  std::map<std::string, std::string> md = {
      {"c_m", "64"}, {"c_z", " 32 "}, {"c_s", "-"}, {"no_blocks", "3"}};
  EvoformerConfig c;
  ASSERT_TRUE(EvoformerConfig::from_metadata(md, &c).ok());
  EXPECT_EQ(c.c_m, 64);
  EXPECT_EQ(c.c_z, 32);
  EXPECT_EQ(c.c_s, 384);
  EXPECT_EQ(c.no_blocks, 3);

  // The `config` JSON alone is enough; the separate keys win over it.
  md = {{"config", R"({"c_m": 48, "c_z": 8, "eps": 1e-8})"}, {"c_z", "24"}};
  ASSERT_TRUE(EvoformerConfig::from_metadata(md, &c).ok());
  EXPECT_EQ(c.c_m, 48);
  EXPECT_EQ(c.c_z, 24);
  EXPECT_EQ(c.eps_ln, 1e-5f);

  const EvoformerConfig before = c;
  Status st = EvoformerConfig::from_metadata({{"format", "x"}}, &c);
  EXPECT_FALSE(st.ok());
  EXPECT_TRUE(contains(st, "no 'c_m'")) << st.message();
  st = EvoformerConfig::from_metadata({{"c_m", "abc"}}, &c);
  EXPECT_TRUE(contains(st, "'c_m' must be an integer, got 'abc'")) << st.message();
  st = EvoformerConfig::from_metadata({{"c_m", "0"}}, &c);
  EXPECT_TRUE(contains(st, "c_m must be in [1, ")) << st.message();
  st = EvoformerConfig::from_metadata({{"c_m", "8"}, {"constants", "{bad"}}, &c);
  EXPECT_TRUE(contains(st, "metadata 'constants': invalid JSON")) << st.message();
  st = EvoformerConfig::from_metadata({{"c_m", "8"}, {"constants", R"({"layer_norm_eps": "x"})"}},
                                      &c);
  EXPECT_TRUE(contains(st, "'layer_norm_eps' must be a finite number")) << st.message();
  expect_same(c, before);  // untouched on error
}

TEST(EvoformerConfig, DefaultsAreValid) { EXPECT_TRUE(EvoformerConfig().validate().ok()); }

TEST(EvoformerConfig, ValidateRejectsBadSizes) {
  const struct {
    const char* name;
    int64_t EvoformerConfig::*member;
  } fields[] = {
      {"c_m", &EvoformerConfig::c_m},
      {"c_z", &EvoformerConfig::c_z},
      {"c_hidden_msa_att", &EvoformerConfig::c_hidden_msa_att},
      {"no_heads_msa", &EvoformerConfig::no_heads_msa},
      {"c_hidden_pair_att", &EvoformerConfig::c_hidden_pair_att},
      {"no_heads_pair", &EvoformerConfig::no_heads_pair},
      {"c_hidden_opm", &EvoformerConfig::c_hidden_opm},
      {"c_hidden_mul", &EvoformerConfig::c_hidden_mul},
      {"transition_n", &EvoformerConfig::transition_n},
      {"no_blocks", &EvoformerConfig::no_blocks},
      {"c_s", &EvoformerConfig::c_s},
  };
  for (const auto& field : fields) {
    for (int64_t bad : {int64_t{0}, int64_t{-1}, int64_t{1} << 40}) {
      EvoformerConfig c;
      c.*field.member = bad;
      Status st = c.validate();
      EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
      EXPECT_TRUE(contains(st, std::string(field.name) + " must be in")) << st.message();
      EXPECT_TRUE(contains(st, "got " + std::to_string(bad))) << st.message();
    }
  }
  EvoformerConfig c;
  c.no_blocks = 2000;
  EXPECT_TRUE(contains(c.validate(), "no_blocks must be in [1, 1024]"));
  c = EvoformerConfig();
  c.eps_ln = 0.0f;
  EXPECT_TRUE(contains(c.validate(), "eps_ln must be a positive finite number"));
  c = EvoformerConfig();
  c.eps_opm = -1e-3f;
  EXPECT_TRUE(contains(c.validate(), "eps_opm must be a positive finite number, got -0.001"));
  c = EvoformerConfig();
  c.inf = std::numeric_limits<float>::infinity();
  EXPECT_FALSE(c.validate().ok());
}

TEST(EvoformerConfig, JsonRoundTrip) {
  EvoformerConfig a;
  a.c_m = 40;
  a.c_z = 20;
  a.c_hidden_msa_att = 5;
  a.no_heads_msa = 3;
  a.c_hidden_pair_att = 6;
  a.no_heads_pair = 7;
  a.c_hidden_opm = 9;
  a.c_hidden_mul = 11;
  a.transition_n = 2;
  a.no_blocks = 13;
  a.c_s = 17;
  a.inf = 3e4f;
  a.eps_ln = 1e-6f;
  a.eps_opm = 0.1f;
  const std::string text = a.to_json();
  for (const char* key : {"\"c_m\":40", "\"no_blocks\":13", "\"eps_ln\":1e-06", "\"eps_opm\":0.1",
                          "\"inf\":30000.0", "\"c_hidden_pair_att\":6"})
    EXPECT_NE(text.find(key), std::string::npos) << key << " in " << text;
  EvoformerConfig b;
  Status st = b.update_from_json(text);
  ASSERT_TRUE(st.ok()) << st.ToString();
  expect_same(a, b);
}

TEST(EvoformerConfig, UpdateFromJsonAcceptsStringsAndAliases) {
  EvoformerConfig c;
  Status st = c.update_from_json(
      R"({"c_m": "64", "c_z": 32.0, "no_blocks": " 2 ", "inf": "1e8", "eps": 1e-8,
          "layer_norm_eps": 1e-6, "outer_product_mean_eps": "0.01", "c_s": null,
          "msa_dropout": 0.15, "blocks_per_ckpt": null, "opm_first": false})");
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(c.c_m, 64);
  EXPECT_EQ(c.c_z, 32);
  EXPECT_EQ(c.no_blocks, 2);
  EXPECT_EQ(c.c_s, 384);  // null keeps the current value
  EXPECT_EQ(c.inf, 1e8f);
  EXPECT_EQ(c.eps_ln, 1e-6f);
  EXPECT_EQ(c.eps_opm, 0.01f);
  EXPECT_EQ(c.c_hidden_mul, 128);  // missing keys keep their value
}

TEST(EvoformerConfig, UpdateFromJsonRejectsBadInput) {
  const struct {
    const char* json;
    const char* expect;
  } cases[] = {
      {"", "invalid JSON"},
      {"{", "invalid JSON"},
      {"{\"c_m\": 1,}", "invalid JSON"},
      {"[1, 2]", "expected a JSON object"},
      {"42", "expected a JSON object"},
      {R"({"c_m": "abc"})", "'c_m' must be an integer, got \"abc\""},
      {R"({"c_m": "12abc"})", "'c_m' must be an integer"},
      {R"({"c_m": true})", "'c_m' must be an integer, got true"},
      {R"({"c_m": 1.5})", "'c_m' must be an integer, got 1.5"},
      {R"({"c_m": 1e30})", "'c_m' must be an integer"},
      {R"({"c_m": 18446744073709551615})", "'c_m' must be an integer"},
      {R"({"c_m": [32]})", "'c_m' must be an integer"},
      {R"({"no_blocks": {}})", "'no_blocks' must be an integer"},
      {R"({"inf": "big"})", "'inf' must be a finite number"},
      {R"({"eps_ln": 1e300})", "'eps_ln' must be a finite number"},
      {R"({"c_z": 16, "eps_opm": false})", "'eps_opm' must be a finite number"},
  };
  for (const auto& tc : cases) {
    SCOPED_TRACE(tc.json);
    EvoformerConfig c;
    c.c_z = 77;
    Status st = c.update_from_json(tc.json);
    EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
    EXPECT_TRUE(contains(st, tc.expect)) << st.message();
    EXPECT_EQ(st.message().find('\n'), std::string::npos) << st.message();
    EXPECT_EQ(c.c_z, 77);  // all or nothing
  }
}

TEST(EvoformerConfig, FromJsonFile) {
  const test::TempDir tmp;
  const std::string dir = tmp.path();
  auto write = [&](const std::string& name, const std::string& text) {
    std::ofstream(dir + "/" + name) << text;
    return dir + "/" + name;
  };
  EvoformerConfig c;
  Status st =
      EvoformerConfig::from_json_file(write("good.json", R"({"c_m": 32, "no_blocks": 2})"), &c);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(c.c_m, 32);
  EXPECT_EQ(c.no_blocks, 2);
  EXPECT_EQ(c.c_z, 128);

  st = EvoformerConfig::from_json_file(dir + "/missing.json", &c);
  EXPECT_EQ(st.code(), Status::Code::kNotFound);
  EXPECT_TRUE(contains(st, "missing.json")) << st.message();
  const std::string bad = write("bad.json", "{\"c_m\": ");
  st = EvoformerConfig::from_json_file(bad, &c);
  EXPECT_TRUE(contains(st, bad + ": invalid JSON")) << st.message();
  st = EvoformerConfig::from_json_file(write("zero.json", R"({"c_hidden_opm": 0})"), &c);
  EXPECT_TRUE(contains(st, "c_hidden_opm must be in")) << st.message();
  EXPECT_EQ(c.c_m, 32);  // untouched on error
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace fc
