// safetensors reader/writer: golden files, round trips, and hostile inputs (every malformed file
// must give a non-OK Status naming the file, never a crash or a huge allocation).
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include <algorithm>
#include <csignal>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "foldcube/io.h"
#include "foldcube/memory.h"
#include "test_util.h"

namespace fc {
namespace {

std::string data_path(const std::string& name) {
  return std::string(test::data_dir()) + "/" + name;
}

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// Unlinks first: truncating a file that has dirty pages makes ext4 flush them (slow).
void write_bytes(const std::string& path, const std::string& bytes) {
  std::filesystem::remove(path);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string u64le(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>(v >> (8 * i));
  return s;
}

// A safetensors file from a header text and a data section.
std::string st_file(const std::string& header, const std::string& data) {
  return u64le(header.size()) + header + data;
}

// Each test gets its own fresh directory (tests of several builds may run at once).
class SafetensorsTest : public ::testing::Test {
 protected:
  std::string path(const std::string& name) const { return dir_.file(name); }
  // Names of the files in the test directory, sorted (to see leftover temporaries).
  std::vector<std::string> listing() const {
    std::vector<std::string> names;
    for (const auto& e : std::filesystem::directory_iterator(dir_.path()))
      names.push_back(e.path().filename().string());
    std::sort(names.begin(), names.end());
    return names;
  }

  test::TempDir dir_;
};

// ---------------------------------------------------------------------------- golden files

struct GoldenInfo {
  const char* file;  // without .safetensors
  size_t tensors;
  const char* kind;
  float input_m0;    // input.m[0, 0, 0]
  double output_m0;  // output.m[0, 0, 0]
  Shape input_m;
};

TEST_F(SafetensorsTest, ReadsGoldenFiles) {
  const GoldenInfo cases[] = {
      {"evo_tiny", 394, "evoformer", 0.4625253677368164f, -1.203451284415241, {8, 12, 32}},
      {"extra_tiny", 205, "extra_msa", -1.0697011947631836f, -1.8451783365723775, {10, 12, 16}},
      {"evo_af2dims", 208, "evoformer", -0.3001546263694763f, 0.43576789204717176, {16, 24, 256}},
  };
  for (const GoldenInfo& gc : cases) {
    SCOPED_TRACE(gc.file);
    TensorFile f;
    Status st = read_safetensors(data_path(std::string(gc.file) + ".safetensors"), &f);
    ASSERT_TRUE(st.ok()) << st.ToString();
    EXPECT_EQ(f.names.size(), gc.tensors);
    EXPECT_EQ(f.tensors.size(), gc.tensors);
    EXPECT_EQ(f.names.front(), "blocks.0.msa_att_row.layer_norm_m.weight");  // header order
    EXPECT_EQ(f.metadata.at("format"), "evoformer-golden/1");
    EXPECT_EQ(f.metadata.at("kind"), gc.kind);
    for (const char* key : {"config", "constants", "c_m", "c_z", "no_blocks", "module_order"})
      EXPECT_TRUE(f.metadata.count(key)) << key;

    Tensor m;
    st = f.get_f32("input.m", gc.input_m, &m);
    ASSERT_TRUE(st.ok()) << st.ToString();
    EXPECT_EQ(m.f32()[0], gc.input_m0);
    const Tensor& out_m = f.tensors.at("output.m");
    EXPECT_EQ(out_m.dtype(), DType::F64);
    EXPECT_EQ(out_m.shape(), gc.input_m);
    EXPECT_EQ(out_m.data<double>()[0], gc.output_m0);

    // Masks are exactly 0/1 with some zeros: checks that the bytes landed in the right place.
    Tensor mask;
    ASSERT_TRUE(f.get_f32("input.msa_mask", {gc.input_m[0], gc.input_m[1]}, &mask).ok());
    int64_t zeros = 0;
    for (int64_t i = 0; i < mask.numel(); ++i) {
      ASSERT_TRUE(mask.f32()[i] == 0.0f || mask.f32()[i] == 1.0f);
      zeros += mask.f32()[i] == 0.0f;
    }
    EXPECT_GT(zeros, 0);
    EXPECT_LT(zeros, mask.numel() / 2);
  }
}

TEST_F(SafetensorsTest, GetF32Errors) {
  TensorFile f;
  ASSERT_TRUE(read_safetensors(data_path("evo_tiny.safetensors"), &f).ok());
  Tensor t;
  Status st = f.get_f32("no.such.tensor", {}, &t);
  EXPECT_EQ(st.code(), Status::Code::kNotFound);
  EXPECT_NE(st.message().find("'no.such.tensor' not found"), std::string::npos) << st.message();

  st = f.get_f32("output.m", {}, &t);
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
  EXPECT_NE(st.message().find("'output.m' has dtype F64, expected F32"), std::string::npos)
      << st.message();

  st = f.get_f32("input.m", {8, 12, 33}, &t);
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
  EXPECT_NE(st.message().find("[8, 12, 32]"), std::string::npos) << st.message();
  EXPECT_NE(st.message().find("[8, 12, 33]"), std::string::npos) << st.message();
  EXPECT_FALSE(t.defined());  // untouched on error
}

TEST(TensorFile, PutKeepsFirstPosition) {
  TensorFile f;
  f.put("a", Tensor::full({1}, 1.0f));
  f.put("b", Tensor::full({1}, 2.0f));
  f.put("a", Tensor::full({2}, 3.0f));
  EXPECT_EQ(f.names, (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(f.tensors.at("a").shape(), Shape{2});
  EXPECT_TRUE(f.has("b"));
  EXPECT_FALSE(f.has("c"));
}

// ---------------------------------------------------------------------------- round trips

TEST_F(SafetensorsTest, RoundTripF32F64StridedAndMetadata) {
  Tensor a = Tensor::empty({3, 4}, DType::F32);
  for (int i = 0; i < 12; ++i) a.f32()[i] = 0.5f * i - 2.0f;
  Tensor b = Tensor::empty({2, 3, 5}, DType::F64);
  for (int i = 0; i < 30; ++i) b.data<double>()[i] = 1.0 / (i + 1);
  Tensor at = a.transpose(0, 1);              // [4, 3], non-contiguous
  Tensor bs = b.slice(2, 1, 4).select(0, 1);  // [3, 3], non-contiguous

  TensorFile f;
  f.put("z.transposed", at);  // names order differs from sorted order on purpose
  f.put("b.sliced", bs);
  f.put("scalar", Tensor::full({}, 7.25f));
  f.put("empty", Tensor::empty({0, 5}, DType::F64));
  f.metadata["format"] = "test/1";
  f.metadata["quote\"and\\back"] = "line\nbreak \xc3\xa9";  // escaping and UTF-8
  const std::string p = path("rt.safetensors");
  Status st = write_safetensors(p, f);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(listing(), std::vector<std::string>{"rt.safetensors"});  // no temporary left

  // Header: 8-byte multiple, __metadata__ first, tensors in names order.
  const std::string raw = read_bytes(p);
  uint64_t n = 0;
  std::memcpy(&n, raw.data(), 8);
  EXPECT_EQ(n % 8, 0u);
  const std::string header = raw.substr(8, n);
  EXPECT_EQ(header.rfind("{\"__metadata__\":", 0), 0u) << header;
  EXPECT_LT(header.find("z.transposed"), header.find("b.sliced"));
  EXPECT_EQ(raw.size(), 8 + n + (12 * 4 + 9 * 8 + 4));

  TensorFile g;
  st = read_safetensors(p, &g);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(g.names, f.names);
  EXPECT_EQ(g.metadata, f.metadata);
  const Tensor& ga = g.tensors.at("z.transposed");
  ASSERT_EQ(ga.shape(), (Shape{4, 3}));
  ASSERT_EQ(ga.dtype(), DType::F32);
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 3; ++j) EXPECT_EQ(ga.f32()[i * 3 + j], a.f32()[j * 4 + i]);
  const Tensor& gb = g.tensors.at("b.sliced");
  ASSERT_EQ(gb.shape(), (Shape{3, 3}));
  ASSERT_EQ(gb.dtype(), DType::F64);
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j)
      EXPECT_EQ(gb.data<double>()[i * 3 + j], b.data<double>()[15 + i * 5 + 1 + j]);
  EXPECT_EQ(g.tensors.at("scalar").shape(), Shape{});
  EXPECT_EQ(g.tensors.at("scalar").f32()[0], 7.25f);
  EXPECT_EQ(g.tensors.at("empty").shape(), (Shape{0, 5}));
}

TEST_F(SafetensorsTest, RoundTripIntegersStrided) {
  Tensor a = Tensor::empty({3, 4}, DType::I64);
  for (int i = 0; i < 12; ++i) a.data<int64_t>()[i] = (int64_t{1} << 40) * (i - 5);
  Tensor b = Tensor::empty({5}, DType::I32);
  for (int i = 0; i < 5; ++i) b.data<int32_t>()[i] = -7 * i;
  TensorFile f;
  f.put("a.t", a.transpose(0, 1));  // [4, 3], non-contiguous
  f.put("b", b);
  const std::string p = path("ints.safetensors");
  ASSERT_TRUE(write_safetensors(p, f).ok());
  TensorFile g;
  Status st = read_safetensors(p, &g);
  ASSERT_TRUE(st.ok()) << st.ToString();
  const Tensor& ga = g.tensors.at("a.t");
  ASSERT_EQ(ga.dtype(), DType::I64);
  ASSERT_EQ(ga.shape(), (Shape{4, 3}));
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 3; ++j)
      EXPECT_EQ(ga.data<int64_t>()[i * 3 + j], a.data<int64_t>()[j * 4 + i]);
  const Tensor& gb = g.tensors.at("b");
  ASSERT_EQ(gb.dtype(), DType::I32);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(gb.data<int32_t>()[i], -7 * i);
}

TEST_F(SafetensorsTest, RoundTripGoldenFile) {
  TensorFile f, g;
  ASSERT_TRUE(read_safetensors(data_path("evo_tiny.safetensors"), &f).ok());
  const std::string p = path("copy.safetensors");
  Status st = write_safetensors(p, f);
  ASSERT_TRUE(st.ok()) << st.ToString();
  st = read_safetensors(p, &g);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(g.names, f.names);
  EXPECT_EQ(g.metadata, f.metadata);
  for (const std::string& name : f.names) {
    const Tensor &x = f.tensors.at(name), &y = g.tensors.at(name);
    ASSERT_EQ(x.dtype(), y.dtype()) << name;
    ASSERT_EQ(x.shape(), y.shape()) << name;
    EXPECT_EQ(std::memcmp(x.data<char>(), y.data<char>(), x.nbytes()), 0) << name;
  }
}

TEST_F(SafetensorsTest, OverwriteReplacesFile) {
  const std::string p = path("over.safetensors");
  TensorFile f;
  f.put("x", Tensor::full({100}, 1.0f));
  ASSERT_TRUE(write_safetensors(p, f).ok());
  TensorFile small;
  small.put("y", Tensor::full({1}, 2.0f));
  ASSERT_TRUE(write_safetensors(p, small).ok());
  TensorFile g;
  ASSERT_TRUE(read_safetensors(p, &g).ok());
  EXPECT_EQ(g.names, std::vector<std::string>{"y"});
  EXPECT_TRUE(g.metadata.empty());
}

TEST_F(SafetensorsTest, WriteErrors) {
  TensorFile f;
  f.put("x", Tensor::full({2}, 1.0f));
  Status st = write_safetensors(path("no/such/dir/out.safetensors"), f);
  EXPECT_EQ(st.code(), Status::Code::kIOError);
  EXPECT_NE(st.message().find("no/such/dir/out.safetensors"), std::string::npos) << st.message();

  // Writing onto a directory is refused and leaves no temporary behind.
  std::filesystem::create_directory(path("adir"));
  st = write_safetensors(path("adir"), f);
  EXPECT_FALSE(st.ok());
  EXPECT_EQ(listing(), std::vector<std::string>{"adir"});

  TensorFile bf16;
  bf16.put("h", Tensor::empty({4}, DType::BF16));
  st = write_safetensors(path("bf16.safetensors"), bf16);
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
  EXPECT_NE(st.message().find("'h' has unsupported dtype BF16"), std::string::npos) << st.message();
  EXPECT_FALSE(std::filesystem::exists(path("bf16.safetensors")));

  TensorFile unlisted = f;
  unlisted.tensors["hidden"] = Tensor::full({1}, 0.0f);
  st = write_safetensors(path("u.safetensors"), unlisted);
  EXPECT_NE(st.message().find("'hidden' is not listed in names"), std::string::npos)
      << st.message();

  TensorFile missing = f;
  missing.names.push_back("ghost");
  st = write_safetensors(path("m.safetensors"), missing);
  EXPECT_NE(st.message().find("'ghost' is listed in names but has no tensor"), std::string::npos)
      << st.message();

  TensorFile bad_utf8 = f;
  bad_utf8.metadata["k"] = "\xff\xfe";
  st = write_safetensors(path("b.safetensors"), bad_utf8);
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument) << st.ToString();
}

// ---------------------------------------------------------------------------- hostile files

struct Hostile {
  const char* name;
  std::string bytes;
  const char* expect;  // substring of the message
};

const char kGood[] = R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";

std::vector<Hostile> hostile_cases() {
  const std::string d8(8, '\0');
  auto one = [&](const std::string& entry, const std::string& data) {
    return st_file("{\"t\":" + entry + "}", data);
  };
  return {
      {"empty", "", "too short"},
      {"four_bytes", "\x01\x02\x03\x04", "too short"},
      {"header_beyond_file", u64le(1000) + "{}", "exceeds the file size"},
      {"header_huge", u64le(uint64_t{1} << 62) + std::string(64, ' '), "exceeds the file size"},
      {"header_all_ones", u64le(~uint64_t{0}) + "{}", "exceeds the file size"},
      {"zero_header", u64le(0), "not valid JSON"},
      {"not_json", st_file("this is not json", ""), "not valid JSON"},
      {"truncated_json", st_file(R"({"t":{"dtype":"F32")", ""), "not valid JSON"},
      {"trailing_garbage", st_file("{} x", ""), "not valid JSON"},
      {"invalid_utf8", st_file("{\"\xff\":{}}", ""), "not valid JSON"},
      {"json_array", st_file("[1, 2, 3]", ""), "header is an array, not a JSON object"},
      {"json_string", st_file("\"hello\"", ""), "header is a string"},
      {"deep_nesting", st_file(std::string(100000, '['), ""), "header is an array"},
      {"entry_not_object", st_file(R"({"t": [1]})", ""), "'t' is an array, not an object"},
      {"missing_dtype", one(R"({"shape":[2],"data_offsets":[0,8]})", d8), "'t' has no 'dtype'"},
      {"missing_shape", one(R"({"dtype":"F32","data_offsets":[0,8]})", d8), "'t' has no 'shape'"},
      {"missing_offsets", one(R"({"dtype":"F32","shape":[2]})", d8), "has no 'data_offsets'"},
      {"dtype_not_string", one(R"({"dtype":4,"shape":[2],"data_offsets":[0,8]})", d8),
       "dtype is a number, not a string"},
      {"dtype_object", one(R"({"dtype":{},"shape":[2],"data_offsets":[0,8]})", d8),
       "dtype is an object"},
      {"unknown_dtype", one(R"({"dtype":"Q7","shape":[2],"data_offsets":[0,8]})", d8),
       "'t' has unsupported dtype 'Q7'"},
      {"f16_dtype", one(R"({"dtype":"F16","shape":[4],"data_offsets":[0,8]})", d8),
       "'t' has unsupported dtype 'F16'"},
      {"u8_dtype", one(R"({"dtype":"U8","shape":[8],"data_offsets":[0,8]})", d8),
       "'t' has unsupported dtype 'U8'"},
      {"i64_size_mismatch", one(R"({"dtype":"I64","shape":[2],"data_offsets":[0,8]})", d8), "'t'"},
      {"negative_dim", one(R"({"dtype":"F32","shape":[-2],"data_offsets":[0,8]})", d8),
       "'t' has a negative dimension (-2)"},
      {"float_dim", one(R"({"dtype":"F32","shape":[2.0],"data_offsets":[0,8]})", d8),
       "non-negative integers"},
      {"string_dim", one(R"({"dtype":"F32","shape":["2"],"data_offsets":[0,8]})", d8),
       "shape contains a string"},
      {"shape_not_array", one(R"({"dtype":"F32","shape":2,"data_offsets":[0,8]})", d8),
       "shape is a number, not an array"},
      {"dim_beyond_u64",
       one(R"({"dtype":"F32","shape":[99999999999999999999],"data_offsets":[0,8]})", d8),
       "non-negative integers"},
      {"shape_overflow",
       one(R"({"dtype":"F32","shape":[4294967296,4294967296,4],"data_offsets":[0,8]})", d8),
       "absurdly large shape"},
      {"shape_overflow_with_zero",
       one(R"({"dtype":"F32","shape":[4294967296,4294967296,0],"data_offsets":[0,0]})", ""),
       "absurdly large shape"},
      {"bytes_overflow",
       one(R"({"dtype":"F64","shape":[2305843009213693952,2],"data_offsets":[0,8]})", d8),
       "absurdly large shape"},
      {"size_mismatch", one(R"({"dtype":"F32","shape":[3],"data_offsets":[0,8]})", d8),
       "(8 bytes) but F32 [3] needs 12 bytes"},
      {"begin_after_end", one(R"({"dtype":"F32","shape":[2],"data_offsets":[8,0]})", d8),
       "begin > end"},
      {"one_offset", one(R"({"dtype":"F32","shape":[2],"data_offsets":[0]})", d8),
       "data_offsets must have 2 entries"},
      {"three_offsets", one(R"({"dtype":"F32","shape":[2],"data_offsets":[0,8,16]})", d8),
       "data_offsets must have 2 entries"},
      {"negative_offset", one(R"({"dtype":"F32","shape":[2],"data_offsets":[-8,0]})", d8),
       "negative data offset"},
      {"offsets_out_of_range", one(R"({"dtype":"F32","shape":[2],"data_offsets":[100,108]})", d8),
       "beyond the data section (8 bytes"},
      {"huge_offsets",
       one(R"({"dtype":"F32","shape":[2],"data_offsets":[18446744073709551608,18446744073709551615]})",
           d8),
       "(7 bytes) but F32 [2] needs 8 bytes"},
      {"overlap",
       st_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
               R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
               std::string(12, '\0')),
       "'b' overlaps tensor 'a'"},
      {"same_range",
       st_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
               R"("b":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}})",
               d8),
       "overlaps"},
      {"hole", one(R"({"dtype":"F32","shape":[1],"data_offsets":[4,8]})", d8), "hole of 4 bytes"},
      {"trailing_data", one(R"({"dtype":"F32","shape":[1],"data_offsets":[0,4]})", d8),
       "4 bytes of data after the last tensor"},
      {"duplicate_tensor",
       st_file(R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
               R"("t":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
               d8),
       "duplicate key 't'"},
      {"duplicate_field",
       one(R"({"dtype":"F32","dtype":"F64","shape":[2],"data_offsets":[0,8]})", d8),
       "duplicate 'dtype' field"},
      {"metadata_not_object", st_file(R"({"__metadata__": "x"})", ""), "__metadata__ is a string"},
      {"metadata_number_value", st_file(R"({"__metadata__": {"a": "b", "n": 5}})", ""),
       "__metadata__ value for 'n' is a number, not a string"},
      {"metadata_nested_value", st_file(R"({"__metadata__": {"o": {"x": "y"}}})", ""),
       "__metadata__ value for 'o' is an object"},
      {"metadata_duplicate_key", st_file(R"({"__metadata__": {"a": "1", "a": "2"}})", ""),
       "duplicate __metadata__ key 'a'"},
      {"metadata_twice", st_file(R"({"__metadata__": {}, "__metadata__": {}})", ""),
       "duplicate key '__metadata__'"},
      {"deep_unknown_field",
       one("{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8],\"x\":" +
               std::string(1000, '[') + std::string(1000, ']') + "}",
           d8),
       "nests too deeply"},
      {"control_chars_in_name",
       st_file("{\"a\\nb\":{\"dtype\":\"X\",\"shape\":[],\"data_offsets\":[0,0]}}", ""),
       "tensor 'a\\x0ab' has unsupported dtype"},
  };
}

