// A process-wide SIGBUS guard for memory mapped from objects that other processes own.
//
// The owner of a shared-memory object can shrink it (ftruncate) while this process has it
// mapped; touching a mapped page past the new end raises SIGBUS, which would kill the server.
// The guard's handler looks the faulting address up in a lock-free table of guarded ranges;
// inside one, it maps anonymous zero pages over that whole range (so the access and every later
// one continue on zeros), sets the range's `damaged` flag and returns. Any other SIGBUS gets
// the default action (the process dies as it would without the guard).
#ifndef LOSSD_SERVER_SHM_GUARD_H_
#define LOSSD_SERVER_SHM_GUARD_H_

#include <atomic>
#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"

namespace lossd::server {

// Most ranges guarded at once (across every registry of the process).
inline constexpr int kMaxGuardedRanges = 16384;

// Installs the handler (once per process; later calls do nothing). INTERNAL when sigaction
// fails.
absl::Status InstallSigbusGuard();

// Guards [begin, begin + bytes), a mapping that the caller unmaps only after Unguard(). On a
// fault inside it, `damaged` is set (it must outlive the guard). Returns a slot for Unguard(),
// or -1 when the table is full.
int Guard(void* begin, size_t bytes, std::atomic<bool>* damaged);
void Unguard(int slot);

// Ranges guarded now (for tests and metrics).
int GuardedRanges();

}  // namespace lossd::server

#endif  // LOSSD_SERVER_SHM_GUARD_H_
