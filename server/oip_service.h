// inference.GRPCInferenceService (KServe v2 / Open Inference Protocol, docs/interop.md) on
// gRPC's callback API, registered beside LossService on the same port and sharing its Core:
// the same validation, limits, compute queue, memory admission, bearer token, drain and
// metrics. ModelInfer is a raw (ByteBuffer) method, like Evaluate: its request is admitted
// against the memory budget before it is parsed, malformed bytes get INVALID_ARGUMENT, and its
// reply's output blocks go out as slices without a copy. ServerLive, ServerReady and
// ModelReady are probes and need no token; the other calls do. ModelConfig and ModelStatistics
// are Triton's configuration and statistics extensions (oip_statistics.h);
// SystemSharedMemory{Status,Register,Unregister} its system shared memory extension
// (oip_shm.h).
#ifndef LOSSD_SERVER_OIP_SERVICE_H_
#define LOSSD_SERVER_OIP_SERVICE_H_

#include <grpcpp/support/byte_buffer.h>

#include "server/core.h"
#include "server/oip_shm.h"
#include "inference/grpc_predict_v2.grpc.pb.h"

namespace lossd::server {

using OipGrpc = inference::GRPCInferenceService;
using OipServiceBase = OipGrpc::WithCallbackMethod_ServerLive<
    OipGrpc::WithCallbackMethod_ServerReady<OipGrpc::WithCallbackMethod_ModelReady<
        OipGrpc::WithCallbackMethod_ServerMetadata<OipGrpc::WithCallbackMethod_ModelMetadata<
            OipGrpc::WithRawCallbackMethod_ModelInfer<OipGrpc::WithCallbackMethod_ModelConfig<
                OipGrpc::WithCallbackMethod_ModelStatistics<
                    OipGrpc::WithCallbackMethod_SystemSharedMemoryStatus<
                        OipGrpc::WithCallbackMethod_SystemSharedMemoryRegister<
                            OipGrpc::WithCallbackMethod_SystemSharedMemoryUnregister<
                                OipGrpc::Service>>>>>>>>>>>;

class OipServiceImpl final : public OipServiceBase {
 public:
  // `shm`: Triton's system shared memory extension (oip_shm.h); null when shared memory is
  // disabled (its calls, and tensors naming a region, get FAILED_PRECONDITION).
  explicit OipServiceImpl(Core* core, OipSharedMemory* shm = nullptr) : core_(core), shm_(shm) {}

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
  grpc::ServerUnaryReactor* SystemSharedMemoryStatus(
      grpc::CallbackServerContext* context,
      const inference::SystemSharedMemoryStatusRequest* request,
      inference::SystemSharedMemoryStatusResponse* response) override;
  grpc::ServerUnaryReactor* SystemSharedMemoryRegister(
      grpc::CallbackServerContext* context,
      const inference::SystemSharedMemoryRegisterRequest* request,
      inference::SystemSharedMemoryRegisterResponse* response) override;
  grpc::ServerUnaryReactor* SystemSharedMemoryUnregister(
      grpc::CallbackServerContext* context,
      const inference::SystemSharedMemoryUnregisterRequest* request,
      inference::SystemSharedMemoryUnregisterResponse* response) override;

 private:
  // Finishes a small call: metrics under `method`, a log line when it failed.
  grpc::ServerUnaryReactor* Finish(const char* method, grpc::CallbackServerContext* context,
                                   const absl::Status& status);
  // The caller's uid for a shared-memory call, once admitted (drain, token) and with shared
  // memory enabled.
  absl::StatusOr<uid_t> ShmCaller(grpc::CallbackServerContext* context);
  template <typename F>
  grpc::ServerUnaryReactor* ShmCall(const char* method, grpc::CallbackServerContext* context,
                                    F&& fn);
  Core* core_;
  OipSharedMemory* shm_;
};

}  // namespace lossd::server

#endif  // LOSSD_SERVER_OIP_SERVICE_H_