TEST_F(SafetensorsTest, HostileFilesGiveClearErrors) {
  for (const Hostile& h : hostile_cases()) {
    SCOPED_TRACE(h.name);
    const std::string p = path(std::string(h.name) + ".safetensors");
    write_bytes(p, h.bytes);
    TensorFile f;
    f.names = {"sentinel"};
    const int64_t live_before = mem_stats().live_bytes;
    Status st = read_safetensors(p, &f);
    ASSERT_FALSE(st.ok());
    EXPECT_NE(st.message().find(p), std::string::npos) << st.message();
    EXPECT_NE(st.message().find(h.expect), std::string::npos) << st.message();
    EXPECT_EQ(st.message().find('\n'), std::string::npos) << st.message();
    EXPECT_EQ(f.names, std::vector<std::string>{"sentinel"});  // output untouched on error
    EXPECT_EQ(mem_stats().live_bytes, live_before);
  }
}

TEST_F(SafetensorsTest, AcceptsEdgeCasesOfTheFormat) {
  // No tensors at all; null metadata; unknown entry fields (nested too) are ignored; a zero-size
  // tensor may sit at the end; a header length that is not a multiple of 8.
  const std::string cases[] = {
      st_file("{}", ""),
      st_file(R"({"__metadata__": null})", ""),
      st_file(
          R"({"t":{"extra":{"a":[1,{"b":null}]},"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
          std::string(8, '\0')),
      st_file(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
              R"("e":{"dtype":"F64","shape":[3,0],"data_offsets":[8,8]}})",
              std::string(8, '\0')),
      st_file(std::string(kGood) + "   ", std::string(8, '\0')),
  };
  for (size_t i = 0; i < std::size(cases); ++i) {
    SCOPED_TRACE(i);
    const std::string p = path("ok" + std::to_string(i) + ".safetensors");
    write_bytes(p, cases[i]);
    TensorFile f;
    Status st = read_safetensors(p, &f);
    EXPECT_TRUE(st.ok()) << st.ToString();
  }
}

