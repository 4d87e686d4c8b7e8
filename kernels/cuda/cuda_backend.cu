// CUDA backend: the Backend that evaluates BceArgs on device 0 with the kernels of
// bce_kernels.cu. Plain BCE (NONE/SUM/MEAN, with weight, pos_weight, ignore_index, normalize and
// label smoothing) runs in the fused kernel (LaunchBce); the focal loss, per-sample mean and
// per-element loss_values run in the option kernel (LaunchGeneric, double math). Each call
// takes a Slot from a pool (a non-blocking stream and a grow-only device buffer; at most
// kMaxSlots, further callers wait), copies its inputs in, launches, copies the outputs back and
// synchronizes its stream. Reductions add the kernels' block tree sums on the host with
// ExactSum, as the CPU backend does, so results are bitwise reproducible. Every CUDA call is
// checked; failures return INTERNAL with CUDA's message; nothing exits.
// Design (layout, element math, reductions): docs/kernels.md sections 2 to 5.
#include <cuda.h>  // driver types for cuMemGetAddressRange (reached through cudart)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "kernels/cuda/bce_device_math.h"
#include "kernels/src/bce_math.h"
#include "kernels/cuda/cuda_backend_internal.h"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/ipc_util.h"
#include "kernels/cuda/segment_plan.h"
#include "kernels/src/divisors.h"
#include "kernels/src/resolved_loss.h"
#include "lossd/kernels/backend.h"
#include "lossd/kernels/bce.h"
#include "lossd/kernels/dtype.h"
#include "lossd/kernels/exact_sum.h"
#include "lossd/kernels/operand.h"

namespace lossd::kernels {

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
  size_t x = 0, y = 0, w = 0, p = 0, loss = 0, gx = 0, gy = 0, sums = 0, ignored = 0, total = 0;
};

// Operands of at most this many elements are converted on the host before upload to the
// compute type of the kernel that reads them (double, or float for the all-float kernel):
// this saves a conversion per element and operand.
constexpr int64_t kHostConvertMax = int64_t{1} << 16;

// An operand as uploaded: its bytes in `dtype`, from `host` (the caller's data or `converted`).
struct Upload {
  DType dtype = DType::kFloat32;
  const void* host = nullptr;
  size_t bytes = 0;
  std::vector<double> converted;
  std::vector<float> converted_f;
};

// The operand's values converted to T in *out; returns out's data.
template <typename T>
const void* ConvertOperand(const Operand& op, std::vector<T>* out) {
  out->resize(op.period);
  for (int64_t j = 0; j < op.period; ++j) {
    (*out)[j] = static_cast<T>(LoadAsDouble(op.dtype, op.data, j));
  }
  return out->data();
}

// `compute` is kFloat64 or kFloat32 (then every value of a float64 operand converted must be
// exact in float: see FloatExact).
void PrepareUpload(const Operand& op, DType compute, Upload* up) {
  up->dtype = op.dtype;
  if (op.data == nullptr) return;
  up->host = op.data;
  if (op.dtype != compute && op.period <= kHostConvertMax) {
    up->dtype = compute;
    up->host = compute == DType::kFloat64 ? ConvertOperand(op, &up->converted)
                                          : ConvertOperand(op, &up->converted_f);
  }
  up->bytes = static_cast<size_t>(op.period) * ItemSize(up->dtype);
}

// Whether every value of the operand is exact in float (NaN counts as exact: it stays NaN).
// float64 operands are checked only up to kHostConvertMax values; larger ones count as not.
bool FloatExact(const Operand& op) {
  if (op.data == nullptr || op.dtype != DType::kFloat64) return true;
  if (op.period > kHostConvertMax) return false;
  const double* v = static_cast<const double*>(op.data);
  for (int64_t j = 0; j < op.period; ++j) {
    if (v[j] == v[j] && static_cast<double>(static_cast<float>(v[j])) != v[j]) return false;
  }
  return true;
}

// Describes `host` (prepared as `up`) to the kernels and enqueues its upload to base + offset;
// an absent operand stays absent (data nullptr).
absl::Status UploadOperand(const Operand& host, const Upload& up, char* base, size_t offset,
                           cudaStream_t stream, cuda::DeviceOperand* dev) {
  dev->dtype = up.dtype;
  dev->inner = host.inner;
  dev->period = host.period;
  if (host.data == nullptr) return absl::OkStatus();
  dev->data = base + offset;
  LOSSD_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(base + offset, up.host, up.bytes, cudaMemcpyHostToDevice, stream));
  return absl::OkStatus();
}

// The SUM or MEAN loss from the device's block tree sums, as the CPU backend forms it: their
// exact sum, divided by the normalize count, and by the (whole's) element count for MEAN;
// rounded once to the dtype.
void StoreSumLoss(const BceArgs& args, const std::vector<double>& sums,
                  const internal::Divisors& div, void* loss) {
  ExactSum total;
  for (double s : sums) total.Add(s);
  double v = total.Value() / div.count;
  if (args.reduction == Reduction::kMean) v /= div.mean_n;
  StoreFromDouble(args.dtype, loss, 0, v);
}

// The reduced loss of a SUM or MEAN call into out.loss: formed on the host (StoreSumLoss), then
// copied to the device when out.loss is device memory (one copy on `stream`, synchronized).
absl::Status FinishSumLoss(cudaStream_t stream, const BceArgs& args, const BceOutputs& out,
                           const std::vector<double>& sums, const internal::Divisors& div) {
  if ((out.on_device & on_device::kLoss) == 0) {
    StoreSumLoss(args, sums, div, out.loss);
    return absl::OkStatus();
  }
  double host = 0.0;  // room for one value of any dtype
  StoreSumLoss(args, sums, div, &host);
  LOSSD_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(out.loss, &host, ItemSize(args.dtype), cudaMemcpyHostToDevice, stream));
  LOSSD_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  return absl::OkStatus();
}

// Whether an operand's values are exact in float (FloatExact), for the all-float kernel's
// choice. A device operand is never read on the host: a float64 one counts as not exact.
bool FloatExactAt(const Operand& op, bool on_device) {
  if (on_device) return op.data == nullptr || op.dtype != DType::kFloat64;
  return FloatExact(op);
}

// A device operand as the kernels read it, in place.
cuda::DeviceOperand InPlace(const Operand& op) {
  cuda::DeviceOperand d;
  d.dtype = op.dtype;
  d.data = op.data;
  d.inner = op.inner;
  d.period = op.period;
  return d;
}

// A full-size operand (one value per element): the pinned pipeline streams its chunks.
bool FullOperand(const Operand& op, int64_t numel) {
  return op.data != nullptr && op.inner == 1 && op.period == numel;
}

constexpr uint32_t kInputBits =
    on_device::kLogits | on_device::kTargets | on_device::kWeight | on_device::kPosWeight;
constexpr uint32_t kOutputBits =
    on_device::kLoss | on_device::kGradLogits | on_device::kGradTargets;

// A tensor marked on_device must be device memory of device 0: a host pointer would make the
// kernel fault, which would end the process's CUDA context.
absl::Status CheckDeviceTensor(const void* p, const char* field) {
  cudaPointerAttributes attr{};
  const cudaError_t err = cudaPointerGetAttributes(&attr, p);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return absl::InvalidArgumentError(absl::StrCat("cuda backend: ", field,
                                                   " is marked on_device but CUDA does not know "
                                                   "its pointer: ",
                                                   cudaGetErrorString(err)));
  }
  if ((attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged) ||
      attr.device != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cuda backend: ", field, " is marked on_device but is not memory of CUDA device 0 ",
        "(memory type ", static_cast<int>(attr.type), ", device ", attr.device, ")"));
  }
  return absl::OkStatus();
}

