// Per layer, the bf16 training step's memory replay against the tracking allocator: the training
// forward (state kept or not) and the backward of every layer of the Evoformer and ExtraMSA
// blocks, in bf16 storage (bf16 GEMM inputs: the weight copies and the operands' roundings are
// transient buffers inside a layer) and in fp32, by chunk sizes. A whole-step test sees only the
// step's largest layer, so a copy missing from any other layer's replay would pass it; here every
// layer's forward and backward peak must match byte for byte (dropping the bf16 copies of
// linear_2's backward from the transition's replay fails the 8 transition checks here).
// A copy made below a layer's peak changes no peak and no live count, so no allocator test can
// see it.
#include <gtest/gtest.h>

#include <string>

#include "foldcube/memory.h"
#include "foldcube/model.h"
#include "foldcube/runtime.h"
#include "model/block_table.h"
#include "model/common.h"
#include "model/train.h"
#include "model/weights.h"
#include "plan/memory_model.h"
#include "test_util.h"

namespace fc {
namespace {

struct LayerMemCase {
  DType store;
  int64_t chunk;
};
std::string case_name(const LayerMemCase& c) {
  return std::string(c.store == DType::BF16 ? "bf16" : "fp32") + "_chunk" + std::to_string(c.chunk);
}
void PrintTo(const LayerMemCase& c, std::ostream* os) { *os << case_name(c); }

class TrainLayerMemory : public ::testing::TestWithParam<LayerMemCase> {};

TEST_P(TrainLayerMemory, ForwardAndBackwardPeaksMatchReplay) {
  const LayerMemCase c = GetParam();
  const EvoformerConfig cfg = test::small_config();
  const int64_t s = 6, r = 10;
  Tensor m0 = Tensor::empty({s, r, cfg.c_m}), z0 = Tensor::empty({r, r, cfg.c_z});
  random_fill("test.m", m0, 3);
  random_fill("test.z", z0, 3);
  Tensor msa_mask = Tensor::full({s, r}, 1.f), pair_mask = Tensor::full({r, r}, 1.f);
  msa_mask.f32()[4] = 0.f;
  pair_mask.f32()[r + 3] = 0.f;
  StackInputs in;
  ASSERT_TRUE(prepare_inputs(cfg, m0, z0, msa_mask, pair_mask, &in).ok());
  TrainOptions opts;
  opts.chunk = c.chunk;
  opts.dtype = c.store;
  const BlockContext ctx = train_context(cfg, in, opts);
  BlockWeights evo, evo_g;
  allocate_block(cfg, &evo);
  allocate_block(cfg, &evo_g);
  ExtraMsaBlockWeights extra, extra_g;
  allocate_extra_msa_block(cfg, &extra);
  allocate_extra_msa_block(cfg, &extra_g);
  for (auto& [name, view] : named_params(evo, "")) random_fill(name, view, 4);
  for (auto& [name, view] : named_params(extra, "")) random_fill(name, view, 4);
  Tensor dm = Tensor::full(m0.shape(), 0.5f), dz = Tensor::full(z0.shape(), -0.5f);
  int checked = 0;
  for (const BlockTable* t : {&kEvoformerBlock, &kExtraMsaBlock}) {
    const bool is_evo = t == &kEvoformerBlock;
    const void* w = is_evo ? static_cast<const void*>(&evo) : &extra;
    void* g = is_evo ? static_cast<void*>(&evo_g) : &extra_g;
    for (const LayerDesc& l : *t) {
      for (bool keep : {true, false}) {
        SCOPED_TRACE(std::string(t->name) + " " + l.name + (keep ? " kept" : " recomputed"));
        Tensor m = m0.clone(), z = z0.clone();
        LayerState st;
        int64_t peak = 0, live = 0;
        {
          MemoryScope scope;
          layer_train(l, w, ctx, m.f32(), z.f32(), keep ? &st : nullptr);
          peak = scope.peak_above_start();
          live = mem_stats().live_bytes - scope.start_live();
        }
        const LayerReplayBytes fwd = layer_train_replay_bytes(ctx, l, keep);
        EXPECT_EQ(peak, fwd.peak);
        EXPECT_EQ(live, fwd.live);
        // The backward on the layer's input (m0, z0: the read stream is not changed by it).
        const float* read_in =
            l.reads == Stream::kNone ? nullptr : (l.reads == Stream::kM ? m0 : z0).f32();
        const float* x_in = (l.updates == Stream::kM ? m0 : z0).f32();
        {
          MemoryScope scope;
          const int64_t live0 = mem_stats().live_bytes;
          layer_backward(l, w, g, ctx, x_in, read_in, &st, dm.f32(), dz.f32());
          peak = scope.peak_above_start();
          live = mem_stats().live_bytes - live0;
        }
        const LayerReplayBytes bwd = layer_backward_replay_bytes(ctx, l, keep);
        EXPECT_EQ(peak, bwd.peak);
        EXPECT_EQ(live, bwd.live);
        ++checked;
      }
    }
  }
  EXPECT_EQ(checked, 2 * (kEvoformerBlock.count + kExtraMsaBlock.count));
}

INSTANTIATE_TEST_SUITE_P(Stores, TrainLayerMemory,
                         ::testing::Values(LayerMemCase{DType::BF16, 0},
                                           LayerMemCase{DType::BF16, 1},
                                           LayerMemCase{DType::BF16, 3},
                                           LayerMemCase{DType::F32, 0},
                                           LayerMemCase{DType::F32, 2}),
                         [](const auto& info) { return case_name(info.param); });

}  // namespace
}  // namespace fc
