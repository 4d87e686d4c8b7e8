#include "client/loadtest/driver.h"

#include <sched.h>
#include <sys/resource.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <mutex>
#include <optional>
#include <random>
#include <thread>
#include <unordered_set>

#include "absl/strings/str_cat.h"
#include "google/protobuf/io/coded_stream.h"
#include "google/protobuf/wire_format_lite.h"
#include "inference/grpc_predict_v2.pb.h"
#include "lossd/v1/lossd.grpc.pb.h"
#include "client/bench/schedule.h"
#include "client/loadtest/h2_transport.h"
#include "client/loadtest/shm.h"
#include "tools/bench/baseline_services.h"

namespace lossd::loadtest {

namespace {

using Clock = std::chrono::steady_clock;
using lossd::v1::EvaluateRequest;
using lossd::v1::EvaluateResponse;
using lossd::v1::EvaluateStreamResponse;
constexpr int kShards = 16;
constexpr auto kGrace = std::chrono::seconds(10);  // calls in flight past the window's end

int64_t Ns(Clock::duration d) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(d).count();
}

// The CPUs this process may run on (taskset), at least 1.
int UsableCpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return 1;
  return std::max(1, CPU_COUNT(&set));
}

// Reads only the server's timing (field 6) of an EvaluateResponse from its wire bytes, skipping
// the rest; false when the bytes are not a well-formed message.
bool ReadTiming(absl::string_view bytes, lossd::v1::Timing* timing, bool* has_timing) {
  using google::protobuf::internal::WireFormatLite;
  google::protobuf::io::CodedInputStream in(reinterpret_cast<const uint8_t*>(bytes.data()),
                                            static_cast<int>(bytes.size()));
  constexpr uint32_t kTimingTag =
      (lossd::v1::EvaluateResponse::kTimingFieldNumber << 3) | WireFormatLite::WIRETYPE_LENGTH_DELIMITED;
  *has_timing = false;
  for (;;) {
    const uint32_t tag = in.ReadTag();
    if (tag == 0) return in.CurrentPosition() == static_cast<int>(bytes.size());
    if (tag != kTimingTag) {
      if (!WireFormatLite::SkipField(&in, tag)) return false;
      continue;
    }
    int length = 0;
    const void* data = nullptr;
    int available = 0;
    if (!in.ReadVarintSizeAsInt(&length) || !in.GetDirectBufferPointer(&data, &available) ||
        available < length || !timing->ParseFromArray(data, length) || !in.Skip(length)) {
      return false;
    }
    *has_timing = true;
  }
}

double CpuSeconds(bool user) {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  const timeval& t = user ? u.ru_utime : u.ru_stime;
  return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_usec) / 1e6;
}

// What one finished call contributes.
struct Outcome {
  bool measured = false;
  int code = 0;
  bool mismatch = false;
  Clock::time_point scheduled, done;
  int64_t bytes = 0, elements = 0;
  bool has_timing = false;
  lossd::v1::Timing timing;
};

class Engine {
 public:
  Engine(const Endpoint& ep, Service service, const std::vector<RequestKind>& kinds,
         const bench::MixPicker& mix, const LoadPoint& point, const DriverOptions& o)
      : ep_(ep), service_(service), kinds_(kinds), mix_(mix), point_(point), o_(o) {}

  bench::RunStats Run(const std::atomic<bool>* interrupted);

 private:
  class StreamCaller;
  class AccumulateCall;

  // Whether a call scheduled at `at` may start; sets *measured (outside the warm-up).
  bool Admit(Clock::time_point at, bool* measured) {
    if (stop_.load(std::memory_order_relaxed)) return false;
    if (at >= end_) {
      stop_ = true;
      return false;
    }
    *measured = at >= warm_end_;
    if (*measured && o_.requests > 0 && measured_started_.fetch_add(1) >= o_.requests) {
      stop_ = true;
      return false;
    }
    return true;
  }

  int PickKind(std::mt19937_64& rng) {
    return mix_.Pick(std::uniform_real_distribution<double>(0, 1)(rng));
  }

  // Callers of one shard (a unary poller thread; a stream or Accumulate caller) share a lock
  // that no other shard takes.
  void Count(int shard, const Outcome& c) {
    auto& s = shards_[shard % kShards];
    if (c.measured) {
      const int64_t done = Ns(c.done - warm_end_);
      int64_t seen = last_done_ns_.load(std::memory_order_relaxed);
      while (done > seen && !last_done_ns_.compare_exchange_weak(seen, done)) {
      }
      std::lock_guard<std::mutex> lock(s.mu);
      s.series.Record(done, c.mismatch ? 2 : c.code, Ns(c.done - c.scheduled));
      CountLocked(&s, c);
      return;
    }
    std::lock_guard<std::mutex> lock(s.mu);
    CountLocked(&s, c);
  }

  struct Shard;
  void CountLocked(Shard* shard, const Outcome& c) {
    auto& s = *shard;
    if (!c.measured) {
      ++s.stats.warmup_calls;
      return;
    }
    if (c.mismatch) {
      ++s.stats.mismatches;
      return;
    }
    s.stats.Record(c.code, Ns(c.done - c.scheduled));
    if (c.code != 0) return;
    s.stats.ok_bytes += c.bytes;
    s.stats.ok_elements += c.elements;
    if (c.has_timing) {
      s.stats.server_queue.Record(c.timing.queue_ns());
      s.stats.server_compute.Record(c.timing.compute_ns());
      s.stats.server_total.Record(c.timing.total_ns());
    }
  }

