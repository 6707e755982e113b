#include "foldcube/memory.h"

#include <malloc.h>
#include <sys/resource.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>

#include "foldcube/status.h"

namespace fc {
namespace {
std::atomic<int64_t> g_live{0};
std::atomic<int64_t> g_peak{0};
std::atomic<int64_t> g_allocs{0};
std::atomic<bool> g_reuse_large_blocks{false};  // configure_allocator's reuse_large_blocks

// One slot per open MemoryScope: claimed by its constructor, `open` once its peak is set up.
// Allocations raise the peak of every open slot below g_slot_end (the highest slot ever claimed
// + 1), so the per-allocation cost is a scan of the slots in use, not a lock.
struct ScopeSlot {
  std::atomic<bool> claimed{false};
  std::atomic<bool> open{false};
  std::atomic<int64_t> peak{0};
};
ScopeSlot g_slots[MemoryScope::kMaxOpenScopes];
std::atomic<int> g_slot_end{0};

void raise(std::atomic<int64_t>& peak, int64_t live) {
  int64_t p = peak.load(std::memory_order_relaxed);
  while (live > p && !peak.compare_exchange_weak(p, live, std::memory_order_relaxed)) {
  }
}

void raise_peaks(int64_t live) {
  raise(g_peak, live);
  const int end = g_slot_end.load(std::memory_order_acquire);
  for (int i = 0; i < end; ++i)
    if (g_slots[i].open.load(std::memory_order_acquire)) raise(g_slots[i].peak, live);
}

size_t round_up(size_t n) {
  return (n + kTensorAlignment - 1) / kTensorAlignment * kTensorAlignment;
}
}  // namespace

void* try_tracked_alloc(size_t bytes) {
  if (bytes > SIZE_MAX - kTensorAlignment) return nullptr;
  void* p = std::aligned_alloc(kTensorAlignment, round_up(bytes == 0 ? 1 : bytes));
  if (p == nullptr) return nullptr;
  const int64_t live = g_live.fetch_add(static_cast<int64_t>(bytes)) + static_cast<int64_t>(bytes);
  g_allocs.fetch_add(1, std::memory_order_relaxed);
  raise_peaks(live);
  return p;
}

void* tracked_alloc(size_t bytes) {
  void* p = try_tracked_alloc(bytes);
  if (p == nullptr) {
    std::fprintf(stderr, "foldcube: out of memory allocating %zu bytes (live %lld bytes)\n", bytes,
                 static_cast<long long>(g_live.load()));
    std::abort();
  }
  return p;
}

void tracked_free(void* p, size_t bytes) {
  if (p == nullptr) return;
  std::free(p);
  g_live.fetch_sub(static_cast<int64_t>(bytes));
}

MemStats mem_stats() {
  MemStats s;
  s.live_bytes = g_live.load();
  s.peak_bytes = g_peak.load();
  s.total_allocs = g_allocs.load();
  return s;
}

int64_t peak_rss_bytes() {
  struct rusage ru {};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<int64_t>(ru.ru_maxrss) * 1024;  // Linux reports KiB
}

MemoryScope::MemoryScope() : start_live_(g_live.load()), slot_(-1) {
  for (int i = 0; i < kMaxOpenScopes && slot_ < 0; ++i) {
    bool free = false;
    if (g_slots[i].claimed.compare_exchange_strong(free, true)) slot_ = i;
  }
  FC_CHECK_MSG(slot_ >= 0, "more than MemoryScope::kMaxOpenScopes scopes open at once");
  ScopeSlot& s = g_slots[slot_];
  s.peak.store(start_live_);
  s.open.store(true, std::memory_order_release);
  int end = g_slot_end.load();
  while (end < slot_ + 1 && !g_slot_end.compare_exchange_weak(end, slot_ + 1)) {
  }
  raise(s.peak, g_live.load());  // allocations between the first load and `open`
}

MemoryScope::~MemoryScope() {
  g_slots[slot_].open.store(false, std::memory_order_release);
  g_slots[slot_].claimed.store(false, std::memory_order_release);
}

int64_t MemoryScope::peak() const { return g_slots[slot_].peak.load(); }

void configure_allocator(const AllocatorOptions& opts) {
  if (opts.reuse_large_blocks) {
    mallopt(M_MMAP_MAX, 0);
    mallopt(M_TRIM_THRESHOLD, -1);  // -1: never trim (glibc treats it as the largest size)
    g_reuse_large_blocks.store(true);
  }
}

double prefault_heap(int64_t bytes) {
  if (bytes <= 0 || !g_reuse_large_blocks.load()) return 0;
  const auto t0 = std::chrono::steady_clock::now();
  auto* p = static_cast<volatile char*>(std::malloc(static_cast<size_t>(bytes)));
  if (p == nullptr) return 0;
  constexpr int64_t kPage = 4096;
  for (int64_t i = 0; i < bytes; i += kPage) p[i] = 0;
  std::free(const_cast<char*>(p));
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace fc
