// The registry of shared-memory regions (RegionResolver) and the lossd.v1.SharedMemory service.
//
// A client creates a POSIX shared-memory object whose name starts with the server's prefix,
// then registers a byte range of it. The server opens the object, checks that it is a regular
// file owned by the caller's uid, maps the range read-write and returns an unguessable handle
// (128 random bits) with a lease. Tensor references name the handle; Resolve() turns them into
// spans of the mapping. A region ends when its owner unregisters it or stops renewing its
// lease; its memory is unmapped once no computation holds a span of it. docs/shared-memory.md
// describes the protocol and the security model.
//
// REGION_KIND_CUDA_IPC regions are CUDA allocations of a client's process exported with
// cudaIpcGetMemHandle: the registry opens the handle (ShmRegistryOptions::open_cuda_ipc) instead
// of a shared-memory object, under the same callers, leases and limits; Resolve returns device
// spans (RegionSpan::device) that only the CUDA backend touches (docs/shared-memory.md, "CUDA
// IPC regions").
#ifndef LOSSD_SERVER_SHM_REGISTRY_H_
#define LOSSD_SERVER_SHM_REGISTRY_H_

#include <grpcpp/grpcpp.h>
#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "lossd/kernels/backend.h"
#include "lossd/v1/lossd.grpc.pb.h"
#include "server/peer_identity.h"
#include "server/regions.h"

namespace lossd::server {

// Opens `bytes` bytes at `offset` of the CUDA allocation that `handle` (the 64 bytes of a
// cudaIpcMemHandle_t) exports: kernels::OpenCudaIpcMemory's contract.
using CudaIpcOpener = std::function<absl::StatusOr<kernels::DeviceMemory>(
    std::string_view handle, uint64_t offset, uint64_t bytes)>;

struct ShmRegistryOptions {
  // Keys must start with it; empty disables shared memory (every call FAILED_PRECONDITION).
  // Otherwise it must be a POSIX shared-memory name prefix: a leading '/', no other '/'.
  std::string prefix = "/lossd-";
  absl::Duration default_lease = absl::Seconds(30);  // for lease_ms 0 (capped by max_lease)
  absl::Duration max_lease = absl::Minutes(5);
  int64_t max_bytes_per_uid = int64_t{64} << 30;  // registered bytes of one uid at once
  int max_regions_per_uid = 1024;
  // How often expired regions are swept (they are refused by Resolve as soon as they expire).
  absl::Duration sweep_interval = absl::Seconds(1);
  // The clock (tests move time forward by hand); default absl::Now.
  std::function<absl::Time()> now;

  // REGION_KIND_CUDA_IPC: accepted only when enabled, which the server does when it computes
  // on a GPU (a CUDA backend exists) and --cuda_ipc is on. Otherwise registrations of that
  // kind get FAILED_PRECONDITION with `cuda_ipc_unavailable` as the reason (e.g. "this server
  // was built without CUDA").
  bool cuda_ipc_enabled = false;
  std::string cuda_ipc_unavailable = "this server has no usable CUDA backend";
  // The UUID of the GPU the CUDA backend computes on (kernels::CudaDeviceUuid()); a
  // registration must name it.
  std::string cuda_device_uuid;
  // Opens a client's handle; default kernels::OpenCudaIpcMemory (tests inject fakes).
  CudaIpcOpener open_cuda_ipc;
};

// Validates a key for `prefix`: INVALID_ARGUMENT naming the key and the rule it breaks.
absl::Status ValidateShmKey(std::string_view key, std::string_view prefix);

class ShmRegistry : public RegionResolver {
 public:
  // INVALID_ARGUMENT for a malformed prefix or non-positive limits; INTERNAL when the SIGBUS
  // guard cannot be installed.
  static absl::StatusOr<std::unique_ptr<ShmRegistry>> Create(ShmRegistryOptions options);
  ~ShmRegistry() override;  // stops the sweeper; mappings held by spans outlive it

  // For Capabilities.shared_memory and Capabilities.shared_memory_prefix.
  bool enabled() const { return !options_.prefix.empty(); }
  const std::string& prefix() const { return options_.prefix; }
  // For Capabilities.cuda_ipc: REGION_KIND_CUDA_IPC regions are accepted.
  bool cuda_ipc_enabled() const { return enabled() && options_.cuda_ipc_enabled; }

  // The SharedMemory calls of a caller with uid `uid`.
  absl::StatusOr<v1::RegisterRegionResponse> Register(uid_t uid,
                                                      const v1::RegisterRegionRequest& request);
  absl::StatusOr<v1::RenewLeaseResponse> Renew(uid_t uid, const v1::RenewLeaseRequest& request);
  absl::Status Unregister(uid_t uid, const v1::UnregisterRegionRequest& request);
  absl::StatusOr<v1::ListRegionsResponse> List(uid_t uid) const;