  // Checks an OK reply of a lossd kind; returns true when it is wrong.
  bool Mismatch(const RequestKind& kind, const EvaluateResponse& reply) {
    if (!o_.verify || (service_ != Service::kLossd && service_ != Service::kOip)) return false;
    if (kind.expect_failure) {
      Report(absl::StrCat(kind.label, ": the server accepted a request it must refuse"));
      return true;
    }
    const std::string why = VerifyReply(kind, reply);
    if (why.empty()) return false;
    Report(absl::StrCat(kind.label, ": ", why));
    return true;
  }

  void Report(const std::string& mismatch) {
    if (mismatch_reports_.fetch_add(1) < 3) {
      std::fprintf(stderr, "lossd-bench: mismatch: %s\n", mismatch.c_str());
    }
  }

  // Metadata and deadline of one call.
  void Configure(grpc::ClientContext* ctx, const RequestKind* kind) {
    for (const auto& [k, v] : o_.metadata) ctx->AddMetadata(k, v);
    if (o_.deadline > absl::ZeroDuration()) {
      ctx->set_deadline(std::chrono::system_clock::now() + absl::ToChronoNanoseconds(o_.deadline));
    }
    if (kind != nullptr && service_ == Service::kRaw) {
      ctx->AddMetadata(lossd::bench::kReplyBytesKey, absl::StrCat(kind->echo_reply_bytes));
    }
  }
  // Streams and Accumulate calls: configured and listed for CancelAll.
  void Prepare(grpc::ClientContext* ctx, const RequestKind* kind) {
    Configure(ctx, kind);
    std::lock_guard<std::mutex> lock(live_mu_);
    live_.insert(ctx);
  }
  void Forget(grpc::ClientContext* ctx) {
    std::lock_guard<std::mutex> lock(live_mu_);
    live_.erase(ctx);
  }
  void CancelAll() {
    cancel_ = true;
    for (auto& p : h2_pollers_) p->Cancel();
    std::lock_guard<std::mutex> lock(live_mu_);
    for (grpc::ClientContext* ctx : live_) ctx->TryCancel();
  }
  void Enlist() { active_.fetch_add(1, std::memory_order_relaxed); }
  void Retire() {  // one call or caller fewer
    if (active_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      std::lock_guard<std::mutex> lock(done_mu_);
      done_cv_.notify_all();
    }
  }

  // Unary Evaluate (and the baselines' methods, ModelInfer) with gRPC's completion-queue API
  // and the generic stub (docs/perf.md, "Is lossd-bench the bottleneck?"): each poller thread
  // owns a completion queue and handles the calls that end on it, so a call's completion runs
  // on the thread that polled it, with no hop to another thread. A closed-loop caller is one
  // UnaryCall, reused call after call on its poller (caller % pollers); an open-loop arrival
  // is a new UnaryCall started by the sender thread on poller i % pollers. The request is
  // serialized once per kind into a ByteBuffer whose slice every call shares.
  struct UnaryCall {
    std::optional<grpc::ClientContext> ctx;  // a new one per call
    std::unique_ptr<grpc::GenericClientAsyncResponseReader> reader;  // in the call's arena
    grpc::ByteBuffer request;  // --shared_memory only: the slot's request
    grpc::ByteBuffer reply;
    grpc::Status status;
    int kind = 0;
    int caller = 0;
    int stub = 0;
    int slot = -1;  // --shared_memory: the output slot
    bool measured = false;
    Clock::time_point scheduled;
    UnaryCall* prev = nullptr;  // the poller's calls in flight
    UnaryCall* next = nullptr;
  };
  struct Poller {
    int index = 0;
    grpc::CompletionQueue cq;
    std::thread thread;
    std::mutex mu;  // guards the list (the open-loop sender adds to it); uncontended otherwise
    UnaryCall live;  // sentinel of the list of calls in flight
    Poller() { live.prev = live.next = &live; }
  };
  // The bytes a unary call of `kind` sends (its output slot's request with --shared_memory).
  const std::string& RequestBytes(int kind, int slot) const {
    if (o_.shm != nullptr) return o_.shm->Serialized(kind, slot);
    return service_ == Service::kOip ? kinds_[kind].oip_serialized : kinds_[kind].serialized;
  }
  bool StartUnary(UnaryCall* call, Poller* poller, Clock::time_point at, std::mt19937_64& rng);
  void UnaryDone(UnaryCall* call, Poller* poller);
  void ReadReply(int kind, int slot, absl::string_view bytes, Outcome* c);

  // --transport=h2 (h2_transport.h): the same calls over lossd-bench's HTTP/2 client.
  // Connection j (of nchannels_) belongs to poller j % pollers, as its connection j / pollers;
  // a closed-loop caller's calls all go to its connection (shared_channel: connection 0), so
  // its next call starts on the poller thread that saw the last one end; an open-loop arrival
  // i goes to connection i % nchannels_, handed over by the sender thread (Post).
  struct H2Unary : h2::Call {
    int kind = 0;
    int caller = 0;
    int conn = 0;  // of nchannels_
    int slot = -1;
    bool measured = false;
    Clock::time_point scheduled;
  };
  bool StartH2(H2Unary* call, int conn, Clock::time_point at, std::mt19937_64& rng, bool local);
  void H2Done(H2Unary* call, int poller);
  void Poll(Poller* poller);

