// Tensor files: safetensors read/write (the format of the golden files and of OpenFold exports),
// numpy .npz archives (AlphaFold parameter files) read, and weights files of either format.
#pragma once

#include <cstdint>
#include <functional>
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

// The names and shapes of a parameter file's tensors with its metadata: what config inference
// reads (a filtered read gives them for the tensors it leaves out too).
struct TensorShapes {
  std::vector<std::string> names;  // header order
  std::map<std::string, Shape> shapes;
  std::map<std::string, std::string> metadata;

  bool has(const std::string& name) const { return shapes.count(name) != 0; }
  // Size of dimension d (negative counts from the back) of `name`; -1 if absent or of lower rank.
  int64_t dim(const std::string& name, int d) const;
};
// The names, shapes and metadata of f's tensors.
TensorShapes shapes_of(const TensorFile& f);

// Reads a whole safetensors file. Supported dtypes: F32, F64, I64, I32 (others: a clear error).
// Validates everything before trusting it: header length within the file, JSON well formed,
// dtype/shape/offsets consistent, offsets in range, tensors non-overlapping, no trailing gap
// the header does not account for. Never crashes on hostile input.
Status read_safetensors(const std::string& path, TensorFile* out);
// The same reader over a whole file held in memory (fuzzing, embedded data); `name` takes the
// place of the path in messages.
Status parse_safetensors_bytes(std::string_view bytes, const std::string& name, TensorFile* out);

// Reads a numpy .npz archive (a zip of .npy arrays, stored or deflated, zip64 included), such as
// DeepMind's params_model_*.npz, into tensors named by the member names without ".npy", in archive
// order (no metadata). dtypes: '<f4' -> F32, '<f8' -> F64, '<i4' -> I32, '<i8' -> I64, and
// '<f2', '|u1', '|b1' -> F32 (exact). Fortran-order arrays come back in C order. The archive is
// hostile until checked: entries, sizes and every .npy header are validated before a tensor is
// allocated, member sizes together must fit in the archive, and errors are one line naming the
// file and the member. Each array is read straight into its tensor.
Status read_npz(const std::string& path, TensorFile* out);

// read_npz on an archive held in memory (e.g. a fuzzer's input); `label` stands for the file name
// in messages. `out` is untouched on error.
Status parse_npz_bytes(const uint8_t* data, size_t size, const std::string& label, TensorFile* out);

// safetensors or npz, told apart by the first bytes (a zip archive starts with "PK"), not by the
// file name extension.
Status read_tensor_file(const std::string& path, TensorFile* out);

// A parameter file of either format with OpenFold state_dict names: an AlphaFold .npz (keys
// "alphafold/alphafold_iteration/...") is renamed and transformed into the OpenFold `AlphaFold`
// state dict (src/io/param_names.h); other files are returned as read.
Status read_weights(const std::string& path, TensorFile* out);

// Which blocks of a layer stack a filtered read keeps: a tensor named "<stack>blocks.<i>.<rest>"
// (<stack> empty or ending in '.') is block i of the `blocks` blocks (the largest index + 1 in the
// file) of that stack; tensors outside any stack are always kept.
using BlockFilter = std::function<bool(const std::string& stack, int64_t block, int64_t blocks)>;
// read_weights keeping only the blocks `keep` accepts; the others are never whole in memory: a
// safetensors file's are skipped, an AlphaFold .npz's stacked arrays are read one at a time and
// the unwanted blocks dropped before the next (a plain .npz is read whole, then filtered).
// shapes (optional) receives the names and shapes of every tensor of the file, those left out
// included (an AlphaFold .npz's under their OpenFold names and shapes), and out's metadata: a DAP
// rank infers the whole config from them while holding only its own blocks.
Status read_weights(const std::string& path, TensorFile* out, const BlockFilter& keep,
                    TensorShapes* shapes = nullptr);

// Writes tensors (F32, F64, I64 or I32, any strides) in names order with the given metadata.
// Writes a temporary file beside path (path.tmp.<pid>.<n>), fsyncs it and renames it onto path:
// a failed or interrupted write never leaves a partial file at path, and a previous file at path
// stays intact until the new one is complete. On error the temporary is removed (a process killed
// mid-write can leave one behind; it is never read).
Status write_safetensors(const std::string& path, const TensorFile& file);

// The same file written from pieces, so that no tensor need be whole in memory: specs give the
// tensors' names, dtypes and shapes in file order; fill(i, sink) passes tensor i's bytes to sink
// in order, exactly its shape's bytes in total (more or fewer is an error).
struct TensorSpec {
  std::string name;
  DType dtype = DType::F32;
  Shape shape;
};
using ByteSink = std::function<Status(const void* bytes, size_t n)>;
Status write_safetensors_streamed(const std::string& path,
                                  const std::map<std::string, std::string>& metadata,
                                  const std::vector<TensorSpec>& specs,
                                  const std::function<Status(size_t, const ByteSink&)>& fill);

}  // namespace fc
