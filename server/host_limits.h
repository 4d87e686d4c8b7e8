// The memory and CPU limits of this process, read from its cgroup (v2 or v1) or, failing that,
// from the host (/proc/meminfo and the number of online CPUs). Used to size defaults and for the
// startup log.
#ifndef LOSSD_SERVER_HOST_LIMITS_H_
#define LOSSD_SERVER_HOST_LIMITS_H_

#include <cstdint>
#include <string>

namespace lossd::server {

// The memory and CPU a process may use, from its cgroup (v2 or v1) or the host.
struct HostLimits {
  // The cgroup memory limit, else MemTotal from /proc/meminfo; 0 if unknown.
  int64_t memory_bytes = 0;
  // E.g. "cgroup v2 memory.max", "cgroup v1 memory.limit_in_bytes", "/proc/meminfo MemTotal",
  // "unknown".
  std::string memory_source;
  // Cgroup CPU quota / period (e.g. 1.5), else the number of online CPUs
  // (std::thread::hardware_concurrency()).
  double cpus = 0;
  // E.g. "cgroup v2 cpu.max", "cgroup v1 cpu.cfs_quota_us", "hardware_concurrency".
  std::string cpu_source;
};

// Reads the limits under `root` (the filesystem root; tests pass a temporary directory laid out
// like /). Never fails: missing or unreadable files fall through to the next source.
//
// Contract:
// - The cgroup is taken from <root>/proc/self/cgroup; without that file only host sources are
//   used. The v2 line ("0::/path") is tried first, then the v1 lines ("N:memory:/path",
//   "N:cpu,cpuacct:/path"), so a hybrid host whose v2 hierarchy holds no limits uses v1.
// - The limit files are read in the process's cgroup directory and in every ancestor up to and
//   including the hierarchy root; the smallest limit found applies. If the cgroup directory
//   does not exist under the hierarchy (common inside containers) or its path leaves the
//   hierarchy (".."), only the hierarchy root is read.
// - Memory: "max", a v1 value >= 2^60, or a value <= 0 means no limit at that level. A cgroup
//   limit above MemTotal (or no cgroup limit) gives MemTotal with source
//   "/proc/meminfo MemTotal"; if neither is known, memory_bytes is 0 with source "unknown".
// - CPU: quota / period with quota > 0 and period > 0; "max" (v2) or -1 (v1) means no quota.
//   Without a quota, cpus is std::thread::hardware_concurrency() with source
//   "hardware_concurrency" (1 with source "unknown" if that returns 0). A quota above the
//   number of CPUs is reported as is.
HostLimits ReadHostLimits(const std::string& root = "/");

// "memory 3.2 GiB (cgroup v2 memory.max), cpus 1.5 (cgroup v2 cpu.max)" for the startup log.
// Memory is shown in B/KiB/MiB/GiB/TiB with at most one decimal ("memory unknown" when 0), cpus
// with at most two decimals; trailing zeros are dropped ("4", not "4.00").
std::string DescribeHostLimits(const HostLimits& limits);

}  // namespace lossd::server

#endif  // LOSSD_SERVER_HOST_LIMITS_H_
