#include "server/executor.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace lossd::server {

namespace {

BufferPoolOptions PoolOptions(const ExecutorOptions& config) {
  BufferPoolOptions o;
  int64_t cap = config.pool_cached_bytes;
  if (cap < 0) {
    cap = int64_t{1} << 30;
    if (config.max_inflight_bytes > 0) cap = std::min(cap, config.max_inflight_bytes / 4);
  }
  o.max_cached_bytes = cap;
  return o;
}

// Sizes an output and returns where the kernel writes it: the placed span, or a pool block
// (contents unspecified: the kernel writes every byte). Null when no block can be mapped.
void* MakeOutput(BufferPool& pool, kernels::DType dtype, std::vector<int64_t> shape,
                 int64_t count, void* placed, const v1::TensorReference& ref, OutputTensor* t) {
  t->present = true;
  t->dtype = static_cast<v1::DType>(dtype);
  t->shape = std::move(shape);
  if (placed != nullptr) {
    t->placed = true;
    t->ref = ref;
    return placed;
  }
  t->block = pool.Get(static_cast<size_t>(count) * kernels::ItemSize(dtype));
  return t->block.empty() ? nullptr : t->block.data();
}

void CopyOut(OutputTensor* t, v1::Tensor* out) {
  out->set_dtype(t->dtype);
  for (int64_t d : t->shape) out->add_shape(d);
  if (t->placed) {
    *out->mutable_ref() = t->ref;
  } else {
    out->set_data(t->block.data(), t->block.size());
  }
}

}  // namespace

Executor::Executor(const ExecutorOptions& options, std::unique_ptr<kernels::Backend> cpu,
                   std::unique_ptr<kernels::Backend> cuda, Metrics* metrics)
    : options_(options),
      cpu_(std::move(cpu)),
      cuda_(std::move(cuda)),
      metrics_(metrics),
      batcher_(cuda_ != nullptr && options.batch_max_delay > absl::ZeroDuration()
                   ? std::make_unique<Batcher>(
                         BatcherOptions{options.batch_max_delay, options.batch_max_elements},
                         cuda_.get(), metrics)
                   : nullptr),
      pool_(PoolOptions(options)),
      memory_(options.max_inflight_bytes, /*trim_when_idle=*/true, absl::Seconds(1), &pool_),
      queue_(options.workers, options.queue_capacity) {}

Executor::~Executor() = default;

void Executor::ComputeThen(CallControl& call, EvaluatePlan plan, int64_t start_ns,
                           ComputeResult* result, std::function<void(absl::Status)> done) {
  if (RunsInline(plan.args.numel)) {
    done(Compute(call, plan, start_ns, result));
    return;
  }
  auto shared_plan = std::make_shared<EvaluatePlan>(std::move(plan));
  auto shared_done = std::make_shared<std::function<void(absl::Status)>>(std::move(done));
  const absl::Status queued = Submit([this, &call, shared_plan, start_ns, result, shared_done] {
    (*shared_done)(Compute(call, *shared_plan, start_ns, result));
  });
  if (!queued.ok()) (*shared_done)(queued);
}

absl::Status Executor::Submit(std::function<void()> task) {
  // The queue-depth gauge moves when a task is queued and when a worker takes one; calls
  // computed inline never touch the queue.
  const bool ok = queue_.TrySubmit([this, task = std::move(task)] {
    metrics_->SetQueued(queue_.queued());
    task();
  });
  metrics_->SetQueued(queue_.queued());
  if (ok) return absl::OkStatus();
  return absl::ResourceExhaustedError(absl::StrCat(
      "work queue is full (", options_.queue_capacity, " waiting requests); retry later"));
}

void CallControl::Cancel() {
  if (cancelled_.exchange(true)) return;
  chunks_at_cancel_.store(chunks_.load());
  cancel_ns_.store(absl::GetCurrentTimeNanos());
}

bool CallControl::cancelled() const {
  return cancelled_.load(std::memory_order_relaxed) ||
         (context_ != nullptr && context_->IsCancelled());
}

int64_t CallControl::chunks_after_cancel() const {
  return cancel_seen() ? chunks_.load() - chunks_at_cancel_.load() : 0;
}

int64_t CallControl::cancel_to_stop_ns(int64_t stopped_ns) const {
  const int64_t at = cancel_ns_.load();
  return at == 0 ? -1 : stopped_ns - at;
}

