// Fused LayerNorm + Linear, fused transition and the triangle multiplication's fused phases
// (contracts in fused.h), with their naive references. The fast versions compose the existing
// kernels per row block; the GEMMs run single-threaded inside the row-block loop (oneDNN inside an
// OpenMP region uses one thread).
#include "kernels/fused.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "foldcube/status.h"
#include "kernels/convert.h"
#include "kernels/kernels.h"
#include "kernels/typed.h"

namespace fc::kern {

namespace {
// A row block's working set (its input rows, its output or hidden rows): 1 MiB, the per-core L2
// of the EPYC this runs on. Measured on an idle machine (fused_bench 128 256, 2026-12-07): with
// 256 KiB blocks the GEMMs had 48 rows and the fused MSA transition took 1.16x the unfused one;
// 768 KiB 0.93x, 1 MiB-1.5 MiB 0.87-0.89x (bigger row panels beat staying in L2).
constexpr int64_t kBlockBytes = 1024 << 10;
constexpr int64_t kRowAlign = 16;  // whole GEMM row panels (oneDNN's sgemm unrolls M by 16 or 8)

int64_t block_rows_for(int64_t row_floats) {
  const int64_t rows = kBlockBytes / std::max<int64_t>(row_floats * 4, 1) / kRowAlign * kRowAlign;
  return std::clamp<int64_t>(rows, kRowAlign, 32 * kRowAlign);
}

// Floats that hold n bf16 values.
int64_t bf16_floats(int64_t n) { return (n + 1) / 2; }

// Scratch floats of one block of `elems` f32 values: the f32 block, plus its bf16 copy for BF16.
int64_t slot_floats(int64_t elems, DType dtype) {
  return elems + (dtype == DType::BF16 ? bf16_floats(elems) : 0);
}

// y[rows, out] (=, or += with accumulate) x W^T (+ bias), x [rows, in] f32 with leading dimension
// in. F32: kern::linear. BF16: x is rounded into xb [rows, in] and multiplied by Wb [out, in] with
// f32 accumulation (the bias is written or added first, as kern::linear does).
void block_linear(DType dtype, const float* x, uint16_t* xb, int64_t rows, int64_t in,
                  const float* W, const uint16_t* Wb, const float* bias, int64_t out, float* y,
                  int64_t ldy, bool accumulate) {
  if (dtype == DType::F32) return linear(x, in, rows, in, W, bias, out, y, ldy, accumulate);
  f32_to_bf16(x, xb, rows * in);
  float beta = accumulate ? 1.f : 0.f;
  if (bias != nullptr) {
    if (accumulate)
      add_bias_rows(y, ldy, bias, rows, out);
    else
      for (int64_t r = 0; r < rows; ++r) std::copy_n(bias, out, y + r * ldy);
    beta = 1.f;
  }
  gemm_typed(DType::BF16, false, true, rows, out, in, 1.f, xb, in, Wb, in, beta, y, ldy);
}

// Threads that get a block: blocks of rb over n rows, at most `threads`.
int64_t busy_threads(int64_t n, int64_t rb, int threads) {
  const int64_t blocks = (n + rb - 1) / rb;
  return std::max<int64_t>(1, std::min<int64_t>(std::max(threads, 1), blocks));
}

// Rows per block actually run for n rows and blocks of at most rb rows: the fewest blocks of at
// most rb rows, rounded up to an even count when there are several, with rows spread evenly (in
// multiples of kRowAlign, so at most rb). The two threads of this machine then finish a call
// together: at (128, 256) with the default chunk target an MSA row attention chunk is 5 rows, 1280
// pairs of rows, which ran as 7 projection blocks of 192 rows and 3 output blocks of 512, so one
// thread idled for up to a block at the end of each of the module's 52 calls (the unfused path's
// multi-threaded GEMMs split evenly); now 8 of 160 and 4 of 320. Depends on n and rb only, so
// results do not depend on the thread count.
int64_t even_block_rows(int64_t n, int64_t rb) {
  int64_t blocks = (n + rb - 1) / rb;
  if (blocks <= 1) return rb;
  blocks += blocks % 2;
  const int64_t rows = (n + blocks - 1) / blocks;
  return std::min(rb, (rows + kRowAlign - 1) / kRowAlign * kRowAlign);
}

// Calls f(slot, g0, g1) for each row block [g0, g1) of n rows (even_block_rows(n, rb) rows, at
// most rb); slot < busy_threads(n, rb, threads) indexes the caller's per-thread scratch, sized for
// blocks of min(rb, n) rows. Blocks are handed out dynamically (the machine is shared); which
// thread runs a block never changes its result. Every GEMM inside a block runs single-threaded,
// also with one busy thread (a multi-threaded GEMM may split its work differently), so results do
// not depend on the thread count.
template <class F>
void for_row_blocks(int64_t n, int64_t rb, int threads, F f) {
  if (n <= 0) return;
  const int t = static_cast<int>(busy_threads(n, rb, threads));
  rb = even_block_rows(n, rb);
  const int64_t blocks = (n + rb - 1) / rb;
  if (omp_in_parallel()) {
    for (int64_t b = 0; b < blocks; ++b) f(0, b * rb, std::min(n, (b + 1) * rb));
    return;
  }
#pragma omp parallel num_threads(t)
  {
    omp_set_num_threads(1);  // this implicit task's nested regions (oneDNN's) get one thread
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < blocks; ++b) f(omp_get_thread_num(), b * rb, std::min(n, (b + 1) * rb));
  }
}
}  // namespace

