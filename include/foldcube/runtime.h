// Process-wide runtime settings.
#pragma once

namespace fc {

// Threads used by kernels (OpenMP and oneDNN). n <= 0 keeps the current setting.
void set_num_threads(int n);
int num_threads();

}  // namespace fc