// The on_device bits of a call: known bits only, and every marked tensor that the call reads
// or writes is device memory of device 0.
absl::Status CheckOnDevice(const BceArgs& args, const BceOutputs& out) {
  if ((args.on_device & ~kInputBits) != 0 || (out.on_device & ~kOutputBits) != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cuda backend: unknown on_device bits: BceArgs::on_device ", args.on_device,
        ", BceOutputs::on_device ", out.on_device));
  }
  if (args.on_device == 0 && out.on_device == 0) return absl::OkStatus();
  struct Marked {
    uint32_t bit;
    const void* p;
    const char* field;
    bool required;  // a null pointer is an error (else: absent or not wanted)
  };
  const Marked inputs[] = {{on_device::kLogits, args.logits, "logits", true},
                           {on_device::kTargets, args.targets, "targets", true},
                           {on_device::kWeight, args.weight.data, "weight", false},
                           {on_device::kPosWeight, args.pos_weight.data, "pos_weight", false}};
  const Marked outputs[] = {{on_device::kLoss, out.loss, "loss", false},
                            {on_device::kGradLogits, out.grad_logits, "grad_logits", false},
                            {on_device::kGradTargets, out.grad_targets, "grad_targets", false}};
  if (args.numel > 0) {
    for (const Marked& m : inputs) {
      if ((args.on_device & m.bit) == 0) continue;
      if (m.p == nullptr) {
        if (!m.required) continue;
        return absl::InvalidArgumentError(
            absl::StrCat("cuda backend: ", m.field, " is marked on_device but is null"));
      }
      if (absl::Status s = CheckDeviceTensor(m.p, m.field); !s.ok()) return s;
    }
  }
  for (const Marked& m : outputs) {
    if ((out.on_device & m.bit) == 0 || m.p == nullptr) continue;
    // Gradients of an empty call have no element; the loss may still have values.
    if (m.bit != on_device::kLoss && args.numel == 0) continue;
    if (m.bit == on_device::kLoss && LossCount(args) == 0) continue;
    if (absl::Status s = CheckDeviceTensor(m.p, m.field); !s.ok()) return s;
  }
  return absl::OkStatus();
}

// The argument checks of Bce before any work.
absl::Status CheckArgs(const BceArgs& args) {
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
  return absl::OkStatus();
}

// The targets equal to ignore_index, counted on the host as LaunchCountIgnored counts them on
// the device: compared in double, which for float and half targets matches exactly when float
// holds ignore_index and never otherwise (their values are exact in float), as the device's
// comparison in float does.
int64_t CountIgnoredOnHost(DType dtype, const void* targets, int64_t n, double ignore_index) {
  int64_t c = 0;
  for (int64_t i = 0; i < n; ++i) c += LoadAsDouble(dtype, targets, i) == ignore_index;
  return c;
}

void CountChunks(const BceArgs& args) {
  if (args.chunks_done != nullptr) {
    args.chunks_done->fetch_add((args.numel + kChunkElements - 1) / kChunkElements,
                                std::memory_order_relaxed);
  }
}

// Pinned host staging of a slot (the chunk pipeline's two buffers, a segmented batch's staging
// area): one chunk buffer's bytes, and the slot's cap (grow-only up to it).
constexpr size_t kPinnedChunkBytes = size_t{8} << 20;
constexpr size_t kPinnedCapBytes = 2 * kPinnedChunkBytes;

// A stream, its grow-only device buffer and pinned staging buffer, and the pipeline's two
// events. Owned by the pool; used by one call at a time.
struct Slot {
  cudaStream_t stream = nullptr;
  void* buffer = nullptr;
  size_t capacity = 0;
  void* pinned = nullptr;  // cudaHostAlloc, at most kPinnedCapBytes
  size_t pinned_capacity = 0;
  cudaEvent_t done[2] = {nullptr, nullptr};  // chunk buffer s's outputs are back on the host
};

// One evaluation of a segmented batch, prepared on the host.
struct Segment {
  size_t index = 0;  // in BceBatch's items
  internal::ResolvedLoss loss;
  internal::Divisors div;
  int64_t ignored = 0;
  bool float_math = false;
  std::unique_ptr<Upload[]> uploads;  // weight, pos_weight (stable addresses: Upload::host)
  cuda::SegmentSpec spec;
  cuda::SegmentKernel kernel;
  size_t staging_bound = 0;  // an upper bound of its bytes in a segment plan
};

class CudaBackend final : public Backend {
 public:
  CudaBackend(const CudaOptions& options, const cuda::CudaBackendKnobs& knobs)
      : options_(options), knobs_(knobs) {}
  ~CudaBackend() override {
    // Errors are ignored here: at process exit the runtime may already be shutting down.
    absl::MutexLock lock(&mu_);
    for (auto& s : slots_) {
      if (s->stream != nullptr) cudaStreamSynchronize(s->stream);
      if (s->buffer != nullptr) cudaFree(s->buffer);
      if (s->pinned != nullptr) cudaFreeHost(s->pinned);
      for (cudaEvent_t e : s->done) {
        if (e != nullptr) cudaEventDestroy(e);
      }
      if (s->stream != nullptr) cudaStreamDestroy(s->stream);
    }
  }

  std::string Name() const override { return "cuda"; }

  absl::Status Bce(const BceArgs& args, const BceOutputs& out) override;
  // Plain BCE items of host tensors run in segmented launches (docs/kernels.md, "Segmented
  // batch launch"); every other item, and a batch of one, through Bce.
  std::vector<absl::Status> BceBatch(const std::vector<BceItem>& items) override;

 private:
  // At most this many calls run at once (each on its own stream); further callers wait.
  static constexpr size_t kMaxSlots = 8;

  absl::StatusOr<Slot*> Acquire();
  void Release(Slot* slot);
  absl::Status Reserve(Slot* slot, size_t bytes);
  // Grows the slot's pinned staging to at least `bytes` (at most kPinnedCapBytes).
  absl::Status ReservePinned(Slot* slot, size_t bytes);
  // Copies `bytes` host bytes to device memory `dst` on a slot's stream, synchronized.
  absl::Status CopyToDevice(void* dst, const void* src, size_t bytes);
  // Plain BCE (NONE/SUM/MEAN, no per-element values): the fused kernel. `loss`: args's loss
  // options as ResolveLoss read them (resolved_loss.h), the only ones these two read.
  absl::Status Run(Slot* slot, const BceArgs& args, const internal::ResolvedLoss& loss,
                   const BceOutputs& out);
  // Run for a large request of host tensors through the pinned chunk pipeline. false: no
  // pinned staging could be had (nothing was done; the caller runs it in one piece).
  absl::StatusOr<bool> RunChunked(Slot* slot, const BceArgs& args,
                                  const internal::ResolvedLoss& loss, const BceOutputs& out,
                                  const Upload* uploads, bool float_math, int64_t chunk);
  // Every other option: the generic kernel, reductions on the host.
  absl::Status RunGeneric(Slot* slot, const BceArgs& args, const internal::ResolvedLoss& loss,
                          const BceOutputs& out);
  // BceOutputs::kept alone (no other output requested), counted on the device.
  absl::Status CountKept(Slot* slot, const BceArgs& args, int64_t* kept);
  // Whether BceBatch may run the item in a segmented launch (else it goes through Bce).
  static bool Segmentable(const BceArgs& args, const BceOutputs& out);
  // One segmented launch over `group` (indices into `segs`, same kernel, >= 2). false: no
  // pinned staging could be had (nothing was done).
  absl::StatusOr<bool> RunSegments(Slot* slot, const std::vector<BceItem>& items,
                                   const std::vector<Segment>& segs,
                                   const std::vector<size_t>& group);

  const CudaOptions options_;
  const cuda::CudaBackendKnobs knobs_;
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
  for (cudaEvent_t& e : slot->done) {
    const cudaError_t err = cudaEventCreateWithFlags(&e, cudaEventDisableTiming);
    if (err != cudaSuccess) {
      for (cudaEvent_t made : slot->done) {
        if (made != nullptr) cudaEventDestroy(made);
      }
      cudaStreamDestroy(slot->stream);
      return CudaFailure("cudaEventCreateWithFlags", err);
    }
  }
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

absl::Status CudaBackend::ReservePinned(Slot* slot, size_t bytes) {
  if (bytes <= slot->pinned_capacity) return absl::OkStatus();
  if (bytes > kPinnedCapBytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "cuda backend: ", bytes, " bytes of pinned staging exceed the cap of ", kPinnedCapBytes));
  }
  // The slot's stream is idle here (every call synchronizes it before returning).
  if (slot->pinned != nullptr) {
    LOSSD_CUDA_RETURN_IF_ERROR(cudaFreeHost(slot->pinned));
    slot->pinned = nullptr;
    slot->pinned_capacity = 0;
  }
  const size_t want = std::min(
      kPinnedCapBytes, (bytes + (size_t{1} << 20) - 1) & ~((size_t{1} << 20) - 1));
  const cudaError_t err = cudaHostAlloc(&slot->pinned, want, cudaHostAllocDefault);
  if (err != cudaSuccess) {
    cudaGetLastError();
    slot->pinned = nullptr;
    return CudaFailure(absl::StrCat("cudaHostAlloc(", want, " bytes)").c_str(), err);
  }
  slot->pinned_capacity = want;
  return absl::OkStatus();
}