absl::Status Executor::Compute(CallControl& call, const EvaluatePlan& plan, int64_t start_ns,
                               ComputeResult* result, double* loss_values, int64_t* kept) {
  const int64_t begin_ns = absl::GetCurrentTimeNanos();
  if (call.cancelled()) return absl::CancelledError("the call was cancelled");
  if (call.past_deadline()) {
    return absl::DeadlineExceededError("the deadline passed before compute started");
  }
  if (plan.reject_nan) {
    if (absl::Status s = CheckNoNan(plan); !s.ok()) return s;
  }
  kernels::Backend* backend = cpu_.get();
  v1::Device device = v1::DEVICE_CPU;
  // Every option (focal, ignore_index, normalize, smoothing, per-sample mean, Accumulate's
  // per-element values) runs on CUDA when the request asks for it or for AUTO and a GPU is
  // available; the reply's device field says where it ran.
  // Correctly rounded requests always run on the host (docs/kernels.md section 8).
  if (plan.device != v1::DEVICE_CPU && cuda_ != nullptr &&
      plan.args.precision == kernels::Precision::kDefault) {
    backend = cuda_.get();
    device = v1::DEVICE_CUDA;
  }
  // Tensors in CUDA device memory (docs/shared-memory.md, "CUDA IPC regions") are computed by
  // the CUDA backend in place. The Planner refuses every plan that would land elsewhere; this
  // keeps a device pointer from ever reaching a host kernel.
  if (plan.on_device() && backend != cuda_.get()) {
    return absl::FailedPreconditionError(
        "the request's tensors are CUDA device memory but it would not run on the CUDA backend");
  }
  // Every size below was overflow-checked and limited by PlanEvaluate. Outputs go straight
  // into pool blocks or placed spans (docs/data-path.md section 3).
  kernels::BceOutputs out;
  out.loss = MakeOutput(pool_, plan.args.dtype, plan.LossShape(), plan.loss_count, plan.loss_out,
                        plan.placed.loss(), &result->loss);
  bool mapped = out.loss != nullptr;
  if (plan.grad_logits) {
    out.grad_logits = MakeOutput(pool_, plan.args.dtype, plan.shape, plan.args.numel,
                                 plan.grad_logits_out, plan.placed.grad_logits(),
                                 &result->grad_logits);
    mapped = mapped && out.grad_logits != nullptr;
  }
  if (plan.grad_targets) {
    out.grad_targets = MakeOutput(pool_, plan.args.dtype, plan.shape, plan.args.numel,
                                  plan.grad_targets_out, plan.placed.grad_targets(),
                                  &result->grad_targets);
    mapped = mapped && out.grad_targets != nullptr;
  }
  if (!mapped) {
    *result = ComputeResult();
    return absl::ResourceExhaustedError(absl::StrCat(
        "cannot map memory for the outputs (", plan.reply_bytes, " bytes); retry later"));
  }
  out.loss_values = loss_values;
  out.kept = kept;
  out.on_device = plan.out_on_device;
  kernels::BceArgs args = plan.args;
  // Per-sample means over empty rows (last_dim 0): numel is 0, so the rows are counted here;
  // the backend fills their NaN means (docs/kernels.md, "Reductions").
  if (args.reduction == kernels::Reduction::kPerSampleMean && args.last_dim == 0) {
    args.empty_rows = plan.loss_count;
  }
  // Polled before each chunk: also counts chunks started, live (chunks_done() moves only when
  // a computation ends).
  args.should_stop = [this, &call] {
    chunks_started_.fetch_add(1, std::memory_order_relaxed);
    return call.ShouldStop();
  };
  const int64_t chunks_before = call.chunks()->load();
  args.chunks_done = call.chunks();
  const int64_t compute_start = absl::GetCurrentTimeNanos();
  // Small CUDA computations may run in a batch with others of the same key (batcher.h): the
  // results are bitwise those of running alone. Computations on device tensors (CUDA IPC
  // regions) run alone: a batched launch may stage its items' inputs together.
  absl::Status s = backend == cuda_.get() && batcher_ != nullptr && !plan.on_device() &&
                           batcher_->Batches(args.numel)
                       ? batcher_->Run(args, out, call)
                       : backend->Bce(args, out);
  const int64_t compute_end = absl::GetCurrentTimeNanos();
  const int64_t chunks = call.chunks()->load() - chunks_before;
  chunks_done_.fetch_add(chunks);
  metrics_->AddChunks(chunks);
  if (call.cancel_seen()) {
    chunks_after_cancel_.fetch_add(call.chunks_after_cancel());
    const int64_t stop_ns = call.cancel_to_stop_ns(compute_end);
    int64_t prev = max_cancel_stop_ns_.load();
    while (stop_ns > prev && !max_cancel_stop_ns_.compare_exchange_weak(prev, stop_ns)) {
    }
  }
  if (s.ok()) s = CheckSpans(plan);
  if (!s.ok()) {
    *result = ComputeResult();
    if (s.code() == absl::StatusCode::kCancelled) {
      return call.past_deadline()
                 ? absl::DeadlineExceededError("the deadline passed during compute; work stopped")
                 : absl::CancelledError("the call was cancelled; work stopped");
    }
    return s;
  }
  metrics_->AddElements(DeviceLabel(device), plan.args.numel);
  result->device = device;
  result->num_elements = plan.args.numel;
  v1::Timing& timing = result->timing;
  timing.set_queue_ns(begin_ns - start_ns);
  timing.set_compute_ns(compute_end - compute_start);
  timing.set_total_ns(absl::GetCurrentTimeNanos() - start_ns);
  timing.set_received_unix_ns(start_ns);
  timing.set_compute_start_unix_ns(compute_start);
  timing.set_compute_end_unix_ns(compute_end);
  return absl::OkStatus();
}

absl::Status Executor::Compute(CallControl& call, const EvaluatePlan& plan, int64_t start_ns,
                               v1::EvaluateResponse* response, double* loss_values) {
  ComputeResult result;
  absl::Status s = Compute(call, plan, start_ns, &result, loss_values);
  response->Clear();
  if (!s.ok()) return s;
  CopyOut(&result.loss, response->mutable_loss());
  if (result.grad_logits.present) CopyOut(&result.grad_logits, response->mutable_grad_logits());
  if (result.grad_targets.present) {
    CopyOut(&result.grad_targets, response->mutable_grad_targets());
  }
  response->set_device(result.device);
  response->set_num_elements(result.num_elements);
  *response->mutable_timing() = result.timing;
  return absl::OkStatus();
}

}  // namespace lossd::server
