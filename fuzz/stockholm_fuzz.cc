// Fuzz target: Stockholm text through parse_stockholm; an accepted alignment is rectangular
// ([records, width] letters and deletions), an error is one line.
#include <string_view>

#include "foldcube/features.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  fc::Msa msa;
  const fc::Status st = fc::parse_stockholm(text, "fuzz.stockholm", &msa);
  if (!st.ok()) {
    FUZZ_CHECK(fc::fuzz::one_line(st.message()));
    return 0;
  }
  const size_t cells = static_cast<size_t>(msa.num_records()) * static_cast<size_t>(msa.width);
  FUZZ_CHECK(msa.letters.size() == cells && msa.deletions.size() == cells);
  FUZZ_CHECK(msa.lines.size() == msa.descriptions.size());
  for (int32_t d : msa.deletions) FUZZ_CHECK(d >= 0);
  return 0;
}
