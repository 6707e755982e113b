// The block tables (src/model/block_table.h) and the per-layer interfaces they dispatch to:
// table invariants against the golden files' metadata and the weight structs, and per layer the
// forward vs the training forward and the workspace formula vs the tracking allocator.
#include "model/block_table.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "foldcube/io.h"
#include "foldcube/memory.h"
#include "foldcube/model.h"
#include "foldcube/runtime.h"
#include "model/common.h"
#include "model/train.h"
#include "model/weights.h"
#include "test_util.h"

namespace fc {
namespace {

using test::data_path;
using test::golden_err;
using test::small_config;

// "name:stream" per layer, as the golden metadata module_order lists them.
std::vector<std::string> trace_order(const BlockTable& t) {
  std::vector<std::string> out;
  for (const LayerDesc& l : t)
    out.push_back(std::string(l.name) + (l.updates == Stream::kM ? ":m" : ":z"));
  return out;
}

TEST(BlockTable, TraceNamesMatchGoldenModuleOrder) {
  const std::pair<const char*, const BlockTable*> cases[] = {
      {"evo_tiny.safetensors", &kEvoformerBlock},
      {"evo_af2dims.safetensors", &kEvoformerBlock},
      {"extra_tiny.safetensors", &kExtraMsaBlock}};
  for (const auto& [file, table] : cases) {
    TensorFile f;
    ASSERT_TRUE(read_safetensors(data_path(file), &f).ok()) << file;
    auto it = f.metadata.find("module_order");
    ASSERT_NE(it, f.metadata.end()) << file;
    const auto order = nlohmann::json::parse(it->second).get<std::vector<std::string>>();
    EXPECT_EQ(order, trace_order(*table)) << file;
  }
}

// Every layer reaches its own part of the weight struct, every parameter of the struct belongs to
// one layer (the OpenFold names' module part is a layer name), and the streams are consistent.
template <typename W>
void check_table_weights(const BlockTable& t, const W& w) {
  std::set<const void*> seen;
  std::set<std::string> names;
  for (const LayerDesc& l : t) {
    const char* p = static_cast<const char*>(l.params(&w));
    EXPECT_GE(p, reinterpret_cast<const char*>(&w)) << l.name;
    EXPECT_LT(p, reinterpret_cast<const char*>(&w + 1)) << l.name;
    EXPECT_TRUE(seen.insert(p).second) << l.name << " shares weights with another layer";
    EXPECT_TRUE(names.insert(l.name).second) << l.name;
    EXPECT_NE(l.updates, Stream::kNone) << l.name;
    EXPECT_NE(l.reads, l.updates) << l.name;
    EXPECT_EQ(l.rate == DropoutRate::kNone, l.share == DropoutShare::kNone) << l.name;
  }
  for (const auto& [name, view] : named_params(w, "")) {
    std::string module = name.substr(0, name.find('.'));
    if (module == "pair_stack") module = name.substr(11, name.find('.', 11) - 11);
    EXPECT_TRUE(names.count(module)) << name << " belongs to no layer of " << t.name;
  }
}

TEST(BlockTable, EveryLayerHasItsWeights) {
  const EvoformerConfig cfg = small_config();
  BlockWeights evo;
  allocate_block(cfg, &evo);
  check_table_weights(kEvoformerBlock, evo);
  ExtraMsaBlockWeights extra;
  allocate_extra_msa_block(cfg, &extra);
  check_table_weights(kExtraMsaBlock, extra);
  // The typed accessor checks the kind.
  EXPECT_EQ(&layer_params<TransitionW>(*find_layer(kEvoformerBlock, "pair_transition"), &evo),
            &evo.pair_transition);
  EXPECT_EQ(
      &layer_params<MsaColumnGlobalAttentionW>(*find_layer(kExtraMsaBlock, "msa_att_col"), &extra),
      &extra.msa_att_col);
  // The template pair block: pair layers only, in the template order, on BlockWeights.
  for (const LayerDesc& l : kTemplatePairBlock) {
    EXPECT_EQ(l.updates, Stream::kZ) << l.name;
    EXPECT_EQ(l.params(&evo), find_layer(kEvoformerBlock, l.name)->params(&evo)) << l.name;
  }
  EXPECT_EQ(std::string(kTemplatePairBlock.layers[0].name), "tri_att_start");
  EXPECT_DEATH(layer_params<TransitionW>(*find_layer(kEvoformerBlock, "tri_mul_in"), &evo),
               "no TransitionW");
}

// Streams, masks and weights for the per-layer tests (masks with zeros: the mask paths run).
struct LayerFixture {
  EvoformerConfig cfg = small_config();
  int64_t s = 5, r = 9;
  Tensor m, z;
  StackInputs in;
  explicit LayerFixture(uint64_t seed) {
    m = Tensor::empty({s, r, cfg.c_m});
    z = Tensor::empty({r, r, cfg.c_z});
    random_fill("test.m", m, seed);
    random_fill("test.z", z, seed);
    Tensor msa_mask = Tensor::full({s, r}, 1.f), pair_mask = Tensor::full({r, r}, 1.f);
    msa_mask.f32()[3] = 0.f;
    pair_mask.f32()[r + 2] = 0.f;
    FC_CHECK(prepare_inputs(cfg, m, z, msa_mask, pair_mask, &in).ok());
  }
  BlockContext context(int64_t chunk) const {
    BlockContext ctx = make_context(cfg, in, chunk);
    ctx.threads = num_threads();
    return ctx;
  }
};

class LayerUnits : public ::testing::TestWithParam<int64_t> {};

// The training forward (state kept or not) updates the stream as the inference forward does.
TEST_P(LayerUnits, TrainingForwardMatchesForward) {
  LayerFixture fx(11);
  const BlockContext ctx = fx.context(GetParam());
  BlockWeights w;
  allocate_block(fx.cfg, &w);
  for (auto& [name, view] : named_params(w, "")) random_fill(name, view, 5);
  for (const LayerDesc& l : kEvoformerBlock) {
    Tensor m0 = fx.m.clone(), z0 = fx.z.clone();
    layer_forward(l, &w, ctx, m0.f32(), z0.f32());
    for (bool keep : {true, false}) {
      Tensor m1 = fx.m.clone(), z1 = fx.z.clone();
      LayerState st;
      layer_train(l, &w, ctx, m1.f32(), z1.f32(), keep ? &st : nullptr);
      EXPECT_LT(golden_err(m1, m0), 1e-5) << l.name;
      EXPECT_LT(golden_err(z1, z0), 1e-5) << l.name;
    }
  }
}

// Each layer's workspace formula equals what the tracking allocator sees, for both tables.
TEST_P(LayerUnits, WorkspaceMatchesAllocator) {
  LayerFixture fx(12);
  BlockContext ctx = fx.context(GetParam());
  BlockWeights evo;
  allocate_block(fx.cfg, &evo);
  for (auto& [name, view] : named_params(evo, "")) random_fill(name, view, 6);
  ExtraMsaBlockWeights extra;
  allocate_extra_msa_block(fx.cfg, &extra);
  for (auto& [name, view] : named_params(extra, "")) random_fill(name, view, 6);
  for (const BlockTable* t : {&kEvoformerBlock, &kExtraMsaBlock}) {
    const void* w = t == &kEvoformerBlock ? static_cast<const void*>(&evo) : &extra;
    for (const LayerDesc& l : *t) {
      Tensor m = fx.m.clone(), z = fx.z.clone();
      MemoryScope scope;
      layer_forward(l, w, ctx, m.f32(), z.f32());
      EXPECT_EQ(scope.peak() - scope.start_live(), layer_workspace_bytes(l, ctx))
          << t->name << " " << l.name;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Chunks, LayerUnits, ::testing::Values(0, 1, 4),
                         [](const auto& info) { return "chunk" + std::to_string(info.param); });

}  // namespace
}  // namespace fc
