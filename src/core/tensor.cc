#include "foldcube/tensor.h"

#include <algorithm>
#include <cstring>

#include "foldcube/memory.h"
#include "kernels/convert.h"

namespace fc {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32:
      return 4;
    case DType::F64:
      return 8;
    case DType::BF16:
    case DType::F16:
      return 2;
    case DType::I64:
      return 8;
    case DType::I32:
      return 4;
  }
  return 0;
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32:
      return "F32";
    case DType::F64:
      return "F64";
    case DType::BF16:
      return "BF16";
    case DType::I64:
      return "I64";
    case DType::I32:
      return "I32";
    case DType::F16:
      return "F16";
  }
  return "?";
}

std::string shape_str(const Shape& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(s[i]);
  }
  return out + "]";
}

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

Buffer::Buffer(size_t bytes) : data_(tracked_alloc(bytes)), bytes_(bytes) {}
Buffer::Buffer(void* tracked, size_t bytes) : data_(tracked), bytes_(bytes) {}
Buffer::Buffer(void* external, size_t bytes, std::shared_ptr<void> owner)
    : data_(external), bytes_(bytes), external_(true), owner_(std::move(owner)) {}
Buffer::~Buffer() {
  if (!external_) tracked_free(data_, bytes_);
}

namespace {
Shape contiguous_strides(const Shape& shape) {
  Shape st(shape.size());
  int64_t s = 1;
  for (int i = static_cast<int>(shape.size()) - 1; i >= 0; --i) {
    st[i] = s;
    s *= shape[i];
  }
  return st;
}
}  // namespace

Tensor Tensor::empty(const Shape& shape, DType dtype) {
  for (int64_t d : shape) FC_CHECK_MSG(d >= 0, "negative dimension in " + shape_str(shape));
  Tensor t;
  t.buf_ = std::make_shared<Buffer>(static_cast<size_t>(shape_numel(shape)) * dtype_size(dtype));
  t.dtype_ = dtype;
  t.shape_ = shape;
  t.strides_ = contiguous_strides(shape);
  return t;
}

Tensor Tensor::wrap(void* data, const Shape& shape, DType dtype, std::shared_ptr<void> owner) {
  for (int64_t d : shape) FC_CHECK_MSG(d >= 0, "negative dimension in " + shape_str(shape));
  Tensor t;
  t.buf_ = std::make_shared<Buffer>(
      data, static_cast<size_t>(shape_numel(shape)) * dtype_size(dtype), std::move(owner));
  t.dtype_ = dtype;
  t.shape_ = shape;
  t.strides_ = contiguous_strides(shape);
  return t;
}

Status Tensor::try_empty(const Shape& shape, DType dtype, const std::string& what, Tensor* out) {
  size_t bytes = dtype_size(dtype);
  for (int64_t d : shape) {
    if (d < 0) return Status::InvalidArgument(what + ": negative dimension in " + shape_str(shape));
    if (d > 0 && bytes > SIZE_MAX / static_cast<size_t>(d))
      return Status::OutOfMemory(what + ": " + shape_str(shape) + " " + dtype_name(dtype) +
                                 " exceeds the address space");
    bytes *= static_cast<size_t>(d);
  }
  void* p = try_tracked_alloc(bytes);
  if (p == nullptr)
    return Status::OutOfMemory(what + ": cannot allocate " + std::to_string(bytes) + " bytes for " +
                               shape_str(shape) + " " + dtype_name(dtype));
  Tensor t;
  t.buf_ = std::make_shared<Buffer>(p, bytes);
  t.dtype_ = dtype;
  t.shape_ = shape;
  t.strides_ = contiguous_strides(shape);
  *out = std::move(t);
  return Status::OK();
}

namespace {
// Zeroes `bytes` at p; large buffers on all kernel threads in 1 MiB pieces (the first touch of a
// fresh buffer's pages dominates: ~0.4 GB of model features took a quarter of the data stage on
// one thread).
void zero_fill(void* p, size_t bytes) {
  constexpr size_t kPiece = size_t{1} << 20;
  char* c = static_cast<char*>(p);
  if (bytes < 8 * kPiece) {
    std::memset(c, 0, bytes);
    return;
  }
  const int64_t pieces = static_cast<int64_t>((bytes + kPiece - 1) / kPiece);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < pieces; ++i) {
    const size_t at = static_cast<size_t>(i) * kPiece;
    std::memset(c + at, 0, std::min(kPiece, bytes - at));
  }
}
}  // namespace

Status Tensor::try_zeros(const Shape& shape, DType dtype, const std::string& what, Tensor* out) {
  FC_RETURN_IF_ERROR(try_empty(shape, dtype, what, out));
  zero_fill(out->buf_->data(), out->nbytes());
  return Status::OK();
}

