// ResolveLoss: the loss spec (BceArgs) read once into a ResolvedLoss (resolved_loss.h).
#include "kernels/src/resolved_loss.h"

namespace lossd::kernels::internal {

namespace {

bool IsFloat64(DType dtype, const void* data) {
  return data != nullptr && dtype == DType::kFloat64;
}

}  // namespace

ResolvedLoss ResolveLoss(const BceArgs& args) {
  ResolvedLoss r;
  r.loss = args.loss;
  const double s = args.label_smoothing;
  r.smooth = s != 0.0;
  r.wide = args.dtype == DType::kFloat64 || IsFloat64(args.targets_dtype, args.targets) ||
           IsFloat64(args.weight.dtype, args.weight.data) ||
           IsFloat64(args.pos_weight.dtype, args.pos_weight.data) || r.smooth ||
           args.loss == Loss::kFocal;
  ElementOptions<double>& e = r.element;
  e.focal = args.loss == Loss::kFocal;
  e.has_ignore_index = args.has_ignore_index;
  e.ignore_index = args.ignore_index;
  e.smoothing = s;
  e.smooth_keep = 1.0 - s;
  e.smooth_half = s * 0.5;
  e.alpha = args.focal_alpha;
  e.gamma = args.focal_gamma;
  r.divisors = DivisorRuleOf(args);
  return r;
}

}  // namespace lossd::kernels::internal
