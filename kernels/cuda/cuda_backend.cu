// CUDA backend: the fused BCE-with-logits kernel and the Backend that drives it.
//
// Kernel (LaunchBce): one CUDA block of 256 threads handles one reduction block of
// kReduceBlock = 2048 consecutive elements per iteration of a grid-stride loop over blocks
// (grid = min(blocks, resident blocks per SM x SMs)). Thread t owns elements 4t..4t+3 and
// 1024+4t..1024+4t+3 of the block: 16-byte (float) vector loads and stores, coalesced across
// the warp, and exactly the pair that the first level (h = 1024) of the fixed reduction tree
// adds, so that level happens in registers. The remaining levels (h = 512..32) run in shared
// memory, h = 16..1 with warp shuffles; the block's sum (a double) goes to block_sums[b]. The
// host adds the block sums with ExactSum, so the result is bitwise reproducible.
// Per element: float32, float16 and bfloat16 logits use BceElementMixed (bce_device_math.h:
// exp, log1p and the reciprocal in float, the rest in double), float64 uses
// internal::BceElement<double>; results are rounded once to the output dtype, and the tree
// sums the element losses as computed, in double (as the CPU backend does). The targets' dtype
// is a template parameter; weight and pos_weight load as double through a dtype switch (a
// uniform branch), with 32-bit multiply-shift division for (i / inner) % period when
// numel < 2^31. Float kernels are capped at 64 registers (4 blocks of 256 threads per SM).
//
// Generic kernel (GenericKernel): every other option (focal, ignore_index, normalize, label
// smoothing, kPerSampleMean, per-element loss_values). One element per thread of a grid-stride
// loop through internal::LossElement<double>; element losses go to a device array of doubles
// and gradients, divided by the CPU backend's divisor, are rounded once to the output dtype.
// The host copies the losses back and reduces them as the CPU backend does (block tree +
// ExactSum, per-row ExactSum, or per-element division by the normalize count).
//
// Backend (CudaBackend): inputs and outputs are host pointers. Each call takes a Slot from a
// pool (a non-blocking stream plus a grow-only device buffer; at most kMaxSlots exist, further
// callers wait), copies inputs in (operands of <= 64K elements converted to double on the
// host first), launches, copies outputs back, synchronizes its stream and returns the slot.
// Copies from and to the caller's pageable memory go through the driver's staging buffers.
// Every CUDA call is checked; failures return INTERNAL with CUDA's message; nothing exits.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
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
#include "bce_device_math.h"
#include "bce_math.h"
#include "cuda_kernels.h"
#include "lossd/kernels/kernels.h"

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
  int64_t inner = 1;
  int64_t period = 1;
  FastDiv inner_div, period_div;  // valid when Params::small
};

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
  double n_double;  // numel, for MEAN gradients
  double inv_n;     // 1 / numel
  bool mean;
  bool vec;    // x, y and outputs allow 4-element vector accesses
  bool small;  // every index < 2^31: 32-bit operand index arithmetic
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

template <typename TC, typename T>
__device__ __forceinline__ void Load4(const T* __restrict__ p, int64_t i0, TC* out) {
  const Pack4<T> v = *reinterpret_cast<const Pack4<T>*>(p + i0);
#pragma unroll
  for (int k = 0; k < 4; ++k) out[k] = Cvt<TC>(v.v[k]);
}

