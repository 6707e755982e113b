// The one tracking allocator. Every tensor byte goes through tracked_alloc/tracked_free, which
// keep the live and peak byte counts. Thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>

namespace fc {

inline constexpr size_t kTensorAlignment = 64;

// 64-byte aligned; bytes==0 returns a valid unique pointer. Aborts with a message on OOM;
// use try_tracked_alloc where the caller can report a clean error.
void* tracked_alloc(size_t bytes);
void* try_tracked_alloc(size_t bytes);  // nullptr on failure
void tracked_free(void* p, size_t bytes);

struct MemStats {
  int64_t live_bytes = 0;  // bytes currently allocated
  int64_t peak_bytes = 0;  // max live bytes since process start or the innermost open scope
  int64_t total_allocs = 0;
};
MemStats mem_stats();

// Process peak resident set size (getrusage ru_maxrss), in bytes.
int64_t peak_rss_bytes();

// Scoped measurement: peak() is the max live bytes seen between construction and now.
// Scopes nest; closing an inner scope folds its peak into the enclosing one.
class MemoryScope {
 public:
  MemoryScope();
  ~MemoryScope();
  MemoryScope(const MemoryScope&) = delete;
  MemoryScope& operator=(const MemoryScope&) = delete;

  int64_t start_live() const { return start_live_; }
  int64_t peak() const;  // absolute peak of live bytes within the scope
  int64_t peak_above_start() const { return peak() - start_live_; }

 private:
  int64_t start_live_;
  int64_t saved_outer_peak_;
};

}  // namespace fc
