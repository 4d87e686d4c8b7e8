#include "server/batcher.h"

#include <bit>
#include <utility>

#include "absl/strings/str_cat.h"
#include "server/executor.h"
#include "server/metrics.h"

namespace lossd::server {

namespace {

int64_t Bits(double v) { return std::bit_cast<int64_t>(v); }

void AddOperand(const kernels::Operand& op, std::vector<int64_t>* f) {
  const bool present = op.data != nullptr;
  f->push_back(present ? 1 : 0);
  f->push_back(present ? static_cast<int64_t>(op.dtype) : 0);
  f->push_back(present ? op.inner : 0);
  f->push_back(present ? op.period : 0);
}

}  // namespace

BatchKey BatchKeyOf(const kernels::BceArgs& args, const kernels::BceOutputs& out) {
  BatchKey key;
  std::vector<int64_t>& f = key.fields;
  f.reserve(32);
  f.push_back(static_cast<int64_t>(args.loss));
  f.push_back(static_cast<int64_t>(args.dtype));
  f.push_back(static_cast<int64_t>(args.targets_dtype));
  AddOperand(args.weight, &f);
  AddOperand(args.pos_weight, &f);
  f.push_back(static_cast<int64_t>(args.reduction));
  f.push_back(args.last_dim);
  f.push_back(args.empty_rows);
  f.push_back(args.has_ignore_index ? 1 : 0);
  f.push_back(args.has_ignore_index ? Bits(args.ignore_index) : 0);
  f.push_back(args.normalize ? 1 : 0);
  f.push_back(Bits(args.label_smoothing));
  f.push_back(Bits(args.focal_alpha));
  f.push_back(Bits(args.focal_gamma));
  f.push_back(args.whole_numel);
  f.push_back(args.whole_kept);
  f.push_back(static_cast<int64_t>(args.precision));
  f.push_back(out.loss != nullptr ? 1 : 0);
  f.push_back(out.grad_logits != nullptr ? 1 : 0);
  f.push_back(out.grad_targets != nullptr ? 1 : 0);
  f.push_back(out.loss_values != nullptr ? 1 : 0);
  f.push_back(out.kept != nullptr ? 1 : 0);
  // The Executor never batches device tensors (CUDA IPC regions); should a caller do so, they
  // still never share a batch with host tensors.
  f.push_back(static_cast<int64_t>(args.on_device));
  f.push_back(static_cast<int64_t>(out.on_device));
  return key;
}

// One caller's computation, on its stack until Run returns.
struct Batcher::Item {
  const kernels::BceArgs* args;
  const kernels::BceOutputs* out;
  const CallControl* call;
  absl::Status status;
  bool done = false;  // guarded by mu_: set once the batch ran; the caller may then return
};

// A batch, on its opener's stack. Members join while it is in open_ (under mu_); once closed
// (`closed`, no longer in open_) only its opener touches it.
struct Batcher::Batch {
  std::vector<Item*> items;
  int64_t elements = 0;
  bool closed = false;  // guarded by mu_: full, or closed by a computation that did not fit
};

Batcher::Batcher(const BatcherOptions& options, kernels::Backend* backend, Metrics* metrics)
    : options_(options), backend_(backend), metrics_(metrics) {}

absl::Status Batcher::Run(const kernels::BceArgs& args, const kernels::BceOutputs& out,
                          const CallControl& call) {
  if (!Batches(args.numel)) return backend_->Bce(args, out);
  Item item{&args, &out, &call};
  BatchKey key = BatchKeyOf(args, out);
  const int64_t cap = options_.max_elements;
  mu_.Lock();
  if (auto it = open_.find(key); it != open_.end()) {
    Batch* open = it->second;
    if (open->elements + args.numel <= cap) {
      open->items.push_back(&item);
      open->elements += args.numel;
      if (open->elements >= cap) {  // full: its opener runs it now
        open->closed = true;
        open_.erase(it);
      }
      mu_.Await(absl::Condition(&item.done));
      mu_.Unlock();
      return item.status;
    }
    // No room: that batch runs now, and this computation opens the next one.
    open->closed = true;
    open_.erase(it);
  }
  Batch batch;
  batch.items.push_back(&item);
  batch.elements = args.numel;
  if (batch.elements >= cap) {
    batch.closed = true;
  } else {
    const auto at = open_.emplace(std::move(key), &batch).first;
    if (!mu_.AwaitWithTimeout(absl::Condition(&batch.closed), options_.max_delay)) {
      // The delay passed and nobody closed the batch: it is still open, at `at`.
      open_.erase(at);
      batch.closed = true;
    }
  }
  mu_.Unlock();
  Execute(batch);
  return item.status;
}

void Batcher::Execute(Batch& batch) {
  std::vector<kernels::BceItem> run;
  std::vector<Item*> members;
  run.reserve(batch.items.size());
  members.reserve(batch.items.size());
  for (Item* item : batch.items) {
    if (item->call->cancelled()) {
      item->status = absl::CancelledError("the call was cancelled before its batch ran");
    } else if (item->call->past_deadline()) {
      item->status = absl::DeadlineExceededError("the deadline passed before its batch ran");
    } else {
      run.push_back(kernels::BceItem{item->args, item->out});
      members.push_back(item);
    }
  }
  if (!run.empty()) {
    std::vector<absl::Status> statuses = backend_->BceBatch(run);
    for (size_t i = 0; i < members.size(); ++i) {
      members[i]->status =
          i < statuses.size()
              ? std::move(statuses[i])
              : absl::InternalError(absl::StrCat("the backend returned ", statuses.size(),
                                                 " statuses for a batch of ", run.size()));
    }
    if (metrics_ != nullptr) metrics_->ObserveBatch(static_cast<int64_t>(run.size()));
  }
  absl::MutexLock lock(&mu_);
  if (!run.empty()) ++batches_run_;
  items_run_ += static_cast<int64_t>(run.size());
  // Once done is set and the lock released, each member's Run returns and its Item is gone.
  for (Item* item : batch.items) item->done = true;
}

int64_t Batcher::batches_run() const {
  absl::MutexLock lock(&mu_);
  return batches_run_;
}

int64_t Batcher::items_run() const {
  absl::MutexLock lock(&mu_);
  return items_run_;
}

}  // namespace lossd::server
