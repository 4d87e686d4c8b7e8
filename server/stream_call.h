#ifndef LOSSD_SERVER_STREAM_CALL_H_
#define LOSSD_SERVER_STREAM_CALL_H_

// What both streaming reactors (stream_reactors.cc: EvaluateStream, Accumulate) share: the
// reading of request messages one at a time, cancellation, and the one rule by which a
// streaming call finishes (docs/design.md section 1, "Streaming calls").
//
// A reactor built on StreamCall reads like gRPC's route_guide callback reactors: its
// constructor calls StartFirstRead (admission, then the first StartRead), OnReadDone hands
// each message to OnMessage, the reactor's own OnWriteDone (EvaluateStream) continues, and
// OnDone deletes it.
//
// Concurrency: decisions are made under mu_ and collected as Actions, which Run carries out
// after mu_ is released (Finish last: the reactor may be deleted right after it). Finish is
// called only when no computation or write of the call is outstanding (Busy) and no StartRead
// decided under mu_ is still to be called (`starting_reads_`: a concurrent OnCancel must not
// finish, and so delete, the reactor between that decision and the call), so the call's
// context outlives every use of it.
//
// With nothing to do, a caller must not touch the reactor at all once mu_ is released: another
// thread may finish and delete it at any moment (even a call of a member function that does
// nothing is then undefined; UBSan's vptr check reports it). Hence `if (a.any()) Run(a);`.

#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <functional>
#include <type_traits>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "server/core.h"
#include "server/grpc_status.h"

namespace lossd::server {

// What a reactor does once its mutex is released. An action that is pending keeps the reactor
// alive until it is taken (a write and a read decided hold off Finish).
struct StreamActions {
  grpc::ByteBuffer* read = nullptr;
  const grpc::ByteBuffer* write = nullptr;
  bool finish = false;
  grpc::Status status;
  // Work this thread does once the other actions are taken, last: a small batch computed
  // inline. It holds off Finish itself (like a queued computation) and may finish the call.
  std::function<void()> then;
  bool any() const { return read != nullptr || write != nullptr || finish || then != nullptr; }
};

// `GrpcReactor`: grpc::ServerBidiReactor<ByteBuffer, ByteBuffer> or
// grpc::ServerReadReactor<ByteBuffer>.
template <class GrpcReactor>
class StreamCall : public GrpcReactor {
 public:
  // Handles one message: a finished read hands it to OnMessage; the end of the client's
  // messages (or a call already finishing) may finish the call.
  void OnReadDone(bool ok) final {
    StreamActions actions;
    {
      absl::MutexLock lock(&mu_);
      reading_ = false;
      if (!ok || finishing_) {
        reads_done_ = true;
        MaybeFinish(&actions);
      } else {
        grpc::ByteBuffer message;
        message.Swap(&pending_);
        OnMessage(&message, &actions);
      }
    }
    if (actions.any()) Run(actions);
  }

  void OnCancel() final {
    control_.Cancel();
    StreamActions actions;
    {
      absl::MutexLock lock(&mu_);
      RequestFinish(absl::CancelledError("the call was cancelled"), &actions);
    }
    if (actions.any()) Run(actions);
  }

  void OnDone() final {
    core_->admission().CallEnded();
    delete this;
  }

 protected:
  using Actions = StreamActions;

  StreamCall(Core* core, grpc::CallbackServerContext* context)
      : core_(core),
        context_(context),
        start_ns_(absl::GetCurrentTimeNanos()),
        control_(context, context->deadline()) {
    core_->admission().CallStarted();
  }
  ~StreamCall() override = default;

  // Called at the end of the subclass's constructor with the call's admission: the first
  // StartRead, or Finish with the refusal.
  void StartFirstRead(const absl::Status& admitted) {
    Actions actions;
    {
      absl::MutexLock lock(&mu_);
      if (!admitted.ok()) {
        RequestFinish(admitted, &actions);
      } else {
        NextRead(&actions);
      }
    }
    if (actions.any()) Run(actions);
  }

  // ---- what each reactor decides, under mu_ ----
  // Takes one request message (its bytes; the reactor may empty them).
  virtual void OnMessage(grpc::ByteBuffer* message, Actions* a)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) = 0;
  // Another message may be read now (EvaluateStream: its window has room).
  virtual bool ReadAllowed() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) = 0;
  // A computation or write of the call is outstanding: Finish waits for it.
  virtual bool Busy() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) = 0;
  // Every message read has been answered (checked once the reads are done).
  virtual bool Answered() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) = 0;
  // The call's status once every message is answered; writes the final reply, if any.
  virtual absl::Status FinalReply() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) = 0;
  // The call finishes now with `status` (recorded by the reactor, if it records calls).
  virtual void Finishing(const absl::Status& status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    (void)status;
  }

  // ---- the shared gating, under mu_ ----
  // Starts the next read unless one is running, the reads are done, the call is finishing or
  // the reactor does not allow it.
  void NextRead(Actions* a) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (reading_ || reads_done_ || finishing_ || !ReadAllowed()) return;
    reading_ = true;
    ++starting_reads_;
    pending_ = grpc::ByteBuffer();
    a->read = &pending_;
  }

  // Finishes with the final status once the reads are done and every message is answered, or
  // with the status already chosen when the call is finishing.
  void MaybeFinish(Actions* a) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (finishing_) {
      RequestFinish(final_status_, a);
    } else if (reads_done_ && Answered()) {
      RequestFinish(FinalReply(), a);
    }
  }

  // Finishes with `s` (the first status asked for wins) as soon as nothing is outstanding.
  void RequestFinish(const absl::Status& s, Actions* a) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!finishing_) {
      finishing_ = true;
      final_status_ = s;
    }
    if (finished_ || Busy() || starting_reads_ > 0) return;
    finished_ = true;
    Finishing(final_status_);
    a->finish = true;
    a->status = ToGrpcStatus(final_status_);
  }

  // Carries out `a` with mu_ released. `this` may be gone when it returns.
  void Run(const Actions& a) {
    if constexpr (kWrites) {
      if (a.write) this->StartWrite(a.write);
    }
    if (a.read) {
      this->StartRead(a.read);
      Actions after;
      {
        absl::MutexLock lock(&mu_);
        --starting_reads_;
        if (finishing_) RequestFinish(final_status_, &after);
      }
      if (after.finish) this->Finish(after.status);
    }
    // Last: the work may finish the call, after which `this` may be gone. (It holds off
    // Finish until then, so a.finish is never set with it.)
    if (a.then) {
      a.then();
      return;
    }
    if (a.finish) this->Finish(a.status);  // last: `this` may be gone afterwards
  }

  bool finishing() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return finishing_; }

  Core* const core_;
  grpc::CallbackServerContext* const context_;
  const int64_t start_ns_;
  CallControl control_;  // shared by the call's computations
  absl::Mutex mu_;

 private:
  static constexpr bool kWrites =
      std::is_base_of_v<grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>, GrpcReactor>;

  grpc::ByteBuffer pending_ ABSL_GUARDED_BY(mu_);  // the read in progress
  bool reading_ ABSL_GUARDED_BY(mu_) = false;
  int starting_reads_ ABSL_GUARDED_BY(mu_) = 0;  // StartRead decided, not yet called
  bool reads_done_ ABSL_GUARDED_BY(mu_) = false;
  bool finishing_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status final_status_ ABSL_GUARDED_BY(mu_);
};

}  // namespace lossd::server

#endif  // LOSSD_SERVER_STREAM_CALL_H_
