// Tensor files: safetensors read/write (the format of the golden files and of OpenFold exports).
#pragma once

#include <map>
#include <string>
#include <string_view>
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
// The same reader over a whole file held in memory (fuzzing, embedded data); `name` takes the
// place of the path in messages.
Status parse_safetensors_bytes(std::string_view bytes, const std::string& name, TensorFile* out);

// Writes tensors (F32, F64, I64 or I32, any strides) in names order with the given metadata.
// Writes a temporary file beside path (path.tmp.<pid>.<n>), fsyncs it and renames it onto path:
// a failed or interrupted write never leaves a partial file at path, and a previous file at path
// stays intact until the new one is complete. On error the temporary is removed (a process killed
// mid-write can leave one behind; it is never read).
Status write_safetensors(const std::string& path, const TensorFile& file);

}  // namespace fc
