// Bias-only logits of kern::attention (AttentionArgs::bias_logits: logits = mask bias + pair bias,
// no q, no k; AF3 pair-weighted averaging): the fast forward (f32 and bf16) and backward against
// the naive references with bias_logits, and against the ordinary kernels run with q = 0 (what the
// pair-weighted averaging computed before the mode existed), which must give the same bits. q and
// k are null in the bias-only calls, so a kernel that still reads them crashes; dq and dk buffers
// are given and must stay untouched.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "core/rng.h"
#include "kernels/backward.h"
#include "kernels/kernels.h"

namespace fc {
namespace {

constexpr float kSentinel = 777.25f;

std::vector<float> vec(int64_t n, uint64_t seed, float scale = 1.f) {
  std::vector<float> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = scale * uniform_pm1(seed, i);
  return v;
}

struct Shape {
  int64_t B, L, H, C;
  bool mask, gate;
};
std::string Name(const Shape& s) {
  return "B" + std::to_string(s.B) + "_L" + std::to_string(s.L) + "_H" + std::to_string(s.H) +
         "_C" + std::to_string(s.C) + (s.mask ? "_mask" : "") + (s.gate ? "_gate" : "");
}
void PrintTo(const Shape& s, std::ostream* os) { *os << Name(s); }

// The modules' layout: q | k | v | g interleaved in one [B * L, 4*H*C] buffer, o [B * L, H*C].
// q is zero (the zero query projection), k random; pair bias [H, L, L]; mask bias [B, L] with
// ~20% of the keys at -1e6 (Boltz's masked-key bias).
struct Case {
  Shape s;
  int64_t hc, ld;
  std::vector<float> qkvg, pb, mb, dout;
  explicit Case(const Shape& p) : s(p), hc(p.H * p.C), ld(4 * p.H * p.C) {
    qkvg = vec(p.B * p.L * ld, 11, 2.f);
    for (int64_t r = 0; r < p.B * p.L; ++r) std::fill_n(qkvg.data() + r * ld, hc, 0.f);
    pb = vec(p.H * p.L * p.L, 12, 3.f);
    mb.assign(p.B * p.L, 0.f);
    for (int64_t i = 0; i < p.B * p.L; ++i)
      if (uniform_pm1(13, i) < -0.6f) mb[i] = -1e6f;
    dout = vec(p.B * p.L * hc, 14);
  }
  // bias_only: q and k null.
  kern::AttentionArgs Args(bool bias_only, DType dtype) const {
    kern::AttentionArgs a;
    a.B = s.B, a.Lq = s.L, a.Lk = s.L, a.H = s.H, a.C = s.C, a.dtype = dtype;
    a.scale = 1.f / std::sqrt(static_cast<float>(s.C));
    const float* p = qkvg.data();
    const int64_t bs = s.L * ld;
    a.q = bias_only ? nullptr : p, a.q_bs = bs, a.q_rs = ld;
    a.k = bias_only ? nullptr : p + hc, a.k_bs = bs, a.k_rs = ld;
    a.v = p + 2 * hc, a.v_bs = bs, a.v_rs = ld;
    a.gate = s.gate ? p + 3 * hc : nullptr, a.g_bs = bs, a.g_rs = ld;
    a.o_bs = s.L * hc, a.o_rs = hc;
    a.mask_bias = s.mask ? mb.data() : nullptr;
    a.pair_bias = pb.data();
    a.bias_logits = bias_only;
    return a;
  }
};

// Fast (threads > 0) or reference (0) forward: o [B*L, H*C], lse [B, H, L].
std::vector<float> Forward(const Case& c, kern::AttentionArgs a, int threads,
                           std::vector<float>* lse) {
  std::vector<float> o(c.s.B * c.s.L * c.hc, kSentinel);
  lse->assign(c.s.B * c.s.H * c.s.L, kSentinel);
  a.o = o.data(), a.lse = lse->data();
  if (threads > 0) {
    std::vector<float> scratch(kern::attention_scratch_floats(a, threads));
    kern::attention(a, scratch.data(), threads);
  } else {
    std::vector<float> scratch(c.s.L);
    kern::ref::attention(a, scratch.data());
  }
  return o;
}

// max |got - want| <= tol * max(max |want|, 1).
::testing::AssertionResult Close(const std::vector<float>& got, const std::vector<float>& want,
                                 double tol) {
  double scale = 1, err = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (!std::isfinite(got[i])) return ::testing::AssertionFailure() << "not finite at " << i;
    scale = std::max(scale, static_cast<double>(std::abs(want[i])));
    err = std::max(err, std::abs(static_cast<double>(got[i]) - want[i]));
  }
  if (err <= tol * scale) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "max error " << err << " (scale " << scale << ")";
}

bool BitEqual(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

class AttentionBiasLogits : public ::testing::TestWithParam<Shape> {};

// f32 and bf16 forward: the bias-only kernel (no q, k) matches its reference (1e-5 of the largest
// value in f32; bf16: 4e-3, the probabilities and v rounded to bf16), equals the ordinary kernel
// on q = 0 bit for bit, and gives the same bits for 1 and 3 threads.
TEST_P(AttentionBiasLogits, ForwardMatchesReferenceAndZeroQuery) {
  const Case c(GetParam());
  for (DType dt : {DType::F32, DType::BF16}) {
    SCOPED_TRACE(dt == DType::F32 ? "f32" : "bf16");
    std::vector<float> lse_ref, lse, lse0, lse3;
    const std::vector<float> o_ref = Forward(c, c.Args(true, dt), 0, &lse_ref);
    const std::vector<float> o = Forward(c, c.Args(true, dt), 2, &lse);
    EXPECT_TRUE(Close(o, o_ref, dt == DType::F32 ? 1e-5 : 4e-3));
    EXPECT_TRUE(Close(lse, lse_ref, 1e-5));
    EXPECT_TRUE(BitEqual(Forward(c, c.Args(false, dt), 2, &lse0), o));
    EXPECT_TRUE(BitEqual(lse0, lse));
    EXPECT_TRUE(BitEqual(Forward(c, c.Args(true, dt), 1, &lse3), o));
    EXPECT_TRUE(BitEqual(Forward(c, c.Args(true, dt), 3, &lse3), o));
  }
}

// Backward (f32; with the saved lse and without): dv, dgate and d_pair_bias match the reference
// (1e-5) and equal the ordinary backward on q = 0 bit for bit; dq and dk are not written.
TEST_P(AttentionBiasLogits, BackwardMatchesReferenceAndZeroQuery) {
  const Case c(GetParam());
  std::vector<float> lse;
  Forward(c, c.Args(true, DType::F32), 2, &lse);
  const int64_t n = c.s.B * c.s.L * c.ld;
  // threads 0: reference. Returns dv | dgate | d_pair_bias; dqk: the dq, dk buffer afterwards.
  auto backward = [&](bool bias_only, int threads, const float* lse_in, std::vector<float>* dqk) {
    const kern::AttentionArgs a = c.Args(bias_only, DType::F32);
    std::vector<float> d(n, kSentinel), dpb = vec(c.s.H * c.s.L * c.s.L, 15);  // [B*L, 4*H*C]
    kern::AttentionGrads g;
    g.d_out = c.dout.data();
    g.dq = d.data(), g.dk = d.data() + c.hc, g.dv = d.data() + 2 * c.hc;
    g.dgate = d.data() + 3 * c.hc;
    g.d_pair_bias = dpb.data();
    g.lse = lse_in;
    if (threads > 0) {
      std::vector<float> scratch(kern::attention_backward_scratch_floats(a, threads, true));
      kern::attention_backward(a, g, scratch.data(), threads);
    } else {
      std::vector<float> scratch(kern::ref::attention_backward_scratch_floats(a));
      kern::ref::attention_backward(a, g, scratch.data());
    }
    std::vector<float> out, qk;
    for (int64_t r = 0; r < c.s.B * c.s.L; ++r) {
      const float* row = d.data() + r * c.ld;
      qk.insert(qk.end(), row, row + 2 * c.hc);
      out.insert(out.end(), row + 2 * c.hc, row + (c.s.gate ? 4 : 3) * c.hc);
    }
    out.insert(out.end(), dpb.begin(), dpb.end());
    if (dqk) *dqk = qk;
    return out;
  };
  std::vector<float> dqk;
  const std::vector<float> ref = backward(true, 0, nullptr, &dqk);
  for (float x : dqk) ASSERT_EQ(x, kSentinel);
  const float* const lses[] = {nullptr, lse.data()};
  for (const float* l : lses) {
    SCOPED_TRACE(l ? "lse" : "no lse");
    const std::vector<float> got = backward(true, 2, l, &dqk);
    EXPECT_TRUE(Close(got, ref, 1e-5));
    for (float x : dqk) ASSERT_EQ(x, kSentinel);
    EXPECT_TRUE(BitEqual(backward(false, 2, l, nullptr), got));
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, AttentionBiasLogits,
                         ::testing::Values(Shape{1, 1, 1, 1, false, false},   // one key
                                           Shape{2, 7, 3, 5, true, true},     // below one tile
                                           Shape{3, 70, 2, 17, true, true},   // two query tiles
                                           Shape{2, 300, 2, 32, true, true},  // two key tiles
                                           Shape{4, 40, 8, 32, false, true},  // PWA heads
                                           Shape{2, 33, 3, 8, true, false}),
                         [](const auto& info) { return Name(info.param); });

}  // namespace
}  // namespace fc
