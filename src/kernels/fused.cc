// Fused LayerNorm + Linear and fused transition (contracts in fused.h), with their naive
// references. The fast versions compose the existing kernels per row block; the GEMMs run
// single-threaded inside the row-block loop (oneDNN inside an OpenMP region uses one thread).
#include "kernels/fused.h"

#include <omp.h>

#include <algorithm>

#include "kernels/kernels.h"

namespace fc::kern {

namespace {
// A row block's working set (its input rows, its output or hidden rows) aims at a quarter of the
// 1 MiB per-core L2 of the EPYC this runs on: the block is normalised, multiplied and written back
// before it leaves L2, and the weights (up to 1 MiB for the 256 -> 1024 transition) share the rest
// of L2 and L3.
constexpr int64_t kBlockBytes = 256 << 10;
constexpr int64_t kRowAlign = 16;  // whole GEMM row panels (oneDNN's sgemm unrolls M by 16 or 8)

int64_t block_rows_for(int64_t row_floats) {
  const int64_t rows = kBlockBytes / std::max<int64_t>(row_floats * 4, 1) / kRowAlign * kRowAlign;
  return std::clamp<int64_t>(rows, kRowAlign, 32 * kRowAlign);
}

// Threads that get a block: blocks of rb over n rows, at most `threads`.
int64_t busy_threads(int64_t n, int64_t rb, int threads) {
  const int64_t blocks = (n + rb - 1) / rb;
  return std::max<int64_t>(1, std::min<int64_t>(std::max(threads, 1), blocks));
}

// Calls f(slot, g0, g1) for each row block [g0, g1) of n rows; slot < busy_threads(n, rb, threads)
// indexes the caller's per-thread scratch. Blocks are handed out dynamically (the machine is
// shared); which thread runs a block never changes its result.
template <class F>
void for_row_blocks(int64_t n, int64_t rb, int threads, F f) {
  if (n <= 0) return;
  const int64_t blocks = (n + rb - 1) / rb;
  const int t = static_cast<int>(busy_threads(n, rb, threads));
  if (t <= 1 || omp_in_parallel()) {
    for (int64_t b = 0; b < blocks; ++b) f(0, b * rb, std::min(n, (b + 1) * rb));
    return;
  }
#pragma omp parallel for schedule(dynamic, 1) num_threads(t)
  for (int64_t b = 0; b < blocks; ++b) f(omp_get_thread_num(), b * rb, std::min(n, (b + 1) * rb));
}
}  // namespace

int64_t layernorm_linear_block_rows(int64_t in, int64_t out) { return block_rows_for(in + out); }

int64_t layernorm_linear_scratch_floats(const LayerNormLinearArgs& a, int threads) {
  const int64_t n = a.B * a.L, rb = layernorm_linear_block_rows(a.in, a.out);
  if (n <= 0) return 0;
  return busy_threads(n, rb, threads) * std::min(rb, n) * a.in;
}

void layernorm_linear(const LayerNormLinearArgs& a, float* scratch, int threads) {
  const int64_t n = a.B * a.L, in = a.in, rb = layernorm_linear_block_rows(in, a.out);
  const int64_t slot_floats = std::min(rb, n) * in;
  for_row_blocks(n, rb, threads, [&](int slot, int64_t g0, int64_t g1) {
    float* xs = scratch + slot * slot_floats;  // [g1 - g0, in] normalised rows of the block
    for (int64_t g = g0; g < g1;) {            // runs of rows of one batch item
      const int64_t b = g / a.L, l = g % a.L, cnt = std::min(g1 - g, a.L - l);
      layernorm(a.x + b * a.x_bs + l * a.x_rs, a.x_rs, xs + (g - g0) * in, in, cnt, in, a.gamma,
                a.beta, a.eps);
      g += cnt;
    }
    linear(xs, in, g1 - g0, in, a.W, a.bias, a.out, a.y + g0 * a.ldy, a.ldy, a.accumulate);
  });
}

int64_t transition_block_rows(int64_t c, int64_t hidden) { return block_rows_for(c + hidden); }

int64_t transition_scratch_floats(const TransitionArgs& a, int threads) {
  const int64_t rb = transition_block_rows(a.c, a.hidden);
  if (a.rows <= 0) return 0;
  return busy_threads(a.rows, rb, threads) * std::min(rb, a.rows) * (a.c + a.hidden);
}

void transition(const TransitionArgs& a, float* scratch, int threads) {
  const int64_t c = a.c, nh = a.hidden, rb = transition_block_rows(c, nh);
  const int64_t rows_per_slot = std::min(rb, a.rows);
  for_row_blocks(a.rows, rb, threads, [&](int slot, int64_t g0, int64_t g1) {
    const int64_t n = g1 - g0;
    float* t = scratch + slot * rows_per_slot * (c + nh);  // [n, c] LN(x), then the update
    float* h = t + rows_per_slot * c;                      // [n, hidden]
    float* xr = a.x + g0 * c;
    layernorm(xr, c, t, c, n, c, a.gamma, a.beta, a.eps);
    linear(t, c, n, c, a.W1, a.b1, nh, h, nh);
    relu_inplace(h, nh, n, nh);
    if (a.row_scale == nullptr) {
      linear(h, nh, n, nh, a.W2, a.b2, c, xr, c, true);
    } else {
      linear(h, nh, n, nh, a.W2, a.b2, c, t, c);
      scale_rows(t, c, a.row_scale + g0, n, c);
      add_inplace(xr, c, t, c, n, c);
    }
  });
}

namespace ref {

void layernorm_linear(const LayerNormLinearArgs& a, float* scratch) {
  for (int64_t b = 0; b < a.B; ++b)
    for (int64_t l = 0; l < a.L; ++l) {
      ref::layernorm(a.x + b * a.x_bs + l * a.x_rs, a.in, scratch, a.in, 1, a.in, a.gamma, a.beta,
                     a.eps);
      ref::linear(scratch, a.in, 1, a.in, a.W, a.bias, a.out, a.y + (b * a.L + l) * a.ldy, a.ldy,
                  a.accumulate);
    }
}

void transition(const TransitionArgs& a, float* scratch) {
  const int64_t c = a.c, nh = a.hidden;
  float* t = scratch;  // [c] LN(x row), then the update
  float* h = t + c;    // [hidden]
  for (int64_t r = 0; r < a.rows; ++r) {
    float* xr = a.x + r * c;
    ref::layernorm(xr, c, t, c, 1, c, a.gamma, a.beta, a.eps);
    ref::linear(t, c, 1, c, a.W1, a.b1, nh, h, nh);
    ref::relu_inplace(h, nh, 1, nh);
    ref::linear(h, nh, 1, nh, a.W2, a.b2, c, t, c);
    const float s = a.row_scale != nullptr ? a.row_scale[r] : 1.f;
    for (int64_t i = 0; i < c; ++i) xr[i] += t[i] * s;
  }
}

}  // namespace ref
}  // namespace fc::kern
