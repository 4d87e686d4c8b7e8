#include "client/loadtest/h2_framing.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"

namespace lossd::loadtest::h2 {

void WritePrefix(uint32_t length, uint8_t out[kPrefixBytes]) {
  out[0] = 0;  // not compressed
  out[1] = static_cast<uint8_t>(length >> 24);
  out[2] = static_cast<uint8_t>(length >> 16);
  out[3] = static_cast<uint8_t>(length >> 8);
  out[4] = static_cast<uint8_t>(length);
}

std::string FrameMessage(absl::string_view message) {
  std::string out(kPrefixBytes + message.size(), '\0');
  WritePrefix(static_cast<uint32_t>(message.size()), reinterpret_cast<uint8_t*>(out.data()));
  std::memcpy(out.data() + kPrefixBytes, message.data(), message.size());
  return out;
}

void MessageReader::Reset(std::string* out) {
  message_ = out;
  message_->clear();
  prefix_used_ = 0;
  have_length_ = false;
  length_ = 0;
  status_ = absl::OkStatus();
}

absl::Status MessageReader::Feed(absl::string_view chunk) {
  if (!status_.ok()) return status_;
  while (!chunk.empty()) {
    if (!have_length_) {
      if (prefix_used_ == kPrefixBytes) {
        status_ = absl::InternalError("a unary reply carried more than one message");
        return status_;
      }
      const size_t n = std::min(kPrefixBytes - prefix_used_, chunk.size());
      std::memcpy(prefix_ + prefix_used_, chunk.data(), n);
      prefix_used_ += n;
      chunk.remove_prefix(n);
      if (prefix_used_ < kPrefixBytes) return status_;
      if (prefix_[0] != 0) {
        status_ = absl::InternalError(absl::StrCat(
            "the reply's message has compressed flag ", prefix_[0],
            ", but no compression was asked for"));
        return status_;
      }
      length_ = (uint32_t{prefix_[1]} << 24) | (uint32_t{prefix_[2]} << 16) |
                (uint32_t{prefix_[3]} << 8) | uint32_t{prefix_[4]};
      have_length_ = true;
      message_->reserve(length_);
      continue;
    }
    const size_t want = length_ - message_->size();
    if (want == 0) {
      status_ = absl::InternalError("a unary reply carried more than one message");
      return status_;
    }
    const size_t n = std::min(want, chunk.size());
    message_->append(chunk.data(), n);
    chunk.remove_prefix(n);
  }
  return status_;
}

int ParseGrpcStatus(absl::string_view value) {
  int code = 0;
  if (value.empty() || value.size() > 2 || !absl::ascii_isdigit(value[0]) ||
      (value.size() == 2 && !absl::ascii_isdigit(value[1])) || !absl::SimpleAtoi(value, &code) ||
      code > 16) {
    return 2;  // UNKNOWN
  }
  return code;
}

std::string PercentDecode(absl::string_view value) {
  std::string out;
  out.reserve(value.size());
  auto hex = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  for (size_t i = 0; i < value.size(); ++i) {
    if (value[i] == '%' && i + 2 < value.size() && hex(value[i + 1]) >= 0 &&
        hex(value[i + 2]) >= 0) {
      out.push_back(static_cast<char>(hex(value[i + 1]) * 16 + hex(value[i + 2])));
      i += 2;
    } else {
      out.push_back(value[i]);
    }
  }
  return out;
}

int HttpStatusToCode(int http_status) {
  switch (http_status) {
    case 200: return 13;  // 200 whose trailers lack grpc-status: INTERNAL
    case 400: return 13;  // INTERNAL
    case 401: return 16;  // UNAUTHENTICATED
    case 403: return 7;   // PERMISSION_DENIED
    case 404: return 12;  // UNIMPLEMENTED
    case 429:
    case 502:
    case 503:
    case 504: return 14;  // UNAVAILABLE
    default: return 2;    // UNKNOWN
  }
}

int ResetToCode(uint32_t error_code) {
  switch (error_code) {
    case 0x7: return 14;  // REFUSED_STREAM: UNAVAILABLE
    case 0x8: return 1;   // CANCEL: CANCELLED
    case 0xb: return 8;   // ENHANCE_YOUR_CALM: RESOURCE_EXHAUSTED
    case 0xc: return 7;   // INADEQUATE_SECURITY: PERMISSION_DENIED
    default: return 13;   // INTERNAL
  }
}

std::string FormatGrpcTimeout(absl::Duration timeout) {
  // Each unit in nanoseconds; the value is ceil(timeout / unit), the first that fits 8 digits.
  constexpr struct {
    int64_t ns;
    char unit;
  } kUnits[] = {{1, 'n'},
                {1000, 'u'},
                {1000000, 'm'},
                {1000000000, 'S'},
                {int64_t{60} * 1000000000, 'M'},
                {int64_t{3600} * 1000000000, 'H'}};
  const int64_t ns = std::max<int64_t>(1, absl::ToInt64Nanoseconds(timeout));
  for (const auto& u : kUnits) {
    const int64_t v = ns / u.ns + (ns % u.ns != 0 ? 1 : 0);
    if (v <= 99999999) return absl::StrCat(v, std::string(1, u.unit));
  }
  return "99999999H";
}

std::string CodeName(int code) {
  static const char* const kNames[] = {
      "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
      "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
      "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
      "UNAUTHENTICATED"};
  if (code >= 0 && code <= 16) return kNames[code];
  return absl::StrCat(code);
}

absl::StatusOr<Target> ParseTarget(absl::string_view target) {
  const std::string original(target);
  auto bad = [&](absl::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--transport=h2: target \"", original, "\": ", why,
        " (expected host:port, [IPv6]:port or unix:PATH)"));
  };
  Target t;
  if (absl::ConsumePrefix(&target, "unix:")) {
    // unix:///abs/path and unix:relative/or/abs both name a path.
    if (absl::StartsWith(target, "//")) {
      target.remove_prefix(2);
      if (!absl::StartsWith(target, "/")) return bad("unix:// needs an absolute path");
    }
    if (target.empty()) return bad("no socket path");
    t.unix_socket = true;
    t.path = std::string(target);
    t.authority = "localhost";
    return t;
  }
  if (absl::StrContains(target, ",")) {
    return bad("several addresses are not supported (gRPC's round_robin; use --transport=grpc)");
  }
  if (!absl::ConsumePrefix(&target, "dns:///") && !absl::ConsumePrefix(&target, "ipv4:")) {
    absl::ConsumePrefix(&target, "ipv6:");
  }
  if (absl::StrContains(target, "://") || absl::StartsWith(target, "unix-abstract:") ||
      absl::StartsWith(target, "vsock:")) {
    return bad("unsupported scheme");
  }
  absl::string_view host, port;
  if (absl::StartsWith(target, "[")) {
    const size_t close = target.find(']');
    if (close == absl::string_view::npos || close + 1 >= target.size() ||
        target[close + 1] != ':') {
      return bad("an IPv6 literal needs [address]:port");
    }
    host = target.substr(1, close - 1);
    port = target.substr(close + 2);
  } else {
    const size_t colon = target.rfind(':');
    if (colon == absl::string_view::npos) return bad("no port");
    host = target.substr(0, colon);
    port = target.substr(colon + 1);
    if (absl::StrContains(host, ":")) return bad("an IPv6 literal needs brackets");
  }
  int p = 0;
  if (host.empty()) return bad("no host");
  if (!absl::SimpleAtoi(port, &p) || p < 1 || p > 65535) return bad("the port is not 1..65535");
  t.host = std::string(host);
  t.port = p;
  t.authority = absl::StrContains(host, ":") ? absl::StrCat("[", host, "]:", p)
                                             : absl::StrCat(host, ":", p);
  return t;
}

}  // namespace lossd::loadtest::h2
