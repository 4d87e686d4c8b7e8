// lossd-bench's sustainable-rate search (--find_max_rps; README.md, "Load testing with
// lossd-bench"): the highest open-loop arrival rate at which a server still meets a latency
// objective. A rate "holds" when, measured at that offered rate,
//   - the p99 latency of successful calls (from each call's scheduled time) is <= the objective,
//   - fewer than `max_error_fraction` of the calls failed (default 0.1%), and
//   - the rate of successful calls is >= `min_achieved_fraction` (default 0.95) of the offered
//     rate (a server, or a tester, that falls behind does not hold it).
// The search doubles the rate from `start_rps` until a rate fails (or `max_rps` holds), halves it
// when the start already fails, then bisects between the highest rate that held and the lowest
// that failed until they are within `precision` of each other. Measurements are not monotonic on
// a noisy machine, so the answer is the highest rate that was measured to hold, with every point
// tried. Pure logic over a measurement callback: unit-tested in tests/bench/search_test.cc.
#ifndef LOSSD_CLIENT_BENCH_SEARCH_H_
#define LOSSD_CLIENT_BENCH_SEARCH_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace lossd::bench {

struct SearchOptions {
  int64_t slo_p99_ns = 0;              // the objective (> 0)
  double max_error_fraction = 0.001;   // errors / sent must stay below this
  double min_achieved_fraction = 0.95;  // successful calls/s over the offered rate
  double start_rps = 100;              // first rate tried (> 0)
  double max_rps = 1e6;                // never offer more than this (>= start_rps)
  double min_rps = 1;                  // halving stops below this: nothing holds
  double precision = 0.05;             // bisection ends when (fail - held) <= precision * held
  int max_points = 20;                 // measurements at most
};

// Checks the options: names the field and value that is out of range.
absl::Status ValidateSearchOptions(const SearchOptions& o);

// What one measurement at an offered rate gave.
struct SearchMeasurement {
  int64_t p99_ns = 0;   // successful calls; 0 when there were none
  int64_t sent = 0;     // calls counted (successes + failures)
  int64_t errors = 0;
  double achieved_rps = 0;  // successful calls per second
  bool interrupted = false;  // the measurement was cut short: the search ends
};

// A rate tried, and the verdict.
struct SearchPoint {
  double offered_rps = 0;
  SearchMeasurement m;
  bool holds = false;
  std::string why;  // why it does not hold ("" when it holds)
};

// "" when the measurement meets the objective, else the first rule it breaks, in words.
std::string SearchVerdict(const SearchOptions& o, double offered_rps, const SearchMeasurement& m);

struct SearchResult {
  double best_rps = 0;   // highest offered rate that held; 0: none did
  int best_index = -1;   // its point
  double failed_rps = 0;  // lowest offered rate above best_rps that failed; 0: none
  std::vector<SearchPoint> points;  // in the order tried
  std::string end;       // why the search ended, in words
};

// Runs the search, calling `measure` once per rate tried (never twice for the same rate).
SearchResult FindMaxRate(const SearchOptions& o,
                         const std::function<SearchMeasurement(double rps)>& measure);

// The result as a JSON object (offered rates in calls/s, latencies in microseconds).
std::string SearchJson(const SearchOptions& o, const SearchResult& r, const std::string& server);

}  // namespace lossd::bench

#endif  // LOSSD_CLIENT_BENCH_SEARCH_H_
