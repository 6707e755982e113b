// .npz reader: the golden AlphaFold parameter archive, every supported dtype and layout, zip64,
// deflate, detection by magic bytes, and hostile archives (every malformed file gives a one-line
// error naming the file and member, never a crash, a hang or an allocation beyond the file).
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <zip.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "foldcube/io.h"
#include "foldcube/memory.h"
#include "npz_util.h"
#include "test_util.h"

namespace fc {
namespace {

using test::build_zip;
using test::bytes_of;
using test::npy;
using test::npy_raw;
using test::ZipEntry;

void write_bytes(const std::string& path, const std::string& bytes) {
  std::filesystem::remove(path);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

Status parse(const std::string& bytes, TensorFile* out, const std::string& label = "mem.npz") {
  return parse_npz_bytes(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), label, out);
}

// A deflated archive written by libzip itself (the test's zip builder writes stored members).
std::string deflated_zip(const std::vector<std::pair<std::string, std::string>>& members) {
  zip_error_t ze;
  zip_error_init(&ze);
  zip_source_t* src = zip_source_buffer_create(nullptr, 0, 0, &ze);
  zip_source_keep(src);
  zip_t* za = zip_open_from_source(src, ZIP_TRUNCATE, &ze);
  for (const auto& [name, data] : members) {
    zip_source_t* s = zip_source_buffer(za, data.data(), data.size(), 0);
    const zip_int64_t i = zip_file_add(za, name.c_str(), s, ZIP_FL_OVERWRITE);
    zip_set_file_compression(za, static_cast<zip_uint64_t>(i), ZIP_CM_DEFLATE, 9);
  }
  zip_close(za);
  zip_stat_t st;
  zip_source_stat(src, &st);
  std::string out(st.size, '\0');
  zip_source_open(src);
  zip_source_read(src, out.data(), out.size());
  zip_source_close(src);
  zip_source_free(src);
  zip_error_fini(&ze);
  return out;
}

class NpzTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = ::testing::TempDir() + "foldcube_npz_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string path(const std::string& name) const { return dir_ + "/" + name; }

