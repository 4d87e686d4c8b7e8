// Compute backends: the Backend interface that carries out one evaluation of the loss spec
// (bce.h), the factories of the Highway SIMD CPU backend and of the CUDA backend, and probes of
// what this build and machine offer (SIMD target, CUDA devices). A build without CUDA has the
// CUDA functions too: they report no device. Every function here is thread-safe, and so are
// Backend::Bce and Backend::BceBatch on one backend from any number of threads.
#ifndef LOSSD_KERNELS_BACKEND_H_
#define LOSSD_KERNELS_BACKEND_H_

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "lossd/kernels/bce.h"

namespace lossd::kernels {

// One evaluation of a batch (Backend::BceBatch): its spec and where its results go, both
// borrowed for the duration of the call.
struct BceItem {
  const BceArgs* args = nullptr;
  const BceOutputs* out = nullptr;
};

// A compute backend. Thread-safe: Bce and BceBatch may be called concurrently.
class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string Name() const = 0;  // "cpu", "cuda"
  // Computes the loss and the requested gradients. Errors: INTERNAL on a device failure.
  virtual absl::Status Bce(const BceArgs& args, const BceOutputs& out) = 0;
  // Computes independent evaluations together and returns one status per item, in order:
  // one item's error (or its should_stop) leaves the others alone. Every item's results must
  // be bitwise those of Bce(*item.args, *item.out) alone, whatever it is batched with
  // (docs/design.md section 1, "Dynamic batching of small CUDA requests"). The default runs
  // Bce on each item in turn. The CUDA backend overrides it: items of the fused plain-BCE path
  // run in one segmented launch, one copy in and one copy out (docs/kernels.md section 9).
  virtual std::vector<absl::Status> BceBatch(const std::vector<BceItem>& items);
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
// UUID of device 0 as nvidia-smi -L prints it ("GPU-" then 8-4-4-4-12 lowercase hex digits),
// empty when none.
std::string CudaDeviceUuid();
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

// Device memory that another process of this machine exported with cudaIpcGetMemHandle, opened
// in this process on device 0 (the CUDA backend's device): `data` is a device pointer to the
// `bytes` bytes at `offset` of the exported allocation. The mapping stays open while any copy
// of `keepalive` lives (the last one closes it with cudaIpcCloseMemHandle), so a computation
// that holds it never loses its memory.
struct DeviceMemory {
  void* data = nullptr;
  int64_t bytes = 0;
  std::shared_ptr<void> keepalive;
};
// `handle`: the 64 bytes of a cudaIpcMemHandle_t. Errors, each naming the values:
//   FAILED_PRECONDITION  a build without CUDA, or no usable GPU;
//   INVALID_ARGUMENT     a handle that is not 64 bytes, bytes == 0, or offset + bytes past the
//                        end of the exported allocation (never a pointer outside it);
//   the failure of cudaIpcOpenMemHandle (a handle of another device or a freed allocation) as
//   INVALID_ARGUMENT with CUDA's message.
// Opening the same allocation twice is allowed (the driver counts references). Thread-safe.
absl::StatusOr<DeviceMemory> OpenCudaIpcMemory(std::string_view handle, uint64_t offset,
                                               uint64_t bytes);

}  // namespace lossd::kernels

#endif  // LOSSD_KERNELS_BACKEND_H_
