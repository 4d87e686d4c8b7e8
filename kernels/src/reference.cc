// The float64 scalar reference: one element at a time, straight from the formulas. Tests
// compare every backend against it; it is written for clarity, not speed.
#include <cmath>
#include <vector>

#include "kernels/src/bce_math.h"
#include "kernels/src/divisors.h"
#include "lossd/kernels/bce.h"
#include "lossd/kernels/dtype.h"
#include "lossd/kernels/exact_sum.h"
#include "lossd/kernels/operand.h"
#include "lossd/kernels/reference.h"

namespace lossd::kernels {

namespace {

double OperandAt(const Operand& op, int64_t i) {
  if (op.data == nullptr) return 1.0;
  return LoadAsDouble(op.dtype, op.data, (i / op.inner) % op.period);
}

}  // namespace

void ReferenceBce(const BceArgs& args, double* loss, double* grad_logits, double* grad_targets) {
  const int64_t n = args.numel;
  internal::ElementOptions<double> o;
  o.focal = args.loss == Loss::kFocal;
  o.has_ignore_index = args.has_ignore_index;
  o.ignore_index = args.ignore_index;
  o.smoothing = args.label_smoothing;
  o.alpha = args.focal_alpha;
  o.gamma = args.focal_gamma;
  // normalize: the count of elements that are not ignored (of the whole evaluation).
  int64_t ignored = 0;
  if (internal::CountsIgnored(args)) {
    for (int64_t i = 0; i < n; ++i) {
      ignored += LoadAsDouble(args.targets_dtype, args.targets, i) == args.ignore_index;
    }
  }
  const internal::Divisors div = internal::ResolveDivisors(args, ignored);
  const double count = div.count;
  // Gradients are those of the reduced loss.
  const double grad_div = div.grad_div;

  std::vector<double> values(n);
  for (int64_t i = 0; i < n; ++i) {
    const double x = LoadAsDouble(args.dtype, args.logits, i);
    const double y = LoadAsDouble(args.targets_dtype, args.targets, i);
    double l, gx, gy;
    internal::LossElement<double>(o, x, y, OperandAt(args.weight, i), OperandAt(args.pos_weight, i),
                                  &l, &gx, &gy);
    values[i] = l;
    if (grad_logits) grad_logits[i] = gx / grad_div;
    if (grad_targets) grad_targets[i] = gy / grad_div;
  }
  if (loss == nullptr) return;
  switch (args.reduction) {
    case Reduction::kNone:
      for (int64_t i = 0; i < n; ++i) loss[i] = values[i] / count;
      break;
    case Reduction::kPerSampleMean: {
      const int64_t rows = LossCount(args);
      for (int64_t r = 0; r < rows; ++r) {
        ExactSum s;
        for (int64_t j = 0; j < args.last_dim; ++j) s.Add(values[r * args.last_dim + j]);
        loss[r] = s.Value() / static_cast<double>(args.last_dim) / count;
      }
      break;
    }
    case Reduction::kSum:
    case Reduction::kMean: {
      ExactSum s;
      for (double v : values) s.Add(v);
      double v = s.Value() / count;
      if (args.reduction == Reduction::kMean) v /= div.mean_n;
      loss[0] = v;
      break;
    }
  }
}

}  // namespace lossd::kernels
