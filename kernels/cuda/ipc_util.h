// Plain C++ helpers of OpenCudaIpcMemory and CudaDeviceUuid (cuda_backend.cu), without CUDA
// types so that the CPU-only tests check them (tests/kernels/ipc_util_test.cc): the request
// and range checks, and the UUID's text form.
#ifndef LOSSD_KERNELS_CUDA_IPC_UTIL_H_
#define LOSSD_KERNELS_CUDA_IPC_UTIL_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace lossd::kernels::cuda {

// sizeof(cudaIpcMemHandle_t) (cuda_backend.cu asserts it).
inline constexpr size_t kIpcHandleBytes = 64;

// The checks before anything is opened: the handle's size and a non-empty range.
inline absl::Status CheckIpcRequest(std::string_view handle, uint64_t offset, uint64_t bytes) {
  if (handle.size() != kIpcHandleBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("CUDA IPC handle is ", handle.size(), " bytes, expected ", kIpcHandleBytes));
  }
  if (bytes == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("CUDA IPC range at offset ", offset, " has bytes 0"));
  }
  return absl::OkStatus();
}

// Whether [offset, offset + bytes) lies inside an allocation of `allocation_bytes` bytes,
// without overflow for any values.
inline absl::Status CheckIpcRange(uint64_t offset, uint64_t bytes, uint64_t allocation_bytes) {
  if (offset > allocation_bytes || bytes > allocation_bytes - offset) {
    return absl::InvalidArgumentError(absl::StrCat(
        "CUDA IPC range offset ", offset, " + bytes ", bytes,
        " is past the end of the exported allocation of ", allocation_bytes, " bytes"));
  }
  return absl::OkStatus();
}

// A device UUID's 16 bytes as nvidia-smi -L prints them: "GPU-" then 8-4-4-4-12 lowercase hex
// digits.
inline std::string FormatGpuUuid(const unsigned char (&bytes)[16]) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string s = "GPU-";
  for (int i = 0; i < 16; ++i) {
    if (i == 4 || i == 6 || i == 8 || i == 10) s.push_back('-');
    s.push_back(kHex[bytes[i] >> 4]);
    s.push_back(kHex[bytes[i] & 0xf]);
  }
  return s;
}

}  // namespace lossd::kernels::cuda

#endif  // LOSSD_KERNELS_CUDA_IPC_UTIL_H_
