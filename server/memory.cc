#include "server/memory.h"

#include <malloc.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "server/buffer_pool.h"

namespace lossd::server {

MemoryBudget::MemoryBudget(int64_t limit, bool trim_when_idle, absl::Duration trim_idle,
                           BufferPool* pool)
    : limit_(limit), trim_idle_(trim_idle), pool_(pool) {
  last_change_ns_.store(absl::GetCurrentTimeNanos());
  if (trim_when_idle) trimmer_ = std::thread([this] { TrimLoop(); });
}

MemoryBudget::~MemoryBudget() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  if (trimmer_.joinable()) trimmer_.join();
}

absl::Status MemoryBudget::Reserve(int64_t bytes, const char* what) {
  int64_t held = held_.load(std::memory_order_relaxed);
  do {
    if (limit_ > 0 && (bytes > limit_ || held > limit_ - bytes)) {
      return absl::ResourceExhaustedError(absl::StrCat(
          what, " needs ", bytes, " bytes of memory; calls in progress hold ", held, " of the ",
          limit_, " bytes this server admits (--max_inflight_bytes); retry later"));
    }
  } while (!held_.compare_exchange_weak(held, held + bytes, std::memory_order_relaxed));
  if (bytes > 0) {
    last_change_ns_.store(absl::GetCurrentTimeNanos(), std::memory_order_relaxed);
    if (!trim_due_.load(std::memory_order_relaxed)) trim_due_.store(true);
  }
  return absl::OkStatus();
}

void MemoryBudget::Release(int64_t bytes) {
  held_.fetch_sub(bytes, std::memory_order_relaxed);
  last_change_ns_.store(absl::GetCurrentTimeNanos(), std::memory_order_relaxed);
}

int64_t MemoryBudget::held() const { return held_.load(); }

int64_t MemoryBudget::trims() const { return trims_.load(); }

void MemoryBudget::TrimLoop() {
  // Trims once per quiet period after calls held memory: glibc keeps freed blocks of its
  // heaps mapped (hundreds of MB after one large call) until told otherwise, and the buffer
  // pool keeps its blocks for the next call. Under steady load the server never idles and
  // memory follows the load's peak instead (bounded by the pool's cap).
  const int64_t idle_ns = absl::ToInt64Nanoseconds(trim_idle_);
  absl::MutexLock lock(&mu_);
  while (!stop_) {
    const int64_t since = absl::GetCurrentTimeNanos() - last_change_ns_.load();
    const bool due = trim_due_.load();
    if (due && held_.load() == 0 && since >= idle_ns) {
      trim_due_.store(false);
      mu_.Unlock();
      if (pool_ != nullptr) pool_->Trim();
      malloc_trim(0);
      trims_.fetch_add(1);
      mu_.Lock();
      continue;
    }
    const absl::Duration wait =
        due ? std::max(absl::Milliseconds(10), absl::Nanoseconds(idle_ns - since))
            : absl::Milliseconds(200);
    mu_.AwaitWithTimeout(absl::Condition(&stop_), wait);
  }
}

absl::Status Reservation::Add(int64_t bytes, const char* what) {
  if (bytes <= 0) return absl::OkStatus();
  if (absl::Status s = budget_->Reserve(bytes, what); !s.ok()) return s;
  bytes_ += bytes;
  return absl::OkStatus();
}

void Reservation::Release(int64_t bytes) {
  bytes = std::min(bytes, bytes_);
  if (bytes <= 0) return;
  budget_->Release(bytes);
  bytes_ -= bytes;
}

void Reservation::Reset() {
  if (bytes_ > 0) budget_->Release(bytes_);
  bytes_ = 0;
}

}  // namespace lossd::server
