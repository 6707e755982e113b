// Fuzz target: a plan JSON text (foldcube run --plan P.json, the plan cache) through
// Plan::from_json; an accepted plan is valid and survives its own to_json round trip.
#include "foldcube/planner.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text = fc::fuzz::as_string(data, size);
  fc::Plan plan;
  const fc::Status st = fc::Plan::from_json(text, &plan);
  if (!st.ok()) {
    FUZZ_CHECK(fc::fuzz::one_line(st.message()));
    return 0;
  }
  FUZZ_CHECK(plan.validate().ok());
  fc::Plan again;
  FUZZ_CHECK(fc::Plan::from_json(plan.to_json(), &again).ok());
  FUZZ_CHECK(again.to_json() == plan.to_json());
  return 0;
}
