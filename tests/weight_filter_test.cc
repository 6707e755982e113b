// read_weights with a BlockFilter (foldcube/io.h): the stack blocks a DAP rank does not hold are
// never materialised, from safetensors and from a plain .npz, yet every tensor's shape is given
// (TensorShapes) and the whole AlphaFold config is inferred from them; block names parsed as
// documented. (The whole sharded load: DapAf2ShardedLoad in tests/dap_af2_test.cc.)
#include <gtest/gtest.h>
#include <stdlib.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "exec/af2_dap.h"
#include "foldcube/alphafold.h"
#include "foldcube/io.h"
#include "foldcube/memory.h"
#include "io/io_util.h"
#include "io/param_names.h"
#include "npz_util.h"
#include "test_util.h"

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
  // Every tensor of the file, the filtered ones included, in file order with its shape.
  void expect_all_shapes(const TensorShapes& shapes) {
    EXPECT_EQ(shapes.names, file_.names);
    ASSERT_EQ(shapes.shapes.size(), file_.names.size());
    for (const std::string& n : file_.names) EXPECT_EQ(shapes.shapes.at(n), Shape({2, 3})) << n;
    EXPECT_EQ(shapes.dim("evoformer.blocks.0.a", 1), 3);
    EXPECT_EQ(shapes.dim("evoformer.blocks.0.a", -2), 2);
    EXPECT_EQ(shapes.dim("evoformer.blocks.0.a", 2), -1);
    EXPECT_EQ(shapes.dim("absent", 0), -1);
  }
  std::string dir_;
  TensorFile file_;
  std::set<std::tuple<std::string, int64_t, int64_t>> asked_;
};

TEST_F(WeightFilter, SafetensorsKeepsOnlyTheBlocksAsked) {
  const std::string path = dir_ + "/w.safetensors";
  file_.metadata["kind"] = "test";
  ASSERT_TRUE(write_safetensors(path, file_).ok());
  TensorFile got;
  TensorShapes shapes;
  const Status st = read_weights(path, &got, filter(), &shapes);
  ASSERT_TRUE(st.ok()) << st.ToString();
  expect_filtered(got);
  expect_all_shapes(shapes);
  EXPECT_EQ(shapes.metadata, got.metadata);
  EXPECT_EQ(shapes.metadata.at("kind"), "test");
}

TEST_F(WeightFilter, PlainNpzKeepsOnlyTheBlocksAsked) {
  const std::string path = dir_ + "/w.npz";
  std::ofstream(path, std::ios::binary) << test::npz_of(file_);
  TensorFile got;
  TensorShapes shapes;
  const Status st = read_weights(path, &got, filter(), &shapes);
  ASSERT_TRUE(st.ok()) << st.ToString();
  expect_filtered(got);
  expect_all_shapes(shapes);
}

