// Naive references for the backward kernels (see backward.h for the contracts). Plain loops with
// every sum and transcendental in double: obviously correct, not fast. The fast versions in
// backward.cc are tested against these, and these against finite differences of the forward
// references (tests/backward_test.cc).
#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels/backward.h"
#include "kernels/convert.h"

namespace fc::kern::ref {

namespace {
// Stores v into *dst, or adds it to *dst (in double) when accumulate.
inline void put(float* dst, double v, bool accumulate) {
  *dst = static_cast<float>(accumulate ? *dst + v : v);
}
}  // namespace

void linear_backward(const float* x, int64_t ldx, int64_t rows, int64_t in, const float* W,
                     int64_t out, const float* dy, int64_t lddy, float* dx, int64_t lddx, float* dW,
                     float* db, bool accumulate) {
  if (dx)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < in; ++i) {
        double acc = 0;
        for (int64_t o = 0; o < out; ++o)
          acc += static_cast<double>(dy[r * lddy + o]) * W[o * in + i];
        put(&dx[r * lddx + i], acc, accumulate);
      }
  if (dW)
    for (int64_t o = 0; o < out; ++o)
      for (int64_t i = 0; i < in; ++i) {
        double acc = 0;
        for (int64_t r = 0; r < rows; ++r)
          acc += static_cast<double>(dy[r * lddy + o]) * x[r * ldx + i];
        put(&dW[o * in + i], acc, true);
      }
  if (db)
    for (int64_t o = 0; o < out; ++o) {
      double acc = 0;
      for (int64_t r = 0; r < rows; ++r) acc += dy[r * lddy + o];
      put(&db[o], acc, true);
    }
}

void layernorm_backward(const float* x, int64_t ldx, const float* dy, int64_t lddy, int64_t rows,
                        int64_t n, const float* gamma, const float* mean, const float* rstd,
                        float* dx, int64_t lddx, float* dgamma, float* dbeta, float* /*scratch*/,
                        bool accumulate) {
  if (n <= 0) return;
  // Parameter gradients first: dx may alias dy or x.
  for (int64_t i = 0; i < n; ++i) {
    double dg = 0, db = 0;
    for (int64_t r = 0; r < rows; ++r) {
      const double xhat = (static_cast<double>(x[r * ldx + i]) - mean[r]) * rstd[r];
      dg += dy[r * lddy + i] * xhat;
      db += dy[r * lddy + i];
    }
    if (dgamma) put(&dgamma[i], dg, true);
    if (dbeta) put(&dbeta[i], db, true);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ldx;     // [n]
    const float* dyr = dy + r * lddy;  // [n]
    const double mu = mean[r], rs = rstd[r];
    double sum_g = 0, sum_gx = 0;
    for (int64_t i = 0; i < n; ++i) {
      const double g = static_cast<double>(dyr[i]) * gamma[i];
      sum_g += g;
      sum_gx += g * (xr[i] - mu) * rs;
    }
    const double a = sum_g / static_cast<double>(n), b = sum_gx / static_cast<double>(n);
    for (int64_t i = 0; i < n; ++i) {
      const double g = static_cast<double>(dyr[i]) * gamma[i];
      const double xhat = (xr[i] - mu) * rs;
      put(&dx[r * lddx + i], rs * (g - a - xhat * b), accumulate);
    }
  }
}

void softmax_backward(const float* p, int64_t ldp, const float* dp, int64_t lddp, float* dx,
                      int64_t lddx, int64_t rows, int64_t n, bool accumulate) {
  for (int64_t r = 0; r < rows; ++r) {
    double dot = 0;
    for (int64_t i = 0; i < n; ++i) dot += static_cast<double>(p[r * ldp + i]) * dp[r * lddp + i];
    for (int64_t i = 0; i < n; ++i)
      put(&dx[r * lddx + i], p[r * ldp + i] * (dp[r * lddp + i] - dot), accumulate);
  }
}

void sigmoid_mul_backward(const float* a, int64_t lda, const float* g, int64_t ldg, const float* dy,
                          int64_t lddy, float* da, int64_t ldda, float* dg, int64_t lddg,
                          int64_t rows, int64_t n, bool accumulate) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < n; ++i) {
      const double gv = g[r * ldg + i], av = a[r * lda + i], dyv = dy[r * lddy + i];
      const double e = std::exp(-std::abs(gv));
      const double s = gv >= 0 ? 1 / (1 + e) : e / (1 + e);
      const double ds = e / ((1 + e) * (1 + e));  // s * (1 - s) without cancellation
      if (da) put(&da[r * ldda + i], dyv * s, accumulate);
      if (dg) put(&dg[r * lddg + i], dyv * av * ds, accumulate);
    }
}

void relu_backward(const float* x, int64_t ldx, const float* dy, int64_t lddy, float* dx,
                   int64_t lddx, int64_t rows, int64_t n, bool accumulate) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < n; ++i) {
      const float v = x[r * ldx + i] > 0.f ? dy[r * lddy + i] : 0.f;
      dx[r * lddx + i] = accumulate ? dx[r * lddx + i] + v : v;
    }
}

void relu_backward(const uint16_t* x, int64_t ldx, const float* dy, int64_t lddy, float* dx,
                   int64_t lddx, int64_t rows, int64_t n, bool accumulate) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < n; ++i) {
      float xv = 0.f;
      ref::bf16_to_f32(x + r * ldx + i, &xv, 1);
      const float v = xv > 0.f ? dy[r * lddy + i] : 0.f;
      dx[r * lddx + i] = accumulate ? dx[r * lddx + i] + v : v;
    }
}

