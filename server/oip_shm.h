// Triton's system shared memory extension (docs/interop.md, "System shared memory") served by
// lossd's region registry (shm_registry.h). SystemSharedMemoryRegister (gRPC) and
// POST /v2/systemsharedmemory/region/{name}/register (REST) register a range of a POSIX
// shared-memory object through ShmRegistry::RegisterWithoutLease: the same prefix, key, size,
// owner and per-uid limits as lossd.v1's RegisterRegion, but no lease, since Triton's protocol
// has no renewal: such a region stays until it is unregistered or the server stops.
//
// Names are the inference protocol's own: each caller's uid has its own names, which map to
// registry handles that never leave the server, so a name never collides with a lossd.v1
// handle nor with another uid's name. A ModelInfer input or output whose parameters name a
// region (shared_memory_region, shared_memory_byte_size, shared_memory_offset) becomes a
// lossd.v1 TensorReference / OutputPlacement in the translation (oip_models.h, OipShmLookup),
// which the Planner resolves like any lossd.v1 reference.
#ifndef LOSSD_SERVER_OIP_SHM_H_
#define LOSSD_SERVER_OIP_SHM_H_

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "inference/grpc_predict_v2.pb.h"
#include "server/oip_models.h"
#include "server/peer_identity.h"
#include "server/shm_registry.h"

namespace lossd::server {

class OipSharedMemory {
 public:
  // `registry` null: shared memory is disabled (every call FAILED_PRECONDITION). `peers` and
  // `proc_root` identify callers as lossd.v1's SharedMemory service does (CallerUid).
  OipSharedMemory(ShmRegistry* registry, const PeerTable* peers, std::string proc_root);
  ~OipSharedMemory();  // unregisters what is left

  // The ports callers connect to (to find loopback peers' sockets); set once bound.
  void set_port(OipProtocol protocol, int port);

  // OK when enabled, else FAILED_PRECONDITION with the reason.
  absl::Status Enabled() const;
  // The uid of the caller whose peer string is `peer`, on the front-end `protocol`.
  // PERMISSION_DENIED for peers that are neither on the Unix socket nor loopback TCP.
  absl::StatusOr<uid_t> Caller(std::string_view peer, OipProtocol protocol) const;

  // SystemSharedMemoryRegister. ALREADY_EXISTS when the caller has a region of that name;
  // otherwise ShmRegistry::RegisterWithoutLease's errors.
  absl::Status Register(uid_t uid, const inference::SystemSharedMemoryRegisterRequest& request);
  // SystemSharedMemoryUnregister: the caller's region `name`, or all of them for "". A name
  // that is not registered is no error (as Triton).
  absl::Status Unregister(uid_t uid, std::string_view name);
  // SystemSharedMemoryStatus: the caller's region `name`, or all of them for "". NOT_FOUND
  // for a name that is not registered.
  absl::StatusOr<inference::SystemSharedMemoryStatusResponse> Status(uid_t uid,
                                                                     std::string_view name) const;

  // The lossd.v1 reference of `byte_size` bytes at `offset` of the caller's region `name`.
  // `what` names the tensor in messages ("input 'LOGITS'"). NOT_FOUND for an unknown name,
  // INVALID_ARGUMENT with the numbers when the range leaves the region.
  absl::StatusOr<v1::TensorReference> Reference(uid_t uid, std::string_view what,
                                                std::string_view name, uint64_t offset,
                                                uint64_t byte_size) const;

  int64_t regions() const;  // registered through this protocol now

 private:
  struct Entry {
    std::string handle;  // the registry's
    std::string key;
    uint64_t offset = 0;
    uint64_t byte_size = 0;
  };
  using Name = std::pair<uid_t, std::string>;

  ShmRegistry* const registry_;
  const PeerTable* const peers_;
  const std::string proc_root_;
  std::atomic<int> grpc_port_{0};
  std::atomic<int> http_port_{0};
  mutable absl::Mutex mu_;
  absl::flat_hash_map<Name, Entry> entries_ ABSL_GUARDED_BY(mu_);
};

// The OipShmLookup of one call: the caller's uid is found (once) when a tensor names a region.
// `shm` null: shared memory is disabled.
class OipShmCaller final : public OipShmLookup {
 public:
  OipShmCaller(const OipSharedMemory* shm, std::string peer, OipProtocol protocol)
      : shm_(shm), peer_(std::move(peer)), protocol_(protocol) {}
  absl::StatusOr<v1::TensorReference> Reference(std::string_view what, std::string_view name,
                                                uint64_t offset,
                                                uint64_t byte_size) const override;

 private:
  const OipSharedMemory* const shm_;
  const std::string peer_;
  const OipProtocol protocol_;
  mutable std::optional<absl::StatusOr<uid_t>> uid_;
};

}  // namespace lossd::server

#endif  // LOSSD_SERVER_OIP_SHM_H_