absl::Status CudaBackend::CopyToDevice(void* dst, const void* src, size_t bytes) {
  absl::StatusOr<Slot*> slot = Acquire();
  if (!slot.ok()) return slot.status();
  cudaStream_t stream = (*slot)->stream;
  absl::Status status = [&]() -> absl::Status {
    LOSSD_CUDA_RETURN_IF_ERROR(cudaSetDevice(0));
    LOSSD_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream));
    LOSSD_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
    return absl::OkStatus();
  }();
  if (!status.ok()) {
    cudaStreamSynchronize(stream);
    cudaGetLastError();
  }
  Release(*slot);
  return status;
}

absl::Status CudaBackend::Bce(const BceArgs& args, const BceOutputs& out) {
  // Device tensors are checked first: nothing below may touch one on the host.
  if (absl::Status s = CheckOnDevice(args, out); !s.ok()) return s;
  const bool loss_on_device = (out.on_device & on_device::kLoss) != 0 && out.loss != nullptr;
  // Per-sample means of empty rows: NaN on the host, as the CPU backend (divisors.h).
  if (internal::EmptyRows(args)) {
    if (!loss_on_device) return internal::EmptyRowMeans(args, out);
    // A device loss: the means formed in host memory, then copied.
    std::vector<char> host(static_cast<size_t>(std::max<int64_t>(LossCount(args), 0)) *
                           ItemSize(args.dtype));
    BceOutputs h = out;
    h.loss = host.data();
    h.on_device = 0;  // numel 0: no gradient element is written
    if (absl::Status s = internal::EmptyRowMeans(args, h); !s.ok()) return s;
    return host.empty() ? absl::OkStatus() : CopyToDevice(out.loss, host.data(), host.size());
  }
  if (args.precision != Precision::kDefault) {
    // The server computes correctly rounded requests on the host (docs/kernels.md section 8).
    return absl::InvalidArgumentError(
        "precision PRECISION_CORRECTLY_ROUNDED is computed by the CPU backend only");
  }
  if (absl::Status s = CheckArgs(args); !s.ok()) return s;
  // Cancellation is checked before any work (and between the chunks of a pipelined request).
  if (args.should_stop && args.should_stop()) {
    return absl::CancelledError("stopped before completion");
  }
  const bool scalar = args.reduction == Reduction::kSum || args.reduction == Reduction::kMean;
  if (args.numel == 0) {
    if (out.kept != nullptr) *out.kept = 0;
    if (scalar && out.loss != nullptr) {
      const double v =
          args.reduction == Reduction::kMean ? std::numeric_limits<double>::quiet_NaN() : 0.0;
      if (!loss_on_device) {
        StoreFromDouble(args.dtype, out.loss, 0, v);
      } else {
        double host = 0.0;  // room for one value of any dtype
        StoreFromDouble(args.dtype, &host, 0, v);
        return CopyToDevice(out.loss, &host, ItemSize(args.dtype));
      }
    }
    return absl::OkStatus();
  }
  if (out.loss == nullptr && out.grad_logits == nullptr && out.grad_targets == nullptr &&
      out.loss_values == nullptr) {
    if (out.kept != nullptr && args.has_ignore_index) {
      // Only the kept count: the targets' count kernel alone.
      absl::StatusOr<Slot*> slot = Acquire();
      if (!slot.ok()) return slot.status();
      absl::Status status = CountKept(*slot, args, out.kept);
      if (!status.ok()) {
        cudaStreamSynchronize((*slot)->stream);
        cudaGetLastError();
      }
      Release(*slot);
      if (!status.ok()) return status;
    } else if (out.kept != nullptr) {
      *out.kept = args.numel;
    }
    CountChunks(args);
    return absl::OkStatus();
  }
  // The fused kernel covers BCE with ignore_index, normalize and label smoothing; focal loss,
  // per-sample mean and per-element values take the option kernel.
  const internal::ResolvedLoss loss = internal::ResolveLoss(args);
  const bool plain = loss.loss == Loss::kBce && args.reduction != Reduction::kPerSampleMean &&
                     out.loss_values == nullptr;
  absl::StatusOr<Slot*> slot = Acquire();
  if (!slot.ok()) return slot.status();
  absl::Status status =
      plain ? Run(*slot, args, loss, out) : RunGeneric(*slot, args, loss, out);
  if (!status.ok()) {
    // Never hand back a slot with work in flight on its buffers.
    cudaStreamSynchronize((*slot)->stream);
    cudaGetLastError();
  }
  Release(*slot);
  if (status.ok()) CountChunks(args);
  return status;
}

absl::Status CudaBackend::CountKept(Slot* slot, const BceArgs& args, int64_t* kept) {
  const int64_t n = args.numel;
  const bool dev_y = (args.on_device & on_device::kTargets) != 0;
  const size_t at_y = 0;
  const size_t at_count = dev_y ? 0 : AlignUp(n * ItemSize(args.targets_dtype));
  LOSSD_CUDA_RETURN_IF_ERROR(cudaSetDevice(0));
  if (absl::Status s = Reserve(slot, at_count + AlignUp(sizeof(unsigned long long))); !s.ok()) {
    return s;
  }
  char* base = static_cast<char*>(slot->buffer);
  cudaStream_t stream = slot->stream;
  const void* targets = dev_y ? args.targets : base + at_y;
  if (!dev_y) {
    LOSSD_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(base + at_y, args.targets,
                                               n * ItemSize(args.targets_dtype),
                                               cudaMemcpyHostToDevice, stream));
  }
  auto* dev = reinterpret_cast<unsigned long long*>(base + at_count);
  LOSSD_CUDA_RETURN_IF_ERROR(cuda::LaunchCountIgnored(args.targets_dtype, targets,
                                                      args.ignore_index, n, dev, stream));
  unsigned long long ignored = 0;
  LOSSD_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(&ignored, dev, sizeof(ignored), cudaMemcpyDeviceToHost, stream));
  LOSSD_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  *kept = n - static_cast<int64_t>(ignored);
  return absl::OkStatus();
}

