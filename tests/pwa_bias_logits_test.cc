// The pair-weighted averaging's bias-only logits (GatedAttentionW::bias_logits, set by
// allocate_msa_module_block; kern::AttentionArgs::bias_logits): the MSA-module row attention unit
// with the flag against the same weights without it (the q.k products on its zero query and key
// projections, as before the mode existed), forward on the fused f32, fused bf16 and unfused
// paths, and the training forward and backward (input, pair and parameter gradients). The q | k
// rows of the weight gradient stay zero. Also: the block table says the same as the weights, and
// the cost model counts no q.k work for the layer.
#include <gtest/gtest.h>

#include "foldcube/af3.h"
#include "layers/gated_attention.h"
#include "model/af3_weights.h"
#include "model/block_table.h"
#include "model/common.h"
#include "model/train.h"
#include "test_util.h"

namespace fc {
namespace {

TEST(PairWeightedAveraging, BiasOnlyLogitsMatchZeroQueryKeyPath) {
  Af3Config a;
  a.kind = "msa_module";
  a.c_m = 16, a.c_z = 12, a.pwa_heads = 3, a.pwa_head_dim = 8, a.no_heads_pair = 2;
  a.c_hidden_pair = 4, a.c_hidden_opm = 4, a.no_blocks = 1;
  ASSERT_TRUE(a.validate().ok());
  const EvoformerConfig cfg = af3_trunk_config(a);
  const int64_t s = 5, r = 11, c = cfg.c_m, cz = cfg.c_z, hc = cfg.no_heads_msa * a.pwa_head_dim;
  MsaModuleBlockWeights w, g_on, g_off;
  allocate_msa_module_block(cfg, &w);
  allocate_msa_module_block(cfg, &g_on);
  allocate_msa_module_block(cfg, &g_off);
  ASSERT_TRUE(w.pair_weighted_averaging.mha.bias_logits);
  for (const NamedParam& p : boltz_params(w, ""))
    for (const Tensor& part : p.parts) random_fill(p.name, part, 7);
  const MsaRowAttentionW& on = w.pair_weighted_averaging;
  MsaRowAttentionW off = on;  // the same tensors, q.k products on the zero projections
  off.mha.bias_logits = false;
  Tensor m = Tensor::empty({s, r, c}), z = Tensor::empty({r, r, cz});  // inputs
  random_fill("m", m, 1);
  random_fill("z", z, 2);
  Tensor msa_mask = Tensor::full({s, r}, 1.f);
  msa_mask.f32()[3] = msa_mask.f32()[2 * r + 7] = 0.f;
  StackInputs in;
  ASSERT_TRUE(prepare_inputs(cfg, m, z, msa_mask, Tensor::full({r, r}, 1.f), &in).ok());
  BlockContext ctx = make_context(cfg, in, 0, 0);
  ctx.table = &kMsaModuleBlock;
  for (bool fused : {true, false})
    for (DType dt : {DType::F32, DType::BF16}) {
      if (!fused && dt == DType::BF16) continue;  // BF16 needs fused
      SCOPED_TRACE(std::string(fused ? "fused " : "unfused ") +
                   (dt == DType::F32 ? "f32" : "bf16"));
      BlockContext cx = ctx;
      cx.fused = fused, cx.dtype = dt;
      Tensor m_on = m.clone(), m_off = m.clone();
      msa_row_attention(on, cx, m_on.f32(), z.f32());
      msa_row_attention(off, cx, m_off.f32(), z.f32());
      EXPECT_LT(test::golden_err(m_on, m_off), 1e-6);
      EXPECT_GT(test::golden_err(m_on, m), 1e-3);  // the layer did something
    }
  // Training forward and backward from the same dL/d out.
  Tensor dout = Tensor::empty({s, r, c});
  random_fill("dout", dout, 3);
  Tensor dm_on = dout.clone(), dm_off = dout.clone();
  Tensor dz_on = Tensor::zeros({r, r, cz}), dz_off = Tensor::zeros({r, r, cz});
  auto step = [&](const MsaRowAttentionW& wt, MsaRowAttentionW* g, Tensor& dm, Tensor& dz) {
    Tensor tmp = m.clone();
    AttentionState st;
    msa_row_attention_train(wt, ctx, tmp.f32(), z.f32(), &st);
    msa_row_attention_backward(wt, g, ctx, m.f32(), z.f32(), &st, dm.f32(), dz.f32());
    return tmp;
  };
  const Tensor out_on = step(on, &g_on.pair_weighted_averaging, dm_on, dz_on);
  const Tensor out_off = step(off, &g_off.pair_weighted_averaging, dm_off, dz_off);
  EXPECT_LT(test::golden_err(out_on, out_off), 1e-6);
  EXPECT_LT(test::golden_err(dm_on, dm_off), 1e-6);
  EXPECT_LT(test::golden_err(dz_on, dz_off), 1e-6);
  const NamedParams p_on = boltz_params(g_on, ""), p_off = boltz_params(g_off, "");
  for (size_t i = 0; i < p_on.size(); ++i)
    EXPECT_LT(test::golden_err(gather_named(p_on[i]), gather_named(p_off[i])), 1e-6)
        << p_on[i].name;
  const float* gq = g_on.pair_weighted_averaging.mha.w_qkvg.f32();  // rows q | k first
  for (int64_t i = 0; i < 2 * hc * c; ++i) ASSERT_EQ(gq[i], 0.f) << i;
}

TEST(PairWeightedAveraging, TableAndCostModelSayBiasOnly) {
  EXPECT_TRUE(find_layer(kMsaModuleBlock, "pair_weighted_averaging")->bias_logits);
  EXPECT_FALSE(find_layer(kPairformerBlock, "attention")->bias_logits);
  EXPECT_FALSE(find_layer(kEvoformerBlock, "msa_att_row")->bias_logits);
  PairformerBlockWeights pw;
  allocate_pairformer_block(af3_trunk_config(Af3Config{}), &pw);
  EXPECT_FALSE(pw.attention.mha.bias_logits);
  // Work at N_msa = 64, n = 128, 8 heads of 32, c_m = 64: the q | k half of the projection and
  // the QK^T half of the attention products are gone.
  Af3Config a;
  a.kind = "msa_module";
  const EvoformerConfig cfg = af3_trunk_config(a);
  const BlockContext ctx = shape_context(cfg, 64, 128, 0, 0, 1);
  const WorkChunks ch{&ctx, false};
  const LayerWork full = attention_work(64, 128, 64, 8, 32, true, 128, 128, ch, nullptr, true);
  const LayerWork bias = attention_work(64, 128, 64, 8, 32, true, 128, 128, ch, nullptr, false);
  ASSERT_EQ(full.gemm.size(), bias.gemm.size());
  EXPECT_DOUBLE_EQ(bias.gemm[1].first, full.gemm[1].first / 2);  // q|k|v|g -> v|g
  EXPECT_DOUBLE_EQ(bias.att[0].first, full.att[0].first / 2);    // QK^T + PV -> PV
  EXPECT_DOUBLE_EQ(bias.att_scores, full.att_scores);
}

}  // namespace
}  // namespace fc
