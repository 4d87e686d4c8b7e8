// Arrival schedules against their definitions: exact times for a fixed rate, and the
// statistics of a Poisson process (mean gap, gap variance, counts per window) for Poisson.
#include "client/bench/schedule.h"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

namespace lossd::bench {
namespace {

TEST(ScheduleTest, FixedRateIsExactAndDoesNotDrift) {
  ArrivalSchedule s(ArrivalSchedule::Kind::kFixed, 3000.0, 1);
  int64_t prev = -1;
  for (int64_t i = 0; i < 3000000; ++i) {
    const int64_t t = s.Next();
    ASSERT_GT(t, prev);
    ASSERT_EQ(t, std::llround(i * 1e9 / 3000.0)) << i;
    prev = t;
  }
}

TEST(ScheduleTest, PoissonGapsHaveTheExponentialMeanAndVariance) {
  const double rate = 5000.0;
  ArrivalSchedule s(ArrivalSchedule::Kind::kPoisson, rate, 42);
  const int n = 200000;
  std::vector<double> gaps;
  int64_t prev = s.Next();
  EXPECT_EQ(prev, 0);
  for (int i = 0; i < n; ++i) {
    const int64_t t = s.Next();
    ASSERT_GE(t, prev);
    gaps.push_back(static_cast<double>(t - prev));
    prev = t;
  }
  double mean = 0;
  for (double g : gaps) mean += g;
  mean /= n;
  double var = 0;
  for (double g : gaps) var += (g - mean) * (g - mean);
  var /= n - 1;
  const double expect = 1e9 / rate;  // exponential: mean 1/rate, standard deviation 1/rate
  // 200k draws: the mean's standard error is expect / sqrt(n) = 0.22%; allow 5 of them.
  EXPECT_NEAR(mean, expect, 5 * expect / std::sqrt(n));
  EXPECT_NEAR(std::sqrt(var), expect, 0.02 * expect);
}

TEST(ScheduleTest, SameSeedSameScheduleOtherSeedOther) {
  ArrivalSchedule a(ArrivalSchedule::Kind::kPoisson, 100.0, 9);
  ArrivalSchedule b(ArrivalSchedule::Kind::kPoisson, 100.0, 9);
  ArrivalSchedule c(ArrivalSchedule::Kind::kPoisson, 100.0, 10);
  bool differs = false;
  for (int i = 0; i < 100; ++i) {
    const int64_t ta = a.Next();
    ASSERT_EQ(ta, b.Next());
    differs |= ta != c.Next();
  }
  EXPECT_TRUE(differs);
}

}  // namespace
}  // namespace lossd::bench
