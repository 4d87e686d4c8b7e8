// Umbrella header of the kernels library (binary cross-entropy with logits on plain types):
// includes every public header below, each of which opens with its own contract and thread
// safety. The public headers hold plain types only: no gRPC, Highway or CUDA types.
//   dtype.h      DType, element sizes and names, half/bfloat16 and double conversions
//   operand.h    Operand (a broadcast input), MakeOperand
//   bce.h        the loss spec: Reduction, Loss, BceArgs, BceOutputs, kChunkElements, LossCount
//   exact_sum.h  deterministic reductions: kReduceBlock, ExactSum, TreeSumBlock, BlockSum
//   backend.h    Backend, the CPU and CUDA backend factories, SIMD target and CUDA probes
//   reference.h  ReferenceBce, the float64 reference (links only with lossd_kernels_reference)
// checked_math.h (overflow-checked size arithmetic) is separate. New code includes the specific
// headers it uses; this one keeps older includes working.
#ifndef LOSSD_KERNELS_KERNELS_H_
#define LOSSD_KERNELS_KERNELS_H_

#include "lossd/kernels/backend.h"
#include "lossd/kernels/bce.h"
#include "lossd/kernels/dtype.h"
#include "lossd/kernels/exact_sum.h"
#include "lossd/kernels/operand.h"
#include "lossd/kernels/reference.h"

#endif  // LOSSD_KERNELS_KERNELS_H_
