#include "server/shm_guard.h"

#include <signal.h>
#include <sys/mman.h>

#include <cerrno>
#include <cstring>
#include <mutex>

#include "absl/strings/str_cat.h"

namespace lossd::server {
namespace {

// One guarded range. Writers (Guard, Unguard: serialized by `state`) make `seq` odd while they
// change the other fields; the handler reads a slot only when `seq` is even and unchanged
// across its reads, so it never acts on a half-written range.
struct Slot {
  std::atomic<int> state{0};  // 0 free, 1 taken
  std::atomic<uint64_t> seq{0};
  std::atomic<uintptr_t> begin{0};
  std::atomic<uintptr_t> end{0};
  std::atomic<std::atomic<bool>*> damaged{nullptr};
};

Slot slots[kMaxGuardedRanges];
std::atomic<int> high_water{0};  // slots at or past this index were never taken
std::atomic<int> guarded{0};
struct sigaction previous_action;
std::once_flag install_once;
int install_errno = 0;

static_assert(std::atomic<uintptr_t>::is_always_lock_free);
static_assert(std::atomic<uint64_t>::is_always_lock_free);
static_assert(std::atomic<std::atomic<bool>*>::is_always_lock_free);

// Async-signal-safe: atomics and two system calls.
void OnSigbus(int signo, siginfo_t* info, void* context) {
  (void)context;
  const uintptr_t address = reinterpret_cast<uintptr_t>(info->si_addr);
  const int n = high_water.load();
  for (int i = 0; i < n; ++i) {
    Slot& s = slots[i];
    const uint64_t before = s.seq.load();
    if (before & 1) continue;
    const uintptr_t begin = s.begin.load();
    const uintptr_t end = s.end.load();
    std::atomic<bool>* damaged = s.damaged.load();
    if (s.seq.load() != before || begin == 0 || address < begin || address >= end) continue;
    // Zero pages over the whole mapping: this access and all later ones read zeros (writes go
    // to private pages that nobody reads back).
    void* replaced = mmap(reinterpret_cast<void*>(begin), end - begin, PROT_READ | PROT_WRITE,
                          MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (replaced == MAP_FAILED) break;
    if (damaged != nullptr) damaged->store(true);
    return;
  }
  // Not ours: what would have happened without the guard.
  sigaction(signo, &previous_action, nullptr);
  if (info->si_code <= 0) raise(signo);  // sent by a process: deliver it again
  // A fault returns to the faulting instruction, which faults again under the old action.
}

}  // namespace

absl::Status InstallSigbusGuard() {
  std::call_once(install_once, [] {
    struct sigaction action;
    std::memset(&action, 0, sizeof(action));
    action.sa_sigaction = OnSigbus;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&action.sa_mask);
    if (sigaction(SIGBUS, &action, &previous_action) != 0) install_errno = errno;
  });
  if (install_errno != 0) {
    return absl::InternalError(
        absl::StrCat("cannot install the SIGBUS guard: ", std::strerror(install_errno)));
  }
  return absl::OkStatus();
}

int Guard(void* begin, size_t bytes, std::atomic<bool>* damaged) {
  for (int i = 0; i < kMaxGuardedRanges; ++i) {
    Slot& s = slots[i];
    int expected = 0;
    if (!s.state.compare_exchange_strong(expected, 1)) continue;
    s.seq.fetch_add(1);  // odd: being written
    s.begin.store(reinterpret_cast<uintptr_t>(begin));
    s.end.store(reinterpret_cast<uintptr_t>(begin) + bytes);
    s.damaged.store(damaged);
    s.seq.fetch_add(1);  // even: valid
    int hw = high_water.load();
    while (hw < i + 1 && !high_water.compare_exchange_weak(hw, i + 1)) {
    }
    guarded.fetch_add(1);
    return i;
  }
  return -1;
}

void Unguard(int slot) {
  if (slot < 0 || slot >= kMaxGuardedRanges) return;
  Slot& s = slots[slot];
  s.seq.fetch_add(1);
  s.begin.store(0);
  s.end.store(0);
  s.damaged.store(nullptr);
  s.seq.fetch_add(1);
  guarded.fetch_sub(1);
  s.state.store(0);
}

int GuardedRanges() { return guarded.load(); }

}  // namespace lossd::server
