#include "foldcube/memory.h"

#include <malloc.h>
#include <sys/resource.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>

namespace fc {
namespace {
std::atomic<int64_t> g_live{0};
std::atomic<int64_t> g_peak{0};
std::atomic<int64_t> g_allocs{0};

void raise_peak(int64_t live) {
  int64_t p = g_peak.load(std::memory_order_relaxed);
  while (live > p && !g_peak.compare_exchange_weak(p, live, std::memory_order_relaxed)) {
  }
}
size_t round_up(size_t n) {
  return (n + kTensorAlignment - 1) / kTensorAlignment * kTensorAlignment;
}

// Large tensors would each come from a fresh mmap and go back with munmap, so every reuse of the
// same shape pays first-touch page faults again (measured: 3.3 s of system time in a 4.8 s
// training step; 10 % of an inference pass). Serving them from the heap and never trimming it lets
// freed blocks be reused. Peak RSS is unchanged; RSS simply does not shrink after the peak.
struct HeapOnlyLargeBlocks {
  HeapOnlyLargeBlocks() {
    mallopt(M_MMAP_MAX, 0);
    mallopt(M_TRIM_THRESHOLD, -1);  // -1: never trim (glibc treats it as the largest size)
  }
} g_heap_only;
}  // namespace

void* try_tracked_alloc(size_t bytes) {
  void* p = std::aligned_alloc(kTensorAlignment, round_up(bytes == 0 ? 1 : bytes));
  if (p == nullptr) return nullptr;
  int64_t live = g_live.fetch_add(static_cast<int64_t>(bytes), std::memory_order_relaxed) +
                 static_cast<int64_t>(bytes);
  g_allocs.fetch_add(1, std::memory_order_relaxed);
  raise_peak(live);
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
  g_live.fetch_sub(static_cast<int64_t>(bytes), std::memory_order_relaxed);
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

MemoryScope::MemoryScope() : start_live_(g_live.load()), saved_outer_peak_(g_peak.load()) {
  g_peak.store(start_live_);
  raise_peak(g_live.load());
}

MemoryScope::~MemoryScope() { raise_peak(saved_outer_peak_); }

int64_t MemoryScope::peak() const { return g_peak.load(); }

}  // namespace fc