  // One part of every shard (stats or series), merged.
  template <typename T>
  T Merged(T Shard::*part) {
    T all;
    for (auto& s : shards_) {
      std::lock_guard<std::mutex> lock(s.mu);
      all.Merge(s.*part);
    }
    return all;
  }
  bench::RunStats Collect() { return Merged(&Shard::stats); }
  bench::IntervalSeries Series() { return Merged(&Shard::series); }

  const Endpoint& ep_;
  const Service service_;
  const std::vector<RequestKind>& kinds_;
  const bench::MixPicker& mix_;
  const LoadPoint point_;
  const DriverOptions o_;
  std::string method_;
  std::vector<std::shared_ptr<grpc::Channel>> channels_;
  std::vector<std::unique_ptr<grpc::GenericStub>> generic_;
  std::vector<std::unique_ptr<lossd::v1::LossService::Stub>> typed_;
  std::vector<std::mt19937_64> rngs_;  // one per closed-loop caller
  std::vector<std::unique_ptr<StreamCaller>> open_streams_;  // open-loop EvaluateStream
  std::vector<grpc::ByteBuffer> requests_;                  // unary: one per kind
  std::vector<std::unique_ptr<Poller>> pollers_;            // unary
  std::vector<std::unique_ptr<UnaryCall>> unary_callers_;   // unary closed loop
  int nchannels_ = 1;                                        // channels or h2 connections
  std::vector<std::string> reply_bytes_;                    // h2, raw service: per kind
  std::vector<std::unique_ptr<H2Unary>> h2_callers_;        // h2 closed loop
  std::vector<std::unique_ptr<h2::Poller>> h2_pollers_;     // h2 (stopped before the callers)

  Clock::time_point t0_, warm_end_, end_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> cancel_{false};  // unary pollers cancel their calls in flight
  std::atomic<int64_t> measured_started_{0};
  std::atomic<int64_t> outstanding_{0};
  std::atomic<int64_t> last_done_ns_{-1};
  std::atomic<int> mismatch_reports_{0};
  struct Shard {
    std::mutex mu;
    bench::RunStats stats;
    bench::IntervalSeries series;  // of the measured window, merged at the end (4.5 KiB/interval)
  };
  Shard shards_[kShards];
  std::mutex live_mu_;
  std::unordered_set<grpc::ClientContext*> live_;
  std::mutex done_mu_;
  std::condition_variable done_cv_;
  // Closed loop: callers still going; open loop: sender + calls in flight.
  std::atomic<int> active_{0};
};

bool Engine::StartUnary(UnaryCall* call, Poller* poller, Clock::time_point at,
                        std::mt19937_64& rng) {
  bool measured = false;
  if (!Admit(at, &measured)) return false;
  call->kind = PickKind(rng);
  call->measured = measured;
  call->scheduled = at;
  const grpc::ByteBuffer* request = &requests_[call->kind];
  if (o_.shm != nullptr) {
    // Closed loop: the caller's own slot. Open loop (the sender thread): a free one; there is
    // one, since no more calls than slots are in flight (max_outstanding), but wait if not.
    call->slot = point_.open ? o_.shm->Acquire() : call->caller;
    while (call->slot < 0) {
      std::this_thread::sleep_for(std::chrono::microseconds(50));
      call->slot = o_.shm->Acquire();
    }
    const std::string& bytes = o_.shm->Serialized(call->kind, call->slot);
    grpc::Slice slice(bytes.data(), bytes.size(), grpc::Slice::STATIC_SLICE);
    call->request = grpc::ByteBuffer(&slice, 1);
    request = &call->request;
  }
  call->ctx.emplace();
  Configure(&*call->ctx, &kinds_[call->kind]);
  {
    std::lock_guard<std::mutex> lock(poller->mu);
    call->prev = &poller->live;
    call->next = poller->live.next;
    call->next->prev = call;
    poller->live.next = call;
  }
  outstanding_.fetch_add(1, std::memory_order_relaxed);
  call->reader = generic_[call->stub]->PrepareUnaryCall(&*call->ctx, method_, *request, &poller->cq);
  call->reader->StartCall();
  call->reader->Finish(&call->reply, &call->status, call);
  return true;
}

