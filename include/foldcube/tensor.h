// Tensor: a strided view (dtype, shape, strides, offset) of a reference-counted buffer that was
// allocated through the tracking allocator. Copying a Tensor copies the view, not the data.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "foldcube/status.h"

namespace fc {

// Element types. BF16 and F16 elements are stored as their raw 16-bit patterns (uint16_t); I64 and
// I32 (integer features) copy between equal types only.
enum class DType : uint8_t { F32, F64, BF16, I64, I32, F16 };
size_t dtype_size(DType t);
const char* dtype_name(
    DType t);  // "F32", "F64", "BF16", "I64", "I32", "F16" (safetensors spelling)

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& s);  // "[2, 3]"
int64_t shape_numel(const Shape& s);

// Owns one tracked allocation, or refers to memory someone else owns.
class Buffer {
 public:
  explicit Buffer(size_t bytes);        // aborts on OOM
  Buffer(void* tracked, size_t bytes);  // adopts a try_tracked_alloc(bytes) allocation
  // Memory the library does not own (not tracked, never freed here); `owner` is released with the
  // buffer and may be null.
  Buffer(void* external, size_t bytes, std::shared_ptr<void> owner);
  ~Buffer();
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }

 private:
  void* data_;
  size_t bytes_;
  bool external_ = false;
  std::shared_ptr<void> owner_;  // external memory: its keeper
};

class Tensor {
 public:
  Tensor() = default;

  // Uninitialised, contiguous, tracked.
  static Tensor empty(const Shape& shape, DType dtype = DType::F32);
  static Tensor zeros(const Shape& shape, DType dtype = DType::F32);
  static Tensor full(const Shape& shape, float value);  // F32
  // As empty / zeros for sizes that come from a user (files, flags): OutOfMemory naming `what`
  // when the byte count overflows or the allocation fails, InvalidArgument for a negative
  // dimension; never aborts.
  static Status try_empty(const Shape& shape, DType dtype, const std::string& what, Tensor* out);
  static Status try_zeros(const Shape& shape, DType dtype, const std::string& what, Tensor* out);
  // A contiguous view of memory the library does not own (e.g. a NumPy array), without a copy:
  // `data` must hold shape_numel(shape) elements and stay valid while any view of it lives;
  // `owner` (may be null) is released with the last view. Not counted by the tracking allocator.
  static Tensor wrap(void* data, const Shape& shape, DType dtype, std::shared_ptr<void> owner);

  bool defined() const { return buf_ != nullptr; }
  DType dtype() const { return dtype_; }
  const Shape& shape() const { return shape_; }
  const Shape& strides() const { return strides_; }  // in elements
  int ndim() const { return static_cast<int>(shape_.size()); }
  int64_t dim(int i) const;  // negative i counts from the back
  int64_t numel() const { return shape_numel(shape_); }
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }
  bool is_contiguous() const;

  template <typename T>
  T* data() const {
    return reinterpret_cast<T*>(static_cast<char*>(buf_->data()) + offset_ * dtype_size(dtype_));
  }
  float* f32() const;  // checks dtype F32

  // Views (share the buffer).
  Tensor slice(int dim, int64_t begin, int64_t end) const;  // [begin, end) along dim
  Tensor select(int dim, int64_t index) const;              // drops dim
  Tensor permute(const std::vector<int>& order) const;
  Tensor transpose(int a, int b) const;
  Tensor reshape(const Shape& shape) const;  // contiguous tensors only
  // Copies.
  Tensor contiguous() const;  // returns *this if already contiguous
  Tensor clone() const;       // always a fresh contiguous copy
  // Conversion among F32, F64, BF16 and F16 (a copy): round to nearest, ties to even, once (F64
  // to a 16-bit type rounds directly, not through F32's rounding); widening is exact; NaN stays
  // NaN and overflow gives +-Inf (kern::f32_to_bf16 / f32_to_f16, src/kernels/convert.h).
  Tensor to(DType dtype) const;
  void copy_from(const Tensor& src);  // same shape; any strides; element types converted as to()

 private:
  std::shared_ptr<Buffer> buf_;
  int64_t offset_ = 0;  // in elements
  DType dtype_ = DType::F32;
  Shape shape_;
  Shape strides_;
};

// Shape check returning a user error naming the tensor.
Status expect_shape(const std::string& name, const Tensor& t, const Shape& want);

}  // namespace fc
