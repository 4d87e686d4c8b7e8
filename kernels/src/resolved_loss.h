// One loss description, resolved once per call from the loss spec (BceArgs): what the CPU
// backend, the CUDA backend and the correctly rounded path read instead of BceArgs's loss
// options. A new loss option is read here (into ElementOptions) and nowhere else.
// Internal header, host only (CUDA host code includes it); the float64 reference
// (reference.cc) keeps its own independent handling. Semantics: docs/design.md section 3.
#ifndef LOSSD_KERNELS_SRC_RESOLVED_LOSS_H_
#define LOSSD_KERNELS_SRC_RESOLVED_LOSS_H_

#include "kernels/src/bce_math.h"
#include "kernels/src/divisors.h"
#include "lossd/kernels/bce.h"

namespace lossd::kernels::internal {

struct ResolvedLoss {
  Loss loss = Loss::kBce;
  // Compute in double (docs/design.md section 3, "Dtypes and compute precision"): any input
  // tensor is float64, or label smoothing or the focal loss is asked for (rounded
  // intermediates that float cannot keep within 4 ulp). Otherwise float may be used; the CPU
  // backend also uses double on SIMD targets without FMA, the CUDA backend chooses by the
  // logits' dtype.
  bool wide = false;
  bool smooth = false;           // label smoothing on: element.smoothing != 0
  ElementOptions<double> element;  // ignore_index, smoothing coefficients, focal alpha, gamma
  DivisorRule divisors;            // MEAN, normalize, PER_SAMPLE_MEAN, a part's whole counts
};

// Reads the loss options of `args` once. Pure; the kept count, which needs the targets, is
// resolved later by ResolvedLoss::divisors.For(ignored).
ResolvedLoss ResolveLoss(const BceArgs& args);

}  // namespace lossd::kernels::internal

#endif  // LOSSD_KERNELS_SRC_RESOLVED_LOSS_H_
