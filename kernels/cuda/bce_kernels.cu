// CUDA kernels of the backend: the fused BCE-with-logits kernel (LaunchBce) and the generic
// kernel for every other option (LaunchGeneric). Design: docs/kernels.md sections 2 to 4.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "kernels/cuda/bce_device_math.h"
#include "kernels/src/bce_math.h"
#include "kernels/cuda/cuda_kernels.h"
#include "lossd/kernels/bce.h"
#include "lossd/kernels/dtype.h"
#include "lossd/kernels/exact_sum.h"

namespace lossd::kernels {
namespace cuda {
namespace {

constexpr int kHalfBlock = static_cast<int>(kReduceBlock / 2);
static_assert(kReduceBlock == 8 * kThreads, "each thread owns 8 elements of a block");

// n / d for 0 <= n < 2^31 and 1 <= d < 2^31 (Granlund-Montgomery with a 32-bit multiplier:
// m = ceil(2^(31+s) / d), s = ceil(log2 d); the error term is below 1/d for n < 2^31).
struct FastDiv {
  uint32_t m = 0x80000000u;
  int shift = 31;

  static FastDiv Make(uint32_t d) {
    int s = 0;
    while ((uint64_t{1} << s) < d) ++s;
    FastDiv f;
    f.m = static_cast<uint32_t>(((uint64_t{1} << (31 + s)) + d - 1) / d);
    f.shift = 31 + s;
    return f;
  }
  __device__ __forceinline__ uint32_t Div(uint32_t n) const {
    return static_cast<uint32_t>((static_cast<uint64_t>(n) * m) >> shift);
  }
};

struct OperandParams {
  const void* data = nullptr;  // nullptr: absent (reads 1)
  int dtype = 1;
  bool full = false;  // inner 1, period numel, aligned for 4-element vector loads
  // Each aligned group of 4 elements reads 4 consecutive values from a 4-aligned index (inner 1,
  // period a multiple of 4, data aligned): one vector load, e.g. a weight [C] with C % 4 == 0.
  bool vec_period = false;
  bool same4 = false;  // inner a multiple of 4: the 4 elements of a group share one value
  int64_t inner = 1;
  int64_t period = 1;
  // Element i of this launch is element i + offset of the operand's index space (a chunk of a
  // larger request: DeviceBce::element_offset); 0 otherwise. A multiple of 4 whenever `full`,
  // `vec_period` or `same4` is set, so that groups of 4 stay aligned.
  int64_t offset = 0;
  FastDiv inner_div, period_div;  // valid when Params::small
};

// The fused kernel's launch parameters, passed to the device by value: what LaunchBce derives
// from DeviceBce for the device (divisors in float and double, vector and index choices), the
// loss options taken from DeviceBce::element as ResolveLoss formed them.
struct Params {
  const void* x;
  const void* y;
  OperandParams w, p;
  void* loss;  // kNone only
  void* gx;
  void* gy;
  double* sums;  // reducing kernels only
  int64_t numel;
  int64_t nblocks;
  double div_d;    // gradient divisor: count * numel for MEAN, count otherwise (1: none)
  double inv_div;  // 1 / div_d
  float div_f;      // all-float kernel: div_d when exact in float, else 1
  float rdiv_f;     // 1 / div_f rounded
  bool div_exact_f;  // div_d is exact in float (the all-float kernel divides in float)
  bool scale;        // div_d != 1
  double loss_div;   // kNone losses are divided by it (the normalize count; 1: none)
  bool smooth;         // label smoothing: y' = y keep + half (keep = 1 - s, half = s / 2)
  double smooth_keep;  // 1 - s (1 without smoothing); dl/dy of the raw target is scaled by it
  double smooth_half;  // s / 2
  bool has_ignore;   // targets equal to ignore_index give 0 (only if the compute type holds it)
  float ignore_f;    // ignore_index for float targets
  double ignore_d;   // ignore_index for float64 targets
  bool all_float;  // BceElementF32 where it applies (float compute, float-exact y, w, p)
  bool vec;    // x, y and outputs allow 4-element vector accesses
  bool small;  // every index < 2^31: 32-bit operand index arithmetic
  // Segmented launches (LaunchBceSegments): the launch block of this evaluation's block 0.
  int64_t first_block;
};

template <typename T>
struct alignas(4 * sizeof(T)) Pack4 {
  T v[4];
};

template <typename TX>
struct ComputeType {
  using type = float;
};
template <>
struct ComputeType<double> {
  using type = double;
};

template <typename TC>
__device__ __forceinline__ TC Cvt(float v) {
  return static_cast<TC>(v);
}
template <typename TC>
__device__ __forceinline__ TC Cvt(double v) {
  return static_cast<TC>(v);
}
template <typename TC>
__device__ __forceinline__ TC Cvt(__half v) {
  return static_cast<TC>(__half2float(v));
}
template <typename TC>
__device__ __forceinline__ TC Cvt(__nv_bfloat16 v) {
  return static_cast<TC>(__bfloat162float(v));
}

// Rounds a result to the output dtype; half types go through float, as the CPU backend does.
template <typename TX>
__device__ __forceinline__ TX Store(double v) {
  if constexpr (std::is_same_v<TX, double>) {
    return v;
  } else if constexpr (std::is_same_v<TX, float>) {
    return static_cast<float>(v);
  } else if constexpr (std::is_same_v<TX, __half>) {
    return __float2half_rn(static_cast<float>(v));
  } else {
    return __float2bfloat16_rn(static_cast<float>(v));
  }
}

// The same for a float result (the all-float kernel).
template <typename TX>
__device__ __forceinline__ TX Store(float v) {
  if constexpr (std::is_same_v<TX, float> || std::is_same_v<TX, double>) {
    return v;
  } else if constexpr (std::is_same_v<TX, __half>) {
    return __float2half_rn(v);
  } else {
    return __float2bfloat16_rn(v);
  }
}

template <typename TC, typename T>
__device__ __forceinline__ void Load4(const T* __restrict__ p, int64_t i0, TC* out) {
  const Pack4<T> v = *reinterpret_cast<const Pack4<T>*>(p + i0);
#pragma unroll
  for (int k = 0; k < 4; ++k) out[k] = Cvt<TC>(v.v[k]);
}

template <typename TX, typename TV>
__device__ __forceinline__ void Store4(void* p, int64_t i0, const TV* in) {
  Pack4<TX> v;
#pragma unroll
  for (int k = 0; k < 4; ++k) v.v[k] = Store<TX>(in[k]);
  *reinterpret_cast<Pack4<TX>*>(static_cast<TX*>(p) + i0) = v;
}

// Element j of an operand whose dtype is known only at run time (a uniform branch).
template <typename TC>
__device__ __forceinline__ TC LoadDyn(int dtype, const void* p, int64_t j) {
  switch (dtype) {
    case static_cast<int>(DType::kFloat64):
      return Cvt<TC>(static_cast<const double*>(p)[j]);
    case static_cast<int>(DType::kFloat16):
      return Cvt<TC>(static_cast<const __half*>(p)[j]);
    case static_cast<int>(DType::kBFloat16):
      return Cvt<TC>(static_cast<const __nv_bfloat16*>(p)[j]);
    default:
      return Cvt<TC>(static_cast<const float*>(p)[j]);
  }
}

template <typename TC>
__device__ __forceinline__ void LoadVecDyn(int dtype, const void* p, int64_t i0, TC* out) {
  switch (dtype) {
    case static_cast<int>(DType::kFloat64):
      return Load4(static_cast<const double*>(p), i0, out);
    case static_cast<int>(DType::kFloat16):
      return Load4(static_cast<const __half*>(p), i0, out);
    case static_cast<int>(DType::kBFloat16):
      return Load4(static_cast<const __nv_bfloat16*>(p), i0, out);
    default:
      return Load4(static_cast<const float*>(p), i0, out);
  }
}

// The value index of element i in operand o: (i / inner) % period, by the multiply-shift
// divisions when `small`.
__device__ __forceinline__ int64_t OperandIndex(const OperandParams& o, int64_t i, bool small) {
  if (small) {
    const uint32_t q = o.inner_div.Div(static_cast<uint32_t>(i));
    return q - o.period_div.Div(q) * static_cast<uint32_t>(o.period);
  }
  return (i / o.inner) % o.period;
}

// Operand values of elements i0..i0+3 (i0 a multiple of 4; indices past numel stay in range),
// shifted by the operand's offset.
template <typename TC>
__device__ __forceinline__ void LoadOperand4(const OperandParams& o, int64_t i_local, bool whole,
                                             bool small, TC* out) {
  if (o.data == nullptr) {
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = TC(1);
    return;
  }
  const int64_t i0 = i_local + o.offset;
  if (o.full && whole) return LoadVecDyn(o.dtype, o.data, i0, out);
  if (o.vec_period) {
    const int64_t j = small ? static_cast<int64_t>(static_cast<uint32_t>(i0) -
                                                   o.period_div.Div(static_cast<uint32_t>(i0)) *
                                                       static_cast<uint32_t>(o.period))
                            : i0 % o.period;
    return LoadVecDyn(o.dtype, o.data, j, out);
  }
  if (o.same4) {
    const TC v = LoadDyn<TC>(o.dtype, o.data, OperandIndex(o, i0, small));
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = v;
    return;
  }
  int64_t r, j;
  if (small) {
    const uint32_t n = static_cast<uint32_t>(i0);
    const uint32_t q = o.inner_div.Div(n);
    r = n - q * static_cast<uint32_t>(o.inner);
    j = q - o.period_div.Div(q) * static_cast<uint32_t>(o.period);
  } else {
    const int64_t q = i0 / o.inner;
    r = i0 - q * o.inner;
    j = q % o.period;
  }
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    out[k] = LoadDyn<TC>(o.dtype, o.data, j);
    if (++r == o.inner) {
      r = 0;
      if (++j == o.period) j = 0;
    }
  }
}

// One element; results in double, rounded once when stored.
__device__ __forceinline__ void Element(float x, double y, double w, double p, double* l,
                                        double* gx, double* gy) {
  internal::BceElementMixed(x, y, w, p, l, gx, gy);
}
__device__ __forceinline__ void Element(double x, double y, double w, double p, double* l,
                                        double* gx, double* gy) {
  internal::BceElement<double>(x, y, w, p, l, gx, gy);
}

// A gradient divided by div_d (MEAN: count * numel; normalize: count). float outputs multiply
// by the rounded 1/div_d (its 2^-53 error vanishes in the rounding to float); float64
// divides, as the CPU backend does.
template <typename TC>
__device__ __forceinline__ double GradScale(double g, const Params& P) {
  if constexpr (std::is_same_v<TC, double>) {
    return g / P.div_d;
  } else {
    return g * P.inv_div;
  }
}

// Whether a target equals ignore_index, compared in the targets' compute type as the CPU
// backend compares them.
template <typename TYC>
__device__ __forceinline__ bool Ignored(TYC y, const Params& P) {
  if constexpr (std::is_same_v<TYC, double>) {
    return P.has_ignore && y == P.ignore_d;
  } else {
    return P.has_ignore && y == P.ignore_f;
  }
}

// Float kernels fit 64 registers (4 blocks of 256 per SM); float64 ones need about 104.
template <typename TX>
constexpr int kMinBlocks = std::is_same_v<TX, double> ? 2 : 4;

// Logits and targets of the thread's elements: x[0..3] from i0 = base, x[4..7] from
// base + kHalfBlock; whole[h] tells whether all four of half h exist. Missing elements read 0.
template <typename TC, typename TYC, typename TX, typename TY>
__device__ __forceinline__ void LoadLogitsTargets(const TX* __restrict__ xp,
                                                  const TY* __restrict__ yp, int64_t base,
                                                  const Params& P, TC* x, TYC* y, bool* whole) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t i0 = base + h * kHalfBlock;
    whole[h] = i0 + 4 <= P.numel;
    if (whole[h] && P.vec) {
      Load4(xp, i0, x + 4 * h);
      Load4(yp, i0, y + 4 * h);
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const bool in = i0 + k < P.numel;
        x[4 * h + k] = in ? Cvt<TC>(xp[i0 + k]) : TC(0);
        y[4 * h + k] = in ? Cvt<TYC>(yp[i0 + k]) : TYC(0);
      }
    }
  }
}