template <typename TX>
__device__ __forceinline__ void Store4(void* p, int64_t i0, const double* in) {
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

// Operand values of elements i0..i0+3 (i0 a multiple of 4; indices past numel stay in range).
template <typename TC>
__device__ __forceinline__ void LoadOperand4(const OperandParams& o, int64_t i0, bool whole,
                                             bool small, TC* out) {
  if (o.data == nullptr) {
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = TC(1);
    return;
  }
  if (o.full && whole) return LoadVecDyn(o.dtype, o.data, i0, out);
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

// Gradient of the MEAN: g / numel. float outputs multiply by the rounded 1/numel (its 2^-53
// error vanishes in the rounding to float); float64 divides, as the CPU backend does.
template <typename TC>
__device__ __forceinline__ double MeanScale(double g, const Params& P) {
  if constexpr (std::is_same_v<TC, double>) {
    return g / P.n_double;
  } else {
    return g * P.inv_n;
  }
}

// Float kernels fit 64 registers (4 blocks of 256 per SM); float64 ones need about 104.
template <typename TX>
constexpr int kMinBlocks = std::is_same_v<TX, double> ? 2 : 4;

template <typename TX, typename TY, bool kReduce>
__global__ void __launch_bounds__(kThreads, kMinBlocks<TX>) BceKernel(const Params P) {
  using TC = typename ComputeType<TX>::type;
  __shared__ double tree[kReduce ? kHalfBlock : 1];
  const TX* __restrict__ xp = static_cast<const TX*>(P.x);
  const TY* __restrict__ yp = static_cast<const TY*>(P.y);
  const int t = threadIdx.x;
  for (int64_t b = blockIdx.x; b < P.nblocks; b += gridDim.x) {
    const int64_t base = b * kReduceBlock + 4 * t;
    // Targets stay float for float compute unless they are float64 (then exact in double).
    using TYC = std::conditional_t<std::is_same_v<TY, double>, double, TC>;
    TC x[8];
    TYC y[8];
    bool whole[2];
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
        Element(x[e], y[e], w[k], p[k], &l[e], &gx[k], &gy[k]);
        if (P.mean) {
          gx[k] = MeanScale<TC>(gx[k], P);
          gy[k] = MeanScale<TC>(gy[k], P);
        }
      }
      if (whole[h] && P.vec) {
        if (!kReduce && P.loss) Store4<TX>(P.loss, i0, l + 4 * h);
        if (P.gx) Store4<TX>(P.gx, i0, gx);
        if (P.gy) Store4<TX>(P.gy, i0, gy);
      } else {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (i0 + k >= P.numel) break;
          if (!kReduce && P.loss) static_cast<TX*>(P.loss)[i0 + k] = Store<TX>(l[4 * h + k]);
          if (P.gx) static_cast<TX*>(P.gx)[i0 + k] = Store<TX>(gx[k]);
          if (P.gy) static_cast<TX*>(P.gy)[i0 + k] = Store<TX>(gy[k]);
        }
      }
    }
    if constexpr (kReduce) {
      // The fixed tree of kernels.h: v[j] += v[j + h] for h = 1024 ... 1, zero-padded. Each
      // level writes v[0, h) and reads v[h, 2h), so it runs in place with one barrier.
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const double lo = base + k < P.numel ? l[k] : 0.0;
        const double hi = base + kHalfBlock + k < P.numel ? l[4 + k] : 0.0;
        tree[4 * t + k] = lo + hi;  // h = 1024
      }
      __syncthreads();
      tree[t] += tree[t + 512];  // h = 512
      tree[t + 256] += tree[t + 768];
      __syncthreads();
      tree[t] += tree[t + 256];  // h = 256
      __syncthreads();
      if (t < 128) tree[t] += tree[t + 128];
      __syncthreads();
      if (t < 64) tree[t] += tree[t + 64];
      __syncthreads();
      if (t < 32) {
        double s = tree[t] + tree[t + 32];  // h = 32
#pragma unroll
        for (int h = 16; h >= 1; h /= 2) s += __shfl_down_sync(0xffffffffu, s, h);
        if (t == 0) P.sums[b] = s;
      }
      __syncthreads();  // tree is reused by the next block
    }
  }
}

template <typename TX, typename TY, bool kReduce>
cudaError_t LaunchTyped(const Params& P, cudaStream_t stream) {
  // Resident blocks per SM for this instantiation, computed once (thread-safe static).
  static const int per_sm = [] {
    int n = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, BceKernel<TX, TY, kReduce>, kThreads,
                                                      0) != cudaSuccess) {
      cudaGetLastError();
      n = 0;
    }
    return std::max(n, 1);
  }();
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  }
  if (err != cudaSuccess) return err;
  const int64_t grid = std::min<int64_t>(P.nblocks, int64_t{per_sm} * std::max(sms, 1));
  BceKernel<TX, TY, kReduce><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(P);
  return cudaGetLastError();
}

