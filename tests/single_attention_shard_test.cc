// The AF3 single attention on a token shard (src/layers/single_attention_shard.h) against the
// one-process layer it replaces under DAP (the MSA row attention unit on a one-row MSA): with one
// shard holding every token, forward and backward (input, pair and parameter gradients) agree.
// Several shards run under MPI (tests/dap_af3_cli_test.cc).
#include "layers/single_attention_shard.h"

#include <gtest/gtest.h>

#include <cstring>

#include "foldcube/af3.h"
#include "model/af3_weights.h"
#include "model/common.h"
#include "model/train.h"
#include "test_util.h"

namespace fc {
namespace {

// store: BlockContext::store (BF16: the bf16 training's roundings, which the shard form makes
// where the unit does, so the two still agree to f32 summation order; and differ from F32).
struct ShardRun {
  Tensor s, ds, dz;
  std::vector<Tensor> grads;  // every block parameter's gradient, in boltz_params order
};
void compare_one_shard(DType store, ShardRun* out_shard) {
  SCOPED_TRACE(store == DType::BF16 ? "bf16" : "fp32");
  Af3Config a;
  a.c_s = 24, a.c_z = 16, a.no_heads_single = 4, a.no_heads_pair = 2, a.c_hidden_pair = 8;
  a.no_blocks = 1;
  ASSERT_TRUE(a.validate().ok());
  const EvoformerConfig cfg = af3_trunk_config(a);
  const int64_t r = 9, c = cfg.c_m, cz = cfg.c_z, H = cfg.no_heads_msa, C = cfg.c_hidden_msa_att;
  PairformerBlockWeights w, g1, g2;
  allocate_pairformer_block(cfg, &w);
  allocate_pairformer_block(cfg, &g1);
  allocate_pairformer_block(cfg, &g2);
  for (const NamedParam& p : boltz_params(w, ""))
    for (const Tensor& part : p.parts) random_fill(p.name, part, 7);
  Tensor s = Tensor::empty({1, r, c}), z = Tensor::empty({r, r, cz});  // inputs
  random_fill("s", s, 1);
  random_fill("z", z, 2);
  Tensor mask = Tensor::full({1, r}, 1.f);
  mask.f32()[4] = 0.f;  // one masked key
  Tensor pair = Tensor::full({r, r}, 1.f);
  StackInputs in;
  ASSERT_TRUE(prepare_inputs(cfg, s, z, mask, pair, &in).ok());
  for (int64_t j = 0; j < r; ++j) in.msa_bias.f32()[j] = 1e6f * (mask.f32()[j] - 1.f);
  BlockContext ctx = make_context(cfg, in, 0, 0);
  ctx.store = store;
  const ShardGather one{1, [](const float* mine, int64_t n, float* all) {
                          std::memcpy(all, mine, n * sizeof(float));
                        }};
  const ShardReduce self{1, [](const float* all, int64_t n, float* mine) {
                           std::memcpy(mine, all, n * sizeof(float));
                         }};
  // Forward (the training forward of the unit: the roundings of ctx.store).
  Tensor s_ref = s.clone(), s_sh = s.clone();
  msa_row_attention_train(w.attention, ctx, s_ref.f32(), z.f32(), nullptr);
  single_attention_shard(w.attention, ctx, H, C, s_sh.f32(), r, z.f32(), in.msa_bias.f32(), one);
  EXPECT_LT(test::golden_err(s_sh, s_ref), 1e-5);
  // Backward from the same dL/d out.
  Tensor dout = Tensor::empty({1, r, c});
  random_fill("dout", dout, 3);
  Tensor ds1 = dout.clone(), ds2 = dout.clone();
  Tensor dz1 = Tensor::zeros({r, r, cz}), dz2 = Tensor::zeros({r, r, cz});
  {
    Tensor tmp = s.clone();
    AttentionState st;
    msa_row_attention_train(w.attention, ctx, tmp.f32(), z.f32(), &st);
    msa_row_attention_backward(w.attention, &g1.attention, ctx, s.f32(), z.f32(), &st, ds1.f32(),
                               dz1.f32());
  }
  single_attention_shard_backward(w.attention, &g2.attention, ctx, H, C, s.f32(), r, z.f32(),
                                  in.msa_bias.f32(), one, self, ds2.f32(), dz2.f32());
  EXPECT_LT(test::golden_err(ds2, ds1), 1e-5);
  EXPECT_LT(test::golden_err(dz2, dz1), 1e-5);
  const NamedParams p1 = boltz_params(g1, ""), p2 = boltz_params(g2, "");
  int compared = 0;  // every block parameter: the other layers' gradients are zero in both
  for (size_t i = 0; i < p1.size(); ++i) {
    EXPECT_LT(test::golden_err(gather_named(p2[i]), gather_named(p1[i])), 1e-5) << p1[i].name;
    out_shard->grads.push_back(gather_named(p2[i]));
    ++compared;
  }
  EXPECT_GE(compared, 8);
  *out_shard = ShardRun{s_sh, ds2, dz2, std::move(out_shard->grads)};
}

TEST(SingleAttentionShard, OneShardMatchesTheRowAttentionUnit) {
  ShardRun f32, bf16;
  compare_one_shard(DType::F32, &f32);
  compare_one_shard(DType::BF16, &bf16);
  // The bf16 roundings did happen (bf16's relative precision is 2^-8).
  EXPECT_GT(test::golden_err(bf16.s, f32.s), 1e-4);
  EXPECT_GT(test::golden_err(bf16.ds, f32.ds), 1e-4);
  double worst = 0;
  for (size_t i = 0; i < f32.grads.size(); ++i)
    worst = std::max(worst, test::normwise_err(bf16.grads[i], f32.grads[i]));
  EXPECT_GT(worst, 1e-3);
}

}  // namespace
}  // namespace fc
