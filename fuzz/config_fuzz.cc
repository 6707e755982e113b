// Fuzz target: a config JSON text (the --config file) through EvoformerConfig::update_from_json;
// an accepted, valid config must survive its own to_json round trip unchanged.
#include "foldcube/config.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text = fc::fuzz::as_string(data, size);
  fc::EvoformerConfig cfg;
  const fc::Status st = cfg.update_from_json(text);
  if (!st.ok()) {
    FUZZ_CHECK(fc::fuzz::one_line(st.message()));
    return 0;
  }
  if (!cfg.validate().ok()) return 0;
  fc::EvoformerConfig again;
  FUZZ_CHECK(again.update_from_json(cfg.to_json()).ok());
  FUZZ_CHECK(again.to_json() == cfg.to_json());
  return 0;
}