absl::Status CudaBackend::RunGeneric(Slot* slot, const BceArgs& args,
                                     const internal::ResolvedLoss& loss, const BceOutputs& out) {
  const int64_t n = args.numel;
  const size_t ix = ItemSize(args.dtype), iy = ItemSize(args.targets_dtype);
  // Device tensors are used in place: no upload, no download (CheckOnDevice checked them).
  const bool dev_x = (args.on_device & on_device::kLogits) != 0;
  const bool dev_y = (args.on_device & on_device::kTargets) != 0;
  const bool dev_w = (args.on_device & on_device::kWeight) != 0;
  const bool dev_p = (args.on_device & on_device::kPosWeight) != 0;
  const bool dev_loss = (out.on_device & on_device::kLoss) != 0;
  const bool dev_gx = (out.on_device & on_device::kGradLogits) != 0;
  const bool dev_gy = (out.on_device & on_device::kGradTargets) != 0;
  const bool sum = args.reduction == Reduction::kSum || args.reduction == Reduction::kMean;
  const bool want_sum = sum && out.loss != nullptr;
  const bool want_loss = args.reduction == Reduction::kNone && out.loss != nullptr;
  // Per-element values come back for per-sample mean (reduced here, per row, as the CPU
  // backend does) and for the caller's loss_values.
  const bool want_values = out.loss_values != nullptr ||
                           (args.reduction == Reduction::kPerSampleMean && out.loss != nullptr);
  const int64_t nblocks = cuda::NumReduceBlocks(n);

  Upload uploads[2];
  if (!dev_w) PrepareUpload(args.weight, DType::kFloat64, &uploads[0]);
  if (!dev_p) PrepareUpload(args.pos_weight, DType::kFloat64, &uploads[1]);
  size_t off = 0;
  auto place = [&off](size_t bytes) {
    const size_t at = off;
    off += AlignUp(bytes);
    return at;
  };
  const size_t at_x = place(dev_x ? 0 : n * ix);
  const size_t at_y = place(dev_y ? 0 : n * iy);
  const size_t at_w = place(uploads[0].bytes);
  const size_t at_p = place(uploads[1].bytes);
  // normalize with ignore_index counts the kept elements on the device, unless a part's whole
  // count is given; otherwise the count is known here (divisors.h).
  const bool count_on_device = loss.divisors.CountsIgnored();
  const size_t at_ign = place(count_on_device ? sizeof(unsigned long long) : 0);
  // BceOutputs::kept without that count: a count of its own (the kernel must not see it, as
  // it would divide by it).
  const bool count_for_kept =
      out.kept != nullptr && loss.element.has_ignore_index && !count_on_device;
  const size_t at_kept = place(count_for_kept ? sizeof(unsigned long long) : 0);
  const size_t at_l = place(want_loss && !dev_loss ? n * ix : 0);
  const size_t at_s = place(want_sum ? nblocks * sizeof(double) : 0);
  const size_t at_v = place(want_values ? n * sizeof(double) : 0);
  const size_t at_gx = place(out.grad_logits != nullptr && !dev_gx ? n * ix : 0);
  const size_t at_gy = place(out.grad_targets != nullptr && !dev_gy ? n * ix : 0);

  LOSSD_CUDA_RETURN_IF_ERROR(cudaSetDevice(0));
  if (absl::Status s = Reserve(slot, off); !s.ok()) return s;
  char* base = static_cast<char*>(slot->buffer);
  cudaStream_t stream = slot->stream;
  if (!dev_x) {
    LOSSD_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(base + at_x, args.logits, n * ix, cudaMemcpyHostToDevice, stream));
  }
  if (!dev_y) {
    LOSSD_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(base + at_y, args.targets, n * iy, cudaMemcpyHostToDevice, stream));
  }

  cuda::DeviceGeneric P;
  P.numel = n;
  P.dtype = args.dtype;
  P.logits = dev_x ? args.logits : base + at_x;
  P.targets = dev_y ? args.targets : base + at_y;
  P.targets_dtype = args.targets_dtype;
  if (dev_w) {
    P.weight = InPlace(args.weight);
  } else if (absl::Status s =
                 UploadOperand(args.weight, uploads[0], base, at_w, stream, &P.weight);
             !s.ok()) {
    return s;
  }
  if (dev_p) {
    P.pos_weight = InPlace(args.pos_weight);
  } else if (absl::Status s =
                 UploadOperand(args.pos_weight, uploads[1], base, at_p, stream, &P.pos_weight);
             !s.ok()) {
    return s;
  }
  P.opts = loss.element;
  P.reduction = args.reduction;
  P.normalize = loss.divisors.normalize;
  P.ignored = count_on_device ? reinterpret_cast<unsigned long long*>(base + at_ign) : nullptr;
  // The CPU backend's divisors (divisors.h): the gradients divide by count times the whole's
  // numel (MEAN) or last_dim (per-sample); a given whole count replaces the device's count.
  const internal::Divisors given = loss.divisors.For(0);
  if (loss.divisors.normalize && !count_on_device) P.count = given.count;
  if (args.reduction == Reduction::kMean) P.grad_extra = given.mean_n;
  if (args.reduction == Reduction::kPerSampleMean) {
    P.grad_extra = static_cast<double>(args.last_dim);
  }
  P.loss = want_loss ? (dev_loss ? out.loss : base + at_l) : nullptr;
  P.block_sums = want_sum ? reinterpret_cast<double*>(base + at_s) : nullptr;
  P.values = want_values ? reinterpret_cast<double*>(base + at_v) : nullptr;
  P.grad_logits =
      out.grad_logits != nullptr ? (dev_gx ? out.grad_logits : base + at_gx) : nullptr;
  P.grad_targets =
      out.grad_targets != nullptr ? (dev_gy ? out.grad_targets : base + at_gy) : nullptr;
  LOSSD_CUDA_RETURN_IF_ERROR(cuda::LaunchGeneric(P, stream));

  unsigned long long ignored = 0;
  if (count_on_device) {
    LOSSD_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(&ignored, P.ignored, sizeof(ignored),
                                               cudaMemcpyDeviceToHost, stream));
  } else if (count_for_kept) {
    auto* dev = reinterpret_cast<unsigned long long*>(base + at_kept);
    LOSSD_CUDA_RETURN_IF_ERROR(cuda::LaunchCountIgnored(args.targets_dtype, P.targets,
                                                        loss.element.ignore_index, n, dev,
                                                        stream));
    LOSSD_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(&ignored, dev, sizeof(ignored), cudaMemcpyDeviceToHost, stream));
  }
  std::vector<double> sums(want_sum ? nblocks : 0);
  if (want_sum) {
    LOSSD_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(sums.data(), P.block_sums, nblocks * sizeof(double),
                                               cudaMemcpyDeviceToHost, stream));
  }
  if (want_loss && !dev_loss) {
    LOSSD_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(out.loss, P.loss, n * ix, cudaMemcpyDeviceToHost, stream));
  }
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
  if (P.grad_logits != nullptr && !dev_gx) {
    LOSSD_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(out.grad_logits, P.grad_logits, n * ix, cudaMemcpyDeviceToHost, stream));
  }
  if (P.grad_targets != nullptr && !dev_gy) {
    LOSSD_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(out.grad_targets, P.grad_targets, n * ix, cudaMemcpyDeviceToHost, stream));
  }
  LOSSD_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  if (out.kept != nullptr) *out.kept = n - static_cast<int64_t>(ignored);
  if (out.loss == nullptr || want_loss) return absl::OkStatus();

  // The reduced loss, as the CPU backend forms it: exact sum of the block sums, or of each
  // row's values, divided by the normalize count (and the whole's numel or last_dim).
  // (Without ignore_index the device counts 0 ignored targets.)
  const internal::Divisors div = loss.divisors.For(static_cast<int64_t>(ignored));
  if (want_sum) return FinishSumLoss(stream, args, out, sums, div);
  if (args.reduction == Reduction::kPerSampleMean) {
    const int64_t len = args.last_dim;
    const int64_t rows = n / len;
    // A device loss: the row means formed in host memory, then copied.
    std::vector<char> host(dev_loss ? static_cast<size_t>(rows) * ix : 0);
    void* dst = dev_loss ? static_cast<void*>(host.data()) : out.loss;
    for (int64_t r = 0; r < rows; ++r) {
      StoreFromDouble(args.dtype, dst, r,
                      ExactSumOf(values + r * len, len) / static_cast<double>(len) / div.count);
    }
    if (dev_loss) {
      LOSSD_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(out.loss, host.data(), host.size(),
                                                 cudaMemcpyHostToDevice, stream));
      LOSSD_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
    }
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::Run(Slot* slot, const BceArgs& args,
                              const internal::ResolvedLoss& loss, const BceOutputs& out) {
  const int64_t n = args.numel;
  const size_t ix = ItemSize(args.dtype), iy = ItemSize(args.targets_dtype);
  // Device tensors are used in place: no upload, no download (CheckOnDevice checked them).
  const bool dev_x = (args.on_device & on_device::kLogits) != 0;
  const bool dev_y = (args.on_device & on_device::kTargets) != 0;
  const bool dev_w = (args.on_device & on_device::kWeight) != 0;
  const bool dev_p = (args.on_device & on_device::kPosWeight) != 0;
  const bool dev_loss = (out.on_device & on_device::kLoss) != 0;
  const bool dev_gx = (out.on_device & on_device::kGradLogits) != 0;
  const bool dev_gy = (out.on_device & on_device::kGradTargets) != 0;
  const bool reduce = args.reduction != Reduction::kNone;
  const bool want_sum = reduce && out.loss != nullptr;
  const int64_t nblocks = cuda::NumReduceBlocks(n);
  // The all-float kernel where it applies (CudaOptions::float_math).
  const bool float_math = options_.float_math && args.dtype != DType::kFloat64 &&
                          args.targets_dtype != DType::kFloat64 &&
                          FloatExactAt(args.weight, dev_w) && FloatExactAt(args.pos_weight, dev_p);
  const DType compute = float_math ? DType::kFloat32 : DType::kFloat64;
  Upload uploads[2];
  if (!dev_w) PrepareUpload(args.weight, compute, &uploads[0]);
  if (!dev_p) PrepareUpload(args.pos_weight, compute, &uploads[1]);
  // One count of the ignored targets serves the normalize divisor and BceOutputs::kept.
  const bool count_ignored =
      loss.divisors.CountsIgnored() || (out.kept != nullptr && loss.element.has_ignore_index);

  // Large requests of host tensors stream through the slot's pinned staging in chunks
  // (docs/kernels.md, "Pinned chunk pipeline"); the ignored count needs the whole targets on
  // the device first, so those requests run in one piece.
  if (knobs_.chunked && args.on_device == 0 && out.on_device == 0 && !count_ignored) {
    size_t per_element = ix + iy + (!reduce && out.loss != nullptr ? ix : 0) +
                         (out.grad_logits != nullptr ? ix : 0) +
                         (out.grad_targets != nullptr ? ix : 0);
    if (FullOperand(args.weight, n)) per_element += ItemSize(uploads[0].dtype);
    if (FullOperand(args.pos_weight, n)) per_element += ItemSize(uploads[1].dtype);
    const int64_t chunk = knobs_.chunk_elements > 0
                              ? knobs_.chunk_elements
                              : cuda::ChunkElementsFor(per_element, kPinnedChunkBytes);
    if (n > chunk) {
      absl::StatusOr<bool> done = RunChunked(slot, args, loss, out, uploads, float_math, chunk);
      if (!done.ok()) return done.status();
      if (*done) return absl::OkStatus();
    }
  }

  Layout L;
  size_t off = 0;
  auto place = [&off](size_t bytes) {
    const size_t at = off;
    off += AlignUp(bytes);
    return at;
  };
  L.x = place(dev_x ? 0 : n * ix);
  L.y = place(dev_y ? 0 : n * iy);
  L.w = place(uploads[0].bytes);
  L.p = place(uploads[1].bytes);
  L.loss = place(!reduce && out.loss != nullptr && !dev_loss ? n * ix : 0);
  L.gx = place(out.grad_logits != nullptr && !dev_gx ? n * ix : 0);
  L.gy = place(out.grad_targets != nullptr && !dev_gy ? n * ix : 0);
  L.sums = place(want_sum ? nblocks * sizeof(double) : 0);
  L.ignored = place(count_ignored ? sizeof(unsigned long long) : 0);
  L.total = off;

  LOSSD_CUDA_RETURN_IF_ERROR(cudaSetDevice(0));
  if (absl::Status s = Reserve(slot, L.total); !s.ok()) return s;
  char* base = static_cast<char*>(slot->buffer);
  cudaStream_t stream = slot->stream;

  const void* x = dev_x ? args.logits : base + L.x;
  const void* y = dev_y ? args.targets : base + L.y;
  if (!dev_x) {
    LOSSD_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(base + L.x, args.logits, n * ix, cudaMemcpyHostToDevice, stream));
  }
  if (!dev_y) {
    LOSSD_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(base + L.y, args.targets, n * iy, cudaMemcpyHostToDevice, stream));
  }
  // normalize: the kept count first (counted on the device, read back before the launch, as
  // the divisors depend on it), as the CPU backend's Plan (divisors.h): numel minus the
  // ignored targets, or a part's whole count.
  int64_t ignored = 0;
  if (count_ignored) {
    auto* dev = reinterpret_cast<unsigned long long*>(base + L.ignored);
    LOSSD_CUDA_RETURN_IF_ERROR(cuda::LaunchCountIgnored(args.targets_dtype, y,
                                                        loss.element.ignore_index, n, dev,
                                                        stream));
    unsigned long long host = 0;
    LOSSD_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(&host, dev, sizeof(host), cudaMemcpyDeviceToHost, stream));
    LOSSD_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
    ignored = static_cast<int64_t>(host);
  }
  const internal::Divisors div = loss.divisors.For(ignored);
  cuda::DeviceBce d;
  d.numel = n;
  d.dtype = args.dtype;
  d.logits = x;
  d.targets_dtype = args.targets_dtype;
  d.targets = y;
  d.reduction = args.reduction;
  if (dev_w) {
    d.weight = InPlace(args.weight);
  } else if (absl::Status s = UploadOperand(args.weight, uploads[0], base, L.w, stream, &d.weight);
             !s.ok()) {
    return s;
  }
  if (dev_p) {
    d.pos_weight = InPlace(args.pos_weight);
  } else if (absl::Status s =
                 UploadOperand(args.pos_weight, uploads[1], base, L.p, stream, &d.pos_weight);
             !s.ok()) {
    return s;
  }
  d.loss = !reduce && out.loss != nullptr ? (dev_loss ? out.loss : base + L.loss) : nullptr;
  d.grad_logits =
      out.grad_logits != nullptr ? (dev_gx ? out.grad_logits : base + L.gx) : nullptr;
  d.grad_targets =
      out.grad_targets != nullptr ? (dev_gy ? out.grad_targets : base + L.gy) : nullptr;
  d.block_sums = want_sum ? reinterpret_cast<double*>(base + L.sums) : nullptr;
  d.float_math = float_math;
  d.count = div.count;
  d.mean_n = div.mean_n;
  d.element = loss.element;
  LOSSD_CUDA_RETURN_IF_ERROR(cuda::LaunchBce(d, stream));

  std::vector<double> sums(want_sum ? nblocks : 0);
  if (d.loss != nullptr && !dev_loss) {
    LOSSD_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(out.loss, d.loss, n * ix, cudaMemcpyDeviceToHost, stream));
  }
  if (d.grad_logits != nullptr && !dev_gx) {
    LOSSD_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(out.grad_logits, d.grad_logits, n * ix, cudaMemcpyDeviceToHost, stream));
  }
  if (d.grad_targets != nullptr && !dev_gy) {
    LOSSD_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(out.grad_targets, d.grad_targets, n * ix, cudaMemcpyDeviceToHost, stream));
  }
  if (want_sum) {
    LOSSD_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(sums.data(), d.block_sums, nblocks * sizeof(double),
                                               cudaMemcpyDeviceToHost, stream));
  }
  LOSSD_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  if (out.kept != nullptr) *out.kept = n - ignored;
  if (want_sum) return FinishSumLoss(stream, args, out, sums, div);
  return absl::OkStatus();
}