template <typename TX, typename TY>
cudaError_t LaunchReduce(const Params& P, bool reduce, cudaStream_t stream) {
  return reduce ? LaunchTyped<TX, TY, true>(P, stream) : LaunchTyped<TX, TY, false>(P, stream);
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

bool Aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

OperandParams MakeOperandParams(const DeviceOperand& o, int64_t numel, bool small) {
  OperandParams op;
  op.data = o.data;
  op.dtype = static_cast<int>(o.dtype);
  op.inner = o.inner;
  op.period = o.period;
  op.full = o.data != nullptr && o.inner == 1 && o.period == numel &&
            Aligned(o.data, 4 * ItemSize(o.dtype));
  if (small) {
    op.inner_div = FastDiv::Make(static_cast<uint32_t>(o.inner));
    op.period_div = FastDiv::Make(static_cast<uint32_t>(o.period));
  }
  return op;
}

// ---- Generic kernel: every option of BceArgs (focal, ignore_index, normalize, smoothing,
// per-sample mean, per-element values). One element per thread of a grid-stride loop, all
// math in double through internal::LossElement; losses go to `values` as double (the host
// reduces them), gradients are divided by grad_div and rounded once to the logits' dtype.
struct GenericParams {
  const void* x = nullptr;
  const void* y = nullptr;
  int y_dtype = 1;
  OperandParams w, p;  // only data, dtype, inner and period are used
  internal::ElementOptions<double> opts;
  double* values = nullptr;  // numel doubles, or nullptr
  void* gx = nullptr;
  void* gy = nullptr;
  double grad_div = 1.0;
  int64_t numel = 0;
};

__device__ __forceinline__ double LoadOperand(const OperandParams& o, int64_t i) {
  if (o.data == nullptr) return 1.0;
  return LoadDyn<double>(o.dtype, o.data, (i / o.inner) % o.period);
}

template <typename TX>
__global__ void __launch_bounds__(kThreads) GenericKernel(const GenericParams P) {
  const TX* __restrict__ xp = static_cast<const TX*>(P.x);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < P.numel;
       i += stride) {
    const double x = Cvt<double>(xp[i]);
    const double y = LoadDyn<double>(P.y_dtype, P.y, i);
    const double w = LoadOperand(P.w, i);
    const double p = LoadOperand(P.p, i);
    double l, gx, gy;
    internal::LossElement<double>(P.opts, x, y, w, p, &l, &gx, &gy);
    if (P.values) P.values[i] = l;
    if (P.gx) static_cast<TX*>(P.gx)[i] = Store<TX>(gx / P.grad_div);
    if (P.gy) static_cast<TX*>(P.gy)[i] = Store<TX>(gy / P.grad_div);
  }
}

template <typename TX>
cudaError_t LaunchGenericTyped(const GenericParams& P, cudaStream_t stream) {
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  }
  if (err != cudaSuccess) return err;
  const int64_t blocks = (P.numel + kThreads - 1) / kThreads;
  const int64_t grid = std::min<int64_t>(blocks, int64_t{8} * std::max(sms, 1));
  GenericKernel<TX><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(P);
  return cudaGetLastError();
}

// Device pointers and options of one generic evaluation (numel > 0).
cudaError_t LaunchGeneric(DType dtype, const GenericParams& P, cudaStream_t stream) {
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

}  // namespace