int64_t layernorm_linear_block_rows(int64_t in, int64_t out, DType) {
  return block_rows_for(in + out);
}

int64_t layernorm_linear_scratch_floats(const LayerNormLinearArgs& a, int threads) {
  const int64_t n = a.B * a.L, rb = layernorm_linear_block_rows(a.in, a.out, a.dtype);
  if (n <= 0) return 0;
  return busy_threads(n, rb, threads) * slot_floats(std::min(rb, n) * a.in, a.dtype);
}

void layernorm_linear(const LayerNormLinearArgs& a, float* scratch, int threads) {
  FC_CHECK(a.dtype == DType::F32 || a.dtype == DType::BF16);
  const int64_t n = a.B * a.L, in = a.in, rb = layernorm_linear_block_rows(in, a.out, a.dtype);
  const int64_t rows_max = std::min(rb, n);
  const int64_t per_slot = slot_floats(rows_max * in, a.dtype);
  for_row_blocks(n, rb, threads, [&](int slot, int64_t g0, int64_t g1) {
    float* xs = scratch + slot * per_slot;  // [g1 - g0, in] normalised rows of the block
    uint16_t* xb = reinterpret_cast<uint16_t*>(xs + rows_max * in);  // their bf16 (BF16)
    for (int64_t g = g0; g < g1;) {  // runs of rows of one batch item
      const int64_t b = g / a.L, l = g % a.L, cnt = std::min(g1 - g, a.L - l);
      layernorm(a.x + b * a.x_bs + l * a.x_rs, a.x_rs, xs + (g - g0) * in, in, cnt, in, a.gamma,
                a.beta, a.eps);
      g += cnt;
    }
    block_linear(a.dtype, xs, xb, g1 - g0, in, a.W, a.W_bf16, a.bias, a.out, a.y + g0 * a.ldy,
                 a.ldy, a.accumulate);
  });
}

int64_t linear_residual_scratch_floats(const LinearResidualArgs& a, int threads) {
  const int64_t n = a.B * a.L, rb = block_rows_for(a.in + a.out);
  if (n <= 0) return 0;
  const int64_t rows = std::min(rb, n);
  return busy_threads(n, rb, threads) *
         (rows * a.out + (a.dtype == DType::BF16 ? bf16_floats(rows * a.in) : 0));
}

