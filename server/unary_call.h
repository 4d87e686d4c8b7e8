#ifndef LOSSD_SERVER_UNARY_CALL_H_
#define LOSSD_SERVER_UNARY_CALL_H_

// The shape every unary call that computes a plan shares (lossd.v1 Evaluate in service.cc,
// the inference protocol's ModelInfer in oip_service.cc), in the order of docs/design.md
// section 1: the call counted by Admission (the subclass's Start calls Admission::Admit),
// the memory reservation, the computation through Executor::ComputeThen, and one end (Done)
// that frees the inputs, encodes the reply, records the call (call_record.h) and finishes it.
// A subclass parses and translates its own message, plans it (Planner::Prepare), then calls
// Run with the plan, or Done with an error.
//
// Lifetime: created by the handler, deleted in OnDone. OnCancel stops the computation at its
// next chunk. Done runs exactly once, after which the object may be gone.

#include <cstdint>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/time/clock.h"
#include "server/call_record.h"
#include "server/core.h"
#include "server/grpc_status.h"
#include "server/memory.h"

namespace lossd::server {

class UnaryComputeCall : public grpc::ServerUnaryReactor {
 public:
  void OnCancel() final { control_.Cancel(); }
  // OnCancel and OnDone only flip an atomic, decrement counters and free memory: they never
  // block, so gRPC may run them on the thread that completes the call instead of handing them
  // to its executor, which costs a thread wake-up per call (docs/data-path.md section 6).
  // gRPC's own DefaultReactor declares the same.
  bool InternalInlineable() final { return true; }
  void OnDone() final {
    core_->admission().CallEnded();
    delete this;
  }

 protected:
  UnaryComputeCall(Core* core, grpc::CallbackServerContext* context, grpc::ByteBuffer* reply,
                   const char* method)
      : core_(core),
        context_(context),
        reply_(reply),
        start_ns_(absl::GetCurrentTimeNanos()),
        control_(context, context->deadline()),
        reservation_(&core->executor().memory()),
        record_(&core->metrics(), method, context, start_ns_) {
    core_->admission().CallStarted();
  }
  ~UnaryComputeCall() override = default;

  // Reserves the reply's bytes, then computes `plan` inline or on a worker and ends the call.
  void Run(EvaluatePlan plan) {
    if (absl::Status s = reservation_.Add(plan.reply_bytes, "the reply"); !s.ok()) {
      return Done(s);
    }
    core_->executor().ComputeThen(control_, std::move(plan), start_ns_, &result_,
                                  [this](absl::Status s) { Done(std::move(s)); });
  }

  // Ends the call with `s` (or with the reply's encoding error): exactly once.
  void Done(absl::Status s) {
    const std::string request_id = RequestId();
    // Not needed for the reply: free the inputs (and their share of the reservation) before
    // the reply is encoded.
    const int64_t received = ReleaseInputs();
    const int64_t sent = ReplyBytes(result_);
    const v1::Timing timing = result_.timing;
    const v1::Device device = result_.device;
    if (s.ok()) {
      result_.timing.set_reply_unix_ns(absl::GetCurrentTimeNanos());
      s = Encode(request_id, &result_, reply_);
    }
    if (s.ok()) {
      record_.Ok(device, timing, received, sent);
    } else {
      record_.Fail(s, request_id);
    }
    result_ = ComputeResult();  // the blocks now belong to the reply's slices
    Finish(ToGrpcStatus(s));
  }

  // The request id for the reply and the log (empty before the request was parsed).
  virtual std::string RequestId() const = 0;
  // Frees the parsed request and releases its share of the reservation; returns its tensor
  // payload bytes (metrics).
  virtual int64_t ReleaseInputs() = 0;
  // Tensor payload bytes the reply will carry (metrics).
  virtual int64_t ReplyBytes(const ComputeResult& result) const = 0;
  // Encodes the reply, taking the blocks out of `result`.
  virtual absl::Status Encode(const std::string& request_id, ComputeResult* result,
                              grpc::ByteBuffer* reply) = 0;

  Core* const core_;
  grpc::CallbackServerContext* const context_;
  grpc::ByteBuffer* const reply_;
  const int64_t start_ns_;
  CallControl control_;
  Reservation reservation_;  // released in the destructor, after the reply was sent
  ComputeResult result_;
  CallRecord record_;
};

}  // namespace lossd::server

#endif  // LOSSD_SERVER_UNARY_CALL_H_
