// lossd-bench's command-line vocabulary, as pure functions: counts with suffixes ("1k", "4Mi"),
// sweep ranges ("1:64:x2", "100:1000:+300", "1,4,16"), weighted request mixes
// ("0.9:1k,0.1:1M:badshape"), and the rules that end a sweep. No gRPC; unit-tested in
// tests/bench/spec_test.cc.
#ifndef LOSSD_CLIENT_BENCH_SPEC_H_
#define LOSSD_CLIENT_BENCH_SPEC_H_

#include <cstdint>
#include <string>
#include "absl/strings/string_view.h"
#include <vector>

#include "absl/status/statusor.h"

namespace lossd::bench {

// A non-negative integer with an optional suffix: k/M/G (10^3, 10^6, 10^9) or Ki/Mi/Gi
// (2^10, 2^20, 2^30). "1k" = 1000, "1Mi" = 1048576. Errors name the text.
absl::StatusOr<int64_t> ParseCount(absl::string_view text);

// A positive number (rate or concurrency) with the same suffixes; fractions allowed ("0.5k").
absl::StatusOr<double> ParseAmount(absl::string_view text);

// The points of a sweep, in order:
//   "N"              one point
//   "A,B,C"          these points
//   "LO:HI:xF"       LO, LO*F, LO*F^2, ... while <= HI (F > 1)
//   "LO:HI:+S"       LO, LO+S, LO+2S, ... while <= HI (S > 0)
//   "LO:HI"          same as "LO:HI:x2"
// Every point must be > 0; at most `max_points` points.
absl::StatusOr<std::vector<double>> ParseRange(absl::string_view text, int max_points = 1000);

// One request kind of a mix: its weight (> 0, relative), its element count and a variant:
// "ok" (a valid request) or "badshape" (targets with one element fewer than the logits: the
// server must answer INVALID_ARGUMENT; for checking that failures are counted as failures).
struct MixEntry {
  double weight = 1;
  int64_t elements = 0;
  std::string variant = "ok";
};

// "W:ELEMENTS[:VARIANT],..." e.g. "0.9:1k,0.1:1M" or "0.95:1k,0.05:1k:badshape". A single
// "ELEMENTS" (no weight) is one kind of weight 1.
absl::StatusOr<std::vector<MixEntry>> ParseMix(absl::string_view text);

// Chooses kinds by weight: Pick(u) for u uniform in [0, 1) returns the index of the entry whose
// share of the cumulative weights holds u.
class MixPicker {
 public:
  explicit MixPicker(const std::vector<MixEntry>& entries);
  int Pick(double u) const;
  int size() const { return static_cast<int>(cumulative_.size()); }

 private:
  std::vector<double> cumulative_;  // normalised to end at 1
};

// When a sweep stops going on to heavier load points.
struct StopRule {
  int64_t max_p99_ns = 0;          // 0: no latency bound
  double max_error_fraction = 0;   // errors / sent above this stops (0: any error)
};

// Why the sweep must stop after a point with these figures; empty to go on.
std::string StopReason(const StopRule& rule, int64_t p99_ns, int64_t sent, int64_t errors);

}  // namespace lossd::bench

#endif  // LOSSD_CLIENT_BENCH_SPEC_H_