void linear_residual(const LinearResidualArgs& a, float* scratch, int threads) {
  FC_CHECK(a.dtype == DType::F32 || a.dtype == DType::BF16);
  const int64_t n = a.B * a.L, out = a.out, rb = block_rows_for(a.in + out);
  const int64_t rows_max = std::min(rb, n);
  const int64_t per_slot =
      rows_max * out + (a.dtype == DType::BF16 ? bf16_floats(rows_max * a.in) : 0);
  // Contiguous y rows (an MSA row, a triangle's starting node): the block's product accumulates
  // into them directly (bias added first, as kern::linear with accumulate), no update slot.
  const bool contiguous = a.y_rs == out && a.y_bs == a.L * out;
  for_row_blocks(n, rb, threads, [&](int slot, int64_t g0, int64_t g1) {
    float* t = scratch + slot * per_slot;  // [g1 - g0, out] the block's update (strided y)
    float* yt = contiguous ? a.y + g0 * out : t;
    if (a.dtype == DType::BF16) {
      uint16_t* xb = reinterpret_cast<uint16_t*>(t + rows_max * out);  // [g1 - g0, in] bf16 x
      for (int64_t g = g0; g < g1; ++g) f32_to_bf16(a.x + g * a.ldx, xb + (g - g0) * a.in, a.in);
      if (a.bias != nullptr && contiguous) add_bias_rows(yt, out, a.bias, g1 - g0, out);
      if (a.bias != nullptr && !contiguous)
        for (int64_t g = 0; g < g1 - g0; ++g) std::copy_n(a.bias, out, t + g * out);
      gemm_typed(DType::BF16, false, true, g1 - g0, out, a.in, 1.f, xb, a.in, a.W_bf16, a.in,
                 a.bias != nullptr || contiguous ? 1.f : 0.f, yt, out);
    } else {
      linear(a.x + g0 * a.ldx, a.ldx, g1 - g0, a.in, a.W, a.bias, out, yt, out, contiguous);
    }
    if (contiguous) return;
    for (int64_t g = g0; g < g1;) {  // runs of rows of one batch item
      const int64_t b = g / a.L, l = g % a.L, cnt = std::min(g1 - g, a.L - l);
      add_inplace(a.y + b * a.y_bs + l * a.y_rs, a.y_rs, t + (g - g0) * out, out, cnt, out);
      g += cnt;
    }
  });
}

int64_t transition_block_rows(int64_t c, int64_t hidden, DType) {
  return block_rows_for(c + hidden);
}

namespace {
// Width of the first Linear's output: hidden, or fc1 | fc2 for SwiGLU.
int64_t first_width(const TransitionArgs& a) { return a.swiglu ? 2 * a.hidden : a.hidden; }
}  // namespace

int64_t transition_scratch_floats(const TransitionArgs& a, int threads) {
  const int64_t nh1 = first_width(a), rb = transition_block_rows(a.c, nh1, a.dtype);
  if (a.rows <= 0) return 0;
  return busy_threads(a.rows, rb, threads) *
         slot_floats(std::min(rb, a.rows) * (a.c + nh1), a.dtype);
}