// Writes the requested outputs of elements i0..i0+3 (losses only without a reduction).
template <typename TX, bool kReduce, typename TV>
__device__ __forceinline__ void StoreOutputs(const Params& P, int64_t i0, bool whole,
                                             const TV* l, const TV* gx, const TV* gy) {
  if (whole && P.vec) {
    if (!kReduce && P.loss) Store4<TX>(P.loss, i0, l);
    if (P.gx) Store4<TX>(P.gx, i0, gx);
    if (P.gy) Store4<TX>(P.gy, i0, gy);
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (i0 + k >= P.numel) break;
      if (!kReduce && P.loss) static_cast<TX*>(P.loss)[i0 + k] = Store<TX>(l[k]);
      if (P.gx) static_cast<TX*>(P.gx)[i0 + k] = Store<TX>(gx[k]);
      if (P.gy) static_cast<TX*>(P.gy)[i0 + k] = Store<TX>(gy[k]);
    }
  }
}

// The fixed tree of kernels.h over block b's element losses l (the thread's elements as
// LoadLogitsTargets lays them out): v[j] += v[j + h] for h = 1024 ... 1, zero-padded. The first
// level adds the thread's own pairs in registers; then each thread computes two levels at once
// from four values in the tree's order, (v[j] + v[j+2h]) + (v[j+h] + v[j+3h]), so the levels
// 512 and 256, then 128 and 64, take one barrier each; the last 32 go through warp shuffles.
// `tree` holds two buffers of kHalfBlock doubles, used by alternate iterations (`parity`): a
// buffer is written again only after every thread has passed the next iteration's first
// barrier, so no barrier is needed at the end. The block's sum goes to sums[b].
template <typename TV>
__device__ __forceinline__ void BlockTreeSum(double* tree_pair, int parity, const TV* l,
                                             int64_t base, int64_t b, int64_t numel,
                                             double* sums) {
  double* tree = tree_pair + parity * kHalfBlock;
  const int t = threadIdx.x;
  if ((b + 1) * kReduceBlock <= numel) {  // a whole block (uniform): no padding
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      tree[4 * t + k] = static_cast<double>(l[k]) + static_cast<double>(l[4 + k]);  // h = 1024
    }
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const double lo = base + k < numel ? static_cast<double>(l[k]) : 0.0;
      const double hi = base + kHalfBlock + k < numel ? static_cast<double>(l[4 + k]) : 0.0;
      tree[4 * t + k] = lo + hi;  // h = 1024
    }
  }
  __syncthreads();
  // h = 512 and 256: thread t reads tree[t + 256 m] and writes only tree[t].
  tree[t] = (tree[t] + tree[t + 512]) + (tree[t + 256] + tree[t + 768]);
  __syncthreads();
  if (t < 64) {  // h = 128 and 64
    tree[t] = (tree[t] + tree[t + 128]) + (tree[t + 64] + tree[t + 192]);
  }
  __syncthreads();
  if (t < 32) {
    double s = tree[t] + tree[t + 32];  // h = 32
#pragma unroll
    for (int h = 16; h >= 1; h /= 2) s += __shfl_down_sync(0xffffffffu, s, h);
    if (t == 0) sums[b] = s;
  }
}

