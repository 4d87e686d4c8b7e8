// Reactors of the streaming calls. Both follow one pattern: decisions are made under the
// reactor's mutex and collected as Actions, which are carried out after the mutex is released
// (Finish last: the reactor may be deleted right after it). Compute runs on the Core's workers;
// Finish is only called once no computation of the call is running and no StartRead decided
// under the mutex is still to be called (`starting_reads_`: a concurrent OnCancel must not
// finish, and so delete, the reactor between that decision and the call), so the call's
// context outlives every use of it, and OnDone can delete the reactor.
#include <cmath>
#include <deque>
#include <memory>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "grpc_status.h"
#include "lossd/kernels/exact_sum.h"
#include "memory.h"
#include "message_io.h"
#include "service.h"
#include "wire.h"

namespace lossd::server {

namespace {

// What a reactor does once its mutex is released. With nothing to do, the caller must not
// touch the reactor at all once the mutex is released: another thread may finish and delete it
// at any moment (even a call of a member function that does nothing is then undefined; UBSan's
// vptr check reports it). An action that is pending keeps the reactor alive until it is taken
// (writing_ and starting_reads_ hold off Finish).
struct Actions {
  grpc::ByteBuffer* read = nullptr;
  const grpc::ByteBuffer* write = nullptr;
  bool finish = false;
  grpc::Status status;
  // EvaluateStream: a small batch computed on this thread once the other actions are taken
  // (its computation holds off Finish, like a queued one).
  void* compute_slot = nullptr;
  std::shared_ptr<EvaluatePlan> compute_plan;
  bool any() const {
    return read != nullptr || write != nullptr || finish || compute_slot != nullptr;
  }
};

// ---- EvaluateStream ---------------------------------------------------------------------

class EvaluateStreamReactor final
    : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  EvaluateStreamReactor(Core* core, grpc::CallbackServerContext* context)
      : core_(core),
        context_(context),
        start_ns_(absl::GetCurrentTimeNanos()),
        control_(context, context->deadline()) {
    core_->CallStarted();
    Act actions;
    {
      absl::MutexLock lock(&mu_);
      if (absl::Status s = core_->Admit(*context_); !s.ok()) {
        LogFailure("EvaluateStream", *context_, "", s);
        RequestFinish(s, &actions);
      } else {
        NextRead(&actions);
      }
    }
    if (actions.any()) Run(actions);
  }

  void OnReadDone(bool ok) override {
    Act actions;
    {
      absl::MutexLock lock(&mu_);
      reading_ = false;
      if (!ok || finishing_) {
        reads_done_ = true;
        MaybeFinish(&actions);
      } else {
        Accept(&actions);
        NextRead(&actions);
        NextWrite(&actions);
      }
    }
    if (actions.any()) Run(actions);
  }

  void OnWriteDone(bool ok) override {
    Act actions;
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
      slots_.pop_front();
      if (!ok) {
        RequestFinish(absl::CancelledError("the client stopped receiving replies"), &actions);
      } else {
        NextWrite(&actions);
        NextRead(&actions);
        MaybeFinish(&actions);
      }
    }
    if (actions.any()) Run(actions);
  }

  void OnCancel() override {
    control_.Cancel();
    Act actions;
    {
      absl::MutexLock lock(&mu_);
      RequestFinish(absl::CancelledError("the call was cancelled"), &actions);
    }
    if (actions.any()) Run(actions);
  }

  void OnDone() override {
    core_->CallEnded();
    delete this;
  }

 private:
  using Act = Actions;
  struct Slot {
    explicit Slot(MemoryBudget* budget) : reservation(budget) {}
    ReceivedRequest request;
    std::string request_id;
    ComputeResult result;
    grpc::ByteBuffer out;  // the serialized reply, once ready
    bool ready = false;
    int64_t start_ns = 0;
    Reservation reservation;  // this batch's bytes, until its reply is written
  };

  void Run(const Act& a) {
    if (a.write) StartWrite(a.write);
    if (a.read) {
      StartRead(a.read);
      Act after;
      {
        absl::MutexLock lock(&mu_);
        --starting_reads_;
        if (finishing_) RequestFinish(final_status_, &after);
      }
      if (after.finish) Finish(after.status);
    }
    // Last: the computation may finish the call, after which `this` may be gone. (It holds off
    // Finish until then, so a.finish is never set with it.)
    if (a.compute_slot != nullptr) {
      Computed(static_cast<Slot*>(a.compute_slot), *a.compute_plan);
      return;
    }
    if (a.finish) Finish(a.status);  // last: `this` may be gone afterwards
  }

