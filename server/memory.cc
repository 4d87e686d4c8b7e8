#include "memory.h"

#include <malloc.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace lossd::server {

MemoryBudget::MemoryBudget(int64_t limit, bool trim_when_idle, absl::Duration trim_idle)
    : limit_(limit), trim_idle_(trim_idle) {
  last_change_ = absl::Now();
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
  absl::MutexLock lock(&mu_);
  if (limit_ > 0 && (bytes > limit_ || held_ > limit_ - bytes)) {
    return absl::ResourceExhaustedError(absl::StrCat(
        what, " needs ", bytes, " bytes of memory; calls in progress hold ", held_, " of the ",
        limit_, " bytes this server admits (--max_inflight_bytes); retry later"));
  }
  held_ += bytes;
  last_change_ = absl::Now();
  if (bytes > 0) trim_due_ = true;
  return absl::OkStatus();
}

void MemoryBudget::Release(int64_t bytes) {
  absl::MutexLock lock(&mu_);
  held_ -= bytes;
  last_change_ = absl::Now();
}

int64_t MemoryBudget::held() const {
  absl::MutexLock lock(&mu_);
  return held_;
}

int64_t MemoryBudget::trims() const {
  absl::MutexLock lock(&mu_);
  return trims_;
}

void MemoryBudget::TrimLoop() {
  // Trims once per quiet period after calls held memory: glibc keeps freed blocks of its
  // heaps mapped (hundreds of MB after one large call) until told otherwise. Under steady load
  // the server never idles and memory follows the load's peak instead.
  absl::MutexLock lock(&mu_);
  while (!stop_) {
    const bool quiet = trim_due_ && held_ == 0 && absl::Now() - last_change_ >= trim_idle_;
    if (quiet) {
      trim_due_ = false;
      ++trims_;
      mu_.Unlock();
      malloc_trim(0);
      mu_.Lock();
      continue;
    }
    const absl::Duration wait =
        trim_due_ ? std::max(absl::Milliseconds(10), last_change_ + trim_idle_ - absl::Now())
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