absl::StatusOr<bool> CudaBackend::RunChunked(Slot* slot, const BceArgs& args,
                                             const internal::ResolvedLoss& loss,
                                             const BceOutputs& out, const Upload* uploads,
                                             bool float_math, int64_t chunk) {
  const int64_t n = args.numel;
  const size_t ix = ItemSize(args.dtype), iy = ItemSize(args.targets_dtype);
  const bool reduce = args.reduction != Reduction::kNone;
  const bool want_loss = !reduce && out.loss != nullptr;
  const bool want_sum = reduce && out.loss != nullptr;
  const int64_t nblocks = cuda::NumReduceBlocks(n);
  const Operand* ops[2] = {&args.weight, &args.pos_weight};
  // Full-size operands stream with the chunks (their slice of each); the others (broadcast,
  // smaller) are uploaded whole once and indexed by the request's element index.
  bool full[2];
  size_t op_item[2];
  for (int k = 0; k < 2; ++k) {
    full[k] = FullOperand(*ops[k], n);
    op_item[k] = ItemSize(uploads[k].dtype);
  }
  // A chunk buffer, laid out the same in pinned and in device memory: inputs, then outputs,
  // so that one copy each way moves a chunk.
  const size_t c = static_cast<size_t>(chunk);
  size_t off = 0;
  auto place = [&off](size_t bytes) {
    const size_t at = off;
    off += AlignUp(bytes);
    return at;
  };
  const size_t a_x = place(c * ix);
  const size_t a_y = place(c * iy);
  size_t a_op[2];
  for (int k = 0; k < 2; ++k) a_op[k] = place(full[k] ? c * op_item[k] : 0);
  const size_t in_end = off;
  const size_t a_loss = place(want_loss ? c * ix : 0);
  const size_t a_gx = place(out.grad_logits != nullptr ? c * ix : 0);
  const size_t a_gy = place(out.grad_targets != nullptr ? c * ix : 0);
  const size_t area = off;
  if (2 * area > kPinnedCapBytes || !ReservePinned(slot, 2 * area).ok()) {
    return false;  // no pinned staging: the request runs in one piece
  }
  // Device memory: the whole operands, the block sums of the request, two chunk buffers.
  size_t doff = 0;
  auto dplace = [&doff](size_t bytes) {
    const size_t at = doff;
    doff += AlignUp(bytes);
    return at;
  };
  size_t d_op[2];
  for (int k = 0; k < 2; ++k) d_op[k] = dplace(full[k] ? 0 : uploads[k].bytes);
  const size_t d_sums = dplace(want_sum ? nblocks * sizeof(double) : 0);
  const size_t d_area = dplace(2 * area);
  LOSSD_CUDA_RETURN_IF_ERROR(cudaSetDevice(0));
  if (absl::Status s = Reserve(slot, doff); !s.ok()) return s;
  char* base = static_cast<char*>(slot->buffer);
  char* pinned = static_cast<char*>(slot->pinned);
  cudaStream_t stream = slot->stream;
  cuda::DeviceOperand whole_ops[2];
  for (int k = 0; k < 2; ++k) {
    if (full[k]) continue;
    if (absl::Status s = UploadOperand(*ops[k], uploads[k], base, d_op[k], stream, &whole_ops[k]);
        !s.ok()) {
      return s;
    }
  }
  // No ignored count here (see Run): the divisors are known.
  const internal::Divisors div = loss.divisors.For(0);
  const std::vector<cuda::Chunk> chunks = cuda::PlanChunks(n, chunk);
  if (chunks.empty()) return absl::InternalError("cuda backend: no chunk planned");
  // Chunk k's outputs, from its pinned buffer to the caller's memory.
  auto drain = [&](size_t k) {
    const cuda::Chunk& ch = chunks[k];
    const char* pa = pinned + (k % 2) * area;
    if (want_loss) {
      std::memcpy(static_cast<char*>(out.loss) + ch.begin * ix, pa + a_loss, ch.count * ix);
    }
    if (out.grad_logits != nullptr) {
      std::memcpy(static_cast<char*>(out.grad_logits) + ch.begin * ix, pa + a_gx, ch.count * ix);
    }
    if (out.grad_targets != nullptr) {
      std::memcpy(static_cast<char*>(out.grad_targets) + ch.begin * ix, pa + a_gy,
                  ch.count * ix);
    }
  };
  for (size_t k = 0; k < chunks.size(); ++k) {
    const size_t s = k % 2;
    if (k >= 2) {
      // Buffer s is free once chunk k - 2's outputs are back; they go to the caller now,
      // while chunk k - 1 runs on the device.
      LOSSD_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(slot->done[s]));
      drain(k - 2);
    }
    if (k > 0 && args.should_stop && args.should_stop()) {
      return absl::CancelledError("stopped before completion");
    }
    const cuda::Chunk& ch = chunks[k];
    char* pa = pinned + s * area;
    char* da = base + d_area + s * area;
    std::memcpy(pa + a_x, static_cast<const char*>(args.logits) + ch.begin * ix, ch.count * ix);
    std::memcpy(pa + a_y, static_cast<const char*>(args.targets) + ch.begin * iy, ch.count * iy);
    for (int j = 0; j < 2; ++j) {
      if (!full[j]) continue;
      std::memcpy(pa + a_op[j], static_cast<const char*>(uploads[j].host) + ch.begin * op_item[j],
                  ch.count * op_item[j]);
    }
    LOSSD_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(da, pa, in_end, cudaMemcpyHostToDevice, stream));
    cuda::DeviceBce d;
    d.numel = ch.count;
    d.element_offset = ch.begin;
    d.dtype = args.dtype;
    d.logits = da + a_x;
    d.targets_dtype = args.targets_dtype;
    d.targets = da + a_y;
    cuda::DeviceOperand* dops[2] = {&d.weight, &d.pos_weight};
    for (int j = 0; j < 2; ++j) {
      if (full[j]) {
        // This chunk's slice, read at the chunk's own element index.
        dops[j]->dtype = uploads[j].dtype;
        dops[j]->data = da + a_op[j];
        dops[j]->inner = 1;
        dops[j]->period = ch.count;
        dops[j]->unshifted = true;
      } else {
        *dops[j] = whole_ops[j];
      }
    }
    d.reduction = args.reduction;
    d.loss = want_loss ? da + a_loss : nullptr;
    d.grad_logits = out.grad_logits != nullptr ? da + a_gx : nullptr;
    d.grad_targets = out.grad_targets != nullptr ? da + a_gy : nullptr;
    // Block b of the chunk is block first_block + b of the request.
    d.block_sums =
        want_sum ? reinterpret_cast<double*>(base + d_sums) + ch.first_block : nullptr;
    d.float_math = float_math;
    d.count = div.count;
    d.mean_n = div.mean_n;  // the request's count, not the chunk's
    d.element = loss.element;
    LOSSD_CUDA_RETURN_IF_ERROR(cuda::LaunchBce(d, stream));
    if (area > in_end) {
      LOSSD_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(pa + in_end, da + in_end, area - in_end,
                                                 cudaMemcpyDeviceToHost, stream));
    }
    LOSSD_CUDA_RETURN_IF_ERROR(cudaEventRecord(slot->done[s], stream));
  }
  for (size_t k = chunks.size() >= 2 ? chunks.size() - 2 : 0; k < chunks.size(); ++k) {
    LOSSD_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(slot->done[k % 2]));
    drain(k);
  }
  std::vector<double> sums(want_sum ? nblocks : 0);
  if (want_sum) {
    LOSSD_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(sums.data(), base + d_sums,
                                               nblocks * sizeof(double), cudaMemcpyDeviceToHost,
                                               stream));
  }
  LOSSD_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  if (out.kept != nullptr) *out.kept = n;  // no ignore_index here (count_ignored in Run)
  if (want_sum) {
    if (absl::Status s = FinishSumLoss(stream, args, out, sums, div); !s.ok()) return s;
  }
  if (knobs_.chunked_runs != nullptr) knobs_.chunked_runs->fetch_add(1);
  return true;
}

