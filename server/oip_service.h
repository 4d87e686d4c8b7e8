// inference.GRPCInferenceService (KServe v2 / Open Inference Protocol, docs/interop.md) on
// gRPC's callback API, registered beside LossService on the same port and sharing its Core:
// the same validation, limits, compute queue, memory admission, bearer token, drain and
// metrics. ModelInfer is a raw (ByteBuffer) method, like Evaluate: its request is admitted
// against the memory budget before it is parsed, malformed bytes get INVALID_ARGUMENT, and its
// reply's output blocks go out as slices without a copy. ServerLive, ServerReady and
// ModelReady are probes and need no token; the other calls do. ModelConfig and ModelStatistics
// are Triton's configuration and statistics extensions (oip_statistics.h).
#ifndef LOSSD_SERVER_OIP_SERVICE_H_
#define LOSSD_SERVER_OIP_SERVICE_H_

#include <grpcpp/support/byte_buffer.h>

#include "server/core.h"
#include "inference/grpc_predict_v2.grpc.pb.h"

namespace lossd::server {

using OipServiceBase = inference::GRPCInferenceService::WithCallbackMethod_ServerLive<
    inference::GRPCInferenceService::WithCallbackMethod_ServerReady<
        inference::GRPCInferenceService::WithCallbackMethod_ModelReady<
            inference::GRPCInferenceService::WithCallbackMethod_ServerMetadata<
                inference::GRPCInferenceService::WithCallbackMethod_ModelMetadata<
                    inference::GRPCInferenceService::WithRawCallbackMethod_ModelInfer<
                        inference::GRPCInferenceService::WithCallbackMethod_ModelConfig<
                            inference::GRPCInferenceService::WithCallbackMethod_ModelStatistics<
                                inference::GRPCInferenceService::Service>>>>>>>>;

class OipServiceImpl final : public OipServiceBase {
 public:
  explicit OipServiceImpl(Core* core) : core_(core) {}

  grpc::ServerUnaryReactor* ServerLive(grpc::CallbackServerContext* context,
                                       const inference::ServerLiveRequest* request,
                                       inference::ServerLiveResponse* response) override;
  grpc::ServerUnaryReactor* ServerReady(grpc::CallbackServerContext* context,
                                        const inference::ServerReadyRequest* request,
                                        inference::ServerReadyResponse* response) override;
  grpc::ServerUnaryReactor* ModelReady(grpc::CallbackServerContext* context,
                                       const inference::ModelReadyRequest* request,
                                       inference::ModelReadyResponse* response) override;
  grpc::ServerUnaryReactor* ServerMetadata(grpc::CallbackServerContext* context,
                                           const inference::ServerMetadataRequest* request,
                                           inference::ServerMetadataResponse* response) override;
  grpc::ServerUnaryReactor* ModelMetadata(grpc::CallbackServerContext* context,
                                          const inference::ModelMetadataRequest* request,
                                          inference::ModelMetadataResponse* response) override;
  grpc::ServerUnaryReactor* ModelInfer(grpc::CallbackServerContext* context,
                                       const grpc::ByteBuffer* request,
                                       grpc::ByteBuffer* reply) override;
  grpc::ServerUnaryReactor* ModelConfig(grpc::CallbackServerContext* context,
                                        const inference::ModelConfigRequest* request,
                                        inference::ModelConfigResponse* response) override;
  grpc::ServerUnaryReactor* ModelStatistics(grpc::CallbackServerContext* context,
                                            const inference::ModelStatisticsRequest* request,
                                            inference::ModelStatisticsResponse* response) override;

 private:
  // Finishes a small call: metrics under `method`, a log line when it failed.
  grpc::ServerUnaryReactor* Finish(const char* method, grpc::CallbackServerContext* context,
                                   const absl::Status& status);
  Core* core_;
};

}  // namespace lossd::server

#endif  // LOSSD_SERVER_OIP_SERVICE_H_