TEST_F(SafetensorsTest, MissingAndSpecialPaths) {
  TensorFile f;
  Status st = read_safetensors(path("does_not_exist.safetensors"), &f);
  EXPECT_EQ(st.code(), Status::Code::kNotFound);
  EXPECT_NE(st.message().find("does_not_exist.safetensors"), std::string::npos);

  st = read_safetensors(dir_.path(), &f);  // a directory
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("not a regular file"), std::string::npos) << st.message();

  const std::string fifo = path("fifo");
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  st = read_safetensors(fifo, &f);  // must not block waiting for a writer
  EXPECT_NE(st.message().find("not a regular file"), std::string::npos) << st.message();
}

// A header length inside the file but beyond the 100 MB cap is refused before it is read (the
// file is sparse, so this costs no disk space).
TEST_F(SafetensorsTest, HeaderLengthCap) {
  const std::string p = path("sparse.safetensors");
  const uint64_t header_len = uint64_t{200} << 20;
  write_bytes(p, u64le(header_len) + "{");
  std::filesystem::resize_file(p, 8 + header_len);
  TensorFile f;
  Status st = read_safetensors(p, &f);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("exceeds the 104857600-byte limit"), std::string::npos)
      << st.message();
}

TEST_F(SafetensorsTest, TruncatedGoldenFile) {
  const std::string full = read_bytes(data_path("evo_tiny.safetensors"));
  uint64_t n = 0;
  std::memcpy(&n, full.data(), 8);
  const size_t cuts[] = {full.size() - 1, full.size() / 2, 8 + n + 100, 8 + n, 8 + n / 2, 7};
  for (size_t cut : cuts) {
    SCOPED_TRACE(cut);
    const std::string p = path("cut.safetensors");
    write_bytes(p, full.substr(0, cut));
    TensorFile f;
    Status st = read_safetensors(p, &f);
    ASSERT_FALSE(st.ok());
    EXPECT_NE(st.message().find(p), std::string::npos) << st.message();
    if (cut > 8 + n) {
      EXPECT_NE(st.message().find("truncated"), std::string::npos) << st.message();
    }
  }
}

