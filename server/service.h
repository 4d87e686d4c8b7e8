// LossService on gRPC's callback API. Each call is validated on the gRPC thread (cheap), then
// computed on the Core's worker queue; workers finish the reactors. No handler blocks.
#ifndef LOSSD_SERVER_SERVICE_H_
#define LOSSD_SERVER_SERVICE_H_

#include <string>

#include "absl/status/status.h"
#include "core.h"
#include "lossd/v1/lossd.grpc.pb.h"

namespace lossd::server {

class LossServiceImpl final : public v1::LossService::CallbackService {
 public:
  explicit LossServiceImpl(Core* core) : core_(core) {}

  grpc::ServerUnaryReactor* Evaluate(grpc::CallbackServerContext* context,
                                     const v1::EvaluateRequest* request,
                                     v1::EvaluateResponse* response) override;
  grpc::ServerUnaryReactor* GetCapabilities(grpc::CallbackServerContext* context,
                                            const v1::GetCapabilitiesRequest* request,
                                            v1::Capabilities* response) override;
  grpc::ServerBidiReactor<v1::EvaluateRequest, v1::EvaluateStreamResponse>* EvaluateStream(
      grpc::CallbackServerContext* context) override;
  grpc::ServerReadReactor<v1::EvaluateRequest>* Accumulate(
      grpc::CallbackServerContext* context, v1::AccumulateResponse* response) override;

 private:
  Core* core_;
};

// One log line for a failed call or batch: method, status, message, peer, request id.
void LogFailure(const char* method, const grpc::CallbackServerContext& context,
                const std::string& request_id, const absl::Status& status);

// Creates the reactors of the streaming calls (stream_reactors.cc).
grpc::ServerBidiReactor<v1::EvaluateRequest, v1::EvaluateStreamResponse>* NewEvaluateStream(
    Core* core, grpc::CallbackServerContext* context);
grpc::ServerReadReactor<v1::EvaluateRequest>* NewAccumulate(
    Core* core, grpc::CallbackServerContext* context, v1::AccumulateResponse* response);

}  // namespace lossd::server

#endif  // LOSSD_SERVER_SERVICE_H_
