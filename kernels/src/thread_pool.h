// A fixed-size worker pool for data-parallel loops. Internal to kernels/.
#ifndef LOSSD_KERNELS_SRC_THREAD_POOL_H_
#define LOSSD_KERNELS_SRC_THREAD_POOL_H_

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"

namespace lossd::kernels::internal {

// Runs ParallelFor loops on `threads` threads in total: threads-1 workers plus the caller.
// Thread-safe: several callers may run loops at once; their tasks interleave on the workers.
class ThreadPool {
 public:
  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  // Calls fn(i) for every i in [0, n) and returns when all calls have finished. The caller's
  // thread takes part. fn must not throw.
  void ParallelFor(int64_t n, const std::function<void(int64_t)>& fn);

  // The same for the chunks of a kernel call: polls should_stop (when set) before each index
  // and skips the remaining ones once it returns true (CANCELLED), and counts each finished
  // index in chunks_done (when not null).
  absl::Status ParallelForChunks(int64_t n, const std::function<bool()>& should_stop,
                                 std::atomic<int64_t>* chunks_done,
                                 const std::function<void(int64_t)>& fn);

 private:
  struct Loop {
    const std::function<void(int64_t)>* fn;
    int64_t n;
    int64_t next = 0;    // next index to hand out (guarded by the pool's mu_)
    int64_t done = 0;    // finished calls (guarded by mu_)
    int64_t active = 0;  // workers inside RunLoop for this loop (guarded by mu_)
  };
  // Runs indices of `loop` until none are left, then unregisters it.
  void RunLoop(Loop* loop);
  void WorkerMain();

  absl::Mutex mu_;
  std::deque<Loop*> loops_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> workers_;
};

}  // namespace lossd::kernels::internal

#endif  // LOSSD_KERNELS_SRC_THREAD_POOL_H_
