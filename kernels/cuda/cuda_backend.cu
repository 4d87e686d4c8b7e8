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
#include "kernels/cuda/bce_device_math.h"
#include "kernels/src/bce_math.h"
#include "kernels/cuda/cuda_kernels.h"
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

// A stream and its grow-only device buffer. Owned by the pool; used by one call at a time.
struct Slot {
  cudaStream_t stream = nullptr;
  void* buffer = nullptr;
  size_t capacity = 0;
};

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(const CudaOptions& options) : options_(options) {}
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
  // Plain BCE (NONE/SUM/MEAN, no per-element values): the fused kernel. `loss`: args's loss
  // options as ResolveLoss read them (resolved_loss.h), the only ones these two read.
  absl::Status Run(Slot* slot, const BceArgs& args, const internal::ResolvedLoss& loss,
                   const BceOutputs& out);
  // Every other option: the generic kernel, reductions on the host.
  absl::Status RunGeneric(Slot* slot, const BceArgs& args, const internal::ResolvedLoss& loss,
                          const BceOutputs& out);
  // BceOutputs::kept alone (no other output requested), counted on the device.
  absl::Status CountKept(Slot* slot, const BceArgs& args, int64_t* kept);

  const CudaOptions options_;
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
  // Per-sample means of empty rows: NaN on the host, as the CPU backend (divisors.h).
  if (internal::EmptyRows(args)) return internal::EmptyRowMeans(args, out);
  if (args.precision != Precision::kDefault) {
    // The server computes correctly rounded requests on the host (docs/kernels.md section 8).
    return absl::InvalidArgumentError(
        "precision PRECISION_CORRECTLY_ROUNDED is computed by the CPU backend only");
  }
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
    if (out.kept != nullptr) *out.kept = 0;
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
    count_chunks();
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
    // Never hand back a slot with work in flight on its buffer.
    cudaStreamSynchronize((*slot)->stream);
    cudaGetLastError();
  }
  Release(*slot);
  if (status.ok()) count_chunks();
  return status;
}

