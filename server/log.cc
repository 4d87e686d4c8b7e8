#include "log.h"

#include <cstdio>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace lossd::server {

void Log(LogLevel level, std::string_view message) {
  const char* name = level == LogLevel::kInfo ? "INFO" : level == LogLevel::kWarning ? "WARN" : "ERROR";
  std::string line = absl::StrCat(
      absl::FormatTime("%Y-%m-%dT%H:%M:%E6SZ", absl::Now(), absl::UTCTimeZone()), " ", name, " ",
      std::string(message), "\n");
  std::fwrite(line.data(), 1, line.size(), stderr);
  std::fflush(stderr);
}

namespace {
absl::Mutex limit_mu;
int64_t limit_second ABSL_GUARDED_BY(limit_mu) = 0;
int limit_count ABSL_GUARDED_BY(limit_mu) = 0;
int64_t limit_suppressed ABSL_GUARDED_BY(limit_mu) = 0;
}  // namespace

void LogRateLimited(LogLevel level, std::string_view message) {
  int64_t suppressed = 0;
  {
    absl::MutexLock lock(&limit_mu);
    const int64_t now = absl::ToUnixSeconds(absl::Now());
    if (now != limit_second) {
      limit_second = now;
      limit_count = 0;
    }
    if (++limit_count > kLogBurst) {
      ++limit_suppressed;
      return;
    }
    suppressed = limit_suppressed;
    limit_suppressed = 0;
  }
  if (suppressed == 0) return Log(level, message);
  Log(level, absl::StrCat(std::string(message), " (", suppressed, " earlier lines suppressed)"));
}

}  // namespace lossd::server
