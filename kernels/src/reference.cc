// The float64 scalar reference: one element at a time, straight from the formulas. Tests
// compare every backend against it; it is written for clarity, not speed.
#include <cmath>

#include "bce_math.h"
#include "lossd/kernels/kernels.h"

namespace lossd::kernels {

namespace {

double OperandAt(const Operand& op, int64_t i) {
  if (op.data == nullptr) return 1.0;
  return LoadAsDouble(op.dtype, op.data, (i / op.inner) % op.period);
}

}  // namespace

void ReferenceBce(const BceArgs& args, double* loss, double* grad_logits, double* grad_targets) {
  const int64_t n = args.numel;
  ExactSum total;
  for (int64_t i = 0; i < n; ++i) {
    const double x = LoadAsDouble(args.dtype, args.logits, i);
    const double y = LoadAsDouble(args.targets_dtype, args.targets, i);
    const double w = OperandAt(args.weight, i);
    const double p = OperandAt(args.pos_weight, i);
    double l, gx, gy;
    internal::BceElement<double>(x, y, w, p, &l, &gx, &gy);
    if (args.reduction == Reduction::kNone) {
      if (loss) loss[i] = l;
    } else {
      total.Add(l);
    }
    // Gradients of the reduced loss: MEAN divides by numel.
    if (grad_logits) grad_logits[i] = args.reduction == Reduction::kMean ? gx / n : gx;
    if (grad_targets) grad_targets[i] = args.reduction == Reduction::kMean ? gy / n : gy;
  }
  if (args.reduction != Reduction::kNone && loss) {
    const double sum = total.Value();
    loss[0] = args.reduction == Reduction::kMean ? sum / static_cast<double>(n) : sum;
  }
}

}  // namespace lossd::kernels
