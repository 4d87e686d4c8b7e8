// What one measured run of lossd-bench counted, and how it is reported. A run is one server at
// one load point (closed loop at N callers, or open loop at R calls/s) for one round; rounds of
// the same server and point are merged. Only calls that succeeded (status OK and, with
// --verify, a reply that matches the reference) count in calls/s, MB/s and the latency
// percentiles; every other call is counted by its status code. Calls of the warm-up are only
// counted in warmup_calls. No gRPC; unit-tested in tests/bench/report_test.cc.
#ifndef LOSSD_CLIENT_BENCH_REPORT_H_
#define LOSSD_CLIENT_BENCH_REPORT_H_

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "client/bench/histogram.h"
#include "client/bench/timeseries.h"

namespace lossd::bench {

inline constexpr int kNumStatusCodes = 17;  // gRPC codes 0 (OK) .. 16 (UNAUTHENTICATED)

// "OK", "CANCELLED", ... "UNAUTHENTICATED"; "CODE_<n>" outside 0..16.
std::string StatusCodeName(int code);

struct RunStats {
  // Calls by final status, measured window only. codes[0] counts successes that passed
  // verification; a reply with status OK whose values are wrong is in `mismatches` instead.
  std::array<int64_t, kNumStatusCodes> codes{};
  int64_t mismatches = 0;
  int64_t warmup_calls = 0;  // calls started in the warm-up (excluded from everything else)
  Histogram latency;         // ns, successful calls only (open loop: from the scheduled time)
  // The server's own figures from each successful reply's Timing (ns).
  Histogram server_queue;
  Histogram server_compute;
  Histogram server_total;
  int64_t ok_bytes = 0;     // request + reply bytes of the successful calls
  int64_t ok_elements = 0;  // logits elements of the successful calls
  double seconds = 0;       // measured window: from its start to the last counted reply
  double cpu_user_s = 0;    // client CPU time during the measured window (getrusage)
  double cpu_sys_s = 0;
  // Per-interval figures of each run merged here, in order (one per round; timeseries.h).
  std::vector<IntervalSeries> series;

  void Record(int code, int64_t latency_ns);  // code 0: a success with this latency
  // Adds counts, times and histograms; appends the other's runs to `series`.
  void Merge(const RunStats& other);
  int64_t ok() const { return codes[0]; }
  int64_t errors() const;  // every non-OK code, plus mismatches
  int64_t sent() const { return ok() + errors(); }
};

// Where and how a row was measured.
struct RowLabel {
  std::string server;     // "lossd", "echo", "raw", or what GetCapabilities says of --target
  std::string load;       // "closed" or "open-fixed" / "open-poisson"
  double concurrency = 0;  // closed loop: callers
  double rate = 0;         // open loop: calls/s asked for
  int rounds = 1;
};

// The figures of a row, derived from RunStats.
struct RowSummary {
  RowLabel label;
  int64_t sent = 0, ok = 0, errors = 0, mismatches = 0, warmup_calls = 0;
  std::vector<std::pair<std::string, int64_t>> codes;  // non-zero codes, by name, in code order
  double seconds = 0;
  double qps = 0;   // ok / seconds
  double mbps = 0;  // ok_bytes / seconds / 1e6
  double elements_per_s = 0;
  // Latency of successful calls, microseconds.
  double p50_us = 0, p90_us = 0, p95_us = 0, p99_us = 0, p999_us = 0, max_us = 0, mean_us = 0;
  double server_queue_p50_us = 0, server_compute_p50_us = 0, server_total_p50_us = 0;
  double server_total_p99_us = 0;
  double client_cpu_s = 0;        // user + sys
  double client_cpu_cores = 0;    // client_cpu_s / seconds: 1.0 = one core busy all along
  // The latency histogram of the successful calls: non-empty buckets of 64 per power of two
  // (each within 3.1% of its values), in increasing order.
  struct Bucket {
    double low_us = 0, high_us = 0;
    int64_t count = 0;
  };
  std::vector<Bucket> latency_buckets;
  // The time series: each run's intervals (round 1, 2, ...); t_s counts measured time from the
  // start of the row's first run (runs follow each other on that axis, without the time that
  // other servers were measured in between).
  struct Interval {
    int round = 1;
    double t_s = 0;
    IntervalSeries::Point point;
  };
  std::vector<Interval> intervals;
};

RowSummary Summarize(const RowLabel& label, const RunStats& stats);

// lossd's figures against a baseline's at the same point (ratios of calls/s; latency
// differences and ratios at p50 and p99). 0 where the baseline has no successful call.
struct Ratio {
  std::string server, baseline;
  double qps_ratio = 0;
  double p50_ratio = 0, p99_ratio = 0;
  double p50_diff_us = 0;
};
Ratio Compare(const RowSummary& server, const RowSummary& baseline);

// Human table (header and one line per row), JSON and CSV.
std::string TableHeader();
std::string TableRow(const RowSummary& row);
std::string RowJson(const RowSummary& row);
std::string RatioJson(const Ratio& r);
std::string CsvHeader();
std::string CsvRow(const RowSummary& row);

}  // namespace lossd::bench

#endif  // LOSSD_CLIENT_BENCH_REPORT_H_
