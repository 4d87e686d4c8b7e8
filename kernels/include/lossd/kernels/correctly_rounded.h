// The correctly rounded mode of the CPU backend (BceArgs::precision = kCorrectlyRounded,
// docs/kernels.md section 8): whether this build has it, and process-wide counters of how its
// outputs were decided (how often the MPFR fallback ran). Thread-safe.
#ifndef LOSSD_KERNELS_CORRECTLY_ROUNDED_H_
#define LOSSD_KERNELS_CORRECTLY_ROUNDED_H_

#include <cstdint>

namespace lossd::kernels {

// True when this build contains the correctly rounded path (it needs MPFR; a kernels-only
// build without MPFR returns UNIMPLEMENTED for such calls).
bool CorrectlyRoundedAvailable();

// Counters since the process started (or the last ResetCorrectlyRoundedStats), summed over all
// calls. An "output" is one value written: a per-element loss or gradient, a per-sample or a
// reduced loss.
struct CorrectlyRoundedStats {
  int64_t elements = 0;         // elements evaluated
  int64_t fast_outputs = 0;     // outputs decided by the double evaluation and its bound
  int64_t fallback_outputs = 0; // float32/16/bfloat16 outputs the bound left undecided: MPFR
  int64_t direct_outputs = 0;   // outputs computed with MPFR directly (float64 outputs,
                                // infinite logits)
  int64_t special_outputs = 0;  // NaN or infinite targets, weights or pos_weights, ignored
                                // elements: IEEE special values, no rounding decision
  int64_t reductions = 0;            // SUM / MEAN / per-sample values
  int64_t reduction_fallbacks = 0;   // of those, resolved with MPFR
  int64_t unresolved = 0;  // never expected: MPFR at its largest precision still undecided
                           // (the value nearest at that precision is returned)
  int64_t max_bits = 0;    // the largest MPFR working precision used
};
CorrectlyRoundedStats GetCorrectlyRoundedStats();
void ResetCorrectlyRoundedStats();

}  // namespace lossd::kernels

#endif  // LOSSD_KERNELS_CORRECTLY_ROUNDED_H_
