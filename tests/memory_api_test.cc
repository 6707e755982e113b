// The public memory-model API (include/foldcube/plan.h) validates its arguments: a bad query is a
// user error naming the argument, never an out-of-bounds read; a good one gives the unchecked
// model's bytes.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "foldcube/plan.h"
#include "plan/memory_model.h"
#include "test_util.h"

namespace fc {
namespace {

using R = Recompute;

MemoryQuery good_query() {
  MemoryQuery q;
  q.cfg = test::small_config();
  q.s = 6;
  q.r = 10;
  q.blocks = 3;
  q.policy = {R::kNone, R::kModule, R::kBlock};
  q.threads = 2;
  return q;
}

void expect_refused(const MemoryQuery& q, const std::string& what) {
  int64_t bytes = -1;
  std::vector<ModuleChunk> chunks;
  for (const Status& st :
       {stack_activation_bytes(q, &bytes), stack_step_peak_bytes(q, &bytes),
        block_activation_bytes(q, 0, &bytes), forward_peak_bytes(q, true, &bytes),
        forward_chunking(q, false, &chunks)}) {
    EXPECT_EQ(st.code(), Status::Code::kInvalidArgument) << what;
    EXPECT_NE(st.message().find(what), std::string::npos) << st.message();
  }
  EXPECT_EQ(bytes, -1);
}

TEST(MemoryModelApi, RefusesBadQueries) {
  MemoryQuery q = good_query();
  q.policy = {R::kNone, R::kModule};  // two policies for three blocks: read past the list before
  expect_refused(q, "2 recompute policies for 3 blocks");
  q = good_query();
  q.policy.push_back(R::kNone);
  expect_refused(q, "4 recompute policies");
  q = good_query();
  q.policy[1] = static_cast<R>(7);
  expect_refused(q, "unknown recompute policy");
  q = good_query();
  q.s = 0;
  expect_refused(q, "s and r");
  q = good_query();
  q.r = -4;
  expect_refused(q, "s and r");
  q = good_query();
  q.blocks = 0;
  q.policy.clear();
  expect_refused(q, "blocks");
  q = good_query();
  q.threads = 0;
  expect_refused(q, "threads");
  q = good_query();
  q.chunk = -1;
  expect_refused(q, "chunk");
  q = good_query();
  q.chunk_target_bytes = -5;
  expect_refused(q, "chunk");
  q = good_query();
  q.elem_bytes = 3;
  expect_refused(q, "elem_bytes");
  q = good_query();
  q.cfg.c_m = 0;
  expect_refused(q, "c_m");
  q = good_query();
  q.s = q.r = int64_t{1} << 40;
  expect_refused(q, "too large");
  int64_t bytes = 0;
  EXPECT_FALSE(block_activation_bytes(good_query(), 3, &bytes).ok());
  EXPECT_FALSE(block_activation_bytes(good_query(), -1, &bytes).ok());
  InferencePlan plan;
  EXPECT_FALSE(plan_inference(good_query().cfg, 0, 10, true, 0, int64_t{1} << 30, 1, &plan).ok());
  EXPECT_FALSE(plan_inference(good_query().cfg, 6, 10, true, -1, int64_t{1} << 30, 1, &plan).ok());
  EXPECT_FALSE(plan_inference(good_query().cfg, 6, 10, true, 0, int64_t{1} << 30, 0, &plan).ok());
}

TEST(MemoryModelApi, GoodQueriesMatchTheModel) {
  const MemoryQuery q = good_query();
  int64_t act = 0, peak = 0, fwd = 0, b1 = 0;
  ASSERT_TRUE(stack_activation_bytes(q, &act).ok());
  ASSERT_TRUE(stack_step_peak_bytes(q, &peak).ok());
  ASSERT_TRUE(forward_peak_bytes(q, true, &fwd).ok());
  ASSERT_TRUE(block_activation_bytes(q, 1, &b1).ok());
  EXPECT_EQ(act, stack_activation_bytes(q.cfg, q.s, q.r, 3, q.policy));
  EXPECT_EQ(peak, stack_step_peak_bytes(q.cfg, q.s, q.r, 3, q.policy, 2));
  EXPECT_EQ(fwd, forward_peak_bytes(q.cfg, q.s, q.r, true, 0, 0, 2));
  EXPECT_EQ(b1, block_activation_bytes(q.cfg, q.s, q.r, R::kModule));
  std::vector<ModuleChunk> chunks;
  ASSERT_TRUE(forward_chunking(q, false, &chunks).ok());
  EXPECT_EQ(chunks.size(), forward_chunking(q.cfg, q.s, q.r, 0, 0, 2).size());
  MemoryQuery one = q;  // one policy for every block, and none
  one.policy = {R::kBlock};
  ASSERT_TRUE(stack_activation_bytes(one, &act).ok());
  EXPECT_EQ(act, 3 * block_activation_bytes(q.cfg, q.s, q.r, R::kBlock));
  one.policy.clear();
  ASSERT_TRUE(stack_activation_bytes(one, &act).ok());
  EXPECT_EQ(act, 3 * block_activation_bytes(q.cfg, q.s, q.r, R::kNone));
}

}  // namespace
}  // namespace fc
