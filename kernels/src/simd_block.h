// Internal interface of the SIMD block kernels (Highway, runtime dispatch). Not public.
#ifndef LOSSD_KERNELS_SRC_SIMD_BLOCK_H_
#define LOSSD_KERNELS_SRC_SIMD_BLOCK_H_

#include <cstdint>

namespace lossd::kernels::internal {

// One run of n elements of BCE with logits in compute type T (float or double).
// x, y: n values. w, p: n values, or null for 1. loss: n outputs (required). gx, gy: n outputs
// or null when not wanted. Gradients are divided by grad_divisor + grad_divisor_lo (1 + 0 =
// none; grad_divisor_lo is what a divisor beyond T leaves over, 0 when T holds it exactly).
// Semantics of BceElement (bce_math.h); per element the result depends only
// on that element's inputs, never on its position or on n.
template <typename T>
struct BlockArgs {
  const T* x = nullptr;
  const T* y = nullptr;
  const T* w = nullptr;
  const T* p = nullptr;
  int64_t n = 0;
  T* loss = nullptr;
  T* gx = nullptr;
  T* gy = nullptr;
  T grad_divisor = T(1);
  T grad_divisor_lo = T(0);
};

// Dispatches to the best SIMD target of this CPU.
void BceBlock(const BlockArgs<float>& a);
void BceBlock(const BlockArgs<double>& a);

// TreeSumBlock (kernels.h) of n <= kReduceBlock values given as float or double, bitwise
// identical to it. `scratch`: kReduceBlock doubles.
double BlockTreeSum(const float* values, int64_t n, double* scratch);
double BlockTreeSum(const double* values, int64_t n, double* scratch);

// Whether the float block kernel of the target BceBlock dispatches to keeps float32 results
// within 4 ulp: it needs fused multiply-adds (exact products and residuals). On targets without
// them (SSE4, SSSE3, EMU128, ...) callers compute float inputs with the double kernel instead.
bool FloatBlockIsExact();

// Name of the target BceBlock currently dispatches to (e.g. "AVX3", "AVX2").
const char* BceBlockTargetName();

}  // namespace lossd::kernels::internal

#endif  // LOSSD_KERNELS_SRC_SIMD_BLOCK_H_
