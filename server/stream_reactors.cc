// The reactors of the streaming calls, EvaluateStream and Accumulate (docs/design.md section 1,
// "Streaming calls"), and the partial state of a sliced Accumulate (service.h). Both reactors
// are built on StreamCall (stream_call.h), which holds their common reading, cancellation and
// finishing rules; each batch walks forward through admission (once per call), parse,
// Planner::Prepare, Executor::Compute (on a worker, or inline when small), encode and its
// CallRecord.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <deque>
#include <limits>
#include <memory>
#include <numeric>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "server/grpc_status.h"
#include "lossd/kernels/accumulator.h"
#include "lossd/kernels/exact_sum.h"
#include "server/memory.h"
#include "server/message_io.h"
#include "server/service.h"
#include "server/stream_call.h"
#include "server/wire.h"

namespace lossd::server {

namespace {

// The two reductions an Accumulate call may have, in the wire's and the kernels' enums.
v1::Reduction ToV1Reduction(kernels::Reduction r) {
  return r == kernels::Reduction::kSum ? v1::REDUCTION_SUM : v1::REDUCTION_MEAN;
}
kernels::Reduction ToKernelsReduction(v1::Reduction r) {
  return r == v1::REDUCTION_SUM ? kernels::Reduction::kSum : kernels::Reduction::kMean;
}

// ---- EvaluateStream ---------------------------------------------------------------------

// Independent batches pipelined on one call: up to --stream_window batches are computed or
// waiting at once; replies are written in request order, a failed batch's as a BatchError.
class EvaluateStreamReactor final
    : public StreamCall<grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>> {
 public:
  EvaluateStreamReactor(Core* core, grpc::CallbackServerContext* context)
      : StreamCall(core, context) {
    const absl::Status admitted = core_->admission().Admit(*context_);
    if (!admitted.ok()) {
      CallRecord(&core_->metrics(), "EvaluateStream", context_, start_ns_).Fail(admitted);
    }
    StartFirstRead(admitted);
  }

  // The oldest reply went out: the next one may follow, and the window has room again.
  void OnWriteDone(bool ok) override {
    Actions actions;
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

 private:
  struct Slot {
    Slot(Core* core, const grpc::CallbackServerContext* context, int64_t start)
        : start_ns(start),
          reservation(&core->executor().memory()),
          record(&core->metrics(), "EvaluateStream", context, start) {}
    ReceivedRequest request;
    std::string request_id;
    std::unique_ptr<EvaluatePlan> plan;  // from Accept until its computation starts
    ComputeResult result;
    grpc::ByteBuffer out;  // the serialized reply, once ready
    bool ready = false;
    const int64_t start_ns;
    Reservation reservation;  // this batch's bytes, until its reply is written
    CallRecord record;        // each batch is counted as one EvaluateStream call
  };

  // One batch: parsed, planned and computed (queued, or inline when small); then the next read
  // and the oldest reply, if ready.
  void OnMessage(grpc::ByteBuffer* message, Actions* a) override
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    Accept(message, a);
    NextRead(a);
    NextWrite(a);
  }
  bool ReadAllowed() const override ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return static_cast<int>(slots_.size()) < core_->config().stream_window;
  }
  bool Busy() const override ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return inflight_ > 0 || writing_;
  }
  bool Answered() const override ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return slots_.empty() && !writing_;
  }
  absl::Status FinalReply() override ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return absl::OkStatus();
  }

  // Writes the oldest reply once it is ready (replies leave in request order).
  void NextWrite(Actions* a) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (writing_ || finishing() || slots_.empty() || !slots_.front()->ready) return;
    writing_ = true;
    a->write = &slots_.front()->out;
  }

  void SetError(Slot* slot, const absl::Status& s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    slot->record.Fail(s, slot->request_id);
    slot->reservation.Reset();
    slot->request.Clear();
    slot->plan.reset();
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
  void Accept(grpc::ByteBuffer* received, Actions* a) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    auto slot = std::make_unique<Slot>(core_, context_, absl::GetCurrentTimeNanos());
    Slot* raw = slot.get();
    slots_.push_back(std::move(slot));
    absl::Status admitted = raw->reservation.Add(MessageBytes(*received), "the stream's batch");
    if (admitted.ok()) {
      admitted = ParseEvaluateRequest(received, &core_->executor().pool(), &raw->reservation,
                                      &raw->request);
    }
    received->Clear();
    if (!admitted.ok()) {
      SetError(raw, admitted);
      return;
    }
    raw->request_id = raw->request.message().request_id();
    auto plan = core_->planner().Prepare(raw->request.message(), raw->request.views());
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
    raw->plan = std::make_unique<EvaluatePlan>(*std::move(plan));
    if (core_->executor().RunsInline(raw->plan->args.numel)) {
      // Small, like a small unary call: computed on this thread once the mutex is released
      // (Run), cheaper than a hop to a worker.
      a->then = [this, raw] { Computed(raw); };
      return;
    }
    const absl::Status queued = core_->executor().Submit([this, raw] { Computed(raw); });
    if (!queued.ok()) {
      --inflight_;
      SetError(raw, queued);
    }
  }

  // On a worker thread, or on the gRPC thread for a small batch (Run).
  void Computed(Slot* slot) {
    // Held until this computation is over, like the spans it uses.
    const std::unique_ptr<EvaluatePlan> plan = std::move(slot->plan);
    absl::Status s = core_->executor().Compute(control_, *plan, slot->start_ns, &slot->result);
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
    Actions actions;
    {
      absl::MutexLock lock(&mu_);
      --inflight_;
      if (s.ok()) {
        slot->record.Ok(device, timing, received, sent);
        slot->ready = true;
      } else {
        SetError(slot, s);
      }
      NextWrite(&actions);
      MaybeFinish(&actions);
    }
    if (actions.any()) Run(actions);
  }

  std::deque<std::unique_ptr<Slot>> slots_ ABSL_GUARDED_BY(mu_);  // request order
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  int inflight_ ABSL_GUARDED_BY(mu_) = 0;  // batches queued or computing
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

