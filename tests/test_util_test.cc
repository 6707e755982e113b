// The test helpers themselves: comparisons must fail on non-finite values.
#include "test_util.h"

#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <vector>

namespace fc {
namespace {

constexpr double kNan = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

TEST(TestUtil, GoldenErrRejectsNonFinite) {
  const Tensor ref = Tensor::full({3, 4}, 0.5f);
  for (double bad : {kNan, kInf, -kInf}) {
    const Tensor all_bad = Tensor::full({3, 4}, static_cast<float>(bad));
    EXPECT_FALSE(test::golden_err(all_bad, ref) < 1e-4) << bad;
    EXPECT_FALSE(test::golden_err(ref, all_bad) < 1e-4) << bad;
    Tensor one_bad = ref.clone();
    one_bad.f32()[5] = static_cast<float>(bad);
    EXPECT_FALSE(test::golden_err(one_bad, ref) < 1e-4) << bad;
    EXPECT_FALSE(test::golden_err(one_bad, one_bad) < 1e-4) << bad;
  }
  EXPECT_EQ(test::golden_err(ref, ref.clone()), 0.0);
}

TEST(TestUtil, MaxHelpersKeepNonFinite) {
  EXPECT_TRUE(std::isnan(test::max_nan(0.0, kNan)));
  EXPECT_TRUE(std::isnan(test::max_nan(kNan, 1.0)));
  EXPECT_EQ(test::max_nan(1.0, 2.0), 2.0);
  const std::vector<float> a = {1.f, 2.f, 3.f}, nan = {1.f, NAN, 3.f}, inf = {1.f, 2.f, INFINITY};
  EXPECT_EQ(test::max_abs_diff(a.data(), a.data(), 3), 0.0);
  EXPECT_FALSE(test::max_abs_diff(nan.data(), a.data(), 3) < 1e-4);
  EXPECT_FALSE(test::max_abs_diff(a.data(), inf.data(), 3) < 1e-4);
  EXPECT_FALSE(test::max_abs_diff(inf.data(), inf.data(), 3) < 1e-4);
  EXPECT_TRUE(test::all_finite(Tensor::full({2}, 1.f)));
  EXPECT_FALSE(test::all_finite(Tensor::full({2}, NAN)));
}

TEST(TestUtil, TempDirsAreUniqueAndRemoved) {
  std::string kept;
  {
    const test::TempDir a, b;
    EXPECT_NE(a.path(), b.path());
    std::ofstream(a.file("x.txt")) << "x";
    EXPECT_TRUE(std::filesystem::exists(a.file("x.txt")));
    kept = a.path();
  }
  EXPECT_FALSE(std::filesystem::exists(kept));
  EXPECT_EQ(test::temp_file("f"), test::temp_file("f"));  // one directory per process
}

}  // namespace
}  // namespace fc
