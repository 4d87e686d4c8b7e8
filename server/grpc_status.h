// The one place where absl::Status becomes grpc::Status (docs/design.md section 8, rule 3).
#ifndef LOSSD_SERVER_GRPC_STATUS_H_
#define LOSSD_SERVER_GRPC_STATUS_H_

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace lossd::server {

// Same code number (absl and gRPC share the canonical codes) and the same message.
grpc::Status ToGrpcStatus(const absl::Status& status);

}  // namespace lossd::server

#endif  // LOSSD_SERVER_GRPC_STATUS_H_