cudaError_t LaunchBce(const DeviceBce& a, cudaStream_t stream) {
  if (a.numel < 0 || ItemSize(a.dtype) == 0 || ItemSize(a.targets_dtype) == 0 ||
      a.weight.inner < 1 || a.weight.period < 1 || a.pos_weight.inner < 1 ||
      a.pos_weight.period < 1 || (a.weight.data != nullptr && ItemSize(a.weight.dtype) == 0) ||
      (a.pos_weight.data != nullptr && ItemSize(a.pos_weight.dtype) == 0)) {
    return cudaErrorInvalidValue;
  }
  if (a.numel == 0) return cudaSuccess;
  const bool reduce = a.reduction != Reduction::kNone && a.block_sums != nullptr;
  void* loss = a.reduction == Reduction::kNone ? a.loss : nullptr;
  if (loss == nullptr && a.grad_logits == nullptr && a.grad_targets == nullptr && !reduce) {
    return cudaSuccess;  // nothing requested
  }
  constexpr int64_t kSmallLimit = (int64_t{1} << 31) - 1 - kReduceBlock;
  const bool small = a.numel <= kSmallLimit && a.weight.inner <= kSmallLimit &&
                     a.weight.period <= kSmallLimit && a.pos_weight.inner <= kSmallLimit &&
                     a.pos_weight.period <= kSmallLimit;
  Params P{};
  P.x = a.logits;
  P.y = a.targets;
  P.w = MakeOperandParams(a.weight, a.numel, small);
  P.p = MakeOperandParams(a.pos_weight, a.numel, small);
  P.loss = loss;
  P.gx = a.grad_logits;
  P.gy = a.grad_targets;
  P.sums = reduce ? a.block_sums : nullptr;
  P.numel = a.numel;
  P.nblocks = NumReduceBlocks(a.numel);
  P.n_double = static_cast<double>(a.numel);
  P.inv_n = 1.0 / P.n_double;
  P.mean = a.reduction == Reduction::kMean;
  P.small = small;
  const size_t vx = 4 * ItemSize(a.dtype);
  P.vec = Aligned(a.logits, vx) && Aligned(a.targets, 4 * ItemSize(a.targets_dtype)) &&
          Aligned(P.loss, vx) && Aligned(P.gx, vx) && Aligned(P.gy, vx);
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

}  // namespace cuda

// ---- Backend --------------------------------------------------------------------------------

namespace {

absl::Status CudaFailure(const char* what, cudaError_t err) {
  return absl::InternalError(absl::StrCat("CUDA error in ", what, ": ", cudaGetErrorName(err), ": ",
                                          cudaGetErrorString(err)));
}

#define LOSSD_CUDA_RETURN_IF_ERROR(expr)     \
  do {                                       \
    const cudaError_t lossd_err_ = (expr);   \
    if (lossd_err_ != cudaSuccess) {         \
      return CudaFailure(#expr, lossd_err_); \
    }                                        \
  } while (0)

constexpr size_t kAlign = 256;
size_t AlignUp(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// Byte offsets of one call's tensors inside a slot's device buffer.
struct Layout {
  size_t x = 0, y = 0, w = 0, p = 0, loss = 0, gx = 0, gy = 0, sums = 0, total = 0;
};

// Operands of at most this many elements are converted to double on the host before upload:
// the kernel reads operands as double, so this saves a conversion per element and operand.
constexpr int64_t kHostConvertMax = int64_t{1} << 16;

// An operand as uploaded: its bytes in `dtype`, from `host` (the caller's data or `converted`).
struct Upload {
  DType dtype = DType::kFloat32;
  const void* host = nullptr;
  size_t bytes = 0;
  std::vector<double> converted;
};

void PrepareUpload(const Operand& op, Upload* up) {
  up->dtype = op.dtype;
  if (op.data == nullptr) return;
  if (op.dtype != DType::kFloat64 && op.period <= kHostConvertMax) {
    up->converted.resize(op.period);
    for (int64_t j = 0; j < op.period; ++j) up->converted[j] = LoadAsDouble(op.dtype, op.data, j);
    up->dtype = DType::kFloat64;
    up->host = up->converted.data();
  } else {
    up->host = op.data;
  }
  up->bytes = static_cast<size_t>(op.period) * ItemSize(up->dtype);
}

// A stream and its grow-only device buffer. Owned by the pool; used by one call at a time.
struct Slot {
  cudaStream_t stream = nullptr;
  void* buffer = nullptr;
  size_t capacity = 0;
};

class CudaBackend final : public Backend {
 public:
  CudaBackend() = default;
  ~CudaBackend() override {
    // Errors are ignored here: at process exit the runtime may already be shutting down.
    absl::MutexLock lock(&mu_);
    for (auto& s : slots_) {
      if (s->stream != nullptr) cudaStreamSynchronize(s->stream);
      if (s->buffer != nullptr) cudaFree(s->buffer);
      if (s->stream != nullptr) cudaStreamDestroy(s->stream);
    }
  }

  std::string Name() const override { return "cuda"; }

  absl::Status Bce(const BceArgs& args, const BceOutputs& out) override;

 private:
  // At most this many calls run at once (each on its own stream); further callers wait.
  static constexpr size_t kMaxSlots = 8;

  absl::StatusOr<Slot*> Acquire();
  void Release(Slot* slot);
  absl::Status Reserve(Slot* slot, size_t bytes);
  // Plain BCE (NONE/SUM/MEAN, no per-element values): the fused kernel.
  absl::Status Run(Slot* slot, const BceArgs& args, const BceOutputs& out);
  // Every other option: the generic kernel, reductions on the host.
  absl::Status RunGeneric(Slot* slot, const BceArgs& args, const BceOutputs& out);

  absl::Mutex mu_;
  std::vector<std::unique_ptr<Slot>> slots_ ABSL_GUARDED_BY(mu_);
  std::vector<Slot*> idle_ ABSL_GUARDED_BY(mu_);
};

absl::StatusOr<Slot*> CudaBackend::Acquire() {
  absl::MutexLock lock(&mu_);
  auto available = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return !idle_.empty() || slots_.size() < kMaxSlots;
  };
  mu_.Await(absl::Condition(&available));
  if (!idle_.empty()) {
    Slot* s = idle_.back();
    idle_.pop_back();
    return s;
  }
  auto slot = std::make_unique<Slot>();
  LOSSD_CUDA_RETURN_IF_ERROR(cudaSetDevice(0));
  LOSSD_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&slot->stream, cudaStreamNonBlocking));
  slots_.push_back(std::move(slot));
  return slots_.back().get();
}

