#include "client/bench/schedule.h"

#include <cmath>

namespace lossd::bench {

ArrivalSchedule::ArrivalSchedule(Kind kind, double rate, uint64_t seed)
    : kind_(kind), rate_(rate), rng_(seed), gap_(rate / 1e9) {}

int64_t ArrivalSchedule::Next() {
  if (kind_ == Kind::kFixed) {
    // From the index, not by adding gaps: no drift from rounding over long runs.
    return static_cast<int64_t>(std::llround(static_cast<double>(index_++) * 1e9 / rate_));
  }
  const double at = poisson_ns_;
  poisson_ns_ += gap_(rng_);
  ++index_;
  return static_cast<int64_t>(at);
}

}  // namespace lossd::bench
