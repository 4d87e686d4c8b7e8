#include "server/log.h"

#include <atomic>
#include <cstdio>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace lossd::server {

namespace {

std::atomic<LogFormat> log_format{LogFormat::kText};

// `text` as a JSON string literal (RFC 8259 escapes; every byte outside printable ASCII is
// written as \u00XX, so a line stays valid JSON whatever bytes a client put in a message).
std::string JsonString(std::string_view text) {
  std::string out = "\"";
  for (const char ch : text) {
    const unsigned char c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (c < 0x20 || c >= 0x7f) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          out += buf;
        } else {
          out += ch;
        }
    }
  }
  out += '"';
  return out;
}

}  // namespace

void SetLogFormat(LogFormat format) { log_format.store(format); }

void Log(LogLevel level, std::string_view message) {
  const char* name = level == LogLevel::kInfo ? "INFO" : level == LogLevel::kWarning ? "WARN" : "ERROR";
  const std::string time =
      absl::FormatTime("%Y-%m-%dT%H:%M:%E6SZ", absl::Now(), absl::UTCTimeZone());
  std::string line =
      log_format.load() == LogFormat::kJson
          ? absl::StrCat("{\"time\":\"", time, "\",\"level\":\"", name,
                         "\",\"message\":", JsonString(message), "}\n")
          : absl::StrCat(time, " ", name, " ", std::string(message), "\n");
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
