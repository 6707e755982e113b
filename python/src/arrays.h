// NumPy (and any DLPack / buffer-protocol array) <-> fc::Tensor without copies, and fc::Status ->
// Python exceptions. Used by the binding files only.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstdint>
#include <string>
#include <vector>

#include "foldcube/status.h"
#include "foldcube/tensor.h"

namespace fcpy {

namespace nb = nanobind;

// Raises the Python exception of a non-OK status (needs the GIL): InvalidArgument -> ValueError,
// NotFound -> foldcube.NotFoundError (a FileNotFoundError and a ValueError), IOError -> OSError,
// OutOfMemory -> MemoryError, Cancelled -> KeyboardInterrupt, Internal -> RuntimeError.
void throw_status(const fc::Status& st);
// Creates foldcube.NotFoundError in the module (once, at import).
void add_exceptions(nb::module_& mod);
inline void check(const fc::Status& st) {
  if (!st.ok()) throw_status(st);
}

// Expected dimensions of an array argument; -1 = any size. `text` is the shape as documented
// (e.g. "[s, r, c_m=32]").
struct ArraySpec {
  const char* arg;
  std::vector<int64_t> dims;
  std::string text;
  bool writable = false;  // the call writes its results into the array
};

// A float32 C-contiguous CPU array as a Tensor over the same memory (no copy). The array must
// outlive the Tensor (the caller holds it for the call). TypeError naming spec.arg for a non-array
// or another dtype; ValueError for another shape, non-contiguous or (writable) read-only arrays.
fc::Tensor take_f32(nb::handle obj, const ArraySpec& spec);
// An optional argument: None gives an undefined Tensor.
fc::Tensor take_f32_opt(nb::handle obj, const ArraySpec& spec);
// Any dtype the library reads (float32, float64, int64, int32), C-contiguous (features).
fc::Tensor take_any(nb::handle obj, const std::string& arg);

// A NumPy array sharing the Tensor's buffer (made contiguous first if it is not); the array keeps
// the buffer alive. read_only for views of a model's own parameters.
nb::object to_numpy(const fc::Tensor& t, bool read_only = false);

}  // namespace fcpy