Tensor Tensor::zeros(const Shape& shape, DType dtype) {
  Tensor t = empty(shape, dtype);
  zero_fill(t.buf_->data(), t.nbytes());
  return t;
}

Tensor Tensor::full(const Shape& shape, float value) {
  Tensor t = empty(shape, DType::F32);
  std::fill_n(t.data<float>(), t.numel(), value);
  return t;
}

int64_t Tensor::dim(int i) const {
  if (i < 0) i += ndim();
  FC_CHECK(i >= 0 && i < ndim());
  return shape_[i];
}

bool Tensor::is_contiguous() const {
  return strides_ == contiguous_strides(shape_) || numel() <= 1;
}

float* Tensor::f32() const {
  FC_CHECK_MSG(defined() && dtype_ == DType::F32, "tensor is not F32");
  return data<float>();
}

Tensor Tensor::slice(int d, int64_t begin, int64_t end) const {
  if (d < 0) d += ndim();
  FC_CHECK(d >= 0 && d < ndim() && 0 <= begin && begin <= end && end <= shape_[d]);
  Tensor t = *this;
  t.offset_ += begin * strides_[d];
  t.shape_[d] = end - begin;
  return t;
}

Tensor Tensor::select(int d, int64_t index) const {
  if (d < 0) d += ndim();
  Tensor t = slice(d, index, index + 1);
  t.shape_.erase(t.shape_.begin() + d);
  t.strides_.erase(t.strides_.begin() + d);
  return t;
}

Tensor Tensor::permute(const std::vector<int>& order) const {
  FC_CHECK(static_cast<int>(order.size()) == ndim());
  Tensor t = *this;
  std::vector<bool> seen(order.size(), false);
  for (size_t i = 0; i < order.size(); ++i) {
    FC_CHECK(order[i] >= 0 && order[i] < ndim() && !seen[order[i]]);
    seen[order[i]] = true;
    t.shape_[i] = shape_[order[i]];
    t.strides_[i] = strides_[order[i]];
  }
  return t;
}

Tensor Tensor::transpose(int a, int b) const {
  std::vector<int> order(ndim());
  for (int i = 0; i < ndim(); ++i) order[i] = i;
  if (a < 0) a += ndim();
  if (b < 0) b += ndim();
  std::swap(order[a], order[b]);
  return permute(order);
}

Tensor Tensor::reshape(const Shape& shape) const {
  FC_CHECK_MSG(is_contiguous(), "reshape of a non-contiguous view");
  FC_CHECK_MSG(shape_numel(shape) == numel(),
               "reshape " + shape_str(shape_) + " -> " + shape_str(shape));
  Tensor t = *this;
  t.shape_ = shape;
  t.strides_ = contiguous_strides(shape);
  return t;
}

Tensor Tensor::contiguous() const {
  if (is_contiguous()) return *this;
  return clone();
}

Tensor Tensor::clone() const {
  Tensor t = empty(shape_, dtype_);
  t.copy_from(*this);
  return t;
}

Tensor Tensor::to(DType dtype) const {
  Tensor t = empty(shape_, dtype);
  t.copy_from(*this);
  return t;
}

namespace {
// Calls f(dst offset, src offset) (in elements) for every element of `shape`, in row-major order.
template <typename F>
void for_each_offset(const Shape& dstr, const Shape& sstr, const Shape& shape, F f) {
  const int nd = static_cast<int>(shape.size());
  if (nd == 0) {
    f(0, 0);
    return;
  }
  const int64_t inner = shape[nd - 1], di = dstr[nd - 1], si = sstr[nd - 1];
  const int64_t outer = shape_numel(shape) / std::max<int64_t>(inner, 1);
  if (inner == 0) return;
  std::vector<int64_t> idx(nd, 0);
  for (int64_t o = 0; o < outer; ++o) {
    int64_t doff = 0, soff = 0;
    for (int k = 0; k < nd - 1; ++k) {
      doff += idx[k] * dstr[k];
      soff += idx[k] * sstr[k];
    }
    for (int64_t i = 0; i < inner; ++i) f(doff + i * di, soff + i * si);
    for (int k = nd - 2; k >= 0; --k) {
      if (++idx[k] < shape[k]) break;
      idx[k] = 0;
    }
  }
}

template <typename D, typename S>
void strided_copy(D* dst, const Shape& dstr, const S* src, const Shape& sstr, const Shape& shape) {
  for_each_offset(dstr, sstr, shape,
                  [&](int64_t d, int64_t s) { dst[d] = static_cast<D>(src[s]); });
}

// One element as a double (exact for every type).
double load_element(const char* base, DType t, int64_t i) {
  switch (t) {
    case DType::F32:
      return reinterpret_cast<const float*>(base)[i];
    case DType::F64:
      return reinterpret_cast<const double*>(base)[i];
    case DType::BF16:
    case DType::F16: {
      float f;
      const uint16_t* h = reinterpret_cast<const uint16_t*>(base) + i;
      t == DType::BF16 ? kern::ref::bf16_to_f32(h, &f, 1) : kern::ref::f16_to_f32(h, &f, 1);
      return f;
    }
    case DType::I64:
    case DType::I32:
      break;  // integers never convert (copy_from checks)
  }
  FC_CHECK_MSG(false, "load_element of an integer tensor");
  return 0;
}

// Stores x rounded to type t (nearest even, once: through f32 rounded to odd for 16-bit types).
void store_element(char* base, DType t, int64_t i, double x) {
  switch (t) {
    case DType::F32:
      reinterpret_cast<float*>(base)[i] = static_cast<float>(x);
      return;
    case DType::F64:
      reinterpret_cast<double*>(base)[i] = x;
      return;
    case DType::BF16:
    case DType::F16: {
      const float f = kern::ref::f64_to_f32_round_odd(x);
      uint16_t* h = reinterpret_cast<uint16_t*>(base) + i;
      t == DType::BF16 ? kern::ref::f32_to_bf16(&f, h, 1) : kern::ref::f32_to_f16(&f, h, 1);
      return;
    }
    case DType::I64:
    case DType::I32:
      break;
  }
  FC_CHECK_MSG(false, "store_element to an integer tensor");
}
}  // namespace

