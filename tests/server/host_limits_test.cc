// Tests for ReadHostLimits and DescribeHostLimits: fake filesystem roots laid out like / with
// cgroup v2, v1 and hybrid files, plus one sanity check on the real machine.
#include "server/host_limits.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"

namespace lossd::server {
namespace {

namespace fs = std::filesystem;

constexpr int64_t kMiB = int64_t{1} << 20;
constexpr int64_t kGiB = int64_t{1} << 30;

// A fresh directory under testing::TempDir(), removed when the object goes away.
class FakeRoot {
 public:
  FakeRoot() {
    static std::atomic<int> counter{0};
    const testing::TestInfo* info = testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::path(testing::TempDir()) / absl::StrCat("host_limits_",
                                                       info != nullptr ? info->name() : "test", "_",
                                                       getpid(), "_", counter++);
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  ~FakeRoot() {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  FakeRoot(const FakeRoot&) = delete;
  FakeRoot& operator=(const FakeRoot&) = delete;

  // Writes `content` to <root>/<relative>, creating the directories above it.
  void Write(const std::string& relative, const std::string& content) {
    fs::path file = dir_ / relative;
    fs::create_directories(file.parent_path());
    std::ofstream(file) << content;
  }
  // Creates the directory <root>/<relative> (a cgroup without limit files).
  void Mkdir(const std::string& relative) { fs::create_directories(dir_ / relative); }
  // /proc/meminfo with MemTotal = `bytes` (written in kB, as the kernel does).
  void MemInfo(int64_t bytes) {
    Write("proc/meminfo", absl::StrCat("MemTotal:       ", bytes / 1024, " kB\n",
                                       "MemFree:         1234 kB\nMemAvailable:    5678 kB\n"));
  }

  std::string path() const { return dir_.string(); }

 private:
  fs::path dir_;
};

double OnlineCpus() { return static_cast<double>(std::thread::hardware_concurrency()); }

TEST(HostLimitsTest, V2WithLimits) {
  FakeRoot root;
  root.Write("proc/self/cgroup", "0::/kubepods/pod1/c1\n");
  root.Write("sys/fs/cgroup/kubepods/pod1/c1/memory.max", "536870912\n");
  root.Write("sys/fs/cgroup/kubepods/pod1/c1/cpu.max", "150000 100000\n");
  root.MemInfo(16 * kGiB);

  HostLimits limits = ReadHostLimits(root.path());
  EXPECT_EQ(limits.memory_bytes, 512 * kMiB);
  EXPECT_EQ(limits.memory_source, "cgroup v2 memory.max");
  EXPECT_DOUBLE_EQ(limits.cpus, 1.5);
  EXPECT_EQ(limits.cpu_source, "cgroup v2 cpu.max");
}

TEST(HostLimitsTest, V2MaxFallsBackToMemTotal) {
  FakeRoot root;
  root.Write("proc/self/cgroup", "0::/user.slice\n");
  root.Write("sys/fs/cgroup/user.slice/memory.max", "max\n");
  root.Write("sys/fs/cgroup/user.slice/cpu.max", "max 100000\n");
  root.MemInfo(8 * kGiB);

  HostLimits limits = ReadHostLimits(root.path());
  EXPECT_EQ(limits.memory_bytes, 8 * kGiB);
  EXPECT_EQ(limits.memory_source, "/proc/meminfo MemTotal");
  EXPECT_DOUBLE_EQ(limits.cpus, OnlineCpus());
  EXPECT_EQ(limits.cpu_source, "hardware_concurrency");
}

TEST(HostLimitsTest, V2NestedPathUsesSmallestAncestorLimit) {
  FakeRoot root;
  root.Write("proc/self/cgroup", "0::/a/b/c\n");
  root.Mkdir("sys/fs/cgroup/a/b/c");  // the process's own cgroup has no limit files
  root.Write("sys/fs/cgroup/a/b/memory.max", "2147483648\n");
  root.Write("sys/fs/cgroup/a/memory.max", "1073741824\n");
  root.Write("sys/fs/cgroup/a/b/cpu.max", "400000 100000\n");
  root.Write("sys/fs/cgroup/a/cpu.max", "250000 100000\n");
  // A sibling's tighter limit does not apply.
  root.Write("sys/fs/cgroup/a/other/memory.max", "1048576\n");
  root.MemInfo(64 * kGiB);

  HostLimits limits = ReadHostLimits(root.path());
  EXPECT_EQ(limits.memory_bytes, kGiB);
  EXPECT_EQ(limits.memory_source, "cgroup v2 memory.max");
  EXPECT_DOUBLE_EQ(limits.cpus, 2.5);
  EXPECT_EQ(limits.cpu_source, "cgroup v2 cpu.max");
}

TEST(HostLimitsTest, V2InnerLimitSmallerThanAncestorWins) {
  FakeRoot root;
  root.Write("proc/self/cgroup", "0::/a/b\n");
  root.Write("sys/fs/cgroup/a/b/memory.max", "268435456\n");
  root.Write("sys/fs/cgroup/a/memory.max", "1073741824\n");
  root.Write("sys/fs/cgroup/a/b/cpu.max", "50000 100000\n");
  root.Write("sys/fs/cgroup/a/cpu.max", "200000 100000\n");
  root.MemInfo(64 * kGiB);

  HostLimits limits = ReadHostLimits(root.path());
  EXPECT_EQ(limits.memory_bytes, 256 * kMiB);
  EXPECT_DOUBLE_EQ(limits.cpus, 0.5);
}

TEST(HostLimitsTest, V2MissingPathUsesHierarchyRoot) {
  FakeRoot root;
  // Inside a container the host's path is not mounted; the container's cgroup is the root.
  root.Write("proc/self/cgroup", "0::/system.slice/docker-abc.scope\n");
  root.Write("sys/fs/cgroup/memory.max", "268435456\n");
  root.Write("sys/fs/cgroup/cpu.max", "50000 100000\n");
  root.MemInfo(32 * kGiB);

  HostLimits limits = ReadHostLimits(root.path());
  EXPECT_EQ(limits.memory_bytes, 256 * kMiB);
  EXPECT_EQ(limits.memory_source, "cgroup v2 memory.max");
  EXPECT_DOUBLE_EQ(limits.cpus, 0.5);
  EXPECT_EQ(limits.cpu_source, "cgroup v2 cpu.max");
}

TEST(HostLimitsTest, V2PathOutsideNamespaceUsesHierarchyRoot) {
  FakeRoot root;
  // A cgroup namespace shows cgroups outside it with "..": never read above the mount.
  root.Write("proc/self/cgroup", "0::/../../../secret\n");
  root.Write("secret/memory.max", "1024\n");
  root.Write("sys/fs/cgroup/memory.max", "536870912\n");
  root.MemInfo(32 * kGiB);

  HostLimits limits = ReadHostLimits(root.path());
  EXPECT_EQ(limits.memory_bytes, 512 * kMiB);
  EXPECT_EQ(limits.memory_source, "cgroup v2 memory.max");
}

TEST(HostLimitsTest, V1WithLimits) {
  FakeRoot root;
  root.Write("proc/self/cgroup",
             "11:name=systemd:/docker/abc\n4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n");
  root.Write("sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes", "1073741824\n");
  root.Write("sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "200000\n");
  root.Write("sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000\n");
  root.MemInfo(16 * kGiB);

  HostLimits limits = ReadHostLimits(root.path());
  EXPECT_EQ(limits.memory_bytes, kGiB);
  EXPECT_EQ(limits.memory_source, "cgroup v1 memory.limit_in_bytes");
  EXPECT_DOUBLE_EQ(limits.cpus, 2.0);
  EXPECT_EQ(limits.cpu_source, "cgroup v1 cpu.cfs_quota_us");
}

TEST(HostLimitsTest, V1MissingPathUsesHierarchyRootAndCpuSpelling) {
  FakeRoot root;
  root.Write("proc/self/cgroup", "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n");
  root.Write("sys/fs/cgroup/memory/memory.limit_in_bytes", "805306368\n");
  // Only the "cpu" spelling of the hierarchy is mounted.
  root.Write("sys/fs/cgroup/cpu/cpu.cfs_quota_us", "75000\n");
  root.Write("sys/fs/cgroup/cpu/cpu.cfs_period_us", "100000\n");
  root.MemInfo(16 * kGiB);

  HostLimits limits = ReadHostLimits(root.path());
  EXPECT_EQ(limits.memory_bytes, 768 * kMiB);
  EXPECT_EQ(limits.memory_source, "cgroup v1 memory.limit_in_bytes");
  EXPECT_DOUBLE_EQ(limits.cpus, 0.75);
  EXPECT_EQ(limits.cpu_source, "cgroup v1 cpu.cfs_quota_us");

  // An existing ancestor of the missing cgroup is some other cgroup inside the container's
  // hierarchy: its limit does not apply, only the root's.
  root.Write("sys/fs/cgroup/memory/docker/memory.limit_in_bytes", "1048576\n");
  limits = ReadHostLimits(root.path());
  EXPECT_EQ(limits.memory_bytes, 768 * kMiB);
}

TEST(HostLimitsTest, V1UnlimitedMemoryFallsBackToMemTotal) {
  FakeRoot root;
  root.Write("proc/self/cgroup", "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n");
  root.Write("sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes", "9223372036854771712\n");
  root.Write("sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n");
  root.Write("sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "300000\n");
  root.Write("sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000\n");
  root.MemInfo(12 * kGiB);

  HostLimits limits = ReadHostLimits(root.path());
  EXPECT_EQ(limits.memory_bytes, 12 * kGiB);
  EXPECT_EQ(limits.memory_source, "/proc/meminfo MemTotal");
  EXPECT_DOUBLE_EQ(limits.cpus, 3.0);
  EXPECT_EQ(limits.cpu_source, "cgroup v1 cpu.cfs_quota_us");

  // Without MemTotal to cap it, the huge value is still no limit.
  fs::remove(fs::path(root.path()) / "proc/meminfo");
  limits = ReadHostLimits(root.path());
  EXPECT_EQ(limits.memory_bytes, 0);
  EXPECT_EQ(limits.memory_source, "unknown");
}

TEST(HostLimitsTest, V1CpuQuotaMinusOneMeansNoQuota) {
  FakeRoot root;
  root.Write("proc/self/cgroup", "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n");
  root.Write("sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes", "2147483648\n");
  root.Write("sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "-1\n");
  root.Write("sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000\n");
  root.MemInfo(16 * kGiB);

  HostLimits limits = ReadHostLimits(root.path());
  EXPECT_EQ(limits.memory_bytes, 2 * kGiB);
  EXPECT_EQ(limits.memory_source, "cgroup v1 memory.limit_in_bytes");
  EXPECT_DOUBLE_EQ(limits.cpus, OnlineCpus());
  EXPECT_EQ(limits.cpu_source, "hardware_concurrency");
}

TEST(HostLimitsTest, HybridV2LineWithV1Controllers) {
  FakeRoot root;
  // systemd's hybrid layout: a "0::" line, but the controllers live in v1 hierarchies.
  root.Write("proc/self/cgroup", "9:name=systemd:/\n4:memory:/job/1\n2:cpuacct:/\n1:cpu:/\n0::/\n");
  root.Mkdir("sys/fs/cgroup/unified");
  root.Write("sys/fs/cgroup/memory/job/1/memory.limit_in_bytes", "9223372036854771712\n");
  root.Write("sys/fs/cgroup/memory/job/memory.limit_in_bytes", "4294967296\n");
  root.Write("sys/fs/cgroup/cpu/cpu.cfs_quota_us", "150000\n");
  root.Write("sys/fs/cgroup/cpu/cpu.cfs_period_us", "100000\n");
  root.MemInfo(16 * kGiB);

  HostLimits limits = ReadHostLimits(root.path());
  EXPECT_EQ(limits.memory_bytes, 4 * kGiB);
  EXPECT_EQ(limits.memory_source, "cgroup v1 memory.limit_in_bytes");
  EXPECT_DOUBLE_EQ(limits.cpus, 1.5);
  EXPECT_EQ(limits.cpu_source, "cgroup v1 cpu.cfs_quota_us");
}

TEST(HostLimitsTest, MalformedFilesFallThrough) {
  FakeRoot root;
  root.Write("proc/self/cgroup", "0::/a\n");
  root.Write("sys/fs/cgroup/a/memory.max", "lots\n");
  root.Write("sys/fs/cgroup/a/cpu.max", "100000\n");  // no period
  root.Write("proc/meminfo", "MemFree: 10 kB\n");     // no MemTotal

  HostLimits limits = ReadHostLimits(root.path());
  EXPECT_EQ(limits.memory_bytes, 0);
  EXPECT_EQ(limits.memory_source, "unknown");
  EXPECT_DOUBLE_EQ(limits.cpus, OnlineCpus());
  EXPECT_EQ(limits.cpu_source, "hardware_concurrency");
}

TEST(HostLimitsTest, NothingAtAll) {
  FakeRoot root;
  HostLimits limits = ReadHostLimits(root.path());
  EXPECT_EQ(limits.memory_bytes, 0);
  EXPECT_EQ(limits.memory_source, "unknown");
  EXPECT_DOUBLE_EQ(limits.cpus, OnlineCpus());
  EXPECT_EQ(limits.cpu_source, "hardware_concurrency");

  // A root that does not exist at all behaves the same.
  HostLimits missing = ReadHostLimits(root.path() + "/does/not/exist");
  EXPECT_EQ(missing.memory_bytes, 0);
  EXPECT_EQ(missing.memory_source, "unknown");
  EXPECT_DOUBLE_EQ(missing.cpus, OnlineCpus());
}

TEST(HostLimitsTest, CgroupLimitAboveMemTotalReportsMemTotal) {
  FakeRoot root;
  root.Write("proc/self/cgroup", "0::/big\n");
  root.Write("sys/fs/cgroup/big/memory.max", absl::StrCat(64 * kGiB, "\n"));
  root.MemInfo(4 * kGiB);

  HostLimits limits = ReadHostLimits(root.path());
  EXPECT_EQ(limits.memory_bytes, 4 * kGiB);
  EXPECT_EQ(limits.memory_source, "/proc/meminfo MemTotal");
}

TEST(HostLimitsTest, CgroupLimitWithoutMemInfoIsKept) {
  FakeRoot root;
  root.Write("proc/self/cgroup", "0::/\n");
  root.Write("sys/fs/cgroup/memory.max", "1073741824\n");

  HostLimits limits = ReadHostLimits(root.path());
  EXPECT_EQ(limits.memory_bytes, kGiB);
  EXPECT_EQ(limits.memory_source, "cgroup v2 memory.max");
}

TEST(HostLimitsTest, DescribeHostLimits) {
  HostLimits limits;
  limits.memory_bytes = static_cast<int64_t>(3.2 * kGiB);
  limits.memory_source = "cgroup v2 memory.max";
  limits.cpus = 1.5;
  limits.cpu_source = "cgroup v2 cpu.max";
  EXPECT_EQ(DescribeHostLimits(limits),
            "memory 3.2 GiB (cgroup v2 memory.max), cpus 1.5 (cgroup v2 cpu.max)");

  limits.memory_bytes = 512 * kMiB;
  limits.memory_source = "cgroup v1 memory.limit_in_bytes";
  limits.cpus = 4;
  limits.cpu_source = "hardware_concurrency";
  EXPECT_EQ(DescribeHostLimits(limits),
            "memory 512 MiB (cgroup v1 memory.limit_in_bytes), cpus 4 (hardware_concurrency)");

  limits.memory_bytes = 1023;
  limits.cpus = 1.0 / 3.0;
  EXPECT_EQ(DescribeHostLimits(limits),
            "memory 1023 B (cgroup v1 memory.limit_in_bytes), cpus 0.33 (hardware_concurrency)");

  limits.memory_bytes = kGiB - 1;  // would round to "1024.0 MiB"
  EXPECT_EQ(DescribeHostLimits(limits).substr(0, 14), "memory 1 GiB (");

  limits.memory_bytes = 0;
  limits.memory_source = "unknown";
  limits.cpus = 2;
  EXPECT_EQ(DescribeHostLimits(limits), "memory unknown, cpus 2 (hardware_concurrency)");
}

TEST(HostLimitsTest, RealMachine) {
  HostLimits limits = ReadHostLimits("/");
  EXPECT_GT(limits.memory_bytes, 0) << DescribeHostLimits(limits);
  // A cgroup quota may be fractional (e.g. 0.5); the host's CPU count is at least 1.
  EXPECT_GT(limits.cpus, 0.0) << DescribeHostLimits(limits);
  if (limits.cpu_source == "hardware_concurrency") {
    EXPECT_GE(limits.cpus, 1.0) << DescribeHostLimits(limits);
  }
}

}  // namespace
}  // namespace lossd::server
