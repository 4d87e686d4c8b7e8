// lossd kernels: binary cross-entropy with logits on plain types.
//
// This header is the whole public surface of kernels/: plain structs, no gRPC, Highway or CUDA
// types. Semantics (docs/design.md section 3), with x logit, y target, w weight, p pos_weight,
// sp(t) = max(t,0) + log1p(exp(-|t|)), s(t) = sigmoid(t):
//   loss  = w * [ (1-y) * sp(x) + p*y * sp(-x) ]
//   dl/dx = w * [ (1-y) * s(x)  - p*y * s(-x) ]
//   dl/dy = w * [ -sp(x) + p * sp(-x) ]
// A term whose coefficient (1-y, p*y, p, w) is exactly 0 is skipped, so infinite logits give the
// mathematical limit. A NaN in any input of an element makes every output of that element NaN.
// Compute precision: double when any input tensor is float64, for label smoothing and for the
// focal loss; else float (float32 and the half types). Results are rounded once to the output
// dtype. Gradients are those of the reduced loss.
#ifndef LOSSD_KERNELS_KERNELS_H_
#define LOSSD_KERNELS_KERNELS_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace lossd::kernels {

// Element types. The numbering matches lossd.v1.DType.
enum class DType : int { kFloat32 = 1, kFloat64 = 2, kFloat16 = 3, kBFloat16 = 4 };

// Bytes per element; 0 for a value outside the enum.
size_t ItemSize(DType dtype);
// "FLOAT32", "FLOAT64", "FLOAT16", "BFLOAT16" or "DTYPE(<n>)".
std::string DTypeName(DType dtype);

enum class Reduction : int {
  kNone = 0,           // per element
  kSum = 1,            // one value
  kMean = 2,           // one value: sum / numel
  kPerSampleMean = 3,  // numel / last_dim values: mean over the last axis (Keras)
};

enum class Loss : int {
  kBce = 0,    // binary cross-entropy with logits
  kFocal = 1,  // torchvision's sigmoid focal loss (weight multiplies; pos_weight unused)
};

// An input broadcast to the logits' shape, viewed as a function of the flat element index i:
// element i reads data[(i / inner) % period]. This covers a full tensor (inner 1, period numel),
// a scalar (period 1), a trailing [C] (inner 1, period C) and [N,1] (inner C, period N).
// Other broadcast patterns are expanded by MakeOperand into owned storage.
struct Operand {
  DType dtype = DType::kFloat32;
  const void* data = nullptr;  // nullptr: the operand is absent and every element reads 1
  int64_t inner = 1;           // >= 1
  int64_t period = 1;          // >= 1
  std::shared_ptr<const void> owned;  // keeps expanded storage alive; null for a view
};

// Checks that `shape` broadcasts to `out_shape` (numpy rules, trailing dimensions aligned,
// operand rank <= output rank) and returns the operand view of `data`. `field` names the
// tensor in error messages. Errors: INVALID_ARGUMENT "weight shape [3] is not broadcastable to
// logits shape [4,7]". The returned operand points into `data` (caller keeps it alive) unless
// the pattern needs expansion, in which case it owns a copy in the operand's dtype.
absl::StatusOr<Operand> MakeOperand(const std::string& field, DType dtype, const void* data,
                                    const std::vector<int64_t>& shape,
                                    const std::vector<int64_t>& out_shape);

// One BCE-with-logits evaluation. All pointers are borrowed for the duration of the call.
struct BceArgs {
  int64_t numel = 0;
  DType dtype = DType::kFloat32;  // logits' dtype: outputs are written in it
  const void* logits = nullptr;   // numel elements of `dtype`
  DType targets_dtype = DType::kFloat32;
  const void* targets = nullptr;  // numel elements of `targets_dtype`
  Operand weight;                 // absent: w = 1
  Operand pos_weight;             // absent: p = 1 (kBce only)
  Reduction reduction = Reduction::kMean;
  int64_t last_dim = 1;           // kPerSampleMean: size of the last axis (>= 1, divides numel)

  Loss loss = Loss::kBce;
  // Elements whose raw target equals ignore_index give 0 loss and 0 gradients.
  bool has_ignore_index = false;
  double ignore_index = -100.0;
  // Divide losses and gradients by the count of non-ignored elements (1 when there are none).
  bool normalize = false;
  // Targets become y * (1 - s) + s / 2 before the loss (Keras); 0 = off. dl/dy is wrt raw y.
  double label_smoothing = 0.0;
  // kFocal: alpha_t = alpha*y + (1-alpha)*(1-y) (alpha < 0: 1), modulating (1 - p_t)^gamma.
  double focal_alpha = 0.25;
  double focal_gamma = 2.0;

  // When this call is one part of a larger evaluation split along its leading axes (its
  // elements a contiguous range of the whole's), the whole's counts, so that every loss value
  // and gradient is divided as in the whole evaluation: MEAN divides by whole_numel, normalize
  // by whole_kept (the whole's elements whose target is not ignore_index; required when
  // whole_numel is set with normalize and ignore_index). 0 / -1: this call is the whole. A
  // reduced loss of a part is its share, divided as the whole's.
  int64_t whole_numel = 0;
  int64_t whole_kept = -1;

  // Optional: polled between chunks of work (kChunkElements elements); once it returns true the
  // call stops early and returns CANCELLED (outputs are then unspecified). Thread-safe.
  std::function<bool()> should_stop;
  // Optional: incremented once per finished chunk (observability; proves that work stopped).
  std::atomic<int64_t>* chunks_done = nullptr;
};