// Every truncation and many single-byte corruptions of a small valid file: no crash, and every
// truncation is rejected.
TEST_F(SafetensorsTest, MutationsNeverCrash) {
  TensorFile f;
  Tensor t = Tensor::empty({2, 3});
  for (int i = 0; i < 6; ++i) t.f32()[i] = static_cast<float>(i);
  f.put("w", t);
  f.put("v", Tensor::zeros({2}, DType::F64));
  f.metadata["k"] = "v";
  const std::string src = path("src.safetensors");
  ASSERT_TRUE(write_safetensors(src, f).ok());
  const std::string good = read_bytes(src);
  const std::string p = path("mut.safetensors");
  for (size_t len = 0; len < good.size(); ++len) {
    write_bytes(p, good.substr(0, len));
    TensorFile g;
    EXPECT_FALSE(read_safetensors(p, &g).ok()) << "truncated to " << len;
  }
  const unsigned char values[] = {0x00, 0x01, 0x7f, 0x80, 0xff, '"', '{', ']', '-', '9', ' '};
  int accepted = 0;
  for (size_t pos = 0; pos < good.size(); ++pos) {
    for (unsigned char v : values) {
      std::string bad = good;
      bad[pos] = static_cast<char>(v);
      write_bytes(p, bad);
      TensorFile g;
      Status st = read_safetensors(p, &g);
      if (st.ok()) {
        ++accepted;  // e.g. a changed data byte or metadata character: must still be coherent
        for (const auto& kv : g.tensors) EXPECT_TRUE(kv.second.defined());
      } else {
        EXPECT_NE(st.message().find(p), std::string::npos) << st.message();
      }
    }
  }
  EXPECT_GT(accepted, 0);
}

