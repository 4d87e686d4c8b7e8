// Minimal structured logging to stderr (Debian's Abseil 20220623 has no absl/log).
// Thread-safe: each line is written with a single fwrite.
#ifndef LOSSD_SERVER_LOG_H_
#define LOSSD_SERVER_LOG_H_

#include <string_view>

namespace lossd::server {

enum class LogLevel { kInfo, kWarning, kError };

// kText: "<UTC time> <LEVEL> <message>"; kJson: one JSON object per line,
// {"time":"...","level":"INFO","message":"..."}, for log collectors.
enum class LogFormat { kText, kJson };
// Chooses the format of every line written afterwards (main sets it once, before serving).
void SetLogFormat(LogFormat format);

// Writes one line to stderr in the chosen format.
void Log(LogLevel level, std::string_view message);

// Log() for lines a client can cause (failed calls, malformed messages): at most kLogBurst
// lines per second for the whole process; the rest are counted and the count is appended to
// the next line written, so no client can flood the log.
inline constexpr int kLogBurst = 50;
void LogRateLimited(LogLevel level, std::string_view message);

}  // namespace lossd::server

#endif  // LOSSD_SERVER_LOG_H_
