#include "service.h"

#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/time/clock.h"
#include "absl/strings/escaping.h"
#include "grpc_status.h"
#include "log.h"
#include "wire.h"

namespace lossd::server {

void LogFailure(const char* method, const grpc::CallbackServerContext& context,
                const std::string& request_id, const absl::Status& status) {
  LogRateLimited(LogLevel::kWarning,
                 absl::StrCat(method, " failed: status=", absl::StatusCodeToString(status.code()),
                              " message=\"", status.message(), "\" peer=", context.peer(),
                              " request_id=\"", absl::CHexEscape(request_id), "\""));
}

namespace {

// One unary Evaluate call. Owns the parsed request, the reply and the call's memory
// reservation; OnCancel stops its computation at the next chunk; OnDone deletes it.
class EvaluateCall final : public grpc::ServerUnaryReactor {
 public:
  EvaluateCall(Core* core, grpc::CallbackServerContext* context, const grpc::ByteBuffer* request,
               grpc::ByteBuffer* reply)
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
    // The received bytes and their parsed copy; the reply and its serialized form come later.
    const int64_t received = MessageBytes(*request_bytes_);
    if (absl::Status s = reservation_.Add(2 * received, "the request"); !s.ok()) return Done(s);
    const absl::Status parsed = ParseMessage(*request_bytes_, &request_);
    // The handler is the request buffer's only reader (gRPC only destroys it when the call
    // ends): free the received bytes now instead of holding them beside their parsed copy.
    const_cast<grpc::ByteBuffer*>(request_bytes_)->Clear();
    reservation_.Release(received);
    if (!parsed.ok()) return Done(parsed);
    auto plan = core_->Prepare(request_);
    if (!plan.ok()) return Done(plan.status());
    if (absl::Status s = reservation_.Add(2 * plan->reply_bytes, "the reply"); !s.ok()) {
      return Done(s);
    }
    if (plan->args.numel <= core_->config().inline_elements) {
      // Small: a few microseconds of compute, cheaper than a hop to a worker thread.
      return Done(core_->Compute(control_, *plan, start_ns_, &response_));
    }
    auto shared_plan = std::make_shared<EvaluatePlan>(*std::move(plan));
    const absl::Status queued = core_->Submit([this, shared_plan] {
      Done(core_->Compute(control_, *shared_plan, start_ns_, &response_));
    });
    if (!queued.ok()) Done(queued);
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
    std::string request_id = std::move(*request_.mutable_request_id());
    request_.Clear();  // not needed for the reply: free it before serializing
    if (s.ok()) {
      response_.set_request_id(request_id);
      s = SerializeMessage(response_, reply_);
    }
    if (s.ok()) {
      core_->metrics().RecordCall("Evaluate", "OK", DeviceLabel(response_.device()),
                                  response_.timing().queue_ns() * 1e-9,
                                  response_.timing().compute_ns() * 1e-9, total);
      core_->metrics().AddBytes("Evaluate", received, PayloadBytes(response_));
    } else {
      LogFailure("Evaluate", *context_, request_id, s);
      core_->metrics().RecordCall("Evaluate", absl::StatusCodeToString(s.code()), "none", -1, -1,
                                  total);
    }
    response_.Clear();  // the serialized reply is all that is still needed
    Finish(ToGrpcStatus(s));
  }

  Core* const core_;
  grpc::CallbackServerContext* const context_;
  const grpc::ByteBuffer* const request_bytes_;
  grpc::ByteBuffer* const reply_;
  const int64_t start_ns_;
  CallControl control_;
  Reservation reservation_;  // released in the destructor, after the reply was sent
  v1::EvaluateRequest request_;
  v1::EvaluateResponse response_;
};

}  // namespace

grpc::ServerUnaryReactor* LossServiceImpl::Evaluate(grpc::CallbackServerContext* context,
                                                    const grpc::ByteBuffer* request,
                                                    grpc::ByteBuffer* reply) {
  auto* call = new EvaluateCall(core_, context, request, reply);
  call->Start();
  return call;
}

grpc::ServerUnaryReactor* LossServiceImpl::GetCapabilities(grpc::CallbackServerContext* context,
                                                           const grpc::ByteBuffer* request,
                                                           grpc::ByteBuffer* reply) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  v1::GetCapabilitiesRequest parsed;
  absl::Status admitted = core_->Admit(*context);
  if (admitted.ok()) admitted = ParseMessage(*request, &parsed);
  if (!admitted.ok()) {
    LogFailure("GetCapabilities", *context, "", admitted);
    core_->metrics().RecordCall("GetCapabilities", absl::StatusCodeToString(admitted.code()),
                                "none", -1, -1, -1);
    reactor->Finish(ToGrpcStatus(admitted));
    return reactor;
  }
  v1::Capabilities capabilities;
  v1::Capabilities* response = &capabilities;
  response->set_server_version(LOSSD_VERSION);
  response->add_losses("bce_with_logits");
  response->add_losses("sigmoid_focal_loss");
  for (v1::DType d : {v1::DTYPE_FLOAT32, v1::DTYPE_FLOAT64, v1::DTYPE_FLOAT16,
                      v1::DTYPE_BFLOAT16}) {
    response->add_dtypes(d);
  }
  response->add_devices(v1::DEVICE_CPU);
  if (core_->has_cuda()) response->add_devices(v1::DEVICE_CUDA);
  for (v1::Reduction r : {v1::REDUCTION_NONE, v1::REDUCTION_MEAN, v1::REDUCTION_SUM,
                          v1::REDUCTION_PER_SAMPLE_MEAN}) {
    response->add_reductions(r);
  }
  response->set_max_message_bytes(core_->config().max_message_bytes);
  response->set_max_elements(core_->config().limits.max_elements);
  response->set_cuda_device_name(core_->has_cuda() ? core_->cuda_name() : "");
  response->set_whole_requests(true);
  const absl::Status s = SerializeMessage(capabilities, reply);
  core_->metrics().RecordCall("GetCapabilities", absl::StatusCodeToString(s.code()), "none", -1,
                              -1, -1);
  reactor->Finish(ToGrpcStatus(s));
  return reactor;
}

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* LossServiceImpl::EvaluateStream(
    grpc::CallbackServerContext* context) {
  return NewEvaluateStream(core_, context);
}

grpc::ServerReadReactor<grpc::ByteBuffer>* LossServiceImpl::Accumulate(
    grpc::CallbackServerContext* context, grpc::ByteBuffer* reply) {
  return NewAccumulate(core_, context, reply);
}

}  // namespace lossd::server