// What an OK unary reply of `kind` (bytes as received) tells: the server's timing; with
// --verify the whole reply checked (--shared_memory: its outputs read from the call's slot);
// a reply that does not parse counts as a mismatch. ModelInfer replies carry no timing; with
// --verify they are checked as the EvaluateResponse they stand for.
void Engine::ReadReply(int kind_index, int slot, absl::string_view bytes, Outcome* c) {
  const RequestKind& kind = kinds_[kind_index];
  if (service_ == Service::kOip && (o_.parse_replies || o_.verify)) {
    inference::ModelInferResponse reply;
    if (!reply.ParseFromArray(bytes.data(), static_cast<int>(bytes.size()))) {
      c->mismatch = true;
      Report(absl::StrCat(kind.label, ": the reply does not parse"));
    } else if (o_.verify) {
      auto as_lossd = FromOipReply(kind.request, reply);
      if (!as_lossd.ok()) {
        c->mismatch = true;
        Report(absl::StrCat(kind.label, ": ", as_lossd.status().message()));
      } else {
        c->mismatch = Mismatch(kind, *as_lossd);
      }
    }
  } else if (service_ != Service::kOip && service_ != Service::kRaw && o_.verify) {
    EvaluateResponse reply;
    if (!reply.ParseFromArray(bytes.data(), static_cast<int>(bytes.size()))) {
      c->mismatch = true;
      Report(absl::StrCat(kind.label, ": the reply does not parse"));
    } else {
      c->has_timing = reply.has_timing();
      c->timing = reply.timing();
      // --shared_memory: the outputs lie in the call's slot; --verify reads them from there.
      const std::string why =
          o_.shm != nullptr ? o_.shm->Materialize(kind_index, slot, &reply) : std::string();
      if (!why.empty()) {
        c->mismatch = true;
        Report(absl::StrCat(kind.label, ": ", why));
      } else {
        c->mismatch = Mismatch(kind, reply);
      }
    }
  } else if (service_ != Service::kOip && service_ != Service::kRaw && o_.parse_replies) {
    // Without --verify only the server's timing is read from the reply.
    if (!ReadTiming(bytes, &c->timing, &c->has_timing)) {
      c->mismatch = true;
      Report(absl::StrCat(kind.label, ": the reply does not parse"));
    }
  }
}

void Engine::UnaryDone(UnaryCall* call, Poller* poller) {
  Outcome c;
  c.done = Clock::now();
  c.measured = call->measured;
  c.scheduled = call->scheduled;
  c.code = call->status.error_code();
  const RequestKind& kind = kinds_[call->kind];
  c.bytes = static_cast<int64_t>(RequestBytes(call->kind, call->slot).size() +
                                 call->reply.Length());
  c.elements = kind.elements;
  const bool read = service_ == Service::kOip ? o_.parse_replies || o_.verify
                                              : service_ != Service::kRaw &&
                                                    (o_.parse_replies || o_.verify);
  if (c.code == 0 && read) {
    grpc::Slice slice;
    if (!call->reply.TrySingleSlice(&slice).ok() && !call->reply.DumpToSingleSlice(&slice).ok()) {
      c.mismatch = true;
      Report(absl::StrCat(kind.label, ": the reply does not parse"));
    } else {
      ReadReply(call->kind, call->slot,
                absl::string_view(reinterpret_cast<const char*>(slice.begin()), slice.size()), &c);
    }
  }
  {
    std::lock_guard<std::mutex> lock(poller->mu);
    call->prev->next = call->next;
    call->next->prev = call->prev;
  }
  call->reader.reset();
  call->ctx.reset();
  call->reply.Clear();
  call->request.Clear();
  if (o_.shm != nullptr && point_.open) o_.shm->Release(call->slot);
  Count(poller->index, c);
  outstanding_.fetch_sub(1, std::memory_order_relaxed);
  if (point_.open) {
    delete call;
    Retire();
    return;
  }
  // Closed loop: this caller's next call, or its end.
  if (!StartUnary(call, poller, Clock::now(), rngs_[call->caller])) Retire();
}

bool Engine::StartH2(H2Unary* call, int conn, Clock::time_point at, std::mt19937_64& rng,
                     bool local) {
  bool measured = false;
  if (!Admit(at, &measured)) return false;
  call->kind = PickKind(rng);
  call->measured = measured;
  call->scheduled = at;
  call->conn = conn;
  if (o_.shm != nullptr) {
    // As StartUnary: the caller's slot (closed loop) or a free one (open loop).
    call->slot = point_.open ? o_.shm->Acquire() : call->caller;
    while (call->slot < 0) {
      std::this_thread::sleep_for(std::chrono::microseconds(50));
      call->slot = o_.shm->Acquire();
    }
  }
  call->request = RequestBytes(call->kind, call->slot);
  call->extra_value = reply_bytes_.empty() ? absl::string_view() : reply_bytes_[call->kind];
  const int npollers = static_cast<int>(h2_pollers_.size());
  call->connection = conn / npollers;
  outstanding_.fetch_add(1, std::memory_order_relaxed);
  h2::Poller* poller = h2_pollers_[conn % npollers].get();
  if (local) {
    poller->Start(call);
  } else {
    poller->Post(call);
  }
  return true;
}

void Engine::H2Done(H2Unary* call, int poller) {
  Outcome c;
  c.done = Clock::now();
  c.measured = call->measured;
  c.scheduled = call->scheduled;
  c.code = call->code;
  const RequestKind& kind = kinds_[call->kind];
  c.bytes = static_cast<int64_t>(RequestBytes(call->kind, call->slot).size() +
                                 (c.code == 0 ? call->reply.size() : 0));
  c.elements = kind.elements;
  if (c.code == 0) ReadReply(call->kind, call->slot, call->reply, &c);
  if (o_.shm != nullptr && point_.open) o_.shm->Release(call->slot);
  Count(poller, c);
  outstanding_.fetch_sub(1, std::memory_order_relaxed);
  if (point_.open) {
    delete call;
    Retire();
    return;
  }
  // Closed loop: this caller's next call, on this poller thread, or its end.
  if (!StartH2(call, call->conn, Clock::now(), rngs_[call->caller], true)) Retire();
}

