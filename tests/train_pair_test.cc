// Training path of the transitions, the outer product mean and the triangle multiplication
// (src/layers/): the training forward matches the inference forward; the backward
// matches float32 finite differences of L = sum(out * probe) for input elements and for elements
// of every parameter tensor (and the check is shown to catch wrong gradients); the backward is
// deterministic, accumulates, and does not depend on the chunk size.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "model/common.h"
#include "model/train.h"
#include "test_util.h"

namespace fc {
namespace {

enum class Mod { kMsaTransition, kPairTransition, kOpm, kTriMulOut, kTriMulIn };

const char* mod_name(Mod m) {
  switch (m) {
    case Mod::kMsaTransition:
      return "msa_transition";
    case Mod::kPairTransition:
      return "pair_transition";
    case Mod::kOpm:
      return "outer_product_mean";
    case Mod::kTriMulOut:
      return "tri_mul_out";
    case Mod::kTriMulIn:
      return "tri_mul_in";
  }
  return "?";
}
// Test parameters print as their name (gtest would print the enum's raw bytes).
void PrintTo(Mod m, std::ostream* os) { *os << mod_name(m); }

// named_params prefix (without "blocks.<i>.") and number of parameter tensors of each module.
std::string mod_prefix(Mod m) {
  switch (m) {
    case Mod::kMsaTransition:
      return "msa_transition.";
    case Mod::kPairTransition:
      return "pair_stack.pair_transition.";
    case Mod::kOpm:
      return "outer_product_mean.";
    case Mod::kTriMulOut:
      return "pair_stack.tri_mul_out.";
    case Mod::kTriMulIn:
      return "pair_stack.tri_mul_in.";
  }
  return "?";
}
bool has_relu(Mod m) { return m == Mod::kMsaTransition || m == Mod::kPairTransition; }
size_t mod_param_count(Mod m) {
  if (m == Mod::kMsaTransition || m == Mod::kPairTransition) return 6;
  return m == Mod::kOpm ? 8 : 16;
}

using Named = std::vector<std::pair<std::string, Tensor>>;

Named module_params(const BlockWeights& w, Mod m) {
  Named out;
  for (auto& [name, t] : named_params(w, ""))
    if (name.rfind(mod_prefix(m), 0) == 0) out.emplace_back(name, t);
  return out;
}

void fill_uniform(const Tensor& t, std::mt19937* rng, float lo, float hi) {
  std::uniform_real_distribution<float> u(lo, hi);
  float* p = t.f32();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = u(*rng);
}

Tensor random_mask(const Shape& shape, std::mt19937* rng) {
  Tensor t = Tensor::empty(shape);
  std::bernoulli_distribution zero(0.2);
  float* p = t.f32();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = zero(*rng) ? 0.f : 1.f;
  return t;
}

// A small random problem. Not copyable: ctx points into cfg and in.
struct Problem {
  EvoformerConfig cfg;
  StackInputs in;
  BlockContext ctx;
  BlockWeights w;
  Tensor m, z;              // [s, r, c_m], [r, r, c_z] module inputs
  Tensor probe_m, probe_z;  // like m, z

  Problem(int64_t chunk, uint32_t seed = 7) {
    cfg.c_m = 16, cfg.c_z = 8, cfg.c_hidden_opm = 4, cfg.c_hidden_mul = 8, cfg.transition_n = 2;
    cfg.c_hidden_msa_att = 4, cfg.no_heads_msa = 2, cfg.c_hidden_pair_att = 4;
    cfg.no_heads_pair = 2, cfg.no_blocks = 1;
    const int64_t s = 5, r = 7;
    std::mt19937 rng(seed);
    m = Tensor::empty({s, r, cfg.c_m});
    z = Tensor::empty({r, r, cfg.c_z});
    probe_m = Tensor::empty({s, r, cfg.c_m});
    probe_z = Tensor::empty({r, r, cfg.c_z});
    for (const Tensor* t : {&m, &z, &probe_m, &probe_z}) fill_uniform(*t, &rng, -1.5f, 1.5f);
    const Tensor msa_mask = random_mask({s, r}, &rng), pair_mask = random_mask({r, r}, &rng);
    const Status st = prepare_inputs(cfg, m, z, msa_mask, pair_mask, &in);
    EXPECT_TRUE(st.ok()) << st.ToString();
    ctx = make_context(cfg, in, chunk);
    allocate_block(cfg, &w);
    for (auto& [name, t] : named_params(w, block_prefix(0))) random_fill(name, t, seed);
  }
  Problem(const Problem&) = delete;
  Problem& operator=(const Problem&) = delete;

