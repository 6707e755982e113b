// Fuzz target: a device profile JSON text (plan --profile P.json, the calibration cache) through
// DeviceProfile::from_json; an accepted profile is valid and survives its to_json round trip.
#include "foldcube/planner.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text = fc::fuzz::as_string(data, size);
  fc::DeviceProfile p;
  const fc::Status st = fc::DeviceProfile::from_json(text, &p);
  if (!st.ok()) {
    FUZZ_CHECK(fc::fuzz::one_line(st.message()));
    return 0;
  }
  FUZZ_CHECK(p.validate().ok());
  fc::DeviceProfile again;
  FUZZ_CHECK(fc::DeviceProfile::from_json(p.to_json(), &again).ok());
  FUZZ_CHECK(again.to_json() == p.to_json());
  return 0;
}
