// A bounded queue of tasks run by a fixed set of worker threads. Heavy compute runs here, off
// gRPC's threads; a full queue is reported to the caller instead of blocking it.
#ifndef LOSSD_SERVER_WORK_QUEUE_H_
#define LOSSD_SERVER_WORK_QUEUE_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace lossd::server {

class WorkQueue {
 public:
  // `workers` threads (>= 1) run tasks; at most `capacity` (>= 1) tasks wait.
  WorkQueue(int workers, int capacity);
  // Runs every queued task, then joins the workers.
  ~WorkQueue();
  WorkQueue(const WorkQueue&) = delete;
  WorkQueue& operator=(const WorkQueue&) = delete;

  // Queues `task` and returns true, or returns false at once when `capacity` tasks already
  // wait. Thread-safe; never blocks on the queue being full.
  bool TrySubmit(std::function<void()> task);

  int64_t queued() const;  // tasks waiting (not running)

 private:
  void WorkerMain();

  const int capacity_;
  mutable absl::Mutex mu_;
  std::deque<std::function<void()>> tasks_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> workers_;
};

}  // namespace lossd::server

#endif  // LOSSD_SERVER_WORK_QUEUE_H_
