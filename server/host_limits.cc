// Reads the process's memory and CPU limits from cgroup v2/v1 files, /proc/meminfo and
// std::thread::hardware_concurrency(). See host_limits.h for the contract.
#include "server/host_limits.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"

namespace lossd::server {
namespace {

namespace fs = std::filesystem;

// v1 reports "no limit" as LONG_MAX rounded down to a page (9223372036854771712); anything this
// large is no limit in practice.
constexpr int64_t kV1UnlimitedMemory = int64_t{1} << 60;

// What /proc/self/cgroup says about this process.
struct CgroupInfo {
  std::optional<std::string> v2_path;  // from the "0::/path" line
  // v1: one entry per hierarchy line that names controllers, e.g. {"cpu,cpuacct", "/docker/a"}.
  std::vector<std::pair<std::string, std::string>> v1;
};

// <root>/<relative>, with leading slashes of `relative` ignored (so "/proc" stays under root).
fs::path UnderRoot(const std::string& root, absl::string_view relative) {
  while (!relative.empty() && relative.front() == '/') relative.remove_prefix(1);
  return fs::path(root.empty() ? "/" : root) / std::string(relative);
}

// The whole file, or nullopt if it cannot be opened or read.
std::optional<std::string> ReadFile(const fs::path& path) {
  std::ifstream in(path, std::ios::in | std::ios::binary);
  if (!in) return std::nullopt;
  std::ostringstream out;
  out << in.rdbuf();
  if (in.bad()) return std::nullopt;
  return out.str();
}

bool IsDirectory(const fs::path& path) {
  std::error_code ec;
  return fs::is_directory(path, ec);
}

CgroupInfo ParseProcSelfCgroup(const std::string& text) {
  CgroupInfo info;
  for (absl::string_view line : absl::StrSplit(text, '\n', absl::SkipWhitespace())) {
    // "hierarchy-id:controller-list:path"; the path may itself contain ':'.
    std::vector<absl::string_view> parts = absl::StrSplit(line, absl::MaxSplits(':', 2));
    if (parts.size() != 3) continue;
    std::string path(absl::StripAsciiWhitespace(parts[2]));
    if (parts[0] == "0" && parts[1].empty()) {
      info.v2_path = path;
    } else if (!parts[1].empty() && !absl::StartsWith(parts[1], "name=")) {
      info.v1.emplace_back(std::string(parts[1]), path);
    }
  }
  return info;
}

// The directories whose limits apply to cgroup `path` in the hierarchy mounted at `hierarchy`:
// the cgroup's own directory and each ancestor up to and including `hierarchy`, innermost first.
// If the cgroup's directory does not exist there (a container sees its own cgroup at the mount
// root) or the path climbs out with "..", only `hierarchy` itself. Empty if `hierarchy` is not a
// directory.
std::vector<fs::path> LimitDirs(const fs::path& hierarchy, const std::string& path) {
  if (!IsDirectory(hierarchy)) return {};
  std::vector<std::string> components;
  bool escapes = false;
  for (absl::string_view c : absl::StrSplit(path, '/', absl::SkipEmpty())) {
    if (c == ".") continue;
    if (c == "..") {
      escapes = true;
      break;
    }
    components.emplace_back(c);
  }
  std::vector<fs::path> chain = {hierarchy};
  if (!escapes) {
    fs::path dir = hierarchy;
    for (const std::string& c : components) {
      dir /= c;
      chain.push_back(dir);
    }
    if (!IsDirectory(chain.back())) chain.resize(1);
  } else {
    chain.resize(1);
  }
  std::reverse(chain.begin(), chain.end());
  return chain;
}

// A whole-file integer, e.g. "9223372036854771712\n"; nullopt if absent or not a number.
std::optional<int64_t> ReadInt(const fs::path& file) {
  std::optional<std::string> text = ReadFile(file);
  int64_t value = 0;
  if (!text || !absl::SimpleAtoi(absl::StripAsciiWhitespace(*text), &value)) return std::nullopt;
  return value;
}

// The smallest of `current` and `candidate`, where nullopt means no limit.
template <typename T>
std::optional<T> Smaller(std::optional<T> current, T candidate) {
  if (!current || candidate < *current) return candidate;
  return current;
}

// v2 memory.max: a number of bytes or "max".
std::optional<int64_t> V2MemoryLimit(const fs::path& hierarchy, const std::string& path) {
  std::optional<int64_t> limit;
  for (const fs::path& dir : LimitDirs(hierarchy, path)) {
    std::optional<int64_t> value = ReadInt(dir / "memory.max");  // "max" does not parse
    if (value && *value > 0) limit = Smaller(limit, *value);
  }
  return limit;
}

// v1 memory.limit_in_bytes: a number; >= 2^60 means no limit.
std::optional<int64_t> V1MemoryLimit(const fs::path& hierarchy, const std::string& path) {
  std::optional<int64_t> limit;
  for (const fs::path& dir : LimitDirs(hierarchy, path)) {
    std::optional<int64_t> value = ReadInt(dir / "memory.limit_in_bytes");
    if (value && *value > 0 && *value < kV1UnlimitedMemory) limit = Smaller(limit, *value);
  }
  return limit;
}

// v2 cpu.max: "QUOTA PERIOD" or "max PERIOD" (microseconds).
std::optional<double> V2CpuLimit(const fs::path& hierarchy, const std::string& path) {
  std::optional<double> limit;
  for (const fs::path& dir : LimitDirs(hierarchy, path)) {
    std::optional<std::string> text = ReadFile(dir / "cpu.max");
    if (!text) continue;
    std::vector<absl::string_view> fields =
        absl::StrSplit(absl::StripAsciiWhitespace(*text), ' ', absl::SkipEmpty());
    int64_t quota = 0;
    int64_t period = 0;
    if (fields.size() != 2 || !absl::SimpleAtoi(fields[0], &quota) ||
        !absl::SimpleAtoi(fields[1], &period) || quota <= 0 || period <= 0) {
      continue;
    }
    limit = Smaller(limit, static_cast<double>(quota) / static_cast<double>(period));
  }
  return limit;
}

// v1 cpu.cfs_quota_us (-1: none) over cpu.cfs_period_us.
std::optional<double> V1CpuLimit(const fs::path& hierarchy, const std::string& path) {
  std::optional<double> limit;
  for (const fs::path& dir : LimitDirs(hierarchy, path)) {
    std::optional<int64_t> quota = ReadInt(dir / "cpu.cfs_quota_us");
    std::optional<int64_t> period = ReadInt(dir / "cpu.cfs_period_us");
    if (!quota || !period || *quota <= 0 || *period <= 0) continue;
    limit = Smaller(limit, static_cast<double>(*quota) / static_cast<double>(*period));
  }
  return limit;
}

// True if the comma-separated v1 controller list names `controller`.
bool HasController(absl::string_view list, absl::string_view controller) {
  for (absl::string_view c : absl::StrSplit(list, ',')) {
    if (c == controller) return true;
  }
  return false;
}

// MemTotal from /proc/meminfo, in bytes (the file says kB); nullopt if unknown.
std::optional<int64_t> MemTotalBytes(const std::string& root) {
  std::optional<std::string> text = ReadFile(UnderRoot(root, "proc/meminfo"));
  if (!text) return std::nullopt;
  for (absl::string_view line : absl::StrSplit(*text, '\n')) {
    if (!absl::ConsumePrefix(&line, "MemTotal:")) continue;
    line = absl::StripAsciiWhitespace(line);
    const bool kb = absl::ConsumeSuffix(&line, "kB");
    int64_t value = 0;
    if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(line), &value) || value <= 0) {
      return std::nullopt;
    }
    if (!kb) return value;  // never seen in practice; a bare number would be bytes
    if (value > std::numeric_limits<int64_t>::max() / 1024) return std::nullopt;
    return value * 1024;
  }
  return std::nullopt;
}

