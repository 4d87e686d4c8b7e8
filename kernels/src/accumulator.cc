// The reduction rule across calls (accumulator.h; docs/design.md section 3, "Reductions").
#include "lossd/kernels/accumulator.h"

#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kernels/src/bce_math.h"

namespace lossd::kernels {

Accumulator::Accumulator(const ReductionRule& rule, int64_t offset)
    : rule_(rule), sum_(offset) {}

absl::Status Accumulator::CheckRule(const ReductionRule& rule) {
  if (rule.reduction != Reduction::kSum && rule.reduction != Reduction::kMean) {
    return absl::InvalidArgumentError(
        absl::StrCat("an accumulated loss needs reduction SUM or MEAN, got reduction ",
                     static_cast<int>(rule.reduction)));
  }
  return absl::OkStatus();
}

absl::StatusOr<Accumulator> Accumulator::FromState(const ReductionRule& rule, BlockSum sum,
                                                   int64_t kept) {
  if (absl::Status s = CheckRule(rule); !s.ok()) return s;
  if (kept < 0 || kept > sum.count()) {
    return absl::InvalidArgumentError(absl::StrCat("kept ", kept, " is outside [0, ",
                                                   sum.count(), "], the element count"));
  }
  Accumulator a(rule);
  a.sum_ = std::move(sum);
  a.kept_ = kept;
  return a;
}

void Accumulator::Add(const double* values, int64_t n, int64_t kept) {
  sum_.Add(values, n);
  kept_ += rule_.counts_kept() ? kept : n;
}

absl::Status Accumulator::Append(const Accumulator& next) {
  if (next.rule_ != rule_) {
    return absl::InvalidArgumentError(
        "the accumulators have different reduction rules (reduction, normalize, "
        "has_ignore_index)");
  }
  if (absl::Status s = sum_.Append(next.sum_); !s.ok()) return s;
  kept_ += next.kept_;
  return absl::OkStatus();
}

double Accumulator::Value() const {
  const int64_t n = sum_.count();
  double loss = sum_.Value();
  // The normalize divisor of every backend (bce_math.h): the kept count, at least 1.
  if (rule_.normalize) loss /= internal::KeptCount(n, n - kept_);
  if (rule_.reduction == Reduction::kMean) loss /= static_cast<double>(n);
  return loss;
}

}  // namespace lossd::kernels