// One reduction block b of P with the element math in double: BceKernel's loop body, also
// the segmented kernel's.
template <typename TX, typename TY, bool kReduce, bool kSmooth>
__device__ __forceinline__ void BceBlock(const Params& P, int64_t b, double* tree, int parity) {
  using TC = typename ComputeType<TX>::type;
  // Targets stay float for float compute unless they are float64 (then exact in double).
  using TYC = std::conditional_t<std::is_same_v<TY, double>, double, TC>;
  const TX* __restrict__ xp = static_cast<const TX*>(P.x);
  const TY* __restrict__ yp = static_cast<const TY*>(P.y);
  {
    const int64_t base = b * kReduceBlock + 4 * threadIdx.x;
    TC x[8];
    TYC y[8];
    bool whole[2];
    LoadLogitsTargets(xp, yp, base, P, x, y, whole);
    double l[8];  // element losses, kept for the reduction tree
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t i0 = base + h * kHalfBlock;
      double w[4], p[4];  // operands load as double (small ones are uploaded as double)
      LoadOperand4(P.w, i0, whole[h], P.small, w);
      LoadOperand4(P.p, i0, whole[h], P.small, p);
      double gx[4], gy[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int e = 4 * h + k;
        const double ys = kSmooth ? internal::SmoothedTarget(y[e], P.smooth_keep, P.smooth_half)
                                  : static_cast<double>(y[e]);
        Element(x[e], ys, w[k], p[k], &l[e], &gx[k], &gy[k]);
        if (kSmooth) gy[k] *= P.smooth_keep;  // dl/dy of the raw target
        if (P.scale) {
          gx[k] = GradScale<TC>(gx[k], P);
          gy[k] = GradScale<TC>(gy[k], P);
        }
        if (Ignored(y[e], P)) {
          l[e] = 0.0;
          gx[k] = 0.0;
          gy[k] = 0.0;
        }
        if (!kReduce && P.loss_div != 1.0) l[e] /= P.loss_div;
      }
      StoreOutputs<TX, kReduce>(P, i0, whole[h], l + 4 * h, gx, gy);
    }
    if constexpr (kReduce) BlockTreeSum(tree, parity, l, base, b, P.numel, P.sums);
  }
}

// Kernel with the element math in double (BceElementMixed for float and half logits,
// BceElement<double> for float64), results rounded once when stored. kSmooth: label smoothing
// (a separate instantiation, as in BceKernelF32).
template <typename TX, typename TY, bool kReduce, bool kSmooth>
__global__ void __launch_bounds__(kThreads, kMinBlocks<TX>) BceKernel(const Params P) {
  __shared__ double tree[kReduce ? 2 * kHalfBlock : 1];
  int parity = 0;  // BlockTreeSum's buffer
  for (int64_t b = blockIdx.x; b < P.nblocks; b += gridDim.x, parity ^= 1) {
    BceBlock<TX, TY, kReduce, kSmooth>(P, b, tree, parity);
  }
}

// An element that BceElementF32 declines (far, infinite or NaN inputs, overflow), for the
// all-float kernel: BceElementMixed, the gradients divided by div (Params::div_d) in
// double, each result rounded once to float, as the CPU kernel's FixRareLanes does. Out of
// line: rare, and its double math would otherwise take registers from the float path.
struct F32Result {
  float l, gx, gy;
};
__device__ __noinline__ F32Result RareElementF32(float x, float y, float w, float p, double div) {
  double l, gx, gy;
  internal::BceElementMixed(x, y, w, p, &l, &gx, &gy);
  return {static_cast<float>(l), static_cast<float>(gx / div), static_cast<float>(gy / div)};
}

// The same under label smoothing: ys is the smoothed target, and dl/dy (of the raw target) is
// scaled by keep = 1 - s before the division.
__device__ __noinline__ F32Result RareElementF32Smoothed(float x, double ys, float w, float p,
                                                         double div, double keep) {
  double l, gx, gy;
  internal::BceElementMixed(x, ys, w, p, &l, &gx, &gy);
  return {static_cast<float>(l), static_cast<float>(gx / div),
          static_cast<float>(gy * keep / div)};
}

