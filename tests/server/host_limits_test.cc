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
#include <utility>
#include <vector>

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

// The limits a layout should give. An empty source is not checked, nor are cpus of kAnyCpus;
// cpus of kOnlineCpus stand for the machine's own count (std::thread::hardware_concurrency).
constexpr double kAnyCpus = -2;
constexpr double kOnlineCpus = -1;
struct Want {
  int64_t memory_bytes;
  std::string memory_source;
  double cpus = kAnyCpus;
  std::string cpu_source;
};

void ExpectLimits(const HostLimits& limits, const Want& want) {
  EXPECT_EQ(limits.memory_bytes, want.memory_bytes);
  if (!want.memory_source.empty()) EXPECT_EQ(limits.memory_source, want.memory_source);
  if (want.cpus == kOnlineCpus) {
    EXPECT_DOUBLE_EQ(limits.cpus, static_cast<double>(std::thread::hardware_concurrency()));
  } else if (want.cpus != kAnyCpus) {
    EXPECT_DOUBLE_EQ(limits.cpus, want.cpus);
  }
  if (!want.cpu_source.empty()) EXPECT_EQ(limits.cpu_source, want.cpu_source);
}

// A fake root: files (relative path, content; a path ending in '/' is made as a directory, a
// cgroup without limit files), /proc/meminfo with MemTotal = mem_total unless it is 0, and the
// limits ReadHostLimits should find there.
struct Layout {
  std::string name;
  std::vector<std::pair<std::string, std::string>> files;
  int64_t mem_total;
  Want want;
};

void Lay(FakeRoot& root, const Layout& layout) {
  for (const auto& [relative, content] : layout.files) {
    if (relative.back() == '/') {
      root.Mkdir(relative);
    } else {
      root.Write(relative, content);
    }
  }
  if (layout.mem_total != 0) root.MemInfo(layout.mem_total);
}

