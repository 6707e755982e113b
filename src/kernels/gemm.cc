// GEMM through oneDNN's dnnl_sgemm (chosen over OpenBLAS by measurement: docs/gemm.md).
#include <dnnl.h>
#include <omp.h>

#include <cstring>
#include <map>
#include <oneapi/dnnl/dnnl.hpp>
#include <tuple>

#include "foldcube/status.h"
#include "kernels/convert.h"
#include "kernels/kernels.h"

namespace fc::kern {

void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
          int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == 0.f ? 0.f : beta * C[i * ldc + j];
    return;
  }
  dnnl_status_t st = dnnl_sgemm(trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', M, N, K, alpha, A, lda, B,
                                ldb, beta, C, ldc);
  FC_CHECK_MSG(st == dnnl_success, "dnnl_sgemm failed");
}

void gemm_batched(int64_t batch, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
                  float alpha, const float* A, int64_t lda, int64_t stride_a, const float* B,
                  int64_t ldb, int64_t stride_b, float beta, float* C, int64_t ldc,
                  int64_t stride_c) {
  // A batch at least as large as the thread count keeps every core busy with one
  // single-threaded product each (no per-call threading overhead on small matrices).
  const int threads = omp_get_max_threads();
  if (batch >= threads && !omp_in_parallel()) {
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t b = 0; b < batch; ++b)
      gemm(trans_a, trans_b, M, N, K, alpha, A + b * stride_a, lda, B + b * stride_b, ldb, beta,
           C + b * stride_c, ldc);
  } else {
    for (int64_t b = 0; b < batch; ++b)
      gemm(trans_a, trans_b, M, N, K, alpha, A + b * stride_a, lda, B + b * stride_b, ldb, beta,
           C + b * stride_c, ldc);
  }
}

void linear(const float* x, int64_t ldx, int64_t rows, int64_t in, const float* W, const float* b,
            int64_t out, float* y, int64_t ldy, bool accumulate) {
  float beta = accumulate ? 1.f : 0.f;
  if (b != nullptr) {
    if (!accumulate) {
#pragma omp parallel for schedule(static) if (rows * out > (1 << 16))
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t o = 0; o < out; ++o) y[r * ldy + o] = b[o];
    } else {
      add_bias_rows(y, ldy, b, rows, out);
    }
    beta = 1.f;
  }
  gemm(false, true, rows, out, in, 1.f, x, ldx, W, in, beta, y, ldy);
}