bool CudaBackend::Segmentable(const BceArgs& args, const BceOutputs& out) {
  return args.on_device == 0 && out.on_device == 0 && args.precision == Precision::kDefault &&
         args.numel > 0 && args.loss == Loss::kBce &&
         args.reduction != Reduction::kPerSampleMean && out.loss_values == nullptr &&
         (out.loss != nullptr || out.grad_logits != nullptr || out.grad_targets != nullptr) &&
         CheckArgs(args).ok();
}

std::vector<absl::Status> CudaBackend::BceBatch(const std::vector<BceItem>& items) {
  // Every status starts OK and is set once, by Update (an assignment's returned reference
  // trips nvcc's nodiscard warning on absl::Status).
  std::vector<absl::Status> statuses(items.size());
  std::vector<bool> done(items.size(), false);
  // Prepare the segmentable items on the host: the same choices Run makes for each alone.
  std::vector<Segment> segs;
  for (size_t i = 0; i < items.size(); ++i) {
    const BceArgs& args = *items[i].args;
    const BceOutputs& out = *items[i].out;
    if (!Segmentable(args, out)) continue;
    // Cancellation is checked before any work, as Bce does.
    if (args.should_stop && args.should_stop()) {
      statuses[i].Update(absl::CancelledError("stopped before completion"));
      done[i] = true;
      continue;
    }
    Segment g;
    g.index = i;
    g.loss = internal::ResolveLoss(args);
    if (g.loss.loss != Loss::kBce) continue;
    const int64_t n = args.numel;
    const size_t ix = ItemSize(args.dtype), iy = ItemSize(args.targets_dtype);
    const bool reduce = args.reduction != Reduction::kNone;
    g.float_math = options_.float_math && args.dtype != DType::kFloat64 &&
                   args.targets_dtype != DType::kFloat64 && FloatExact(args.weight) &&
                   FloatExact(args.pos_weight);
    const DType compute = g.float_math ? DType::kFloat32 : DType::kFloat64;
    g.uploads = std::make_unique<Upload[]>(2);
    PrepareUpload(args.weight, compute, &g.uploads[0]);
    PrepareUpload(args.pos_weight, compute, &g.uploads[1]);
    // The ignored count that Run takes from the device, counted here on the host targets.
    if (g.loss.divisors.CountsIgnored() ||
        (out.kept != nullptr && g.loss.element.has_ignore_index)) {
      g.ignored = CountIgnoredOnHost(args.targets_dtype, args.targets, n,
                                     g.loss.element.ignore_index);
    }
    g.div = g.loss.divisors.For(g.ignored);
    g.spec.numel = n;
    g.spec.logits_bytes = n * ix;
    g.spec.targets_bytes = n * iy;
    g.spec.weight_bytes = g.uploads[0].bytes;
    g.spec.pos_weight_bytes = g.uploads[1].bytes;
    g.spec.loss_bytes = !reduce && out.loss != nullptr ? n * ix : 0;
    g.spec.grad_logits_bytes = out.grad_logits != nullptr ? n * ix : 0;
    g.spec.grad_targets_bytes = out.grad_targets != nullptr ? n * ix : 0;
    g.spec.block_sums = reduce && out.loss != nullptr;
    g.kernel.dtype = args.dtype;
    g.kernel.targets_dtype = args.targets_dtype;
    g.kernel.reduce = g.spec.block_sums;
    g.kernel.all_float = g.float_math;
    g.kernel.smooth = g.loss.element.smoothing != 0.0;
    const int64_t blocks = cuda::NumReduceBlocks(n);
    const cuda::SegmentSpec& s = g.spec;
    g.staging_bound = cuda::AlignStaging(s.logits_bytes) + cuda::AlignStaging(s.targets_bytes) +
                      cuda::AlignStaging(s.weight_bytes) +
                      cuda::AlignStaging(s.pos_weight_bytes) + cuda::AlignStaging(s.loss_bytes) +
                      cuda::AlignStaging(s.grad_logits_bytes) +
                      cuda::AlignStaging(s.grad_targets_bytes) + cuda::SegmentParamsBytes() +
                      static_cast<size_t>(blocks) * (sizeof(int32_t) + sizeof(double));
    segs.push_back(std::move(g));
  }
  // Groups of one kernel whose staging fits the pinned cap (the parameter array, block table
  // and sums are each aligned once per plan: 3 kStagingAlign of slack).
  constexpr size_t kGroupBytes = kPinnedCapBytes - 3 * cuda::kStagingAlign;
  std::vector<std::vector<size_t>> groups;
  std::vector<size_t> group_bytes;
  for (size_t j = 0; j < segs.size(); ++j) {
    if (segs[j].staging_bound > kGroupBytes) continue;  // too large: through Bce
    size_t g = 0;
    while (g < groups.size() && !(segs[groups[g].front()].kernel == segs[j].kernel &&
                                  group_bytes[g] + segs[j].staging_bound <= kGroupBytes)) {
      ++g;
    }
    if (g == groups.size()) {
      groups.emplace_back();
      group_bytes.push_back(0);
    }
    groups[g].push_back(j);
    group_bytes[g] += segs[j].staging_bound;
  }
  bool any = false;
  for (const auto& g : groups) any = any || g.size() >= 2;
  if (any) {
    absl::StatusOr<Slot*> slot = Acquire();
    if (slot.ok()) {
      for (const auto& g : groups) {
        if (g.size() < 2) continue;
        absl::StatusOr<bool> ran = RunSegments(*slot, items, segs, g);
        if (!ran.ok()) {
          // A device failure of the launch: every item of it fails with it.
          cudaStreamSynchronize((*slot)->stream);
          cudaGetLastError();
          for (size_t j : g) {
            statuses[segs[j].index].Update(ran.status());
            done[segs[j].index] = true;
          }
        } else if (*ran) {
          for (size_t j : g) {
            done[segs[j].index] = true;
            CountChunks(*items[segs[j].index].args);
          }
        }
      }
      Release(*slot);
    }
  }
  // Everything else, one by one.
  for (size_t i = 0; i < items.size(); ++i) {
    if (!done[i]) statuses[i].Update(Bce(*items[i].args, *items[i].out));
  }
  return statuses;
}

