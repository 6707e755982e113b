// The tracking allocator's contracts (foldcube/memory.h): per-scope peaks that nest, overlap and
// live on several threads; checked allocation for user-given sizes; explicit allocator tuning.
#include <gtest/gtest.h>

#include <atomic>
#include <barrier>
#include <thread>
#include <vector>

#include "foldcube/memory.h"
#include "foldcube/tensor.h"

#if defined(__SANITIZE_ADDRESS__)
#define FC_TEST_ASAN 1  // ASan aborts on a huge allocation instead of returning null
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FC_TEST_ASAN 1
#endif
#endif

namespace fc {
namespace {

constexpr size_t kMiB = size_t{1} << 20;

// A scope opened after a large block was freed measures its own (smaller) peak, and opening it
// does not lower the peak of a scope that is still open (the old global-reset scopes did).
TEST(MemoryScope, OverlappingScopesKeepTheirOwnPeaks) {
  auto outer = std::make_unique<MemoryScope>();
  void* big = tracked_alloc(8 * kMiB);
  tracked_free(big, 8 * kMiB);
  const int64_t outer_peak = outer->peak();
  EXPECT_GE(outer_peak, outer->start_live() + static_cast<int64_t>(8 * kMiB));
  {
    MemoryScope inner;
    void* small = tracked_alloc(kMiB);
    EXPECT_EQ(inner.peak_above_start(), static_cast<int64_t>(kMiB));
    EXPECT_EQ(outer->peak(), outer_peak);  // untouched by the inner scope
    tracked_free(small, kMiB);
  }
  EXPECT_EQ(outer->peak(), outer_peak);
  // A scope that outlives the one opened before it (not nested).
  auto later = std::make_unique<MemoryScope>();
  outer.reset();
  void* p = tracked_alloc(2 * kMiB);
  EXPECT_GE(later->peak_above_start(), static_cast<int64_t>(2 * kMiB));
  tracked_free(p, 2 * kMiB);
}

// Threads each open a scope, allocate at once (a barrier holds every block live), read their
// peak and free: every scope saw the blocks of all threads (live bytes are process-wide), and
// repeated rounds with scopes opening and closing concurrently never corrupt the counts.
TEST(MemoryScope, ConcurrentScopesOnThreads) {
  constexpr int kThreads = 8, kRounds = 50;
  const int64_t live0 = mem_stats().live_bytes;
  std::barrier sync(kThreads);
  std::atomic<int> failures{0};
  auto worker = [&](int t) {
    const size_t bytes = (t + 1) * 64 * 1024;
    for (int round = 0; round < kRounds; ++round) {
      MemoryScope scope;
      sync.arrive_and_wait();  // every scope is open before any block exists
      void* p = tracked_alloc(bytes);
      sync.arrive_and_wait();  // every block is live
      const int64_t all = static_cast<int64_t>(kThreads * (kThreads + 1) / 2 * 64 * 1024);
      if (scope.peak() < live0 + all) failures.fetch_add(1);
      sync.arrive_and_wait();
      tracked_free(p, bytes);
      MemoryScope nested;  // opened and closed while other threads free
      if (nested.peak() < nested.start_live()) failures.fetch_add(1);
    }
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) threads.emplace_back(worker, t);
  for (std::thread& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(mem_stats().live_bytes, live0);
}

TEST(MemoryScope, ProcessPeakIsNeverReset) {
  void* p = tracked_alloc(4 * kMiB);
  tracked_free(p, 4 * kMiB);
  const int64_t peak = mem_stats().peak_bytes;
  { MemoryScope scope; }
  EXPECT_EQ(mem_stats().peak_bytes, peak);
}

// Sizes from files and flags go through Tensor::try_empty: absurd sizes are a Status, never an
// abort.
TEST(CheckedAllocation, AbsurdSizesAreOutOfMemory) {
  Tensor t;
  Status st = Tensor::try_empty({int64_t{1} << 40, int64_t{1} << 40}, DType::F32, "input.m", &t);
  EXPECT_EQ(st.code(), Status::Code::kOutOfMemory) << st.ToString();
  EXPECT_NE(st.message().find("input.m"), std::string::npos) << st.message();
  EXPECT_FALSE(t.defined());
  st = Tensor::try_empty({-1, 3}, DType::F32, "x", &t);
  EXPECT_EQ(st.code(), Status::Code::kInvalidArgument);
#ifndef FC_TEST_ASAN
  const int64_t live = mem_stats().live_bytes;
  st = Tensor::try_zeros({int64_t{1} << 20, int64_t{1} << 20, 256}, DType::F32, "input.m", &t);
  EXPECT_EQ(st.code(), Status::Code::kOutOfMemory) << st.ToString();  // 1 PiB
  EXPECT_EQ(mem_stats().live_bytes, live);
#endif
  ASSERT_TRUE(Tensor::try_zeros({3, 5}, DType::F32, "y", &t).ok());
  EXPECT_EQ(t.shape(), (Shape{3, 5}));
  for (int i = 0; i < 15; ++i) EXPECT_EQ(t.f32()[i], 0.f);
}

TEST(Allocator, TuningIsExplicitAndRepeatable) {
  configure_allocator({});
  configure_allocator({.reuse_large_blocks = true});
  void* p = tracked_alloc(64 * kMiB);  // served from the heap now; still tracked
  EXPECT_GE(mem_stats().live_bytes, static_cast<int64_t>(64 * kMiB));
  tracked_free(p, 64 * kMiB);
}

}  // namespace
}  // namespace fc
