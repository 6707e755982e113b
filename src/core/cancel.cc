// The process-wide cancel flag and the SIGINT scope of foldcube/runtime.h.
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <mutex>
#include <thread>

#include "foldcube/runtime.h"
#include "foldcube/status.h"

namespace fc {
namespace {
std::atomic<bool> g_cancel{false};
std::atomic<bool> g_sigint{false};  // a SIGINT arrived while a scope was open
struct sigaction g_previous {};     // the SIGINT action before the open scope
static_assert(std::atomic<bool>::is_always_lock_free, "the signal handler needs a lock-free flag");

// Written to stderr on the first SIGINT, may be null. Atomic: a handler still running on another
// thread may read it while the next scope sets it (TSan, Cancel.SigintDuringShieldedForwards...).
std::atomic<const char*> g_notice{nullptr};
static_assert(std::atomic<const char*>::is_always_lock_free, "read in the signal handler");

// The first SIGINT sets the flags; a second one restores the previous action and raises the
// signal again (for the CLI: the default action, the process ends at once).
void on_sigint(int) {
  if (g_sigint.load(std::memory_order_relaxed)) {
    sigaction(SIGINT, &g_previous, nullptr);
    raise(SIGINT);
    return;
  }
  g_sigint.store(true, std::memory_order_relaxed);
  g_cancel.store(true, std::memory_order_relaxed);
  if (const char* notice = g_notice.load(std::memory_order_relaxed)) {
    const ssize_t n = write(STDERR_FILENO, notice, std::strlen(notice));
    (void)n;
  }
}
}  // namespace

void request_cancel() { g_cancel.store(true, std::memory_order_relaxed); }
void clear_cancel() { g_cancel.store(false, std::memory_order_relaxed); }
bool cancel_requested() { return g_cancel.load(std::memory_order_relaxed); }

SigintCancelScope::SigintCancelScope(const char* notice) {
  g_sigint.store(false);
  clear_cancel();
  g_notice.store(notice, std::memory_order_relaxed);
  struct sigaction act {};
  act.sa_handler = on_sigint;
  act.sa_flags = SA_RESTART;  // reads and writes of the waiting thread resume after the handler
  sigemptyset(&act.sa_mask);
  installed_ = sigaction(SIGINT, &act, &g_previous) == 0;
}

SigintCancelScope::~SigintCancelScope() {
  if (installed_) sigaction(SIGINT, &g_previous, nullptr);
}

bool SigintCancelScope::interrupted() const { return g_sigint.load(); }

namespace {
// Signals a handler may catch: every one but the faults the code itself raises.
sigset_t catchable_signals() {
  sigset_t set;
  sigfillset(&set);
  for (int s : {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGABRT, SIGSYS}) sigdelset(&set, s);
  return set;
}

// The signal watcher: an idle thread that blocks no signal. While run_shielded blocks the
// caller's signals, a process-directed signal (the terminal's Ctrl-C, kill's SIGTERM, mpirun
// stopping a job) is delivered here: a handler runs on a thread that is never inside a kernel,
// and a default action (ending the process) still happens. Started once per process (and again
// in a forked child, which inherits only the forking thread).
std::once_flag* g_watcher_once = new std::once_flag;

void start_watcher() {
  sigset_t none, old;
  sigemptyset(&none);
  pthread_sigmask(SIG_SETMASK, &none, &old);  // the new thread inherits this mask
  std::thread([] {
    for (;;) pause();
  }).detach();
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
  pthread_atfork(nullptr, nullptr, [] { g_watcher_once = new std::once_flag; });
}

// The largest OpenMP team of the calling thread whose threads are known to block signals.
thread_local int t_masked_team = 1;

// Blocks the catchable signals on every thread of an n-thread OpenMP team of the caller. Threads
// the runtime starts while the caller blocks them inherit the mask; this covers pool threads
// started earlier by an unmasked region of the same caller.
void mask_team(const sigset_t& set, int n) {
  if (n <= t_masked_team) return;
#pragma omp parallel num_threads(n)
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  t_masked_team = n;
}
}  // namespace

Status run_shielded(const std::function<Status()>& fn) {
  std::call_once(*g_watcher_once, start_watcher);
  const sigset_t set = catchable_signals();
  // Restores the caller's mask however fn ends (an exception included); signals that arrived for
  // this thread run then.
  struct MaskGuard {
    sigset_t old;
    ~MaskGuard() { pthread_sigmask(SIG_SETMASK, &old, nullptr); }
  } guard;
  pthread_sigmask(SIG_BLOCK, &set, &guard.old);
  mask_team(set, num_threads());
  return fn();
}

}  // namespace fc