absl::StatusOr<bool> CudaBackend::RunSegments(Slot* slot, const std::vector<BceItem>& items,
                                              const std::vector<Segment>& segs,
                                              const std::vector<size_t>& group) {
  std::vector<cuda::SegmentSpec> specs;
  specs.reserve(group.size());
  for (size_t j : group) specs.push_back(segs[j].spec);
  const size_t pb = cuda::SegmentParamsBytes();
  const cuda::SegmentPlan plan = cuda::PlanSegments(specs, pb);
  if (plan.total > kPinnedCapBytes || !ReservePinned(slot, plan.total).ok()) {
    return false;  // no pinned staging: the items run one by one
  }
  LOSSD_CUDA_RETURN_IF_ERROR(cudaSetDevice(0));
  if (absl::Status s = Reserve(slot, plan.total); !s.ok()) return s;
  char* h = static_cast<char*>(slot->pinned);
  char* d = static_cast<char*>(slot->buffer);
  cudaStream_t stream = slot->stream;
  const cuda::SegmentKernel kernel = segs[group.front()].kernel;
  // Pack every input and the launch parameters into the pinned staging.
  for (size_t k = 0; k < group.size(); ++k) {
    const Segment& g = segs[group[k]];
    const BceArgs& args = *items[g.index].args;
    const BceOutputs& out = *items[g.index].out;
    const cuda::SegmentPlace& at = plan.items[k];
    std::memcpy(h + at.logits, args.logits, g.spec.logits_bytes);
    std::memcpy(h + at.targets, args.targets, g.spec.targets_bytes);
    const Operand* ops[2] = {&args.weight, &args.pos_weight};
    const size_t op_at[2] = {at.weight, at.pos_weight};
    cuda::DeviceBce db;
    cuda::DeviceOperand* dops[2] = {&db.weight, &db.pos_weight};
    for (int j = 0; j < 2; ++j) {
      // As UploadOperand describes it.
      dops[j]->dtype = g.uploads[j].dtype;
      dops[j]->inner = ops[j]->inner;
      dops[j]->period = ops[j]->period;
      if (ops[j]->data != nullptr) {
        std::memcpy(h + op_at[j], g.uploads[j].host, g.uploads[j].bytes);
        dops[j]->data = d + op_at[j];
      }
    }
    db.numel = args.numel;
    db.dtype = args.dtype;
    db.logits = d + at.logits;
    db.targets_dtype = args.targets_dtype;
    db.targets = d + at.targets;
    db.reduction = args.reduction;
    db.loss = g.spec.loss_bytes > 0 ? d + at.loss : nullptr;
    db.grad_logits = out.grad_logits != nullptr ? d + at.grad_logits : nullptr;
    db.grad_targets = out.grad_targets != nullptr ? d + at.grad_targets : nullptr;
    db.block_sums =
        g.spec.block_sums ? reinterpret_cast<double*>(d + plan.sums) + at.first_block : nullptr;
    db.float_math = g.float_math;
    db.count = g.div.count;
    db.mean_n = g.div.mean_n;
    db.element = g.loss.element;
    cuda::SegmentKernel encoded;
    LOSSD_CUDA_RETURN_IF_ERROR(
        cuda::EncodeSegment(db, at.first_block, h + plan.params + k * pb, &encoded));
    if (!(encoded == kernel)) {
      return absl::InternalError("cuda backend: a segmented batch mixes kernels");
    }
  }
  std::memcpy(h + plan.block_table, plan.block_item.data(),
              plan.block_item.size() * sizeof(int32_t));
  LOSSD_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(d, h, plan.in_bytes, cudaMemcpyHostToDevice, stream));
  LOSSD_CUDA_RETURN_IF_ERROR(cuda::LaunchBceSegments(
      kernel, d + plan.params, reinterpret_cast<const int32_t*>(d + plan.block_table),
      plan.total_blocks, stream));
  if (plan.total > plan.in_bytes) {
    LOSSD_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(h + plan.in_bytes, d + plan.in_bytes,
                                               plan.total - plan.in_bytes, cudaMemcpyDeviceToHost,
                                               stream));
  }
  LOSSD_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  if (knobs_.segmented_launches != nullptr) knobs_.segmented_launches->fetch_add(1);
  // Each item's outputs, and its reduction from its own block sums, as Run forms them.
  for (size_t k = 0; k < group.size(); ++k) {
    const Segment& g = segs[group[k]];
    const BceArgs& args = *items[g.index].args;
    const BceOutputs& out = *items[g.index].out;
    const cuda::SegmentPlace& at = plan.items[k];
    if (g.spec.loss_bytes > 0) std::memcpy(out.loss, h + at.loss, g.spec.loss_bytes);
    if (out.grad_logits != nullptr) {
      std::memcpy(out.grad_logits, h + at.grad_logits, g.spec.grad_logits_bytes);
    }
    if (out.grad_targets != nullptr) {
      std::memcpy(out.grad_targets, h + at.grad_targets, g.spec.grad_targets_bytes);
    }
    if (out.kept != nullptr) *out.kept = args.numel - g.ignored;
    if (g.spec.block_sums) {
      const double* first = reinterpret_cast<const double*>(h + plan.sums) + at.first_block;
      const std::vector<double> sums(first, first + at.blocks);
      StoreSumLoss(args, sums, g.div, out.loss);
    }
  }
  return true;
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

