// Shared by the fuzz targets: each fuzz/<name>_fuzz.cc defines LLVMFuzzerTestOneInput for one
// parser entry point and checks invariants with FUZZ_CHECK (a crash is a finding).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

// Fails the run (libFuzzer reports the input) when an invariant does not hold.
#define FUZZ_CHECK(cond)                                                                 \
  do {                                                                                   \
    if (!(cond)) {                                                                       \
      std::fprintf(stderr, "%s:%d: FUZZ_CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                                      \
    }                                                                                    \
  } while (0)

namespace fc::fuzz {

inline std::string as_string(const uint8_t* data, size_t size) {
  return std::string(reinterpret_cast<const char*>(data), size);
}

// A message from a parser must stay on one line (the CLI prints it as one).
inline bool one_line(const std::string& msg) { return msg.find('\n') == std::string::npos; }

}  // namespace fc::fuzz