namespace {
uint32_t float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

// C = alpha * op(A) op(B) + beta * C, bf16 A and B, through a oneDNN matmul primitive: alpha as
// its output scale, beta as a sum post-op (the f32 product is accumulated in f32 by oneDNN's
// bf16 kernels: AVX512_BF16 dot products where the CPU has them). Primitives are cached per
// shape, transposition, leading dimensions, alpha, beta and the thread count they were made for
// (omp_get_max_threads: 1 inside the fused kernels' row blocks), one cache per calling thread:
// a primitive shared by concurrent callers gave results that differed in the last bits now and
// then (fused_test, three threads on two cores), per-thread primitives never did. Each cache entry
// keeps its three memory objects (pointed at the call's data) and the thread keeps one stream, and
// the primitive runs through the C API's argument array: the attention backward's small tile
// products made ~100k calls per block, where per-call objects and the C++ argument map (heap
// allocations each) cost more than the products' packing.
// A bias (f32 [N], added to every row of C) goes in as the primitive's bias argument.
struct Bf16Matmul {
  dnnl::matmul prim;
  dnnl::memory a, b, c, bias;  // [M, K], [K, N] bf16, [M, N] f32 with the key's strides, [1, N] f32
};

void gemm_bf16(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
               const void* A, int64_t lda, const void* B, int64_t ldb, float beta, float* C,
               int64_t ldc, const float* bias) {
  using dims = dnnl::memory::dims;
  using dt = dnnl::memory::data_type;
  static const dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  thread_local dnnl::stream stream(engine);
  thread_local std::map<std::tuple<bool, bool, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                                   uint32_t, uint32_t, int, bool>,
                        Bf16Matmul>
      cache;
  const auto key = std::make_tuple(trans_a, trans_b, M, N, K, lda, ldb, ldc, float_bits(alpha),
                                   float_bits(beta), omp_get_max_threads(), bias != nullptr);
  auto it = cache.find(key);
  if (it == cache.end()) {
    // Logical A [M, K], B [K, N], C [M, N] with the strides of the row-major storage.
    const dnnl::memory::desc a_md({M, K}, dt::bf16, trans_a ? dims{1, lda} : dims{lda, 1});
    const dnnl::memory::desc b_md({K, N}, dt::bf16, trans_b ? dims{1, ldb} : dims{ldb, 1});
    const dnnl::memory::desc c_md({M, N}, dt::f32, dims{ldc, 1});
    const dnnl::memory::desc bias_md({1, N}, dt::f32, dims{N, 1});
    dnnl::primitive_attr attr;
    if (alpha != 1.f) attr.set_output_scales(0, {alpha});
    if (beta != 0.f) {
      dnnl::post_ops ops;
      ops.append_sum(beta);
      attr.set_post_ops(ops);
    }
    const dnnl::matmul::desc desc =
        bias ? dnnl::matmul::desc(a_md, b_md, bias_md, c_md) : dnnl::matmul::desc(a_md, b_md, c_md);
    const dnnl::matmul::primitive_desc pd(desc, attr, engine);
    Bf16Matmul e{dnnl::matmul(pd), dnnl::memory(a_md, engine, DNNL_MEMORY_NONE),
                 dnnl::memory(b_md, engine, DNNL_MEMORY_NONE),
                 dnnl::memory(c_md, engine, DNNL_MEMORY_NONE),
                 dnnl::memory(bias_md, engine, DNNL_MEMORY_NONE)};
    it = cache.emplace(key, std::move(e)).first;
  }
  Bf16Matmul& e = it->second;
  e.a.set_data_handle(const_cast<void*>(A));
  e.b.set_data_handle(const_cast<void*>(B));
  e.c.set_data_handle(C);
  if (bias) e.bias.set_data_handle(const_cast<float*>(bias));
  const dnnl_exec_arg_t args[4] = {{DNNL_ARG_SRC, e.a.get()},
                                   {DNNL_ARG_WEIGHTS, e.b.get()},
                                   {DNNL_ARG_DST, e.c.get()},
                                   {DNNL_ARG_BIAS, e.bias.get()}};
  FC_CHECK_MSG(
      dnnl_primitive_execute(e.prim.get(), stream.get(), bias ? 4 : 3, args) == dnnl_success,
      "oneDNN bf16 matmul failed");
  stream.wait();
}
}  // namespace

void gemm_typed(DType ab, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                const void* A, int64_t lda, const void* B, int64_t ldb, float beta, float* C,
                int64_t ldc, const float* bias) {
  FC_CHECK_MSG(ab == DType::F32 || ab == DType::BF16, "gemm_typed: inputs must be F32 or BF16");
  FC_CHECK_MSG(!bias || (ab == DType::BF16 && beta == 0.f),
               "gemm_typed: a bias needs BF16 inputs and beta 0");
  if (bias && (M == 0 || N == 0 || K == 0)) {  // C = bias rows (then the product, if any)
    for (int64_t i = 0; i < M; ++i) std::memcpy(C + i * ldc, bias, N * sizeof(float));
    beta = 1.f, bias = nullptr;
  }
  if (ab == DType::F32 || M == 0 || N == 0 || K == 0) {  // K == 0: C = beta * C, as gemm
    gemm(trans_a, trans_b, M, N, K, alpha, static_cast<const float*>(A), lda,
         static_cast<const float*>(B), ldb, beta, C, ldc);
    return;
  }
  gemm_bf16(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, bias);
}

namespace ref {

void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
          int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      double acc = 0.0;
      for (int64_t k = 0; k < K; ++k) {
        float a = trans_a ? A[k * lda + i] : A[i * lda + k];
        float bv = trans_b ? B[j * ldb + k] : B[k * ldb + j];
        acc += static_cast<double>(a) * bv;
      }
      float prev = beta == 0.f ? 0.f : beta * C[i * ldc + j];
      C[i * ldc + j] = static_cast<float>(alpha * acc) + prev;
    }
}

void linear(const float* x, int64_t ldx, int64_t rows, int64_t in, const float* W, const float* b,
            int64_t out, float* y, int64_t ldy, bool accumulate) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < out; ++o) {
      double acc = b ? b[o] : 0.0;
      for (int64_t i = 0; i < in; ++i) acc += static_cast<double>(x[r * ldx + i]) * W[o * in + i];
      y[r * ldy + o] = static_cast<float>(acc) + (accumulate ? y[r * ldy + o] : 0.f);
    }
}

}  // namespace ref
}  // namespace fc::kern
