// Fuzz target: a measured-row table (`foldcube profile fit --table T.csv`) through
// parse_fit_table; errors are one line naming the table, accepted rows keep the documented ranges.
#include <cmath>

#include "fuzz_util.h"
#include "plan/profile_fit.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text = fc::fuzz::as_string(data, size);
  std::vector<fc::FitRow> rows;
  const fc::Status st = fc::parse_fit_table(text, "t.csv", &rows);
  if (!st.ok()) {
    FUZZ_CHECK(fc::fuzz::one_line(st.message()));
    FUZZ_CHECK(st.message().rfind("t.csv", 0) == 0);
    return 0;
  }
  FUZZ_CHECK(!rows.empty());
  for (const fc::FitRow& w : rows) {
    FUZZ_CHECK(w.s >= 1 && w.s <= (1 << 20) && w.r >= 1 && w.r <= (1 << 20));
    FUZZ_CHECK(w.blocks >= 1 && w.blocks <= 1024 && w.devices >= 1 && w.devices <= 4096);
    FUZZ_CHECK(w.dap == 0 || (w.dap <= w.devices && w.devices % w.dap == 0));
    for (const auto& m : {w.time_ms, w.peak_mb, w.activation_mb})
      FUZZ_CHECK(!m || (std::isfinite(*m) && *m >= 0 && *m < 1e12));
    FUZZ_CHECK(w.threads >= 0 && w.threads <= 4096);
    if (!w.policy_counts.empty()) {  // a mix counts every block of a training row with a dap
      int64_t total = 0;
      for (const auto& pc : w.policy_counts) total += pc.second;
      FUZZ_CHECK(total == w.blocks && w.train && w.dap > 0 && !w.policy);
    }
  }
  return 0;
}
