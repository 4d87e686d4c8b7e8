// Executor: runs plans on a backend (docs/design.md section 1, "One Evaluate call", step 6 and
// Executor::Compute). It owns the compute side of the server: the CPU and CUDA backends
// and the choice between them, the bounded work queue and its workers, the buffer pool that
// outputs are written into, the in-flight memory budget, and the chunk and cancellation
// counters. It knows nothing of parsing, authentication or validation: it receives plans that
// the Planner checked.
//
// Contract: Submit queues a task or refuses it (RESOURCE_EXHAUSTED, never blocks). Compute
// allocates only the sizes the plan checked, stops between chunks when its call is cancelled
// or past its deadline (CANCELLED / DEADLINE_EXCEEDED), and fills a ComputeResult that the
// encode step (message_io.h, oip_models.h) turns into a reply. ComputeThen is how unary
// handlers run a plan: inline when small, else on a worker; its `done` continues the call
// forward (encode, record), never back into admission or planning.
//
// Small computations on the CUDA backend may be gathered into batches (batcher.h) when
// ExecutorOptions::batch_max_delay is set: Compute then waits up to that delay for others.
//
// Thread-safety: every method may be called from any thread at once. A CallControl is shared
// by its call's reactor and the workers computing for it (atomics only).
#ifndef LOSSD_SERVER_EXECUTOR_H_
#define LOSSD_SERVER_EXECUTOR_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "server/batcher.h"
#include "server/buffer_pool.h"
#include "lossd/kernels/backend.h"
#include "lossd/v1/lossd.pb.h"
#include "server/memory.h"
#include "server/metrics.h"
#include "server/request.h"
#include "server/work_queue.h"

namespace lossd::server {

// One call's link to the computations it starts: its deadline, its cancellation and its
// progress. The call's reactor owns it and keeps it alive until no computation of the call is
// running; workers poll it between chunks. Thread-safe.
class CallControl {
 public:
  using Clock = std::chrono::system_clock;
  // `context` may be null (no gRPC call: tests, the fuzzer); its IsCancelled() is polled too.
  explicit CallControl(const grpc::CallbackServerContext* context = nullptr,
                       Clock::time_point deadline = Clock::time_point::max())
      : context_(context), deadline_(deadline) {}

  // The client cancelled (the reactor's OnCancel) or the server gave up on the call: running
  // computations stop at their next chunk (at most one chunk per kernel thread).
  void Cancel();
  bool cancelled() const;
  bool past_deadline() const { return Clock::now() > deadline_; }
  bool ShouldStop() const { return cancelled() || past_deadline(); }

  // Chunks of kernel work finished for this call (all its computations together).
  std::atomic<int64_t>* chunks() { return &chunks_; }
  // Chunks finished after Cancel() was first called (0 if it never was), and the nanoseconds
  // from that Cancel() to the end of the computation that was running (-1 if none was).
  int64_t chunks_after_cancel() const;
  int64_t cancel_to_stop_ns(int64_t stopped_ns) const;
  bool cancel_seen() const { return cancel_ns_.load() != 0; }

 private:
  const grpc::CallbackServerContext* const context_;
  const Clock::time_point deadline_;
  std::atomic<bool> cancelled_{false};
  std::atomic<int64_t> chunks_{0};
  std::atomic<int64_t> chunks_at_cancel_{0};
  std::atomic<int64_t> cancel_ns_{0};
};

// One output of a computation: its bytes in a pool block, or written into shared memory
// (`placed`: the reply carries `ref` instead of data).
struct OutputTensor {
  bool present = false;
  v1::DType dtype = v1::DTYPE_UNSPECIFIED;
  std::vector<int64_t> shape;
  PoolBlock block;
  bool placed = false;
  v1::TensorReference ref;
};

// What Executor::Compute produces; message_io.h encodes it as the reply.
struct ComputeResult {
  OutputTensor loss;
  OutputTensor grad_logits;   // present when requested
  OutputTensor grad_targets;  // present when requested
  v1::Device device = v1::DEVICE_AUTO;
  int64_t num_elements = 0;
  v1::Timing timing;  // reply_unix_ns is set by whoever encodes the reply
};

struct ExecutorOptions {
  int workers = 1;
  int queue_capacity = 256;
  // Plans up to this many elements are computed by ComputeThen on the calling thread.
  int64_t inline_elements = 16384;
  // Bytes of requests and replies that calls in progress may hold (memory.h); 0: unlimited.
  int64_t max_inflight_bytes = 0;
  // Bytes of returned blocks the pool keeps mapped (buffer_pool.h); -1: 1 GiB, or a quarter of
  // max_inflight_bytes when that is smaller.
  int64_t pool_cached_bytes = -1;
  // Dynamic batching of small CUDA computations (batcher.h; docs/design.md section 1,
  // "Dynamic batching of small CUDA requests"): how long a batch waits for more requests with
  // the same key (0: off), and the most elements of one batch (larger requests run alone).
  // Only computations that run on the CUDA backend are batched.
  absl::Duration batch_max_delay = absl::ZeroDuration();
  int64_t batch_max_elements = 65536;
};

class Executor {
 public:
  // `cpu` is required; `cuda` may be null (no usable GPU or disabled by policy). `metrics`
  // must outlive this.
  Executor(const ExecutorOptions& options, std::unique_ptr<kernels::Backend> cpu,
           std::unique_ptr<kernels::Backend> cuda, Metrics* metrics);
  // Drains the queue and joins the workers first (the queue is the last member).
  ~Executor();
  Executor(const Executor&) = delete;
  Executor& operator=(const Executor&) = delete;