// `value` with at most `decimals` decimals and no trailing zeros: 1.5, 4, 0.33.
std::string TrimmedNumber(double value, int decimals) {
  char buffer[64];
  std::snprintf(buffer, sizeof(buffer), "%.*f", decimals, value);
  std::string s = buffer;
  if (s.find('.') != std::string::npos) {
    while (s.back() == '0') s.pop_back();
    if (s.back() == '.') s.pop_back();
  }
  return s;
}

// 3435973837 -> "3.2 GiB"; 512 -> "512 B".
std::string HumanBytes(int64_t bytes) {
  static constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  double value = static_cast<double>(bytes);
  size_t unit = 0;
  // 1023.95 and above would print as "1024.0": move to the next unit instead.
  while (value >= 1023.95 && unit + 1 < std::size(kUnits)) {
    value /= 1024;
    ++unit;
  }
  return absl::StrCat(TrimmedNumber(value, unit == 0 ? 0 : 1), " ", kUnits[unit]);
}

}  // namespace

HostLimits ReadHostLimits(const std::string& root) {
  CgroupInfo cgroup;
  if (std::optional<std::string> text = ReadFile(UnderRoot(root, "proc/self/cgroup"))) {
    cgroup = ParseProcSelfCgroup(*text);
  }
  const fs::path cgroup_mount = UnderRoot(root, "sys/fs/cgroup");

  // Memory: the first cgroup version that yields a limit, then MemTotal caps it.
  std::optional<int64_t> cgroup_memory;
  std::string cgroup_memory_source;
  if (cgroup.v2_path) {
    cgroup_memory = V2MemoryLimit(cgroup_mount, *cgroup.v2_path);
    cgroup_memory_source = "cgroup v2 memory.max";
  }
  if (!cgroup_memory) {
    for (const auto& [controllers, path] : cgroup.v1) {
      if (!HasController(controllers, "memory")) continue;
      cgroup_memory = V1MemoryLimit(cgroup_mount / controllers, path);
      if (!cgroup_memory && controllers != "memory") {
        cgroup_memory = V1MemoryLimit(cgroup_mount / "memory", path);
      }
      cgroup_memory_source = "cgroup v1 memory.limit_in_bytes";
      break;
    }
  }

  HostLimits limits;
  const std::optional<int64_t> mem_total = MemTotalBytes(root);
  if (cgroup_memory && (!mem_total || *cgroup_memory <= *mem_total)) {
    limits.memory_bytes = *cgroup_memory;
    limits.memory_source = cgroup_memory_source;
  } else if (mem_total) {
    limits.memory_bytes = *mem_total;
    limits.memory_source = "/proc/meminfo MemTotal";
  } else {
    limits.memory_bytes = 0;
    limits.memory_source = "unknown";
  }

  // CPU: the first cgroup version that yields a quota, else the online CPUs.
  std::optional<double> cgroup_cpus;
  if (cgroup.v2_path) {
    cgroup_cpus = V2CpuLimit(cgroup_mount, *cgroup.v2_path);
    if (cgroup_cpus) limits.cpu_source = "cgroup v2 cpu.max";
  }
  if (!cgroup_cpus) {
    for (const auto& [controllers, path] : cgroup.v1) {
      if (!HasController(controllers, "cpu")) continue;
      // The hierarchy is mounted under its controller list ("cpu,cpuacct"), usually with
      // "cpu" and "cpuacct" symlinks beside it; try the spellings seen in practice.
      std::vector<std::string> names = {controllers, "cpu,cpuacct", "cpu", "cpuacct,cpu"};
      for (size_t i = 0; i < names.size() && !cgroup_cpus; ++i) {
        if (std::find(names.begin(), names.begin() + i, names[i]) != names.begin() + i) continue;
        cgroup_cpus = V1CpuLimit(cgroup_mount / names[i], path);
      }
      if (cgroup_cpus) limits.cpu_source = "cgroup v1 cpu.cfs_quota_us";
      break;
    }
  }
  if (cgroup_cpus) {
    limits.cpus = *cgroup_cpus;
  } else if (unsigned online = std::thread::hardware_concurrency(); online > 0) {
    limits.cpus = online;
    limits.cpu_source = "hardware_concurrency";
  } else {
    limits.cpus = 1;
    limits.cpu_source = "unknown";
  }
  return limits;
}

std::string DescribeHostLimits(const HostLimits& limits) {
  std::string memory = limits.memory_bytes > 0
                           ? absl::StrCat("memory ", HumanBytes(limits.memory_bytes), " (",
                                          limits.memory_source, ")")
                           : std::string("memory unknown");
  return absl::StrCat(memory, ", cpus ", TrimmedNumber(limits.cpus, 2), " (", limits.cpu_source,
                      ")");
}

}  // namespace lossd::server
