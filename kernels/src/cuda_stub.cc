// The CUDA entry points of a build without CUDA (-DLOSSD_CUDA=OFF or no nvcc).
#include "lossd/kernels/backend.h"

namespace lossd::kernels {

bool CudaCompiled() { return false; }
int CudaDeviceCount() { return 0; }
std::string CudaDeviceName() { return ""; }
std::string CudaDeviceUuid() { return ""; }
absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(const CudaOptions&) {
  return absl::FailedPreconditionError("this lossd build has no CUDA support");
}
absl::StatusOr<DeviceMemory> OpenCudaIpcMemory(std::string_view, uint64_t, uint64_t) {
  return absl::FailedPreconditionError(
      "this lossd build has no CUDA support: CUDA IPC memory cannot be opened");
}

}  // namespace lossd::kernels