  // Starts the next read unless the window of batches in progress is full.
  void NextRead(Act* a) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (reading_ || reads_done_ || finishing_) return;
    if (static_cast<int>(slots_.size()) >= core_->config().stream_window) return;
    reading_ = true;
    ++starting_reads_;
    pending_ = grpc::ByteBuffer();
    a->read = &pending_;
  }

  // Writes the oldest reply once it is ready (replies leave in request order).
  void NextWrite(Act* a) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (writing_ || finishing_ || slots_.empty() || !slots_.front()->ready) return;
    writing_ = true;
    a->write = &slots_.front()->out;
  }

  void SetError(Slot* slot, const absl::Status& s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    LogFailure("EvaluateStream", *context_, slot->request_id, s);
    core_->metrics().RecordCall("EvaluateStream", absl::StatusCodeToString(s.code()), "none", -1,
                                -1, (absl::GetCurrentTimeNanos() - slot->start_ns) * 1e-9);
    slot->reservation.Reset();
    slot->request.Clear();
    slot->result = ComputeResult();
    v1::EvaluateStreamResponse reply;
    reply.set_request_id(slot->request_id);
    v1::BatchError* error = reply.mutable_error();
    error->set_code(static_cast<int>(s.code()));
    error->set_message(std::string(s.message()));
    // A short message: serializing it cannot fail.
    (void)SerializeMessage(reply, &slot->out);
    slot->ready = true;
  }

  // Parses and validates the batch just read and queues its compute.
  void Accept(Act* a) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    auto slot = std::make_unique<Slot>(&core_->memory());
    slot->start_ns = absl::GetCurrentTimeNanos();
    Slot* raw = slot.get();
    slots_.push_back(std::move(slot));
    grpc::ByteBuffer received;
    received.Swap(&pending_);
    absl::Status admitted = raw->reservation.Add(MessageBytes(received), "the stream's batch");
    if (admitted.ok()) {
      admitted = ParseEvaluateRequest(&received, &core_->pool(), &raw->reservation, &raw->request);
    }
    received.Clear();
    if (!admitted.ok()) {
      SetError(raw, admitted);
      return;
    }
    raw->request_id = raw->request.message().request_id();
    auto plan = core_->Prepare(raw->request.message(), raw->request.views());
    if (plan.ok()) {
      if (absl::Status s = raw->reservation.Add(plan->reply_bytes, "the batch's reply"); !s.ok()) {
        plan = s;
      }
    }
    if (!plan.ok()) {
      SetError(raw, plan.status());
      return;
    }
    ++inflight_;
    auto shared_plan = std::make_shared<EvaluatePlan>(*std::move(plan));
    if (shared_plan->args.numel <= core_->config().inline_elements) {
      // Small, like a small unary call: computed on this thread once the mutex is released
      // (Run), cheaper than a hop to a worker.
      a->compute_slot = raw;
      a->compute_plan = std::move(shared_plan);
      return;
    }
    const absl::Status queued =
        core_->Submit([this, raw, shared_plan] { Computed(raw, *shared_plan); });
    if (!queued.ok()) {
      --inflight_;
      SetError(raw, queued);
    }
  }

  // On a worker thread, or on the gRPC thread for a small batch (Run).
  void Computed(Slot* slot, const EvaluatePlan& plan) {
    absl::Status s = core_->Compute(control_, plan, slot->start_ns, &slot->result);
    const int64_t sent = ReplyPayloadBytes(slot->result);
    const v1::Device device = slot->result.device;
    const v1::Timing timing = slot->result.timing;
    const int64_t received = slot->request.payload_bytes();
    if (s.ok()) {
      // Not needed for the reply: free the inputs before encoding it.
      slot->reservation.Release(slot->request.held_bytes());
      slot->request.Clear();
      slot->result.timing.set_reply_unix_ns(absl::GetCurrentTimeNanos());
      s = EncodeEvaluateReply(slot->request_id, /*stream=*/true, &slot->result, &slot->out);
      slot->result = ComputeResult();  // the blocks now belong to the reply's slices
    }
    Act actions;
    {
      absl::MutexLock lock(&mu_);
      --inflight_;
      if (s.ok()) {
        core_->metrics().RecordCall("EvaluateStream", "OK", DeviceLabel(device),
                                    timing.queue_ns() * 1e-9, timing.compute_ns() * 1e-9,
                                    (absl::GetCurrentTimeNanos() - slot->start_ns) * 1e-9);
        core_->metrics().AddBytes("EvaluateStream", received, sent);
        slot->ready = true;
      } else {
        SetError(slot, s);
      }
      NextWrite(&actions);
      MaybeFinish(&actions);
    }
    if (actions.any()) Run(actions);
  }

  // Finishes OK when every read batch has been answered.
  void MaybeFinish(Act* a) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!finishing_ && reads_done_ && slots_.empty() && !writing_) {
      RequestFinish(absl::OkStatus(), a);
    } else if (finishing_) {
      RequestFinish(final_status_, a);
    }
  }

  // Finishes with `s` as soon as no compute and no write is outstanding.
  void RequestFinish(const absl::Status& s, Act* a) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!finishing_) {
      finishing_ = true;
      final_status_ = s;
    }
    if (finished_ || inflight_ > 0 || writing_ || starting_reads_ > 0) return;
    finished_ = true;
    a->finish = true;
    a->status = ToGrpcStatus(final_status_);
  }

  Core* const core_;
  grpc::CallbackServerContext* const context_;
  const int64_t start_ns_;
  CallControl control_;  // shared by the stream's batches
  absl::Mutex mu_;
  std::deque<std::unique_ptr<Slot>> slots_ ABSL_GUARDED_BY(mu_);  // request order
  grpc::ByteBuffer pending_ ABSL_GUARDED_BY(mu_);
  bool reading_ ABSL_GUARDED_BY(mu_) = false;
  int starting_reads_ ABSL_GUARDED_BY(mu_) = 0;  // StartRead decided, not yet called
  bool reads_done_ ABSL_GUARDED_BY(mu_) = false;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool finishing_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status final_status_ ABSL_GUARDED_BY(mu_);
  int inflight_ ABSL_GUARDED_BY(mu_) = 0;
};

