// Process-wide runtime settings.
#pragma once

#include <functional>

#include "foldcube/status.h"

namespace fc {

// Threads used by kernels (OpenMP and oneDNN). n <= 0 keeps the current setting.
void set_num_threads(int n);
int num_threads();

// CPU time (user + system) of the whole process so far, in milliseconds. On a shared machine the
// CPU time of a run is far less sensitive to other load than its wall time (OpenMP threads wait
// passively in tests and benchmarks), so benchmarks report both.
double process_cpu_ms();

// ---- Cooperative cancellation ------------------------------------------------------------------
// A long call checks the process-wide cancel flag between modules, blocks and stages
// (EvoformerStack::forward and ::train_step, ExtraMsaStack::forward, AlphaFold::forward, and
// everything built on them) and returns Status::Cancelled when it is set. Tensors the call updates
// in place (the stacks' m and z) are then partly updated. The flag stays set until
// clear_cancel(); one flag serves every thread.
void request_cancel();  // async-signal-safe
void clear_cancel();
bool cancel_requested();

// While a scope is open, SIGINT (Ctrl-C) sets the cancel flag instead of running the previous
// handler; the constructor clears the flag and the destructor restores the previous SIGINT
// action. For front ends (the CLI, the Python package) around one long call from one thread, run
// through run_shielded; scopes must not overlap in time. `notice` (a static string, may be null)
// is written to stderr on the first SIGINT; a second SIGINT in the scope runs the previous action
// (by default: the process ends at once).
class SigintCancelScope {
 public:
  explicit SigintCancelScope(const char* notice = nullptr);
  ~SigintCancelScope();
  SigintCancelScope(const SigintCancelScope&) = delete;
  SigintCancelScope& operator=(const SigintCancelScope&) = delete;
  bool interrupted() const;  // a SIGINT arrived while the scope was open

 private:
  bool installed_ = false;  // the previous action is kept by the library (one open scope)
};

// Runs fn on a helper thread that blocks asynchronous signals (its OpenMP threads inherit the
// mask) while the calling thread waits, and returns fn's status. No signal handler then ever runs
// on a thread inside a kernel: oneDNN's JIT kernels use the stack pointer as a data register, so
// a signal frame pushed there overwrites the heap (seen: Ctrl-C during a training step, then
// "corrupted size vs. prev_size"). The calling thread receives the signals instead, e.g. Ctrl-C
// under a SigintCancelScope, which stops fn at its next cancel check. fn runs with the caller's
// kernel thread count (num_threads()). One helper thread per calling thread, reused, joined when
// the calling thread exits; calls from one thread must not nest.
Status run_shielded(const std::function<Status()>& fn);

}  // namespace fc
