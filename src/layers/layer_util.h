// Helpers the layer units (src/layers/) share: the fused kernels' GEMM-input weights and sizes,
// and the LayerNorm backward into a gradient.
#pragma once

#include <cstdint>

#include "foldcube/tensor.h"
#include "kernels/fused.h"
#include "layers/context.h"
#include "model/weights.h"

namespace fc {

// A LayerNorm-Linear call's sizes and GEMM input type (what its scratch formula reads); the caller
// sets the pointers.
kern::LayerNormLinearArgs ln_linear_dims(int64_t B, int64_t L, int64_t in, int64_t out,
                                         DType dtype);
// The GEMM-input copy of a weight matrix for the fused kernels: its bf16 rounding (a tracked
// tensor, same shape) when dtype is BF16, else undefined (the kernels read the f32 weights).
Tensor gemm_weights(const Tensor& w, DType dtype);
int64_t gemm_weights_bytes(int64_t numel, DType dtype);
// The bf16 data of gemm_weights' result, or nullptr when it is undefined.
const uint16_t* bf16_ptr(const Tensor& t);
// bf16 products in the outer product mean and the triangle multiplication: fused BF16 on a single
// shard (the shard gathers move f32 and keep f32 products).
bool bf16_products(const BlockContext& ctx, int64_t parts);
// dx (+)= LayerNorm backward; dgamma/dbeta accumulate into ln_grad. Allocates the kernel scratch.
void layernorm_backward_into(const float* x, const float* dy, int64_t rows, int64_t n,
                             const LayerNormW& ln, const float* mean, const float* rstd, float* dx,
                             LayerNormW* ln_grad, bool accumulate);

}  // namespace fc
