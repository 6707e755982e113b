// Fused kernels (src/kernels/fused.h): the row-blocked versions against the naive references on
// shapes with partial blocks, strided batched views (an MSA column read in place), accumulation,
// no bias, and the masked transition; results identical across thread counts; scratch formulas
// that cover what the kernels touch.
//
// Tolerance: the references work in double per row, the fast kernels in float (oneDNN sgemm,
// Highway LayerNorm). For K <= 1024 and O(1) inputs the float dot products carry relative errors
// of a few 1e-7, so a normwise relative error below 2e-6 has a margin and still catches a wrong or
// skipped row block, which gives O(1) errors. BF16 GEMM inputs: both sides round the same
// normalised rows to bf16, but the fast LayerNorm's last-bit differences from the double reference
// flip the rounding of a few elements (one bf16 ulp = 2^-8 relative), so kBf16Tol below.
#include "kernels/fused.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <string>
#include <vector>

#include "core/rng.h"
#include "foldcube/af3.h"
#include "foldcube/extra_msa.h"
#include "foldcube/io.h"
#include "foldcube/model.h"
#include "kernels/convert.h"
#include "kernels/kernels.h"
#include "model/block_table.h"
#include "model/common.h"
#include "model/weights.h"
#include "test_util.h"

namespace fc {
namespace {

std::vector<float> vec(int64_t n, uint64_t seed, float scale = 1.f, float offset = 0.f) {
  std::vector<float> out(n);
  for (int64_t i = 0; i < n; ++i) out[i] = scale * uniform_pm1(seed, i) + offset;
  return out;
}

constexpr double kF32Tol = 2e-6, kBf16Tol = 1e-4;
// bf16 GEMM inputs against the float64 golden reference, normwise per tensor (docs/benchmarks.md).
constexpr double kBf16GoldenTol = 1e-2;

std::vector<uint16_t> to_bf16(const std::vector<float>& x) {
  std::vector<uint16_t> out(x.size());
  kern::f32_to_bf16(x.data(), out.data(), static_cast<int64_t>(x.size()));
  return out;
}

double norm_rel_err(const std::vector<float>& got, const std::vector<float>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double d = static_cast<double>(got[i]) - want[i];
    num += d * d;
    den += static_cast<double>(want[i]) * want[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

// A fused kernel at 1, 2 and 3 threads: run(scratch, threads) calls it with scratch of
// scratch_floats(threads) floats (and a sentinel after them that must survive) and returns its
// output. Every output is within tol of want (normwise) and all are bit-identical; returns them.
std::vector<std::vector<float>> run_thread_counts(
    const std::function<int64_t(int)>& scratch_floats,
    const std::function<std::vector<float>(float*, int)>& run, const std::vector<float>& want,
    double tol, const std::string& what) {
  std::vector<std::vector<float>> got;
  for (int threads : {1, 2, 3}) {
    std::vector<float> s(scratch_floats(threads) + 1, 123.f);
    got.push_back(run(s.data(), threads));
    EXPECT_EQ(s.back(), 123.f) << "scratch overrun, threads " << threads << ", " << what;
    EXPECT_LT(norm_rel_err(got.back(), want), tol) << "threads " << threads << ", " << what;
  }
  for (size_t t = 1; t < got.size(); ++t)
    EXPECT_EQ(std::memcmp(got[t].data(), got[0].data(), got[0].size() * sizeof(float)), 0)
        << "threads differ, " << what << ", run " << t;
  return got;
}

struct LnLinCase {
  int64_t B, L, in, out;
  bool strided, accumulate, bias;
};

std::string LnLinName(const LnLinCase& c) {
  return "B" + std::to_string(c.B) + "_L" + std::to_string(c.L) + "_in" + std::to_string(c.in) +
         "_out" + std::to_string(c.out) + (c.strided ? "_strided" : "") +
         (c.accumulate ? "_acc" : "") + (c.bias ? "" : "_nobias");
}
void PrintTo(const LnLinCase& c, std::ostream* os) { *os << LnLinName(c); }

class FusedLayerNormLinear : public ::testing::TestWithParam<LnLinCase> {};

TEST_P(FusedLayerNormLinear, MatchesReferenceAndThreadCounts) {
  const LnLinCase c = GetParam();
  // Strided: x is [L, B, in] read as B items of L rows (column view); else [B, L, in].
  const std::vector<float> x = vec(c.B * c.L * c.in, 1, 2.f, 0.5f);
  const std::vector<float> gamma = vec(c.in, 2, 0.1f, 1.f), beta = vec(c.in, 3, 0.1f);
  const std::vector<float> W = vec(c.out * c.in, 4, 1.f / std::sqrt(float(c.in)));
  const std::vector<float> bias = vec(c.out, 5, 0.1f);
  const int64_t ldy = c.out + 3;  // padded rows
  const std::vector<float> y0 = vec(c.B * c.L * ldy, 6);
  kern::LayerNormLinearArgs a;
  a.B = c.B, a.L = c.L, a.in = c.in, a.out = c.out;
  a.x = x.data();
  a.x_bs = c.strided ? c.in : c.L * c.in;
  a.x_rs = c.strided ? c.B * c.in : c.in;
  a.gamma = gamma.data(), a.beta = beta.data(), a.eps = 1e-5f;
  a.W = W.data(), a.bias = c.bias ? bias.data() : nullptr;
  a.ldy = ldy, a.accumulate = c.accumulate;

  const std::vector<uint16_t> Wb = to_bf16(W);
  for (DType dt : {DType::F32, DType::BF16}) {
    a.dtype = dt;
    a.W_bf16 = Wb.data();
    const double tol = dt == DType::BF16 ? kBf16Tol : kF32Tol;
    std::vector<float> want = y0, scratch(2 * c.in);
    a.y = want.data();
    kern::ref::layernorm_linear(a, scratch.data());
    const std::vector<std::vector<float>> got = run_thread_counts(
        [&](int threads) { return kern::layernorm_linear_scratch_floats(a, threads); },
        [&](float* s, int threads) {
          std::vector<float> y = y0;
          a.y = y.data();
          kern::layernorm_linear(a, s, threads);
          return y;
        },
        want, tol, dtype_name(dt));
    for (const std::vector<float>& y : got)
      for (int64_t g = 0; g < c.B * c.L; ++g)  // padding untouched
        for (int64_t i = c.out; i < ldy; ++i) ASSERT_EQ(y[g * ldy + i], y0[g * ldy + i]);
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, FusedLayerNormLinear,
                         ::testing::Values(LnLinCase{1, 1, 7, 3, false, false, true},
                                           LnLinCase{1, 300, 64, 17, false, false, true},
                                           LnLinCase{3, 50, 32, 256, false, true, true},
                                           LnLinCase{5, 37, 48, 40, true, false, true},
                                           LnLinCase{4, 129, 256, 1024, true, true, false},
                                           LnLinCase{2, 1000, 128, 4, false, false, false}),
                         [](const auto& info) { return LnLinName(info.param); });

// linear_residual on a column view (y is [L, B, out] read as B items of L strided rows) and on
// contiguous rows, against the double reference, with f32 and bf16 GEMM inputs; identical across
// thread counts.
TEST(FusedLinearResidual, StridedAndContiguousRows) {
  for (DType dt : {DType::F32, DType::BF16})
    for (bool strided : {true, false})
      for (bool has_bias : {true, false}) {
        const int64_t B = 6, L = 45, in = 64, out = 32, ldx = 4 * in;  // x: the o slots of qkvg
        const std::vector<float> x = vec(B * L * ldx, 41), W = vec(out * in, 42, 0.125f);
        const std::vector<float> bias = vec(out, 43, 0.1f), y0 = vec(B * L * out, 44);
        const std::vector<uint16_t> Wb = to_bf16(W);
        kern::LinearResidualArgs a;
        a.B = B, a.L = L, a.in = in, a.out = out, a.x = x.data(), a.ldx = ldx;
        a.W = W.data(), a.bias = has_bias ? bias.data() : nullptr;
        a.y_bs = strided ? out : L * out;
        a.y_rs = strided ? B * out : out;
        a.dtype = dt, a.W_bf16 = Wb.data();
        std::vector<float> want = y0, ref_scratch(in + out);
        a.y = want.data();
        kern::ref::linear_residual(a, ref_scratch.data());
        run_thread_counts(
            [&](int threads) { return kern::linear_residual_scratch_floats(a, threads); },
            [&](float* s, int threads) {
              std::vector<float> y = y0;
              a.y = y.data();
              kern::linear_residual(a, s, threads);
              return y;
            },
            want, dt == DType::BF16 ? kBf16Tol : kF32Tol,
            "strided " + std::to_string(strided) + " bias " + std::to_string(has_bias) + " " +
                dtype_name(dt));
      }
}

// The triangle multiplication's fused projection (masked, gated, written channel-major) against
// the double reference, with the LayerNorm in the kernel and on normalised input (contiguous and
// strided rows): partial row blocks, a narrow group (5 channels), zero mask entries, the columns
// past `rows` of A and B untouched, f32 and bf16 (GEMM inputs, A and B); identical across thread
// counts.
TEST(FusedTriMul, GatedProjectionMatchesReferenceAndThreadCounts) {
  for (const DType dt : {DType::F32, DType::BF16})
    for (const bool ln : {true, false})
      for (const int64_t rows : {7, 1000})
        for (const int64_t nc : {16, 5}) {
          const int64_t in = 32, ld_ab = rows + 9, ldx = ln ? in : in + 3;
          const std::vector<float> x = vec(rows * ldx, 51, 1.f), W = vec(4 * nc * in, 52, 0.3f);
          const std::vector<float> bias = vec(4 * nc, 53, 0.1f);
          const std::vector<uint16_t> Wb = to_bf16(W);
          std::vector<float> mask(rows);
          for (int64_t p = 0; p < rows; ++p) mask[p] = p % 7 == 3 ? 0.f : 1.f;
          kern::GatedProjectionArgs a;
          a.rows = rows, a.in = in, a.nc = nc, a.x = x.data(), a.ldx = ldx;
          a.W = W.data(), a.bias = bias.data(), a.mask = mask.data(), a.ld_ab = ld_ab;
          a.dtype = dt, a.W_bf16 = Wb.data();
          const std::vector<float> gamma = vec(in, 55, 0.1f, 1.f), beta = vec(in, 56, 0.1f);
          if (ln) a.gamma = gamma.data(), a.beta = beta.data();
          // A and B before the call (f32, or their bf16 bits), and as f32 values after it.
          const std::vector<float> ab0 = vec(nc * ld_ab, 54);
          const std::vector<uint16_t> ab0b = to_bf16(ab0);
          auto outputs = [&](auto call) {
            std::vector<float> A = ab0, B = ab0;
            std::vector<uint16_t> Ab = ab0b, Bb = ab0b;
            a.A = A.data(), a.B = B.data(), a.A_bf16 = Ab.data(), a.B_bf16 = Bb.data();
            call();
            if (dt == DType::BF16) {
              for (int64_t c = 0; c < nc; ++c)
                for (int64_t p = rows; p < ld_ab; ++p) {
                  EXPECT_EQ(Ab[c * ld_ab + p], ab0b[c * ld_ab + p]);
                  EXPECT_EQ(Bb[c * ld_ab + p], ab0b[c * ld_ab + p]);
                }
              EXPECT_EQ(A, ab0);  // the f32 outputs are not touched
              kern::bf16_to_f32(Ab.data(), A.data(), nc * ld_ab);
              kern::bf16_to_f32(Bb.data(), B.data(), nc * ld_ab);
            }
            for (int64_t c = 0; c < nc && dt == DType::F32; ++c)
              for (int64_t p = rows; p < ld_ab; ++p) {
                EXPECT_EQ(A[c * ld_ab + p], ab0[c * ld_ab + p]);
                EXPECT_EQ(B[c * ld_ab + p], ab0[c * ld_ab + p]);
              }
            A.insert(A.end(), B.begin(), B.end());
            return A;
          };
          std::vector<float> ref_scratch(in + in / 2 + 1);
          const std::vector<float> want =
              outputs([&] { kern::ref::gated_projection(a, ref_scratch.data()); });
          run_thread_counts(
              [&](int threads) { return kern::gated_projection_scratch_floats(a, threads); },
              [&](float* s, int threads) {
                return outputs([&] { kern::gated_projection(a, s, threads); });
              },
              want, dt == DType::BF16 ? kBf16Tol : kF32Tol,
              "rows " + std::to_string(rows) + " nc " + std::to_string(nc) + " ln " +
                  std::to_string(ln) + " " + dtype_name(dt));
        }
}

// The triangle multiplication's fused output phase (LN_out, linear_z, the gate from LN_in(z), the
// residual add) against the double reference: partial row blocks, channel-major products with a
// padded leading dimension, with and without biases, f32 and bf16 GEMM inputs; identical across
// thread counts.
TEST(FusedTriMul, GatedOutputMatchesReferenceAndThreadCounts) {
  for (const DType dt : {DType::F32, DType::BF16})
    for (const int64_t rows : {5, 1100})
      for (const bool bias : {true, false}) {
        const int64_t cp = 24, cz = 16, ldp = rows + 3;
        const std::vector<float> P = vec(cp * ldp, 61, 2.f, 0.3f), z0 = vec(rows * cz, 62, 1.f);
        const std::vector<float> gp = vec(cp, 63, 0.1f, 1.f), bp_ln = vec(cp, 64, 0.1f);
        const std::vector<float> gz = vec(cz, 65, 0.1f, 1.f), bz_ln = vec(cz, 66, 0.1f);
        const std::vector<float> Wp = vec(cz * cp, 67, 0.2f), Wg = vec(cz * cz, 68, 0.25f);
        const std::vector<float> bp = vec(cz, 69, 0.1f), bg = vec(cz, 70, 0.1f);
        kern::GatedOutputArgs a;
        a.rows = rows, a.cp = cp, a.cz = cz, a.P = P.data(), a.ldp = ldp;
        a.gamma_p = gp.data(), a.beta_p = bp_ln.data(), a.Wp = Wp.data();
        a.bp = bias ? bp.data() : nullptr;
        a.gamma_z = gz.data(), a.beta_z = bz_ln.data(), a.Wg = Wg.data();
        a.bg = bias ? bg.data() : nullptr;
        const std::vector<uint16_t> Wpb = to_bf16(Wp), Wgb = to_bf16(Wg);
        a.dtype = dt, a.Wp_bf16 = Wpb.data(), a.Wg_bf16 = Wgb.data();
        std::vector<float> want = z0, ref_scratch(cp + 3 * cz + std::max(cp, cz));
        a.z = want.data();
        kern::ref::gated_output(a, ref_scratch.data());
        run_thread_counts(
            [&](int threads) { return kern::gated_output_scratch_floats(a, threads); },
            [&](float* s, int threads) {
              std::vector<float> z = z0;
              a.z = z.data();
              kern::gated_output(a, s, threads);
              return z;
            },
            want, dt == DType::BF16 ? kBf16Tol : kF32Tol,
            "rows " + std::to_string(rows) + " bias " + std::to_string(bias) + " " +
                dtype_name(dt));
      }
}

struct TransCase {
  int64_t rows, c, n;
  bool masked;
  bool swiglu = false;  // AF3's SwiGLU transition
};
std::string TransName(const TransCase& c) {
  return "rows" + std::to_string(c.rows) + "_c" + std::to_string(c.c) + "_x" + std::to_string(c.n) +
         (c.masked ? "_masked" : "") + (c.swiglu ? "_swiglu" : "");
}
void PrintTo(const TransCase& c, std::ostream* os) { *os << TransName(c); }

class FusedTransition : public ::testing::TestWithParam<TransCase> {};

TEST_P(FusedTransition, MatchesReferenceAndThreadCounts) {
  const TransCase c = GetParam();
  const int64_t nh = c.n * c.c, nh1 = c.swiglu ? 2 * nh : nh;  // nh1: first Linear's outputs
  const std::vector<float> x0 = vec(c.rows * c.c, 11, 2.f, -0.3f);
  const std::vector<float> gamma = vec(c.c, 12, 0.1f, 1.f), beta = vec(c.c, 13, 0.1f);
  const std::vector<float> W1 = vec(nh1 * c.c, 14, 1.f / std::sqrt(float(c.c)));
  const std::vector<float> b1 = vec(nh1, 15, 0.1f);
  const std::vector<float> W2 = vec(c.c * nh, 16, 1.f / std::sqrt(float(nh)));
  const std::vector<float> b2 = vec(c.c, 17, 0.1f);
  std::vector<float> mask(c.rows);
  for (int64_t i = 0; i < c.rows; ++i) mask[i] = (i % 3 == 1) ? 0.f : 1.f;
  kern::TransitionArgs a;
  a.rows = c.rows, a.c = c.c, a.hidden = nh;
  a.gamma = gamma.data(), a.beta = beta.data(), a.eps = 1e-5f;
  a.W1 = W1.data(), a.b1 = b1.data(), a.W2 = W2.data(), a.b2 = b2.data();
  a.row_scale = c.masked ? mask.data() : nullptr;
  a.swiglu = c.swiglu;

  const std::vector<uint16_t> W1b = to_bf16(W1), W2b = to_bf16(W2);
  for (DType dt : {DType::F32, DType::BF16}) {
    a.dtype = dt;
    a.W1_bf16 = W1b.data(), a.W2_bf16 = W2b.data();
    const double tol = dt == DType::BF16 ? kBf16Tol : kF32Tol;
    std::vector<float> want = x0, scratch(2 * (c.c + nh1));
    a.x = want.data();
    kern::ref::transition(a, scratch.data());
    const std::vector<std::vector<float>> got =
        run_thread_counts([&](int threads) { return kern::transition_scratch_floats(a, threads); },
                          [&](float* s, int threads) {
                            std::vector<float> x = x0;
                            a.x = x.data();
                            kern::transition(a, s, threads);
                            return x;
                          },
                          want, tol, dtype_name(dt));
    for (const std::vector<float>& x : got)  // masked rows untouched
      for (int64_t r = 1; c.masked && r < c.rows; r += 3)
        for (int64_t i = 0; i < c.c; ++i) ASSERT_EQ(x[r * c.c + i], x0[r * c.c + i]);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, FusedTransition,
    ::testing::Values(TransCase{1, 8, 4, false}, TransCase{45, 16, 4, true},
                      TransCase{700, 32, 4, false}, TransCase{300, 256, 4, false},
                      TransCase{301, 64, 2, true}, TransCase{1, 8, 4, false, true},
                      TransCase{700, 32, 4, false, true}, TransCase{301, 64, 2, true, true}),
    [](const auto& info) { return TransName(info.param); });

// Normwise relative difference of two tensors of equal shape.
double tensor_rel_err(const Tensor& a, const Tensor& b) {
  const Tensor x = a.to(DType::F32), y = b.to(DType::F32);
  return norm_rel_err(std::vector<float>(x.f32(), x.f32() + x.numel()),
                      std::vector<float>(y.f32(), y.f32() + y.numel()));
}

// The fused inference path against the unfused reference on whole stacks (every fused module:
// attention projections read in place, strided for column attention and the ending node, linear_o
// accumulating into the stream, pair-bias projections, transitions, OPM projections, the
// triangle multiplication's gate), over automatic and forced chunking: equal within f32 rounding
// accumulated over two blocks.
TEST(FusedBlock, EvoformerAndExtraMsaMatchUnfused) {
  EvoformerConfig cfg = test::small_config();
  cfg.no_blocks = 2;
  const int64_t s = 9, r = 21;
  const EvoformerStack evo = EvoformerStack::random(cfg, 21);
  const ExtraMsaStack extra = ExtraMsaStack::random(cfg, 22);
  Tensor m0 = Tensor::empty({s, r, cfg.c_m}), z0 = Tensor::empty({r, r, cfg.c_z});
  for (int64_t i = 0; i < m0.numel(); ++i) m0.f32()[i] = uniform_pm1(31, i);
  for (int64_t i = 0; i < z0.numel(); ++i) z0.f32()[i] = uniform_pm1(32, i);
  Tensor msa_mask = Tensor::full({s, r}, 1.f);
  for (int64_t i = 0; i < r; i += 4) msa_mask.f32()[(s - 1) * r + i] = 0.f;
  for (int64_t chunk : {0, 1, 4}) {
    Tensor out[2][3];  // [fused][m, z, s_out]
    Tensor xout[2][2];
    for (int fused = 0; fused < 2; ++fused) {
      ForwardOptions opts;
      opts.chunk = chunk;
      opts.fused = fused == 1;
      Tensor m = m0.clone(), z = z0.clone(), s_out;
      ASSERT_TRUE(evo.forward(m, z, msa_mask, Tensor(), &s_out, opts).ok());
      out[fused][0] = m, out[fused][1] = z, out[fused][2] = s_out;
      Tensor xm = m0.clone(), xz = z0.clone();
      ASSERT_TRUE(extra.forward(xm, xz, msa_mask, Tensor(), opts).ok());
      xout[fused][0] = xm, xout[fused][1] = xz;
    }
    for (int i = 0; i < 3; ++i)
      EXPECT_LT(tensor_rel_err(out[1][i], out[0][i]), 1e-5) << "chunk " << chunk << " out " << i;
    for (int i = 0; i < 2; ++i)
      EXPECT_LT(tensor_rel_err(xout[1][i], xout[0][i]), 1e-5) << "chunk " << chunk << " xout " << i;
  }
}

// The AF3 Pairformer (its single, pair and both SwiGLU transitions fused) against its unfused
// reference path, over automatic and forced chunking and a padded-token mask.
TEST(FusedBlock, PairformerMatchesUnfused) {
  Af3Config cfg;
  cfg.c_s = 32, cfg.c_z = 16, cfg.no_heads_single = 4, cfg.no_heads_pair = 2;
  cfg.c_hidden_pair = 8, cfg.no_blocks = 2;
  const PairformerStack pf = PairformerStack::random(cfg, 23);
  const int64_t n = 19;
  Tensor s0 = Tensor::empty({n, cfg.c_s}), z0 = Tensor::empty({n, n, cfg.c_z});
  for (int64_t i = 0; i < s0.numel(); ++i) s0.f32()[i] = uniform_pm1(33, i);
  for (int64_t i = 0; i < z0.numel(); ++i) z0.f32()[i] = uniform_pm1(34, i);
  Tensor mask = Tensor::full({n}, 1.f);
  mask.f32()[n - 1] = mask.f32()[n - 2] = 0.f;
  for (int64_t chunk : {0, 1, 5}) {
    Tensor out[2][2];  // [fused][s, z]
    for (int fused = 0; fused < 2; ++fused) {
      ForwardOptions opts;
      opts.chunk = chunk;
      opts.fused = fused == 1;
      Tensor s = s0.clone(), z = z0.clone();
      ASSERT_TRUE(pf.forward(s, z, mask, opts).ok());
      out[fused][0] = s, out[fused][1] = z;
    }
    for (int i = 0; i < 2; ++i)
      EXPECT_LT(tensor_rel_err(out[1][i], out[0][i]), 1e-5) << "chunk " << chunk << " out " << i;
  }
}

// Both paths stay within the golden tolerance of the float64 reference (the golden suite runs the
// default, fused, path at several chunk sizes).
TEST(FusedBlock, GoldenAf2DimsBothPaths) {
  TensorFile f;
  ASSERT_TRUE(read_safetensors(test::data_path("evo_af2dims.safetensors"), &f).ok());
  EvoformerConfig cfg;
  ASSERT_TRUE(EvoformerConfig::from_metadata(f.metadata, &cfg).ok());
  EvoformerStack stack;
  ASSERT_TRUE(EvoformerStack::load(cfg, f, &stack).ok());
  Tensor m0, z0, msa_mask, pair_mask;
  ASSERT_TRUE(f.get_f32("input.m", {}, &m0).ok());
  ASSERT_TRUE(f.get_f32("input.z", {}, &z0).ok());
  ASSERT_TRUE(f.get_f32("input.msa_mask", {}, &msa_mask).ok());
  ASSERT_TRUE(f.get_f32("input.pair_mask", {}, &pair_mask).ok());
  for (bool fused : {true, false}) {
    ForwardOptions opts;
    opts.fused = fused;
    Tensor m = m0.clone(), z = z0.clone(), s_out;
    ASSERT_TRUE(stack.forward(m, z, msa_mask, pair_mask, &s_out, opts).ok());
    EXPECT_LT(test::golden_err(m, f.tensors.at("output.m")), 1e-4) << fused;
    EXPECT_LT(test::golden_err(z, f.tensors.at("output.z")), 1e-4) << fused;
    EXPECT_LT(test::golden_err(s_out, f.tensors.at("output.s")), 1e-4) << fused;
  }
}

// bf16 GEMM inputs on the golden cases, against the float64 reference: every output and block-0
// trace within a normwise tolerance; fp32 on the same run for the record.
class GoldenBf16 : public ::testing::TestWithParam<std::string> {};

TEST_P(GoldenBf16, OutputsAndTracesWithinTolerance) {
  TensorFile f;
  ASSERT_TRUE(read_safetensors(test::data_path(GetParam() + ".safetensors"), &f).ok());
  EvoformerConfig cfg;
  ASSERT_TRUE(EvoformerConfig::from_metadata(f.metadata, &cfg).ok());
  EvoformerStack stack;
  ASSERT_TRUE(EvoformerStack::load(cfg, f, &stack).ok());
  Tensor m0, z0, msa_mask, pair_mask;
  ASSERT_TRUE(f.get_f32("input.m", {}, &m0).ok());
  ASSERT_TRUE(f.get_f32("input.z", {}, &z0).ok());
  ASSERT_TRUE(f.get_f32("input.msa_mask", {}, &msa_mask).ok());
  ASSERT_TRUE(f.get_f32("input.pair_mask", {}, &pair_mask).ok());
  for (DType dt : {DType::F32, DType::BF16}) {
    std::map<std::string, Tensor> traces;
    ForwardOptions opts;
    opts.dtype = dt;
    opts.trace = [&](int block, const std::string& module, const std::string& stream,
                     const Tensor& v) {
      if (block == 0) traces["trace.block0." + module + "." + stream] = v.clone();
    };
    Tensor m = m0.clone(), z = z0.clone(), s_out;
    ASSERT_TRUE(stack.forward(m, z, msa_mask, pair_mask, &s_out, opts).ok());
    traces["output.m"] = m, traces["output.z"] = z, traces["output.s"] = s_out;
    double worst = 0, worst_golden = 0;
    for (const auto& [name, t] : traces) {
      const double e = test::normwise_err(t, f.tensors.at(name));
      worst = std::max(worst, e);
      worst_golden = std::max(worst_golden, test::golden_err(t, f.tensors.at(name)));
      if (dt == DType::BF16) {
        EXPECT_LT(e, kBf16GoldenTol) << name;
      }
    }
    std::printf("%s %s: worst normwise error %.2e, worst golden metric %.2e\n", GetParam().c_str(),
                dtype_name(dt), worst, worst_golden);
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, GoldenBf16, ::testing::Values("evo_tiny", "evo_af2dims"),
                         [](const auto& info) { return info.param; });

// The CLI: `run --dtype bf16` and `--unfused` reach the forward (named in the report), also under
// `--dap 1` (forward and training, the AF3 stacks' bf16 training too), and the combinations the
// library does not run are user errors.
TEST(FusedCli, DtypeAndUnfusedFlags) {
  const std::string report = test::temp_file("fused_cli_report.json");
  for (const std::string& flags :
       {std::string("--dtype bf16"), std::string("--unfused"),
        std::string("--dtype bf16 --memory-budget 1GiB"), std::string("--dtype bf16 --dap 1"),
        std::string("--dtype bf16 --backward --dap 1"),
        std::string("--dtype bf16 --dap 1 --stack pairformer --backward")}) {
    const test::Result r =
        test::run_cli("run --s 6 --r 10 --blocks 1 --quiet " + flags + " --report " + report);
    ASSERT_EQ(r.code, 0) << r.out;
    std::ifstream f(report);
    const std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    EXPECT_NE(text.find(flags == "--unfused" ? "\"fused\": false" : "\"dtype\": \"bf16\""),
              std::string::npos)
        << text;
  }
  for (const std::string& bad :
       {std::string("--dtype bf16 --unfused"), std::string("--dtype bf16 --dap 1 --unfused")}) {
    const test::Result r = test::run_cli("run --s 6 --r 10 --blocks 1 --quiet " + bad);
    EXPECT_EQ(r.code, 1) << bad;
    EXPECT_NE(r.out.find("error"), std::string::npos) << bad << ": " << r.out;
  }
}

// Why a per-layer heads split in bf16 differs from one process by ~1e-4 downstream (docs/dap.md,
// "bf16 under DAP"): the split itself is f32-order exact (DapBf16.HeadsSplitIsF32OrderExact:
// ~5e-8 normwise), but the next bf16 layer rounds its inputs (LN(m), then q | k | v | g) to bf16,
// and an f32-order change of m moves a few of them across a bf16 rounding boundary: each such
// element then differs by a whole bf16 step (2^-8 relative), where an fp32 layer sees the
// change at its own size. Here evo_af2dims' block 0 (golden weights and inputs, one process,
// bf16) up to its MSA row attention, then its MSA column attention once on that m and once on m
// perturbed by a relative 5e-8 (the size of the heads split's partial-sum difference): bf16 flips
// some of LN(m)'s roundings and its output moves by orders of magnitude more than fp32's.
TEST(Bf16Rounding, AmplifiesAnF32OrderDifferenceOfTheInput) {
  TensorFile f;
  ASSERT_TRUE(read_safetensors(test::data_path("evo_af2dims.safetensors"), &f).ok());
  EvoformerConfig cfg;
  ASSERT_TRUE(EvoformerConfig::from_metadata(f.metadata, &cfg).ok());
  BlockWeights w;
  allocate_block(cfg, &w);
  ASSERT_TRUE(load_params(named_params(w, block_prefix(0)), f).ok());
  Tensor m0, z, mm, pm;
  ASSERT_TRUE(f.get_f32("input.m", {}, &m0).ok());
  ASSERT_TRUE(f.get_f32("input.z", {}, &z).ok());
  ASSERT_TRUE(f.get_f32("input.msa_mask", {}, &mm).ok());
  ASSERT_TRUE(f.get_f32("input.pair_mask", {}, &pm).ok());
  m0 = m0.clone();
  z = z.clone();
  StackInputs in;
  ASSERT_TRUE(prepare_inputs(cfg, m0, z, mm, pm, &in).ok());
  BlockContext ctx = make_context(cfg, in, 0, 0);
  ctx.dtype = DType::BF16;
  layer_forward(*find_layer(kEvoformerBlock, "msa_att_row"), &w, ctx, m0.f32(), z.f32());
  Tensor m1 = m0.clone();  // m0 * (1 + 5e-8 u), u uniform in [-1, 1)
  {
    Tensor u = Tensor::empty(m0.shape());
    random_fill("test.u", u, 6);  // U(-a, a), a = 1 / sqrt(c)
    const float a = 1.f / std::sqrt(static_cast<float>(m0.dim(2)));
    for (int64_t i = 0; i < m1.numel(); ++i)
      m1.f32()[i] = static_cast<float>(m0.f32()[i] * (1.0 + 5e-8 * u.f32()[i] / a));
  }
  const double input = test::normwise_err(m1, m0);
  // The bf16 roundings of LN(m) (the layer's first GEMM input) that the perturbation changes.
  int64_t flips = 0;
  {
    const int64_t rows = m0.numel() / cfg.c_m;
    Tensor y0 = Tensor::empty(m0.shape()), y1 = Tensor::empty(m0.shape());
    Tensor b0 = Tensor::empty(m0.shape(), DType::BF16), b1 = Tensor::empty(m0.shape(), DType::BF16);
    const LayerNormW& ln = w.msa_att_col.ln_m;
    kern::layernorm(m0.f32(), cfg.c_m, y0.f32(), cfg.c_m, rows, cfg.c_m, ln.w.f32(), ln.b.f32(),
                    cfg.eps_ln);
    kern::layernorm(m1.f32(), cfg.c_m, y1.f32(), cfg.c_m, rows, cfg.c_m, ln.w.f32(), ln.b.f32(),
                    cfg.eps_ln);
    kern::f32_to_bf16(y0.f32(), b0.data<uint16_t>(), y0.numel());
    kern::f32_to_bf16(y1.f32(), b1.data<uint16_t>(), y1.numel());
    for (int64_t i = 0; i < b0.numel(); ++i)
      flips += b0.data<uint16_t>()[i] != b1.data<uint16_t>()[i];
  }
  const LayerDesc* col = find_layer(kEvoformerBlock, "msa_att_col");
  double out[2] = {0, 0};
  for (DType dt : {DType::F32, DType::BF16}) {
    ctx.dtype = dt;
    Tensor a = m0.clone(), b = m1.clone();
    layer_forward(*col, &w, ctx, a.f32(), z.f32());
    layer_forward(*col, &w, ctx, b.f32(), z.f32());
    out[dt == DType::BF16] = test::normwise_err(b, a);
  }
  std::printf(
      "[ info ] m perturbed by %.2e (normwise): %lld of %lld bf16(LN(m)) elements flip; column "
      "attention output difference fp32 %.2e, bf16 %.2e\n",
      input, static_cast<long long>(flips), static_cast<long long>(m0.numel()), out[0], out[1]);
  EXPECT_GT(flips, 0);
  EXPECT_LT(out[0], 10 * input);   // fp32: passed through at about its size
  EXPECT_GT(out[1], 100 * input);  // bf16: the flipped roundings
  EXPECT_LT(out[1], 1e-3);         // ... far below the bf16 error itself (~1e-2)
}

}  // namespace
}  // namespace fc
