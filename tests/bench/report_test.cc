// Run statistics and their summaries against counts and rates computed by hand.
#include "client/bench/report.h"

#include <gtest/gtest.h>

#include <string>

namespace lossd::bench {
namespace {

TEST(ReportTest, FailuresAreCountedByCodeAndNeverAsSuccesses) {
  RunStats s;
  for (int i = 0; i < 90; ++i) s.Record(0, 1000 * (i + 1));  // 1..90 us
  for (int i = 0; i < 7; ++i) s.Record(3, 5);                 // INVALID_ARGUMENT, fast
  s.Record(14, 999999999);                                      // UNAVAILABLE, slow
  s.mismatches = 2;
  s.ok_bytes = 90 * 1000;
  s.ok_elements = 90 * 10;
  s.seconds = 2.0;
  s.warmup_calls = 13;
  EXPECT_EQ(s.ok(), 90);
  EXPECT_EQ(s.errors(), 10);
  EXPECT_EQ(s.sent(), 100);
  const RowSummary r = Summarize({"lossd", "closed", 4, 0, 1}, s);
  EXPECT_EQ(r.sent, 100);
  EXPECT_EQ(r.ok, 90);
  EXPECT_EQ(r.errors, 10);
  EXPECT_EQ(r.warmup_calls, 13);
  EXPECT_DOUBLE_EQ(r.qps, 45.0);       // successes only
  EXPECT_DOUBLE_EQ(r.mbps, 0.045);     // bytes of successes only
  EXPECT_DOUBLE_EQ(r.elements_per_s, 450.0);
  EXPECT_EQ(r.max_us, 90.0);           // the failures' latencies are not in the histogram
  EXPECT_NEAR(r.p50_us, 45.0, 45.0 / 128);
  ASSERT_EQ(r.codes.size(), 3u);
  EXPECT_EQ(r.codes[0], (std::pair<std::string, int64_t>{"INVALID_ARGUMENT", 7}));
  EXPECT_EQ(r.codes[1], (std::pair<std::string, int64_t>{"UNAVAILABLE", 1}));
  EXPECT_EQ(r.codes[2], (std::pair<std::string, int64_t>{"MISMATCH", 2}));
}

TEST(ReportTest, MergingRoundsAddsCountsAndTime) {
  RunStats a, b;
  for (int i = 0; i < 10; ++i) a.Record(0, 100);
  a.seconds = 1;
  a.cpu_user_s = 0.25;
  for (int i = 0; i < 30; ++i) b.Record(0, 300);
  b.Record(8, 1);
  b.seconds = 1;
  b.cpu_sys_s = 0.25;
  a.Merge(b);
  const RowSummary r = Summarize({"echo", "closed", 1, 0, 2}, a);
  EXPECT_EQ(r.ok, 40);
  EXPECT_EQ(r.errors, 1);
  EXPECT_DOUBLE_EQ(r.qps, 20.0);
  EXPECT_DOUBLE_EQ(r.client_cpu_s, 0.5);
  EXPECT_DOUBLE_EQ(r.client_cpu_cores, 0.25);
  EXPECT_DOUBLE_EQ(r.p50_us, 0.3);
}

TEST(ReportTest, RatiosAgainstABaseline) {
  RowSummary lossd, echo, empty;
  lossd.label.server = "lossd";
  echo.label.server = "echo";
  lossd.ok = 90;
  lossd.qps = 900;
  lossd.p50_us = 110;
  lossd.p99_us = 300;
  echo.ok = 100;
  echo.qps = 1000;
  echo.p50_us = 100;
  echo.p99_us = 200;
  const Ratio r = Compare(lossd, echo);
  EXPECT_DOUBLE_EQ(r.qps_ratio, 0.9);
  EXPECT_DOUBLE_EQ(r.p50_ratio, 1.1);
  EXPECT_DOUBLE_EQ(r.p99_ratio, 1.5);
  EXPECT_DOUBLE_EQ(r.p50_diff_us, 10);
  EXPECT_EQ(Compare(lossd, empty).qps_ratio, 0);
}

TEST(ReportTest, CodeNamesAndFormats) {
  EXPECT_EQ(StatusCodeName(0), "OK");
  EXPECT_EQ(StatusCodeName(3), "INVALID_ARGUMENT");
  EXPECT_EQ(StatusCodeName(16), "UNAUTHENTICATED");
  EXPECT_EQ(StatusCodeName(17), "CODE_17");
  RunStats s;
  s.Record(0, 1000);
  s.seconds = 1;
  const RowSummary r = Summarize({"a \"b\"", "open-poisson", 0, 50, 1}, s);
  const std::string json = RowJson(r);
  EXPECT_NE(json.find("\"server\": \"a \\\"b\\\"\""), std::string::npos) << json;
  EXPECT_NE(json.find("\"sent\": 1,"), std::string::npos) << json;
  const std::string csv = CsvRow(r);
  int commas = 0, header_commas = 0;
  for (char c : csv) commas += c == ',';
  for (char c : CsvHeader()) header_commas += c == ',';
  EXPECT_EQ(commas, header_commas) << csv;
}

}  // namespace
}  // namespace lossd::bench
