// Minimal structured logging to stderr (Debian's Abseil 20220623 has no absl/log).
// Thread-safe: each line is written with a single fwrite.
#ifndef LOSSD_SERVER_LOG_H_
#define LOSSD_SERVER_LOG_H_

#include <string_view>

namespace lossd::server {

enum class LogLevel { kInfo, kWarning, kError };

// Writes "<UTC time> <LEVEL> <message>\n" to stderr.
void Log(LogLevel level, std::string_view message);

}  // namespace lossd::server

#endif  // LOSSD_SERVER_LOG_H_