void transition(const TransitionArgs& a, float* scratch, int threads) {
  FC_CHECK(a.dtype == DType::F32 || a.dtype == DType::BF16);
  const int64_t c = a.c, nh = a.hidden, nh1 = first_width(a);
  const int64_t rb = transition_block_rows(c, nh1, a.dtype), rows_max = std::min(rb, a.rows);
  const int64_t per_slot = slot_floats(rows_max * (c + nh1), a.dtype);
  for_row_blocks(a.rows, rb, threads, [&](int slot, int64_t g0, int64_t g1) {
    const int64_t n = g1 - g0;
    float* t = scratch + slot * per_slot;  // [n, c] LN(x), then the update
    float* h = t + rows_max * c;           // [n, nh1] hidden (fc1 | fc2)
    uint16_t* xb = reinterpret_cast<uint16_t*>(h + rows_max * nh1);  // bf16 of t or h (BF16)
    float* xr = a.x + g0 * c;
    layernorm(xr, c, t, c, n, c, a.gamma, a.beta, a.eps);
    block_linear(a.dtype, t, xb, n, c, a.W1, a.W1_bf16, a.b1, nh1, h, nh1, false);
    if (a.swiglu) {
      swiglu(h, nh1, h + nh, nh1, n, nh);          // silu(fc1) * fc2 into the fc1 half
      float* y = a.row_scale == nullptr ? xr : t;  // fc3 accumulates into x, or the update
      if (a.dtype == DType::BF16) {  // the gate rows packed to [n, nh], then rounded into xb
        for (int64_t r = 1; r < n; ++r) std::memmove(h + r * nh, h + r * nh1, nh * sizeof(float));
        block_linear(a.dtype, h, xb, n, nh, a.W2, a.W2_bf16, a.b2, c, y, c, y == xr);
      } else {
        linear(h, nh1, n, nh, a.W2, a.b2, c, y, c, y == xr);
      }
      if (a.row_scale != nullptr) {
        scale_rows(t, c, a.row_scale + g0, n, c);
        add_inplace(xr, c, t, c, n, c);
      }
      return;
    }
    relu_inplace(h, nh, n, nh);
    if (a.row_scale == nullptr) {
      block_linear(a.dtype, h, xb, n, nh, a.W2, a.W2_bf16, a.b2, c, xr, c, true);
    } else {
      block_linear(a.dtype, h, xb, n, nh, a.W2, a.W2_bf16, a.b2, c, t, c, false);
      scale_rows(t, c, a.row_scale + g0, n, c);
      add_inplace(xr, c, t, c, n, c);
    }
  });
}

// Row blocks of the triangle multiplication's fused phases: the block's [rows, 4*nc] projections
// (gated_projection) or its [rows, cp + 3*cz] working rows (gated_output) within kBlockBytes.
int64_t gated_projection_block_rows(const GatedProjectionArgs& a) {
  return block_rows_for(4 * a.nc + (a.gamma != nullptr ? a.in : 0));
}
int64_t gated_output_block_rows(int64_t cp, int64_t cz) { return block_rows_for(cp + 3 * cz); }

// Floats of one gated_projection slot: the block's projections, its normalised rows with LN, and
// with BF16 the bf16 copy of its (normalised) rows.
int64_t gated_projection_slot_floats(const GatedProjectionArgs& a) {
  const int64_t rows = std::min(gated_projection_block_rows(a), a.rows);
  return rows * (4 * a.nc + (a.gamma != nullptr ? a.in : 0)) +
         (a.dtype == DType::BF16 ? bf16_floats(rows * a.in) : 0);
}

int64_t gated_projection_scratch_floats(const GatedProjectionArgs& a, int threads) {
  if (a.rows <= 0) return 0;
  return busy_threads(a.rows, gated_projection_block_rows(a), threads) *
         gated_projection_slot_floats(a);
}

void gated_projection(const GatedProjectionArgs& a, float* scratch, int threads) {
  FC_CHECK(a.dtype == DType::F32 || a.dtype == DType::BF16);
  const bool bf16 = a.dtype == DType::BF16;
  const int64_t nc = a.nc, in = a.in, ld = 4 * nc, rb = gated_projection_block_rows(a);
  const int64_t rows_max = std::min(rb, a.rows), per_slot = gated_projection_slot_floats(a);
  const int64_t ln_floats = a.gamma != nullptr ? rows_max * in : 0;
  for_row_blocks(a.rows, rb, threads, [&](int slot, int64_t g0, int64_t g1) {
    const int64_t n = g1 - g0;
    float* t = scratch + slot * per_slot;  // [n, 4*nc] a_p | a_g | b_p | b_g of the block
    float* xs = t + rows_max * ld;         // [n, in] LN of the block's rows (with gamma)
    uint16_t* xb = reinterpret_cast<uint16_t*>(xs + ln_floats);  // [n, in] their bf16 (BF16)
    const float* x = a.x + g0 * a.ldx;
    int64_t ldx = a.ldx;
    if (a.gamma != nullptr) {
      layernorm(x, ldx, xs, in, n, in, a.gamma, a.beta, a.eps);
      x = xs, ldx = in;
    }
    if (!bf16) {
      linear(x, ldx, n, in, a.W, a.bias, ld, t, ld);
    } else if (ldx != in) {  // strided rows: round them one by one, then the contiguous GEMM
      for (int64_t p = 0; p < n; ++p) f32_to_bf16(x + p * ldx, xb + p * in, in);
      if (a.bias != nullptr)
        for (int64_t p = 0; p < n; ++p) std::copy_n(a.bias, ld, t + p * ld);
      gemm_typed(DType::BF16, false, true, n, ld, in, 1.f, xb, in, a.W_bf16, in,
                 a.bias != nullptr ? 1.f : 0.f, t, ld);
    } else {
      block_linear(a.dtype, x, xb, n, in, a.W, a.W_bf16, a.bias, ld, t, ld, false);
    }
    for (int64_t part = 0; part < 2; ++part) {  // a, then b
      float* proj = t + 2 * part * nc;          // [n, nc] with ld 4*nc; its gate follows
      sigmoid_inplace(proj + nc, ld, n, nc);
      mul_inplace(proj, ld, proj + nc, ld, n, nc);
      scale_rows(proj, ld, a.mask + g0, n, nc);
      if (bf16)
        transpose_to_bf16(proj, ld, (part ? a.B_bf16 : a.A_bf16) + g0, a.ld_ab, n, nc);
      else
        transpose(proj, ld, (part ? a.B : a.A) + g0, a.ld_ab, n, nc);
    }
  });
}

