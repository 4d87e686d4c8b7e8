#include "kernels/src/thread_pool.h"

#include <algorithm>

namespace lossd::kernels::internal {

ThreadPool::ThreadPool(int threads) {
  for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { WorkerMain(); });
}

ThreadPool::~ThreadPool() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  for (std::thread& t : workers_) t.join();
}

void ThreadPool::RunLoop(Loop* loop) {
  for (;;) {
    int64_t i;
    {
      absl::MutexLock lock(&mu_);
      if (loop->next >= loop->n) {
        auto it = std::find(loops_.begin(), loops_.end(), loop);
        if (it != loops_.end()) loops_.erase(it);
        return;
      }
      i = loop->next++;
    }
    (*loop->fn)(i);
    absl::MutexLock lock(&mu_);
    ++loop->done;
  }
}

void ThreadPool::ParallelFor(int64_t n, const std::function<void(int64_t)>& fn) {
  if (n <= 0) return;
  if (n == 1 || workers_.empty()) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  Loop loop;
  loop.fn = &fn;
  loop.n = n;
  {
    absl::MutexLock lock(&mu_);
    loops_.push_back(&loop);
  }
  RunLoop(&loop);
  absl::MutexLock lock(&mu_);
  // Wait until every index has finished and no worker still holds the loop.
  auto finished = [&loop]() { return loop.done == loop.n && loop.active == 0; };
  mu_.Await(absl::Condition(&finished));
}

void ThreadPool::WorkerMain() {
  for (;;) {
    Loop* loop = nullptr;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return stop_ || !loops_.empty();
      };
      mu_.Await(absl::Condition(&ready));
      if (stop_) return;
      loop = loops_.front();
      // Rotate so that concurrent loops share the workers.
      loops_.pop_front();
      loops_.push_back(loop);
      ++loop->active;
    }
    RunLoop(loop);
    absl::MutexLock lock(&mu_);
    --loop->active;
  }
}

absl::Status ThreadPool::ParallelForChunks(int64_t n, const std::function<bool()>& should_stop,
                                           std::atomic<int64_t>* chunks_done,
                                           const std::function<void(int64_t)>& fn) {
  // The loop's state in one place, so that the lambda below captures one pointer and fits
  // std::function's inline storage: no allocation per kernel call.
  struct Chunks {
    const std::function<bool()>& should_stop;
    std::atomic<int64_t>* chunks_done;
    const std::function<void(int64_t)>& fn;
    std::atomic<bool> stopped{false};
  } c{should_stop, chunks_done, fn};
  ParallelFor(n, [p = &c](int64_t i) {
    if (p->stopped.load(std::memory_order_relaxed)) return;
    if (p->should_stop && p->should_stop()) {
      p->stopped.store(true, std::memory_order_relaxed);
      return;
    }
    p->fn(i);
    if (p->chunks_done != nullptr) p->chunks_done->fetch_add(1, std::memory_order_relaxed);
  });
  if (c.stopped.load()) return absl::CancelledError("stopped before completion");
  return absl::OkStatus();
}

}  // namespace lossd::kernels::internal