// g / div_d in double, rounded once: gradients when the divisor is not exact in float. Out of
// line, so that the compiler does not evaluate it (predicated off) beside the float path.
__device__ __noinline__ float GradScaleWide(float g, double inv_div) {
  return static_cast<float>(static_cast<double>(g) * inv_div);
}

// Gradients of the all-float kernel, in place: g / div_d (MEAN: count * numel; normalize:
// count), as the CPU kernel divides: in float when the divisor is exact in float (q = g r,
// then one FMA correction, its DivideByReciprocal), else in double (uniform branches).
__device__ __forceinline__ void GradScale4(float* g, const Params& P) {
  if (!P.scale) return;
  if (P.div_exact_f) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float q = __fmul_rn(g[k], P.rdiv_f);
      g[k] = fmaf(fmaf(-q, P.div_f, g[k]), P.rdiv_f, q);
    }
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) g[k] = GradScaleWide(g[k], P.inv_div);
  }
}

// All-float kernel (DeviceBce::float_math) for float32, float16 and bfloat16 logits with
// non-float64 targets: internal::BceElementF32 per element, branch-free, with the rare elements
// it declines recomputed by RareElementF32. Operands load as float (the backend uploads them
// as float32 for this kernel); losses enter the reduction tree as the float values stored.
// kSmooth: label smoothing (a separate instantiation, so that the kernels without it keep
// their code).
// Label smoothing with a reduction loads the next block's logits and targets before this
// block's tree, so that their latency overlaps the tree's barriers, with 3 resident blocks per
// SM (80 registers, no spills). It pays off only there (docs/kernels.md section 2; the
// measurements, plain MEAN included, are in docs/perf.md).
template <bool kReduce, bool kSmooth>
constexpr bool kPrefetchF32 = kReduce && kSmooth;

// The all-float kernel's work on the thread's elements of one reduction block (base: its first
// element, x, y and whole as LoadLogitsTargets loaded them): outputs stored, element losses in
// l for the tree. BceKernelF32's loop body between the loads and the tree; also the segmented
// kernel's.
template <typename TX, bool kReduce, bool kSmooth>
__device__ __forceinline__ void F32Block(const Params& P, int64_t base, const float* x,
                                         const float* y, const bool* whole, float* l) {
  {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t i0 = base + h * kHalfBlock;
      float w[4], p[4];
      LoadOperand4(P.w, i0, whole[h], P.small, w);
      LoadOperand4(P.p, i0, whole[h], P.small, p);
      float gx[4], gy[4], l1p[4];
      bool ok[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int e = 4 * h + k;
        // Coefficients: label smoothing forms them from the smoothed target in double.
        float a, b;
        if constexpr (kSmooth) {
          internal::CoefF32Smoothed(
              internal::SmoothedTarget(y[e], P.smooth_keep, P.smooth_half), w[k], p[k], &a, &b);
        } else {
          internal::CoefF32(y[e], w[k], p[k], &a, &b);
        }
        ok[k] = internal::BceElementF32Coef(x[e], a, b, &l[e], &gx[k], &l1p[k]);
      }
      GradScale4(gx, P);
      if (P.gy) {  // uniform: kernels without dl/dy skip this
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if constexpr (kSmooth) {
            gy[k] = internal::BceGradTargetsF32Smoothed(x[4 * h + k], w[k], p[k], l1p[k],
                                                        P.smooth_keep);
          } else {
            gy[k] = internal::BceGradTargetsF32(x[4 * h + k], w[k], p[k], l1p[k]);
          }
        }
        GradScale4(gy, P);
      }
      // One branch per group of 4 in the common case, where every element was handled.
      if (!(ok[0] && ok[1] && ok[2] && ok[3])) {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (!ok[k]) {
            const int e = 4 * h + k;
            F32Result r;
            if constexpr (kSmooth) {
              r = RareElementF32Smoothed(
                  x[e], internal::SmoothedTarget(y[e], P.smooth_keep, P.smooth_half), w[k], p[k],
                  P.div_d, P.smooth_keep);
            } else {
              r = RareElementF32(x[e], y[e], w[k], p[k], P.div_d);
            }
            l[e] = r.l;
            gx[k] = r.gx;
            gy[k] = r.gy;
          }
        }
      }
      // ignore_index and normalize (uniform branches; the CPU kernel's order: zero the ignored
      // elements, then divide the kept losses in double).
      if (P.has_ignore) {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (Ignored(y[4 * h + k], P)) {
            l[4 * h + k] = 0.0f;
            gx[k] = 0.0f;
            gy[k] = 0.0f;
          }
        }
      }
      if (!kReduce && P.loss_div != 1.0) {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          l[4 * h + k] = static_cast<float>(static_cast<double>(l[4 * h + k]) / P.loss_div);
        }
      }
      StoreOutputs<TX, kReduce>(P, i0, whole[h], l + 4 * h, gx, gy);
    }
  }
}

template <typename TX, typename TY, bool kReduce, bool kSmooth>
__global__ void __launch_bounds__(kThreads, (kPrefetchF32<kReduce, kSmooth> ? 3 : 4))
    BceKernelF32(const Params P) {
  constexpr bool kPrefetch = kPrefetchF32<kReduce, kSmooth>;
  __shared__ double tree[kReduce ? 2 * kHalfBlock : 1];
  const TX* __restrict__ xp = static_cast<const TX*>(P.x);
  const TY* __restrict__ yp = static_cast<const TY*>(P.y);
  int parity = 0;  // BlockTreeSum's buffer
  float x[8], y[8];
  bool whole[2];
  if (kPrefetch && blockIdx.x < P.nblocks) {
    LoadLogitsTargets(xp, yp, blockIdx.x * kReduceBlock + 4 * threadIdx.x, P, x, y, whole);
  }
  for (int64_t b = blockIdx.x; b < P.nblocks; b += gridDim.x, parity ^= 1) {
    const int64_t base = b * kReduceBlock + 4 * threadIdx.x;
    if constexpr (!kPrefetch) LoadLogitsTargets(xp, yp, base, P, x, y, whole);
    float l[8];
    F32Block<TX, kReduce, kSmooth>(P, base, x, y, whole, l);
    if constexpr (kPrefetch) {
      if (b + gridDim.x < P.nblocks) {
        LoadLogitsTargets(xp, yp, base + int64_t{gridDim.x} * kReduceBlock, P, x, y, whole);
      }
    }
    if constexpr (kReduce) BlockTreeSum(tree, parity, l, base, b, P.numel, P.sums);
  }
}

