// Training-mode dropout: mask statistics and sharing, reproducibility across recompute policies,
// and gradients of the dropped-out step against finite differences.
#include "model/dropout.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "core/rng.h"
#include "foldcube/model.h"
#include "test_util.h"

namespace fc {
namespace {

EvoformerConfig tiny_cfg() {
  EvoformerConfig cfg;
  cfg.c_m = 16;
  cfg.c_z = 8;
  cfg.c_hidden_msa_att = 4;
  cfg.no_heads_msa = 2;
  cfg.c_hidden_pair_att = 4;
  cfg.no_heads_pair = 2;
  cfg.c_hidden_opm = 4;
  cfg.c_hidden_mul = 8;
  cfg.c_s = 8;
  cfg.transition_n = 2;
  cfg.no_blocks = 2;
  return cfg;
}

TEST(Dropout, MaskStatisticsAndKeys) {
  EvoformerConfig cfg;
  BlockContext ctx;
  ctx.cfg = &cfg;
  EXPECT_FALSE(dropout_mask(ctx, "msa_att_row", 64, 32).defined());  // off
  ctx.dropout = true;
  ctx.dropout_key = 42;
  EXPECT_FALSE(dropout_mask(ctx, "msa_att_col", 64, 32).defined());  // AF2: no dropout there
  EXPECT_FALSE(dropout_mask(ctx, "outer_product_mean", 64, 32).defined());
  for (const char* module : {"msa_att_row", "tri_mul_out", "tri_att_end"}) {
    const float p = std::string(module) == "msa_att_row" ? cfg.msa_dropout : cfg.pair_dropout;
    Tensor m = dropout_mask(ctx, module, 256, 128);
    ASSERT_TRUE(m.defined());
    int64_t zeros = 0;
    for (int64_t i = 0; i < m.numel(); ++i) {
      const float v = m.f32()[i];
      if (v == 0.f)
        ++zeros;
      else
        EXPECT_FLOAT_EQ(v, 1.f / (1.f - p));
    }
    const double n = static_cast<double>(m.numel()), frac = zeros / n;
    EXPECT_NEAR(frac, p, 4 * std::sqrt(p * (1 - p) / n)) << module;
    Tensor again = dropout_mask(ctx, module, 256, 128);
    EXPECT_EQ(std::memcmp(m.f32(), again.f32(), m.nbytes()), 0);
  }
  Tensor a = dropout_mask(ctx, "tri_mul_out", 32, 8), b = dropout_mask(ctx, "tri_mul_in", 32, 8);
  EXPECT_NE(std::memcmp(a.f32(), b.f32(), a.nbytes()), 0);
  ctx.dropout_key = 43;
  Tensor c = dropout_mask(ctx, "tri_mul_out", 32, 8);
  EXPECT_NE(std::memcmp(a.f32(), c.f32(), a.nbytes()), 0);
}

struct Step {
  Tensor m, z;
  TrainResult r;
};

Tensor rnd(const Shape& s, uint64_t seed) {
  Tensor t = Tensor::empty(s);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = uniform_pm1(seed, i);
  return t;
}

Step step(const EvoformerStack& st, const Tensor& m0, const Tensor& z0, const Tensor& pm,
          const Tensor& pz, std::vector<Recompute> policy, bool dropout, uint64_t seed) {
  Step out;
  out.m = m0.clone();
  out.z = z0.clone();
  TrainOptions o;
  o.policy = std::move(policy);
  o.dropout = dropout;
  o.seed = seed;
  EXPECT_TRUE(st.train_step(out.m, out.z, Tensor(), Tensor(), pm, pz, o, &out.r).ok());
  return out;
}

// Same bits, and finite (two equal NaN outputs are not a pass).
bool same(const Tensor& a, const Tensor& b) {
  return test::all_finite(a) && test::all_finite(b) &&
         std::memcmp(a.f32(), b.f32(), a.nbytes()) == 0;
}

double loss(const Step& s, const Tensor& pm, const Tensor& pz) {
  double l = 0;
  for (int64_t i = 0; i < pm.numel(); ++i) l += static_cast<double>(s.m.f32()[i]) * pm.f32()[i];
  for (int64_t i = 0; i < pz.numel(); ++i) l += static_cast<double>(s.z.f32()[i]) * pz.f32()[i];
  return l;
}

class DropoutStep : public ::testing::Test {
 protected:
  void SetUp() override {
    cfg_ = tiny_cfg();
    stack_ = EvoformerStack::random(cfg_, 5);
    m0_ = rnd({6, 7, cfg_.c_m}, 1);
    z0_ = rnd({7, 7, cfg_.c_z}, 2);
    pm_ = rnd(m0_.shape(), 3);
    pz_ = rnd(z0_.shape(), 4);
  }
  EvoformerConfig cfg_;
  EvoformerStack stack_;
  Tensor m0_, z0_, pm_, pz_;
};

TEST_F(DropoutStep, ReproducibleAcrossPoliciesAndRuns) {
  Step base = step(stack_, m0_, z0_, pm_, pz_, {Recompute::kNone}, true, 9);
  Step eval = step(stack_, m0_, z0_, pm_, pz_, {Recompute::kNone}, false, 9);
  EXPECT_FALSE(same(base.m, eval.m));  // dropout changes the step
  Step other = step(stack_, m0_, z0_, pm_, pz_, {Recompute::kNone}, true, 10);
  EXPECT_FALSE(same(base.z, other.z));  // and depends on the seed
  for (auto policy : {std::vector<Recompute>{Recompute::kNone},
                      {Recompute::kModule},
                      {Recompute::kBlock},
                      {Recompute::kBlock, Recompute::kModule}}) {
    Step s = step(stack_, m0_, z0_, pm_, pz_, policy, true, 9);
    EXPECT_TRUE(same(s.m, base.m));
    EXPECT_TRUE(same(s.z, base.z));
    EXPECT_TRUE(same(s.r.grad_m, base.r.grad_m));
    EXPECT_TRUE(same(s.r.grad_z, base.r.grad_z));
    for (size_t i = 0; i < s.r.grad_params.size(); ++i)
      EXPECT_TRUE(same(s.r.grad_params[i].second, base.r.grad_params[i].second))
          << s.r.grad_params[i].first;
  }
}

// dL/d input.m and dL/d input.z by central differences through the whole dropped-out step.
TEST_F(DropoutStep, InputGradientsMatchFiniteDifferences) {
  const Step base = step(stack_, m0_, z0_, pm_, pz_, {Recompute::kNone}, true, 9);
  const float h = 1e-2f;
  int checked = 0;
  for (int which = 0; which < 2; ++which) {
    const Tensor& x0 = which ? z0_ : m0_;
    const Tensor& g = which ? base.r.grad_z : base.r.grad_m;
    double rms = 0;
    for (int64_t i = 0; i < g.numel(); ++i) rms += g.f32()[i] * g.f32()[i];
    rms = std::sqrt(rms / g.numel());
    for (int k = 0; k < 6; ++k) {
      const int64_t idx = static_cast<int64_t>(splitmix64(k * 7 + which) % x0.numel());
      Tensor xp = x0.clone(), xm = x0.clone();
      xp.f32()[idx] += h;
      xm.f32()[idx] -= h;
      const Step sp = which ? step(stack_, m0_, xp, pm_, pz_, {}, true, 9)
                            : step(stack_, xp, z0_, pm_, pz_, {}, true, 9);
      const Step sm = which ? step(stack_, m0_, xm, pm_, pz_, {}, true, 9)
                            : step(stack_, xm, z0_, pm_, pz_, {}, true, 9);
      const double fd = (loss(sp, pm_, pz_) - loss(sm, pm_, pz_)) / (2.0 * h);
      const double an = g.f32()[idx];
      EXPECT_NEAR(fd, an, 3e-2 * std::max(std::abs(an), rms))
          << (which ? "z" : "m") << "[" << idx << "]";
      ++checked;
    }
  }
  EXPECT_EQ(checked, 12);
}

}  // namespace
}  // namespace fc