  // The inference protocol's registration (Triton's SystemSharedMemoryRegister, oip_shm.h):
  // the checks, limits and errors of Register (prefix, key, sizes, owner, bytes and regions
  // per uid), but no lease: the region stays until Unregister names its handle or the server
  // stops, and request.lease_ms is ignored. Returns the handle, which only the server uses
  // (such regions are not renewed, nor listed by List; Resolve finds them). Only
  // REGION_KIND_SYSTEM (the inference protocol's CUDA shared memory is not offered).
  absl::StatusOr<std::string> RegisterWithoutLease(uid_t uid,
                                                   const v1::RegisterRegionRequest& request);

  // RegionResolver. Besides the documented errors: FAILED_PRECONDITION once the region's
  // object shrank under the mapping (its owner must register it again). Spans of
  // REGION_KIND_CUDA_IPC regions are device memory (RegionSpan::device); their keepalive holds
  // the opened handle.
  absl::StatusOr<RegionSpan> Resolve(std::string_view field, const v1::TensorReference& ref,
                                     int64_t bytes, bool writable) const override;

  // Drops the regions whose lease ended; returns how many. The sweeper thread calls it.
  int Sweep();

  int64_t regions() const;            // registered now
  int64_t registered_bytes(uid_t uid) const;

 private:
  struct Mapping;
  struct Region;
  explicit ShmRegistry(ShmRegistryOptions options);
  absl::Time Now() const { return options_.now ? options_.now() : absl::Now(); }
  absl::Duration Lease(uint32_t requested_ms) const;
  absl::Status CheckRange(uint64_t offset, uint64_t size) const;
  absl::StatusOr<v1::RegisterRegionResponse> RegisterRange(
      uid_t uid, const v1::RegisterRegionRequest& request, bool leased);
  absl::StatusOr<v1::RegisterRegionResponse> RegisterCudaIpc(
      uid_t uid, const v1::RegisterRegionRequest& request);
  // Adds `region` under a new handle once the uid's limits allow it.
  absl::StatusOr<v1::RegisterRegionResponse> Add(std::shared_ptr<Region> region);
  void SweepLoop();

  const ShmRegistryOptions options_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, std::shared_ptr<Region>> regions_ ABSL_GUARDED_BY(mu_);
  struct Usage {
    int64_t bytes = 0;
    int regions = 0;
  };
  absl::flat_hash_map<uid_t, Usage> usage_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread sweeper_;
};

// lossd.v1.SharedMemory on the callback API. Every call is identified by its peer (see
// CallerUid); with an auth token set, calls need it as LossService calls do.
class SharedMemoryService final : public v1::SharedMemory::CallbackService {
 public:
  // `registry` null: shared memory is disabled (every call FAILED_PRECONDITION).
  SharedMemoryService(ShmRegistry* registry, const PeerTable* peers, std::string auth_token,
                      std::string proc_root);
  // The TCP port of the server (to find loopback peers' sockets); set once it is bound.
  void set_server_port(int port) { server_port_.store(port); }
  void set_draining(bool draining) { draining_.store(draining); }

  grpc::ServerUnaryReactor* RegisterRegion(grpc::CallbackServerContext* context,
                                           const v1::RegisterRegionRequest* request,
                                           v1::RegisterRegionResponse* response) override;
  grpc::ServerUnaryReactor* RenewLease(grpc::CallbackServerContext* context,
                                       const v1::RenewLeaseRequest* request,
                                       v1::RenewLeaseResponse* response) override;
  grpc::ServerUnaryReactor* UnregisterRegion(grpc::CallbackServerContext* context,
                                             const v1::UnregisterRegionRequest* request,
                                             v1::UnregisterRegionResponse* response) override;
  grpc::ServerUnaryReactor* ListRegions(grpc::CallbackServerContext* context,
                                        const v1::ListRegionsRequest* request,
                                        v1::ListRegionsResponse* response) override;

 private:
  // The caller's uid once the call is admitted (not draining, token, shared memory enabled).
  absl::StatusOr<uid_t> Caller(grpc::CallbackServerContext* context, bool during_drain) const;
  // Ends a call with `status`; a failure is logged through CallRecord (call_record.h) under
  // `method`, the full name ("SharedMemory.RegisterRegion").
  grpc::ServerUnaryReactor* Finish(grpc::CallbackServerContext* context, const char* method,
                                   const absl::Status& status) const;
  template <typename F>
  grpc::ServerUnaryReactor* Respond(grpc::CallbackServerContext* context, const char* method,
                                    bool during_drain, F&& fn) const;

  ShmRegistry* registry_;
  const PeerTable* peers_;
  const std::string auth_token_;
  const std::string proc_root_;
  std::atomic<int> server_port_{0};
  std::atomic<bool> draining_{false};
};

}  // namespace lossd::server

#endif  // LOSSD_SERVER_SHM_REGISTRY_H_
