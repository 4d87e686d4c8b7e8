// lossd-bench's per-interval time series (client/bench/timeseries.h) and how a row reports it
// (report.h: intervals, latency_histogram_us).
#include "client/bench/timeseries.h"

#include <gtest/gtest.h>

#include <string>

#include "client/bench/report.h"

namespace lossd::bench {
namespace {

constexpr int64_t kSec = 1'000'000'000;

TEST(IntervalSeriesTest, CountsEachIntervalByEndTime) {
  IntervalSeries s;
  for (int i = 0; i < 100; ++i) s.Record(kSec / 2, 0, 1000 + i);  // interval 0
  for (int i = 0; i < 40; ++i) s.Record(kSec + i, 0, 5000);        // interval 1
  s.Record(kSec + 10, 14, 0);                                      // a failure in interval 1
  s.Record(3 * kSec + 1, 0, 2'000'000);                            // interval 3 (2 stays empty)
  s.set_seconds(4.0);
  const auto p = s.Points();
  ASSERT_EQ(p.size(), 4u);
  EXPECT_EQ(p[0].ok, 100);
  EXPECT_EQ(p[0].errors, 0);
  EXPECT_DOUBLE_EQ(p[0].start_s, 0);
  EXPECT_DOUBLE_EQ(p[0].seconds, 1);
  EXPECT_DOUBLE_EQ(p[0].qps, 100);
  EXPECT_NEAR(p[0].p50_us, 1.05, 0.05);
  EXPECT_NEAR(p[0].p99_us, 1.099, 0.04);
  EXPECT_EQ(p[1].ok, 40);
  EXPECT_EQ(p[1].errors, 1);
  EXPECT_NEAR(p[1].p99_us, 5.0, 5.0 * 0.032);
  EXPECT_EQ(p[2].ok, 0);
  EXPECT_EQ(p[2].p99_us, 0);
  EXPECT_EQ(p[3].ok, 1);
  EXPECT_DOUBLE_EQ(p[3].start_s, 3);
  EXPECT_DOUBLE_EQ(p[3].p99_us, 2000);  // capped at the interval's exact max
  EXPECT_DOUBLE_EQ(p[3].max_us, 2000);
}

TEST(IntervalSeriesTest, QuantilesWithinThreePercent) {
  IntervalSeries s;
  for (int64_t v = 1; v <= 100000; ++v) s.Record(0, 0, v * 997);
  const auto p = s.Points();
  ASSERT_EQ(p.size(), 1u);
  EXPECT_NEAR(p[0].p50_us, 50000 * 0.997, 50000 * 0.997 * 0.032);
  EXPECT_NEAR(p[0].p99_us, 99000 * 0.997, 99000 * 0.997 * 0.032);
  EXPECT_GE(p[0].p99_us, 99000 * 0.997);  // the bucket's upper edge
}

TEST(IntervalSeriesTest, ShortLastIntervalJoinsThePreviousOne) {
  IntervalSeries s;
  for (int i = 0; i < 10; ++i) s.Record(i * kSec / 10, 0, 100);
  for (int i = 0; i < 10; ++i) s.Record(kSec + i * kSec / 10, 0, 100);
  s.Record(2 * kSec + 1000, 0, 100);  // a straggler just after a 2 s window
  s.set_seconds(2.000001);
  const auto p = s.Points();
  ASSERT_EQ(p.size(), 2u);
  EXPECT_EQ(p[1].ok, 11);
  EXPECT_NEAR(p[1].seconds, 1.000001, 1e-9);
  EXPECT_NEAR(p[1].qps, 11 / 1.000001, 1e-6);
  // A last interval of at least half the width stays on its own, with its own length.
  IntervalSeries t;
  t.Record(0, 0, 100);
  t.Record(kSec + kSec / 2, 0, 100);
  t.set_seconds(1.75);
  const auto q = t.Points();
  ASSERT_EQ(q.size(), 2u);
  EXPECT_DOUBLE_EQ(q[1].seconds, 0.75);
  EXPECT_DOUBLE_EQ(q[1].qps, 1 / 0.75);
}

TEST(IntervalSeriesTest, MemoryIsBoundedByCoarsening) {
  IntervalSeries s(kSec, 8);
  for (int64_t t = 0; t < 20; ++t) s.Record(t * kSec, 0, 1000);
  EXPECT_LE(s.size(), 8);
  EXPECT_EQ(s.width_ns(), 4 * kSec);  // 1 s -> 2 s (8..15) -> 4 s (16..19)
  s.set_seconds(20);
  const auto p = s.Points();
  ASSERT_EQ(p.size(), 5u);
  int64_t total = 0;
  for (const auto& x : p) total += x.ok;
  EXPECT_EQ(total, 20);
  EXPECT_EQ(p[0].ok, 4);
  EXPECT_DOUBLE_EQ(p[4].start_s, 16);
  EXPECT_DOUBLE_EQ(p[4].qps, 1.0);
}

TEST(IntervalSeriesTest, MergeAddsSeriesOfDifferentWidths) {
  // `a` kept 1 s intervals; `b` saw a call at 9.5 s with at most 4 intervals: width 4 s.
  IntervalSeries a(kSec, 4), b(kSec, 4);
  a.Record(kSec / 2, 0, 1000);
  a.Record(kSec + 1, 0, 3000);
  a.Record(kSec + 2, 14, 0);
  b.Record(kSec / 4, 0, 2000);
  b.Record(9 * kSec + kSec / 2, 0, 7000);
  ASSERT_EQ(b.width_ns(), 4 * kSec);
  IntervalSeries merged = a;
  merged.Merge(b);
  EXPECT_EQ(merged.width_ns(), 4 * kSec);
  a.Merge(IntervalSeries(kSec, 4));  // an empty series changes nothing
  EXPECT_EQ(a.width_ns(), kSec);
  EXPECT_EQ(a.size(), 2);
  merged.set_seconds(10.0);
  const auto p = merged.Points();
  ASSERT_EQ(p.size(), 3u);
  EXPECT_EQ(p[0].ok, 3);  // [0, 4 s): 1000, 3000 and 2000 ns
  EXPECT_EQ(p[0].errors, 1);
  EXPECT_DOUBLE_EQ(p[0].max_us, 3);
  EXPECT_EQ(p[1].ok, 0);
  EXPECT_EQ(p[2].ok, 1);  // [8 s, 10 s)
  EXPECT_DOUBLE_EQ(p[2].max_us, 7);
}

TEST(IntervalSeriesTest, RowReportsIntervalsOfEveryRoundAndTheHistogram) {
  RunStats a, b;
  for (int i = 0; i < 30; ++i) a.Record(0, 1000);
  a.seconds = 2;
  a.series.emplace_back();
  for (int i = 0; i < 30; ++i) a.series.back().Record(i * kSec / 15, 0, 1000);
  a.series.back().set_seconds(2);
  for (int i = 0; i < 10; ++i) b.Record(0, 3000);
  b.seconds = 1;
  b.series.emplace_back();
  for (int i = 0; i < 10; ++i) b.series.back().Record(i * kSec / 10, 0, 3000);
  b.series.back().set_seconds(1);
  a.Merge(b);
  ASSERT_EQ(a.series.size(), 2u);
  const RowSummary r = Summarize({"lossd", "closed", 2, 0, 2}, a);
  ASSERT_EQ(r.intervals.size(), 3u);
  EXPECT_EQ(r.intervals[0].round, 1);
  EXPECT_EQ(r.intervals[2].round, 2);
  EXPECT_DOUBLE_EQ(r.intervals[2].t_s, 2);  // round 2 follows round 1 on the time axis
  EXPECT_EQ(r.intervals[0].point.ok + r.intervals[1].point.ok, 30);
  EXPECT_EQ(r.intervals[2].point.ok, 10);
  ASSERT_EQ(r.latency_buckets.size(), 2u);
  EXPECT_EQ(r.latency_buckets[0].count, 30);
  EXPECT_LE(r.latency_buckets[0].low_us, 1.0);
  EXPECT_GE(r.latency_buckets[0].high_us, 1.0);
  EXPECT_EQ(r.latency_buckets[1].count, 10);
  const std::string json = RowJson(r);
  EXPECT_NE(json.find("\"latency_histogram_us\": [["), std::string::npos) << json;
  EXPECT_NE(json.find("\"intervals\": [{\"round\": 1, \"t_s\": 0, \"seconds\": 1, \"ok\": 15"),
            std::string::npos)
      << json;
}

}  // namespace
}  // namespace lossd::bench