void Tensor::copy_from(const Tensor& src) {
  FC_CHECK_MSG(src.shape_ == shape_,
               "copy_from shape " + shape_str(src.shape_) + " -> " + shape_str(shape_));
  const bool contiguous = is_contiguous() && src.is_contiguous();
  if (dtype_ == src.dtype_ && contiguous) {
    std::memmove(data<char>(), src.data<char>(), nbytes());
    return;
  }
  const bool ints = dtype_ == DType::I64 || dtype_ == DType::I32 || src.dtype_ == DType::I64 ||
                    src.dtype_ == DType::I32;
  if (ints) {
    // Integer tensors copy between equal types only (no silent float <-> int conversion).
    FC_CHECK_MSG(dtype_ == src.dtype_,
                 std::string("copy_from ") + dtype_name(src.dtype_) + " -> " + dtype_name(dtype_));
    if (dtype_ == DType::I64)
      strided_copy(data<int64_t>(), strides_, src.data<int64_t>(), src.strides_, shape_);
    else
      strided_copy(data<int32_t>(), strides_, src.data<int32_t>(), src.strides_, shape_);
    return;
  }
  const bool half = dtype_ == DType::BF16 || dtype_ == DType::F16;
  const bool src_half = src.dtype_ == DType::BF16 || src.dtype_ == DType::F16;
  if (contiguous && dtype_ == DType::F32 && src_half) {  // the SIMD kernels
    (src.dtype_ == DType::BF16 ? kern::bf16_to_f32 : kern::f16_to_f32)(src.data<uint16_t>(),
                                                                       data<float>(), numel());
    return;
  }
  if (contiguous && half && src.dtype_ == DType::F32) {
    (dtype_ == DType::BF16 ? kern::f32_to_bf16 : kern::f32_to_f16)(src.data<float>(),
                                                                   data<uint16_t>(), numel());
    return;
  }
  if (dtype_ == src.dtype_ && half) {
    strided_copy(data<uint16_t>(), strides_, src.data<uint16_t>(), src.strides_, shape_);
    return;
  }
  if (half || src_half) {  // any other pair with a 16-bit side: one element at a time
    char* d = data<char>();
    const char* s = src.data<char>();
    for_each_offset(strides_, src.strides_, shape_, [&](int64_t di, int64_t si) {
      store_element(d, dtype_, di, load_element(s, src.dtype_, si));
    });
    return;
  }
  if (dtype_ == DType::F32 && src.dtype_ == DType::F32)
    strided_copy(data<float>(), strides_, src.data<float>(), src.strides_, shape_);
  else if (dtype_ == DType::F32 && src.dtype_ == DType::F64)
    strided_copy(data<float>(), strides_, src.data<double>(), src.strides_, shape_);
  else if (dtype_ == DType::F64 && src.dtype_ == DType::F32)
    strided_copy(data<double>(), strides_, src.data<float>(), src.strides_, shape_);
  else
    strided_copy(data<double>(), strides_, src.data<double>(), src.strides_, shape_);
}

Status expect_shape(const std::string& name, const Tensor& t, const Shape& want) {
  if (!t.defined()) return Status::NotFound("tensor '" + name + "' is missing");
  if (t.shape() != want)
    return Status::InvalidArgument("tensor '" + name + "' has shape " + shape_str(t.shape()) +
                                   ", expected " + shape_str(want));
  return Status::OK();
}

}  // namespace fc
