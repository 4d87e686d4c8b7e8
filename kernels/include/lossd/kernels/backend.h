// Compute backends: the Backend interface that carries out one evaluation of the loss spec
// (bce.h), the factories of the Highway SIMD CPU backend and of the CUDA backend, and probes of
// what this build and machine offer (SIMD target, CUDA devices). A build without CUDA has the
// CUDA functions too: they report no device. Every function here is thread-safe, and so is
// Backend::Bce on one backend from any number of threads.
#ifndef LOSSD_KERNELS_BACKEND_H_
#define LOSSD_KERNELS_BACKEND_H_

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "lossd/kernels/bce.h"

namespace lossd::kernels {

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

}  // namespace lossd::kernels

#endif  // LOSSD_KERNELS_BACKEND_H_