absl::Status CudaBackend::CountKept(Slot* slot, const BceArgs& args, int64_t* kept) {
  const int64_t n = args.numel;
  const size_t at_y = 0;
  const size_t at_count = AlignUp(n * ItemSize(args.targets_dtype));
  LOSSD_CUDA_RETURN_IF_ERROR(cudaSetDevice(0));
  if (absl::Status s = Reserve(slot, at_count + AlignUp(sizeof(unsigned long long))); !s.ok()) {
    return s;
  }
  char* base = static_cast<char*>(slot->buffer);
  cudaStream_t stream = slot->stream;
  LOSSD_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(base + at_y, args.targets,
                                             n * ItemSize(args.targets_dtype),
                                             cudaMemcpyHostToDevice, stream));
  auto* dev = reinterpret_cast<unsigned long long*>(base + at_count);
  LOSSD_CUDA_RETURN_IF_ERROR(cuda::LaunchCountIgnored(args.targets_dtype, base + at_y,
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
  const bool sum = args.reduction == Reduction::kSum || args.reduction == Reduction::kMean;
  const bool want_sum = sum && out.loss != nullptr;
  const bool want_loss = args.reduction == Reduction::kNone && out.loss != nullptr;
  // Per-element values come back for per-sample mean (reduced here, per row, as the CPU
  // backend does) and for the caller's loss_values.
  const bool want_values = out.loss_values != nullptr ||
                           (args.reduction == Reduction::kPerSampleMean && out.loss != nullptr);
  const int64_t nblocks = cuda::NumReduceBlocks(n);

  Upload uploads[2];
  PrepareUpload(args.weight, DType::kFloat64, &uploads[0]);
  PrepareUpload(args.pos_weight, DType::kFloat64, &uploads[1]);
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
  // normalize with ignore_index counts the kept elements on the device, unless a part's whole
  // count is given; otherwise the count is known here (divisors.h).
  const bool count_on_device = loss.divisors.CountsIgnored();
  const size_t at_ign = place(count_on_device ? sizeof(unsigned long long) : 0);
  // BceOutputs::kept without that count: a count of its own (the kernel must not see it, as
  // it would divide by it).
  const bool count_for_kept =
      out.kept != nullptr && loss.element.has_ignore_index && !count_on_device;
  const size_t at_kept = place(count_for_kept ? sizeof(unsigned long long) : 0);
  const size_t at_l = place(want_loss ? n * ix : 0);
  const size_t at_s = place(want_sum ? nblocks * sizeof(double) : 0);
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

  cuda::DeviceGeneric P;
  P.numel = n;
  P.dtype = args.dtype;
  P.logits = base + at_x;
  P.targets = base + at_y;
  P.targets_dtype = args.targets_dtype;
  if (absl::Status s = UploadOperand(args.weight, uploads[0], base, at_w, stream, &P.weight);
      !s.ok()) {
    return s;
  }
  if (absl::Status s =
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
  P.loss = want_loss ? base + at_l : nullptr;
  P.block_sums = want_sum ? reinterpret_cast<double*>(base + at_s) : nullptr;
  P.values = want_values ? reinterpret_cast<double*>(base + at_v) : nullptr;
  P.grad_logits = out.grad_logits != nullptr ? base + at_gx : nullptr;
  P.grad_targets = out.grad_targets != nullptr ? base + at_gy : nullptr;
  LOSSD_CUDA_RETURN_IF_ERROR(cuda::LaunchGeneric(P, stream));

  unsigned long long ignored = 0;
  if (count_on_device) {
    LOSSD_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(&ignored, P.ignored, sizeof(ignored),
                                               cudaMemcpyDeviceToHost, stream));
  } else if (count_for_kept) {
    auto* dev = reinterpret_cast<unsigned long long*>(base + at_kept);
    LOSSD_CUDA_RETURN_IF_ERROR(cuda::LaunchCountIgnored(args.targets_dtype, base + at_y,
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
  if (want_loss) {
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
  if (P.grad_logits != nullptr) {
    LOSSD_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(out.grad_logits, P.grad_logits, n * ix, cudaMemcpyDeviceToHost, stream));
  }
  if (P.grad_targets != nullptr) {
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
  if (want_sum) {
    StoreSumLoss(args, sums, div, out.loss);
  } else if (args.reduction == Reduction::kPerSampleMean) {
    const int64_t len = args.last_dim;
    const int64_t rows = n / len;
    for (int64_t r = 0; r < rows; ++r) {
      StoreFromDouble(args.dtype, out.loss, r,
                      ExactSumOf(values + r * len, len) / static_cast<double>(len) / div.count);
    }
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::Run(Slot* slot, const BceArgs& args,
                              const internal::ResolvedLoss& loss, const BceOutputs& out) {
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
  // The all-float kernel where it applies (CudaOptions::float_math).
  const bool float_math = options_.float_math && args.dtype != DType::kFloat64 &&
                          args.targets_dtype != DType::kFloat64 && FloatExact(args.weight) &&
                          FloatExact(args.pos_weight);
  const DType compute = float_math ? DType::kFloat32 : DType::kFloat64;
  Upload uploads[2];
  PrepareUpload(args.weight, compute, &uploads[0]);
  PrepareUpload(args.pos_weight, compute, &uploads[1]);
  L.w = place(uploads[0].bytes);
  L.p = place(uploads[1].bytes);
  L.loss = place(!reduce && out.loss != nullptr ? n * ix : 0);
  L.gx = place(out.grad_logits != nullptr ? n * ix : 0);
  L.gy = place(out.grad_targets != nullptr ? n * ix : 0);
  L.sums = place(want_sum ? nblocks * sizeof(double) : 0);
  // One count of the ignored targets serves the normalize divisor and BceOutputs::kept.
  const bool count_ignored =
      loss.divisors.CountsIgnored() || (out.kept != nullptr && loss.element.has_ignore_index);
  L.ignored = place(count_ignored ? sizeof(unsigned long long) : 0);
  L.total = off;

  LOSSD_CUDA_RETURN_IF_ERROR(cudaSetDevice(0));
  if (absl::Status s = Reserve(slot, L.total); !s.ok()) return s;
  char* base = static_cast<char*>(slot->buffer);
  cudaStream_t stream = slot->stream;

  LOSSD_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(base + L.x, args.logits, n * ix, cudaMemcpyHostToDevice, stream));
  LOSSD_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(base + L.y, args.targets, n * iy, cudaMemcpyHostToDevice, stream));
  // normalize: the kept count first (counted on the device, read back before the launch, as
  // the divisors depend on it), as the CPU backend's Plan (divisors.h): numel minus the
  // ignored targets, or a part's whole count.
  int64_t ignored = 0;
  if (count_ignored) {
    auto* dev = reinterpret_cast<unsigned long long*>(base + L.ignored);
    LOSSD_CUDA_RETURN_IF_ERROR(cuda::LaunchCountIgnored(args.targets_dtype, base + L.y,
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
  d.logits = base + L.x;
  d.targets_dtype = args.targets_dtype;
  d.targets = base + L.y;
  d.reduction = args.reduction;
  if (absl::Status s = UploadOperand(args.weight, uploads[0], base, L.w, stream, &d.weight);
      !s.ok()) {
    return s;
  }
  if (absl::Status s =
          UploadOperand(args.pos_weight, uploads[1], base, L.p, stream, &d.pos_weight);
      !s.ok()) {
    return s;
  }
  d.loss = !reduce && out.loss != nullptr ? base + L.loss : nullptr;
  d.grad_logits = out.grad_logits != nullptr ? base + L.gx : nullptr;
  d.grad_targets = out.grad_targets != nullptr ? base + L.gy : nullptr;
  d.block_sums = want_sum ? reinterpret_cast<double*>(base + L.sums) : nullptr;
  d.float_math = float_math;
  d.count = div.count;
  d.mean_n = div.mean_n;
  d.element = loss.element;
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
  if (out.kept != nullptr) *out.kept = n - ignored;
  if (want_sum) StoreSumLoss(args, sums, div, out.loss);
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

absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(const CudaOptions& options) {
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
  return std::unique_ptr<Backend>(std::make_unique<CudaBackend>(options));
}

}  // namespace lossd::kernels