const Layout kLayouts[] = {
    {"V2WithLimits",
     {{"proc/self/cgroup", "0::/kubepods/pod1/c1\n"},
      {"sys/fs/cgroup/kubepods/pod1/c1/memory.max", "536870912\n"},
      {"sys/fs/cgroup/kubepods/pod1/c1/cpu.max", "150000 100000\n"}},
     16 * kGiB,
     {512 * kMiB, "cgroup v2 memory.max", 1.5, "cgroup v2 cpu.max"}},
    {"V2MaxFallsBackToMemTotal",
     {{"proc/self/cgroup", "0::/user.slice\n"},
      {"sys/fs/cgroup/user.slice/memory.max", "max\n"},
      {"sys/fs/cgroup/user.slice/cpu.max", "max 100000\n"}},
     8 * kGiB,
     {8 * kGiB, "/proc/meminfo MemTotal", kOnlineCpus, "hardware_concurrency"}},
    // The process's own cgroup has no limit files; a sibling's tighter limit does not apply.
    {"V2NestedPathUsesSmallestAncestorLimit",
     {{"proc/self/cgroup", "0::/a/b/c\n"},
      {"sys/fs/cgroup/a/b/c/", ""},
      {"sys/fs/cgroup/a/b/memory.max", "2147483648\n"},
      {"sys/fs/cgroup/a/memory.max", "1073741824\n"},
      {"sys/fs/cgroup/a/b/cpu.max", "400000 100000\n"},
      {"sys/fs/cgroup/a/cpu.max", "250000 100000\n"},
      {"sys/fs/cgroup/a/other/memory.max", "1048576\n"}},
     64 * kGiB,
     {kGiB, "cgroup v2 memory.max", 2.5, "cgroup v2 cpu.max"}},
    {"V2InnerLimitSmallerThanAncestorWins",
     {{"proc/self/cgroup", "0::/a/b\n"},
      {"sys/fs/cgroup/a/b/memory.max", "268435456\n"},
      {"sys/fs/cgroup/a/memory.max", "1073741824\n"},
      {"sys/fs/cgroup/a/b/cpu.max", "50000 100000\n"},
      {"sys/fs/cgroup/a/cpu.max", "200000 100000\n"}},
     64 * kGiB,
     {256 * kMiB, "", 0.5}},
    // Inside a container the host's path is not mounted; the container's cgroup is the root.
    {"V2MissingPathUsesHierarchyRoot",
     {{"proc/self/cgroup", "0::/system.slice/docker-abc.scope\n"},
      {"sys/fs/cgroup/memory.max", "268435456\n"},
      {"sys/fs/cgroup/cpu.max", "50000 100000\n"}},
     32 * kGiB,
     {256 * kMiB, "cgroup v2 memory.max", 0.5, "cgroup v2 cpu.max"}},
    // A cgroup namespace shows cgroups outside it with "..": never read above the mount.
    {"V2PathOutsideNamespaceUsesHierarchyRoot",
     {{"proc/self/cgroup", "0::/../../../secret\n"},
      {"secret/memory.max", "1024\n"},
      {"sys/fs/cgroup/memory.max", "536870912\n"}},
     32 * kGiB,
     {512 * kMiB, "cgroup v2 memory.max"}},
    {"V1WithLimits",
     {{"proc/self/cgroup",
       "11:name=systemd:/docker/abc\n4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n"},
      {"sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes", "1073741824\n"},
      {"sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "200000\n"},
      {"sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000\n"}},
     16 * kGiB,
     {kGiB, "cgroup v1 memory.limit_in_bytes", 2.0, "cgroup v1 cpu.cfs_quota_us"}},
    // Only the "cpu" spelling of the hierarchy is mounted.
    {"V1MissingPathUsesHierarchyRootAndCpuSpelling",
     {{"proc/self/cgroup", "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n"},
      {"sys/fs/cgroup/memory/memory.limit_in_bytes", "805306368\n"},
      {"sys/fs/cgroup/cpu/cpu.cfs_quota_us", "75000\n"},
      {"sys/fs/cgroup/cpu/cpu.cfs_period_us", "100000\n"}},
     16 * kGiB,
     {768 * kMiB, "cgroup v1 memory.limit_in_bytes", 0.75, "cgroup v1 cpu.cfs_quota_us"}},
    {"V1UnlimitedMemoryFallsBackToMemTotal",
     {{"proc/self/cgroup", "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n"},
      {"sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes", "9223372036854771712\n"},
      {"sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n"},
      {"sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "300000\n"},
      {"sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000\n"}},
     12 * kGiB,
     {12 * kGiB, "/proc/meminfo MemTotal", 3.0, "cgroup v1 cpu.cfs_quota_us"}},
    {"V1CpuQuotaMinusOneMeansNoQuota",
     {{"proc/self/cgroup", "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n"},
      {"sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes", "2147483648\n"},
      {"sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "-1\n"},
      {"sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000\n"}},
     16 * kGiB,
     {2 * kGiB, "cgroup v1 memory.limit_in_bytes", kOnlineCpus, "hardware_concurrency"}},
    // systemd's hybrid layout: a "0::" line, but the controllers live in v1 hierarchies.
    {"HybridV2LineWithV1Controllers",
     {{"proc/self/cgroup", "9:name=systemd:/\n4:memory:/job/1\n2:cpuacct:/\n1:cpu:/\n0::/\n"},
      {"sys/fs/cgroup/unified/", ""},
      {"sys/fs/cgroup/memory/job/1/memory.limit_in_bytes", "9223372036854771712\n"},
      {"sys/fs/cgroup/memory/job/memory.limit_in_bytes", "4294967296\n"},
      {"sys/fs/cgroup/cpu/cpu.cfs_quota_us", "150000\n"},
      {"sys/fs/cgroup/cpu/cpu.cfs_period_us", "100000\n"}},
     16 * kGiB,
     {4 * kGiB, "cgroup v1 memory.limit_in_bytes", 1.5, "cgroup v1 cpu.cfs_quota_us"}},
    // cpu.max without a period, /proc/meminfo without MemTotal.
    {"MalformedFilesFallThrough",
     {{"proc/self/cgroup", "0::/a\n"},
      {"sys/fs/cgroup/a/memory.max", "lots\n"},
      {"sys/fs/cgroup/a/cpu.max", "100000\n"},
      {"proc/meminfo", "MemFree: 10 kB\n"}},
     0,
     {0, "unknown", kOnlineCpus, "hardware_concurrency"}},
    {"CgroupLimitAboveMemTotalReportsMemTotal",
     {{"proc/self/cgroup", "0::/big\n"},
      {"sys/fs/cgroup/big/memory.max", absl::StrCat(64 * kGiB, "\n")}},
     4 * kGiB,
     {4 * kGiB, "/proc/meminfo MemTotal"}},
    {"CgroupLimitWithoutMemInfoIsKept",
     {{"proc/self/cgroup", "0::/\n"}, {"sys/fs/cgroup/memory.max", "1073741824\n"}},
     0,
     {kGiB, "cgroup v2 memory.max"}},
};

class HostLimitsLayoutTest : public ::testing::TestWithParam<Layout> {};

TEST_P(HostLimitsLayoutTest, ReadsTheLimits) {
  FakeRoot root;
  Lay(root, GetParam());
  ExpectLimits(ReadHostLimits(root.path()), GetParam().want);
}

INSTANTIATE_TEST_SUITE_P(HostLimitsTest, HostLimitsLayoutTest, ::testing::ValuesIn(kLayouts),
                         [](const ::testing::TestParamInfo<Layout>& info) {
                           return info.param.name;
                         });

// The layouts above, again, changed after the first read.
const Layout& LayoutNamed(const std::string& name) {
  for (const Layout& layout : kLayouts) {
    if (layout.name == name) return layout;
  }
  ADD_FAILURE() << "no layout " << name;
  return kLayouts[0];
}

TEST(HostLimitsTest, V1MissingPathAncestorDoesNotApply) {
  FakeRoot root;
  Lay(root, LayoutNamed("V1MissingPathUsesHierarchyRootAndCpuSpelling"));
  // An existing ancestor of the missing cgroup is some other cgroup inside the container's
  // hierarchy: its limit does not apply, only the root's.
  root.Write("sys/fs/cgroup/memory/docker/memory.limit_in_bytes", "1048576\n");
  EXPECT_EQ(ReadHostLimits(root.path()).memory_bytes, 768 * kMiB);
}

TEST(HostLimitsTest, V1UnlimitedMemoryWithoutMemTotalIsUnknown) {
  FakeRoot root;
  Lay(root, LayoutNamed("V1UnlimitedMemoryFallsBackToMemTotal"));
  // Without MemTotal to cap it, the huge value is still no limit.
  fs::remove(fs::path(root.path()) / "proc/meminfo");
  ExpectLimits(ReadHostLimits(root.path()), {0, "unknown"});
}

TEST(HostLimitsTest, NothingAtAll) {
  FakeRoot root;
  ExpectLimits(ReadHostLimits(root.path()), {0, "unknown", kOnlineCpus, "hardware_concurrency"});
  // A root that does not exist at all behaves the same.
  ExpectLimits(ReadHostLimits(root.path() + "/does/not/exist"), {0, "unknown", kOnlineCpus});
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
