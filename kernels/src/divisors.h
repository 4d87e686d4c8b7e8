// The divisors of one evaluation: the single rule every backend and the reference apply for
// MEAN, normalize and PER_SAMPLE_MEAN (docs/design.md section 3), including for a part of a
// larger evaluation (BceArgs::whole_numel / whole_kept), and the means of empty rows.
// Internal header, host only. Reductions across calls: accumulator.h.
#ifndef LOSSD_KERNELS_SRC_DIVISORS_H_
#define LOSSD_KERNELS_SRC_DIVISORS_H_

#include <algorithm>
#include <cstdint>

#include "absl/status/status.h"

#include "bce_math.h"
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

// True when the kept count must be counted in this call's targets (normalize with
// ignore_index, and no whole_kept given): pass the count of ignored targets to
// ResolveDivisors.
inline bool CountsIgnored(const BceArgs& args) {
  return args.normalize && args.has_ignore_index && args.whole_kept < 0;
}

// `ignored`: this call's targets equal to ignore_index when CountsIgnored(args), else unused.
inline Divisors ResolveDivisors(const BceArgs& args, int64_t ignored) {
  Divisors d;
  const int64_t whole = args.whole_numel > 0 ? args.whole_numel : args.numel;
  if (args.normalize) {
    if (args.whole_kept >= 0) {
      d.count = static_cast<double>(std::max<int64_t>(args.whole_kept, 1));
    } else {
      d.count = KeptCount(whole, args.has_ignore_index ? ignored : 0);
    }
  }
  d.mean_n = static_cast<double>(whole);
  d.grad_div = d.count;
  if (args.reduction == Reduction::kMean) d.grad_div *= d.mean_n;
  if (args.reduction == Reduction::kPerSampleMean) {
    d.grad_div *= static_cast<double>(args.last_dim);
  }
  return d;
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