// The segmented kernel (LaunchBceSegments): launch block g is block g - first_block of
// evaluation block_item[g], computed by the same block code as that evaluation's own launch
// (BceBlock, or F32Block without the prefetch, which changes no value), so every element and
// block sum is bitwise the same. Parameters are read from device memory (uniform per block).
template <typename TX, typename TY, bool kReduce, bool kF32, bool kSmooth>
__global__ void __launch_bounds__(kThreads, kF32 ? 4 : kMinBlocks<TX>)
    BceSegmentsKernel(const Params* __restrict__ items, const int32_t* __restrict__ block_item,
                      int64_t total_blocks) {
  __shared__ double tree[kReduce ? 2 * kHalfBlock : 1];
  int parity = 0;  // BlockTreeSum's buffer
  for (int64_t g = blockIdx.x; g < total_blocks; g += gridDim.x, parity ^= 1) {
    const Params& P = items[block_item[g]];
    const int64_t b = g - P.first_block;
    if constexpr (kF32) {
      const int64_t base = b * kReduceBlock + 4 * threadIdx.x;
      float x[8], y[8];
      bool whole[2];
      LoadLogitsTargets(static_cast<const TX*>(P.x), static_cast<const TY*>(P.y), base, P, x, y,
                        whole);
      float l[8];
      F32Block<TX, kReduce, kSmooth>(P, base, x, y, whole, l);
      if constexpr (kReduce) BlockTreeSum(tree, parity, l, base, b, P.numel, P.sums);
    } else {
      BceBlock<TX, TY, kReduce, kSmooth>(P, b, tree, parity);
    }
  }
}

template <typename TX, typename TY, bool kReduce, bool kF32, bool kSmooth>
constexpr auto KernelOf() {
  if constexpr (kF32) {
    return BceKernelF32<TX, TY, kReduce, kSmooth>;
  } else {
    return BceKernel<TX, TY, kReduce, kSmooth>;
  }
}

// Multiprocessors of the current device, at least 1.
cudaError_t SmCount(int* sms) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, device);
  }
  *sms = std::max(*sms, 1);
  return err;
}

// Launches a block-looping kernel over P.nblocks reduction blocks with as many CUDA blocks as
// fit on the device at once (resident blocks per SM for this kernel, computed once).
template <auto kKernel, typename TParams>
cudaError_t LaunchResident(const TParams& P, cudaStream_t stream) {
  static const int per_sm = [] {
    int n = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kKernel, kThreads, 0) != cudaSuccess) {
      cudaGetLastError();
      n = 0;
    }
    return std::max(n, 1);
  }();
  int sms = 0;
  if (cudaError_t err = SmCount(&sms); err != cudaSuccess) return err;
  const int64_t grid = std::min<int64_t>(P.nblocks, int64_t{per_sm} * sms);
  kKernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(P);
  return cudaGetLastError();
}

template <typename TX, typename TY, bool kReduce, bool kF32, bool kSmooth = false>
cudaError_t LaunchTyped(const Params& P, cudaStream_t stream) {
  return LaunchResident<KernelOf<TX, TY, kReduce, kF32, kSmooth>()>(P, stream);
}

// The kernel of one element math (kF32) with or without reduction and label smoothing.
template <typename TX, typename TY, bool kF32>
cudaError_t LaunchMath(const Params& P, bool reduce, cudaStream_t stream) {
  if (P.smooth) {
    return reduce ? LaunchTyped<TX, TY, true, kF32, true>(P, stream)
                  : LaunchTyped<TX, TY, false, kF32, true>(P, stream);
  }
  return reduce ? LaunchTyped<TX, TY, true, kF32>(P, stream)
                : LaunchTyped<TX, TY, false, kF32>(P, stream);
}

template <typename TX, typename TY>
cudaError_t LaunchReduce(const Params& P, bool reduce, cudaStream_t stream) {
  // The all-float kernel exists for float and half logits with float or half targets.
  constexpr bool kHasF32 = !std::is_same_v<TX, double> && !std::is_same_v<TY, double>;
  if (kHasF32 && P.all_float) return LaunchMath<TX, TY, kHasF32>(P, reduce, stream);
  return LaunchMath<TX, TY, false>(P, reduce, stream);
}

template <typename TX>
cudaError_t LaunchTargets(DType targets, const Params& P, bool reduce, cudaStream_t stream) {
  switch (targets) {
    case DType::kFloat32:
      return LaunchReduce<TX, float>(P, reduce, stream);
    case DType::kFloat64:
      return LaunchReduce<TX, double>(P, reduce, stream);
    case DType::kFloat16:
      return LaunchReduce<TX, __half>(P, reduce, stream);
    case DType::kBFloat16:
      return LaunchReduce<TX, __nv_bfloat16>(P, reduce, stream);
  }
  return cudaErrorInvalidValue;
}

// ---- Segmented launches: one kernel of `kernel`'s signature over many evaluations.
template <typename TX, typename TY, bool kReduce, bool kF32, bool kSmooth>
cudaError_t LaunchSegmentsTyped(const Params* items, const int32_t* block_item,
                                int64_t total_blocks, cudaStream_t stream) {
  constexpr auto kKernel = BceSegmentsKernel<TX, TY, kReduce, kF32, kSmooth>;
  static const int per_sm = [] {
    int n = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kKernel, kThreads, 0) != cudaSuccess) {
      cudaGetLastError();
      n = 0;
    }
    return std::max(n, 1);
  }();
  int sms = 0;
  if (cudaError_t err = SmCount(&sms); err != cudaSuccess) return err;
  const int64_t grid = std::min<int64_t>(total_blocks, int64_t{per_sm} * sms);
  kKernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(items, block_item, total_blocks);
  return cudaGetLastError();
}

template <typename TX, typename TY, bool kF32>
cudaError_t LaunchSegmentsMath(const SegmentKernel& k, const Params* items,
                               const int32_t* block_item, int64_t total_blocks,
                               cudaStream_t stream) {
  if (k.smooth) {
    return k.reduce ? LaunchSegmentsTyped<TX, TY, true, kF32, true>(items, block_item,
                                                                     total_blocks, stream)
                    : LaunchSegmentsTyped<TX, TY, false, kF32, true>(items, block_item,
                                                                      total_blocks, stream);
  }
  return k.reduce ? LaunchSegmentsTyped<TX, TY, true, kF32, false>(items, block_item,
                                                                    total_blocks, stream)
                  : LaunchSegmentsTyped<TX, TY, false, kF32, false>(items, block_item,
                                                                     total_blocks, stream);
}

