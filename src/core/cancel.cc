// The process-wide cancel flag and the SIGINT scope of foldcube/runtime.h.
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <memory>
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

const char* g_notice = nullptr;  // written to stderr on the first SIGINT, may be null

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
  if (g_notice != nullptr) {
    const ssize_t n = write(STDERR_FILENO, g_notice, std::strlen(g_notice));
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
  g_notice = notice;
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
// The helper thread of run_shielded: takes one task at a time from its owner thread.
class ShieldedWorker {
 public:
  ShieldedWorker() {
    // Every signal a handler may catch is blocked in the helper (and so in the OpenMP threads
    // it starts); faults raised by the code itself stay deliverable.
    sigset_t all, old;
    sigfillset(&all);
    for (int s : {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGABRT, SIGSYS}) sigdelset(&all, s);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    thread_ = std::thread([this] { loop(); });
    pthread_sigmask(SIG_SETMASK, &old, nullptr);
  }
  ~ShieldedWorker() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_.store(true);
    }
    cv_.notify_all();
    thread_.join();
  }

  // Hands fn to the helper and waits for it. Both sides first poll the atomic phase for up to
  // kPoll, yielding the core on every poll (so a loaded machine loses nothing), before sleeping on
  // the condition variable: a short call then skips two futex wake-ups, which cost ~30-90 us on
  // an idle machine (docs/python.md, "Overhead").
  Status run(const std::function<Status()>& fn, int threads) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      task_ = &fn;
      threads_ = threads;
      phase_.store(kTask, std::memory_order_release);
    }
    cv_.notify_all();
    poll_until(kDone);
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return phase_.load(std::memory_order_acquire) == kDone; });
    phase_.store(kIdle, std::memory_order_relaxed);
    return std::move(result_);
  }

 private:
  enum : int { kIdle = 0, kTask = 1, kDone = 2 };
  static constexpr std::chrono::microseconds kPoll{200};

  // Returns when phase_ is `want` (or stop_), or after kPoll; the caller then sleeps if needed.
  void poll_until(int want) const {
    const auto end = std::chrono::steady_clock::now() + kPoll;
    while (phase_.load(std::memory_order_acquire) != want && !stop_.load() &&
           std::chrono::steady_clock::now() < end)
      std::this_thread::yield();
  }

  void loop() {
    for (;;) {
      poll_until(kTask);
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return stop_.load() || phase_.load() == kTask; });
      if (stop_.load()) return;
      const std::function<Status()>* fn = task_;
      const int threads = threads_;
      lock.unlock();
      set_num_threads(threads);
      Status st = (*fn)();
      lock.lock();
      result_ = std::move(st);
      task_ = nullptr;
      phase_.store(kDone, std::memory_order_release);
      lock.unlock();
      cv_.notify_all();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<int> phase_{kIdle};  // kIdle -> kTask (owner) -> kDone (helper) -> kIdle (owner)
  std::atomic<bool> stop_{false};
  const std::function<Status()>* task_ = nullptr;  // guarded by mu_
  int threads_ = 1;                                // guarded by mu_
  Status result_;                                  // guarded by mu_
  std::thread thread_;
};
}  // namespace

Status run_shielded(const std::function<Status()>& fn) {
  thread_local std::unique_ptr<ShieldedWorker> worker;
  if (!worker) worker = std::make_unique<ShieldedWorker>();
  return worker->run(fn, num_threads());
}

}  // namespace fc
