// lossd-bench's time series: per-interval figures of one measured run (successful calls, failed
// calls and the latency of the successful ones), by the time each call ended, counted from the
// start of the measured window. Memory is bounded: at most `max_intervals` intervals are kept;
// a call that ends past them doubles the interval width (neighbouring intervals merge), so a long
// run keeps its whole span at a coarser step. Each interval's latency histogram has 64 buckets
// per power of two (values known within 3.1%; 4.5 KiB per interval). Not thread-safe. No gRPC;
// unit-tested in tests/bench/timeseries_test.cc.
#ifndef LOSSD_CLIENT_BENCH_TIMESERIES_H_
#define LOSSD_CLIENT_BENCH_TIMESERIES_H_

#include <cstdint>
#include <vector>

namespace lossd::bench {

class IntervalSeries {
 public:
  static constexpr int64_t kDefaultWidthNs = 1'000'000'000;  // 1 s
  static constexpr int kDefaultMaxIntervals = 600;

  explicit IntervalSeries(int64_t width_ns = kDefaultWidthNs,
                          int max_intervals = kDefaultMaxIntervals);

  // One call that ended `at_ns` after the window's start (negative: counted at 0); code 0 is a
  // success with this latency, anything else a failure.
  void Record(int64_t at_ns, int code, int64_t latency_ns);
  // Adds another series of the same window (another thread's calls). Both started from the same
  // width; the finer one is coarsened to the other's width first.
  void Merge(const IntervalSeries& other);
  // The run's measured length: the last interval ends there (Points).
  void set_seconds(double s) { seconds_ = s; }

  int64_t width_ns() const { return width_ns_; }
  int size() const { return static_cast<int>(intervals_.size()); }

  struct Point {
    double start_s = 0;  // from the start of the window
    double seconds = 0;  // the interval's length (the last one ends at the run's end)
    int64_t ok = 0, errors = 0;
    double qps = 0;      // ok / seconds
    double p50_us = 0, p99_us = 0, max_us = 0;  // successful calls; 0 when none
  };
  // One point per interval, empty ones included. A last interval shorter than half the width
  // (the calls still in flight when the window closed) is merged into the one before it, so that
  // a few stragglers do not show as a spike of calls/s.
  std::vector<Point> Points() const;

 private:
  struct Interval {
    int64_t ok = 0, errors = 0, max_ns = 0;
    std::vector<uint32_t> counts;  // by CoarseIndex; empty until the first success
  };
  static int CoarseIndex(int64_t ns);
  static int NumCoarse();
  static int64_t CoarseHigh(int index);
  static void Add(Interval* into, const Interval& from);
  static int64_t Quantile(const Interval& in, double q);
  void Coarsen();  // doubles the width: interval 2k and 2k+1 become k

  int64_t width_ns_;
  int max_intervals_;
  double seconds_ = 0;
  std::vector<Interval> intervals_;
};

}  // namespace lossd::bench

#endif  // LOSSD_CLIENT_BENCH_TIMESERIES_H_