template <typename TX, typename TY>
cudaError_t LaunchSegmentsReduce(const SegmentKernel& k, const Params* items,
                                 const int32_t* block_item, int64_t total_blocks,
                                 cudaStream_t stream) {
  // As LaunchReduce: the all-float kernel exists for float and half logits and targets.
  constexpr bool kHasF32 = !std::is_same_v<TX, double> && !std::is_same_v<TY, double>;
  if (kHasF32 && k.all_float) {
    return LaunchSegmentsMath<TX, TY, kHasF32>(k, items, block_item, total_blocks, stream);
  }
  return LaunchSegmentsMath<TX, TY, false>(k, items, block_item, total_blocks, stream);
}

template <typename TX>
cudaError_t LaunchSegmentsTargets(const SegmentKernel& k, const Params* items,
                                  const int32_t* block_item, int64_t total_blocks,
                                  cudaStream_t stream) {
  switch (k.targets_dtype) {
    case DType::kFloat32:
      return LaunchSegmentsReduce<TX, float>(k, items, block_item, total_blocks, stream);
    case DType::kFloat64:
      return LaunchSegmentsReduce<TX, double>(k, items, block_item, total_blocks, stream);
    case DType::kFloat16:
      return LaunchSegmentsReduce<TX, __half>(k, items, block_item, total_blocks, stream);
    case DType::kBFloat16:
      return LaunchSegmentsReduce<TX, __nv_bfloat16>(k, items, block_item, total_blocks,
                                                     stream);
  }
  return cudaErrorInvalidValue;
}

bool Aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Whether every element index (up to a reduction block past numel) and operand size fits the
// 32-bit multiply-shift division (FastDiv: n < 2^31).
bool SmallIndices(int64_t numel, const DeviceOperand& w, const DeviceOperand& p) {
  constexpr int64_t kLimit = (int64_t{1} << 31) - 1 - kReduceBlock;
  return numel <= kLimit && w.inner <= kLimit && w.period <= kLimit && p.inner <= kLimit &&
         p.period <= kLimit;
}

// `offset`: the launch's DeviceBce::element_offset (ignored for an unshifted operand).
OperandParams MakeOperandParams(const DeviceOperand& o, int64_t numel, bool small,
                                int64_t offset = 0) {
  OperandParams op;
  op.data = o.data;
  op.dtype = static_cast<int>(o.dtype);
  op.inner = o.inner;
  op.period = o.period;
  op.offset = o.unshifted ? 0 : offset;
  // The vector paths need groups of 4 that start at a multiple of 4 of the operand's index.
  const bool groups4 = op.offset % 4 == 0;
  op.full = o.data != nullptr && o.inner == 1 && o.period == op.offset + numel &&
            Aligned(o.data, 4 * ItemSize(o.dtype)) && groups4;
  op.vec_period = o.data != nullptr && !op.full && o.inner == 1 && o.period % 4 == 0 &&
                  Aligned(o.data, 4 * ItemSize(o.dtype)) && groups4;
  op.same4 = o.data != nullptr && o.inner % 4 == 0 && groups4;
  if (small) {
    op.inner_div = FastDiv::Make(static_cast<uint32_t>(o.inner));
    op.period_div = FastDiv::Make(static_cast<uint32_t>(o.period));
  }
  return op;
}

// ---- Generic kernel: every option of BceArgs (focal, ignore_index, normalize, smoothing,
// per-sample mean, per-element values). The fused kernel's layout (thread t owns elements
// 4t..4t+3 and 1024+4t..1024+4t+3 of each 2048-element reduction block, grid-stride over
// blocks), all math in double through internal::LossElement. Per element: the loss divided by
// the normalize count to `loss` (NONE), the undivided loss to `values`, gradients divided by
// count * grad_extra and rounded once; per reduction block the tree sum of the undivided
// losses to `sums` (SUM, MEAN). Passed to the device by value; `opts` is DeviceGeneric::opts.
struct GenericParams {
  const void* x = nullptr;
  const void* y = nullptr;
  int y_dtype = 1;
  OperandParams w, p;  // data, dtype, inner, period, and the FastDivs when `small`
  internal::ElementOptions<double> opts;
  const unsigned long long* ignored = nullptr;  // normalize: targets equal to ignore_index
  double count = 0.0;  // > 0: the normalize count, given (a part's whole count)
  double grad_extra = 1.0;
  void* loss = nullptr;
  double* values = nullptr;
  double* sums = nullptr;
  void* gx = nullptr;
  void* gy = nullptr;
  int64_t numel = 0;
  int64_t nblocks = 0;
  bool small = false;  // every index < 2^31: 32-bit multiply-shift division for operands
};

__device__ __forceinline__ double LoadOperand(const OperandParams& o, int64_t i, bool small) {
  if (o.data == nullptr) return 1.0;
  return LoadDyn<double>(o.dtype, o.data, OperandIndex(o, i + o.offset, small));
}

template <typename TX, bool kReduce>
__global__ void __launch_bounds__(kThreads) GenericKernel(const GenericParams P) {
  __shared__ double tree[kReduce ? 2 * kHalfBlock : 1];
  // The CPU backend's divisors: count = numel - ignored (at least 1) under normalize, else 1;
  // gradients divide by count * grad_extra (numel for MEAN, last_dim for per-sample mean).
  const double count =
      P.count > 0.0 ? P.count
      : P.ignored != nullptr ? internal::KeptCount(P.numel, static_cast<int64_t>(*P.ignored))
                             : 1.0;
  const double grad_div = count * P.grad_extra;
  const TX* __restrict__ xp = static_cast<const TX*>(P.x);
  int parity = 0;  // BlockTreeSum's buffer
  for (int64_t b = blockIdx.x; b < P.nblocks; b += gridDim.x, parity ^= 1) {
    const int64_t base = b * kReduceBlock + 4 * threadIdx.x;
    double l[8];
    // Not unrolled: the element's code (double math, focal loss's two forms) is large enough
    // that 8 copies would not fit the instruction cache; l[] then lives in local memory.
#pragma unroll 1
    for (int e = 0; e < 8; ++e) {
      const int64_t i = base + (e / 4) * kHalfBlock + e % 4;
      l[e] = 0.0;
      if (i >= P.numel) continue;
      const double x = Cvt<double>(xp[i]);
      const double y = LoadDyn<double>(P.y_dtype, P.y, i);
      double gx, gy;
      internal::LossElement<double>(P.opts, x, y, LoadOperand(P.w, i, P.small),
                                    LoadOperand(P.p, i, P.small), &l[e], &gx, &gy);
      // Divisions by 1 (no normalize; NONE) are skipped: uniform branches, same results.
      if (!kReduce && P.loss) {
        static_cast<TX*>(P.loss)[i] = Store<TX>(count != 1.0 ? l[e] / count : l[e]);
      }
      if (P.values) P.values[i] = l[e];
      if (grad_div != 1.0) {
        gx /= grad_div;
        gy /= grad_div;
      }
      if (P.gx) static_cast<TX*>(P.gx)[i] = Store<TX>(gx);
      if (P.gy) static_cast<TX*>(P.gy)[i] = Store<TX>(gy);
    }
    if constexpr (kReduce) BlockTreeSum(tree, parity, l, base, b, P.numel, P.sums);
  }
}

