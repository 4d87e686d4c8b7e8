// When an open-loop load generator sends: at a fixed rate or with Poisson arrivals (exponential
// gaps) at a mean rate. Latency of an open-loop call is measured from its scheduled time, not
// from when a caller got round to sending it, so a slow server cannot hide its queueing by
// slowing the load down (no coordinated omission). Deterministic for a seed. Not thread-safe:
// one schedule per sending thread, each at rate / threads and its own seed.
#ifndef LOSSD_CLIENT_BENCH_SCHEDULE_H_
#define LOSSD_CLIENT_BENCH_SCHEDULE_H_

#include <cstdint>
#include <random>

namespace lossd::bench {

class ArrivalSchedule {
 public:
  enum class Kind { kFixed, kPoisson };

  // `rate` calls per second (> 0).
  ArrivalSchedule(Kind kind, double rate, uint64_t seed);

  // Offset of the next call from the start of the run, in ns: strictly increasing for kFixed
  // (i * 1e9 / rate), non-decreasing for kPoisson.
  int64_t Next();

 private:
  const Kind kind_;
  const double rate_;
  int64_t index_ = 0;
  double poisson_ns_ = 0;
  std::mt19937_64 rng_;
  std::exponential_distribution<double> gap_;
};

}  // namespace lossd::bench

#endif  // LOSSD_CLIENT_BENCH_SCHEDULE_H_
