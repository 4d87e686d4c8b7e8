// Request bytes to messages and replies back, for the raw (ByteBuffer) handlers of LossService.
//
// lossd parses requests itself instead of letting gRPC do it: gRPC's callback API answers a
// message that does not parse with UNIMPLEMENTED and an empty message (unary calls) or ends
// the stream as if the client had finished (streaming calls: a batch would be dropped without
// an error). Here a malformed message gets INVALID_ARGUMENT with protobuf's reason, and the
// handler can account for the request's bytes before parsing. Thread-safe.
#ifndef LOSSD_SERVER_WIRE_H_
#define LOSSD_SERVER_WIRE_H_

#include <grpcpp/support/byte_buffer.h>

#include <cstdint>
#include <string_view>

#include "absl/status/status.h"
#include "google/protobuf/message.h"

namespace lossd::server {

// Parses `buffer` (left unchanged) into `message`. INVALID_ARGUMENT "request bytes do not parse
// as lossd.v1.EvaluateRequest: <protobuf's reason>" when they do not (bad wire format, a
// string field that is not UTF-8, ...).
absl::Status ParseMessage(const grpc::ByteBuffer& buffer, google::protobuf::Message* message);

// Parses the contiguous `bytes` into `message` with ParseMessage's error: `message_bytes` is
// the size of the received message they were taken from (named in the error).
absl::Status ParseMessageBytes(std::string_view bytes, int64_t message_bytes,
                               google::protobuf::Message* message);

// INVALID_ARGUMENT for a received message of `message_bytes` bytes that is not valid protobuf
// wire format, with ParseMessage's wording.
absl::Status MalformedMessage(int64_t message_bytes, const google::protobuf::Message& message);

// Serializes `message` into `buffer`. INTERNAL when protobuf cannot (a message over 2 GiB).
absl::Status SerializeMessage(const google::protobuf::Message& message, grpc::ByteBuffer* buffer);

// Bytes of a received message (0 for an empty buffer).
int64_t MessageBytes(const grpc::ByteBuffer& buffer);

// Routes libprotobuf's own log lines into lossd's rate-limited log (a malformed message makes
// protobuf log one ERROR line per parse, which a client could use to flood the log); during
// ParseMessage they become the error's message instead. Idempotent; call before serving.
void InstallProtobufLogHandler();

}  // namespace lossd::server

#endif  // LOSSD_SERVER_WIRE_H_
