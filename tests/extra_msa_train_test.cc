// Training of the ExtraMSA stack and the Evoformer's single output:
//  - extra_tiny: outputs, dL/d inputs and dL/d every parameter against the OpenFold float64
//    reference under every recompute policy and several chunk sizes; gradients bit-identical
//    across policies;
//  - the global column attention's backward against a naive float64 reference (the same math
//    written out per column, differentiated by central finite differences);
//  - the training memory model (activations, step peak) against the allocator;
//  - plans of the stack (inference, training, DAP, DP) and the golden step under planned choices;
//  - Evoformer output.s and dL/d output.s: s against the golden output.s, the linear.*
//    gradients exact, and the flow into dL/d m and dL/d z by directional finite differences.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "foldcube/extra_msa.h"
#include "foldcube/io.h"
#include "foldcube/model.h"
#include "foldcube/plan.h"
#include "foldcube/planner.h"
#include "foldcube/runtime.h"
#include "model/common.h"
#include "model/train.h"
#include "model/weights.h"
#include "plan/memory_model.h"
#include "test_util.h"

namespace fc {
namespace {

struct Golden {
  TensorFile f;
  EvoformerConfig cfg;
  Tensor m, z, msa_mask, pair_mask, probe_m, probe_z;
};

void load_golden(const std::string& file, Golden* g) {
  ASSERT_TRUE(read_safetensors(test::data_path(file), &g->f).ok());
  ASSERT_TRUE(EvoformerConfig::from_metadata(g->f.metadata, &g->cfg).ok());
  for (auto [name, t] :
       std::vector<std::pair<const char*, Tensor*>>{{"input.m", &g->m},
                                                    {"input.z", &g->z},
                                                    {"input.msa_mask", &g->msa_mask},
                                                    {"input.pair_mask", &g->pair_mask},
                                                    {"probe.m", &g->probe_m},
                                                    {"probe.z", &g->probe_z}})
    ASSERT_TRUE(g->f.get_f32(name, {}, t).ok()) << name;
}

using test::bit_equal;

// ---- extra_tiny golden gradients ---------------------------------------------------------------

struct GradCase {
  std::vector<Recompute> policy;
  int64_t chunk;  // 0 = automatic
};
std::string grad_case_name(const GradCase& c) {
  return std::string(recompute_name(c.policy[0])) + "_chunk" + std::to_string(c.chunk);
}
void PrintTo(const GradCase& c, std::ostream* os) { *os << grad_case_name(c); }

class ExtraMsaGoldenGrad : public ::testing::TestWithParam<GradCase> {};

TEST_P(ExtraMsaGoldenGrad, MatchesReferenceAndPolicyNone) {
  Golden g;
  ASSERT_NO_FATAL_FAILURE(load_golden("extra_tiny.safetensors", &g));
  ExtraMsaStack stack;
  ASSERT_TRUE(ExtraMsaStack::load(g.cfg, g.f, &stack).ok());
  auto step = [&](const TrainOptions& opts, Tensor* m, Tensor* z, TrainResult* res) {
    *m = g.m.clone();
    *z = g.z.clone();
    Status st = stack.train_step(*m, *z, g.msa_mask, g.pair_mask, g.probe_m, g.probe_z, opts, res);
    ASSERT_TRUE(st.ok()) << st.ToString();
  };
  TrainOptions opts;
  opts.policy = GetParam().policy;
  opts.chunk = GetParam().chunk;
  Tensor m, z;
  TrainResult res;
  ASSERT_NO_FATAL_FAILURE(step(opts, &m, &z, &res));
  EXPECT_FALSE(res.s.defined());
  EXPECT_LT(test::golden_err(m, g.f.tensors.at("output.m")), 1e-4);
  EXPECT_LT(test::golden_err(z, g.f.tensors.at("output.z")), 1e-4);
  EXPECT_LT(test::golden_err(res.grad_m, g.f.tensors.at("grad.input.m")), 2e-4);
  EXPECT_LT(test::golden_err(res.grad_z, g.f.tensors.at("grad.input.z")), 2e-4);
  int expected = 0;
  for (const std::string& n : g.f.names) expected += n.rfind("grad.param.", 0) == 0;
  EXPECT_EQ(static_cast<int>(res.grad_params.size()), expected);
  for (const auto& [name, t] : res.grad_params) {
    auto it = g.f.tensors.find("grad.param." + name);
    ASSERT_NE(it, g.f.tensors.end()) << "no reference gradient for " << name;
    EXPECT_LT(test::golden_err(t, it->second), 2e-4) << name;
  }
  EXPECT_GT(res.activation_bytes, 0);
  // Policies recompute with the same functions: bit-identical to policy none at this chunking.
  TrainOptions none = opts;
  none.policy = {Recompute::kNone};
  Tensor m0, z0;
  TrainResult base;
  ASSERT_NO_FATAL_FAILURE(step(none, &m0, &z0, &base));
  EXPECT_TRUE(bit_equal(res.grad_m, base.grad_m));
  EXPECT_TRUE(bit_equal(res.grad_z, base.grad_z));
  ASSERT_EQ(res.grad_params.size(), base.grad_params.size());
  for (size_t i = 0; i < res.grad_params.size(); ++i)
    EXPECT_TRUE(bit_equal(res.grad_params[i].second, base.grad_params[i].second))
        << res.grad_params[i].first;
}

using R = Recompute;
INSTANTIATE_TEST_SUITE_P(Policies, ExtraMsaGoldenGrad,
                         ::testing::Values(GradCase{{R::kNone}, 0}, GradCase{{R::kModule}, 0},
                                           GradCase{{R::kBlock}, 0}, GradCase{{R::kNone}, 1},
                                           GradCase{{R::kModule}, 1}, GradCase{{R::kBlock}, 3},
                                           GradCase{{R::kModule}, 5}),
                         [](const auto& info) { return grad_case_name(info.param); });

// A two-block stack with one policy per block (dropout on) is bit-identical across policies.
TEST(ExtraMsaTrain, MixedPoliciesWithDropoutBitIdentical) {
  EvoformerConfig cfg = test::small_config();
  cfg.c_m = 16;
  cfg.no_blocks = 2;
  ExtraMsaStack stack = ExtraMsaStack::random(cfg, 3);
  const int64_t s = 7, r = 9;
  Tensor m = Tensor::full({s, r, cfg.c_m}, 0.f), z = Tensor::full({r, r, cfg.c_z}, 0.f);
  for (int64_t i = 0; i < m.numel(); ++i) m.f32()[i] = std::sin(0.37 * i);
  for (int64_t i = 0; i < z.numel(); ++i) z.f32()[i] = std::cos(0.23 * i);
  Tensor mask = Tensor::full({s, r}, 1.f);
  mask.f32()[5] = mask.f32()[17] = mask.f32()[30] = 0.f;
  Tensor gm = Tensor::full(m.shape(), 0.5f), gz = Tensor::full(z.shape(), -0.25f);
  std::vector<TrainResult> res;
  for (const std::vector<R>& p :
       {std::vector<R>{R::kNone}, {R::kBlock, R::kModule}, {R::kModule, R::kBlock}}) {
    TrainOptions opts;
    opts.policy = p;
    opts.dropout = true;
    opts.seed = 9;
    Tensor mm = m.clone(), zz = z.clone();
    res.emplace_back();
    ASSERT_TRUE(stack.train_step(mm, zz, mask, Tensor(), gm, gz, opts, &res.back()).ok());
  }
  for (size_t k = 1; k < res.size(); ++k) {
    EXPECT_TRUE(bit_equal(res[k].grad_m, res[0].grad_m));
    EXPECT_TRUE(bit_equal(res[k].grad_z, res[0].grad_z));
    for (size_t i = 0; i < res[0].grad_params.size(); ++i)
      EXPECT_TRUE(bit_equal(res[k].grad_params[i].second, res[0].grad_params[i].second))
          << res[0].grad_params[i].first;
  }
}

TEST(ExtraMsaTrain, BadGradientShapeIsUserError) {
  EvoformerConfig cfg = test::small_config();
  cfg.no_blocks = 1;
  ExtraMsaStack stack = ExtraMsaStack::random(cfg, 1);
  Tensor m = Tensor::full({3, 4, cfg.c_m}, 0.1f), z = Tensor::full({4, 4, cfg.c_z}, 0.1f);
  TrainResult res;
  Status st = stack.train_step(m, z, Tensor(), Tensor(), Tensor::full({3, 5, cfg.c_m}, 1.f),
                               Tensor::full(z.shape(), 1.f), TrainOptions(), &res);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.ToString().find("grad.output.m"), std::string::npos) << st.ToString();
}

// ---- Global column attention: naive float64 reference -------------------------------------------

// The module's math written out per column in double: m [s, r, ce] += update.
struct GlobalRef {
  int64_t s, r, ce, H, C;
  double eps;
  std::vector<double> mask;                        // [s, r]
  std::vector<double> ln_w, ln_b, wq, wkvg, bkvg;  // [ce], [ce], [HC, ce], [ld, ce], [ld]
  std::vector<double> wo, bo;                      // [ce, HC], [ce]
  int64_t hc() const { return H * C; }
  int64_t ld() const { return 2 * C + H * C; }

