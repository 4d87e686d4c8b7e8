// Batcher: dynamic batching of small requests for one backend, the CUDA one (docs/design.md
// section 1, "Dynamic batching of small CUDA requests"). Concurrent computations with the same
// BatchKey are gathered for up to `max_delay`, or until they hold `max_elements` elements,
// and run together by one Backend::BceBatch call; each caller gets its own status back.
//
// Contract: Run blocks the calling thread until the batch its computation joined has run
// (at most max_delay of waiting, then the batch's compute). The first computation of a batch
// opens it and runs it: when the delay has passed since it opened, or at once when the
// element cap is reached. A computation joins only an open batch with an equal key and room
// for its elements, else it opens a new one. Right before the batch runs, each member whose
// call was cancelled or is past its deadline is left out with its own CANCELLED or
// DEADLINE_EXCEEDED. Determinism: a computation's results are bitwise those of running it
// alone (Backend::BceBatch's contract); the batcher never changes a computation's arguments.
//
// Thread-safety: Run may be called from any number of threads at once. Waiting uses
// absl::Mutex conditions: no busy waiting.
#ifndef LOSSD_SERVER_BATCHER_H_
#define LOSSD_SERVER_BATCHER_H_

#include <cstdint>
#include <map>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "lossd/kernels/backend.h"

namespace lossd::server {

class CallControl;  // executor.h
class Metrics;      // metrics.h

// What must be equal for two computations to share a batch: the loss, the dtype of every
// operand, the reduction and its shape, every option that changes semantics (ignore_index,
// normalize, smoothing, focal alpha and gamma, precision, whole-evaluation counts), the
// broadcast pattern of weight and pos_weight, and which outputs are wanted. Doubles compare
// by their bits. When in doubt a field is in the key: a key too fine only makes batches
// smaller, one too coarse could let a segmented launch mix semantics.
struct BatchKey {
  std::vector<int64_t> fields;
  bool operator<(const BatchKey& other) const { return fields < other.fields; }
  bool operator==(const BatchKey& other) const { return fields == other.fields; }
};
BatchKey BatchKeyOf(const kernels::BceArgs& args, const kernels::BceOutputs& out);

struct BatcherOptions {
  absl::Duration max_delay = absl::Microseconds(100);  // how long a batch stays open
  int64_t max_elements = 65536;  // elements of one batch; larger computations are not batched
};

class Batcher {
 public:
  // `backend` and `metrics` (may be null) must outlive this.
  Batcher(const BatcherOptions& options, kernels::Backend* backend, Metrics* metrics);
  Batcher(const Batcher&) = delete;
  Batcher& operator=(const Batcher&) = delete;

  const BatcherOptions& options() const { return options_; }
  // True when Run would batch a computation of `numel` elements.
  bool Batches(int64_t numel) const { return numel <= options_.max_elements; }

  // Computes `args` into `out` as part of a batch (see the contract above) and returns its
  // own status: the backend's for it, or CANCELLED / DEADLINE_EXCEEDED when `call` stopped
  // before the batch ran. `args`, `out` and `call` must stay alive until Run returns.
  // Computations with more than max_elements elements run alone, at once.
  absl::Status Run(const kernels::BceArgs& args, const kernels::BceOutputs& out,
                   const CallControl& call);

  // Batches run so far and the computations they held (tests, observability).
  int64_t batches_run() const;
  int64_t items_run() const;

 private:
  struct Item;
  struct Batch;
  // Runs a closed batch (without the lock) and marks every item done.
  void Execute(Batch& batch);

  const BatcherOptions options_;
  kernels::Backend* const backend_;
  Metrics* const metrics_;
  mutable absl::Mutex mu_;
  std::map<BatchKey, Batch*> open_ ABSL_GUARDED_BY(mu_);  // at most one open batch per key
  int64_t batches_run_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t items_run_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace lossd::server

#endif  // LOSSD_SERVER_BATCHER_H_