// A poller thread: handles the unary calls that end on its queue until the queue is shut down
// (after the last call); once `cancel_` is set it cancels its calls in flight (again every
// 100 ms, for calls the open-loop sender started meanwhile).
void Engine::Poll(Poller* poller) {
  void* tag = nullptr;
  bool ok = false;
  bool cancelled = false;
  for (;;) {
    const auto next = poller->cq.AsyncNext(
        &tag, &ok, std::chrono::system_clock::now() + std::chrono::milliseconds(100));
    if (next == grpc::CompletionQueue::SHUTDOWN) return;
    if (next == grpc::CompletionQueue::GOT_EVENT) UnaryDone(static_cast<UnaryCall*>(tag), poller);
    if (cancel_.load(std::memory_order_relaxed) &&
        (!cancelled || next == grpc::CompletionQueue::TIMEOUT)) {
      cancelled = true;
      std::lock_guard<std::mutex> lock(poller->mu);
      for (UnaryCall* c = poller->live.next; c != &poller->live; c = c->next) c->ctx->TryCancel();
    }
  }
}

// EvaluateStream: one stream per caller with `stream_window` batches in flight; each reply is
// one call, timed from when its batch was queued for writing.
//
// Open loop (`open`): one stream per channel, kept by the engine; the sender thread queues each
// batch at its scheduled time (Enqueue) on stream i % streams, and its latency counts from that
// time, so batches waiting behind a slow stream count their wait. Close() ends the stream once
// its queued batches are written.
class Engine::StreamCaller final
    : public grpc::ClientBidiReactor<EvaluateRequest, EvaluateStreamResponse> {
 public:
  StreamCaller(Engine* e, int caller, bool open = false) : e_(e), caller_(caller), open_(open) {}

  void Begin() {
    e_->Prepare(&ctx_, nullptr);
    const int stub = open_ ? caller_ : e_->o_.shared_channel ? 0 : caller_;
    e_->typed_[stub]->async()->EvaluateStream(&ctx_, this);
    if (!open_) {
      std::lock_guard<std::mutex> lock(mu_);
      for (int i = 0; i < e_->o_.stream_window; ++i) AddOneLocked();
    }
    StartRead(&reply_);
    StartCall();
  }

  // Open loop: queues one batch of `kind` scheduled at `at`. A batch queued on a stream that
  // has already ended counts at once as failed with the stream's status.
  void Enqueue(int kind, Clock::time_point at, bool measured) {
    std::unique_lock<std::mutex> lock(mu_);
    e_->outstanding_.fetch_add(1);
    if (done_) {
      lock.unlock();
      Outcome c;
      c.measured = measured;
      c.code = final_code_;
      c.scheduled = at;
      c.done = Clock::now();
      e_->Count(caller_, c);
      e_->outstanding_.fetch_sub(1);
      return;
    }
    inflight_.push_back({kind, at, measured});
    if (closing_) return;  // a write failed: OnDone counts it
    to_write_.push_back(kind);
    if (!writing_) {
      writing_ = true;
      StartWrite(&e_->kinds_[kind].request);
    }
  }

  // Open loop: no more batches.
  void Close() {
    std::lock_guard<std::mutex> lock(mu_);
    if (done_) return;
    closing_ = true;
    FinishWritesLocked();
  }

  void OnWriteDone(bool ok) override {
    std::lock_guard<std::mutex> lock(mu_);
    to_write_.pop_front();
    if (!ok) {
      writing_ = false;
      closing_ = true;
      return;
    }
    if (!to_write_.empty()) {
      StartWrite(&e_->kinds_[to_write_.front()].request);
    } else {
      writing_ = false;
      FinishWritesLocked();
    }
  }

  void OnReadDone(bool ok) override {
    if (!ok) return;  // the stream is over; OnDone follows
    Item item;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (inflight_.empty()) return;
      item = inflight_.front();
      inflight_.pop_front();
    }
    const RequestKind& kind = e_->kinds_[item.kind];
    Outcome c;
    c.done = Clock::now();
    c.measured = item.measured;
    c.scheduled = item.sent;
    if (reply_.has_error()) {
      c.code = reply_.error().code();
      if (c.code == 0) c.code = 2;
    } else {
      c.bytes = static_cast<int64_t>(kind.serialized.size() + reply_.ByteSizeLong());
      c.elements = kind.elements;
      c.has_timing = reply_.response().has_timing();
      c.timing = reply_.response().timing();
      c.mismatch = e_->Mismatch(kind, reply_.response());
    }
    e_->Count(caller_, c);
    if (open_) {
      e_->outstanding_.fetch_sub(1);
    } else {
      std::lock_guard<std::mutex> lock(mu_);
      AddOneLocked();
    }
    StartRead(&reply_);
  }

  void OnDone(const grpc::Status& status) override {
    // Batches without a reply failed with the stream's status.
    std::deque<Item> left;
    {
      std::lock_guard<std::mutex> lock(mu_);
      done_ = true;
      final_code_ = status.ok() ? 2 : status.error_code();
      left.swap(inflight_);
    }
    for (const Item& item : left) {
      Outcome c;
      c.measured = item.measured;
      c.code = final_code_;
      c.scheduled = item.sent;
      c.done = Clock::now();
      e_->Count(caller_, c);
      if (open_) e_->outstanding_.fetch_sub(1);
    }
    e_->Forget(&ctx_);
    Engine* e = e_;
    if (!open_) delete this;  // open-loop streams belong to the engine (the sender uses them)
    e->Retire();
  }

 private:
  struct Item {
    int kind = 0;
    Clock::time_point sent;
    bool measured = false;
  };

  void AddOneLocked() {
    if (closing_) return;
    bool measured = false;
    const auto now = Clock::now();
    if (!e_->Admit(now, &measured)) {
      closing_ = true;
      FinishWritesLocked();
      return;
    }
    const int kind = e_->PickKind(e_->rngs_[caller_]);
    inflight_.push_back({kind, now, measured});
    to_write_.push_back(kind);
    if (!writing_) {
      writing_ = true;
      StartWrite(&e_->kinds_[kind].request);
    }
  }

  void FinishWritesLocked() {
    if (closing_ && !writing_ && !writes_done_) {
      writes_done_ = true;
      StartWritesDone();
    }
  }

  Engine* const e_;
  const int caller_;
  const bool open_;
  grpc::ClientContext ctx_;
  EvaluateStreamResponse reply_;
  std::mutex mu_;
  std::deque<Item> inflight_;
  std::deque<int> to_write_;
  bool writing_ = false, closing_ = false, writes_done_ = false;
  bool done_ = false;  // OnDone ran
  int final_code_ = 2;
};

