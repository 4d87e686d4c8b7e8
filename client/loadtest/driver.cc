#include "client/loadtest/driver.h"

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
#include "inference/grpc_predict_v2.pb.h"
#include "lossd/v1/lossd.grpc.pb.h"
#include "client/bench/schedule.h"
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

  void Count(int shard, const Outcome& c) {
    if (c.measured) {
      int64_t done = Ns(c.done - warm_end_);
      int64_t seen = last_done_ns_.load(std::memory_order_relaxed);
      while (done > seen && !last_done_ns_.compare_exchange_weak(seen, done)) {
      }
      std::lock_guard<std::mutex> lock(series_mu_);
      series_.Record(done, c.mismatch ? 2 : c.code, Ns(c.done - c.scheduled));
    }
    auto& s = shards_[shard % kShards];
    std::lock_guard<std::mutex> lock(s.mu);
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

  void Prepare(grpc::ClientContext* ctx, const RequestKind* kind) {
    for (const auto& [k, v] : o_.metadata) ctx->AddMetadata(k, v);
    if (o_.deadline > absl::ZeroDuration()) {
      ctx->set_deadline(std::chrono::system_clock::now() + absl::ToChronoNanoseconds(o_.deadline));
    }
    if (kind != nullptr && service_ == Service::kRaw) {
      ctx->AddMetadata(lossd::bench::kReplyBytesKey, absl::StrCat(kind->echo_reply_bytes));
    }
    std::lock_guard<std::mutex> lock(live_mu_);
    live_.insert(ctx);
  }
  void Forget(grpc::ClientContext* ctx) {
    std::lock_guard<std::mutex> lock(live_mu_);
    live_.erase(ctx);
  }
  void CancelAll() {
    std::lock_guard<std::mutex> lock(live_mu_);
    for (grpc::ClientContext* ctx : live_) ctx->TryCancel();
  }
  void Retire() {  // one call or caller fewer
    std::lock_guard<std::mutex> lock(done_mu_);
    if (--active_ == 0) done_cv_.notify_all();
  }

  // Unary Evaluate (and the baselines' methods) through the generic stub: the request is
  // serialized once per kind and sent from its bytes.
  struct UnaryCall {
    grpc::ClientContext ctx;
    grpc::ByteBuffer request, reply;
    int kind = 0;
    int caller = 0;
    int shard = 0;
    int slot = -1;  // --shared_memory: the output slot
    bool measured = false;
    Clock::time_point scheduled;
  };
  // The bytes a unary call of `kind` sends (its output slot's request with --shared_memory).
  const std::string& RequestBytes(int kind, int slot) const {
    if (o_.shm != nullptr) return o_.shm->Serialized(kind, slot);
    return service_ == Service::kOip ? kinds_[kind].oip_serialized : kinds_[kind].serialized;
  }
  bool StartUnary(int caller, int stub, int shard, Clock::time_point at, std::mt19937_64& rng);
  void UnaryDone(UnaryCall* call, const grpc::Status& status);

  bench::RunStats Collect() {
    bench::RunStats all;
    for (auto& s : shards_) {
      std::lock_guard<std::mutex> lock(s.mu);
      all.Merge(s.stats);
    }
    return all;
  }

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

  Clock::time_point t0_, warm_end_, end_;
  std::atomic<bool> stop_{false};
  std::atomic<int64_t> measured_started_{0};
  std::atomic<int64_t> outstanding_{0};
  std::atomic<int64_t> last_done_ns_{-1};
  std::atomic<int> mismatch_reports_{0};
  struct Shard {
    std::mutex mu;
    bench::RunStats stats;
  };
  Shard shards_[kShards];
  // The time series of the measured window (one for all callers: 4.5 KiB per interval).
  std::mutex series_mu_;
  bench::IntervalSeries series_;
  std::mutex live_mu_;
  std::unordered_set<grpc::ClientContext*> live_;
  std::mutex done_mu_;
  std::condition_variable done_cv_;
  int active_ = 0;  // closed loop: callers still going; open loop: sender + calls in flight
};

