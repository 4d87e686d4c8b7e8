// Reductions across calls: an Accumulator owns the reduction rule of a loss reduced over many
// evaluations (Accumulate batches, slices of a dataset, merged partial states) and the state it
// needs: the exact block sum of the per-element losses (BlockSum, exact_sum.h), the element
// count, and the kept count. It alone turns that state into the reduced loss (docs/design.md
// section 3, "Reductions"): the sum rounded once, divided by the kept count under normalize
// (at least 1, the divisor every backend uses), then by the element count for MEAN.
// An Accumulator is a value without synchronization: one thread at a time per object.
#ifndef LOSSD_KERNELS_ACCUMULATOR_H_
#define LOSSD_KERNELS_ACCUMULATOR_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "lossd/kernels/bce.h"
#include "lossd/kernels/exact_sum.h"

namespace lossd::kernels {

// How an accumulated loss is reduced. Only kSum and kMean reduce across calls.
struct ReductionRule {
  Reduction reduction = Reduction::kMean;  // kSum or kMean
  bool normalize = false;                  // divide by the kept count (BceArgs::normalize)
  bool has_ignore_index = false;           // BceArgs::has_ignore_index of every call
  // True when the kept count is counted from the targets (normalize with ignore_index); else
  // every element counts as kept.
  bool counts_kept() const { return normalize && has_ignore_index; }
  bool operator==(const ReductionRule& o) const {
    return reduction == o.reduction && normalize == o.normalize &&
           has_ignore_index == o.has_ignore_index;
  }
  bool operator!=(const ReductionRule& o) const { return !(*this == o); }
};

class Accumulator {
 public:
  Accumulator() = default;
  // An empty accumulator for the slice of the element stream that starts at flat index
  // `offset` (BlockSum(offset)). rule.reduction must be kSum or kMean (see CheckRule).
  explicit Accumulator(const ReductionRule& rule, int64_t offset = 0);

  // OK when `rule` reduces across calls; else InvalidArgument naming the reduction.
  static absl::Status CheckRule(const ReductionRule& rule);

  // Rebuilds an accumulator from its parts (a decoded partial state). InvalidArgument, naming
  // the values, when kept is outside [0, sum.count()] or the rule does not reduce.
  static absl::StatusOr<Accumulator> FromState(const ReductionRule& rule, BlockSum sum,
                                               int64_t kept);

  // Adds the n per-element loss values of one evaluation (BceOutputs::loss_values), which
  // follow the values added so far. `kept`: that evaluation's BceOutputs::kept; read only when
  // rule().counts_kept() (then request it from the backend), else all n elements count.
  void Add(const double* values, int64_t n, int64_t kept);

  // Joins the accumulator of the slice that directly follows this one: afterwards this is the
  // state of one accumulator over both. InvalidArgument (nothing changed) when the rules
  // differ or the slices are not adjacent (BlockSum::Append's message).
  absl::Status Append(const Accumulator& next);

  // The reduced loss: the exact sum rounded once, divided by max(kept, 1) under normalize,
  // then by num_elements() for kMean (NaN for a mean of no elements).
  double Value() const;

  const ReductionRule& rule() const { return rule_; }
  const BlockSum& sum() const { return sum_; }
  int64_t num_elements() const { return sum_.count(); }
  // The stored kept count (the partial state's `kept` field): counted from the targets when
  // rule().counts_kept(), else the element count.
  int64_t kept() const { return kept_; }
  // The kept count a reply reports: kept() when counted, else num_elements().
  int64_t num_kept() const { return rule_.counts_kept() ? kept_ : sum_.count(); }

 private:
  ReductionRule rule_;
  BlockSum sum_;
  int64_t kept_ = 0;
};

}  // namespace lossd::kernels

#endif  // LOSSD_KERNELS_ACCUMULATOR_H_
