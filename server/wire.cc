#include "server/wire.h"

#include <grpcpp/support/proto_buffer_reader.h>
#include <grpcpp/impl/codegen/proto_utils.h>
#include <grpcpp/support/proto_buffer_writer.h>

#include <limits>
#include <string>
#include <string_view>

#include "absl/strings/str_cat.h"
#include "google/protobuf/stubs/logging.h"
#include "server/log.h"

namespace lossd::server {

namespace {

// Set while this thread parses: protobuf's complaints go here instead of the log.
thread_local std::string* parse_errors = nullptr;

void ProtobufLogHandler(google::protobuf::LogLevel level, const char* filename, int line,
                        const std::string& message) {
  if (parse_errors != nullptr) {
    if (!parse_errors->empty()) parse_errors->append("; ");
    parse_errors->append(message);
    return;
  }
  if (level < google::protobuf::LOGLEVEL_WARNING) return;
  LogRateLimited(level >= google::protobuf::LOGLEVEL_ERROR ? LogLevel::kError : LogLevel::kWarning,
                 absl::StrCat("protobuf ", filename, ":", line, ": ", message));
}

}  // namespace

absl::Status ParseMessage(const grpc::ByteBuffer& buffer, google::protobuf::Message* message) {
  grpc::ByteBuffer copy(buffer);  // shares the slices; the reader consumes its own handle
  std::string errors;
  bool ok = false;
  {
    parse_errors = &errors;
    grpc::ProtoBufferReader reader(&copy);
    ok = reader.status().ok() && message->ParseFromZeroCopyStream(&reader);
    parse_errors = nullptr;
  }
  if (ok) return absl::OkStatus();
  message->Clear();
  return absl::InvalidArgumentError(absl::StrCat(
      "request bytes (", MessageBytes(buffer), ") do not parse as ",
      message->GetDescriptor()->full_name(), ": ",
      errors.empty() ? "malformed protobuf wire format" : errors));
}

absl::Status ParseMessageBytes(std::string_view bytes, int64_t message_bytes,
                               google::protobuf::Message* message) {
  std::string errors;
  parse_errors = &errors;
  const bool ok = bytes.size() <= static_cast<size_t>(std::numeric_limits<int>::max()) &&
                  message->ParseFromArray(bytes.data(), static_cast<int>(bytes.size()));
  parse_errors = nullptr;
  if (ok) return absl::OkStatus();
  message->Clear();
  return absl::InvalidArgumentError(absl::StrCat(
      "request bytes (", message_bytes, ") do not parse as ",
      message->GetDescriptor()->full_name(), ": ",
      errors.empty() ? "malformed protobuf wire format" : errors));
}

absl::Status MalformedMessage(int64_t message_bytes, const google::protobuf::Message& message) {
  return absl::InvalidArgumentError(
      absl::StrCat("request bytes (", message_bytes, ") do not parse as ",
                   message.GetDescriptor()->full_name(), ": malformed protobuf wire format"));
}

absl::Status SerializeMessage(const google::protobuf::Message& message, grpc::ByteBuffer* buffer) {
  bool own = false;
  const grpc::Status s =
      grpc::GenericSerialize<grpc::ProtoBufferWriter, google::protobuf::Message>(message, buffer,
                                                                                 &own);
  if (s.ok()) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("cannot serialize the reply: ", s.error_message()));
}

int64_t MessageBytes(const grpc::ByteBuffer& buffer) {
  return buffer.Valid() ? static_cast<int64_t>(buffer.Length()) : 0;
}

void InstallProtobufLogHandler() { google::protobuf::SetLogHandler(&ProtobufLogHandler); }

}  // namespace lossd::server