// A write that fails part way (here: the file size limit, as a full disk would) returns an error,
// leaves the previous file at the path byte for byte, and leaves no temporary behind.
TEST_F(SafetensorsTest, FailedWriteKeepsPreviousFile) {
  const std::string p = path("out.safetensors");
  TensorFile old;
  old.put("old", Tensor::full({4}, 3.0f));
  ASSERT_TRUE(write_safetensors(p, old).ok());
  const std::string before = read_bytes(p);

  TensorFile big;
  big.put("big", Tensor::zeros({1 << 18}));  // 1 MiB of data
  rlimit saved{};
  ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &saved), 0);
  auto old_handler = std::signal(SIGXFSZ, SIG_IGN);  // write() then fails with EFBIG
  rlimit small = saved;
  small.rlim_cur = 64 << 10;
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &small), 0);
  const Status st = write_safetensors(p, big);
  setrlimit(RLIMIT_FSIZE, &saved);
  std::signal(SIGXFSZ, old_handler);

  EXPECT_EQ(st.code(), Status::Code::kIOError);
  EXPECT_NE(st.message().find(p), std::string::npos) << st.message();
  EXPECT_EQ(read_bytes(p), before);
  EXPECT_EQ(listing(), std::vector<std::string>{"out.safetensors"});

  // Without a previous file the failed write leaves nothing at all.
  const std::string q = path("new.safetensors");
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &small), 0);
  old_handler = std::signal(SIGXFSZ, SIG_IGN);
  const Status st2 = write_safetensors(q, big);
  setrlimit(RLIMIT_FSIZE, &saved);
  std::signal(SIGXFSZ, old_handler);
  EXPECT_FALSE(st2.ok());
  EXPECT_EQ(listing(), std::vector<std::string>{"out.safetensors"});
}