int64_t attention_backward_scratch_floats(const AttentionArgs& a) {
  return 2 * a.Lq * a.Lk + a.Lq * a.C;
}

void attention_backward(const AttentionArgs& a, const AttentionGrads& g, float* scratch) {
  const int64_t Lq = a.Lq, Lk = a.Lk, C = a.C;
  float* P = scratch;        // [Lq, Lk]
  float* dS = P + Lq * Lk;   // [Lq, Lk]
  float* dO = dS + Lq * Lk;  // [Lq, C]
  for (int64_t h = 0; h < a.H; ++h)
    for (int64_t b = 0; b < a.B; ++b) {
      auto q = [&](int64_t i, int64_t c) { return a.q[b * a.q_bs + i * a.q_rs + h * C + c]; };
      auto k = [&](int64_t j, int64_t c) { return a.k[b * a.k_bs + j * a.k_rs + h * C + c]; };
      auto v = [&](int64_t j, int64_t c) { return a.v[b * a.v_bs + j * a.v_rs + h * C + c]; };
      // Probabilities exactly as the forward reference computes them (logits rounded to float).
      for (int64_t i = 0; i < Lq; ++i) {
        float* p = P + i * Lk;  // [Lk], logits first
        double mx = -std::numeric_limits<double>::infinity();
        for (int64_t j = 0; j < Lk; ++j) {
          double dot = 0;
          for (int64_t c = 0; !a.bias_logits && c < C; ++c)
            dot += static_cast<double>(q(i, c)) * k(j, c);
          float x = a.bias_logits ? 0.f : static_cast<float>(dot * a.scale);
          if (a.mask_bias) x += a.mask_bias[b * Lk + j];
          if (a.pair_bias) x += a.pair_bias[(h * Lq + i) * Lk + j];
          p[j] = x;
          mx = std::max<double>(mx, x);
        }
        if (mx == -std::numeric_limits<double>::infinity()) {  // every key -inf: P = 0
          std::fill(p, p + Lk, 0.f);
          continue;
        }
        double sum = 0;
        for (int64_t j = 0; j < Lk; ++j) sum += std::exp(p[j] - mx);
        for (int64_t j = 0; j < Lk; ++j) p[j] = static_cast<float>(std::exp(p[j] - mx) / sum);
      }
      // Gating: dO = d_out * s, dgate = d_out * O * s * (1 - s).
      for (int64_t i = 0; i < Lq; ++i)
        for (int64_t c = 0; c < C; ++c) {
          const double dout = g.d_out[b * a.o_bs + i * a.o_rs + h * C + c];
          if (!a.gate) {
            dO[i * C + c] = static_cast<float>(dout);
            continue;
          }
          double o = 0;
          for (int64_t j = 0; j < Lk; ++j) o += static_cast<double>(P[i * Lk + j]) * v(j, c);
          const double gv = a.gate[b * a.g_bs + i * a.g_rs + h * C + c];
          const double e = std::exp(-std::abs(gv));
          const double s = gv >= 0 ? 1 / (1 + e) : e / (1 + e);
          dO[i * C + c] = static_cast<float>(dout * s);
          if (g.dgate)
            g.dgate[b * a.g_bs + i * a.g_rs + h * C + c] =
                static_cast<float>(dout * o * e / ((1 + e) * (1 + e)));
        }
      // dP = dO V^T, dS = P * (dP - rowsum(dP * P)); dP is formed twice so that it stays in double.
      auto dp = [&](int64_t i, int64_t j) {
        double acc = 0;
        for (int64_t c = 0; c < C; ++c) acc += static_cast<double>(dO[i * C + c]) * v(j, c);
        return acc;
      };
      for (int64_t i = 0; i < Lq; ++i) {
        double dot = 0;
        for (int64_t j = 0; j < Lk; ++j) dot += dp(i, j) * P[i * Lk + j];
        for (int64_t j = 0; j < Lk; ++j)
          dS[i * Lk + j] = static_cast<float>(P[i * Lk + j] * (dp(i, j) - dot));
      }
      if (g.d_pair_bias)
        for (int64_t i = 0; i < Lq * Lk; ++i) g.d_pair_bias[h * Lq * Lk + i] += dS[i];
      if (g.dq && !a.bias_logits)
        for (int64_t i = 0; i < Lq; ++i)
          for (int64_t c = 0; c < C; ++c) {
            double acc = 0;
            for (int64_t j = 0; j < Lk; ++j) acc += static_cast<double>(dS[i * Lk + j]) * k(j, c);
            g.dq[b * a.q_bs + i * a.q_rs + h * C + c] = static_cast<float>(a.scale * acc);
          }
      for (int64_t j = 0; j < Lk; ++j)
        for (int64_t c = 0; c < C; ++c) {
          double acc_k = 0, acc_v = 0;
          for (int64_t i = 0; i < Lq; ++i) {
            if (!a.bias_logits) acc_k += static_cast<double>(dS[i * Lk + j]) * q(i, c);
            acc_v += static_cast<double>(P[i * Lk + j]) * dO[i * C + c];
          }
          if (g.dk && !a.bias_logits)
            g.dk[b * a.k_bs + j * a.k_rs + h * C + c] = static_cast<float>(a.scale * acc_k);
          if (g.dv) g.dv[b * a.v_bs + j * a.v_rs + h * C + c] = static_cast<float>(acc_v);
        }
    }
}

}  // namespace fc::kern::ref