  const ExecutorOptions& options() const { return options_; }
  bool has_cuda() const { return cuda_ != nullptr; }
  // The batcher of CUDA computations; null when batching is off or there is no CUDA backend.
  const Batcher* batcher() const { return batcher_.get(); }

  // Queues `task` for a compute worker. RESOURCE_EXHAUSTED ("work queue is full ...") when
  // the queue is full; the task is then dropped.
  absl::Status Submit(std::function<void()> task);

  // Runs a prepared plan and fills `result`: outputs are written into pool blocks (never
  // zero-filled) or into the plan's placed spans. `loss_values`, when given, receives numel
  // per-element loss values (for Accumulate), and `kept`, when given, the backend's kept
  // count (kernels::BceOutputs::kept). Stops between chunks when the call is cancelled
  // or past its deadline (CANCELLED / DEADLINE_EXCEEDED); FAILED_PRECONDITION when a region
  // the plan used shrank meanwhile. `start_ns` is when the handler got the request (wall
  // clock); timings are filled from it. Allocates only the sizes the plan checked.
  absl::Status Compute(CallControl& call, const EvaluatePlan& plan, int64_t start_ns,
                       ComputeResult* result, double* loss_values = nullptr,
                       int64_t* kept = nullptr);
  // Computes `plan` into `result`, then calls `done` with Compute's status, or with Submit's
  // RESOURCE_EXHAUSTED when the work queue is full: on this thread when the plan has at most
  // ExecutorOptions::inline_elements elements (microseconds of work, cheaper than a thread
  // hop), else on a worker. `call` and `result` must live until `done` runs. How unary
  // handlers (lossd.v1 Evaluate, the inference protocol's ModelInfer) run a plan.
  void ComputeThen(CallControl& call, EvaluatePlan plan, int64_t start_ns, ComputeResult* result,
                   std::function<void(absl::Status)> done);
  // The same, into a message (tests and the fuzzer; the server encodes ComputeResult itself).
  absl::Status Compute(CallControl& call, const EvaluatePlan& plan, int64_t start_ns,
                       v1::EvaluateResponse* response, double* loss_values = nullptr);
  // True when ComputeThen would compute a plan of `numel` elements on the calling thread.
  bool RunsInline(int64_t numel) const { return numel <= options_.inline_elements; }

  MemoryBudget& memory() { return memory_; }
  BufferPool& pool() { return pool_; }

  int64_t chunks_done() const { return chunks_done_.load(); }
  int64_t chunks_started() const { return chunks_started_.load(); }  // live, unlike chunks_done
  // Over all cancelled calls: chunks computed after the cancel was seen, and the longest time
  // from seeing a cancel to the end of the computation it stopped (observability, tests).
  int64_t chunks_after_cancel() const { return chunks_after_cancel_.load(); }
  int64_t max_cancel_stop_ns() const { return max_cancel_stop_ns_.load(); }

 private:
  const ExecutorOptions options_;
  std::unique_ptr<kernels::Backend> cpu_;
  std::unique_ptr<kernels::Backend> cuda_;
  Metrics* const metrics_;
  std::unique_ptr<Batcher> batcher_;  // batches computations on cuda_; null when off
  std::atomic<int64_t> chunks_done_{0};
  std::atomic<int64_t> chunks_started_{0};
  std::atomic<int64_t> chunks_after_cancel_{0};
  std::atomic<int64_t> max_cancel_stop_ns_{0};
  BufferPool pool_;      // before memory_, whose trimmer trims it
  MemoryBudget memory_;
  WorkQueue queue_;  // last member: drained and joined first
};

}  // namespace lossd::server

#endif  // LOSSD_SERVER_EXECUTOR_H_
