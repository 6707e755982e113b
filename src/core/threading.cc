#include <omp.h>
#include <sys/resource.h>

#include "foldcube/runtime.h"

namespace fc {

void set_num_threads(int n) {
  if (n > 0) omp_set_num_threads(n);
  omp_set_max_active_levels(1);  // kernels called inside a parallel region run serially
}

int num_threads() { return omp_get_max_threads(); }

double process_cpu_ms() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  auto ms = [](const timeval& t) { return t.tv_sec * 1e3 + t.tv_usec / 1e3; };
  return ms(u.ru_utime) + ms(u.ru_stime);
}

}  // namespace fc
