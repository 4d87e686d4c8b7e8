// The sustainable-rate search (--find_max_rps) against fake servers whose answer is known in
// advance: a server that meets the objective up to a rate T and not beyond must be found within
// the precision asked for, by doubling and then bisecting; the three rules (p99, errors,
// achieved rate) are each the deciding one somewhere. No timing: the measurements are made up.
#include "client/bench/search.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <set>
#include <vector>

namespace lossd::bench {
namespace {

constexpr int64_t kSlo = 5'000'000;  // 5 ms

SearchOptions Options() {
  SearchOptions o;
  o.slo_p99_ns = kSlo;
  o.start_rps = 100;
  o.max_rps = 1e6;
  o.precision = 0.05;
  o.max_points = 40;
  return o;
}

// Meets the objective up to `limit` calls/s, misses it (p99 twice the objective) beyond.
struct StepServer {
  double limit;
  std::vector<double> asked;
  SearchMeasurement operator()(double rps) {
    asked.push_back(rps);
    SearchMeasurement m;
    m.sent = 1000;
    m.achieved_rps = rps;
    m.p99_ns = rps <= limit ? kSlo / 2 : kSlo * 2;
    return m;
  }
};

void ExpectNoRepeats(const std::vector<double>& asked) {
  EXPECT_EQ(std::set<double>(asked.begin(), asked.end()).size(), asked.size());
}

TEST(SearchTest, DoublesThenBisectsToTheLimit) {
  const SearchOptions o = Options();
  StepServer s{3000};
  const SearchResult r = FindMaxRate(o, std::ref(s));
  // Doubling from 100: 100 ... 3200 (the first that fails), then bisection in (1600, 3200].
  ASSERT_GE(s.asked.size(), 6u);
  EXPECT_EQ(std::vector<double>(s.asked.begin(), s.asked.begin() + 6),
            (std::vector<double>{100, 200, 400, 800, 1600, 3200}));
  EXPECT_EQ(s.asked[6], 2400);
  EXPECT_LE(r.best_rps, 3000);
  EXPECT_GT(r.failed_rps, 3000);
  EXPECT_LE(r.failed_rps - r.best_rps, o.precision * r.best_rps);
  EXPECT_GE(r.best_rps, 3000 / (1 + o.precision));
  ExpectNoRepeats(s.asked);
  ASSERT_EQ(r.points.size(), s.asked.size());
  EXPECT_TRUE(r.points[r.best_index].holds);
  EXPECT_EQ(r.points[r.best_index].offered_rps, r.best_rps);
  EXPECT_NE(r.end.find("bracketed"), std::string::npos) << r.end;
  for (const SearchPoint& p : r.points) {
    EXPECT_EQ(p.holds, p.offered_rps <= 3000) << p.offered_rps;
    EXPECT_EQ(p.holds, p.why.empty());
  }
}

TEST(SearchTest, HalvesWhenTheStartFails) {
  SearchOptions o = Options();
  o.start_rps = 1000;
  StepServer s{180};
  const SearchResult r = FindMaxRate(o, std::ref(s));
  EXPECT_EQ(std::vector<double>(s.asked.begin(), s.asked.begin() + 4),
            (std::vector<double>{1000, 500, 250, 125}));
  EXPECT_LE(r.best_rps, 180);
  EXPECT_GE(r.best_rps, 180 / (1 + o.precision));
  ExpectNoRepeats(s.asked);
}

TEST(SearchTest, NothingHolds) {
  SearchOptions o = Options();
  o.min_rps = 10;
  StepServer s{1};
  const SearchResult r = FindMaxRate(o, std::ref(s));
  EXPECT_EQ(r.best_rps, 0);
  EXPECT_EQ(r.best_index, -1);
  EXPECT_EQ(s.asked, (std::vector<double>{100, 50, 25, 12.5}));
  EXPECT_NE(r.end.find("no rate down to 10/s holds"), std::string::npos) << r.end;
}

TEST(SearchTest, StopsAtTheHighestRateAllowed) {
  SearchOptions o = Options();
  o.max_rps = 1000;
  StepServer s{1e9};
  const SearchResult r = FindMaxRate(o, std::ref(s));
  EXPECT_EQ(s.asked, (std::vector<double>{100, 200, 400, 800, 1000}));
  EXPECT_EQ(r.best_rps, 1000);
  EXPECT_EQ(r.failed_rps, 0);
  EXPECT_NE(r.end.find("highest rate allowed"), std::string::npos) << r.end;
}

TEST(SearchTest, ErrorsDecide) {
  // p99 always fine; errors appear beyond 700/s: 1 in 500 (0.2%) fails the 0.1% rule.
  const SearchOptions o = Options();
  std::vector<double> asked;
  const SearchResult r = FindMaxRate(o, [&](double rps) {
    asked.push_back(rps);
    SearchMeasurement m;
    m.sent = 5000;
    m.errors = rps > 700 ? 10 : 4;  // 0.08% below
    m.achieved_rps = rps;
    m.p99_ns = 1000;
    return m;
  });
  EXPECT_LE(r.best_rps, 700);
  EXPECT_GE(r.best_rps, 700 / 1.05);
  EXPECT_NE(r.points.back().why.find("errors"), std::string::npos);
  for (const SearchPoint& p : r.points) {
    if (!p.holds) EXPECT_NE(p.why.find("errors 10 of 5000"), std::string::npos) << p.why;
  }
}

TEST(SearchTest, AchievedRateDecides) {
  // A server that cannot complete more than 900 calls/s (latency fine): rates above
  // 900 / 0.95 = 947.4 fall behind.
  const SearchOptions o = Options();
  const SearchResult r = FindMaxRate(o, [&](double rps) {
    SearchMeasurement m;
    m.sent = 1000;
    m.achieved_rps = std::min(rps, 900.0);
    m.p99_ns = 1000;
    return m;
  });
  EXPECT_LE(r.best_rps, 900 / 0.95);
  EXPECT_GE(r.best_rps, 900 / 0.95 / 1.05);
  bool saw = false;
  for (const SearchPoint& p : r.points) saw |= p.why.find("achieved") != std::string::npos;
  EXPECT_TRUE(saw);
}

TEST(SearchTest, VerdictRules) {
  const SearchOptions o = Options();
  SearchMeasurement m;
  m.sent = 10000;
  m.achieved_rps = 950;
  m.p99_ns = kSlo;  // exactly the objective holds
  EXPECT_EQ(SearchVerdict(o, 1000, m), "");
  m.errors = 9;  // 0.09%
  EXPECT_EQ(SearchVerdict(o, 1000, m), "");
  m.errors = 10;  // 0.1%: not below the bound
  EXPECT_NE(SearchVerdict(o, 1000, m).find("errors"), std::string::npos);
  m.errors = 0;
  m.p99_ns = kSlo + 1;
  EXPECT_NE(SearchVerdict(o, 1000, m).find("p99"), std::string::npos);
  m.p99_ns = kSlo;
  m.achieved_rps = 949.9;
  EXPECT_NE(SearchVerdict(o, 1000, m).find("achieved"), std::string::npos);
  SearchMeasurement none;
  EXPECT_EQ(SearchVerdict(o, 1000, none), "no successful call");
  none.sent = none.errors = 5;
  EXPECT_EQ(SearchVerdict(o, 1000, none), "no successful call");
}

TEST(SearchTest, AFailureByChanceMakesTheAnswerConservative) {
  // 800/s fails once by chance although 1600/s would hold: the search does not measure a rate
  // twice, so the answer stays below the failure, never above a rate that failed.
  const SearchOptions o = Options();
  const SearchResult r = FindMaxRate(o, [&](double rps) {
    SearchMeasurement m;
    m.sent = 1000;
    m.achieved_rps = rps;
    m.p99_ns = (rps == 800 || rps > 2000) ? kSlo * 3 : 1000;
    return m;
  });
  EXPECT_EQ(r.failed_rps, 800);
  EXPECT_LT(r.best_rps, 800);
  EXPECT_GE(r.best_rps, 800 / 1.05);
  for (const SearchPoint& p : r.points) EXPECT_LE(p.offered_rps, 800);
}

TEST(SearchTest, PointLimitAndInterruption) {
  SearchOptions o = Options();
  o.max_points = 3;
  StepServer s{1e5};
  SearchResult r = FindMaxRate(o, std::ref(s));
  EXPECT_EQ(s.asked.size(), 3u);
  EXPECT_EQ(r.best_rps, 400);
  EXPECT_NE(r.end.find("3 points"), std::string::npos) << r.end;

  int calls = 0;
  r = FindMaxRate(Options(), [&](double rps) {
    SearchMeasurement m;
    m.sent = 1000;
    m.achieved_rps = rps;
    m.p99_ns = 1;
    m.interrupted = ++calls == 3;
    return m;
  });
  EXPECT_EQ(calls, 3);
  EXPECT_EQ(r.best_rps, 200);
  EXPECT_EQ(r.end, "interrupted");
  EXPECT_EQ(r.points.size(), 3u);
  EXPECT_FALSE(r.points.back().holds);
}

TEST(SearchTest, OptionsAreChecked) {
  SearchOptions o = Options();
  EXPECT_TRUE(ValidateSearchOptions(o).ok());
  o.slo_p99_ns = 0;
  EXPECT_FALSE(ValidateSearchOptions(o).ok());
  o = Options();
  o.max_rps = 50;  // below the start
  EXPECT_NE(std::string(ValidateSearchOptions(o).message()).find("start 100"),
            std::string::npos);
  o = Options();
  o.precision = 0;
  EXPECT_FALSE(ValidateSearchOptions(o).ok());
  o = Options();
  o.max_error_fraction = 0;
  EXPECT_FALSE(ValidateSearchOptions(o).ok());
  o = Options();
  o.min_achieved_fraction = 1.5;
  EXPECT_FALSE(ValidateSearchOptions(o).ok());
}

TEST(SearchTest, JsonHasEveryPoint) {
  StepServer s{500};
  const SearchOptions o = Options();
  const SearchResult r = FindMaxRate(o, std::ref(s));
  const std::string j = SearchJson(o, r, "lossd \"x\"");
  EXPECT_NE(j.find("\"server\": \"lossd \\\"x\\\"\""), std::string::npos) << j;
  EXPECT_NE(j.find("\"slo_p99_us\": 5000"), std::string::npos) << j;
  size_t n = 0;
  for (size_t at = j.find("\"offered_rps\""); at != std::string::npos;
       at = j.find("\"offered_rps\"", at + 1)) {
    ++n;
  }
  EXPECT_EQ(n, r.points.size());
}

}  // namespace
}  // namespace lossd::bench
