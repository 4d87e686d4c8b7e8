// LossService on gRPC's callback API, with raw (ByteBuffer) methods: lossd parses each request
// itself (wire.h) so that malformed bytes get INVALID_ARGUMENT and the request's size is
// admitted against the memory budget before it is parsed. Each call is validated on the gRPC
// thread (cheap), then computed on the Core's worker queue (small unary requests inline);
// workers finish the reactors. No handler blocks.
#ifndef LOSSD_SERVER_SERVICE_H_
#define LOSSD_SERVER_SERVICE_H_

#include <grpcpp/support/byte_buffer.h>

#include <string>

#include "absl/status/status.h"
#include "core.h"
#include "lossd/v1/lossd.grpc.pb.h"

namespace lossd::server {

using RawLossService = v1::LossService::WithRawCallbackMethod_Evaluate<
    v1::LossService::WithRawCallbackMethod_GetCapabilities<
        v1::LossService::WithRawCallbackMethod_EvaluateStream<
            v1::LossService::WithRawCallbackMethod_Accumulate<v1::LossService::Service>>>>;

class LossServiceImpl final : public RawLossService {
 public:
  explicit LossServiceImpl(Core* core) : core_(core) {}

  grpc::ServerUnaryReactor* Evaluate(grpc::CallbackServerContext* context,
                                     const grpc::ByteBuffer* request,
                                     grpc::ByteBuffer* reply) override;
  grpc::ServerUnaryReactor* GetCapabilities(grpc::CallbackServerContext* context,
                                            const grpc::ByteBuffer* request,
                                            grpc::ByteBuffer* reply) override;
  grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* EvaluateStream(
      grpc::CallbackServerContext* context) override;
  grpc::ServerReadReactor<grpc::ByteBuffer>* Accumulate(grpc::CallbackServerContext* context,
                                                        grpc::ByteBuffer* reply) override;

 private:
  Core* core_;
};

// One log line for a failed call or batch: method, status, message, peer, request id (escaped).
// Rate-limited (log.h).
void LogFailure(const char* method, const grpc::CallbackServerContext& context,
                const std::string& request_id, const absl::Status& status);

// Creates the reactors of the streaming calls (stream_reactors.cc).
grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* NewEvaluateStream(
    Core* core, grpc::CallbackServerContext* context);
grpc::ServerReadReactor<grpc::ByteBuffer>* NewAccumulate(Core* core,
                                                         grpc::CallbackServerContext* context,
                                                         grpc::ByteBuffer* reply);

}  // namespace lossd::server

#endif  // LOSSD_SERVER_SERVICE_H_
