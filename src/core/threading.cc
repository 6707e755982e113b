#include <omp.h>

#include "foldcube/runtime.h"

namespace fc {

void set_num_threads(int n) {
  if (n > 0) omp_set_num_threads(n);
  omp_set_max_active_levels(1);  // kernels called inside a parallel region run serially
}

int num_threads() { return omp_get_max_threads(); }

}  // namespace fc
