// The pure parts of lossd-bench's HTTP/2 transport (--transport=h2, h2_transport.h): how a
// unary gRPC call looks on an HTTP/2 stream, without the sockets.
//
//   request   HEADERS (:method POST, :scheme http, :path /pkg.Service/Method, :authority,
//             content-type application/grpc, te trailers, grpc-timeout when the call has a
//             deadline, the call's metadata), then DATA: the message framed as a 1-byte
//             compressed flag (0), a 4-byte big-endian length and the serialized bytes
//   response  HEADERS (:status 200), DATA (the same framing), trailers (grpc-status,
//             grpc-message percent-encoded); or one HEADERS block with END_STREAM carrying
//             both (a trailers-only response, e.g. an error before any reply)
//
// Codes are gRPC's numeric status codes (0 OK ... 16 UNAUTHENTICATED).
#ifndef LOSSD_CLIENT_LOADTEST_H2_FRAMING_H_
#define LOSSD_CLIENT_LOADTEST_H2_FRAMING_H_

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace lossd::loadtest::h2 {

inline constexpr size_t kPrefixBytes = 5;

// The 5-byte prefix of an uncompressed message of `length` bytes.
void WritePrefix(uint32_t length, uint8_t out[kPrefixBytes]);
// The whole framed message (prefix + bytes).
std::string FrameMessage(absl::string_view message);

// Reassembles the one message of a unary reply from DATA chunks split anywhere (inside the
// prefix too). A second message, a compressed one (this client asks for no compression) or
// bytes past the end are errors.
class MessageReader {
 public:
  // Appends a chunk; an error (and every later call returns it) when the bytes are not one
  // uncompressed message.
  absl::Status Feed(absl::string_view chunk);
  // Whether a whole message has arrived (the DATA may end only then).
  bool complete() const { return have_length_ && message_->size() == length_; }
  // Whether anything arrived.
  bool started() const { return prefix_used_ > 0; }
  // Starts over, reading into `*out` (cleared, its capacity kept): the message lands there.
  void Reset(std::string* out);
  const absl::Status& status() const { return status_; }

 private:
  std::string* message_ = nullptr;
  uint8_t prefix_[kPrefixBytes] = {};
  size_t prefix_used_ = 0;
  bool have_length_ = false;
  uint32_t length_ = 0;
  absl::Status status_;
};

// grpc-status's value as a code: a decimal 0..16; anything else is UNKNOWN (2), as gRPC maps it.
int ParseGrpcStatus(absl::string_view value);
// grpc-message's value decoded: %XX escapes become their byte; a malformed escape stays as is
// (gRPC's rule: the message is informative and never fails the call).
std::string PercentDecode(absl::string_view value);
// The code of a response that carries no grpc-status, by its :status (gRPC's HTTP-to-gRPC
// mapping): 200 (trailers without grpc-status) and 400 INTERNAL,
// 401 UNAUTHENTICATED, 403 PERMISSION_DENIED, 404 UNIMPLEMENTED, 429/502/503/504 UNAVAILABLE,
// anything else UNKNOWN.
int HttpStatusToCode(int http_status);
// The code of a stream the server reset with HTTP/2 error `error_code` before its trailers:
// REFUSED_STREAM UNAVAILABLE (the call never reached the application), CANCEL CANCELLED,
// ENHANCE_YOUR_CALM RESOURCE_EXHAUSTED, INADEQUATE_SECURITY PERMISSION_DENIED, anything else
// INTERNAL.
int ResetToCode(uint32_t error_code);
// A grpc-timeout value for `timeout` (> 0): at most 8 digits and a unit (n, u, m, S, M, H),
// rounded up so that the server never sees a shorter deadline than the client's.
std::string FormatGrpcTimeout(absl::Duration timeout);
// The name of a code ("OK", "DEADLINE_EXCEEDED", ...), or its number.
std::string CodeName(int code);

// Where --transport=h2 connects: a TCP host and port, or a Unix socket path.
struct Target {
  bool unix_socket = false;
  std::string host;  // TCP: a name or an address literal (IPv6 without brackets)
  int port = 0;
  std::string path;       // unix_socket
  std::string authority;  // the :authority header (host:port, "localhost" for a socket)
};
// host:port, [v6]:port, dns:///host:port, ipv4:A:port, ipv6:[A]:port, unix:PATH or
// unix:///ABSOLUTE; an error naming the value otherwise (several addresses, other schemes).
absl::StatusOr<Target> ParseTarget(absl::string_view target);

}  // namespace lossd::loadtest::h2

#endif  // LOSSD_CLIENT_LOADTEST_H2_FRAMING_H_