void CudaBackend::Release(Slot* slot) {
  absl::MutexLock lock(&mu_);
  idle_.push_back(slot);
}

absl::Status CudaBackend::Reserve(Slot* slot, size_t bytes) {
  if (bytes <= slot->capacity) return absl::OkStatus();
  if (slot->buffer != nullptr) {
    LOSSD_CUDA_RETURN_IF_ERROR(cudaFree(slot->buffer));
    slot->buffer = nullptr;
    slot->capacity = 0;
  }
  // Round up to 1 MiB so slowly growing requests do not reallocate every time.
  const size_t want = (bytes + (size_t{1} << 20) - 1) & ~((size_t{1} << 20) - 1);
  cudaError_t err = cudaMalloc(&slot->buffer, want);
  if (err == cudaErrorMemoryAllocation) {
    // Out of device memory: drop the buffers of idle slots and try once more.
    cudaGetLastError();
    {
      absl::MutexLock lock(&mu_);
      for (Slot* s : idle_) {
        if (s->buffer != nullptr) cudaFree(s->buffer);
        s->buffer = nullptr;
        s->capacity = 0;
      }
    }
    err = cudaMalloc(&slot->buffer, want);
  }
  if (err != cudaSuccess) {
    slot->buffer = nullptr;
    return CudaFailure(absl::StrCat("cudaMalloc(", want, " bytes)").c_str(), err);
  }
  slot->capacity = want;
  return absl::OkStatus();
}