// Accumulate: `accumulate_batches` batches of one kind per call; in closed loop the caller's
// next call follows, in open loop (`at` set) each scheduled arrival is one call on channel
// `stub`, timed from its scheduled time.
class Engine::AccumulateCall final : public grpc::ClientWriteReactor<EvaluateRequest> {
 public:
  AccumulateCall(Engine* e, int caller) : e_(e), caller_(caller) {}

  // False when the window is over (nothing was started).
  static bool Start(Engine* e, int caller, std::optional<Clock::time_point> at = std::nullopt,
                    int stub = 0, int shard = 0) {
    bool measured = false;
    const auto now = at.value_or(Clock::now());
    if (!e->Admit(now, &measured)) return false;
    auto* call = new AccumulateCall(e, at ? shard : caller);
    call->open_ = at.has_value();
    call->measured_ = measured;
    call->sent_ = now;
    call->kind_ = e->PickKind(e->rngs_[at ? 0 : caller]);
    call->remaining_ = e->o_.accumulate_batches;
    e->Prepare(&call->ctx_, nullptr);
    if (call->open_) e->outstanding_.fetch_add(1);
    e->typed_[at ? stub : e->o_.shared_channel ? 0 : caller]->async()->Accumulate(
        &call->ctx_, &call->reply_, call);
    call->StartWrite(&e->kinds_[call->kind_].request);
    call->StartCall();
    return true;
  }

  void OnWriteDone(bool ok) override {
    if (!ok) return;
    if (--remaining_ > 0) {
      StartWrite(&e_->kinds_[kind_].request);
    } else {
      StartWritesDone();
    }
  }

  void OnDone(const grpc::Status& status) override {
    const RequestKind& kind = e_->kinds_[kind_];
    const int batches = e_->o_.accumulate_batches;
    Outcome c;
    c.done = Clock::now();
    c.measured = measured_;
    c.scheduled = sent_;
    c.code = status.error_code();
    c.bytes = static_cast<int64_t>(kind.serialized.size()) * batches +
              static_cast<int64_t>(reply_.ByteSizeLong());
    c.elements = kind.elements * batches;
    c.has_timing = reply_.has_timing();
    c.timing = reply_.timing();
    if (c.code == 0 && e_->o_.verify) {
      const std::string why = VerifyAccumulate(kind, batches, reply_.loss());
      if (kind.expect_failure || !why.empty()) {
        c.mismatch = true;
        e_->Report(absl::StrCat(kind.label, ": ", why.empty() ? "accepted" : why));
      }
    }
    e_->Forget(&ctx_);
    e_->Count(caller_, c);
    Engine* e = e_;
    const int caller = caller_;
    const bool open = open_;
    delete this;
    if (open) {
      e->outstanding_.fetch_sub(1);
      e->Retire();
      return;
    }
    if (!Start(e, caller)) e->Retire();
  }

 private:
  Engine* const e_;
  const int caller_;
  grpc::ClientContext ctx_;
  lossd::v1::AccumulateResponse reply_;
  int kind_ = 0;
  int remaining_ = 0;
  bool open_ = false;
  bool measured_ = false;
  Clock::time_point sent_;
};

