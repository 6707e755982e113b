// Process-wide runtime settings.
#pragma once

namespace fc {

// Threads used by kernels (OpenMP and oneDNN). n <= 0 keeps the current setting.
void set_num_threads(int n);
int num_threads();

// CPU time (user + system) of the whole process so far, in milliseconds. On a shared machine the
// CPU time of a run is far less sensitive to other load than its wall time (OpenMP threads wait
// passively in tests and benchmarks), so benchmarks report both.
double process_cpu_ms();

}  // namespace fc