int64_t gated_output_scratch_floats(const GatedOutputArgs& a, int threads) {
  const int64_t rb = gated_output_block_rows(a.cp, a.cz);
  if (a.rows <= 0) return 0;
  const int64_t rows = std::min(rb, a.rows);
  return busy_threads(a.rows, rb, threads) *
         (rows * (a.cp + 3 * a.cz) +
          (a.dtype == DType::BF16 ? bf16_floats(rows * std::max(a.cp, a.cz)) : 0));
}

void gated_output(const GatedOutputArgs& a, float* scratch, int threads) {
  FC_CHECK(a.dtype == DType::F32 || a.dtype == DType::BF16);
  const int64_t cp = a.cp, cz = a.cz, rb = gated_output_block_rows(cp, cz);
  const int64_t rows_max = std::min(rb, a.rows);
  const int64_t per_slot = rows_max * (cp + 3 * cz) +
                           (a.dtype == DType::BF16 ? bf16_floats(rows_max * std::max(cp, cz)) : 0);
  for_row_blocks(a.rows, rb, threads, [&](int slot, int64_t g0, int64_t g1) {
    const int64_t n = g1 - g0;
    float* pp = scratch + slot * per_slot;  // [n, cp] the block's products, then LN_p of them
    float* y = pp + rows_max * cp;          // [n, cz] linear_z, then the gated update
    float* xz = y + rows_max * cz;          // [n, cz] LN_z of the z rows
    float* g = xz + rows_max * cz;          // [n, cz] linear_g
    uint16_t* xb = reinterpret_cast<uint16_t*>(g + rows_max * cz);  // bf16 of pp or xz (BF16)
    float* zr = a.z + g0 * cz;
    transpose(a.P + g0, a.ldp, pp, cp, cp, n);
    layernorm(pp, cp, pp, cp, n, cp, a.gamma_p, a.beta_p, a.eps);
    block_linear(a.dtype, pp, xb, n, cp, a.Wp, a.Wp_bf16, a.bp, cz, y, cz, false);
    layernorm(zr, cz, xz, cz, n, cz, a.gamma_z, a.beta_z, a.eps);
    block_linear(a.dtype, xz, xb, n, cz, a.Wg, a.Wg_bf16, a.bg, cz, g, cz, false);
    sigmoid_mul(y, cz, g, cz, n, cz);
    add_inplace(zr, cz, y, cz, n, cz);
  });
}

