// Fuzz target: FASTA text through parse_fasta; an accepted file has records with upper-case
// sequences, an error is one line.
#include <string_view>
#include <vector>

#include "foldcube/features.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  std::vector<fc::FastaRecord> records;
  const fc::Status st = fc::parse_fasta(text, "fuzz.fasta", &records);
  if (!st.ok()) {
    FUZZ_CHECK(fc::fuzz::one_line(st.message()));
    return 0;
  }
  FUZZ_CHECK(!records.empty());
  for (const fc::FastaRecord& r : records) {
    FUZZ_CHECK(!r.sequence.empty());
    for (char c : r.sequence) FUZZ_CHECK(c >= 'A' && c <= 'Z');
  }
  return 0;
}
