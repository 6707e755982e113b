// The process-wide cancel flag and the SIGINT scope of foldcube/runtime.h.
#include <signal.h>

#include <atomic>
#include <cstring>

#include "foldcube/runtime.h"
#include "foldcube/status.h"

namespace fc {
namespace {
std::atomic<bool> g_cancel{false};
std::atomic<bool> g_sigint{false};  // a SIGINT arrived while a scope was open
struct sigaction g_previous {};     // the SIGINT action before the open scope
static_assert(std::atomic<bool>::is_always_lock_free, "the signal handler needs a lock-free flag");

void on_sigint(int) {
  g_sigint.store(true, std::memory_order_relaxed);
  g_cancel.store(true, std::memory_order_relaxed);
}
}  // namespace

void request_cancel() { g_cancel.store(true, std::memory_order_relaxed); }
void clear_cancel() { g_cancel.store(false, std::memory_order_relaxed); }
bool cancel_requested() { return g_cancel.load(std::memory_order_relaxed); }

SigintCancelScope::SigintCancelScope() {
  g_sigint.store(false);
  clear_cancel();
  struct sigaction act {};
  act.sa_handler = on_sigint;
  sigemptyset(&act.sa_mask);
  installed_ = sigaction(SIGINT, &act, &g_previous) == 0;
}

SigintCancelScope::~SigintCancelScope() {
  if (installed_) sigaction(SIGINT, &g_previous, nullptr);
}

bool SigintCancelScope::interrupted() const { return g_sigint.load(); }

}  // namespace fc
