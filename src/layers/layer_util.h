// Helpers the layer units (src/layers/) share: the fused kernels' GEMM-input weights and sizes,
// and the LayerNorm backward into a gradient.
#pragma once

#include <cstdint>

#include "foldcube/tensor.h"
#include "kernels/fused.h"
#include "layers/context.h"
#include "layers/layer_models.h"
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
// Fused BF16: bf16 GEMM inputs in the forward and bf16 products in the outer product mean and
// the triangle multiplication, on one shard or many (the shard gathers move the bf16 values as
// f32, so every shard multiplies the values one process multiplies).
bool bf16_fused(const BlockContext& ctx);
// A row chunk's LayerNorm output with the statistics its backward needs (the opening of every
// unit's backward). Allocated in this order: y, mean, rstd.
struct NormedRows {
  Tensor y;     // LN(x) in the shape given ([rows, n] or [items, L, n])
  Tensor mean;  // [rows]
  Tensor rstd;  // [rows]
};
// Allocates the three for `rows` rows (y in element type y_type); the caller fills them
// (gathered or strided layouts).
NormedRows normed_rows(const Shape& y_shape, int64_t rows, DType y_type = DType::F32);
// LN of the contiguous rows x [rows, n] with weights ln and epsilon eps, with its statistics; y
// in f32, or (y_type BF16) its bf16 rounding, the bf16 training's GEMM input.
NormedRows layernorm_with_stats(const float* x, int64_t rows, int64_t n, const LayerNormW& ln,
                                float eps, DType y_type = DType::F32);
// bf16 storage of training state (BlockContext::store): a tensor the forward keeps is rounded to
// bf16 values before the forward uses it (round_for_store), kept as bf16 (to_store: a bf16 copy,
// the f32 one released) and widened for the backward (from_store: an f32 copy, the bf16 one
// released). Under F32 storage all three leave t as it is.
void round_for_store(const BlockContext& ctx, Tensor& t);
Tensor to_store(const BlockContext& ctx, Tensor t);
Tensor from_store(Tensor t);
// The replay of to_store / from_store on n elements (layer_models.h).
void to_store_replay(AllocReplay& S, const BlockContext& ctx, int64_t n);
void from_store_replay(AllocReplay& S, const BlockContext& ctx, int64_t n);
// The training step's Linear products in the GEMM input type of BlockContext::store: F32 is
// kern::linear / kern::linear_backward (unchanged bits); BF16 rounds every product's operands to
// bf16 with f32 accumulation (kern::linear_bf16 / linear_backward_bf16), W [out, in] copied to
// bf16 per call into one tracked buffer together with the kernel's scratch (bf16 elements:
// train_linear_bf16_elems / train_linear_backward_bf16_elems; replays below). Master weights,
// gradients (accumulated in f32) and outputs stay f32.
void train_linear(const BlockContext& ctx, const float* x, int64_t ldx, int64_t rows, int64_t in,
                  const float* W, const float* b, int64_t out, float* y, int64_t ldy,
                  bool accumulate = false);
void train_linear_backward(const BlockContext& ctx, const float* x, int64_t ldx, int64_t rows,
                           int64_t in, const float* W, int64_t out, const float* dy, int64_t lddy,
                           float* dx, int64_t lddx, float* dW, float* db, bool accumulate = false);
// The two with x already in bf16 (BF16 storage only; a producer wrote the rounded copy xb
// [rows, in], leading dimension ldx): the transient buffer holds W's copy (and dy's rounding in
// the backward), no copy of x. Equal bits to the f32-x forms on xb = bf16(x).
void train_linear(const BlockContext& ctx, const uint16_t* xb, int64_t ldx, int64_t rows,
                  int64_t in, const float* W, const float* b, int64_t out, float* y, int64_t ldy,
                  bool accumulate = false);
void train_linear_backward(const BlockContext& ctx, const uint16_t* xb, int64_t ldx, int64_t rows,
                           int64_t in, const float* W, int64_t out, const float* dy, int64_t lddy,
                           float* dx, int64_t lddx, float* dW, float* db, bool accumulate = false);
int64_t train_linear_bf16_elems(int64_t rows, int64_t in, int64_t out, bool x_bf16 = false);
int64_t train_linear_backward_bf16_elems(int64_t rows, int64_t in, int64_t out, bool dW,
                                         bool x_bf16 = false);
// The replay of one train_linear / train_linear_backward call (its transient buffer; nothing
// under F32); x_bf16: the bf16-x forms.
void train_linear_replay(AllocReplay& S, const BlockContext& ctx, int64_t rows, int64_t in,
                         int64_t out, bool x_bf16 = false);
void train_linear_backward_replay(AllocReplay& S, const BlockContext& ctx, int64_t rows, int64_t in,
                                  int64_t out, bool dW = true, bool x_bf16 = false);
// dx (+)= LayerNorm backward; dgamma/dbeta accumulate into ln_grad. Allocates the kernel scratch.
void layernorm_backward_into(const float* x, const float* dy, int64_t rows, int64_t n,
                             const LayerNormW& ln, const float* mean, const float* rstd, float* dx,
                             LayerNormW* ln_grad, bool accumulate);

}  // namespace fc