// ---- Accumulate -------------------------------------------------------------------------

// The options that every batch of one Accumulate call must share.
std::string OptionsKey(const v1::EvaluateRequest& r) {
  v1::EvaluateRequest k;
  if (r.has_bce_with_logits()) {
    *k.mutable_bce_with_logits() = r.bce_with_logits();
    k.mutable_bce_with_logits()->clear_pos_weight();
  }
  if (r.has_sigmoid_focal_loss()) *k.mutable_sigmoid_focal_loss() = r.sigmoid_focal_loss();
  k.set_reduction(r.reduction() == v1::REDUCTION_UNSPECIFIED ? v1::REDUCTION_MEAN
                                                             : r.reduction());
  std::string out;
  k.SerializeToString(&out);
  return out;
}

class AccumulateReactor final : public grpc::ServerReadReactor<grpc::ByteBuffer> {
 public:
  AccumulateReactor(Core* core, grpc::CallbackServerContext* context, grpc::ByteBuffer* reply)
      : core_(core),
        context_(context),
        reply_(reply),
        start_ns_(absl::GetCurrentTimeNanos()),
        control_(context, context->deadline()) {
    core_->CallStarted();
    Act actions;
    {
      absl::MutexLock lock(&mu_);
      if (absl::Status s = core_->Admit(*context_); !s.ok()) {
        RequestFinish(s, &actions);
      } else {
        NextRead(&actions);
      }
    }
    if (actions.any()) Run(actions);
  }

  void OnReadDone(bool ok) override {
    Act actions;
    {
      absl::MutexLock lock(&mu_);
      reading_ = false;
      if (!ok || finishing_) {
        reads_done_ = true;
        MaybeFinish(&actions);
      } else {
        Accept(&actions);
      }
    }
    if (actions.any()) Run(actions);
  }

  void OnCancel() override {
    control_.Cancel();
    Act actions;
    {
      absl::MutexLock lock(&mu_);
      RequestFinish(absl::CancelledError("the call was cancelled"), &actions);
    }
    if (actions.any()) Run(actions);
  }

  void OnDone() override {
    core_->CallEnded();
    delete this;
  }

 private:
  using Act = Actions;
  // A parsed, validated batch and the memory it holds until its values are added.
  struct Batch {
    std::unique_ptr<ReceivedRequest> request;
    std::shared_ptr<EvaluatePlan> plan;
    std::unique_ptr<Reservation> reservation;
  };

  void Run(const Act& a) {
    if (a.read) {
      StartRead(a.read);
      Act after;
      {
        absl::MutexLock lock(&mu_);
        --starting_reads_;
        if (finishing_) RequestFinish(final_status_, &after);
      }
      if (after.finish) Finish(after.status);
    }
    if (a.finish) Finish(a.status);  // last: `this` may be gone afterwards
  }

