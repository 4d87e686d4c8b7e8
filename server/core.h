// Core: the owner of the three parts every lossd handler shares, each with one job
// (docs/design.md section 1, "Layers" and "Who owns what"):
//   Admission (admission.h)  may this call start: draining, the bearer token, calls in flight;
//   Planner   (planner.h)    is this request valid here: PlanEvaluate, regions, devices;
//   Executor  (executor.h)   run the plan: backends, work queue, buffer pool, memory budget.
// Core constructs them from one CoreConfig, keeps them alive in the right order and hands out
// references; it holds no logic of its own. A call's steps go forward only: handler ->
// admission -> parse -> planner -> executor -> backend -> encode -> call record.
//
// Thread-safety: the accessors are const after construction; each part states its own.
#ifndef LOSSD_SERVER_CORE_H_
#define LOSSD_SERVER_CORE_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/time/time.h"
#include "server/admission.h"
#include "server/executor.h"
#include "lossd/kernels/backend.h"
#include "server/metrics.h"
#include "server/planner.h"
#include "server/request.h"

namespace lossd::server {

struct CoreConfig {
  Limits limits;                  // the Planner's
  int64_t max_message_bytes = 0;  // reported by GetCapabilities
  int workers = 1;
  int queue_capacity = 256;
  int stream_window = 4;   // batches of one stream computed or waiting at once
  // Unary requests up to this many elements are computed on the gRPC thread (microseconds of
  // work, cheaper than a thread hop); larger ones go to the worker queue.
  int64_t inline_elements = 16384;
  std::string auth_token;  // empty: no authentication
  // Bytes of requests and replies that calls in progress may hold (memory.h); 0: unlimited.
  int64_t max_inflight_bytes = 0;
  // Bytes of returned tensor blocks the buffer pool keeps mapped for later calls
  // (buffer_pool.h); -1: 1 GiB, or a quarter of max_inflight_bytes when that is smaller.
  int64_t pool_cached_bytes = -1;
  // Dynamic batching of small CUDA requests (ExecutorOptions): 0 delay is off.
  absl::Duration batch_max_delay = absl::ZeroDuration();
  int64_t batch_max_elements = 65536;
  // Reported by GetCapabilities while a region resolver is set (Planner::set_region_resolver):
  // the prefix of the shared-memory objects clients may register.
  std::string shared_memory_prefix;
  // Capabilities.cuda_ipc (the SharedMemory service accepts REGION_KIND_CUDA_IPC regions) and
  // Capabilities.cuda_device_uuid (the UUID of the GPU the CUDA backend computes on; empty
  // without one).
  bool cuda_ipc = false;
  std::string cuda_device_uuid;
};

class Core {
 public:
  // `cpu` is required; `cuda` may be null (no usable GPU or disabled by policy); both go to
  // the Executor. `metrics` must outlive this.
  Core(const CoreConfig& config, std::unique_ptr<kernels::Backend> cpu,
       std::unique_ptr<kernels::Backend> cuda, std::string cuda_name, Metrics* metrics);
  Core(const Core&) = delete;
  Core& operator=(const Core&) = delete;

  const CoreConfig& config() const { return config_; }
  Metrics& metrics() { return *metrics_; }

  Admission& admission() { return admission_; }
  const Admission& admission() const { return admission_; }
  Planner& planner() { return planner_; }
  const Planner& planner() const { return planner_; }
  Executor& executor() { return executor_; }

 private:
  const CoreConfig config_;
  Metrics* const metrics_;
  Admission admission_;
  Planner planner_;
  Executor executor_;  // last member: its queue is drained and joined first
};

}  // namespace lossd::server

#endif  // LOSSD_SERVER_CORE_H_
