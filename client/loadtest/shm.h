// lossd-bench --shared_memory: the request tensors lie in a POSIX shared-memory object
// registered with the server's lossd.v1.SharedMemory service, each Evaluate names them by
// TensorReference and places its outputs (a per-element or per-sample loss, the gradients)
// in an output slot of the same region, so the run measures the zero-copy path
// (docs/shared-memory.md). Only the small request and reply messages cross gRPC.
//
// Layout of the one region: the inputs of every request kind (64-byte aligned), then `slots`
// output slots, each large enough for the outputs of any kind. A closed-loop caller owns slot
// i; open-loop calls take a free slot and give it back when their reply has been read, so calls
// in flight never share output memory.
//
// Lifetime: the object (prefix + "bench-<pid>-<n>-<random>", mode 0600, memory reserved with
// posix_fallocate) is unlinked as soon as the server has answered its registration: the server
// keeps its own mapping, so from then on nothing is left in /dev/shm however lossd-bench ends
// (a kill during the registration call itself can leave it). A thread renews the
// lease at a third of what the server granted; the destructor unregisters the region (also
// after Ctrl-C); a killed lossd-bench leaves a registration that expires with its lease.
#ifndef LOSSD_CLIENT_LOADTEST_SHM_H_
#define LOSSD_CLIENT_LOADTEST_SHM_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "client/loadtest/driver.h"
#include "lossd/v1/lossd.pb.h"
#include "client/loadtest/requests.h"

namespace lossd::loadtest {

// Where the outputs of one (kind, slot) call lie in the region; -1: not placed (in the reply).
struct PlacedOutputs {
  int64_t loss = -1, grad_logits = -1, grad_targets = -1;
};

class SharedMemoryPlan {
 public:
  // Asks the server (GetCapabilities) for its prefix, creates, fills and registers the region
  // for `kinds` and `slots` output slots. Errors say why (the server offers no shared memory,
  // the registration was refused, /dev/shm is full, ...).
  static absl::StatusOr<std::unique_ptr<SharedMemoryPlan>> Create(
      const Endpoint& endpoint, const std::vector<std::pair<std::string, std::string>>& metadata,
      const std::vector<RequestKind>& kinds, int slots);
  ~SharedMemoryPlan();  // stops renewing, unregisters the region, unmaps it

  int slots() const { return slots_; }
  // The serialized EvaluateRequest of `kind` whose outputs go to `slot`.
  const std::string& Serialized(int kind, int slot) const { return serialized_[kind][slot]; }
  // Checks that the reply's tensors name the places this call asked for and puts their bytes
  // (read from the region) into them, so that VerifyReply can check the reply; "" or why not.
  std::string Materialize(int kind, int slot, lossd::v1::EvaluateResponse* reply) const;

  // Open loop: a free slot (-1: none), and its return.
  int Acquire();
  void Release(int slot);

  // For the header: "key, N MiB: inputs A bytes, S output slots of B bytes".
  std::string Describe() const;
  // Lease renewals that found the region gone (expired or dropped by the server).
  int64_t lost_renewals() const { return lost_renewals_.load(); }

 private:
  SharedMemoryPlan() = default;
  void RenewLoop();

  Endpoint endpoint_;
  std::vector<std::pair<std::string, std::string>> metadata_;
  std::string key_, handle_;
  char* base_ = nullptr;
  size_t bytes_ = 0;
  int64_t input_bytes_ = 0, slot_bytes_ = 0;
  int slots_ = 0;
  std::vector<std::vector<std::string>> serialized_;      // [kind][slot]
  std::vector<std::vector<PlacedOutputs>> placed_;        // [kind][slot]
  std::mutex free_mu_;
  std::vector<int> free_;
  uint32_t lease_ms_ = 0;
  std::atomic<int64_t> lost_renewals_{0};
  std::mutex renew_mu_;
  std::condition_variable renew_cv_;
  bool stopping_ = false;
  std::thread renewer_;
};

}  // namespace lossd::loadtest

#endif  // LOSSD_CLIENT_LOADTEST_SHM_H_
