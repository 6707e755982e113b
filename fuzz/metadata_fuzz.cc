// Fuzz target: safetensors string metadata (as golden files and OpenFold exports carry it)
// through EvoformerConfig::from_metadata. Input: key NUL value NUL key NUL value ... (a missing
// last value is empty), so that any key and value bytes are reachable.
#include <map>

#include "foldcube/config.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text = fc::fuzz::as_string(data, size);
  std::map<std::string, std::string> md;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t k_end = text.find('\0', pos);
    if (k_end == std::string::npos) k_end = text.size();
    const std::string key = text.substr(pos, k_end - pos);
    std::string value;
    pos = k_end + 1;
    if (pos <= text.size()) {
      size_t v_end = text.find('\0', pos);
      if (v_end == std::string::npos) v_end = text.size();
      value = text.substr(pos, v_end - pos);
      pos = v_end + 1;
    }
    md[key] = value;
  }
  fc::EvoformerConfig cfg;
  const fc::Status st = fc::EvoformerConfig::from_metadata(md, &cfg);
  if (!st.ok()) {
    FUZZ_CHECK(fc::fuzz::one_line(st.message()));
    return 0;
  }
  FUZZ_CHECK(cfg.validate().ok());
  return 0;
}