bool Engine::StartUnary(int caller, int stub, int shard, Clock::time_point at,
                        std::mt19937_64& rng) {
  bool measured = false;
  if (!Admit(at, &measured)) return false;
  auto* call = new UnaryCall();
  call->kind = PickKind(rng);
  call->caller = caller;
  call->shard = shard;
  call->measured = measured;
  call->scheduled = at;
  if (o_.shm != nullptr) {
    // Closed loop: the caller's own slot. Open loop (the sender thread): a free one; there is
    // one, since no more calls than slots are in flight (max_outstanding), but wait if not.
    call->slot = point_.open ? o_.shm->Acquire() : caller;
    while (call->slot < 0) {
      std::this_thread::sleep_for(std::chrono::microseconds(50));
      call->slot = o_.shm->Acquire();
    }
  }
  const RequestKind& kind = kinds_[call->kind];
  const std::string& bytes = RequestBytes(call->kind, call->slot);
  grpc::Slice slice(bytes.data(), bytes.size(), grpc::Slice::STATIC_SLICE);
  call->request = grpc::ByteBuffer(&slice, 1);
  Prepare(&call->ctx, &kind);
  outstanding_.fetch_add(1);
  generic_[stub]->UnaryCall(&call->ctx, method_, grpc::StubOptions(), &call->request,
                            &call->reply,
                            [this, call](grpc::Status status) { UnaryDone(call, status); });
  return true;
}

