// The loss spec: what one evaluation of binary cross-entropy with logits computes (BceArgs) and
// where its results go (BceOutputs); a Backend (backend.h) carries it out. Semantics
// (docs/design.md section 3), with x logit, y target, w weight, p pos_weight,
// sp(t) = max(t,0) + log1p(exp(-|t|)), s(t) = sigmoid(t):
//   loss  = w * [ (1-y) * sp(x) + p*y * sp(-x) ]
//   dl/dx = w * [ (1-y) * s(x)  - p*y * s(-x) ]
//   dl/dy = w * [ -sp(x) + p * sp(-x) ]
// A term whose coefficient (1-y, p*y, p, w) is exactly 0 is skipped, so infinite logits give the
// mathematical limit. A NaN in any input of an element makes every output of that element NaN.
// Compute precision: double when any input tensor is float64, for label smoothing and for the
// focal loss; else float (float32 and the half types). Results are rounded once to the output
// dtype. Gradients are those of the reduced loss.
// Plain structs without state: the caller owns every buffer they point to and keeps it alive
// and unchanged for the duration of the call. LossCount is stateless and thread-safe.
#ifndef LOSSD_KERNELS_BCE_H_
#define LOSSD_KERNELS_BCE_H_

#include <atomic>
#include <cstdint>
#include <functional>

#include "lossd/kernels/dtype.h"
#include "lossd/kernels/operand.h"

namespace lossd::kernels {

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

// How the outputs are rounded (lossd.v1.Precision; docs/kernels.md section 8).
enum class Precision : int {
  kDefault = 0,           // the fast kernels, within the bounds of docs/design.md section 4
  kCorrectlyRounded = 1,  // every output the exact value rounded once to nearest-even (kBce only)
};

// Which of a call's tensors lie in CUDA device memory (device 0, e.g. another process's
// allocation opened through CUDA IPC: OpenCudaIpcMemory in backend.h) instead of host memory:
// bits of BceArgs::on_device (inputs) and BceOutputs::on_device (outputs). Only the CUDA
// backend reads and writes device tensors: it uses them in place, with no copy; every other
// backend returns FAILED_PRECONDITION when a bit is set. BceOutputs::loss_values and
// BceOutputs::kept are always host memory.
namespace on_device {
inline constexpr uint32_t kLogits = 1u << 0;
inline constexpr uint32_t kTargets = 1u << 1;
inline constexpr uint32_t kWeight = 1u << 2;     // weight.data
inline constexpr uint32_t kPosWeight = 1u << 3;  // pos_weight.data
inline constexpr uint32_t kLoss = 1u << 0;         // BceOutputs::loss
inline constexpr uint32_t kGradLogits = 1u << 1;   // BceOutputs::grad_logits
inline constexpr uint32_t kGradTargets = 1u << 2;  // BceOutputs::grad_targets
}  // namespace on_device

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
  // kPerSampleMean: size of the last axis (divides numel). 0 only with numel 0: then every
  // row is empty and its mean NaN, and empty_rows says how many rows there are.
  int64_t last_dim = 1;
  int64_t empty_rows = 0;  // kPerSampleMean with last_dim 0: the number of rows; else unused

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

  // kCorrectlyRounded: the CPU backend's correctly rounded path (correctly_rounded.h);
  // other backends return INVALID_ARGUMENT for it.
  Precision precision = Precision::kDefault;

  // Optional: polled between chunks of work (kChunkElements elements); once it returns true the
  // call stops early and returns CANCELLED (outputs are then unspecified). Thread-safe.
  std::function<bool()> should_stop;
  // Optional: incremented once per finished chunk (observability; proves that work stopped).
  std::atomic<int64_t>* chunks_done = nullptr;
  // Inputs in CUDA device memory: on_device::kLogits | kTargets | kWeight | kPosWeight bits.
  uint32_t on_device = 0;
};

// Elements per unit of scheduled work: the granularity of should_stop and chunks_done.
inline constexpr int64_t kChunkElements = 32 * 2048;

// Number of loss values the reduction produces for `args` (numel, 1, or numel / last_dim;
// empty_rows when last_dim is 0).
int64_t LossCount(const BceArgs& args);

// Where results go. Buffers are caller-owned and pre-sized; each may be null when not wanted.
struct BceOutputs {
  void* loss = nullptr;          // LossCount(args) elements of args.dtype
  void* grad_logits = nullptr;   // numel elements: gradient of the reduced loss wrt x
  void* grad_targets = nullptr;  // numel elements: gradient of the reduced loss wrt y
  // Optional: numel doubles receiving the per-element loss values exactly as the SUM/MEAN
  // reductions add them (before normalize). Lets a caller reduce across calls (BlockSum).
  double* loss_values = nullptr;
  // Optional: receives this call's kept count, its elements whose raw target (as double) is
  // not ignore_index; numel without ignore_index. Counted on this call's own targets, even
  // when whole_kept is given. The normalize divisor and Accumulator (accumulator.h) use it.
  int64_t* kept = nullptr;
  // Outputs in CUDA device memory: on_device::kLoss | kGradLogits | kGradTargets bits.
  uint32_t on_device = 0;
};

}  // namespace lossd::kernels

#endif  // LOSSD_KERNELS_BCE_H_