absl::Status CudaBackend::Bce(const BceArgs& args, const BceOutputs& out) {
  const size_t ix = ItemSize(args.dtype), iy = ItemSize(args.targets_dtype);
  if (args.numel < 0 || ix == 0 || iy == 0 ||
      (args.weight.data != nullptr && ItemSize(args.weight.dtype) == 0) ||
      (args.pos_weight.data != nullptr && ItemSize(args.pos_weight.dtype) == 0) ||
      args.weight.inner < 1 || args.weight.period < 1 || args.pos_weight.inner < 1 ||
      args.pos_weight.period < 1) {
    return absl::InvalidArgumentError("cuda backend: malformed BceArgs");
  }
  if (args.reduction == Reduction::kPerSampleMean &&
      (args.last_dim < 1 || args.numel % args.last_dim != 0)) {
    return absl::InvalidArgumentError("cuda backend: last_dim does not divide numel");
  }
  // Cancellation is checked once, before any work (the kernel is not split into chunks).
  if (args.should_stop && args.should_stop()) {
    return absl::CancelledError("stopped before completion");
  }
  const bool scalar = args.reduction == Reduction::kSum || args.reduction == Reduction::kMean;
  if (args.numel == 0) {
    if (scalar && out.loss != nullptr) {
      StoreFromDouble(
          args.dtype, out.loss, 0,
          args.reduction == Reduction::kMean ? std::numeric_limits<double>::quiet_NaN() : 0.0);
    }
    return absl::OkStatus();
  }
  // Work units as the CPU backend counts them (observability only).
  auto count_chunks = [&args] {
    if (args.chunks_done != nullptr) {
      args.chunks_done->fetch_add((args.numel + kChunkElements - 1) / kChunkElements,
                                  std::memory_order_relaxed);
    }
  };
  if (out.loss == nullptr && out.grad_logits == nullptr && out.grad_targets == nullptr &&
      out.loss_values == nullptr) {
    count_chunks();
    return absl::OkStatus();
  }
  // The fused kernel covers plain BCE; every other option takes the generic kernel.
  const bool plain = args.loss == Loss::kBce && !args.has_ignore_index && !args.normalize &&
                     args.label_smoothing == 0.0 && args.reduction != Reduction::kPerSampleMean &&
                     out.loss_values == nullptr;
  absl::StatusOr<Slot*> slot = Acquire();
  if (!slot.ok()) return slot.status();
  absl::Status status = plain ? Run(*slot, args, out) : RunGeneric(*slot, args, out);
  if (!status.ok()) {
    // Never hand back a slot with work in flight on its buffer.
    cudaStreamSynchronize((*slot)->stream);
    cudaGetLastError();
  }
  Release(*slot);
  if (status.ok()) count_chunks();
  return status;
}

