// The divisors of one evaluation: the single rule every backend and the reference apply for
// MEAN, normalize and PER_SAMPLE_MEAN (docs/design.md section 3), including for a part of a
// larger evaluation (BceArgs::whole_numel / whole_kept), and the means of empty rows.
// Internal header, host only. Reductions across calls: accumulator.h.
#ifndef LOSSD_KERNELS_SRC_DIVISORS_H_
#define LOSSD_KERNELS_SRC_DIVISORS_H_

#include <algorithm>
#include <cstdint>

#include "absl/status/status.h"

#include "kernels/src/bce_math.h"
#include "lossd/kernels/bce.h"

namespace lossd::kernels::internal {

struct Divisors {
  // Divides every loss value and gradient: with normalize the kept count of the whole
  // evaluation (at least 1), else 1.
  double count = 1.0;
  // MEAN divides the sum by it (after count): the whole evaluation's element count.
  double mean_n = 0.0;
  // Divides each gradient: count, times mean_n for MEAN or last_dim for PER_SAMPLE_MEAN.
  double grad_div = 1.0;
};

// The inputs of the divisor rule, taken from BceArgs once (DivisorRuleOf; ResolveLoss in
// resolved_loss.h keeps one per call).
struct DivisorRule {
  Reduction reduction = Reduction::kMean;
  bool normalize = false;
  bool has_ignore_index = false;
  int64_t whole = 0;        // the whole evaluation's element count (whole_numel, else numel)
  int64_t whole_kept = -1;  // the whole's kept count when given, else -1
  int64_t last_dim = 1;

  // True when the kept count must be counted in this call's targets (normalize with
  // ignore_index, and no whole_kept given): pass the count of ignored targets to For.
  bool CountsIgnored() const { return normalize && has_ignore_index && whole_kept < 0; }

  // The normalize divisor as an integer: the whole's kept count (at least 1; given, or the
  // whole's count minus `ignored`), 1 without normalize. `ignored`: this call's targets equal
  // to ignore_index when CountsIgnored(), else unused.
  int64_t KeptDivisor(int64_t ignored) const {
    if (!normalize) return 1;
    if (whole_kept >= 0) return std::max<int64_t>(whole_kept, 1);
    return std::max<int64_t>(whole - (has_ignore_index ? ignored : 0), 1);
  }

  Divisors For(int64_t ignored) const {
    Divisors d;
    d.count = static_cast<double>(KeptDivisor(ignored));
    d.mean_n = static_cast<double>(whole);
    d.grad_div = d.count;
    if (reduction == Reduction::kMean) d.grad_div *= d.mean_n;
    if (reduction == Reduction::kPerSampleMean) d.grad_div *= static_cast<double>(last_dim);
    return d;
  }
};

inline DivisorRule DivisorRuleOf(const BceArgs& args) {
  DivisorRule r;
  r.reduction = args.reduction;
  r.normalize = args.normalize;
  r.has_ignore_index = args.has_ignore_index;
  r.whole = args.whole_numel > 0 ? args.whole_numel : args.numel;
  r.whole_kept = args.whole_kept;
  r.last_dim = args.last_dim;
  return r;
}

// DivisorRule::CountsIgnored and DivisorRule::For straight from BceArgs (the reference).
inline bool CountsIgnored(const BceArgs& args) { return DivisorRuleOf(args).CountsIgnored(); }
inline Divisors ResolveDivisors(const BceArgs& args, int64_t ignored) {
  return DivisorRuleOf(args).For(ignored);
}

// True when `args` is a per-sample mean over empty rows (last_dim 0, numel 0).
inline bool EmptyRows(const BceArgs& args) {
  return args.reduction == Reduction::kPerSampleMean && args.last_dim == 0;
}

// The outputs of EmptyRows(args): every row's mean NaN (0 / 0), no gradient elements, kept 0.
// Works in chunks of kChunkElements rows like the block loops (should_stop polled before each,
// chunks_done counted after each); CANCELLED when stopped. Every backend calls it (common.cc).
absl::Status EmptyRowMeans(const BceArgs& args, const BceOutputs& out);

}  // namespace lossd::kernels::internal

#endif  // LOSSD_KERNELS_SRC_DIVISORS_H_
