// The float64 scalar reference of the loss spec (bce.h): one element at a time, straight from
// the formulas, written for clarity rather than speed. Tests and benchmarks compare every
// backend with it. It lives in its own library, lossd_kernels_reference (kernels/src/
// reference.cc), which tests and benchmarks link and the server does not. No state; thread-safe.
#ifndef LOSSD_KERNELS_REFERENCE_H_
#define LOSSD_KERNELS_REFERENCE_H_

#include "lossd/kernels/bce.h"

namespace lossd::kernels {

// The float64 scalar reference (readable, slow). Outputs are double regardless of args.dtype:
// loss has LossCount(args) doubles; gradients numel doubles. Used by tests only.
void ReferenceBce(const BceArgs& args, double* loss, double* grad_logits, double* grad_targets);

}  // namespace lossd::kernels

#endif  // LOSSD_KERNELS_REFERENCE_H_