absl::Status CudaBackend::RunGeneric(Slot* slot, const BceArgs& args, const BceOutputs& out) {
  const int64_t n = args.numel;
  const size_t ix = ItemSize(args.dtype), iy = ItemSize(args.targets_dtype);
  // Divisors as the CPU backend's Plan: non-ignored count (normalize), numel (MEAN gradients),
  // last_dim (per-sample mean gradients).
  double count = 1.0;
  if (args.normalize) {
    int64_t ignored = 0;
    if (args.has_ignore_index) {
      for (int64_t i = 0; i < n; ++i) {
        ignored += LoadAsDouble(args.targets_dtype, args.targets, i) == args.ignore_index;
      }
    }
    const int64_t kept = n - ignored;
    count = kept > 0 ? static_cast<double>(kept) : 1.0;
  }
  double grad_div = count;
  if (args.reduction == Reduction::kMean) grad_div *= static_cast<double>(n);
  if (args.reduction == Reduction::kPerSampleMean) {
    grad_div *= static_cast<double>(args.last_dim);
  }
  const bool want_values = out.loss != nullptr || out.loss_values != nullptr;

  Upload uploads[2];
  PrepareUpload(args.weight, &uploads[0]);
  PrepareUpload(args.pos_weight, &uploads[1]);
  size_t off = 0;
  auto place = [&off](size_t bytes) {
    const size_t at = off;
    off += AlignUp(bytes);
    return at;
  };
  const size_t at_x = place(n * ix);
  const size_t at_y = place(n * iy);
  const size_t at_w = place(uploads[0].bytes);
  const size_t at_p = place(uploads[1].bytes);
  const size_t at_v = place(want_values ? n * sizeof(double) : 0);
  const size_t at_gx = place(out.grad_logits != nullptr ? n * ix : 0);
  const size_t at_gy = place(out.grad_targets != nullptr ? n * ix : 0);

  LOSSD_CUDA_RETURN_IF_ERROR(cudaSetDevice(0));
  if (absl::Status s = Reserve(slot, off); !s.ok()) return s;
  char* base = static_cast<char*>(slot->buffer);
  cudaStream_t stream = slot->stream;
  LOSSD_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(base + at_x, args.logits, n * ix, cudaMemcpyHostToDevice, stream));
  LOSSD_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(base + at_y, args.targets, n * iy, cudaMemcpyHostToDevice, stream));

  cuda::GenericParams P;
  P.x = base + at_x;
  P.y = base + at_y;
  P.y_dtype = static_cast<int>(args.targets_dtype);
  const struct {
    const Operand* host;
    const Upload* up;
    size_t offset;
    cuda::OperandParams* dev;
  } operands[] = {{&args.weight, &uploads[0], at_w, &P.w},
                  {&args.pos_weight, &uploads[1], at_p, &P.p}};
  for (const auto& o : operands) {
    o.dev->dtype = static_cast<int>(o.up->dtype);
    o.dev->inner = o.host->inner;
    o.dev->period = o.host->period;
    if (o.host->data == nullptr) continue;
    o.dev->data = base + o.offset;
    LOSSD_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(base + o.offset, o.up->host, o.up->bytes, cudaMemcpyHostToDevice, stream));
  }
  P.opts.focal = args.loss == Loss::kFocal;
  P.opts.has_ignore_index = args.has_ignore_index;
  P.opts.ignore_index = args.ignore_index;
  P.opts.label_smoothing = args.label_smoothing;
  P.opts.alpha = args.focal_alpha;
  P.opts.gamma = args.focal_gamma;
  P.values = want_values ? reinterpret_cast<double*>(base + at_v) : nullptr;
  P.gx = out.grad_logits != nullptr ? base + at_gx : nullptr;
  P.gy = out.grad_targets != nullptr ? base + at_gy : nullptr;
  P.grad_div = grad_div;
  P.numel = n;
  LOSSD_CUDA_RETURN_IF_ERROR(cuda::LaunchGeneric(args.dtype, P, stream));

  // Values land in the caller's loss_values when given, else in host scratch.
  std::vector<double> scratch;
  double* values = out.loss_values;
  if (want_values && values == nullptr) {
    scratch.resize(n);
    values = scratch.data();
  }
  if (want_values) {
    LOSSD_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(values, P.values, n * sizeof(double), cudaMemcpyDeviceToHost, stream));
  }
  if (P.gx != nullptr) {
    LOSSD_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(out.grad_logits, P.gx, n * ix, cudaMemcpyDeviceToHost, stream));
  }
  if (P.gy != nullptr) {
    LOSSD_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(out.grad_targets, P.gy, n * ix, cudaMemcpyDeviceToHost, stream));
  }
  LOSSD_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  if (out.loss == nullptr) return absl::OkStatus();

  // Reductions on the host, structured as the CPU backend's.
  switch (args.reduction) {
    case Reduction::kSum:
    case Reduction::kMean: {
      std::vector<double> tree(kReduceBlock);
      ExactSum total;
      for (int64_t i0 = 0; i0 < n; i0 += kReduceBlock) {
        const int64_t len = std::min(kReduceBlock, n - i0);
        std::copy(values + i0, values + i0 + len, tree.begin());
        total.Add(TreeSumBlock(tree.data(), len));
      }
      double v = total.Value() / count;
      if (args.reduction == Reduction::kMean) v /= static_cast<double>(n);
      StoreFromDouble(args.dtype, out.loss, 0, v);
      break;
    }
    case Reduction::kPerSampleMean: {
      const int64_t len = args.last_dim;
      const int64_t rows = n / len;
      for (int64_t r = 0; r < rows; ++r) {
        ExactSum s;
        for (int64_t j = 0; j < len; ++j) s.Add(values[r * len + j]);
        StoreFromDouble(args.dtype, out.loss, r, s.Value() / static_cast<double>(len) / count);
      }
      break;
    }
    case Reduction::kNone:
      for (int64_t i = 0; i < n; ++i) StoreFromDouble(args.dtype, out.loss, i, values[i] / count);
      break;
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::Run(Slot* slot, const BceArgs& args, const BceOutputs& out) {
  const int64_t n = args.numel;
  const size_t ix = ItemSize(args.dtype), iy = ItemSize(args.targets_dtype);
  const bool reduce = args.reduction != Reduction::kNone;
  const bool want_sum = reduce && out.loss != nullptr;
  const int64_t nblocks = cuda::NumReduceBlocks(n);
  Layout L;
  size_t off = 0;
  auto place = [&off](size_t bytes) {
    const size_t at = off;
    off += AlignUp(bytes);
    return at;
  };
  L.x = place(n * ix);
  L.y = place(n * iy);
  Upload uploads[2];
  PrepareUpload(args.weight, &uploads[0]);
  PrepareUpload(args.pos_weight, &uploads[1]);
  L.w = place(uploads[0].bytes);
  L.p = place(uploads[1].bytes);
  L.loss = place(!reduce && out.loss != nullptr ? n * ix : 0);
  L.gx = place(out.grad_logits != nullptr ? n * ix : 0);
  L.gy = place(out.grad_targets != nullptr ? n * ix : 0);
  L.sums = place(want_sum ? nblocks * sizeof(double) : 0);
  L.total = off;

  LOSSD_CUDA_RETURN_IF_ERROR(cudaSetDevice(0));
  if (absl::Status s = Reserve(slot, L.total); !s.ok()) return s;
  char* base = static_cast<char*>(slot->buffer);
  cudaStream_t stream = slot->stream;

  LOSSD_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(base + L.x, args.logits, n * ix, cudaMemcpyHostToDevice, stream));
  LOSSD_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(base + L.y, args.targets, n * iy, cudaMemcpyHostToDevice, stream));
  cuda::DeviceBce d;
  d.numel = n;
  d.dtype = args.dtype;
  d.logits = base + L.x;
  d.targets_dtype = args.targets_dtype;
  d.targets = base + L.y;
  d.reduction = args.reduction;
  const struct {
    const Operand* host;
    const Upload* up;
    size_t offset;
    cuda::DeviceOperand* dev;
  } operands[] = {{&args.weight, &uploads[0], L.w, &d.weight},
                  {&args.pos_weight, &uploads[1], L.p, &d.pos_weight}};
  for (const auto& o : operands) {
    o.dev->dtype = o.up->dtype;
    o.dev->inner = o.host->inner;
    o.dev->period = o.host->period;
    if (o.host->data == nullptr) continue;
    o.dev->data = base + o.offset;
    LOSSD_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(base + o.offset, o.up->host, o.up->bytes, cudaMemcpyHostToDevice, stream));
  }
  d.loss = !reduce && out.loss != nullptr ? base + L.loss : nullptr;
  d.grad_logits = out.grad_logits != nullptr ? base + L.gx : nullptr;
  d.grad_targets = out.grad_targets != nullptr ? base + L.gy : nullptr;
  d.block_sums = want_sum ? reinterpret_cast<double*>(base + L.sums) : nullptr;
  LOSSD_CUDA_RETURN_IF_ERROR(cuda::LaunchBce(d, stream));

  std::vector<double> sums(want_sum ? nblocks : 0);
  if (d.loss != nullptr) {
    LOSSD_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(out.loss, d.loss, n * ix, cudaMemcpyDeviceToHost, stream));
  }
  if (d.grad_logits != nullptr) {
    LOSSD_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(out.grad_logits, d.grad_logits, n * ix, cudaMemcpyDeviceToHost, stream));
  }
  if (d.grad_targets != nullptr) {
    LOSSD_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(out.grad_targets, d.grad_targets, n * ix, cudaMemcpyDeviceToHost, stream));
  }
  if (want_sum) {
    LOSSD_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(sums.data(), d.block_sums, nblocks * sizeof(double),
                                               cudaMemcpyDeviceToHost, stream));
  }
  LOSSD_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  if (want_sum) {
    ExactSum total;
    for (double s : sums) total.Add(s);
    double v = total.Value();
    if (args.reduction == Reduction::kMean) v /= static_cast<double>(n);
    StoreFromDouble(args.dtype, out.loss, 0, v);
  }
  return absl::OkStatus();
}

}  // namespace

bool CudaCompiled() { return true; }

int CudaDeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

std::string CudaDeviceName() {
  if (CudaDeviceCount() == 0) return "";
  cudaDeviceProp prop;
  if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) {
    cudaGetLastError();
    return "";
  }
  return prop.name;
}

absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend() {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err == cudaSuccess && n == 0) err = cudaErrorNoDevice;
  if (err == cudaSuccess) err = cudaSetDevice(0);
  if (err == cudaSuccess) err = cudaFree(nullptr);  // creates the context now, not mid-request
  if (err != cudaSuccess) {
    cudaGetLastError();
    return absl::FailedPreconditionError(
        absl::StrCat("no usable CUDA device: ", cudaGetErrorString(err)));
  }
  return std::unique_ptr<Backend>(std::make_unique<CudaBackend>());
}

}  // namespace lossd::kernels