absl::StatusOr<std::unique_ptr<Backend>> cuda::MakeCudaBackendWithKnobs(
    const CudaOptions& options, const cuda::CudaBackendKnobs& knobs) {
  if (knobs.chunk_elements < 0 || knobs.chunk_elements % kReduceBlock != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cuda backend: chunk_elements ", knobs.chunk_elements,
        " is not a non-negative multiple of ", kReduceBlock));
  }
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
  return std::unique_ptr<Backend>(std::make_unique<CudaBackend>(options, knobs));
}

absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(const CudaOptions& options) {
  return cuda::MakeCudaBackendWithKnobs(options, cuda::CudaBackendKnobs());
}

std::string CudaDeviceUuid() {
  if (CudaDeviceCount() == 0) return "";
  cudaDeviceProp prop;
  if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) {
    cudaGetLastError();
    return "";
  }
  unsigned char bytes[16];
  static_assert(sizeof(prop.uuid.bytes) == sizeof(bytes));
  std::memcpy(bytes, prop.uuid.bytes, sizeof(bytes));
  return cuda::FormatGpuUuid(bytes);
}

// ---- CUDA IPC memory ---------------------------------------------------------------------

namespace {

static_assert(sizeof(cudaIpcMemHandle_t) == cuda::kIpcHandleBytes);

// The CUDA IPC mappings open in this process, by handle bytes, with their holders' count. A
// process may not be able to map one allocation twice (cudaIpcOpenMemHandle fails on some
// drivers), so a second open of a handle shares the first's mapping, and the last holder
// closes it. The count is kept under the mutex (not in a shared_ptr's atomic count), so that
// a closing and a new open of the same handle cannot interleave: the open either shares the
// mapping before the close sees its count fall to 0, or opens it again after it was closed.
struct IpcMapping {
  void* base = nullptr;         // the exported allocation, mapped here
  uint64_t bytes = 0;           // its size
  int64_t holders = 0;
};
ABSL_CONST_INIT absl::Mutex ipc_mu(absl::kConstInit);
std::map<std::string, IpcMapping>& IpcTable() ABSL_EXCLUSIVE_LOCKS_REQUIRED(ipc_mu) {
  static auto* table = new std::map<std::string, IpcMapping>();
  return *table;
}

// Drops one holder of the mapping of `key`; the last one closes it. Errors are ignored: this
// runs in destructors, possibly at process exit.
void ReleaseIpcMapping(const std::string& key) {
  absl::MutexLock lock(&ipc_mu);
  auto& table = IpcTable();
  auto it = table.find(key);
  if (it == table.end()) return;
  if (--it->second.holders > 0) return;
  if (cudaSetDevice(0) != cudaSuccess || cudaIpcCloseMemHandle(it->second.base) != cudaSuccess) {
    cudaGetLastError();
  }
  table.erase(it);
}

// The bytes from `p` (a mapping's start) to the end of its allocation, from the driver's
// cuMemGetAddressRange, reached through the runtime (this library links cudart_static, not
// the driver library).
absl::StatusOr<uint64_t> AllocationBytesFrom(void* p) {
  using GetAddressRange = CUresult (*)(CUdeviceptr*, size_t*, CUdeviceptr);
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
  const cudaError_t err = cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &fn, 12000,
                                                           cudaEnableDefault, &found);
  if (err != cudaSuccess || found != cudaDriverEntryPointSuccess || fn == nullptr) {
    cudaGetLastError();
    return absl::InternalError(absl::StrCat(
        "cuMemGetAddressRange is not available from the CUDA driver (",
        cudaGetErrorString(err), ", query result ", static_cast<int>(found), ")"));
  }
  CUdeviceptr base = 0;
  size_t size = 0;
  const CUdeviceptr at = static_cast<CUdeviceptr>(reinterpret_cast<uintptr_t>(p));
  const CUresult r = reinterpret_cast<GetAddressRange>(fn)(&base, &size, at);
  if (r != CUDA_SUCCESS || at < base || at - base > size) {
    return absl::InternalError(absl::StrCat(
        "cuMemGetAddressRange failed on an opened CUDA IPC mapping: CUresult ",
        static_cast<int>(r)));
  }
  return static_cast<uint64_t>(size - (at - base));
}

}  // namespace

absl::StatusOr<DeviceMemory> OpenCudaIpcMemory(std::string_view handle, uint64_t offset,
                                               uint64_t bytes) {
  if (absl::Status s = cuda::CheckIpcRequest(handle, offset, bytes); !s.ok()) return s;
  if (CudaDeviceCount() == 0) {
    return absl::FailedPreconditionError(
        "no usable CUDA device: CUDA IPC memory cannot be opened");
  }
  const std::string key(handle);
  void* base = nullptr;
  uint64_t allocation = 0;
  {
    absl::MutexLock lock(&ipc_mu);
    auto& table = IpcTable();
    auto it = table.find(key);
    if (it == table.end()) {
      if (const cudaError_t err = cudaSetDevice(0); err != cudaSuccess) {
        cudaGetLastError();
        return absl::FailedPreconditionError(
            absl::StrCat("no usable CUDA device: ", cudaGetErrorString(err)));
      }
      cudaIpcMemHandle_t h;
      std::memcpy(&h, handle.data(), sizeof(h));
      void* opened = nullptr;
      const cudaError_t err =
          cudaIpcOpenMemHandle(&opened, h, cudaIpcMemLazyEnablePeerAccess);
      if (err != cudaSuccess) {
        cudaGetLastError();
        return absl::InvalidArgumentError(absl::StrCat(
            "cudaIpcOpenMemHandle failed (a handle of another device, or of a freed "
            "allocation?): ",
            cudaGetErrorName(err), ": ", cudaGetErrorString(err)));
      }
      absl::StatusOr<uint64_t> size = AllocationBytesFrom(opened);
      if (!size.ok()) {
        if (cudaIpcCloseMemHandle(opened) != cudaSuccess) cudaGetLastError();
        return size.status();
      }
      it = table.emplace(key, IpcMapping{opened, *size, 0}).first;
    }
    base = it->second.base;
    allocation = it->second.bytes;
    ++it->second.holders;
  }
  // From here this call holds the mapping: the keepalive (or its early release) drops it.
  std::shared_ptr<void> keepalive(base, [key](void*) { ReleaseIpcMapping(key); });
  if (absl::Status s = cuda::CheckIpcRange(offset, bytes, allocation); !s.ok()) return s;
  DeviceMemory memory;
  memory.data = static_cast<char*>(base) + offset;
  memory.bytes = static_cast<int64_t>(bytes);
  memory.keepalive = std::move(keepalive);
  return memory;
}

}  // namespace lossd::kernels