  void NextRead(Act* a) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (reading_ || reads_done_ || finishing_ || stash_.request) return;
    reading_ = true;
    ++starting_reads_;
    pending_ = grpc::ByteBuffer();
    a->read = &pending_;
  }

  void Fail(const absl::Status& s, Act* a) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    RequestFinish(absl::Status(s.code(), absl::StrCat("batch ", batches_seen_ - 1, ": ",
                                                      s.message())),
                  a);
  }

  void Accept(Act* a) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    ++batches_seen_;
    Batch batch;
    batch.reservation = std::make_unique<Reservation>(&core_->memory());
    batch.request = std::make_unique<ReceivedRequest>();
    {
      grpc::ByteBuffer received;
      received.Swap(&pending_);
      absl::Status admitted =
          batch.reservation->Add(MessageBytes(received), "the Accumulate batch");
      if (admitted.ok()) {
        admitted = ParseEvaluateRequest(&received, &core_->pool(), batch.reservation.get(),
                                        batch.request.get());
      }
      if (!admitted.ok()) return Fail(admitted, a);
    }
    const v1::EvaluateRequest& r = batch.request->message();
    const v1::Reduction red = r.reduction() == v1::REDUCTION_UNSPECIFIED ? v1::REDUCTION_MEAN
                                                                         : r.reduction();
    if (red != v1::REDUCTION_SUM && red != v1::REDUCTION_MEAN) {
      return Fail(absl::InvalidArgumentError(absl::StrCat(
                      "Accumulate needs reduction SUM or MEAN, got ",
                      v1::Reduction_Name(red).empty() ? std::to_string(red)
                                                      : v1::Reduction_Name(red))),
                  a);
    }
    if (r.gradients().logits() || r.gradients().targets()) {
      return Fail(absl::InvalidArgumentError("Accumulate returns no gradients; unset gradients"),
                  a);
    }
    if (r.has_whole()) {
      return Fail(absl::InvalidArgumentError(
                      "whole is not allowed in Accumulate (its batches are parts of one whole)"),
                  a);
    }
    if (r.has_outputs()) {
      return Fail(absl::InvalidArgumentError(
                      "outputs is not allowed in Accumulate (it returns no per-element outputs)"),
                  a);
    }
    const std::string key = OptionsKey(r);
    if (batches_seen_ == 1) {
      key_ = key;
      reduction_ = red;
      normalize_ = r.has_bce_with_logits() && r.bce_with_logits().normalize();
      has_ignore_index_ = r.has_bce_with_logits() && r.bce_with_logits().has_ignore_index();
    } else if (key != key_) {
      return Fail(absl::InvalidArgumentError(
                      "loss options and reduction must be the same in every batch of a call"),
                  a);
    }
    auto plan = core_->Prepare(r, batch.request->views());
    if (!plan.ok()) return Fail(plan.status(), a);
    batch.plan = std::make_shared<EvaluatePlan>(*std::move(plan));
    batch.plan->args.reduction = kernels::Reduction::kNone;  // values are reduced here
    batch.plan->args.normalize = false;
    batch.plan->grad_logits = batch.plan->grad_targets = false;
    if (absl::Status s = SizeOutputs(core_->config().limits, batch.plan.get()); !s.ok()) {
      return Fail(s, a);
    }
    // The per-element losses, and their values as doubles for the exact block reduction.
    if (absl::Status s = batch.reservation->Add(
            batch.plan->reply_bytes + 8 * batch.plan->args.numel, "the batch's loss values");
        !s.ok()) {
      return Fail(s, a);
    }
    if (computing_) {
      stash_ = std::move(batch);  // reading resumes when it starts computing
      return;
    }
    Submit(std::move(batch), a);
    NextRead(a);
  }

  void Submit(Batch batch, Act* a) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    computing_ = true;
    auto shared = std::make_shared<Batch>(std::move(batch));
    const absl::Status queued = core_->Submit([this, shared] { Computed(*shared); });
    if (!queued.ok()) {
      computing_ = false;
      RequestFinish(queued, a);
    }
  }

  // On a worker thread: evaluates one batch and adds its values to the running sum, in order.
  void Computed(const Batch& batch) {
    const kernels::BceArgs& args = batch.plan->args;
    std::vector<double> values(static_cast<size_t>(args.numel));
    ComputeResult scratch;
    const absl::Status s =
        core_->Compute(control_, *batch.plan, start_ns_, &scratch, values.data());
    scratch.loss.block.Reset();  // only the values are needed
    int64_t kept = args.numel;
    if (s.ok() && normalize_ && args.has_ignore_index) {
      for (int64_t i = 0; i < args.numel; ++i) {
        kept -= kernels::LoadAsDouble(args.targets_dtype, args.targets, i) == args.ignore_index;
      }
    }
    Act actions;
    {
      absl::MutexLock lock(&mu_);
      computing_ = false;
      if (!s.ok()) {
        RequestFinish(s, &actions);
      } else {
        sum_.Add(values.data(), args.numel);
        kept_ += kept;
        ++batches_done_;
        device_ = scratch.device;
        compute_ns_ += scratch.timing.compute_ns();
        core_->metrics().AddBytes("Accumulate", batch.request->payload_bytes(), 0);
        if (stash_.request) {
          Batch next = std::move(stash_);
          stash_ = Batch();
          Submit(std::move(next), &actions);
          NextRead(&actions);
        }
        MaybeFinish(&actions);
      }
    }
    if (actions.any()) Run(actions);
  }

  void MaybeFinish(Act* a) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (finishing_) {
      RequestFinish(final_status_, a);
    } else if (reads_done_ && !computing_ && !stash_.request) {
      const int64_t n = sum_.count();
      double loss = sum_.Value();
      if (normalize_) loss /= kept_ > 0 ? static_cast<double>(kept_) : 1.0;
      if (reduction_ == v1::REDUCTION_MEAN) loss /= static_cast<double>(n);
      v1::AccumulateResponse response;
      response.set_loss(loss);
      response.set_num_elements(n);
      response.set_num_kept(normalize_ && has_ignore_index_ ? kept_ : n);
      response.set_num_batches(batches_done_);
      response.set_reduction(reduction_);
      response.set_device(device_);
      response.mutable_timing()->set_compute_ns(compute_ns_);
      response.mutable_timing()->set_total_ns(absl::GetCurrentTimeNanos() - start_ns_);
      RequestFinish(SerializeMessage(response, reply_), a);
    }
  }

  void RequestFinish(const absl::Status& s, Act* a) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!finishing_) {
      finishing_ = true;
      final_status_ = s;
    }
    if (finished_ || computing_ || starting_reads_ > 0) return;
    finished_ = true;
    const double total = (absl::GetCurrentTimeNanos() - start_ns_) * 1e-9;
    if (final_status_.ok()) {
      core_->metrics().RecordCall("Accumulate", "OK", DeviceLabel(device_), -1,
                                  compute_ns_ * 1e-9, total);
    } else {
      LogFailure("Accumulate", *context_, "", final_status_);
      core_->metrics().RecordCall("Accumulate",
                                  absl::StatusCodeToString(final_status_.code()), "none", -1, -1,
                                  total);
    }
    a->finish = true;
    a->status = ToGrpcStatus(final_status_);
  }

  Core* const core_;
  grpc::CallbackServerContext* const context_;
  grpc::ByteBuffer* const reply_;
  const int64_t start_ns_;
  CallControl control_;
  absl::Mutex mu_;
  grpc::ByteBuffer pending_ ABSL_GUARDED_BY(mu_);
  Batch stash_ ABSL_GUARDED_BY(mu_);  // validated, waiting for the previous batch
  kernels::BlockSum sum_ ABSL_GUARDED_BY(mu_);
  std::string key_ ABSL_GUARDED_BY(mu_);
  v1::Reduction reduction_ ABSL_GUARDED_BY(mu_) = v1::REDUCTION_MEAN;
  bool normalize_ ABSL_GUARDED_BY(mu_) = false;
  bool has_ignore_index_ ABSL_GUARDED_BY(mu_) = false;
  int64_t kept_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t batches_seen_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t batches_done_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t compute_ns_ ABSL_GUARDED_BY(mu_) = 0;
  v1::Device device_ ABSL_GUARDED_BY(mu_) = v1::DEVICE_CPU;
  bool reading_ ABSL_GUARDED_BY(mu_) = false;
  int starting_reads_ ABSL_GUARDED_BY(mu_) = 0;  // StartRead decided, not yet called
  bool reads_done_ ABSL_GUARDED_BY(mu_) = false;
  bool computing_ ABSL_GUARDED_BY(mu_) = false;
  bool finishing_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status final_status_ ABSL_GUARDED_BY(mu_);
};

}  // namespace

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* NewEvaluateStream(
    Core* core, grpc::CallbackServerContext* context) {
  return new EvaluateStreamReactor(core, context);
}

grpc::ServerReadReactor<grpc::ByteBuffer>* NewAccumulate(Core* core,
                                                         grpc::CallbackServerContext* context,
                                                         grpc::ByteBuffer* reply) {
  return new AccumulateReactor(core, context, reply);
}

}  // namespace lossd::server