  bool updates_m(Mod mod) const { return mod == Mod::kMsaTransition; }
  // The module's output stream and its probe.
  const Tensor& out(Mod mod) const { return updates_m(mod) ? m : z; }
  const Tensor& probe(Mod mod) const { return updates_m(mod) ? probe_m : probe_z; }
  // The input the module differentiates with respect to (besides the residual identity).
  bool input_is_m(Mod mod) const { return mod == Mod::kOpm || updates_m(mod); }
  const Tensor& input(Mod mod) const { return input_is_m(mod) ? m : z; }
};

struct States {
  TransitionState tr;
  OuterProductMeanState opm;
  TriangleMultiplicationState tm;
};

// Runs the training forward in place on m / z (only the output stream changes).
void train_forward(const Problem& S, const BlockWeights& w, Mod mod, float* m, float* z,
                   States* st) {
  const int64_t s = S.ctx.s, r = S.ctx.r;
  switch (mod) {
    case Mod::kMsaTransition:
      return transition_train(w.msa_transition, S.ctx, m, s * r, S.cfg.c_m, &st->tr);
    case Mod::kPairTransition:
      return transition_train(w.pair_transition, S.ctx, z, r * r, S.cfg.c_z, &st->tr);
    case Mod::kOpm:
      return outer_product_mean_train(w.outer_product_mean, S.ctx, m, z, &st->opm);
    case Mod::kTriMulOut:
      return triangle_multiplication_train(w.tri_mul_out, S.ctx, true, z, &st->tm);
    case Mod::kTriMulIn:
      return triangle_multiplication_train(w.tri_mul_in, S.ctx, false, z, &st->tm);
  }
}

void inference_forward(const Problem& S, Mod mod, float* m, float* z) {
  const int64_t s = S.ctx.s, r = S.ctx.r;
  switch (mod) {
    case Mod::kMsaTransition:
      return transition(S.w.msa_transition, S.ctx, m, s * r, S.cfg.c_m);
    case Mod::kPairTransition:
      return transition(S.w.pair_transition, S.ctx, z, r * r, S.cfg.c_z);
    case Mod::kOpm:
      return outer_product_mean(S.w.outer_product_mean, S.ctx, m, z);
    case Mod::kTriMulOut:
      return triangle_multiplication(S.w.tri_mul_out, S.ctx, true, z);
    case Mod::kTriMulIn:
      return triangle_multiplication(S.w.tri_mul_in, S.ctx, false, z);
  }
}

// dm, dz as train.h says: the output stream's gradient holds dL/d out on entry, dL/d in on exit;
// for the outer product mean dz is read and dm accumulates. The module inputs are S.m, S.z.
void backward(const Problem& S, Mod mod, States* st, BlockWeights* g, float* dm, float* dz) {
  const int64_t s = S.ctx.s, r = S.ctx.r;
  const float* m_in = S.m.f32();
  const float* z_in = S.z.f32();
  switch (mod) {
    case Mod::kMsaTransition:
      return transition_backward(S.w.msa_transition, &g->msa_transition, S.ctx, m_in, &st->tr, dm,
                                 s * r, S.cfg.c_m);
    case Mod::kPairTransition:
      return transition_backward(S.w.pair_transition, &g->pair_transition, S.ctx, z_in, &st->tr, dz,
                                 r * r, S.cfg.c_z);
    case Mod::kOpm:
      return outer_product_mean_backward(S.w.outer_product_mean, &g->outer_product_mean, S.ctx,
                                         m_in, st->opm, dz, dm);
    case Mod::kTriMulOut:
      return triangle_multiplication_backward(S.w.tri_mul_out, &g->tri_mul_out, S.ctx, true, z_in,
                                              &st->tm, dz);
    case Mod::kTriMulIn:
      return triangle_multiplication_backward(S.w.tri_mul_in, &g->tri_mul_in, S.ctx, false, z_in,
                                              &st->tm, dz);
  }
}

// L = sum(out * probe) in double, running the training forward on copies of the inputs with
// weights w.
double loss(const Problem& S, const BlockWeights& w, Mod mod) {
  Tensor m = S.m.clone(), z = S.z.clone();
  States st;
  train_forward(S, w, mod, m.f32(), z.f32(), &st);
  const Tensor& out = S.updates_m(mod) ? m : z;
  const float* o = out.f32();
  const float* p = S.probe(mod).f32();
  double acc = 0;
  for (int64_t i = 0; i < out.numel(); ++i) acc += static_cast<double>(o[i]) * p[i];
  return acc;
}

// Analytic gradients: parameters into g (zeroed first), dL/d input into d_in.
void analytic(const Problem& S, Mod mod, BlockWeights* g, Tensor* d_in) {
  allocate_block_grads(S.cfg, g);
  Tensor m = S.m.clone(), z = S.z.clone();
  States st;
  train_forward(S, S.w, mod, m.f32(), z.f32(), &st);
  Tensor dm = S.updates_m(mod) ? S.probe_m.clone() : Tensor::zeros(S.m.shape());
  Tensor dz = S.probe_z.clone();
  backward(S, mod, &st, g, dm.f32(), dz.f32());
  *d_in = S.input_is_m(mod) ? dm : dz;
}

double rms(const Tensor& t) {
  Tensor c = t.contiguous();
  double ss = 0;
  for (int64_t i = 0; i < c.numel(); ++i) ss += static_cast<double>(c.f32()[i]) * c.f32()[i];
  return std::sqrt(ss / std::max<int64_t>(c.numel(), 1));
}

// ---- Finite-difference check ------------------------------------------------------------------
// Central differences on O(1) data at step kStep. A ReLU kink within the step spoils a difference
// by up to half the kink's slope jump, whatever the step, and the transitions cross many (one
// LayerNorm parameter moves r*r*n*c pre-activations at once). So for them, where the central
// difference disagrees, the one-sided differences at a small step (a kink spoils only its own
// side) are tried too; such elements are counted as `kinked`. Smooth modules get the central one
// only.
constexpr double kStep = 1e-2;
constexpr double kSmallSteps[] = {5e-4, 2e-3};  // few kinks within, rounding noise still small
constexpr double kRtol = 2e-2;

struct FdStats {
  int checked = 0, failed = 0, kinked = 0;
  std::string failures;
};

// f at *x + h, with the step actually taken in float (returned in *taken).
double at(const std::function<double()>& f, float* x, double h, double* taken) {
  const float x0 = *x;
  *x = static_cast<float>(x0 + h);
  *taken = static_cast<double>(*x) - x0;
  const double v = f();
  *x = x0;
  return v;
}

// Compares the analytic derivative `an` of f in *x with finite differences:
// |fd - an| <= kRtol * max(|an|, floor), where floor (from the tensor's gradient scale) keeps
// near-zero elements from failing on rounding noise. relu: allow the one-sided fallback.
void fd_element(const std::function<double()>& f, float* x, double an, double floor, bool relu,
                const std::string& what, FdStats* out) {
  ++out->checked;
  const auto ok = [&](double fd) {
    return std::isfinite(fd) && std::isfinite(an) &&
           std::abs(fd - an) <= kRtol * std::max(std::abs(an), floor);
  };
  double hp, hm;
  const double lp = at(f, x, kStep, &hp), lm = at(f, x, -kStep, &hm);
  const double central = (lp - lm) / (hp - hm);
  if (ok(central)) return;
  if (!relu) {
    ++out->failed;
    std::ostringstream os;
    os << "  " << what << ": analytic " << an << " vs central " << central << "\n";
    out->failures += os.str();
    return;
  }
  const double l0 = f();
  std::ostringstream os;
  os << "  " << what << ": analytic " << an << " vs central " << central << ", one-sided";
  for (const double h : kSmallSteps) {
    const double sp = at(f, x, h, &hp), sm = at(f, x, -h, &hm);
    const double forward = (sp - l0) / hp, backward = (l0 - sm) / -hm;
    if (ok(forward) || ok(backward)) {
      ++out->kinked;
      return;
    }
    os << " " << forward << " / " << backward << " (h " << h << ")";
  }
  ++out->failed;
  out->failures += os.str() + "\n";
}

// Checks `per_tensor` random elements of every parameter tensor of the module and `inputs`
// random input elements against finite differences, with the analytic gradients g, d_in (which
// may have been tampered with by the caller). Per-tensor stats in `by_tensor` (input: "input").
void fd_check(Problem& S, Mod mod, const BlockWeights& g, const Tensor& d_in, int per_tensor,
              int inputs, std::vector<std::pair<std::string, FdStats>>* by_tensor) {
  std::mt19937 rng(1234);
  const Named wp = module_params(S.w, mod), gp = module_params(g, mod);
  EXPECT_EQ(wp.size(), mod_param_count(mod));
  ASSERT_EQ(wp.size(), gp.size());
  const std::function<double()> f = [&] { return loss(S, S.w, mod); };
  for (size_t t = 0; t < wp.size(); ++t) {
    ASSERT_EQ(wp[t].first, gp[t].first);
    ASSERT_TRUE(wp[t].second.is_contiguous() && gp[t].second.is_contiguous());
    const int64_t n = wp[t].second.numel();
    const double floor = 0.2 * rms(gp[t].second) + 1e-4;
    FdStats stats;
    for (int k = 0; k < per_tensor; ++k) {
      const int64_t idx = std::uniform_int_distribution<int64_t>(0, n - 1)(rng);
      fd_element(f, wp[t].second.f32() + idx, gp[t].second.f32()[idx], floor, has_relu(mod),
                 wp[t].first + "[" + std::to_string(idx) + "]", &stats);
    }
    by_tensor->emplace_back(wp[t].first, stats);
  }
  const Tensor& x = S.input(mod);
  const double floor = 0.2 * rms(d_in) + 1e-4;
  FdStats stats;
  for (int k = 0; k < inputs; ++k) {
    const int64_t idx = std::uniform_int_distribution<int64_t>(0, x.numel() - 1)(rng);
    fd_element(f, x.f32() + idx, d_in.f32()[idx], floor, has_relu(mod),
               "input[" + std::to_string(idx) + "]", &stats);
  }
  by_tensor->emplace_back("input", stats);
}

std::vector<Tensor> all_grad_tensors(const BlockWeights& g) {
  std::vector<Tensor> v;
  for (auto& [name, t] : named_params(g, "")) v.push_back(t);
  for (const GatedAttentionW* a :
       {&g.msa_att_row.mha, &g.msa_att_col.mha, &g.tri_att_start.mha, &g.tri_att_end.mha}) {
    v.push_back(a->w_qkvg);
    v.push_back(a->b_qkvg);
  }
  return v;
}

class TrainPairModule : public ::testing::TestWithParam<Mod> {};

TEST_P(TrainPairModule, TrainingForwardMatchesInference) {
  const Mod mod = GetParam();
  for (int64_t chunk : {0, 1, 3}) {
    Problem S(chunk);
    Tensor m_inf = S.m.clone(), z_inf = S.z.clone();
    inference_forward(S, mod, m_inf.f32(), z_inf.f32());
    Tensor m_tr = S.m.clone(), z_tr = S.z.clone();
    States st;
    train_forward(S, S.w, mod, m_tr.f32(), z_tr.f32(), &st);
    // The other stream is untouched.
    const Tensor& other_in = S.updates_m(mod) ? S.z : S.m;
    const Tensor& other_tr = S.updates_m(mod) ? z_tr : m_tr;
    EXPECT_EQ(std::memcmp(other_in.f32(), other_tr.f32(), other_in.nbytes()), 0);
    const Tensor& x0 = S.out(mod);
    const float* a = (S.updates_m(mod) ? m_inf : z_inf).f32();
    const float* b = (S.updates_m(mod) ? m_tr : z_tr).f32();
    const float* x = x0.f32();
    double max_update = 0, max_diff = 0;
    for (int64_t i = 0; i < x0.numel(); ++i) {
      max_update = test::max_nan(max_update, std::abs(static_cast<double>(a[i]) - x[i]));
      max_diff = test::max_nan(max_diff, std::abs(static_cast<double>(a[i]) - b[i]));
    }
    EXPECT_GT(max_update, 1e-2) << "chunk " << chunk;
    EXPECT_LE(max_diff, 1e-5 * max_update) << "chunk " << chunk;
  }
}

TEST_P(TrainPairModule, GradientsMatchFiniteDifferences) {
  const Mod mod = GetParam();
  Problem S(3);  // r = 7: chunks of 3, 3, 1 where the module chunks
  BlockWeights g;
  Tensor d_in;
  analytic(S, mod, &g, &d_in);
  std::vector<std::pair<std::string, FdStats>> by_tensor;
  ASSERT_NO_FATAL_FAILURE(fd_check(S, mod, g, d_in, 3, 8, &by_tensor));
  int checked = 0, kinked = 0;
  for (const auto& [name, st] : by_tensor) {
    EXPECT_EQ(st.failed, 0) << name << ":\n" << st.failures;
    checked += st.checked;
    kinked += st.kinked;
  }
  EXPECT_LE(kinked * 3, checked * 2) << "most checks needed the one-sided fallback";
}

// The finite-difference check fails on wrong gradients: with every gradient 10% too large, most
// checked elements fail; with every tensor's gradient dropped, every tensor fails; with the
// residual identity dropped from the input gradient, the input fails.
TEST_P(TrainPairModule, FiniteDifferenceCheckCatchesWrongGradients) {
  const Mod mod = GetParam();
  Problem S(3);
  BlockWeights g;
  Tensor d_in;
  analytic(S, mod, &g, &d_in);
  for (const float factor : {1.1f, 0.f}) {
    BlockWeights bad;
    allocate_block_grads(S.cfg, &bad);
    const Named gp = module_params(g, mod), bp = module_params(bad, mod);
    for (size_t t = 0; t < gp.size(); ++t)
      for (int64_t i = 0; i < gp[t].second.numel(); ++i)
        bp[t].second.f32()[i] = factor * gp[t].second.f32()[i];
    Tensor bad_in = d_in.clone();
    for (int64_t i = 0; i < bad_in.numel(); ++i) bad_in.f32()[i] *= factor;
    std::vector<std::pair<std::string, FdStats>> by_tensor;
    ASSERT_NO_FATAL_FAILURE(fd_check(S, mod, bad, bad_in, 3, 8, &by_tensor));
    int checked = 0, failed = 0;
    for (const auto& [name, st] : by_tensor) {
      if (factor == 0.f) {
        EXPECT_GT(st.failed, 0) << name << " gradient dropped, check passed";
      }
      checked += st.checked;
      failed += st.failed;
    }
    EXPECT_GT(failed * 2, checked) << "gradients x" << factor;
  }
  if (mod != Mod::kOpm) {  // the OPM leaves its input's own gradient alone
    Tensor bad_in = d_in.clone();
    const float* p = S.probe(mod).f32();
    for (int64_t i = 0; i < bad_in.numel(); ++i) bad_in.f32()[i] -= p[i];
    std::vector<std::pair<std::string, FdStats>> by_tensor;
    ASSERT_NO_FATAL_FAILURE(fd_check(S, mod, g, bad_in, 1, 8, &by_tensor));
    EXPECT_EQ(by_tensor.back().first, "input");
    EXPECT_GT(by_tensor.back().second.failed, 0) << "residual dropped, check passed";
  }
}

TEST_P(TrainPairModule, BackwardIsDeterministic) {
  const Mod mod = GetParam();
  Problem S(3);
  BlockWeights g1, g2;
  Tensor d1, d2;
  analytic(S, mod, &g1, &d1);
  analytic(S, mod, &g2, &d2);
  EXPECT_TRUE(test::all_finite(d1));
  EXPECT_EQ(std::memcmp(d1.f32(), d2.f32(), d1.nbytes()), 0);
  const std::vector<Tensor> a = all_grad_tensors(g1), b = all_grad_tensors(g2);
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    const Tensor x = a[i].contiguous(), y = b[i].contiguous();
    EXPECT_TRUE(test::all_finite(x)) << "tensor " << i;
    EXPECT_EQ(std::memcmp(x.f32(), y.f32(), x.nbytes()), 0) << "tensor " << i;
  }
}

// A second backward into the same g adds the same gradients again; other modules' gradients
// stay zero; the input gradient adds onto what the stream gradient held.
TEST_P(TrainPairModule, BackwardAccumulates) {
  const Mod mod = GetParam();
  Problem S(0);
  BlockWeights g1;
  Tensor d1;
  analytic(S, mod, &g1, &d1);

  BlockWeights g;
  allocate_block_grads(S.cfg, &g);
  Tensor m = S.m.clone(), z = S.z.clone();
  States st;
  train_forward(S, S.w, mod, m.f32(), z.f32(), &st);
  Tensor d_twice;
  for (int pass = 0; pass < 2; ++pass) {
    Tensor dm = S.updates_m(mod) ? S.probe_m.clone() : Tensor::zeros(S.m.shape());
    Tensor dz = S.probe_z.clone();
    if (mod == Mod::kOpm && pass == 1) dm = d_twice;  // accumulates onto the first result
    // The first backward consumes the chunked state; the second recomputes it (policy module).
    backward(S, mod, &st, &g, dm.f32(), dz.f32());
    if (mod == Mod::kOpm) d_twice = dm;
  }
  for (auto& [name, t] : named_params(g, "")) {
    const bool mine = name.rfind(mod_prefix(mod), 0) == 0;
    double ref_max = 0, err = 0, other = 0;
    for (auto& [n1, t1] : named_params(g1, ""))
      if (n1 == name)
        for (int64_t i = 0; i < t.numel(); ++i) {
          ref_max = test::max_nan(ref_max, std::abs(2.0 * t1.f32()[i]));
          err = test::max_nan(err, std::abs(t.f32()[i] - 2.0 * t1.f32()[i]));
          other = test::max_nan(other, std::abs(static_cast<double>(t.f32()[i])));
        }
    if (mine) {
      EXPECT_LE(err, 1e-5 * std::max(ref_max, 1e-3)) << name;
    } else {
      EXPECT_EQ(other, 0.0) << name << " touched by " << mod_name(mod);
    }
  }
  if (mod == Mod::kOpm) {
    for (int64_t i = 0; i < d1.numel(); ++i)
      ASSERT_NEAR(d_twice.f32()[i], 2.0 * d1.f32()[i], 1e-5 * (1 + std::abs(d1.f32()[i])));
  }
}

TEST_P(TrainPairModule, GradientsDoNotDependOnChunk) {
  const Mod mod = GetParam();
  BlockWeights g_whole, g_chunked;
  Tensor d_whole, d_chunked;
  {
    Problem S(0);
    analytic(S, mod, &g_whole, &d_whole);
  }
  {
    Problem S(2);
    analytic(S, mod, &g_chunked, &d_chunked);
  }
  Named a = module_params(g_whole, mod), b = module_params(g_chunked, mod);
  a.emplace_back("input", d_whole);
  b.emplace_back("input", d_chunked);
  for (size_t t = 0; t < a.size(); ++t) {
    double mx = 0, err = 0;
    for (int64_t i = 0; i < a[t].second.numel(); ++i) {
      mx = test::max_nan(mx, std::abs(static_cast<double>(a[t].second.f32()[i])));
      err = test::max_nan(
          err, std::abs(static_cast<double>(a[t].second.f32()[i]) - b[t].second.f32()[i]));
    }
    EXPECT_LE(err, 1e-5 * std::max(mx, 1e-3)) << a[t].first;
  }
}

INSTANTIATE_TEST_SUITE_P(TrainPair, TrainPairModule,
                         ::testing::Values(Mod::kMsaTransition, Mod::kPairTransition, Mod::kOpm,
                                           Mod::kTriMulOut, Mod::kTriMulIn),
                         [](const ::testing::TestParamInfo<Mod>& info) {
                           return std::string(mod_name(info.param));
                         });

TEST(TrainPairGrads, AllocateBlockGradsZeroesAllStorage) {
  EvoformerConfig cfg;
  cfg.c_m = 16, cfg.c_z = 8, cfg.c_hidden_opm = 4, cfg.c_hidden_mul = 8, cfg.transition_n = 2;
  cfg.c_hidden_msa_att = 4, cfg.no_heads_msa = 2, cfg.c_hidden_pair_att = 4, cfg.no_heads_pair = 2;
  BlockWeights g;
  allocate_block_grads(cfg, &g);
  int64_t total = 0;
  for (const Tensor& t : all_grad_tensors(g)) {
    const Tensor c = t.contiguous();
    for (int64_t i = 0; i < c.numel(); ++i) ASSERT_EQ(c.f32()[i], 0.f);
    total += c.numel();
  }
  EXPECT_GT(total, 0);
  EXPECT_EQ(g.tri_mul_out.ab.w.dim(0), 4 * cfg.c_hidden_mul);
  EXPECT_EQ(g.outer_product_mean.l12.w.dim(0), 2 * cfg.c_hidden_opm);
}

}  // namespace
}  // namespace fc