void Engine::UnaryDone(UnaryCall* call, const grpc::Status& status) {
  Outcome c;
  c.done = Clock::now();
  c.measured = call->measured;
  c.scheduled = call->scheduled;
  c.code = status.error_code();
  const RequestKind& kind = kinds_[call->kind];
  c.bytes = static_cast<int64_t>(RequestBytes(call->kind, call->slot).size() +
                                 call->reply.Length());
  c.elements = kind.elements;
  if (c.code == 0 && service_ == Service::kOip && (o_.parse_replies || o_.verify)) {
    // ModelInfer replies carry no timing; with --verify they are checked as the
    // EvaluateResponse they stand for.
    inference::ModelInferResponse reply;
    if (!grpc::SerializationTraits<inference::ModelInferResponse>::Deserialize(&call->reply,
                                                                               &reply)
             .ok()) {
      c.mismatch = true;
      Report(absl::StrCat(kind.label, ": the reply does not parse"));
    } else if (o_.verify) {
      auto as_lossd = FromOipReply(kind.request, reply);
      if (!as_lossd.ok()) {
        c.mismatch = true;
        Report(absl::StrCat(kind.label, ": ", as_lossd.status().message()));
      } else {
        c.mismatch = Mismatch(kind, *as_lossd);
      }
    }
  } else if (c.code == 0 && service_ != Service::kRaw && (o_.parse_replies || o_.verify)) {
    EvaluateResponse reply;
    if (!grpc::SerializationTraits<EvaluateResponse>::Deserialize(&call->reply, &reply).ok()) {
      c.mismatch = true;
      Report(absl::StrCat(kind.label, ": the reply does not parse"));
    } else {
      c.has_timing = reply.has_timing();
      c.timing = reply.timing();
      // --shared_memory: the outputs lie in the call's slot; --verify reads them from there.
      const std::string why =
          o_.shm != nullptr && o_.verify ? o_.shm->Materialize(call->kind, call->slot, &reply)
                                         : std::string();
      if (!why.empty()) {
        c.mismatch = true;
        Report(absl::StrCat(kind.label, ": ", why));
      } else {
        c.mismatch = Mismatch(kind, reply);
      }
    }
  }
  Forget(&call->ctx);
  const int caller = call->caller;
  const int shard = call->shard;
  if (o_.shm != nullptr && point_.open) o_.shm->Release(call->slot);
  delete call;
  Count(shard, c);
  outstanding_.fetch_sub(1);
  if (point_.open) {
    Retire();
    return;
  }
  // Closed loop: this caller's next call, or its end.
  if (!StartUnary(caller, o_.shared_channel ? 0 : caller, caller, Clock::now(), rngs_[caller])) {
    Retire();
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
  for (int i = 0; i < nchannels; ++i) {
    channels_.push_back(MakeChannel(ep_, i));
    generic_.push_back(std::make_unique<grpc::GenericStub>(channels_.back()));
    typed_.push_back(lossd::v1::LossService::NewStub(channels_.back()));
  }
  for (int i = 0; i < callers; ++i) rngs_.emplace_back(o_.seed * 1000003 + i);
  for (auto& ch : channels_) ch->WaitForConnected(std::chrono::system_clock::now() +
                                                  std::chrono::seconds(5));

  t0_ = Clock::now();
  warm_end_ = t0_ + absl::ToChronoNanoseconds(o_.warmup);
  end_ = o_.requests > 0 ? Clock::time_point::max()
                         : warm_end_ + absl::ToChronoNanoseconds(o_.duration);
  std::thread sender;
  {
    std::lock_guard<std::mutex> lock(done_mu_);
    active_ = callers;
  }
  if (point_.open && o_.rpc == Rpc::kStream) {
    // One stream per channel, owned here: the sender queues batches on them.
    std::lock_guard<std::mutex> lock(done_mu_);
    active_ += static_cast<int>(channels_.size());
  }
  for (size_t i = 0; point_.open && o_.rpc == Rpc::kStream && i < channels_.size(); ++i) {
    open_streams_.push_back(std::make_unique<StreamCaller>(this, static_cast<int>(i), true));
    open_streams_.back()->Begin();
  }
  if (point_.open) {
    sender = std::thread([this] {
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
        const int stub = static_cast<int>(i % channels_.size());
        const int shard = static_cast<int>(i % kShards);
        if (o_.rpc == Rpc::kStream) {
          bool measured = false;
          if (!Admit(at, &measured)) break;
          open_streams_[stub]->Enqueue(PickKind(rngs_[0]), at, measured);
          continue;
        }
        {
          std::lock_guard<std::mutex> lock(done_mu_);
          ++active_;
        }
        const bool started = o_.rpc == Rpc::kAccumulate
                                 ? AccumulateCall::Start(this, 0, at, stub, shard)
                                 : StartUnary(0, stub, shard, at, rngs_[0]);
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
        case Rpc::kEvaluate:
          started = StartUnary(i, o_.shared_channel ? 0 : i, i, Clock::now(), rngs_[i]);
          break;
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
  bench::RunStats all = Collect();
  all.cpu_user_s = CpuSeconds(true) - user0;
  all.cpu_sys_s = CpuSeconds(false) - sys0;
  const int64_t last = last_done_ns_.load();
  all.seconds = last > 0 ? static_cast<double>(last) / 1e9
                         : std::max(0.0, std::chrono::duration<double>(finished - warm_end_).count());
  {
    std::lock_guard<std::mutex> series_lock(series_mu_);
    series_.set_seconds(all.seconds);
    all.series.assign(1, series_);
  }
  return all;
}

}  // namespace

std::shared_ptr<grpc::Channel> MakeChannel(const Endpoint& e, int index) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);
  args.SetMaxSendMessageSize(-1);
  args.SetInt("lossd.bench.channel", index);  // distinct arguments: distinct connections
  if (!e.lb_policy.empty()) args.SetLoadBalancingPolicyName(e.lb_policy);
  if (!e.authority_override.empty()) args.SetSslTargetNameOverride(e.authority_override);
  return grpc::CreateCustomChannel(
      e.target, e.credentials ? e.credentials : grpc::InsecureChannelCredentials(), args);
}

bench::RunStats RunLoad(const Endpoint& endpoint, Service service,
                        const std::vector<RequestKind>& kinds, const bench::MixPicker& mix,
                        const LoadPoint& point, const DriverOptions& options,
                        const std::atomic<bool>* interrupted) {
  Engine engine(endpoint, service, kinds, mix, point, options);
  return engine.Run(interrupted);
}

}  // namespace lossd::loadtest
