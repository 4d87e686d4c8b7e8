#include "server/oip_service.h"

#include <memory>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "server/grpc_status.h"
#include "server/message_io.h"
#include "server/oip_models.h"
#include "server/oip_statistics.h"
#include "server/service.h"
#include "server/unary_call.h"
#include "server/wire.h"

namespace lossd::server {

namespace {

// One ModelInfer call (unary_call.h), the counterpart of service.cc's EvaluateCall: parse,
// translation into a lossd.v1 EvaluateRequest, Planner::Prepare, then the shared compute and
// reply. Owns the parsed request and the translated one.
class ModelInferCall final : public UnaryComputeCall {
 public:
  ModelInferCall(Core* core, const OipSharedMemory* shm, grpc::CallbackServerContext* context,
                 const grpc::ByteBuffer* request, grpc::ByteBuffer* reply)
      : UnaryComputeCall(core, context, reply, "ModelInfer"),
        request_bytes_(request),
        shm_(shm, context->peer(), OipProtocol::kGrpc) {}

  void Start() {
    if (absl::Status s = core_->admission().Admit(*context_); !s.ok()) return Done(s);
    // The received bytes, and the parsed message (which holds a copy of the tensors' bytes).
    const int64_t received = MessageBytes(*request_bytes_);
    if (absl::Status s = reservation_.Add(received, "the request"); !s.ok()) return Done(s);
    if (absl::Status s = reservation_.Add(received, "the parsed request"); !s.ok()) {
      return Done(s);
    }
    if (absl::Status s = ParseMessage(*request_bytes_, &parsed_); !s.ok()) return Done(s);
    // From here on the outcome counts in the model's statistics (none for an unknown model).
    record_.set_statistics(core_->metrics().oip_statistics().Find(parsed_.model_name(),
                                                                  parsed_.model_version()));
    // The handler is the request buffer's only reader (gRPC destroys it when the call ends):
    // release its slices now that the message holds the bytes.
    const_cast<grpc::ByteBuffer*>(request_bytes_)->Clear();
    reservation_.Release(received);
    parsed_bytes_ = received;
    // The raw input bytes move into the EvaluateRequest's tensors (no copy).
    if (absl::Status s =
            TranslateInferRequest(&parsed_, &reservation_, &request_, &translation_, &shm_);
        !s.ok()) {
      return Done(s);
    }
    parsed_.Clear();
    auto plan = core_->planner().Prepare(request_);
    if (!plan.ok()) return Done(plan.status());
    Run(*std::move(plan));
  }

 private:
  std::string RequestId() const override {
    return request_.request_id().empty() ? parsed_.id() : request_.request_id();
  }
  int64_t ReleaseInputs() override {
    const int64_t received = PayloadBytes(request_);
    request_.Clear();
    parsed_.Clear();
    reservation_.Release(parsed_bytes_);
    parsed_bytes_ = 0;
    return received;
  }
  int64_t ReplyBytes(const ComputeResult& result) const override {
    return InferReplyPayloadBytes(translation_.outputs, result);
  }
  absl::Status Encode(const std::string& request_id, ComputeResult* result,
                      grpc::ByteBuffer* reply) override {
    return EncodeInferReply(*translation_.model, request_id, translation_.outputs, result,
                            reply);
  }

