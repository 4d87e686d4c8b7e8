#include "server/service.h"

#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/time/clock.h"
#include "absl/strings/escaping.h"
#include "server/call_record.h"
#include "server/grpc_status.h"
#include "server/log.h"
#include "server/memory.h"
#include "server/message_io.h"
#include "server/unary_call.h"
#include "server/wire.h"

namespace lossd::server {

namespace {

// One unary Evaluate call (unary_call.h): owns the received request; docs/data-path.md
// section 2 follows a tensor byte through it.
class EvaluateCall final : public UnaryComputeCall {
 public:
  EvaluateCall(Core* core, grpc::CallbackServerContext* context, const grpc::ByteBuffer* request,
               grpc::ByteBuffer* reply)
      : UnaryComputeCall(core, context, reply, "Evaluate"), request_bytes_(request) {}

  void Start() {
    if (absl::Status s = core_->admission().Admit(*context_); !s.ok()) return Done(s);
    // The received slices, then what the parse keeps of them and the copies of tensors that
    // span slices (message_io.h); the reply's blocks come later.
    if (absl::Status s = reservation_.Add(MessageBytes(*request_bytes_), "the request");
        !s.ok()) {
      return Done(s);
    }
    // The handler is the request buffer's only reader (gRPC only destroys it when the call
    // ends): the parse empties it, releasing each slice as soon as it has been read.
    if (absl::Status s = ParseEvaluateRequest(const_cast<grpc::ByteBuffer*>(request_bytes_),
                                              &core_->executor().pool(), &reservation_, &request_);
        !s.ok()) {
      return Done(s);
    }
    auto plan = core_->planner().Prepare(request_.message(), request_.views());
    if (!plan.ok()) return Done(plan.status());
    Run(*std::move(plan));
  }

 private:
  std::string RequestId() const override { return request_.message().request_id(); }
  int64_t ReleaseInputs() override {
    const int64_t received = request_.payload_bytes();
    reservation_.Release(request_.held_bytes());
    request_.Clear();
    return received;
  }
  int64_t ReplyBytes(const ComputeResult& result) const override {
    return ReplyPayloadBytes(result);
  }
  absl::Status Encode(const std::string& request_id, ComputeResult* result,
                      grpc::ByteBuffer* reply) override {
    return EncodeEvaluateReply(request_id, /*stream=*/false, result, reply);
  }

  const grpc::ByteBuffer* const request_bytes_;
  ReceivedRequest request_;
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
  CallRecord record(&core_->metrics(), "GetCapabilities", context, absl::GetCurrentTimeNanos());
  v1::GetCapabilitiesRequest parsed;
  absl::Status admitted = core_->admission().Admit(*context);
  if (admitted.ok()) admitted = ParseMessage(*request, &parsed);
  if (!admitted.ok()) {
    record.Fail(admitted);
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
  if (core_->planner().has_cuda()) response->add_devices(v1::DEVICE_CUDA);
  for (v1::Reduction r : {v1::REDUCTION_NONE, v1::REDUCTION_MEAN, v1::REDUCTION_SUM,
                          v1::REDUCTION_PER_SAMPLE_MEAN}) {
    response->add_reductions(r);
  }
  response->set_max_message_bytes(core_->config().max_message_bytes);
  response->set_max_elements(core_->config().limits.max_elements);
  response->set_cuda_device_name(core_->planner().has_cuda() ? core_->planner().cuda_name() : "");
  response->set_whole_requests(true);
  response->add_partial_state_versions(kPartialStateVersion);
  // Tensor references are served once a region resolver is set (docs/data-path.md section 5).
  if (core_->planner().region_resolver() != nullptr) {
    response->set_shared_memory(true);
    response->set_shared_memory_prefix(core_->config().shared_memory_prefix);
  }
  // docs/shared-memory.md, "CUDA IPC regions".
  if (core_->planner().has_cuda()) {
    response->set_cuda_device_uuid(core_->config().cuda_device_uuid);
    response->set_cuda_ipc(core_->config().cuda_ipc);
  }
  const absl::Status s = SerializeMessage(capabilities, reply);
  record.Finish(s);
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

grpc::ServerUnaryReactor* LossServiceImpl::MergePartials(grpc::CallbackServerContext* context,
                                                         const grpc::ByteBuffer* request,
                                                         grpc::ByteBuffer* reply) {
  const int64_t start_ns = absl::GetCurrentTimeNanos();
  CallRecord record(&core_->metrics(), "MergePartials", context, start_ns);
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  // The parsed message and the decoded states each hold about the request's bytes.
  Reservation reservation(&core_->executor().memory());
  v1::MergePartialsRequest parsed;
  v1::AccumulateResponse response;
  absl::Status s = core_->admission().Admit(*context);
  if (s.ok()) s = reservation.Add(2 * MessageBytes(*request), "the MergePartials request");
  if (s.ok()) s = ParseMessage(*request, &parsed);
  int64_t compute_ns = -1;
  if (s.ok()) {
    const int64_t compute_start = absl::GetCurrentTimeNanos();
    std::vector<PartialState> states;
    states.reserve(static_cast<size_t>(parsed.partial_states_size()));
    for (int i = 0; i < parsed.partial_states_size() && s.ok(); ++i) {
      absl::StatusOr<PartialState> state = DecodePartialState(parsed.partial_states(i));
      if (!state.ok()) {
        s = absl::InvalidArgumentError(
            absl::StrCat("partial_states[", i, "] ", state.status().message()));
      } else {
        states.push_back(*std::move(state));
      }
    }
    if (s.ok()) {
      parsed.clear_partial_states();
      absl::StatusOr<PartialState> merged = MergePartialStates(std::move(states));
      if (!merged.ok()) {
        s = merged.status();
      } else {
        SetReducedLoss(*merged, &response);
        response.set_partial_state(EncodePartialState(*merged));
        response.set_device(v1::DEVICE_CPU);
      }
    }
    compute_ns = absl::GetCurrentTimeNanos() - compute_start;
  }
  if (s.ok()) {
    response.mutable_timing()->set_compute_ns(compute_ns);
    response.mutable_timing()->set_total_ns(absl::GetCurrentTimeNanos() - start_ns);
    s = SerializeMessage(response, reply);
  }
  if (s.ok()) {
    record.Ok(v1::DEVICE_CPU, response.timing());
  } else {
    record.Fail(s, parsed.request_id());
  }
  reactor->Finish(ToGrpcStatus(s));
  return reactor;
}

}  // namespace lossd::server
