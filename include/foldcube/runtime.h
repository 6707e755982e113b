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

// Runs fn on the calling thread with every asynchronous signal blocked there and on its OpenMP
// team, and returns fn's status. No signal handler then ever runs on a thread inside a kernel:
// oneDNN's JIT kernels use the stack pointer as a data register, so a signal frame pushed there
// overwrites the heap (seen: Ctrl-C during a training step, then "corrupted size vs. prev_size").
// Process-directed signals (the terminal's Ctrl-C, SIGTERM) are taken meanwhile by an idle
// watcher thread (started on first use) that blocks none: Ctrl-C under a SigintCancelScope stops
// fn at its next cancel check, SIGTERM still ends the process; signals directed at the calling
// thread itself wait until fn returns. A kernel
// team's threads must be started inside run_shielded, or by the same calling thread (the mask is
// then set on them on first use of that team size). Calls may nest.
Status run_shielded(const std::function<Status()>& fn);

}  // namespace fc
