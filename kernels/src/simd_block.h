// Internal interface of the SIMD block kernels (Highway, runtime dispatch). Not public.
// BlockArgs and FocalBlockArgs are these kernels' argument lists (pointers to one run of
// inputs and outputs, the gradient divisor): they hold no loss options, which the block loops
// of cpu_backend.cc take from the resolved loss (resolved_loss.h; docs/kernels.md section 1).
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

// One run of n elements of torchvision's sigmoid focal loss in double lanes (simd_focal.cc) for
// gamma 0, 1 or 2: the semantics of FocalElement (bce_math.h), the double results within a few
// double ulps of it (Highway's exp and log1p), so float results within one float ulp of its
// rounding. x, y: n values (y already label-smoothed). w: n values, or null for 1. loss: n
// outputs (the weighted element losses). gx: n outputs, dl/dx divided by grad_divisor, or null
// when not wanted. Per element the result depends only on that element's inputs.
struct FocalBlockArgs {
  const double* x = nullptr;
  const double* y = nullptr;
  const double* w = nullptr;
  int64_t n = 0;
  double alpha = 0.25;
  double gamma = 2.0;
  double* loss = nullptr;
  double* gx = nullptr;
  double grad_divisor = 1.0;
};

// Dispatches to the best SIMD target of this CPU.
void FocalBlock(const FocalBlockArgs& a);

// Name of the target BceBlock currently dispatches to (e.g. "AVX3", "AVX2").
const char* BceBlockTargetName();

// Limits run-time dispatch of every SIMD kernel in this process, for benchmarks that compare
// targets on one machine: "native" (the best target of this CPU, the default), "avx2" (every
// AVX-512 target disabled, so x86 CPUs with AVX-512 run the AVX2 code) or "avx3" (the same as
// native on an AVX-512 CPU; false if the CPU has no AVX-512). False for an unknown name or a
// target this CPU cannot run. Not thread-safe: call before any kernel runs.
bool LimitSimdTargets(const char* name);

}  // namespace lossd::kernels::internal

#endif  // LOSSD_KERNELS_SRC_SIMD_BLOCK_H_
