// --verify's bounds against ulps counted with nextafter, independently of UlpOf.
#include "client/bench/verify.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>

namespace lossd::bench {
namespace {

// `steps` float32 neighbours away from v.
double FloatSteps(double v, int steps) {
  float f = static_cast<float>(v);
  for (int i = 0; i < std::abs(steps); ++i) {
    f = std::nextafter(f, steps > 0 ? std::numeric_limits<float>::infinity()
                                    : -std::numeric_limits<float>::infinity());
  }
  return f;
}

TEST(VerifyTest, UlpOfMatchesNextafter) {
  for (double v : {1.0, 1.5, 3.0, 1e-3, 123456.0, 1e-40, 0.0}) {
    const float f = static_cast<float>(v);
    const double next = std::nextafter(std::fabs(f), std::numeric_limits<float>::infinity());
    EXPECT_EQ(UlpOf(ValueType::kFloat32, f), next - std::fabs(f)) << v;
    EXPECT_EQ(UlpOf(ValueType::kFloat64, v),
              std::nextafter(std::fabs(v), 1e308) - std::fabs(v)) << v;
  }
  EXPECT_EQ(UlpOf(ValueType::kFloat16, 1.0), 1.0 / 1024);
  EXPECT_EQ(UlpOf(ValueType::kFloat16, 0.0), std::ldexp(1.0, -24));
  EXPECT_EQ(UlpOf(ValueType::kBFloat16, 1.0), 1.0 / 128);
}

TEST(VerifyTest, Float32ElementsWithinFourUlps) {
  for (double ref : {0.6931471805599453, 4.14e-8, 17.000000041399, 1e-30}) {
    const double r32 = static_cast<float>(ref);
    EXPECT_TRUE(ElementWithinBound(ValueType::kFloat32, FloatSteps(r32, 4), ref, 0)) << ref;
    EXPECT_TRUE(ElementWithinBound(ValueType::kFloat32, FloatSteps(r32, -3), ref, 0)) << ref;
    EXPECT_FALSE(ElementWithinBound(ValueType::kFloat32, FloatSteps(r32, 6), ref, 0)) << ref;
  }
  // A cancelling gradient: bounded by the larger term, not by the tiny result.
  EXPECT_TRUE(ElementWithinBound(ValueType::kFloat32, 1e-7, 0.0, 0.5));
  EXPECT_FALSE(ElementWithinBound(ValueType::kFloat32, 1e-6, 0.0, 0.5));
}

TEST(VerifyTest, SpecialValuesMatchOnlyThemselves) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  EXPECT_TRUE(ElementWithinBound(ValueType::kFloat32, nan, nan, 0));
  EXPECT_FALSE(ElementWithinBound(ValueType::kFloat32, 1.0, nan, 0));
  EXPECT_FALSE(ElementWithinBound(ValueType::kFloat32, nan, 1.0, 0));
  EXPECT_TRUE(ElementWithinBound(ValueType::kFloat32, inf, inf, 0));
  EXPECT_FALSE(ElementWithinBound(ValueType::kFloat32, -inf, inf, 0));
  EXPECT_FALSE(ReducedWithinBound(ValueType::kFloat64, 3e38, inf));
}

TEST(VerifyTest, HalfFloat64AndReducedBounds) {
  // float16 at 1.0: one ulp is 2^-10.
  EXPECT_TRUE(ElementWithinBound(ValueType::kFloat16, 1.0 + 1.0 / 1024, 1.0, 0));
  EXPECT_FALSE(ElementWithinBound(ValueType::kFloat16, 1.0 + 2.0 / 1024, 1.0, 0));
  EXPECT_TRUE(ElementWithinBound(ValueType::kFloat64, 1.0 + 5e-14, 1.0, 0));
  EXPECT_FALSE(ElementWithinBound(ValueType::kFloat64, 1.0 + 5e-13, 1.0, 0));
  EXPECT_TRUE(ReducedWithinBound(ValueType::kFloat64, 1000.0009, 1000.0));
  EXPECT_FALSE(ReducedWithinBound(ValueType::kFloat64, 1000.002, 1000.0));
}

TEST(VerifyTest, GradTermScalesAtHandComputedPoints) {
  // x = 0: s = 0.5, sp = log 2.
  auto [gx, gy] = GradTermScale(0.0, 0.25, 2.0, 3.0);
  EXPECT_DOUBLE_EQ(gx, std::max(2 * 0.75 * 0.5, 2 * 3 * 0.25 * 0.5));
  EXPECT_DOUBLE_EQ(gy, 2 * 3 * std::log(2.0));
  auto [hx, hy] = GradTermScale(-20.0, 0.0, 1.0, 1.0);
  EXPECT_NEAR(hx, 1 / (1 + std::exp(20.0)), 1e-22);
  EXPECT_NEAR(hy, 20 + std::log1p(std::exp(-20.0)), 1e-12);
}

}  // namespace
}  // namespace lossd::bench
