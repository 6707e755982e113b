// The one tracking allocator. Every tensor byte goes through tracked_alloc/tracked_free, which
// keep the live and peak byte counts.
//
// Thread safety: every function here may be called from any thread at any time. Counts are
// process-wide: live bytes are all threads' tracked bytes; a MemoryScope's peak is the largest
// process-wide live count seen while it is open, whichever thread allocated. An allocation that
// races with a scope's construction may or may not count towards that scope's peak; every
// allocation that starts after the constructor returns counts.
#pragma once

#include <cstddef>
#include <cstdint>

namespace fc {

inline constexpr size_t kTensorAlignment = 64;

// 64-byte aligned; bytes==0 returns a valid unique pointer. Aborts with a message on OOM (for
// sizes the engine derives itself); use try_tracked_alloc where the size comes from a user.
void* tracked_alloc(size_t bytes);
void* try_tracked_alloc(size_t bytes);  // nullptr on failure
void tracked_free(void* p, size_t bytes);

struct MemStats {
  int64_t live_bytes = 0;  // bytes currently allocated
  int64_t peak_bytes = 0;  // max live bytes since process start
  int64_t total_allocs = 0;
};
MemStats mem_stats();

// Process peak resident set size (getrusage ru_maxrss), in bytes.
int64_t peak_rss_bytes();

// Scoped measurement: peak() is the max process-wide live bytes seen between construction and
// now. Each scope keeps its own peak: scopes may nest, overlap, and live on different threads
// (at most kMaxOpenScopes open at once; more is a bug and aborts), and may be destroyed on
// another thread than the one that made it. One scope object must not be destroyed while another
// thread calls its peak().
class MemoryScope {
 public:
  static constexpr int kMaxOpenScopes = 256;

  MemoryScope();
  ~MemoryScope();
  MemoryScope(const MemoryScope&) = delete;
  MemoryScope& operator=(const MemoryScope&) = delete;

  int64_t start_live() const { return start_live_; }
  int64_t peak() const;  // absolute peak of live bytes within the scope
  int64_t peak_above_start() const { return peak() - start_live_; }

 private:
  int64_t start_live_;
  int slot_;
};

// Process-wide allocator tuning. Nothing is changed when the library loads; a host program (the
// CLI does) opts in once, before the first large allocation.
struct AllocatorOptions {
  // glibc: serve large blocks from the heap (M_MMAP_MAX = 0) and never trim it
  // (M_TRIM_THRESHOLD = -1), so freed blocks are reused instead of each large tensor paying
  // first-touch page faults on a fresh mmap (measured: 3.3 s of system time in a 4.8 s training
  // step; 10 % of an inference pass). Peak RSS is unchanged; RSS does not shrink after the peak.
  bool reuse_large_blocks = false;
};
void configure_allocator(const AllocatorOptions& opts);
// With reuse_large_blocks configured: grows the heap to hold `bytes` more than it does and writes
// every new page once (an untracked block, freed at once), so that a step whose peak is `bytes`
// above the live bytes pays no first-touch page faults (about 0.5 ns per byte here: a
// one-time cost of the process, not of each step). Returns the milliseconds it took; 0 and
// nothing done without the option or for bytes <= 0 (or when the block cannot be had).
double prefault_heap(int64_t bytes);

}  // namespace fc