// Adds to *out the number of targets equal to ignore_index (exactly, as the CPU backend's
// CountIgnored compares them).
// TC is the compute type in which TY's values are exact (float for float and half targets,
// double for float64) and `ignore` is ignore_index in it: the caller counts nothing when TC
// cannot hold ignore_index, where the comparison in double would match no target. With `vec`
// (targets aligned to 4 values) the threads read groups of 4 with one vector load.
template <typename TY, typename TC>
__global__ void __launch_bounds__(kThreads)
    CountIgnoredKernel(const TY* __restrict__ y, TC ignore, int64_t n, bool vec,
                       unsigned long long* out) {
  unsigned long long c = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t tail = 0;
  if (vec) {
    const int64_t groups = n / 4;
    for (int64_t g = first; g < groups; g += stride) {
      TC v[4];
      Load4(y, 4 * g, v);
#pragma unroll
      for (int k = 0; k < 4; ++k) c += v[k] == ignore;
    }
    tail = 4 * groups;
  }
  for (int64_t i = tail + first; i < n; i += stride) c += Cvt<TC>(y[i]) == ignore;
#pragma unroll
  for (int h = 16; h >= 1; h /= 2) c += __shfl_down_sync(0xffffffffu, c, h);
  if ((threadIdx.x & 31) == 0 && c != 0) atomicAdd(out, c);
}

template <typename TX>
cudaError_t LaunchGenericTyped(const GenericParams& P, cudaStream_t stream) {
  return P.sums != nullptr ? LaunchResident<GenericKernel<TX, true>>(P, stream)
                           : LaunchResident<GenericKernel<TX, false>>(P, stream);
}

// Device pointers and options of one generic evaluation (numel > 0).
cudaError_t LaunchGenericParams(DType dtype, const GenericParams& P, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return LaunchGenericTyped<float>(P, stream);
    case DType::kFloat64:
      return LaunchGenericTyped<double>(P, stream);
    case DType::kFloat16:
      return LaunchGenericTyped<__half>(P, stream);
    case DType::kBFloat16:
      return LaunchGenericTyped<__nv_bfloat16>(P, stream);
  }
  return cudaErrorInvalidValue;
}

// The fused kernel's parameters for `a` (checked by the caller: ValidBce), and whether it
// reduces. Returns false when nothing is requested (no launch then).
bool MakeParams(const DeviceBce& a, Params* out, bool* reduce_out) {
  const internal::ElementOptions<double>& e = a.element;
  const bool reduce = a.reduction != Reduction::kNone && a.block_sums != nullptr;
  void* loss = a.reduction == Reduction::kNone ? a.loss : nullptr;
  if (loss == nullptr && a.grad_logits == nullptr && a.grad_targets == nullptr && !reduce) {
    return false;  // nothing requested
  }
  // Operand indices reach element_offset + numel (a chunk of a larger request).
  const bool small = SmallIndices(a.element_offset + a.numel, a.weight, a.pos_weight);
  Params P{};
  P.x = a.logits;
  P.y = a.targets;
  P.w = MakeOperandParams(a.weight, a.numel, small, a.element_offset);
  P.p = MakeOperandParams(a.pos_weight, a.numel, small, a.element_offset);
  P.loss = loss;
  P.gx = a.grad_logits;
  P.gy = a.grad_targets;
  P.sums = reduce ? a.block_sums : nullptr;
  P.numel = a.numel;
  P.nblocks = NumReduceBlocks(a.numel);
  // Gradient divisor as the CPU backend's Plan: the normalize count, times numel (or a part's
  // whole count) for MEAN.
  const double mean_n = a.mean_n > 0 ? a.mean_n : static_cast<double>(a.numel);
  P.div_d = a.reduction == Reduction::kMean ? a.count * mean_n : a.count;
  P.inv_div = 1.0 / P.div_d;
  P.scale = P.div_d != 1.0;
  // The all-float kernel divides as the CPU kernel does: in float when the divisor is exact in
  // float, else in double.
  P.div_exact_f = static_cast<double>(static_cast<float>(P.div_d)) == P.div_d;
  P.div_f = P.div_exact_f ? static_cast<float>(P.div_d) : 1.0f;
  P.rdiv_f = 1.0f / P.div_f;
  P.loss_div = a.reduction == Reduction::kNone ? a.count : 1.0;
  // Targets are compared in their compute type: float (float, half targets) or double; an
  // ignore_index that float cannot hold matches no float target (as on the CPU).
  P.has_ignore = e.has_ignore_index &&
                 (a.targets_dtype == DType::kFloat64 ||
                  static_cast<double>(static_cast<float>(e.ignore_index)) == e.ignore_index);
  P.ignore_f = static_cast<float>(e.ignore_index);
  // The smoothing coefficients as ResolveLoss formed them: keep = 1 - s, half = s * 0.5.
  P.smooth = e.smoothing != 0.0;
  P.smooth_keep = e.smooth_keep;
  P.smooth_half = e.smooth_half;
  P.ignore_d = e.ignore_index;
  P.all_float = a.float_math;
  P.small = small;
  const size_t vx = 4 * ItemSize(a.dtype);
  P.vec = Aligned(a.logits, vx) && Aligned(a.targets, 4 * ItemSize(a.targets_dtype)) &&
          Aligned(P.loss, vx) && Aligned(P.gx, vx) && Aligned(P.gy, vx);
  P.first_block = 0;
  *out = P;
  *reduce_out = reduce;
  return true;
}

bool ValidBce(const DeviceBce& a) {
  const internal::ElementOptions<double>& e = a.element;
  return !(a.numel < 0 || !(a.count >= 1.0) || !(e.smoothing >= 0.0 && e.smoothing <= 1.0) ||
           ItemSize(a.dtype) == 0 || ItemSize(a.targets_dtype) == 0 || a.weight.inner < 1 ||
           a.weight.period < 1 || a.pos_weight.inner < 1 || a.pos_weight.period < 1 ||
           (a.weight.data != nullptr && ItemSize(a.weight.dtype) == 0) ||
           (a.pos_weight.data != nullptr && ItemSize(a.pos_weight.dtype) == 0) ||
           a.element_offset < 0);
}

}  // namespace