// A device as the output is written in place (renaming over it would replace the device node):
// /dev/null takes the file, /dev/full refuses it with an error, and both stay devices.
TEST_F(SafetensorsTest, WritesToDevicesInPlace) {
  TensorFile f;
  f.put("x", Tensor::full({2}, 1.0f));
  Status st = write_safetensors("/dev/null", f);
  EXPECT_TRUE(st.ok()) << st.ToString();
  st = write_safetensors("/dev/full", f);
  EXPECT_EQ(st.code(), Status::Code::kIOError);
  EXPECT_NE(st.message().find("/dev/full"), std::string::npos) << st.message();
  EXPECT_TRUE(std::filesystem::is_character_file("/dev/null"));
  EXPECT_TRUE(std::filesystem::is_character_file("/dev/full"));
}

// The in-memory reader is the file reader: same result on a golden file, same messages (with
// the given name) on a hostile one.
TEST_F(SafetensorsTest, BytesReaderMatchesFileReader) {
  const std::string p = data_path("evo_tiny.safetensors");
  TensorFile a, b;
  ASSERT_TRUE(read_safetensors(p, &a).ok());
  Status st = parse_safetensors_bytes(read_bytes(p), "mem", &b);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(a.names, b.names);
  EXPECT_EQ(a.metadata, b.metadata);
  for (const std::string& n : a.names) {
    const Tensor& x = a.tensors.at(n);
    const Tensor& y = b.tensors.at(n);
    ASSERT_EQ(x.shape(), y.shape()) << n;
    EXPECT_EQ(std::memcmp(x.data<char>(), y.data<char>(), x.nbytes()), 0) << n;
  }
  for (const Hostile& h : hostile_cases()) {
    SCOPED_TRACE(h.name);
    TensorFile f;
    st = parse_safetensors_bytes(h.bytes, "mem", &f);
    ASSERT_FALSE(st.ok());
    EXPECT_EQ(st.message().rfind("mem: ", 0), 0u) << st.message();
    EXPECT_NE(st.message().find(h.expect), std::string::npos) << st.message();
  }
}

}  // namespace
}  // namespace fc