// Elements per unit of scheduled work: the granularity of should_stop and chunks_done.
inline constexpr int64_t kChunkElements = 32 * 2048;

// Number of loss values the reduction produces for `args` (numel, 1, or numel / last_dim).
int64_t LossCount(const BceArgs& args);

// Where results go. Buffers are caller-owned and pre-sized; each may be null when not wanted.
struct BceOutputs {
  void* loss = nullptr;          // LossCount(args) elements of args.dtype
  void* grad_logits = nullptr;   // numel elements: gradient of the reduced loss wrt x
  void* grad_targets = nullptr;  // numel elements: gradient of the reduced loss wrt y
  // Optional: numel doubles receiving the per-element loss values exactly as the SUM/MEAN
  // reductions add them (before normalize). Lets a caller reduce across calls (BlockSum).
  double* loss_values = nullptr;
};

// Reductions are deterministic: element values (as double) are grouped in fixed blocks of
// kReduceBlock consecutive flat indices; each block is summed by a fixed pairwise tree
// (v[j] += v[j + h] for h = kReduceBlock/2 ... 1, zero-padded), and the block sums are added
// exactly (an exact accumulator, rounded once). The result depends only on the element values,
// never on thread count, backend scheduling or work split.
inline constexpr int64_t kReduceBlock = 2048;

// Exact sum of doubles, independent of the order of Add calls. Not thread-safe.
class ExactSum {
 public:
  ExactSum();
  void Add(double v);
  void Merge(const ExactSum& other);
  // The exact sum rounded to double (NaN if any NaN or +inf and -inf were added).
  double Value() const;

 private:
  // Fixed point with its least significant bit at 2^-1126, in 32-bit digits held in int64
  // words (the headroom absorbs 2^30 additions between carry normalizations).
  static constexpr int kWords = 74;
  int64_t words_[kWords];
  int64_t pending_;  // Add calls since the last carry normalization
  double special_;   // sum of non-finite values (inf/NaN), 0 when none
  void Normalize();
};

// The exact sum of n doubles rounded once: the bits ExactSum gives for them, faster where the
// values are finite, at most 8192, and within 2^60 of each other in magnitude (one 128-bit
// integer holds their sum exactly); else through ExactSum.
double ExactSumOf(const double* v, int64_t n);

// Sums one block of up to kReduceBlock values with the fixed pairwise tree. `values` is
// scratch of kReduceBlock doubles; entries [n, kReduceBlock) are treated as 0 and overwritten.
double TreeSumBlock(double* values, int64_t n);

// The reduction of kReduceBlock above over a stream of values that arrives in pieces of any
// size: the result is bitwise identical to reducing all values in one call, however the stream
// is split. Not thread-safe.
class BlockSum {
 public:
  BlockSum();
  void Add(const double* values, int64_t n);
  int64_t count() const { return count_; }
  double Value() const;  // sum of everything added so far, rounded once

 private:
  ExactSum total_;                // completed blocks
  std::vector<double> partial_;   // values of the block in progress
  int64_t count_ = 0;
};

// A compute backend. Thread-safe: Bce may be called concurrently.
class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string Name() const = 0;  // "cpu", "cuda"
  // Computes the loss and the requested gradients. Errors: INTERNAL on a device failure.
  virtual absl::Status Bce(const BceArgs& args, const BceOutputs& out) = 0;
};

struct CpuOptions {
  int threads = 0;  // worker threads; 0 = hardware concurrency
};
std::unique_ptr<Backend> MakeCpuBackend(const CpuOptions& options = {});
// The SIMD target the CPU kernels dispatch to on this machine ("AVX2", "AVX3", "NEON", ...).
std::string CpuSimdTarget();

// True when this build contains the CUDA backend.
bool CudaCompiled();
// Number of usable CUDA devices (0 without a driver or GPU, or in a build without CUDA).
int CudaDeviceCount();
// Name of device 0, empty when none.
std::string CudaDeviceName();
struct CudaOptions {
  // Element math of the fused kernel for float32, float16 and bfloat16 logits. false: exp,
  // log1p and the reciprocal in float, the combination in double. true: everything in float
  // (the CPU SIMD kernel's formulas), rare elements (|x| > 80, NaN, infinities, overflow) in
  // double; used only where the targets, weight and pos_weight are exact in float (not float64
  // targets; float64 operands only when every value converts exactly). Both keep every element
  // within the 4-ulp bound of docs/design.md section 4. The all-float math is the default
  // because it is the faster one (docs/perf.md); why it is exact enough: docs/kernels.md
  // section 5.
  bool float_math = true;
};
// The CUDA backend on device 0. FAILED_PRECONDITION when no GPU is usable.
absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(const CudaOptions& options = {});

// The float64 scalar reference (readable, slow). Outputs are double regardless of args.dtype:
// loss has LossCount(args) doubles; gradients numel doubles. Used by tests only.
void ReferenceBce(const BceArgs& args, double* loss, double* grad_logits, double* grad_targets);

// Conversions used by every backend and by tests.
float HalfToFloat(uint16_t h);
uint16_t FloatToHalf(float f);  // round to nearest even; overflow to inf; NaN preserved
float BFloat16ToFloat(uint16_t h);
uint16_t FloatToBFloat16(float f);  // round to nearest even; NaN preserved
// Reads element i of `data` as double.
double LoadAsDouble(DType dtype, const void* data, int64_t i);
// Writes v (rounded once to dtype) as element i of `data`.
void StoreFromDouble(DType dtype, void* data, int64_t i, double v);

}  // namespace lossd::kernels

#endif  // LOSSD_KERNELS_KERNELS_H_
