// Tensor files: safetensors read/write (the format of the golden files and of OpenFold exports).
#pragma once

#include <map>
#include <string>
#include <vector>

#include "foldcube/status.h"
#include "foldcube/tensor.h"

namespace fc {

// An ordered set of named tensors plus the file's string metadata.
struct TensorFile {
  std::vector<std::string> names;  // header order on read, insertion order on write
  std::map<std::string, Tensor> tensors;
  std::map<std::string, std::string> metadata;

  bool has(const std::string& name) const { return tensors.count(name) != 0; }
  // Adds or replaces (keeps the first position).
  void put(const std::string& name, const Tensor& t);
  // User error if missing, not F32, or (when shape is non-empty) of another shape.
  Status get_f32(const std::string& name, const Shape& shape, Tensor* out) const;
};

// Reads a whole safetensors file. Supported dtypes: F32, F64, I64, I32 (others: a clear error).
// Validates everything before trusting it: header length within the file, JSON well formed,
// dtype/shape/offsets consistent, offsets in range, tensors non-overlapping, no trailing gap
// the header does not account for. Never crashes on hostile input.
Status read_safetensors(const std::string& path, TensorFile* out);

// Writes tensors (F32, F64, I64 or I32, any strides) in names order with the given metadata.
// Writes to path.tmp and renames, so a failed write never leaves a half file at path.
Status write_safetensors(const std::string& path, const TensorFile& file);

}  // namespace fc