  std::vector<double> forward(const std::vector<double>& m) const {
    std::vector<double> out = m;
    const int64_t HC = hc(), LD = ld();
    for (int64_t b = 0; b < r; ++b) {
      std::vector<double> x(s * ce), mu(ce, 0.0);
      double count = 0;
      for (int64_t j = 0; j < s; ++j) {
        const double* row = &m[(j * r + b) * ce];
        double mean = 0, var = 0;
        for (int64_t c = 0; c < ce; ++c) mean += row[c] / ce;
        for (int64_t c = 0; c < ce; ++c) var += (row[c] - mean) * (row[c] - mean) / ce;
        for (int64_t c = 0; c < ce; ++c)
          x[j * ce + c] = (row[c] - mean) / std::sqrt(var + 1e-5) * ln_w[c] + ln_b[c];
        count += mask[j * r + b];
        for (int64_t c = 0; c < ce; ++c) mu[c] += mask[j * r + b] * x[j * ce + c];
      }
      for (int64_t c = 0; c < ce; ++c) mu[c] /= count + eps;
      std::vector<double> q(HC, 0.0), kvg(s * LD, 0.0), o(HC, 0.0);
      for (int64_t i = 0; i < HC; ++i)
        for (int64_t c = 0; c < ce; ++c) q[i] += wq[i * ce + c] * mu[c];
      for (int64_t j = 0; j < s; ++j)
        for (int64_t i = 0; i < LD; ++i) {
          double acc = bkvg[i];
          for (int64_t c = 0; c < ce; ++c) acc += wkvg[i * ce + c] * x[j * ce + c];
          kvg[j * LD + i] = acc;
        }
      for (int64_t h = 0; h < H; ++h) {
        std::vector<double> logit(s);
        double mx = -1e300;
        for (int64_t j = 0; j < s; ++j) {
          double acc = 0;
          for (int64_t c = 0; c < C; ++c) acc += q[h * C + c] * kvg[j * LD + c];
          logit[j] = acc / std::sqrt(double(C)) + 1e9 * (mask[j * r + b] - 1);
          mx = std::max(mx, logit[j]);
        }
        double z = 0;
        for (int64_t j = 0; j < s; ++j) z += std::exp(logit[j] - mx);
        for (int64_t j = 0; j < s; ++j)
          for (int64_t c = 0; c < C; ++c)
            o[h * C + c] += std::exp(logit[j] - mx) / z * kvg[j * LD + C + c];
      }
      for (int64_t j = 0; j < s; ++j)
        for (int64_t c = 0; c < ce; ++c) {
          double acc = bo[c];
          for (int64_t i = 0; i < HC; ++i) {
            const double g = 1 / (1 + std::exp(-kvg[j * LD + 2 * C + i]));
            acc += wo[c * HC + i] * o[i] * g;
          }
          out[(j * r + b) * ce + c] += acc;
        }
    }
    return out;
  }
};

std::vector<double> to_double(const Tensor& t) {
  return std::vector<double>(t.f32(), t.f32() + t.numel());
}

// Central differences of L = sum(forward(m) * probe) with respect to *p (all of it).
std::vector<double> fd_grad(GlobalRef* ref, std::vector<double>* p, const std::vector<double>& m,
                            const std::vector<double>& probe) {
  auto loss = [&]() {
    const std::vector<double> out = ref->forward(m);
    double l = 0;
    for (size_t i = 0; i < out.size(); ++i) l += out[i] * probe[i];
    return l;
  };
  std::vector<double> g(p->size());
  const double h = 1e-5;
  for (size_t i = 0; i < p->size(); ++i) {
    const double v = (*p)[i];
    (*p)[i] = v + h;
    const double lp = loss();
    (*p)[i] = v - h;
    const double lm = loss();
    (*p)[i] = v;
    g[i] = (lp - lm) / (2 * h);
  }
  return g;
}

double max_rel_err(const float* x, const std::vector<double>& ref) {
  double num = 0, den = 1e-3;
  for (size_t i = 0; i < ref.size(); ++i) {
    num = std::max(num, std::fabs(x[i] - ref[i]));
    den = std::max(den, std::fabs(ref[i]));
  }
  return num / den;
}

struct GlobalCase {
  int64_t s, r, chunk;
  bool keep;  // policy none (state kept) or module (recomputed)
};
std::string global_case_name(const GlobalCase& c) {
  return "s" + std::to_string(c.s) + "_r" + std::to_string(c.r) + "_chunk" +
         std::to_string(c.chunk) + (c.keep ? "_kept" : "_recomputed");
}
void PrintTo(const GlobalCase& c, std::ostream* os) { *os << global_case_name(c); }

class GlobalAttentionBackward : public ::testing::TestWithParam<GlobalCase> {};

TEST_P(GlobalAttentionBackward, MatchesNaiveFloat64Reference) {
  const GlobalCase gc = GetParam();
  EvoformerConfig cfg = test::small_config();
  cfg.c_m = 6;
  cfg.no_heads_msa = 2;
  cfg.c_hidden_msa_att = 3;
  ExtraMsaBlockWeights w;
  allocate_extra_msa_block(cfg, &w);
  for (auto& [name, view] : named_params(w, "")) random_fill(name, view, 17);
  const int64_t s = gc.s, r = gc.r, ce = cfg.c_m;
  Tensor m = Tensor::empty({s, r, ce}), probe = Tensor::empty({s, r, ce});
  Tensor mask = Tensor::full({s, r}, 1.f);
  for (int64_t i = 0; i < m.numel(); ++i) {
    m.f32()[i] = static_cast<float>(std::sin(1.3 * i) + 0.2 * std::cos(0.7 * i * i));
    probe.f32()[i] = static_cast<float>(std::cos(0.9 * i));
  }
  for (int64_t i = 0; i < s * r; i += 4) mask.f32()[i] = 0.f;  // every column keeps 2+ ones
  StackInputs in;
  ASSERT_TRUE(prepare_inputs(cfg, m, Tensor::full({r, r, cfg.c_z}, 0.f), mask, Tensor(), &in).ok());
  BlockContext ctx = make_context(cfg, in, gc.chunk);

  const MsaColumnGlobalAttentionW& gw = w.msa_att_col;
  Tensor out = m.clone();
  GlobalAttentionState st;
  msa_column_global_attention_train(gw, ctx, out.f32(), gc.keep ? &st : nullptr);
  ExtraMsaBlockWeights grads;
  allocate_block_grads(cfg, &grads);
  Tensor dm = probe.clone();
  msa_column_global_attention_backward(gw, &grads.msa_att_col, ctx, m.f32(), &st, dm.f32());

  GlobalRef ref{s,
                r,
                ce,
                cfg.no_heads_msa,
                cfg.c_hidden_msa_att,
                1e-8,
                to_double(mask),
                to_double(gw.ln_m.w),
                to_double(gw.ln_m.b),
                to_double(gw.q.w),
                to_double(gw.kvg.w),
                to_double(gw.kvg.b),
                to_double(gw.o.w),
                to_double(gw.o.b)};
  std::vector<double> md = to_double(m);
  const std::vector<double> probe_d = to_double(probe);
  EXPECT_LT(max_rel_err(out.f32(), ref.forward(md)), 1e-5);
  // dL/d m = probe + J^T probe; the finite differences see both.
  EXPECT_LT(max_rel_err(dm.f32(), fd_grad(&ref, &md, md, probe_d)), 1e-4);
  const MsaColumnGlobalAttentionW& g = grads.msa_att_col;
  struct P {
    const char* name;
    std::vector<double>* ref;
    const Tensor& grad;
  };
  for (const P& p :
       {P{"ln_m.w", &ref.ln_w, g.ln_m.w}, P{"ln_m.b", &ref.ln_b, g.ln_m.b},
        P{"q.w", &ref.wq, g.q.w}, P{"kvg.w", &ref.wkvg, g.kvg.w}, P{"kvg.b", &ref.bkvg, g.kvg.b},
        P{"o.w", &ref.wo, g.o.w}, P{"o.b", &ref.bo, g.o.b}}) {
    const std::vector<double> fd = fd_grad(&ref, p.ref, md, probe_d);
    EXPECT_LT(max_rel_err(p.grad.f32(), fd), 1e-4) << p.name;
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, GlobalAttentionBackward,
                         ::testing::Values(GlobalCase{5, 3, 0, true}, GlobalCase{5, 3, 0, false},
                                           GlobalCase{7, 5, 2, true}, GlobalCase{7, 5, 1, false},
                                           GlobalCase{9, 4, 3, false}),
                         [](const auto& info) { return global_case_name(info.param); });

// ---- Memory model ------------------------------------------------------------------------------

struct MemCase {
  int64_t s, r, blocks;
  std::vector<Recompute> policy;
  int64_t chunk = 0;
};
std::string mem_case_name(const MemCase& c) {
  std::string n =
      "s" + std::to_string(c.s) + "_r" + std::to_string(c.r) + "_b" + std::to_string(c.blocks);
  for (Recompute p : c.policy) n += std::string("_") + recompute_name(p);
  if (c.chunk > 0) n += "_chunk" + std::to_string(c.chunk);
  return n;
}
void PrintTo(const MemCase& c, std::ostream* os) { *os << mem_case_name(c); }

class ExtraMsaTrainMemory : public ::testing::TestWithParam<MemCase> {};

TEST_P(ExtraMsaTrainMemory, ActivationAndPeakMatchAllocator) {
  const MemCase c = GetParam();
  EvoformerConfig cfg = test::small_config();
  cfg.c_m = 16;
  cfg.no_blocks = c.blocks;
  ExtraMsaStack stack = ExtraMsaStack::random(cfg, 5);
  Tensor m = Tensor::full({c.s, c.r, cfg.c_m}, 0.3f), z = Tensor::full({c.r, c.r, cfg.c_z}, -0.2f);
  Tensor gm = Tensor::full(m.shape(), 1.f), gz = Tensor::full(z.shape(), 1.f);
  TrainOptions opts;
  opts.policy = c.policy;
  opts.chunk = c.chunk;
  TrainResult res;
  ASSERT_TRUE(stack.train_step(m, z, Tensor(), Tensor(), gm, gz, opts, &res).ok());
  EXPECT_EQ(res.activation_bytes,
            stack_activation_bytes(cfg, c.s, c.r, c.blocks, c.policy, 4, c.chunk, 0, true));
  EXPECT_EQ(res.peak_bytes, stack_step_peak_bytes(cfg, c.s, c.r, c.blocks, c.policy, num_threads(),
                                                  4, c.chunk, 0, true));
  // The checked public entry agrees.
  MemoryQuery q;
  q.cfg = cfg;
  q.s = c.s, q.r = c.r, q.blocks = c.blocks, q.policy = c.policy, q.chunk = c.chunk;
  q.threads = num_threads();
  q.extra_msa = true;
  int64_t peak = 0;
  ASSERT_TRUE(stack_step_peak_bytes(q, &peak).ok());
  EXPECT_EQ(peak, res.peak_bytes);
}

INSTANTIATE_TEST_SUITE_P(
    Policies, ExtraMsaTrainMemory,
    ::testing::Values(MemCase{6, 10, 2, {R::kNone}}, MemCase{6, 10, 2, {R::kModule}},
                      MemCase{6, 10, 2, {R::kBlock}}, MemCase{1, 5, 1, {R::kNone}},
                      MemCase{20, 8, 2, {R::kModule}},
                      MemCase{5, 7, 3, {R::kBlock, R::kModule, R::kNone}},
                      MemCase{9, 13, 2, {R::kNone}, 2}, MemCase{9, 13, 2, {R::kModule}, 3}),
    [](const auto& info) { return mem_case_name(info.param); });

// ---- Evoformer output.s in training ------------------------------------------------------------

TEST(EvoformerSingleTrain, OutputSMatchesGoldenAndGradsFlow) {
  Golden g;
  ASSERT_NO_FATAL_FAILURE(load_golden("evo_tiny.safetensors", &g));
  EvoformerStack stack;
  ASSERT_TRUE(EvoformerStack::load(g.cfg, g.f, &stack).ok());
  const int64_t r = g.m.dim(1), cs = g.cfg.c_s, cm = g.cfg.c_m;
  Tensor gs = Tensor::empty({r, cs});  // dL/d s
  for (int64_t i = 0; i < gs.numel(); ++i) gs.f32()[i] = static_cast<float>(std::sin(0.61 * i));
  Tensor zm = Tensor::full(g.m.shape(), 0.f), zz = Tensor::full(g.z.shape(), 0.f);

  // Without dL/ds: output.s is produced, the gradients are the golden ones, no linear.* listed.
  Tensor m = g.m.clone(), z = g.z.clone();
  TrainResult plain;
  ASSERT_TRUE(
      stack.train_step(m, z, g.msa_mask, g.pair_mask, g.probe_m, g.probe_z, TrainOptions(), &plain)
          .ok());
  EXPECT_LT(test::golden_err(plain.s, g.f.tensors.at("output.s")), 1e-4);
  for (const auto& [name, t] : plain.grad_params) EXPECT_NE(name.rfind("linear.", 0), 0u) << name;

  // L = sum(s * gs) alone, under two policies.
  TrainResult res;
  for (R p : {R::kBlock, R::kNone}) {
    TrainOptions opts;
    opts.policy = {p};
    Tensor m2 = g.m.clone(), z2 = g.z.clone();
    ASSERT_TRUE(stack.train_step(m2, z2, g.msa_mask, g.pair_mask, zm, zz, gs, opts, &res).ok());
  }
  EXPECT_LT(test::golden_err(res.s, g.f.tensors.at("output.s")), 1e-4);
  ASSERT_GE(res.grad_params.size(), 2u);
  const auto& gw = res.grad_params[res.grad_params.size() - 2];
  const auto& gb = res.grad_params.back();
  ASSERT_EQ(gw.first, "linear.weight");
  ASSERT_EQ(gb.first, "linear.bias");
  // dL/dW = gs^T m[0], dL/db = sum_i gs[i]: exact up to float rounding.
  Tensor mout = g.m.clone(), zout = g.z.clone();
  ASSERT_TRUE(stack.forward(mout, zout, g.msa_mask, g.pair_mask, nullptr).ok());
  for (int64_t o = 0; o < cs; ++o) {
    double db = 0;
    for (int64_t i = 0; i < r; ++i) db += gs.f32()[i * cs + o];
    EXPECT_NEAR(gb.second.f32()[o], db, 1e-4 * (1 + std::fabs(db)));
    for (int64_t c = 0; c < cm; c += 5) {
      double dw = 0;
      for (int64_t i = 0; i < r; ++i) dw += gs.f32()[i * cs + o] * mout.f32()[i * cm + c];
      EXPECT_NEAR(gw.second.f32()[o * cm + c], dw, 1e-4 * (1 + std::fabs(dw)));
    }
  }
  // Directional derivatives of L(m, z) = sum(s(m, z) * gs) by central differences in float.
  auto loss = [&](const Tensor& m0, const Tensor& z0) {
    Tensor mm = m0.clone(), zz2 = z0.clone(), s;
    EXPECT_TRUE(stack.forward(mm, zz2, g.msa_mask, g.pair_mask, &s).ok());
    double l = 0;
    for (int64_t i = 0; i < s.numel(); ++i) l += double(s.f32()[i]) * gs.f32()[i];
    return l;
  };
  for (int which = 0; which < 2; ++which) {
    const Tensor& x = which == 0 ? g.m : g.z;
    const Tensor& grad = which == 0 ? res.grad_m : res.grad_z;
    Tensor v = Tensor::empty(x.shape());
    double dir = 0;
    for (int64_t i = 0; i < v.numel(); ++i) {
      v.f32()[i] = static_cast<float>(std::cos(1.7 * i + which));
      dir += double(v.f32()[i]) * grad.f32()[i];
    }
    const double h = 2e-3;
    auto shifted = [&](double sign) {
      Tensor y = x.clone();
      for (int64_t i = 0; i < y.numel(); ++i)
        y.f32()[i] += static_cast<float>(sign * h) * v.f32()[i];
      return y;
    };
    const double fd = which == 0 ? (loss(shifted(1), g.z) - loss(shifted(-1), g.z)) / (2 * h)
                                 : (loss(g.m, shifted(1)) - loss(g.m, shifted(-1))) / (2 * h);
    EXPECT_NEAR(dir, fd, 2e-2 * std::max(1.0, std::fabs(fd))) << (which == 0 ? "m" : "z");
    EXPECT_GT(std::fabs(dir), 1e-3);
  }
}

// ---- Plans of the ExtraMSA stack (issue 16)
// ------------------------------------------------------

// A fixed profile (no calibration in unit tests; the rates only order the plans), this process's
// thread count (the memory model's per-thread scratch).
DeviceProfile fixed_profile(int devices = 1) {
  DeviceProfile p;
  p.name = "test";
  p.devices = devices;
  p.threads = num_threads();
  p.gemm_gflops = p.gemm_bwd_gflops = p.batched_gflops = 300;
  p.attention_gflops = p.attention_bwd_gflops = 200;
  p.gemm_half_rows = 300;
  p.mem_gbps = 15;
  p.link_gbps = 10;
  p.link_latency_us = 20;
  return p;
}

EvoformerConfig af2_extra_cfg(int64_t blocks) {  // AF2's extra-MSA stack: c_e = 64, 8 heads of 8
  EvoformerConfig cfg;
  cfg.c_m = 64;
  cfg.c_hidden_msa_att = 8;
  cfg.no_blocks = blocks;
  return cfg;
}

PlanRequest request(const EvoformerConfig& cfg, int64_t s, int64_t r, bool training, int64_t limit,
                    int devices = 1) {
  PlanRequest q;
  q.cfg = cfg;
  q.s = s;
  q.r = r;
  q.training = training;
  q.extra_msa = true;
  q.profile = fixed_profile(devices);
  q.memory_bytes = limit;
  return q;
}

// The smallest feasible budget the planner names when nothing fits.
int64_t smallest_budget(PlanRequest q) {
  q.memory_bytes = 1;
  Plan p;
  const Status st = make_plan(q, &p);
  EXPECT_EQ(st.code(), Status::Code::kOutOfMemory) << st.message();
  const std::string key = "smallest feasible budget is ";
  const size_t at = st.message().find(key);
  EXPECT_NE(at, std::string::npos) << st.message();
  if (at == std::string::npos) return 0;
  return static_cast<int64_t>((std::stod(st.message().substr(at + key.size())) + 0.05) * 1048576);
}

// Inference and training plans, the DAP and DP degrees of a 2-device request, their JSON round
// trip, and DAP's smaller per-rank activations.
TEST(ExtraMsaPlan, InferenceTrainingDapAndDp) {
  const EvoformerConfig cfg = af2_extra_cfg(4);
  const int64_t s = 1024, r = 128;
  Plan inf;
  ASSERT_TRUE(make_plan(request(cfg, s, r, false, int64_t{8} << 30), &inf).ok());
  EXPECT_TRUE(inf.extra_msa);
  EXPECT_FALSE(inf.training);
  EXPECT_GT(inf.time_ms, 0);
  // The forward's peak: weights, inputs, masks and the ExtraMSA table's largest workspace.
  const int64_t fwd = extra_msa_forward_peak_bytes(cfg, s, r, true, inf.chunk,
                                                   inf.chunk_target_bytes, num_threads());
  EXPECT_GT(inf.peak_bytes, fwd);
  // Tighter budgets chunk finer, and the plan still fits.
  Plan tight;
  const int64_t lo = smallest_budget(request(cfg, s, r, false, 0));
  ASSERT_GT(lo, 0);
  ASSERT_TRUE(make_plan(request(cfg, s, r, false, lo + (1 << 20)), &tight).ok());
  EXPECT_LE(tight.peak_bytes, lo + (1 << 20));
  EXPECT_LT(tight.peak_bytes, inf.peak_bytes);

  PlanRequest two = request(cfg, s, r, true, int64_t{16} << 30, 2);
  Plan one;
  ASSERT_TRUE(make_plan(request(cfg, s, r, true, int64_t{16} << 30), &one).ok());
  for (auto [dap, dp] : {std::pair{2, 1}, std::pair{1, 2}}) {
    SCOPED_TRACE("dap " + std::to_string(dap) + " dp " + std::to_string(dp));
    two.dap = dap;
    two.dp = dp;
    Plan p;
    const Status st = make_plan(two, &p);
    ASSERT_TRUE(st.ok()) << st.message();
    EXPECT_EQ(p.dap, dap);
    EXPECT_EQ(p.dp, dp);
    EXPECT_TRUE(p.extra_msa);
    Plan back;
    ASSERT_TRUE(Plan::from_json(p.to_json(), &back).ok());
    EXPECT_TRUE(back.extra_msa);
    EXPECT_EQ(back.dap, dap);
    if (dap == 2) {
      EXPECT_GT(p.comm_ms, 0);
      EXPECT_LT(p.time_ms, one.time_ms);
    }
  }
  // DAP activations per rank at the same policies and target: about half of one process's.
  Plan d = one;
  d.dap = 2;
  ASSERT_TRUE(evaluate_plan(fixed_profile(2), &d).ok());
  EXPECT_LT(static_cast<double>(d.activation_bytes), 0.55 * one.activation_bytes);
  // An inference DAP plan (the executor's default target per rank).
  PlanRequest inf2 = request(cfg, s, r, false, int64_t{8} << 30, 2);
  inf2.dap = 2;
  Plan pi;
  ASSERT_TRUE(make_plan(inf2, &pi).ok());
  EXPECT_EQ(pi.dap, 2);
  EXPECT_LT(pi.peak_bytes, inf.peak_bytes);
}

// The golden extra_tiny step under the plans the planner makes at budgets from the smallest
// feasible one to a roomy one: outputs, dL/d inputs and every parameter gradient within the
// golden tolerances; the step's activations and peak (above the live bytes before it) are the
// plan's memory model's.
TEST(ExtraMsaPlan, GoldenUnderPlannedTrainingAndInference) {
  Golden g;
  ASSERT_NO_FATAL_FAILURE(load_golden("extra_tiny.safetensors", &g));
  ExtraMsaStack stack;
  ASSERT_TRUE(ExtraMsaStack::load(g.cfg, g.f, &stack).ok());
  const int64_t s = g.m.shape()[0], r = g.m.shape()[1];
  for (bool training : {true, false}) {
    const int64_t lo = smallest_budget(request(g.cfg, s, r, training, 0));
    ASSERT_GT(lo, 0);
    std::vector<Recompute> seen;
    for (int64_t limit : {lo + (16 << 10), lo + (lo >> 2), lo * 4}) {
      SCOPED_TRACE((training ? "training, budget " : "inference, budget ") + std::to_string(limit));
      Plan p;
      const Status st = make_plan(request(g.cfg, s, r, training, limit), &p);
      ASSERT_TRUE(st.ok()) << st.message();
      EXPECT_LE(p.peak_bytes, limit);
      Tensor m = g.m.clone(), z = g.z.clone();
      if (!training) {
        ASSERT_TRUE(stack.forward(m, z, g.msa_mask, g.pair_mask, to_forward_options(p)).ok());
        EXPECT_LT(test::golden_err(m, g.f.tensors.at("output.m")), 1e-4);
        EXPECT_LT(test::golden_err(z, g.f.tensors.at("output.z")), 1e-4);
        continue;
      }
      TrainResult res;
      const Status ts = stack.train_step(m, z, g.msa_mask, g.pair_mask, g.probe_m, g.probe_z,
                                         to_train_options(p), &res);
      ASSERT_TRUE(ts.ok()) << ts.ToString();
      EXPECT_EQ(res.activation_bytes, p.activation_bytes);
      EXPECT_EQ(res.peak_bytes,
                stack_step_peak_bytes(g.cfg, s, r, g.cfg.no_blocks, p.policy, num_threads(), 4,
                                      p.chunk, p.chunk_target_bytes, true));
      EXPECT_LT(test::golden_err(m, g.f.tensors.at("output.m")), 1e-4);
      EXPECT_LT(test::golden_err(z, g.f.tensors.at("output.z")), 1e-4);
      EXPECT_LT(test::golden_err(res.grad_m, g.f.tensors.at("grad.input.m")), 2e-4);
      EXPECT_LT(test::golden_err(res.grad_z, g.f.tensors.at("grad.input.z")), 2e-4);
      for (const auto& [name, t] : res.grad_params)
        EXPECT_LT(test::golden_err(t, g.f.tensors.at("grad.param." + name)), 2e-4) << name;
      seen.insert(seen.end(), p.policy.begin(), p.policy.end());
    }
    if (training) {  // the tightest budget needs recompute
      EXPECT_NE(std::count(seen.begin(), seen.end(), Recompute::kNone),
                static_cast<long>(seen.size()));
    }
  }
}

}  // namespace
}  // namespace fc
