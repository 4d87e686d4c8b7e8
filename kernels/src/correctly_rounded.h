// The correctly rounded path of the CPU backend (BceArgs::precision = kCorrectlyRounded):
// docs/kernels.md section 8. Internal header.
#ifndef LOSSD_KERNELS_SRC_CORRECTLY_ROUNDED_H_
#define LOSSD_KERNELS_SRC_CORRECTLY_ROUNDED_H_

#include "absl/status/status.h"
#include "lossd/kernels/bce.h"
#include "kernels/src/thread_pool.h"

namespace lossd::kernels::internal {

// Every output of `args` (kBce only) rounded once from its exact value; elements run on `pool`.
// INVALID_ARGUMENT for the focal loss and for out.loss_values (Accumulate); UNIMPLEMENTED in a
// build without MPFR; CANCELLED when should_stop fires.
absl::Status CorrectlyRoundedBce(const BceArgs& args, const BceOutputs& out, ThreadPool& pool);

// Tests only: with false, no output is decided by the double evaluation; every float32, float16
// and bfloat16 value goes through the MPFR resolution (which the fallback uses). Process-wide.
void SetCorrectlyRoundedFastPathForTesting(bool enabled);

}  // namespace lossd::kernels::internal

#endif  // LOSSD_KERNELS_SRC_CORRECTLY_ROUNDED_H_
