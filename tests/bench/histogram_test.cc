// The histogram against exact order statistics of the same values (sorted vectors).
#include "client/bench/histogram.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

namespace lossd::bench {
namespace {

// The exact value at quantile q: the ceil(q * n)-th smallest (1-based), as Quantile defines it.
int64_t ExactQuantile(std::vector<int64_t> v, double q) {
  std::sort(v.begin(), v.end());
  const int64_t rank = std::max<int64_t>(1, static_cast<int64_t>(std::ceil(q * v.size())));
  return v[rank - 1];
}

TEST(HistogramTest, BucketsTileTheRangeWithoutGapsOrOverlap) {
  int64_t expect_low = 0;
  for (int i = 0; i < Histogram::NumBuckets(); ++i) {
    ASSERT_EQ(Histogram::BucketLow(i), expect_low) << "bucket " << i;
    ASSERT_GE(Histogram::BucketHigh(i), Histogram::BucketLow(i));
    ASSERT_EQ(Histogram::BucketIndex(Histogram::BucketLow(i)), i);
    ASSERT_EQ(Histogram::BucketIndex(Histogram::BucketHigh(i)), i);
    // Relative width: buckets of one value are exact; wider ones span at most
    // 2 / 2^kSubBucketBits of their smallest value.
    const double width = Histogram::BucketHigh(i) - Histogram::BucketLow(i) + 1;
    if (width > 1) {
      ASSERT_LE(width / Histogram::BucketLow(i), 2.0 / (1 << Histogram::kSubBucketBits) + 1e-12);
    }
    expect_low = Histogram::BucketHigh(i) + 1;
  }
  EXPECT_EQ(expect_low, Histogram::kMaxValue + 1);
}

TEST(HistogramTest, QuantilesWithinTheBucketResolutionOfExactOnes) {
  std::mt19937_64 rng(7);
  // Log-normal latencies around 200 us with a heavy tail, as a loaded server shows.
  std::lognormal_distribution<double> lat(std::log(2e5), 1.2);
  for (int n : {1, 2, 10, 999, 100000}) {
    Histogram h;
    std::vector<int64_t> values;
    for (int i = 0; i < n; ++i) {
      const int64_t v = static_cast<int64_t>(lat(rng));
      values.push_back(v);
      h.Record(v);
    }
    ASSERT_EQ(h.count(), n);
    EXPECT_EQ(h.min(), *std::min_element(values.begin(), values.end()));
    EXPECT_EQ(h.max(), *std::max_element(values.begin(), values.end()));
    for (double q : {0.0, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0}) {
      const int64_t exact = ExactQuantile(values, q);
      const int64_t got = h.Quantile(q);
      // The upper edge of the exact value's bucket (never below it, at most 0.8% above).
      EXPECT_GE(got, exact) << "n=" << n << " q=" << q;
      EXPECT_LE(got, exact + exact / 128 + 1) << "n=" << n << " q=" << q;
    }
  }
}

TEST(HistogramTest, MergeEqualsRecordingEverythingInOne) {
  std::mt19937_64 rng(3);
  std::uniform_int_distribution<int64_t> u(0, int64_t{1} << 34);
  Histogram a, b, all;
  for (int i = 0; i < 5000; ++i) {
    const int64_t v = u(rng);
    (i % 3 == 0 ? a : b).Record(v);
    all.Record(v);
  }
  a.Merge(b);
  EXPECT_EQ(a.count(), all.count());
  EXPECT_EQ(a.min(), all.min());
  EXPECT_EQ(a.max(), all.max());
  EXPECT_DOUBLE_EQ(a.mean(), all.mean());
  for (int i = 0; i < Histogram::NumBuckets(); ++i) {
    ASSERT_EQ(a.bucket_count(i), all.bucket_count(i));
  }
  Histogram empty;
  a.Merge(empty);
  EXPECT_EQ(a.count(), all.count());
}

TEST(HistogramTest, OutOfRangeValuesAreClampedAndCounted) {
  Histogram h;
  EXPECT_EQ(h.Quantile(0.5), 0);
  h.Record(-5);
  h.Record(Histogram::kMaxValue + 100);
  EXPECT_EQ(h.count(), 2);
  EXPECT_EQ(h.min(), 0);
  EXPECT_EQ(h.max(), Histogram::kMaxValue);
  EXPECT_EQ(h.saturated(), 1);
}

}  // namespace
}  // namespace lossd::bench