  std::string dir_;
};

TEST_F(NpzTest, ReadsTheGoldenAlphaFoldArchive) {
  TensorFile f;
  const Status st = read_npz(test::data_path("af2_model_tiny.npz"), &f);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(f.names.size(), 338u);
  EXPECT_EQ(f.tensors.size(), 338u);
  const std::string first = "alphafold/alphafold_iteration/evoformer/preprocess_1d//weights";
  ASSERT_EQ(f.names.front(), first);
  EXPECT_EQ(f.tensors.at(first).shape(), (Shape{22, 32}));
  for (const auto& [name, t] : f.tensors) {
    EXPECT_EQ(t.dtype(), DType::F32) << name;
    EXPECT_TRUE(t.is_contiguous()) << name;
  }
  EXPECT_EQ(f.tensors
                .at("alphafold/alphafold_iteration/evoformer/evoformer_iteration/"
                    "msa_row_attention_with_pair_bias/attention//query_w")
                .shape(),
            (Shape{2, 32, 4, 8}));
}

TEST_F(NpzTest, EveryDtypeConvertsExactly) {
  const std::vector<float> f4 = {1.5f, -2.25f, 3e-39f, std::numeric_limits<float>::infinity()};
  const std::vector<double> f8 = {0.1, -1e300};
  // binary16: 1, -2, 65504 (max), 2^-24 (smallest subnormal), 2^-15 (subnormal), inf, -0.
  const std::vector<uint16_t> f2 = {0x3C00, 0xC000, 0x7BFF, 0x0001, 0x0200, 0x7C00, 0x8000};
  const std::vector<uint8_t> u1 = {0, 7, 255};
  const std::vector<uint8_t> b1 = {0, 1, 1, 0};
  const std::vector<int32_t> i4 = {-2147483647 - 1, 5};
  const std::vector<int64_t> i8 = {(int64_t{1} << 62) + 1, -(int64_t{1} << 53), 42};
  const std::string zip = build_zip({
      {"f4.npy", npy("<f4", "(2, 2)", bytes_of(f4))},
      {"f8.npy", npy("<f8", "(2,)", bytes_of(f8), false, 2)},
      {"f2.npy", npy("<f2", "(7,)", bytes_of(f2), false, 3)},
      {"u1.npy", npy("|u1", "(3,)", bytes_of(u1))},
      {"b1.npy", npy("|b1", "(2, 2)", bytes_of(b1))},
      {"i4.npy", npy("<i4", "(2L,)", bytes_of(i4))},
      {"i8.npy", npy("<i8", "(3,)", bytes_of(i8))},
      {"scalar.npy", npy("<f4", "()", bytes_of(std::vector<float>{7.f}))},
      {"empty.npy", npy("<f4", "(0, 3)", "")},
      {"no_suffix", npy("<f4", "(1,)", bytes_of(std::vector<float>{2.f}))},
  });
  TensorFile f;
  const Status st = parse(zip, &f);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(f.names, (std::vector<std::string>{"f4", "f8", "f2", "u1", "b1", "i4", "i8", "scalar",
                                               "empty", "no_suffix"}));
  auto values = [&](const std::string& name) {
    const Tensor t = f.tensors.at(name).to(DType::F64);
    return std::vector<double>(t.data<double>(), t.data<double>() + t.numel());
  };
  EXPECT_EQ(f.tensors.at("f4").dtype(), DType::F32);
  EXPECT_EQ(f.tensors.at("f4").shape(), (Shape{2, 2}));
  EXPECT_EQ(std::memcmp(f.tensors.at("f4").data<float>(), f4.data(), 16), 0);
  EXPECT_EQ(f.tensors.at("f8").dtype(), DType::F64);
  EXPECT_EQ(values("f8"), f8);
  EXPECT_EQ(f.tensors.at("f2").dtype(), DType::F32);
  const std::vector<double> f2_want = {1,
                                       -2,
                                       65504,
                                       std::ldexp(1.0, -24),
                                       std::ldexp(1.0, -15),
                                       std::numeric_limits<double>::infinity(),
                                       -0.0};
  EXPECT_EQ(values("f2"), f2_want);
  EXPECT_TRUE(std::signbit(f.tensors.at("f2").data<float>()[6]));
  EXPECT_EQ(values("u1"), (std::vector<double>{0, 7, 255}));
  EXPECT_EQ(values("b1"), (std::vector<double>{0, 1, 1, 0}));
  EXPECT_EQ(f.tensors.at("i4").dtype(), DType::I32);
  EXPECT_EQ(std::memcmp(f.tensors.at("i4").data<int32_t>(), i4.data(), 8), 0);
  EXPECT_EQ(f.tensors.at("i8").dtype(), DType::I64);
  EXPECT_EQ(std::memcmp(f.tensors.at("i8").data<int64_t>(), i8.data(), 24), 0);
  EXPECT_EQ(f.tensors.at("scalar").shape(), Shape{});
  EXPECT_EQ(values("scalar"), std::vector<double>{7});
  EXPECT_EQ(f.tensors.at("empty").shape(), (Shape{0, 3}));
  EXPECT_EQ(values("no_suffix"), std::vector<double>{2});
}

// A NaN half keeps being a NaN (any payload).
TEST_F(NpzTest, HalfNaNStaysNaN) {
  TensorFile f;
  ASSERT_TRUE(
      parse(build_zip({{"h.npy", npy("<f2", "(1,)", std::string("\x01\x7E", 2))}}), &f).ok());
  EXPECT_TRUE(std::isnan(f.tensors.at("h").f32()[0]));
}

TEST_F(NpzTest, FortranOrderComesBackInCOrder) {
  // The 2x3 array [[0, 1, 2], [3, 4, 5]] stored column by column.
  const std::vector<float> column_major = {0, 3, 1, 4, 2, 5};
  TensorFile f;
  const Status st =
      parse(build_zip({{"a.npy", npy("<f4", "(2, 3)", bytes_of(column_major), true)}}), &f);
  ASSERT_TRUE(st.ok()) << st.ToString();
  const Tensor& a = f.tensors.at("a");
  EXPECT_EQ(a.shape(), (Shape{2, 3}));
  ASSERT_TRUE(a.is_contiguous());
  for (int i = 0; i < 6; ++i) EXPECT_EQ(a.f32()[i], static_cast<float>(i));
}

// The same arrays stored, stored with zip64 records (what numpy writes), and deflated by libzip
// read the same.
TEST_F(NpzTest, StoredZip64AndDeflatedArchivesReadTheSame) {
  std::vector<float> big(5000);
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<float>(i % 17) * 0.25f;
  const std::string a = npy("<f4", "(50, 100)", bytes_of(big));
  const std::string b = npy("<f8", "(3,)", bytes_of(std::vector<double>{1, 2, 3}));
  const std::string archives[] = {
      build_zip({{"a.npy", a}, {"b.npy", b}}),
      build_zip({{"a.npy", a}, {"b.npy", b}}, /*zip64=*/true),
      deflated_zip({{"a.npy", a}, {"b.npy", b}}),
  };
  EXPECT_LT(archives[2].size(), archives[0].size() / 4);  // really deflated
  for (size_t k = 0; k < std::size(archives); ++k) {
    SCOPED_TRACE(k);
    TensorFile f;
    const Status st = parse(archives[k], &f);
    ASSERT_TRUE(st.ok()) << st.ToString();
    ASSERT_EQ(f.names, (std::vector<std::string>{"a", "b"}));
    EXPECT_EQ(f.tensors.at("a").shape(), (Shape{50, 100}));
    EXPECT_EQ(std::memcmp(f.tensors.at("a").data<char>(), big.data(), big.size() * 4), 0);
    EXPECT_EQ(f.tensors.at("b").data<double>()[2], 3.0);
  }
}

TEST_F(NpzTest, ReadTensorFileTellsFormatsByMagicNotName) {
  // An npz named .safetensors and a safetensors file named .npz.
  const std::string npz_as_st = path("weights.safetensors");
  const std::string st_as_npz = path("weights.npz");
  std::filesystem::copy_file(test::data_path("af2_model_tiny.npz"), npz_as_st);
  std::filesystem::copy_file(test::data_path("extra_tiny.safetensors"), st_as_npz);
  TensorFile a, b;
  Status st = read_tensor_file(npz_as_st, &a);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(a.names.size(), 338u);
  st = read_tensor_file(st_as_npz, &b);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(b.metadata.at("kind"), "extra_msa");
  // An empty archive (numpy.savez with no arrays) starts with the end record.
  write_bytes(path("empty.npz"), build_zip({}));
  TensorFile c;
  st = read_tensor_file(path("empty.npz"), &c);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_TRUE(c.names.empty());
}

TEST_F(NpzTest, MissingAndSpecialPaths) {
  TensorFile f;
  Status st = read_npz(path("nope.npz"), &f);
  EXPECT_EQ(st.code(), Status::Code::kNotFound);
  EXPECT_NE(st.message().find("nope.npz"), std::string::npos);
  st = read_tensor_file(path("nope.npz"), &f);
  EXPECT_EQ(st.code(), Status::Code::kNotFound);
  st = read_npz(dir_, &f);
  EXPECT_NE(st.message().find("not a regular file"), std::string::npos) << st.message();
  const std::string fifo = path("fifo");
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  st = read_tensor_file(fifo, &f);  // must not block waiting for a writer
  EXPECT_NE(st.message().find("not a regular file"), std::string::npos) << st.message();
}

// ------------------------------------------------------------------------------ hostile archives

struct Hostile {
  const char* name;
  std::string bytes;
  const char* expect;  // substring of the error message
};

std::string f4_data(int n) { return std::string(static_cast<size_t>(4 * n), '\0'); }

std::vector<Hostile> hostile_cases() {
  const std::string good = npy("<f4", "(2,)", f4_data(2));
  auto one = [](const std::string& member) { return build_zip({{"x.npy", member}}); };
  auto header = [&](const std::string& h) { return one(npy_raw(h, f4_data(2))); };
  std::string v9 = good;
  v9[6] = 9;
  std::string long_header = good;  // declared header length beyond the member
  long_header[8] = '\xff';
  long_header[9] = '\x7f';
  std::string huge_v2 = npy("<f4", "(2,)", f4_data(2), false, 2);  // 4 GB header length
  huge_v2[8] = huge_v2[9] = huge_v2[10] = huge_v2[11] = '\xff';
  ZipEntry bad_crc{"x.npy", good};
  bad_crc.crc = 1234;
  bad_crc.crc_set = true;
  ZipEntry size_lie{"x.npy", good};  // zip64 records claim a terabyte in a tiny file
  size_lie.size = size_lie.comp_size = uint64_t{1} << 40;
  ZipEntry deflate_lie{"x.npy", std::string("\x03\x00", 2), 8};  // empty deflate stream
  deflate_lie.size = uint64_t{1} << 30;
  ZipEntry bzip2{"x.npy", good, 12};
  ZipEntry encrypted{"x.npy", good};
  encrypted.flags = 1;
  ZipEntry offset_lie{"x.npy", good};
  offset_lie.offset = uint64_t{1} << 40;
  return {
      {"empty_file", "", "not a readable zip archive"},
      {"not_a_zip", std::string(100, 'x'), "not a readable zip archive"},
      {"short_member", one("\x93NUMPY"), "too short for a .npy header"},
      {"bad_magic", one("NOTNUMPY\x10\x00" + std::string(16, ' ')), "bad magic"},
      {"version_9", one(v9), "unsupported .npy format version 9.0"},
      {"header_beyond_member", one(long_header), "exceeds the member"},
      {"header_over_limit", one(huge_v2), "exceeds the 1048576-byte limit"},
      {"header_not_dict", header("['descr', '<f4']"), "header is not a dict"},
      {"header_unterminated", header("{'descr': '<f4', 'fortran_order': False"),
       "expected ',' or '}'"},
      {"header_missing_shape", header("{'descr': '<f4', 'fortran_order': False}"),
       "lacks 'descr', 'fortran_order' or 'shape'"},
      {"header_extra_key",
       header("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 1}"),
       "unexpected key 'x'"},
      {"header_duplicate_key", header("{'descr': '<f4', 'descr': '<f4'}"), "duplicate key 'descr'"},
      {"header_negative_dim", header("{'descr': '<f4', 'fortran_order': False, 'shape': (-2,)}"),
       "negative dimension"},
      {"header_float_dim", header("{'descr': '<f4', 'fortran_order': False, 'shape': (2.0,)}"),
       "not a tuple of integers"},
      {"header_huge_dim",
       header("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,)}"),
       "absurd dimension"},
      {"header_too_many_dims",
       header("{'descr': '<f4', 'fortran_order': False, 'shape': (" +
              [] {
                std::string s;
                for (int i = 0; i < 65; ++i) s += "1,";
                return s;
              }() +
              ")}"),
       "more than 64 dimensions"},
      {"header_structured", header("{'descr': [('a', '<f4')], 'fortran_order': False}"),
       "structured dtypes are not supported"},
      {"header_big_endian", header("{'descr': '>f4', 'fortran_order': False, 'shape': (2,)}"),
       "unsupported dtype '>f4'"},
      {"header_object", header("{'descr': '|O', 'fortran_order': False, 'shape': (2,)}"),
       "unsupported dtype '|O'"},
      {"header_bad_bool", header("{'descr': '<f4', 'fortran_order': 0, 'shape': (2,)}"),
       "not True or False"},
      {"header_trailing", header("{'descr': '<f4', 'fortran_order': False, 'shape': (2,)} x"),
       "trailing characters"},
      {"header_escape", header("{'descr': '<f\\4', 'fortran_order': False, 'shape': (2,)}"),
       "'descr' is not a string"},
      {"shape_overflows_int64",
       header("{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296)}"),
       "absurdly large shape"},
      {"bytes_overflow_uint64",
       header("{'descr': '<f8', 'fortran_order': False, 'shape': (4611686018427387904, 2)}"),
       "absurdly large shape"},
      {"shape_mismatch", header("{'descr': '<f4', 'fortran_order': False, 'shape': (3,)}"),
       "needs 12 bytes but the member holds 8"},
      {"duplicate_names", build_zip({{"a.npy", good}, {"a", good}}), "duplicate array name 'a'"},
      {"directory_member", build_zip({{"d/", ""}}), "not an array name"},
      {"crc_mismatch", build_zip({bad_crc}), "CRC"},
      {"zip64_size_lie", build_zip({size_lie}, true), "not a readable zip archive"},
      {"zip64_offset_lie", build_zip({offset_lie}, true), "not a readable zip archive"},
      {"deflate_size_lie", build_zip({deflate_lie}), "more than deflate can expand"},
      {"bzip2_member", build_zip({bzip2}), "compression method 12 is not supported"},
      {"encrypted_member", build_zip({encrypted}), "encrypted members are not supported"},
  };
}

TEST_F(NpzTest, HostileArchivesGiveOneLineErrors) {
  for (const Hostile& h : hostile_cases()) {
    SCOPED_TRACE(h.name);
    const std::string p = path(std::string(h.name) + ".npz");
    write_bytes(p, h.bytes);
    for (bool from_file : {true, false}) {
      TensorFile f;
      f.names = {"sentinel"};
      const int64_t live_before = mem_stats().live_bytes;
      const Status st = from_file ? read_npz(p, &f) : parse(h.bytes, &f, p);
      ASSERT_FALSE(st.ok());
      EXPECT_NE(st.message().find(p), std::string::npos) << st.message();
      EXPECT_NE(st.message().find(h.expect), std::string::npos) << st.message();
      EXPECT_EQ(st.message().find('\n'), std::string::npos) << st.message();
      EXPECT_EQ(f.names, std::vector<std::string>{"sentinel"});  // untouched on error
      EXPECT_EQ(mem_stats().live_bytes, live_before);
    }
  }
}

// Members whose data overlap (here b, c and d sit inside a's data, each with its own consistent
// local header, so that every member alone looks valid): together they claim more bytes than the
// archive holds, which is refused before anything is read (libzip's own checks pass them). K such
// members on one large array would otherwise cost K times the file size in memory.
TEST_F(NpzTest, OverlappingMembersAreRefused) {
  const std::string payload = npy("<f4", "(4096,)", f4_data(4096));
  const std::string d = payload;
  const std::string c = test::local_header("d.npy", d) + d;
  const std::string b = test::local_header("c.npy", c) + c;
  const std::string a = test::local_header("b.npy", b) + b;
  const uint64_t a_data = 30 + 5;  // a's local header: 30 bytes + "a.npy"
  std::vector<ZipEntry> entries = {{"a.npy", a}, {"b.npy", b}, {"c.npy", c}, {"d.npy", d}};
  uint64_t offset = a_data;
  for (size_t k = 1; k < entries.size(); ++k) {
    entries[k].central_only = true;
    entries[k].offset = offset;
    offset += 30 + 5;  // the next local header follows this one's name
  }
  TensorFile f;
  const Status st = parse(build_zip(entries), &f);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.message().find("claim more bytes than the archive"), std::string::npos)
      << st.message();
}