// A DAP rank's read of a whole AlphaFold model keeping only the middle block of every stack
// (3 Evoformer, 3 Extra-MSA, 3 template blocks): the first and last blocks are not read, yet the
// shapes are those of the unfiltered read (OpenFold names and shapes for an AlphaFold .npz) and
// the config inferred from them is the whole model's (the one the unfiltered read gives; the
// stacks' dimensions and block counts those the weights were made with), from a safetensors state
// dict and from the .npz.
TEST_F(WeightFilter, AlphaFoldConfigFromTheShapesOfAFilteredRead) {
  TensorFile tiny;
  ASSERT_TRUE(read_safetensors(test::data_path("af2_model_tiny.safetensors"), &tiny).ok());
  AlphaFoldConfig cfg;
  ASSERT_TRUE(alphafold_config_from_weights(tiny, &cfg).ok());
  cfg.evoformer.no_blocks = cfg.extra_msa.no_blocks = cfg.template_pair.no_blocks = 3;
  const TensorFile sd = AlphaFold::random_weights(cfg, 4);
  ASSERT_TRUE(write_safetensors(dir_ + "/w.safetensors", sd).ok());
  TensorFile af2;
  ASSERT_TRUE(openfold_to_af2(sd, cfg.template_att_heads, &af2).ok());
  std::ofstream(dir_ + "/w.npz", std::ios::binary) << test::npz_of(af2);
  auto json = [](const AlphaFoldConfig& c) {
    return c.evoformer.to_json() + c.extra_msa.to_json() + c.template_pair.to_json() +
           std::to_string(c.templates) + std::to_string(c.ptm) + " " +
           std::to_string(c.template_att_heads) + " " + std::to_string(c.template_att_hidden) +
           " " + std::to_string(c.ipa_heads) + " " + std::to_string(c.c_resnet);
  };
  const BlockFilter middle = [](const std::string&, int64_t b, int64_t) { return b == 1; };
  for (const char* file : {"/w.safetensors", "/w.npz"}) {
    SCOPED_TRACE(file);
    TensorFile whole, part;
    ASSERT_TRUE(read_weights(dir_ + file, &whole).ok());
    TensorShapes shapes;
    const Status st = read_weights(dir_ + file, &part, middle, &shapes);
    ASSERT_TRUE(st.ok()) << st.ToString();
    std::string stack;
    int64_t block = 0;
    int blocks_held = 0;
    for (const std::string& n : part.names)
      if (io::parse_block_name(n, &stack, &block)) {
        EXPECT_EQ(block, 1) << n;
        ++blocks_held;
      }
    EXPECT_GT(blocks_held, 0);
    const TensorShapes all = shapes_of(whole);
    EXPECT_EQ(std::set<std::string>(shapes.names.begin(), shapes.names.end()),
              std::set<std::string>(all.names.begin(), all.names.end()));
    EXPECT_EQ(shapes.shapes, all.shapes);
    EXPECT_EQ(shapes.metadata, part.metadata);
    AlphaFoldConfig from_whole, from_shapes, from_part;
    ASSERT_TRUE(alphafold_config_from_weights(whole, &from_whole).ok());
    ASSERT_TRUE(alphafold_config_from_shapes(shapes, &from_shapes).ok());
    EXPECT_EQ(json(from_shapes), json(from_whole));
    EXPECT_EQ(from_shapes.evoformer.to_json(), cfg.evoformer.to_json());
    EXPECT_EQ(from_shapes.extra_msa.to_json(), cfg.extra_msa.to_json());
    EXPECT_EQ(from_shapes.template_pair.to_json(), cfg.template_pair.to_json());
    // The held tensors alone lack block 0, which the config is read from.
    EXPECT_FALSE(alphafold_config_from_weights(part, &from_part).ok());
  }
  // A DAP rank's filter keeps its own blocks only, the stacks' first and last ones included.
  for (int rank = 0; rank < 2; ++rank)
    for (int64_t b = 0; b < 5; ++b)
      EXPECT_EQ(dap_weight_filter(2, rank)("evoformer.", b, 5), b % 2 == rank) << rank << " " << b;
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

// Random parameters generated with a DAP rank's filter are exactly the unfiltered ones without the
// other ranks' blocks (each tensor's values depend on its name only), and the filtered call never
// holds the left-out blocks: its tracked peak is below the whole file's bytes.
TEST(RandomWeights, AFilteredCallGivesTheSameTensorsWithoutTheOtherRanksBlocks) {
  TensorFile tiny;
  ASSERT_TRUE(read_safetensors(test::data_path("af2_model_tiny.safetensors"), &tiny).ok());
  AlphaFoldConfig cfg;
  ASSERT_TRUE(alphafold_config_from_weights(tiny, &cfg).ok());
  cfg.evoformer.no_blocks = 5;
  cfg.extra_msa.no_blocks = cfg.template_pair.no_blocks = 3;
  const TensorFile whole = AlphaFold::random_weights(cfg, 9);
  int64_t whole_bytes = 0;
  for (const std::string& n : whole.names) whole_bytes += whole.tensors.at(n).nbytes();
  for (int rank = 0; rank < 2; ++rank) {
    SCOPED_TRACE(rank);
    MemoryScope scope;
    const int64_t live0 = mem_stats().live_bytes;
    const TensorFile part = AlphaFold::random_weights(cfg, 9, dap_weight_filter(2, rank));
    EXPECT_LT(scope.peak() - live0, whole_bytes);
    std::set<std::string> expected;
    for (const std::string& n : whole.names) {
      std::string stack;
      int64_t block = 0;
      if (!io::parse_block_name(n, &stack, &block) || block % 2 == rank) expected.insert(n);
    }
    ASSERT_EQ(std::set<std::string>(part.names.begin(), part.names.end()), expected);
    for (const std::string& n : part.names) {
      const Tensor& a = part.tensors.at(n);
      const Tensor& b = whole.tensors.at(n);
      ASSERT_EQ(a.shape(), b.shape()) << n;
      EXPECT_EQ(std::memcmp(a.contiguous().f32(), b.contiguous().f32(), a.nbytes()), 0) << n;
    }
  }
}

}  // namespace
}  // namespace fc