bench::RunStats Engine::Run(const std::atomic<bool>* interrupted) {
  switch (service_) {
    case Service::kLossd: method_ = "/lossd.v1.LossService/Evaluate"; break;
    case Service::kEcho: method_ = lossd::bench::kEchoMethod; break;
    case Service::kRaw: method_ = lossd::bench::kRawMethod; break;
    case Service::kOip: method_ = "/inference.GRPCInferenceService/ModelInfer"; break;
  }
  const int callers = point_.open ? 1 : point_.concurrency;
  const int nchannels = point_.open ? std::max(1, o_.channels)
                                    : (o_.shared_channel ? 1 : point_.concurrency);
  nchannels_ = nchannels;
  const bool h2 = o_.transport == Transport::kH2;
  for (int i = 0; i < nchannels && !h2; ++i) {
    channels_.push_back(MakeChannel(ep_, i));
    generic_.push_back(std::make_unique<grpc::GenericStub>(channels_.back()));
    typed_.push_back(lossd::v1::LossService::NewStub(channels_.back()));
  }
  for (int i = 0; i < callers; ++i) rngs_.emplace_back(o_.seed * 1000003 + i);
  if (h2) {
    // The same pollers as below; each owns the connections j with j % pollers == its index.
    h2::CallOptions co;
    co.path = method_;
    co.deadline = o_.deadline;
    co.metadata = o_.metadata;
    if (service_ == Service::kRaw) {
      co.extra_key = lossd::bench::kReplyBytesKey;
      for (const RequestKind& k : kinds_) reply_bytes_.push_back(absl::StrCat(k.echo_reply_bytes));
    }
    std::shared_ptr<const h2::Address> address = ep_.h2;
    if (address == nullptr) {  // not resolved by the caller: resolve it here
      Endpoint e = ep_;
      if (const absl::Status st = ResolveForH2(&e); !st.ok()) {
        std::fprintf(stderr, "lossd-bench: %s\n", std::string(st.message()).c_str());
        bench::RunStats none;
        return none;
      }
      address = e.h2;
    }
    const int want = o_.client_threads > 0 ? o_.client_threads : UsableCpus();
    const int npollers =
        std::max(1, std::min({want, point_.open ? nchannels : callers, nchannels}));
    for (int i = 0; i < npollers; ++i) {
      const int owned = nchannels / npollers + (i < nchannels % npollers ? 1 : 0);
      h2_pollers_.push_back(std::make_unique<h2::Poller>(
          *address, co, owned,
          [this, i](h2::Call* call) { H2Done(static_cast<H2Unary*>(call), i); }));
    }
  } else if (o_.rpc == Rpc::kEvaluate) {
    for (size_t k = 0; k < kinds_.size(); ++k) {
      const std::string& bytes = RequestBytes(static_cast<int>(k), -1);
      grpc::Slice slice(bytes.data(), bytes.size(), grpc::Slice::STATIC_SLICE);
      requests_.emplace_back(&slice, 1);
    }
    // Pollers: --client_threads, or one per CPU this process may use, at most one per caller
    // (closed loop) or channel (open loop).
    const int want = o_.client_threads > 0 ? o_.client_threads : UsableCpus();
    const int npollers = std::max(1, std::min(want, point_.open ? nchannels : callers));
    for (int i = 0; i < npollers; ++i) {
      pollers_.push_back(std::make_unique<Poller>());
      pollers_.back()->index = i;
    }
    for (auto& p : pollers_) p->thread = std::thread([this, poller = p.get()] { Poll(poller); });
  }
  for (auto& ch : channels_) ch->WaitForConnected(std::chrono::system_clock::now() +
                                                  std::chrono::seconds(5));

  t0_ = Clock::now();
  warm_end_ = t0_ + absl::ToChronoNanoseconds(o_.warmup);
  end_ = o_.requests > 0 ? Clock::time_point::max()
                         : warm_end_ + absl::ToChronoNanoseconds(o_.duration);
  std::thread sender;
  active_ = callers;
  if (point_.open && o_.rpc == Rpc::kStream) {
    // One stream per channel, owned here: the sender queues batches on them.
    active_ += static_cast<int>(channels_.size());
  }
  for (size_t i = 0; point_.open && o_.rpc == Rpc::kStream && i < channels_.size(); ++i) {
    open_streams_.push_back(std::make_unique<StreamCaller>(this, static_cast<int>(i), true));
    open_streams_.back()->Begin();
  }
  if (point_.open) {
    sender = std::thread([this, h2] {
      bench::ArrivalSchedule schedule(
          point_.poisson ? bench::ArrivalSchedule::Kind::kPoisson
                         : bench::ArrivalSchedule::Kind::kFixed,
          point_.rate, o_.seed);
      for (int64_t i = 0;; ++i) {
        const auto at = t0_ + std::chrono::nanoseconds(schedule.Next());
        while (!stop_ && Clock::now() < at) {
          std::this_thread::sleep_until(std::min(at, Clock::now() + std::chrono::milliseconds(50)));
        }
        while (!stop_ && outstanding_.load() >= o_.max_outstanding) {
          std::this_thread::sleep_for(std::chrono::microseconds(100));
        }
        const int stub = static_cast<int>(i % nchannels_);
        const int shard = static_cast<int>(i % kShards);
        if (o_.rpc == Rpc::kStream) {
          bool measured = false;
          if (!Admit(at, &measured)) break;
          open_streams_[stub]->Enqueue(PickKind(rngs_[0]), at, measured);
          continue;
        }
        Enlist();
        bool started = false;
        if (o_.rpc == Rpc::kAccumulate) {
          started = AccumulateCall::Start(this, 0, at, stub, shard);
        } else if (h2) {
          auto* call = new H2Unary();
          started = StartH2(call, static_cast<int>(i % nchannels_), at, rngs_[0], false);
          if (!started) delete call;
        } else {
          auto* call = new UnaryCall();
          call->stub = stub;
          started = StartUnary(call, pollers_[i % pollers_.size()].get(), at, rngs_[0]);
          if (!started) delete call;
        }
        if (!started) {
          Retire();
          break;
        }
      }
      for (auto& s : open_streams_) s->Close();
      Retire();  // the sender itself
    });
  } else {
    for (int i = 0; i < callers; ++i) {
      bool started = false;
      switch (o_.rpc) {
        case Rpc::kEvaluate: {
          if (h2) {
            h2_callers_.push_back(std::make_unique<H2Unary>());
            H2Unary* call = h2_callers_.back().get();
            call->caller = i;
            started = StartH2(call, o_.shared_channel ? 0 : i, Clock::now(), rngs_[i], false);
            break;
          }
          unary_callers_.push_back(std::make_unique<UnaryCall>());
          UnaryCall* call = unary_callers_.back().get();
          call->caller = i;
          call->stub = o_.shared_channel ? 0 : i;
          started = StartUnary(call, pollers_[i % pollers_.size()].get(), Clock::now(), rngs_[i]);
          break;
        }
        case Rpc::kStream:
          (new StreamCaller(this, i))->Begin();
          started = true;
          break;
        case Rpc::kAccumulate:
          started = AccumulateCall::Start(this, i);
          break;
      }
      if (!started) Retire();
    }
  }

  // Wait: CPU time from the end of the warm-up; progress every second; Ctrl-C and the grace
  // period after the window cancel what is still in flight.
  std::this_thread::sleep_until(warm_end_);
  const double user0 = CpuSeconds(true), sys0 = CpuSeconds(false);
  auto next_progress = warm_end_ + std::chrono::seconds(1);
  Clock::time_point stop_seen = Clock::time_point::max();
  bool cancelled = false;
  std::unique_lock<std::mutex> lock(done_mu_);
  while (active_ > 0) {
    done_cv_.wait_for(lock, std::chrono::milliseconds(100));
    if (active_ == 0) break;
    const auto now = Clock::now();
    if (interrupted != nullptr && interrupted->load()) stop_ = true;
    // Past the window's end closed-loop callers stop. The open-loop sender stops by itself at
    // the first arrival scheduled past it (Admit), so that a sender running late on a busy
    // machine still sends every arrival of the window; the grace period counts from the end.
    if (now >= end_ && !point_.open) stop_ = true;
    if ((stop_ || now >= end_) && stop_seen == Clock::time_point::max()) stop_seen = now;
    const bool late = stop_seen != Clock::time_point::max() &&
                      now > stop_seen + (interrupted != nullptr && interrupted->load()
                                             ? std::chrono::seconds(2)
                                             : kGrace);
    if (late && !cancelled) {
      stop_ = true;
      cancelled = true;
      lock.unlock();
      CancelAll();
      lock.lock();
    }
    if (!o_.progress_label.empty() && now >= next_progress) {
      next_progress += std::chrono::seconds(1);
      lock.unlock();
      const bench::RunStats s = Collect();
      std::fprintf(stderr, "  %s: %.0fs ok %lld errors %lld in flight %lld\n",
                   o_.progress_label.c_str(),
                   std::chrono::duration<double>(now - warm_end_).count(),
                   static_cast<long long>(s.ok()), static_cast<long long>(s.errors()),
                   static_cast<long long>(outstanding_.load()));
      lock.lock();
    }
  }
  lock.unlock();
  if (sender.joinable()) sender.join();
  const auto finished = Clock::now();
  for (auto& p : pollers_) {  // no call is in flight any more
    p->cq.Shutdown();
    p->thread.join();
  }
  for (auto& p : h2_pollers_) p->Stop();
  bench::RunStats all = Collect();
  all.cpu_user_s = CpuSeconds(true) - user0;
  all.cpu_sys_s = CpuSeconds(false) - sys0;
  const int64_t last = last_done_ns_.load();
  all.seconds = last > 0 ? static_cast<double>(last) / 1e9
                         : std::max(0.0, std::chrono::duration<double>(finished - warm_end_).count());
  bench::IntervalSeries series = Series();
  series.set_seconds(all.seconds);
  all.series.assign(1, std::move(series));
  return all;
}

}  // namespace

