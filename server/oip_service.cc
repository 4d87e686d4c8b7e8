#include "oip_service.h"

#include <memory>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "grpc_status.h"
#include "oip_models.h"
#include "service.h"
#include "wire.h"

namespace lossd::server {

namespace {

// One ModelInfer call, the counterpart of service.cc's EvaluateCall: Admit, memory
// reservation, parse, translation into a lossd.v1 EvaluateRequest, Core::Prepare, inline
// compute or Submit, Core::Compute, reply. Owns the parsed request, the translated request,
// the result and the call's memory reservation; OnCancel stops the computation at its next
// chunk; OnDone deletes it.
class ModelInferCall final : public grpc::ServerUnaryReactor {
 public:
  ModelInferCall(Core* core, grpc::CallbackServerContext* context,
                 const grpc::ByteBuffer* request, grpc::ByteBuffer* reply)
      : core_(core),
        context_(context),
        request_bytes_(request),
        reply_(reply),
        start_ns_(absl::GetCurrentTimeNanos()),
        control_(context, context->deadline()),
        reservation_(&core->memory()) {
    core_->CallStarted();
  }

  void Start() {
    if (absl::Status s = core_->Admit(*context_); !s.ok()) return Done(s);
    // The received bytes, and the parsed message (which holds a copy of the tensors' bytes).
    const int64_t received = MessageBytes(*request_bytes_);
    if (absl::Status s = reservation_.Add(received, "the request"); !s.ok()) return Done(s);
    if (absl::Status s = reservation_.Add(received, "the parsed request"); !s.ok()) {
      return Done(s);
    }
    if (absl::Status s = ParseMessage(*request_bytes_, &parsed_); !s.ok()) return Done(s);
    // The handler is the request buffer's only reader (gRPC destroys it when the call ends):
    // release its slices now that the message holds the bytes.
    const_cast<grpc::ByteBuffer*>(request_bytes_)->Clear();
    reservation_.Release(received);
    parsed_bytes_ = received;
    // The raw input bytes move into the EvaluateRequest's tensors (no copy).
    if (absl::Status s = TranslateInferRequest(&parsed_, &reservation_, &request_, &translation_);
        !s.ok()) {
      return Done(s);
    }
    parsed_.Clear();
    auto plan = core_->Prepare(request_);
    if (!plan.ok()) return Done(plan.status());
    if (absl::Status s = reservation_.Add(plan->reply_bytes, "the reply"); !s.ok()) {
      return Done(s);
    }
    core_->ComputeThen(control_, *std::move(plan), start_ns_, &result_,
                       [this](absl::Status s) { Done(std::move(s)); });
  }

  void OnCancel() override { control_.Cancel(); }

  void OnDone() override {
    core_->CallEnded();
    delete this;
  }

 private:
  // Log, metrics, reply: exactly once per call, after which `this` may be gone.
  void Done(absl::Status s) {
    const double total = (absl::GetCurrentTimeNanos() - start_ns_) * 1e-9;
    const int64_t received = PayloadBytes(request_);
    const std::string id = request_.request_id().empty() ? parsed_.id() : request_.request_id();
    // Not needed for the reply: free the inputs (and their share of the reservation) before
    // the reply is encoded.
    request_.Clear();
    parsed_.Clear();
    reservation_.Release(parsed_bytes_);
    const int64_t sent = InferReplyPayloadBytes(translation_.outputs, result_);
    const v1::Timing timing = result_.timing;
    const v1::Device device = result_.device;
    if (s.ok()) {
      s = EncodeInferReply(*translation_.model, id, translation_.outputs, &result_, reply_);
    }
    if (s.ok()) {
      core_->metrics().RecordCall("ModelInfer", "OK", DeviceLabel(device),
                                  timing.queue_ns() * 1e-9, timing.compute_ns() * 1e-9, total);
      core_->metrics().AddBytes("ModelInfer", received, sent);
    } else {
      LogFailure("ModelInfer", *context_, id, s);
      core_->metrics().RecordCall("ModelInfer", absl::StatusCodeToString(s.code()), "none", -1,
                                  -1, total);
    }
    result_ = ComputeResult();  // the blocks now belong to the reply's slices
    Finish(ToGrpcStatus(s));
  }

  Core* const core_;
  grpc::CallbackServerContext* const context_;
  const grpc::ByteBuffer* const request_bytes_;
  grpc::ByteBuffer* const reply_;
  const int64_t start_ns_;
  CallControl control_;
  Reservation reservation_;  // released in the destructor, after the reply was sent
  int64_t parsed_bytes_ = 0;  // the parsed request's share of the reservation
  inference::ModelInferRequest parsed_;
  v1::EvaluateRequest request_;
  OipTranslation translation_;
  ComputeResult result_;
};

}  // namespace

grpc::ServerUnaryReactor* OipServiceImpl::Finish(const char* method,
                                                 grpc::CallbackServerContext* context,
                                                 const absl::Status& status) {
  if (!status.ok()) LogFailure(method, *context, "", status);
  core_->metrics().RecordCall(method, absl::StatusCodeToString(status.code()), "none", -1, -1,
                              -1);
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
  response->set_ready(!core_->draining());
  return Finish("ServerReady", context, absl::OkStatus());
}

grpc::ServerUnaryReactor* OipServiceImpl::ModelReady(grpc::CallbackServerContext* context,
                                                     const inference::ModelReadyRequest* request,
                                                     inference::ModelReadyResponse* response) {
  // A model this server does not have is not ready (no error: the answer is a boolean).
  response->set_ready(OipModelReady(core_->draining(), request->name(), request->version()));
  return Finish("ModelReady", context, absl::OkStatus());
}

grpc::ServerUnaryReactor* OipServiceImpl::ServerMetadata(
    grpc::CallbackServerContext* context, const inference::ServerMetadataRequest*,
    inference::ServerMetadataResponse* response) {
  if (absl::Status s = core_->Admit(*context); !s.ok()) {
    return Finish("ServerMetadata", context, s);
  }
  FillServerMetadata(response);
  return Finish("ServerMetadata", context, absl::OkStatus());
}

grpc::ServerUnaryReactor* OipServiceImpl::ModelMetadata(
    grpc::CallbackServerContext* context, const inference::ModelMetadataRequest* request,
    inference::ModelMetadataResponse* response) {
  absl::Status s = core_->Admit(*context);
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
  auto* call = new ModelInferCall(core_, context, request, reply);
  call->Start();
  return call;
}

}  // namespace lossd::server
