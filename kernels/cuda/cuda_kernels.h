// Device-side entry point of the CUDA backend: the fused BCE kernel on device-resident tensors.
// Internal header (CUDA types allowed): used by cuda_backend.cu and by gpu_bench.cu, which
// times the kernel without host transfers. Not part of the public kernels API.
#ifndef LOSSD_KERNELS_CUDA_CUDA_KERNELS_H_
#define LOSSD_KERNELS_CUDA_CUDA_KERNELS_H_

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/src/bce_math.h"
#include "lossd/kernels/bce.h"
#include "lossd/kernels/dtype.h"
#include "lossd/kernels/exact_sum.h"

namespace lossd::kernels::cuda {

// Elements per CUDA block iteration: one reduction block (kReduceBlock) = 256 threads x 8.
inline constexpr int kThreads = 256;

// A broadcast operand in device memory: element i reads data[((i + offset) / inner) % period],
// offset being DeviceBce::element_offset, or 0 for an unshifted operand.
struct DeviceOperand {
  DType dtype = DType::kFloat32;
  const void* data = nullptr;  // device pointer; nullptr: absent, every element reads 1
  int64_t inner = 1;           // >= 1
  int64_t period = 1;          // >= 1; data holds `period` elements
  // Read at the launch's own element index, not shifted by element_offset: the slice of a
  // full-size operand that belongs to this chunk (inner 1, period numel of the chunk).
  bool unshifted = false;
};

// One evaluation on device memory. Semantics are those of BceArgs/BceOutputs (kernels.h),
// except the reduced loss: the kernel writes one double per reduction block into block_sums
// (the fixed pairwise tree of that block's element losses); the caller adds them exactly.
struct DeviceBce {
  int64_t numel = 0;
  DType dtype = DType::kFloat32;  // logits' dtype; outputs are written in it
  const void* logits = nullptr;
  DType targets_dtype = DType::kFloat32;
  const void* targets = nullptr;
  DeviceOperand weight;
  DeviceOperand pos_weight;
  Reduction reduction = Reduction::kNone;  // kMean divides the gradients by numel
  void* loss = nullptr;                    // kNone only: numel elements, or nullptr
  void* grad_logits = nullptr;             // numel elements, or nullptr
  void* grad_targets = nullptr;            // numel elements, or nullptr
  double* block_sums = nullptr;  // NumReduceBlocks(numel) doubles, or nullptr: no loss sum
  // normalize (paddle): the number of kept elements (>= 1; 1 without normalize). kNone losses
  // are divided by it, gradients too (kMean gradients by count * numel), as the CPU backend
  // divides; the caller divides the block sums.
  double count = 1.0;
  // kMean: the element count the gradients divide by (times count): numel, or a part's whole
  // count (BceArgs::whole_numel); 0 means numel.
  double mean_n = 0.0;
  // The loss's element options, from internal::ResolveLoss (resolved_loss.h); this kernel
  // reads ignore_index and label smoothing (BCE only). Elements whose target equals
  // ignore_index get loss and gradients 0 (targets compared in their compute type: an
  // ignore_index that float cannot hold matches no float target). Label smoothing s in
  // [0, 1]: the targets become y smooth_keep + smooth_half (formed in double, as
  // internal::LossElement does; the all-float math rounds the coefficients w (1 - y') and
  // w p y' once from double), and dl/dy of the raw target is scaled by smooth_keep = 1 - s.
  internal::ElementOptions<double> element;
  // true: elements of float32 and half logits with non-double targets are computed by
  // internal::BceElementF32 (all-float math, the CPU kernel's formulas; rare elements still in
  // double), which requires every target, weight and pos_weight value to be exact in float (as
  // when they come from float32 or half tensors). Off by default: gpu_bench validates and
  // times both.
  bool float_math = false;
  // A chunk of a larger request (the backend's pinned chunk pipeline): element i of this
  // launch is element element_offset + i of the request, which is how its broadcast operands
  // are indexed (DeviceOperand). Everything else is this launch's own: numel, the tensors, and
  // block_sums, where block b of the launch writes block_sums[b] (pass the request's sums
  // array plus the chunk's first block). With element_offset a multiple of kReduceBlock and
  // mean_n the request's count, every value is bitwise that of the request launched whole.
  int64_t element_offset = 0;
};

// Number of kReduceBlock-element blocks covering numel elements.
inline int64_t NumReduceBlocks(int64_t numel) { return (numel + kReduceBlock - 1) / kReduceBlock; }

// Enqueues the fused kernel on `stream` (nothing when numel == 0). Any pointer alignment is
// accepted; 16-byte vector accesses are used where alignment allows. Returns the launch
// status (cudaSuccess once queued); execution errors surface at the next synchronization.
// Thread-safe.
cudaError_t LaunchBce(const DeviceBce& args, cudaStream_t stream);

// ---- Segmented launches (the backend's BceBatch; docs/kernels.md, "Segmented batch launch").
// Evaluations whose fused kernel is the same instantiation (SegmentKernel) run in one launch:
// each is encoded (EncodeSegment) into SegmentParamsBytes() bytes of host memory that the
// caller copies to device memory, an array in evaluation order; block_item (device memory,
// total_blocks int32) maps each launch block to its evaluation, whose blocks are consecutive
// from the `first_block` it was encoded with. Each evaluation's outputs and block sums are
// bitwise those of LaunchBce on it alone.
struct SegmentKernel {
  DType dtype = DType::kFloat32;
  DType targets_dtype = DType::kFloat32;
  bool reduce = false;
  bool all_float = false;
  bool smooth = false;
  bool operator==(const SegmentKernel& o) const {
    return dtype == o.dtype && targets_dtype == o.targets_dtype && reduce == o.reduce &&
           all_float == o.all_float && smooth == o.smooth;
  }
};
size_t SegmentParamsBytes();
// Writes `a`'s launch parameters (its pointers: device memory) to dst and its kernel to
// *kernel. cudaErrorInvalidValue for what LaunchBce refuses, numel 0 or nothing requested.
cudaError_t EncodeSegment(const DeviceBce& a, int64_t first_block, void* dst,
                          SegmentKernel* kernel);
// Enqueues the segmented kernel of `kernel` over `params` (device memory, every evaluation
// encoded with that kernel) on `stream`.
cudaError_t LaunchBceSegments(const SegmentKernel& kernel, const void* params,
                              const int32_t* block_item, int64_t total_blocks,
                              cudaStream_t stream);

// One evaluation with any option of BceArgs (focal, ignore_index, normalize, label smoothing,
// per-sample mean), all math in double through internal::LossElement, in the fused kernel's
// block layout; `opts` from internal::ResolveLoss (resolved_loss.h). normalize: the count of
// kept elements (numel minus targets equal to
// opts.ignore_index when opts.has_ignore_index, at least 1) is computed on the device into
// *ignored (8 bytes of device scratch, required then) and divides the losses and gradients as
// the CPU backend does. Outputs: `loss` for kNone (numel values / count, in `dtype`),
// `block_sums` for kSum/kMean (NumReduceBlocks(numel) tree sums of the undivided element
// losses; the caller adds them exactly and divides), `values` (numel undivided element losses
// as double; per-sample mean and loss_values), gradients divided by count * grad_extra
// (grad_extra: numel for kMean, last_dim for kPerSampleMean, else 1) and rounded once to
// `dtype`. Each may be nullptr. Thread-safe; nothing when numel == 0.
struct DeviceGeneric {
  int64_t numel = 0;
  DType dtype = DType::kFloat32;
  const void* logits = nullptr;
  DType targets_dtype = DType::kFloat32;
  const void* targets = nullptr;
  DeviceOperand weight;
  DeviceOperand pos_weight;
  internal::ElementOptions<double> opts;
  Reduction reduction = Reduction::kNone;
  bool normalize = false;
  unsigned long long* ignored = nullptr;  // normalize without `count`: device scratch
  double count = 0.0;  // normalize: > 0 gives the count (a part's whole count); none is counted
  double grad_extra = 1.0;
  void* loss = nullptr;
  double* block_sums = nullptr;
  double* values = nullptr;
  void* grad_logits = nullptr;
  void* grad_targets = nullptr;
};
cudaError_t LaunchGeneric(const DeviceGeneric& args, cudaStream_t stream);

// Sets *out (device memory) to the number of the numel targets equal to ignore_index (compared
// in double, as the CPU backend counts them for normalize). Enqueued on `stream`.
cudaError_t LaunchCountIgnored(DType targets_dtype, const void* targets, double ignore_index,
                               int64_t numel, unsigned long long* out, cudaStream_t stream);

}  // namespace lossd::kernels::cuda

#endif  // LOSSD_KERNELS_CUDA_CUDA_KERNELS_H_