// The one offset allowed for a slice: far below overflow of offset + elements.
constexpr int64_t kMaxSliceOffset = int64_t{1} << 62;

// A dataset-level SUM or MEAN over the call's batches: computed one after another (the next
// batch is read and validated while the previous one computes, then waits in `stash_`), their
// per-element values added in order to one kernels::Accumulator.
class AccumulateReactor final : public StreamCall<grpc::ServerReadReactor<grpc::ByteBuffer>> {
 public:
  AccumulateReactor(Core* core, grpc::CallbackServerContext* context, grpc::ByteBuffer* reply)
      : StreamCall(core, context),
        reply_(reply),
        record_(&core->metrics(), "Accumulate", context, start_ns_) {
    StartFirstRead(core_->admission().Admit(*context_));
  }

 private:
  // A parsed, validated batch and the memory it holds until its values are added.
  struct Batch {
    std::unique_ptr<ReceivedRequest> request;
    std::shared_ptr<EvaluatePlan> plan;
    std::unique_ptr<Reservation> reservation;
    bool want_kept = false;  // the backend's kept count is needed (the rule counts it)
  };

  // One batch: checked against the first; computed now, or stashed while the previous one
  // computes (reading then waits).
  void OnMessage(grpc::ByteBuffer* message, Actions* a) override
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    Accept(message, a);
  }
  bool ReadAllowed() const override ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return !stash_.request;
  }
  bool Busy() const override ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return computing_; }
  bool Answered() const override ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return !computing_ && !stash_.request;
  }
  // The reduced loss of every batch, serialized into the reply.
  absl::Status FinalReply() override ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    PartialState state;
    state.fingerprint = fingerprint_;
    state.batches = batches_done_;
    state.acc = acc_;
    v1::AccumulateResponse response;
    SetReducedLoss(state, &response);
    if (slice_) response.set_partial_state(EncodePartialState(state));
    response.set_device(device_);
    response.mutable_timing()->set_compute_ns(compute_ns_);
    response.mutable_timing()->set_total_ns(absl::GetCurrentTimeNanos() - start_ns_);
    return SerializeMessage(response, reply_);
  }
  // The call is recorded once, when it finishes.
  void Finishing(const absl::Status& status) override ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (status.ok()) {
      v1::Timing timing;
      timing.set_compute_ns(compute_ns_);
      record_.Ok(device_, timing);
    } else {
      record_.Fail(status);
    }
  }

  void Fail(const absl::Status& s, Actions* a) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    RequestFinish(absl::Status(s.code(), absl::StrCat("batch ", batches_seen_ - 1, ": ",
                                                      s.message())),
                  a);
  }

  void Accept(grpc::ByteBuffer* received, Actions* a) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    ++batches_seen_;
    Batch batch;
    batch.reservation = std::make_unique<Reservation>(&core_->executor().memory());
    batch.request = std::make_unique<ReceivedRequest>();
    absl::Status admitted =
        batch.reservation->Add(MessageBytes(*received), "the Accumulate batch");
    if (admitted.ok()) {
      admitted = ParseEvaluateRequest(received, &core_->executor().pool(),
                                      batch.reservation.get(), batch.request.get());
    }
    received->Clear();
    if (!admitted.ok()) return Fail(admitted, a);
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
    // Checked here, before any batch is computed, like the other options Accumulate refuses
    // (the correctly rounded path has no per-element values to accumulate).
    if (r.precision() == v1::PRECISION_CORRECTLY_ROUNDED) {
      return Fail(absl::InvalidArgumentError(
                      "precision PRECISION_CORRECTLY_ROUNDED is not offered for Accumulate; use "
                      "Evaluate with reduction SUM or MEAN"),
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
      kernels::ReductionRule rule;
      rule.reduction = ToKernelsReduction(red);
      rule.normalize = r.has_bce_with_logits() && r.bce_with_logits().normalize();
      rule.has_ignore_index = r.has_bce_with_logits() && r.bce_with_logits().has_ignore_index();
      acc_ = kernels::Accumulator(rule);
      if (r.has_accumulate_slice()) {
        const int64_t offset = r.accumulate_slice().element_offset();
        if (offset < 0 || offset >= kMaxSliceOffset) {
          return Fail(absl::InvalidArgumentError(absl::StrCat(
                          "accumulate_slice.element_offset must be in [0, 2^62), got ",
                          offset)),
                      a);
        }
        slice_ = true;
        slice_offset_ = offset;
        fingerprint_ = OptionsFingerprint(r);
        acc_ = kernels::Accumulator(rule, offset);
      }
    } else if (key != key_) {
      return Fail(absl::InvalidArgumentError(
                      "loss options and reduction must be the same in every batch of a call"),
                  a);
    } else if (r.has_accumulate_slice() &&
               (!slice_ || r.accumulate_slice().element_offset() != slice_offset_)) {
      return Fail(absl::InvalidArgumentError(absl::StrCat(
                      "accumulate_slice.element_offset ", r.accumulate_slice().element_offset(),
                      " differs from the first batch's (",
                      slice_ ? absl::StrCat(slice_offset_) : std::string("unset"),
                      "); set it in the first batch only, or the same in every batch")),
                  a);
    }
    auto plan = core_->planner().Prepare(r, batch.request->views());
    if (!plan.ok()) return Fail(plan.status(), a);
    batch.plan = std::make_shared<EvaluatePlan>(*std::move(plan));
    batch.plan->args.reduction = kernels::Reduction::kNone;  // values are reduced here
    batch.plan->args.normalize = false;
    batch.plan->grad_logits = batch.plan->grad_targets = false;
    batch.want_kept = acc_.rule().counts_kept();
    if (absl::Status s = SizeOutputs(core_->planner().limits(), batch.plan.get()); !s.ok()) {
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

  void Submit(Batch batch, Actions* a) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    computing_ = true;
    auto shared = std::make_shared<Batch>(std::move(batch));
    const absl::Status queued = core_->executor().Submit([this, shared] { Computed(*shared); });
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
    int64_t kept = 0;  // the backend's count, when the rule needs it (Accumulator::Add)
    const absl::Status s =
        core_->executor().Compute(control_, *batch.plan, start_ns_, &scratch, values.data(),
                                  batch.want_kept ? &kept : nullptr);
    scratch.loss.block.Reset();  // only the values are needed
    Actions actions;
    {
      absl::MutexLock lock(&mu_);
      computing_ = false;
      if (!s.ok()) {
        RequestFinish(s, &actions);
      } else {
        acc_.Add(values.data(), args.numel, kept);
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

  grpc::ByteBuffer* const reply_;
  Batch stash_ ABSL_GUARDED_BY(mu_);  // validated, waiting for the previous batch
  // The loss reduced so far, and its rule (set from the first batch).
  kernels::Accumulator acc_ ABSL_GUARDED_BY(mu_);
  std::string key_ ABSL_GUARDED_BY(mu_);
  bool slice_ ABSL_GUARDED_BY(mu_) = false;  // accumulate_slice: reply the partial state
  int64_t slice_offset_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t fingerprint_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t batches_seen_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t batches_done_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t compute_ns_ ABSL_GUARDED_BY(mu_) = 0;
  CallRecord record_ ABSL_GUARDED_BY(mu_);
  v1::Device device_ ABSL_GUARDED_BY(mu_) = v1::DEVICE_CPU;
  bool computing_ ABSL_GUARDED_BY(mu_) = false;
};

// Little-endian fields of the partial state's header.
void PutU32(uint32_t v, std::string* out) {
  for (int i = 0; i < 4; ++i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
void PutU64(uint64_t v, std::string* out) {
  for (int i = 0; i < 8; ++i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
uint32_t GetU32(const char* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) {
    v |= static_cast<uint32_t>(static_cast<unsigned char>(p[i])) << (8 * i);
  }
  return v;
}
uint64_t GetU64(const char* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) {
    v |= static_cast<uint64_t>(static_cast<unsigned char>(p[i])) << (8 * i);
  }
  return v;
}

constexpr char kStateMagic[4] = {'L', 'D', 'P', 'S'};
constexpr uint32_t kFlagNormalize = 1;
constexpr uint32_t kFlagIgnoreIndex = 2;

std::string ReductionText(v1::Reduction r) {
  const std::string& name = v1::Reduction_Name(r);
  return name.empty() ? std::to_string(static_cast<int>(r)) : name;
}

}  // namespace

uint64_t OptionsFingerprint(const v1::EvaluateRequest& request) {
  uint64_t h = 14695981039346656037ull;  // FNV-1a 64
  for (unsigned char c : OptionsKey(request)) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

std::string EncodePartialState(const PartialState& state) {
  std::string out;
  out.append(kStateMagic, sizeof(kStateMagic));
  const kernels::ReductionRule& rule = state.acc.rule();
  PutU32(kPartialStateVersion, &out);
  PutU32(static_cast<uint32_t>(ToV1Reduction(rule.reduction)), &out);
  PutU32((rule.normalize ? kFlagNormalize : 0) | (rule.has_ignore_index ? kFlagIgnoreIndex : 0),
         &out);
  PutU64(state.fingerprint, &out);
  PutU64(static_cast<uint64_t>(state.acc.kept()), &out);
  PutU64(static_cast<uint64_t>(state.batches), &out);
  state.acc.sum().Serialize(&out);
  return out;
}

absl::StatusOr<PartialState> DecodePartialState(std::string_view bytes) {
  if (bytes.size() < kPartialStateHeaderBytes) {
    return absl::InvalidArgumentError(absl::StrCat("has ", bytes.size(),
                                                   " bytes, too short for a partial state"));
  }
  const char* p = bytes.data();
  if (std::memcmp(p, kStateMagic, sizeof(kStateMagic)) != 0) {
    return absl::InvalidArgumentError("is not a partial state (no \"LDPS\" magic)");
  }
  const uint32_t version = GetU32(p + 4);
  if (version != kPartialStateVersion) {
    return absl::InvalidArgumentError(absl::StrCat("has format version ", version,
                                                   "; this server reads version ",
                                                   kPartialStateVersion));
  }
  PartialState s;
  kernels::ReductionRule rule;
  const uint32_t reduction = GetU32(p + 8);
  if (reduction != v1::REDUCTION_MEAN && reduction != v1::REDUCTION_SUM) {
    return absl::InvalidArgumentError(
        absl::StrCat("has reduction ", reduction, "; expected MEAN (2) or SUM (3)"));
  }
  rule.reduction = ToKernelsReduction(static_cast<v1::Reduction>(reduction));
  const uint32_t flags = GetU32(p + 12);
  if ((flags & ~(kFlagNormalize | kFlagIgnoreIndex)) != 0) {
    return absl::InvalidArgumentError(absl::StrCat("has unknown flags ", flags));
  }
  rule.normalize = (flags & kFlagNormalize) != 0;
  rule.has_ignore_index = (flags & kFlagIgnoreIndex) != 0;
  s.fingerprint = GetU64(p + 16);
  const int64_t kept = static_cast<int64_t>(GetU64(p + 24));
  s.batches = static_cast<int64_t>(GetU64(p + 32));
  absl::StatusOr<kernels::BlockSum> sum =
      kernels::BlockSum::Deserialize(bytes.substr(kPartialStateHeaderBytes));
  if (!sum.ok()) return absl::InvalidArgumentError(sum.status().message());
  if (kept < 0 || kept > sum->count() || s.batches < 0) {
    return absl::InvalidArgumentError(absl::StrCat("has ", kept, " kept elements and ",
                                                   s.batches, " batches for ", sum->count(),
                                                   " elements"));
  }
  absl::StatusOr<kernels::Accumulator> acc =
      kernels::Accumulator::FromState(rule, *std::move(sum), kept);
  if (!acc.ok()) return absl::InvalidArgumentError(acc.status().message());
  s.acc = *std::move(acc);
  return s;
}

absl::StatusOr<PartialState> MergePartialStates(std::vector<PartialState> states) {
  if (states.empty()) return absl::InvalidArgumentError("partial_states is empty");
  const PartialState& first = states[0];
  for (size_t i = 1; i < states.size(); ++i) {
    const PartialState& s = states[i];
    const kernels::ReductionRule& rule = s.acc.rule();
    const kernels::ReductionRule& rule0 = first.acc.rule();
    if (rule.reduction != rule0.reduction) {
      return absl::InvalidArgumentError(absl::StrCat(
          "partial_states[", i, "] has reduction ", ReductionText(ToV1Reduction(rule.reduction)),
          ", partial_states[0] ", ReductionText(ToV1Reduction(rule0.reduction))));
    }
    if (rule != rule0 || s.fingerprint != first.fingerprint) {
      return absl::InvalidArgumentError(absl::StrCat(
          "partial_states[", i, "] has loss options (fingerprint ", absl::Hex(s.fingerprint),
          ") that differ from partial_states[0]'s (", absl::Hex(first.fingerprint), ")"));
    }
  }
  std::vector<size_t> order(states.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    const kernels::BlockSum& x = states[a].acc.sum();
    const kernels::BlockSum& y = states[b].acc.sum();
    return x.offset() != y.offset() ? x.offset() < y.offset() : x.count() < y.count();
  });
  PartialState out = std::move(states[order[0]]);
  for (size_t k = 1; k < order.size(); ++k) {
    const size_t i = order[k];
    const PartialState& s = states[i];
    const kernels::BlockSum& sum = s.acc.sum();
    const int64_t end = out.acc.sum().offset() + out.acc.sum().count();
    if (sum.offset() != end) {
      return absl::InvalidArgumentError(absl::StrCat(
          "partial_states[", i, "] covers elements [", sum.offset(), ", ",
          sum.offset() + sum.count(), "), but the states before it end at ", end,
          sum.offset() > end ? " (a gap)" : " (an overlap)"));
    }
    if (absl::Status st = out.acc.Append(s.acc); !st.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("partial_states[", i, "]: ", st.message()));
    }
    out.batches += s.batches;
  }
  return out;
}

void SetReducedLoss(const PartialState& state, v1::AccumulateResponse* response) {
  // The reduction rule is the Accumulator's (accumulator.h; docs/design.md section 3).
  response->set_loss(state.acc.Value());
  response->set_num_elements(state.acc.num_elements());
  response->set_num_kept(state.acc.num_kept());
  response->set_num_batches(state.batches);
  response->set_reduction(ToV1Reduction(state.acc.rule().reduction));
}

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
