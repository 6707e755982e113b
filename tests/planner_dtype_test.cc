// The planner's precision is a DType (F32 / BF16 / F16); JSON keeps the strings "fp32", "bf16",
// "fp16", so saved plans and profiles read the same.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <string>

#include "foldcube/planner.h"
#include "test_util.h"

namespace fc {
namespace {

const char* kProfile = R"({"name": "p", "gemm_gflops": 400, "gemm_bwd_gflops": 300,
  "batched_gflops": 250, "attention_gflops": 250, "attention_bwd_gflops": 150, "mem_gbps": 15,
  "memory_bytes": 8000000000, "dtype": "%s"})";

std::string profile_json(const std::string& dtype) {
  std::string s = kProfile;
  return s.replace(s.find("%s"), 2, dtype);
}

TEST(PlannerDtype, NamesAndBytes) {
  for (const auto& [t, name, bytes] :
       {std::tuple{DType::F32, "fp32", 4}, std::tuple{DType::BF16, "bf16", 2},
        std::tuple{DType::F16, "fp16", 2}}) {
    EXPECT_STREQ(plan_dtype_name(t), name);
    EXPECT_EQ(dtype_bytes(t), bytes);
    DType parsed = DType::F64;
    ASSERT_TRUE(parse_plan_dtype(name, &parsed).ok());
    EXPECT_EQ(parsed, t);
    EXPECT_TRUE(check_plan_dtype(t).ok());
  }
  DType t;
  EXPECT_FALSE(parse_plan_dtype("F32", &t).ok());
  EXPECT_FALSE(parse_plan_dtype("fp64", &t).ok());
  EXPECT_FALSE(check_plan_dtype(DType::F64).ok());
}

TEST(PlannerDtype, ProfileAndPlanJsonKeepTheStrings) {
  DeviceProfile p;
  ASSERT_TRUE(DeviceProfile::from_json(profile_json("fp16"), &p).ok());
  EXPECT_EQ(p.dtype, DType::F16);
  EXPECT_EQ(nlohmann::json::parse(p.to_json())["dtype"], "fp16");
  const Status bad = DeviceProfile::from_json(profile_json("int8"), &p);
  EXPECT_FALSE(bad.ok());
  EXPECT_NE(bad.message().find("int8"), std::string::npos) << bad.message();

  ASSERT_TRUE(DeviceProfile::from_json(profile_json("fp32"), &p).ok());
  PlanRequest q;
  q.cfg = test::small_config();
  q.cfg.no_blocks = 2;
  q.s = 8;
  q.r = 16;
  q.profile = p;
  q.dtype = DType::BF16;  // overrides the profile's
  Plan plan;
  ASSERT_TRUE(make_plan(q, &plan).ok());
  EXPECT_EQ(plan.dtype, DType::BF16);
  const std::string text = plan.to_json();
  EXPECT_EQ(nlohmann::json::parse(text)["dtype"], "bf16");
  Plan back;
  ASSERT_TRUE(Plan::from_json(text, &back).ok());
  EXPECT_EQ(back.dtype, DType::BF16);
  q.dtype.reset();  // the profile's
  ASSERT_TRUE(make_plan(q, &plan).ok());
  EXPECT_EQ(plan.dtype, DType::F32);
  std::string edited = text;
  edited.replace(edited.find("\"bf16\""), 6, "\"bf17\"");
  EXPECT_FALSE(Plan::from_json(edited, &back).ok());
}

}  // namespace
}  // namespace fc
