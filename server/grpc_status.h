// The one place where absl::Status becomes grpc::Status (docs/design.md section 8, rule 3).
#ifndef LOSSD_SERVER_GRPC_STATUS_H_
#define LOSSD_SERVER_GRPC_STATUS_H_

#include <grpcpp/support/status.h>

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace lossd::server {

// Same code number (absl and gRPC share the canonical codes) and the same message.
grpc::Status ToGrpcStatus(const absl::Status& status);

// A handler's result into its reply message: *reply = the value when `result` is ok; returns
// the status either way.
template <typename R>
absl::Status StoreReply(absl::StatusOr<R> result, R* reply) {
  if (result.ok()) *reply = *std::move(result);
  return result.status();
}

}  // namespace lossd::server

#endif  // LOSSD_SERVER_GRPC_STATUS_H_
