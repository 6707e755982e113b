// read_weights with a BlockFilter (foldcube/io.h): the stack blocks a DAP rank does not hold are
// never materialised, from safetensors and from a plain .npz; block names parsed as documented.
// (The AlphaFold .npz path and the whole sharded load: DapAf2ShardedLoad in tests/dap_af2_test.cc.)
#include <gtest/gtest.h>
#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "foldcube/io.h"
#include "io/io_util.h"
#include "npz_util.h"

namespace fc {
namespace {

TEST(BlockNames, StackAndIndexOfBlockTensors) {
  std::string stack;
  int64_t block = -1;
  EXPECT_TRUE(io::parse_block_name("evoformer.blocks.12.msa_att_row.x", &stack, &block));
  EXPECT_EQ(stack, "evoformer.");
  EXPECT_EQ(block, 12);
  EXPECT_TRUE(io::parse_block_name("blocks.0.w", &stack, &block));
  EXPECT_EQ(stack, "");
  EXPECT_EQ(block, 0);
  EXPECT_TRUE(io::parse_block_name("a.b.blocks.3.c", &stack, &block));
  EXPECT_EQ(stack, "a.b.");
  EXPECT_EQ(block, 3);
  for (const char* other : {"linear.weight", "xblocks.1.w", "blocks.w", "blocks.1", "blocks.1x.w",
                            "evoformer.blocks..w"})
    EXPECT_FALSE(io::parse_block_name(other, &stack, &block)) << other;
}

class WeightFilter : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = ::testing::TempDir() + "foldcube_filter_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
    // Stack "evoformer." of 3 blocks, stack "" of 2, and a tensor outside any stack.
    for (const char* name : {"evoformer.blocks.0.a", "evoformer.blocks.1.a", "evoformer.blocks.2.a",
                             "blocks.0.b", "blocks.1.b", "head.w"}) {
      Tensor t = Tensor::empty({2, 3});  // [2, 3] values naming the tensor
      for (int64_t i = 0; i < 6; ++i) t.f32()[i] = static_cast<float>(file_.names.size() * 10 + i);
      file_.put(name, t);
    }
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  // Keeps evoformer block 1 and every block of "", recording each (stack, block, blocks) asked.
  BlockFilter filter() {
    return [this](const std::string& stack, int64_t b, int64_t blocks) {
      asked_.insert({stack, b, blocks});
      return stack != "evoformer." || b == 1;
    };
  }
  void expect_filtered(const TensorFile& got) {
    const std::vector<std::string> want = {"evoformer.blocks.1.a", "blocks.0.b", "blocks.1.b",
                                           "head.w"};
    EXPECT_EQ(got.names, want);
    EXPECT_EQ(got.tensors.size(), want.size());
    for (const std::string& n : want) {
      ASSERT_TRUE(got.has(n)) << n;
      const Tensor &a = got.tensors.at(n), &b = file_.tensors.at(n);
      ASSERT_EQ(a.shape(), b.shape()) << n;
      for (int64_t i = 0; i < 6; ++i) EXPECT_EQ(a.f32()[i], b.f32()[i]) << n;
    }
    const std::set<std::tuple<std::string, int64_t, int64_t>> asked = {
        {"evoformer.", 0, 3}, {"evoformer.", 1, 3}, {"evoformer.", 2, 3}, {"", 0, 2}, {"", 1, 2}};
    EXPECT_EQ(asked_, asked);
  }
  std::string dir_;
  TensorFile file_;
  std::set<std::tuple<std::string, int64_t, int64_t>> asked_;
};

TEST_F(WeightFilter, SafetensorsKeepsOnlyTheBlocksAsked) {
  const std::string path = dir_ + "/w.safetensors";
  ASSERT_TRUE(write_safetensors(path, file_).ok());
  TensorFile got;
  const Status st = read_weights(path, &got, filter());
  ASSERT_TRUE(st.ok()) << st.ToString();
  expect_filtered(got);
}

TEST_F(WeightFilter, PlainNpzKeepsOnlyTheBlocksAsked) {
  const std::string path = dir_ + "/w.npz";
  std::ofstream(path, std::ios::binary) << test::npz_of(file_);
  TensorFile got;
  const Status st = read_weights(path, &got, filter());
  ASSERT_TRUE(st.ok()) << st.ToString();
  expect_filtered(got);
}

// A tensor the filter drops is still validated: a truncated file is refused, naming the file.
TEST_F(WeightFilter, SkippedTensorsAreStillValidated) {
  const std::string path = dir_ + "/w.safetensors";
  ASSERT_TRUE(write_safetensors(path, file_).ok());
  std::filesystem::resize_file(path, std::filesystem::file_size(path) - 4);
  TensorFile got;
  const Status st = read_weights(path, &got, filter());
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find(path), std::string::npos) << st.message();
}

}  // namespace
}  // namespace fc