cudaError_t LaunchBce(const DeviceBce& a, cudaStream_t stream) {
  if (!ValidBce(a)) return cudaErrorInvalidValue;
  if (a.numel == 0) return cudaSuccess;
  Params P;
  bool reduce = false;
  if (!MakeParams(a, &P, &reduce)) return cudaSuccess;  // nothing requested
  switch (a.dtype) {
    case DType::kFloat32:
      return LaunchTargets<float>(a.targets_dtype, P, reduce, stream);
    case DType::kFloat64:
      return LaunchTargets<double>(a.targets_dtype, P, reduce, stream);
    case DType::kFloat16:
      return LaunchTargets<__half>(a.targets_dtype, P, reduce, stream);
    case DType::kBFloat16:
      return LaunchTargets<__nv_bfloat16>(a.targets_dtype, P, reduce, stream);
  }
  return cudaErrorInvalidValue;
}

size_t SegmentParamsBytes() { return sizeof(Params); }

cudaError_t EncodeSegment(const DeviceBce& a, int64_t first_block, void* dst,
                          SegmentKernel* kernel) {
  if (!ValidBce(a) || a.numel == 0 || first_block < 0) return cudaErrorInvalidValue;
  Params P;
  bool reduce = false;
  if (!MakeParams(a, &P, &reduce)) return cudaErrorInvalidValue;  // nothing requested
  P.first_block = first_block;
  std::memcpy(dst, &P, sizeof(P));
  kernel->dtype = a.dtype;
  kernel->targets_dtype = a.targets_dtype;
  kernel->reduce = reduce;
  // LaunchReduce's choice: the all-float kernel only for non-float64 logits and targets.
  kernel->all_float =
      a.float_math && a.dtype != DType::kFloat64 && a.targets_dtype != DType::kFloat64;
  kernel->smooth = P.smooth;
  return cudaSuccess;
}

cudaError_t LaunchBceSegments(const SegmentKernel& k, const void* params,
                              const int32_t* block_item, int64_t total_blocks,
                              cudaStream_t stream) {
  if (total_blocks <= 0) return total_blocks == 0 ? cudaSuccess : cudaErrorInvalidValue;
  const Params* items = static_cast<const Params*>(params);
  switch (k.dtype) {
    case DType::kFloat32:
      return LaunchSegmentsTargets<float>(k, items, block_item, total_blocks, stream);
    case DType::kFloat64:
      return LaunchSegmentsTargets<double>(k, items, block_item, total_blocks, stream);
    case DType::kFloat16:
      return LaunchSegmentsTargets<__half>(k, items, block_item, total_blocks, stream);
    case DType::kBFloat16:
      return LaunchSegmentsTargets<__nv_bfloat16>(k, items, block_item, total_blocks, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t LaunchCountIgnored(DType targets_dtype, const void* targets, double ignore_index,
                               int64_t numel, unsigned long long* out, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(out, 0, sizeof(unsigned long long), stream);
  if (err != cudaSuccess || numel <= 0) return err;
  // Non-float64 targets compare in float, exactly as in double when float holds ignore_index;
  // otherwise (NaN included) no target matches and the count stays 0.
  const float ignore_f = static_cast<float>(ignore_index);
  if (targets_dtype != DType::kFloat64 && !(static_cast<double>(ignore_f) == ignore_index)) {
    return cudaSuccess;
  }
  int sms = 0;
  if (err = SmCount(&sms); err != cudaSuccess) return err;
  const bool vec = Aligned(targets, 4 * ItemSize(targets_dtype));
  const int64_t blocks = (numel / (vec ? 4 : 1) + kThreads - 1) / kThreads;
  const unsigned grid = static_cast<unsigned>(std::clamp<int64_t>(blocks, 1, int64_t{8} * sms));
  switch (targets_dtype) {
    case DType::kFloat64:
      CountIgnoredKernel<<<grid, kThreads, 0, stream>>>(static_cast<const double*>(targets),
                                                        ignore_index, numel, vec, out);
      break;
    case DType::kFloat16:
      CountIgnoredKernel<<<grid, kThreads, 0, stream>>>(static_cast<const __half*>(targets),
                                                        ignore_f, numel, vec, out);
      break;
    case DType::kBFloat16:
      CountIgnoredKernel<<<grid, kThreads, 0, stream>>>(
          static_cast<const __nv_bfloat16*>(targets), ignore_f, numel, vec, out);
      break;
    default:
      CountIgnoredKernel<<<grid, kThreads, 0, stream>>>(static_cast<const float*>(targets),
                                                        ignore_f, numel, vec, out);
      break;
  }
  return cudaGetLastError();
}

cudaError_t LaunchGeneric(const DeviceGeneric& a, cudaStream_t stream) {
  if (a.numel <= 0) return cudaSuccess;
  if (a.normalize && a.count <= 0.0 && a.ignored == nullptr) return cudaErrorInvalidValue;
  GenericParams P;
  P.x = a.logits;
  P.y = a.targets;
  P.y_dtype = static_cast<int>(a.targets_dtype);
  P.small = SmallIndices(a.numel, a.weight, a.pos_weight);
  P.w = MakeOperandParams(a.weight, a.numel, P.small);
  P.p = MakeOperandParams(a.pos_weight, a.numel, P.small);
  P.opts = a.opts;
  P.grad_extra = a.grad_extra;
  P.count = a.normalize ? a.count : 0.0;
  P.loss = a.reduction == Reduction::kNone ? a.loss : nullptr;
  P.values = a.values;
  P.sums = a.reduction == Reduction::kSum || a.reduction == Reduction::kMean ? a.block_sums
                                                                              : nullptr;
  P.gx = a.grad_logits;
  P.gy = a.grad_targets;
  P.numel = a.numel;
  P.nblocks = NumReduceBlocks(a.numel);
  if (a.normalize && a.count <= 0.0) {
    const cudaError_t err =
        a.opts.has_ignore_index
            ? LaunchCountIgnored(a.targets_dtype, a.targets, a.opts.ignore_index, a.numel,
                                 a.ignored, stream)
            : cudaMemsetAsync(a.ignored, 0, sizeof(unsigned long long), stream);
    if (err != cudaSuccess) return err;
    P.ignored = a.ignored;
  }
  return LaunchGenericParams(a.dtype, P, stream);
}

}  // namespace cuda
}  // namespace lossd::kernels
