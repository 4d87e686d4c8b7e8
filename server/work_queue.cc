#include "server/work_queue.h"

#include <utility>

namespace lossd::server {

WorkQueue::WorkQueue(int workers, int capacity) : capacity_(capacity < 1 ? 1 : capacity) {
  if (workers < 1) workers = 1;
  for (int i = 0; i < workers; ++i) workers_.emplace_back([this] { WorkerMain(); });
}

WorkQueue::~WorkQueue() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  for (std::thread& t : workers_) t.join();
}

bool WorkQueue::TrySubmit(std::function<void()> task) {
  absl::MutexLock lock(&mu_);
  if (stop_ || static_cast<int>(tasks_.size()) >= capacity_) return false;
  tasks_.push_back(std::move(task));
  return true;
}

int64_t WorkQueue::queued() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int64_t>(tasks_.size());
}

void WorkQueue::WorkerMain() {
  for (;;) {
    std::function<void()> task;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return stop_ || !tasks_.empty();
      };
      mu_.Await(absl::Condition(&ready));
      if (tasks_.empty()) return;  // stopping and drained
      task = std::move(tasks_.front());
      tasks_.pop_front();
    }
    task();
  }
}

}  // namespace lossd::server