  const grpc::ByteBuffer* const request_bytes_;
  int64_t parsed_bytes_ = 0;  // the parsed request's share of the reservation
  inference::ModelInferRequest parsed_;
  v1::EvaluateRequest request_;
  OipTranslation translation_;
  OipShmCaller shm_;  // regions named by the request's tensors
};

}  // namespace

grpc::ServerUnaryReactor* OipServiceImpl::Finish(const char* method,
                                                 grpc::CallbackServerContext* context,
                                                 const absl::Status& status) {
  CallRecord(&core_->metrics(), method, context, absl::GetCurrentTimeNanos()).Finish(status);
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(ToGrpcStatus(status));
  return reactor;
}

grpc::ServerUnaryReactor* OipServiceImpl::ServerLive(grpc::CallbackServerContext* context,
                                                     const inference::ServerLiveRequest*,
                                                     inference::ServerLiveResponse* response) {
  response->set_live(true);
  return Finish("ServerLive", context, absl::OkStatus());
}

grpc::ServerUnaryReactor* OipServiceImpl::ServerReady(grpc::CallbackServerContext* context,
                                                      const inference::ServerReadyRequest*,
                                                      inference::ServerReadyResponse* response) {
  response->set_ready(!core_->admission().draining());
  return Finish("ServerReady", context, absl::OkStatus());
}

grpc::ServerUnaryReactor* OipServiceImpl::ModelReady(grpc::CallbackServerContext* context,
                                                     const inference::ModelReadyRequest* request,
                                                     inference::ModelReadyResponse* response) {
  // A model this server does not have is not ready (no error: the answer is a boolean).
  response->set_ready(
      OipModelReady(core_->admission().draining(), request->name(), request->version()));
  return Finish("ModelReady", context, absl::OkStatus());
}

grpc::ServerUnaryReactor* OipServiceImpl::ServerMetadata(
    grpc::CallbackServerContext* context, const inference::ServerMetadataRequest*,
    inference::ServerMetadataResponse* response) {
  if (absl::Status s = core_->admission().Admit(*context); !s.ok()) {
    return Finish("ServerMetadata", context, s);
  }
  FillServerMetadata(response);
  return Finish("ServerMetadata", context, absl::OkStatus());
}

grpc::ServerUnaryReactor* OipServiceImpl::ModelMetadata(
    grpc::CallbackServerContext* context, const inference::ModelMetadataRequest* request,
    inference::ModelMetadataResponse* response) {
  absl::Status s = core_->admission().Admit(*context);
  if (s.ok()) {
    auto model = FindOipModel(request->name(), request->version());
    if (model.ok()) {
      FillModelMetadata(**model, response);
    } else {
      s = model.status();
    }
  }
  return Finish("ModelMetadata", context, s);
}

grpc::ServerUnaryReactor* OipServiceImpl::ModelInfer(grpc::CallbackServerContext* context,
                                                     const grpc::ByteBuffer* request,
                                                     grpc::ByteBuffer* reply) {
  auto* call = new ModelInferCall(core_, shm_, context, request, reply);
  call->Start();
  return call;
}

grpc::ServerUnaryReactor* OipServiceImpl::ModelConfig(
    grpc::CallbackServerContext* context, const inference::ModelConfigRequest* request,
    inference::ModelConfigResponse* response) {
  absl::Status s = core_->admission().Admit(*context);
  if (s.ok()) s = FillModelConfig(request->name(), request->version(), response);
  return Finish("ModelConfig", context, s);
}

grpc::ServerUnaryReactor* OipServiceImpl::ModelStatistics(
    grpc::CallbackServerContext* context, const inference::ModelStatisticsRequest* request,
    inference::ModelStatisticsResponse* response) {
  absl::Status s = core_->admission().Admit(*context);
  if (s.ok()) {
    s = core_->metrics().oip_statistics().Fill(request->name(), request->version(), response);
  }
  return Finish("ModelStatistics", context, s);
}

absl::StatusOr<uid_t> OipServiceImpl::ShmCaller(grpc::CallbackServerContext* context) {
  if (absl::Status s = core_->admission().Admit(*context); !s.ok()) return s;
  if (shm_ == nullptr) {
    return absl::FailedPreconditionError(
        "system shared memory is disabled on this server (--shared_memory_prefix is empty)");
  }
  return shm_->Caller(context->peer(), OipProtocol::kGrpc);
}

// The caller's uid (ShmCaller), then fn(uid)'s status as the call's, under `method`.
template <typename F>
grpc::ServerUnaryReactor* OipServiceImpl::ShmCall(const char* method,
                                                  grpc::CallbackServerContext* context, F&& fn) {
  auto uid = ShmCaller(context);
  return Finish(method, context, uid.ok() ? fn(*uid) : uid.status());
}

grpc::ServerUnaryReactor* OipServiceImpl::SystemSharedMemoryStatus(
    grpc::CallbackServerContext* context,
    const inference::SystemSharedMemoryStatusRequest* request,
    inference::SystemSharedMemoryStatusResponse* response) {
  return ShmCall("SystemSharedMemoryStatus", context, [&](uid_t uid) {
    return StoreReply(shm_->Status(uid, request->name()), response);
  });
}

grpc::ServerUnaryReactor* OipServiceImpl::SystemSharedMemoryRegister(
    grpc::CallbackServerContext* context,
    const inference::SystemSharedMemoryRegisterRequest* request,
    inference::SystemSharedMemoryRegisterResponse*) {
  return ShmCall("SystemSharedMemoryRegister", context,
                 [&](uid_t uid) { return shm_->Register(uid, *request); });
}

grpc::ServerUnaryReactor* OipServiceImpl::SystemSharedMemoryUnregister(
    grpc::CallbackServerContext* context,
    const inference::SystemSharedMemoryUnregisterRequest* request,
    inference::SystemSharedMemoryUnregisterResponse*) {
  return ShmCall("SystemSharedMemoryUnregister", context,
                 [&](uid_t uid) { return shm_->Unregister(uid, request->name()); });
}

}  // namespace lossd::server
