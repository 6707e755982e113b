// Fuzz target: a .npz archive (zip entries, .npy headers, array data) through parse_npz_bytes; an
// error is one line and leaves the output untouched, an accepted archive's tensors are bounded by
// its size (deflate expands at most ~1032:1 plus slack per member; f2/u1/b1 widen 4x to F32).
#include "foldcube/io.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fc::TensorFile f;
  const fc::Status st = fc::parse_npz_bytes(data, size, "fuzz.npz", &f);
  if (!st.ok()) {
    FUZZ_CHECK(fc::fuzz::one_line(st.message()));
    FUZZ_CHECK(f.names.empty() && f.tensors.empty());
    return 0;
  }
  FUZZ_CHECK(f.names.size() == f.tensors.size());
  uint64_t total = 0;
  for (const auto& kv : f.tensors) total += kv.second.nbytes();
  FUZZ_CHECK(total <= 4 * (1032 * static_cast<uint64_t>(size) + 1024 * (f.names.size() + 1)));
  return 0;
}
