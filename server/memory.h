// Memory admission: a byte budget for the requests and replies that calls in progress hold, and
// the return of freed memory to the operating system after large calls.
//
// gRPC hands a handler a request only once the whole message has arrived, so the budget cannot
// stop bytes that are already in the process; it stops what a call would hold beyond them (the
// parsed request, the reply and its serialized form) and refuses the call at once with
// RESOURCE_EXHAUSTED instead of letting concurrent large calls grow the process past its
// memory limit. Transport buffers are bounded separately by gRPC's resource quota (server.cc).
// Thread-safe.
#ifndef LOSSD_SERVER_MEMORY_H_
#define LOSSD_SERVER_MEMORY_H_

#include <atomic>
#include <cstdint>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace lossd::server {

class BufferPool;

// Reserve and Release take no lock (an atomic counter): they run on every call's path.
class MemoryBudget {
 public:
  // `limit` bytes may be held at once (0: unlimited). With `trim_when_idle`, once calls have
  // held memory and then none is held for `trim_idle`, the allocator's free memory goes back
  // to the OS (malloc_trim), once per such quiet period, and so do the cached blocks of `pool`
  // (when given; it must outlive the budget).
  explicit MemoryBudget(int64_t limit, bool trim_when_idle = true,
                        absl::Duration trim_idle = absl::Seconds(1), BufferPool* pool = nullptr);
  ~MemoryBudget();
  MemoryBudget(const MemoryBudget&) = delete;
  MemoryBudget& operator=(const MemoryBudget&) = delete;

  // Takes `bytes` (>= 0) or, when that would pass the limit, fails with RESOURCE_EXHAUSTED
  // naming the amounts (`what` says what needed them) and takes nothing.
  absl::Status Reserve(int64_t bytes, const char* what);
  void Release(int64_t bytes);

  int64_t limit() const { return limit_; }
  int64_t held() const;
  int64_t trims() const;  // malloc_trim calls so far (observability, tests)

 private:
  void TrimLoop();

  const int64_t limit_;
  const absl::Duration trim_idle_;
  BufferPool* const pool_;
  std::atomic<int64_t> held_{0};
  std::atomic<bool> trim_due_{false};  // memory was held since the last trim
  std::atomic<int64_t> last_change_ns_{0};
  std::atomic<int64_t> trims_{0};
  absl::Mutex mu_;  // the trimmer's sleep only
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread trimmer_;
};

// The bytes one call holds in a MemoryBudget; released when it is destroyed. Not thread-safe
// (one owner: the call's reactor).
class Reservation {
 public:
  explicit Reservation(MemoryBudget* budget) : budget_(budget) {}
  ~Reservation() { Reset(); }
  Reservation(const Reservation&) = delete;
  Reservation& operator=(const Reservation&) = delete;

  // Adds `bytes` to what this call holds, or fails (RESOURCE_EXHAUSTED) and adds nothing.
  absl::Status Add(int64_t bytes, const char* what);
  // Gives back `bytes` (at most what this call holds) once the call no longer holds them.
  void Release(int64_t bytes);
  // Gives back everything this call holds.
  void Reset();
  int64_t bytes() const { return bytes_; }

 private:
  MemoryBudget* const budget_;
  int64_t bytes_ = 0;
};

}  // namespace lossd::server

#endif  // LOSSD_SERVER_MEMORY_H_
