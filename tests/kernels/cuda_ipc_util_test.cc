// The plain helpers of OpenCudaIpcMemory and CudaDeviceUuid (kernels/cuda/ipc_util.h), checked
// on the CPU: request and range checks (no overflow) and the UUID's text form.
#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <string>

#include "absl/status/status.h"
#include "kernels/cuda/ipc_util.h"

namespace lossd::kernels::cuda {
namespace {

TEST(CudaIpcUtilTest, RequestChecks) {
  const std::string handle(64, '\x01');
  EXPECT_TRUE(CheckIpcRequest(handle, 0, 1).ok());
  const absl::Status short_handle = CheckIpcRequest(std::string(63, 'x'), 0, 1);
  EXPECT_EQ(short_handle.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(short_handle.message().find("63 bytes, expected 64"), std::string::npos)
      << short_handle;
  EXPECT_EQ(CheckIpcRequest(std::string(65, 'x'), 0, 1).code(), absl::StatusCode::kInvalidArgument);
  const absl::Status empty = CheckIpcRequest(handle, 12, 0);
  EXPECT_EQ(empty.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(empty.message().find("offset 12 has bytes 0"), std::string::npos) << empty;
}

TEST(CudaIpcUtilTest, RangeChecksWithoutOverflow) {
  EXPECT_TRUE(CheckIpcRange(0, 1024, 1024).ok());
  EXPECT_TRUE(CheckIpcRange(1000, 24, 1024).ok());
  EXPECT_TRUE(CheckIpcRange(1023, 1, 1024).ok());
  const absl::Status past = CheckIpcRange(1000, 25, 1024);
  EXPECT_EQ(past.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(past.message().find("offset 1000 + bytes 25"), std::string::npos) << past;
  EXPECT_NE(past.message().find("allocation of 1024 bytes"), std::string::npos) << past;
  EXPECT_FALSE(CheckIpcRange(1025, 0, 1024).ok());
  EXPECT_FALSE(CheckIpcRange(0, 1025, 1024).ok());
  // offset + bytes would wrap around in 64 bits.
  constexpr uint64_t kMax = std::numeric_limits<uint64_t>::max();
  EXPECT_FALSE(CheckIpcRange(8, kMax - 4, 1024).ok());
  EXPECT_FALSE(CheckIpcRange(kMax, 2, 1024).ok());
  EXPECT_FALSE(CheckIpcRange(kMax, kMax, kMax - 1).ok());
  EXPECT_TRUE(CheckIpcRange(kMax - 1, 1, kMax).ok());
}

TEST(CudaIpcUtilTest, UuidAsNvidiaSmiPrintsIt) {
  const unsigned char bytes[16] = {0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0,
                                   0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF};
  EXPECT_EQ(FormatGpuUuid(bytes), "GPU-12345678-9abc-def0-0123-456789abcdef");
  const unsigned char zeros[16] = {};
  EXPECT_EQ(FormatGpuUuid(zeros), "GPU-00000000-0000-0000-0000-000000000000");
}

}  // namespace
}  // namespace lossd::kernels::cuda