std::string small_valid_archive() {
  return build_zip(
      {
          {"w.npy", npy("<f4", "(2, 3)", bytes_of(std::vector<float>{0, 1, 2, 3, 4, 5}))},
          {"b.npy", npy("<f8", "(2,)", bytes_of(std::vector<double>{1, 2}), false, 2)},
      },
      /*zip64=*/true);
}

TEST_F(NpzTest, EveryTruncationIsRejected) {
  const std::string good = small_valid_archive();
  TensorFile ok;
  ASSERT_TRUE(parse(good, &ok).ok());
  for (size_t len = 0; len < good.size(); ++len) {
    TensorFile f;
    const Status st = parse(good.substr(0, len), &f);
    EXPECT_FALSE(st.ok()) << "truncated to " << len;
    EXPECT_EQ(st.message().find('\n'), std::string::npos) << st.message();
  }
  // The same through a file, at a few cuts.
  for (size_t len : {size_t{0}, good.size() / 2, good.size() - 1}) {
    write_bytes(path("cut.npz"), good.substr(0, len));
    TensorFile f;
    EXPECT_FALSE(read_npz(path("cut.npz"), &f).ok()) << len;
  }
}

// Single-byte corruptions at every offset: never a crash; a rejected file names the source in
// one line; an accepted one is coherent (a changed data byte is caught by the CRC, so accepted
// files are those where the change did not matter, e.g. in a time field or header padding).
TEST_F(NpzTest, CorruptedBytesNeverCrash) {
  const std::string good = small_valid_archive();
  const unsigned char values[] = {0x00, 0x01, 0x7f, 0x80, 0xff, '(', ',', '9'};
  int accepted = 0, rejected = 0;
  for (size_t pos = 0; pos < good.size(); ++pos) {
    for (unsigned char v : values) {
      std::string bad = good;
      if (bad[pos] == static_cast<char>(v)) continue;
      bad[pos] = static_cast<char>(v);
      TensorFile f;
      const Status st = parse(bad, &f);
      if (st.ok()) {
        ++accepted;
        for (const auto& kv : f.tensors) EXPECT_TRUE(kv.second.defined());
      } else {
        ++rejected;
        EXPECT_NE(st.message().find("mem.npz"), std::string::npos) << st.message();
        EXPECT_EQ(st.message().find('\n'), std::string::npos) << st.message();
      }
    }
  }
  EXPECT_GT(rejected, 0);
  EXPECT_GT(accepted, 0);
}

}  // namespace
}  // namespace fc