namespace ref {

namespace {
// y[0, :out] (=, or +=) bf16(x[:in]) W^T (+ bias), W bf16 [out, in]; xb: in uint16 of scratch.
void linear_row_bf16(const float* x, uint16_t* xb, int64_t in, const uint16_t* W, const float* bias,
                     int64_t out, float* y, bool accumulate) {
  ref::f32_to_bf16(x, xb, in);
  if (bias != nullptr)
    for (int64_t o = 0; o < out; ++o) y[o] = accumulate ? y[o] + bias[o] : bias[o];
  ref::gemm_bf16(false, true, 1, out, in, 1.f, xb, in, W, in,
                 accumulate || bias != nullptr ? 1.f : 0.f, y, out);
}
}  // namespace

void layernorm_linear(const LayerNormLinearArgs& a, float* scratch) {
  uint16_t* xb = reinterpret_cast<uint16_t*>(scratch + a.in);  // [in] bf16 (BF16 only)
  for (int64_t b = 0; b < a.B; ++b)
    for (int64_t l = 0; l < a.L; ++l) {
      float* y = a.y + (b * a.L + l) * a.ldy;
      ref::layernorm(a.x + b * a.x_bs + l * a.x_rs, a.in, scratch, a.in, 1, a.in, a.gamma, a.beta,
                     a.eps);
      if (a.dtype == DType::BF16)
        linear_row_bf16(scratch, xb, a.in, a.W_bf16, a.bias, a.out, y, a.accumulate);
      else
        ref::linear(scratch, a.in, 1, a.in, a.W, a.bias, a.out, y, a.ldy, a.accumulate);
    }
}

void linear_residual(const LinearResidualArgs& a, float* scratch) {
  for (int64_t b = 0; b < a.B; ++b)
    for (int64_t l = 0; l < a.L; ++l) {
      float* y = a.y + b * a.y_bs + l * a.y_rs;  // [out]
      if (a.dtype == DType::BF16) {
        float* t = scratch;                                     // [out] the row's update
        uint16_t* xb = reinterpret_cast<uint16_t*>(t + a.out);  // [in] bf16 of the x row
        linear_row_bf16(a.x + (b * a.L + l) * a.ldx, xb, a.in, a.W_bf16, a.bias, a.out, t, false);
        for (int64_t o = 0; o < a.out; ++o) y[o] += t[o];
        continue;
      }
      for (int64_t o = 0; o < a.out; ++o) {
        double acc = a.bias != nullptr ? a.bias[o] : 0.0;
        const float* xr = a.x + (b * a.L + l) * a.ldx;
        for (int64_t i = 0; i < a.in; ++i) acc += static_cast<double>(xr[i]) * a.W[o * a.in + i];
        y[o] += static_cast<float>(acc);
      }
    }
}

void transition(const TransitionArgs& a, float* scratch) {
  const int64_t c = a.c, nh = a.hidden;
  float* t = scratch;  // [c] LN(x row), then the update
  float* h = t + c;    // [hidden] ([2 * hidden] SwiGLU)
  const int64_t nh1 = a.swiglu ? 2 * nh : nh;
  uint16_t* xb = reinterpret_cast<uint16_t*>(h + nh1);  // [max(c, hidden)] bf16
  const bool bf16 = a.dtype == DType::BF16;
  for (int64_t r = 0; r < a.rows; ++r) {
    float* xr = a.x + r * c;
    ref::layernorm(xr, c, t, c, 1, c, a.gamma, a.beta, a.eps);
    if (a.swiglu) {
      if (bf16)
        linear_row_bf16(t, xb, c, a.W1_bf16, a.b1, 2 * nh, h, false);
      else
        ref::linear(t, c, 1, c, a.W1, a.b1, 2 * nh, h, 2 * nh);
      ref::swiglu(h, 2 * nh, h + nh, 2 * nh, 1, nh);
      if (bf16)
        linear_row_bf16(h, xb, nh, a.W2_bf16, a.b2, c, t, false);
      else
        ref::linear(h, 2 * nh, 1, nh, a.W2, a.b2, c, t, c);
      const float s = a.row_scale != nullptr ? a.row_scale[r] : 1.f;
      for (int64_t i = 0; i < c; ++i) xr[i] += t[i] * s;
      continue;
    }
    if (bf16)
      linear_row_bf16(t, xb, c, a.W1_bf16, a.b1, nh, h, false);
    else
      ref::linear(t, c, 1, c, a.W1, a.b1, nh, h, nh);
    ref::relu_inplace(h, nh, 1, nh);
    if (bf16)
      linear_row_bf16(h, xb, nh, a.W2_bf16, a.b2, c, t, false);
    else
      ref::linear(h, nh, 1, nh, a.W2, a.b2, c, t, c);
    const float s = a.row_scale != nullptr ? a.row_scale[r] : 1.f;
    for (int64_t i = 0; i < c; ++i) xr[i] += t[i] * s;
  }
}

void gated_projection(const GatedProjectionArgs& a, float* scratch) {
  const int64_t nc = a.nc;
  const bool bf16 = a.dtype == DType::BF16;
  uint16_t* xb = reinterpret_cast<uint16_t*>(scratch + a.in);  // [in] bf16 of the row (BF16)
  auto widen = [](uint16_t b) {
    float f;
    ref::bf16_to_f32(&b, &f, 1);
    return static_cast<double>(f);
  };
  for (int64_t p = 0; p < a.rows; ++p) {
    const float* x = a.x + p * a.ldx;
    if (a.gamma != nullptr) {
      ref::layernorm(x, a.in, scratch, a.in, 1, a.in, a.gamma, a.beta, a.eps);
      x = scratch;
    }
    if (bf16) ref::f32_to_bf16(x, xb, a.in);
    auto proj = [&](int64_t o) {  // t[p, o] in double
      double acc = a.bias != nullptr ? a.bias[o] : 0.0;
      for (int64_t i = 0; i < a.in; ++i)
        acc += bf16 ? widen(xb[i]) * widen(a.W_bf16[o * a.in + i])
                    : static_cast<double>(x[i]) * a.W[o * a.in + i];
      return acc;
    };
    for (int64_t part = 0; part < 2; ++part)
      for (int64_t c = 0; c < nc; ++c) {
        const double v = proj(2 * part * nc + c), gate = proj(2 * part * nc + nc + c);
        const double y = v / (1.0 + std::exp(-gate)) * a.mask[p];
        if (bf16) {  // rounded once: to f32 by rounding to odd, then to nearest-even bf16
          const float yf = ref::f64_to_f32_round_odd(y);
          ref::f32_to_bf16(&yf, (part ? a.B_bf16 : a.A_bf16) + c * a.ld_ab + p, 1);
        } else {
          (part ? a.B : a.A)[c * a.ld_ab + p] = static_cast<float>(y);
        }
      }
  }
}

void gated_output(const GatedOutputArgs& a, float* scratch) {
  const int64_t cp = a.cp, cz = a.cz;
  float* pp = scratch;                                 // [cp] the pair's products
  float* y = pp + cp;                                  // [cz]
  float* xz = y + cz;                                  // [cz]
  float* g = xz + cz;                                  // [cz]
  uint16_t* xb = reinterpret_cast<uint16_t*>(g + cz);  // [max(cp, cz)] bf16 (BF16 only)
  const bool bf16 = a.dtype == DType::BF16;
  for (int64_t p = 0; p < a.rows; ++p) {
    float* zr = a.z + p * cz;
    for (int64_t c = 0; c < cp; ++c) pp[c] = a.P[c * a.ldp + p];
    ref::layernorm(pp, cp, pp, cp, 1, cp, a.gamma_p, a.beta_p, a.eps);
    ref::layernorm(zr, cz, xz, cz, 1, cz, a.gamma_z, a.beta_z, a.eps);
    if (bf16) {
      linear_row_bf16(pp, xb, cp, a.Wp_bf16, a.bp, cz, y, false);
      linear_row_bf16(xz, xb, cz, a.Wg_bf16, a.bg, cz, g, false);
    } else {
      ref::linear(pp, cp, 1, cp, a.Wp, a.bp, cz, y, cz);
      ref::linear(xz, cz, 1, cz, a.Wg, a.bg, cz, g, cz);
    }
    ref::sigmoid_mul(y, cz, g, cz, 1, cz);
    for (int64_t c = 0; c < cz; ++c) zr[c] += y[c];
  }
}

}  // namespace ref
}  // namespace fc::kern