std::shared_ptr<grpc::Channel> MakeChannel(const Endpoint& e, int index) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);
  args.SetMaxSendMessageSize(-1);
  args.SetInt("lossd.bench.channel", index);  // distinct arguments: distinct connections
  // Per-call work a load tester has no use for (docs/perf.md, "Is lossd-bench the
  // bottleneck?"): channelz's call counters, and the retry filter (each call is sent once).
  args.SetInt(GRPC_ARG_ENABLE_CHANNELZ, 0);
  args.SetInt(GRPC_ARG_ENABLE_RETRIES, 0);
  if (!e.lb_policy.empty()) args.SetLoadBalancingPolicyName(e.lb_policy);
  if (!e.authority_override.empty()) args.SetSslTargetNameOverride(e.authority_override);
  return grpc::CreateCustomChannel(
      e.target, e.credentials ? e.credentials : grpc::InsecureChannelCredentials(), args);
}

absl::Status ResolveForH2(Endpoint* e) {
  auto target = h2::ParseTarget(e->target);
  if (!target.ok()) return target.status();
  auto address = h2::Resolve(*target);
  if (!address.ok()) {
    return absl::Status(address.status().code(),
                        absl::StrCat("--transport=h2: target \"", e->target, "\": ",
                                     address.status().message()));
  }
  e->h2 = std::make_shared<const h2::Address>(*std::move(address));
  return absl::OkStatus();
}

bench::RunStats RunLoad(const Endpoint& endpoint, Service service,
                        const std::vector<RequestKind>& kinds, const bench::MixPicker& mix,
                        const LoadPoint& point, const DriverOptions& options,
                        const std::atomic<bool>* interrupted) {
  Engine engine(endpoint, service, kinds, mix, point, options);
  return engine.Run(interrupted);
}

}  // namespace lossd::loadtest
