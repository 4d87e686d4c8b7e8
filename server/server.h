// The lossd gRPC server: LossService, inference.GRPCInferenceService (KServe v2, docs/interop.md),
// health and reflection on one port; optionally the KServe v2 REST API on another.
#ifndef LOSSD_SERVER_SERVER_H_
#define LOSSD_SERVER_SERVER_H_

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "lossd/kernels/backend.h"

namespace lossd::server {

// Which devices the server may use.
enum class DevicePolicy {
  kAuto,  // CUDA when a GPU is usable at startup, else CPU only
  kCpu,   // CPU only: requests for CUDA get FAILED_PRECONDITION
  kCuda,  // require a GPU: Start fails without one
};

struct ServerOptions {
  std::string host = "0.0.0.0";  // listen address
  int port = 50051;              // 0 picks a free port (see LossdServer::port())
  DevicePolicy device = DevicePolicy::kAuto;
  // Largest message accepted or sent, in bytes (gRPC's default is 4 MiB).
  int64_t max_message_bytes = int64_t{256} << 20;
  int64_t max_elements = int64_t{1} << 28;  // per tensor
  // Compute workers and CPU kernel threads; 0 = the CPU limit of the process's cgroup
  // (quota / period, rounded up), else the host's cores (host_limits.h).
  int workers = 0;
  int queue_capacity = 256;  // waiting requests beyond which calls get RESOURCE_EXHAUSTED
  int cpu_threads = 0;
  bool cuda_float_math = true;  // kernels::CudaOptions::float_math of the CUDA backend
  int stream_window = 4;     // batches of one EvaluateStream computed or waiting at once
  int64_t inline_elements = 16384;  // unary requests this small skip the worker queue
  // Dynamic batching of small CUDA requests (batcher.h): how long a batch waits for requests
  // with the same key (0: off) and the most elements of one batch.
  absl::Duration batch_max_delay = absl::ZeroDuration();
  int64_t batch_max_elements = 65536;

  // Prometheus /metrics: -1 disables it, 0 picks a free port (see metrics_port()).
  std::string metrics_host = "0.0.0.0";
  int metrics_port = -1;

  // The KServe v2 REST API (oip_http.h, docs/interop.md) on `host`: -1 disables it, 0 picks a
  // free port (see http_port()). Plaintext HTTP: refused together with TLS.
  int http_port = -1;

  // TLS: PEM certificate chain and private key of the server (both or neither). With
  // tls_client_ca_file, clients must present a certificate signed by that CA (mutual TLS).
  std::string tls_cert_file;
  std::string tls_key_file;
  std::string tls_client_ca_file;

  // When non-empty, LossService calls need "authorization: Bearer <auth_token>" (health and
  // reflection stay open for probes).
  std::string auth_token;

  // Memory admission (memory.h): bytes of requests and replies that calls in progress may hold;
  // calls past it get RESOURCE_EXHAUSTED at once. 0: 0.6 x the memory limit of the process's
  // cgroup, else of the host (host_limits.h); < 0: unlimited. gRPC's transport buffers are
  // bounded by a resource quota of half that (at least one largest message).
  int64_t max_inflight_bytes = 0;
  // Where the cgroup and /proc files of those defaults are read (tests point it at a fake tree).
  std::string host_root = "/";

  // Connections (0 disables each). Idle connections are closed after max_connection_idle;
  // every connection is closed gracefully after max_connection_age (plus the grace period for
  // calls in flight), so clients that balance round robin reconnect and spread again;
  // keepalive pings find dead peers; at most max_concurrent_streams calls per connection.
  absl::Duration max_connection_idle = absl::Minutes(5);
  absl::Duration max_connection_age = absl::Minutes(30);
  absl::Duration max_connection_age_grace = absl::Minutes(1);
  absl::Duration keepalive_time = absl::Minutes(2);
  absl::Duration keepalive_timeout = absl::Seconds(20);
  int max_concurrent_streams = 256;

  // A Unix-domain socket to listen on besides TCP (empty: none). Plaintext (TLS applies to TCP
  // only; the bearer token applies to both). The file gets `unix_socket_mode`; a stale socket
  // file at the path is replaced, any other file is an error; it is removed at shutdown.
  // Connections are accepted by the server itself, which records each peer's uid and pid
  // (SO_PEERCRED) for the SharedMemory service.
  std::string unix_socket;
  mode_t unix_socket_mode = 0660;

  // Shared-memory regions (docs/shared-memory.md): keys must start with this prefix; empty
  // disables the SharedMemory service (its calls get FAILED_PRECONDITION).
  std::string shared_memory_prefix = "/lossd-";
  absl::Duration shared_memory_default_lease = absl::Seconds(30);  // capped by the max
  absl::Duration shared_memory_max_lease = absl::Minutes(5);
  int64_t shared_memory_max_bytes = int64_t{64} << 30;  // registered by one uid at once
  int shared_memory_max_regions = 1024;                 // registered by one uid at once
  // REGION_KIND_CUDA_IPC regions (docs/shared-memory.md, "CUDA IPC regions"): accepted by the
  // SharedMemory service when this is set, shared memory is enabled and the server computes on
  // a GPU; else their registration gets FAILED_PRECONDITION saying why.
  bool cuda_ipc = true;

  // Where the server gets its CUDA backend, its GPU's UUID and opens CUDA IPC handles; each
  // empty function means the real one of kernels/backend.h (MakeCudaBackend, CudaDeviceUuid,
  // OpenCudaIpcMemory). Tests on hosts without a GPU set them to fakes.
  struct CudaSeams {
    std::function<absl::StatusOr<std::unique_ptr<kernels::Backend>>()> make_backend;
    std::function<std::string()> device_uuid;
    std::function<absl::StatusOr<kernels::DeviceMemory>(std::string_view handle, uint64_t offset,
                                                        uint64_t bytes)>
        open_ipc;
  };
  CudaSeams cuda_seams;
};

class RegionResolver;

class LossdServer {
 public:
  // Builds the backends and starts listening. Errors: FAILED_PRECONDITION for kCuda without a
  // GPU, UNAVAILABLE when the address cannot be bound, INVALID_ARGUMENT for bad options.
  static absl::StatusOr<std::unique_ptr<LossdServer>> Start(const ServerOptions& options);
  ~LossdServer();  // Shutdown(now) if still running

  int port() const;                 // the bound port
  int metrics_port() const;         // the bound metrics port, 0 when disabled
  int http_port() const;            // the bound KServe v2 REST port, 0 when disabled
  std::string device_summary() const;  // "cpu" or "cpu,cuda (NVIDIA H100 ...)"
  int64_t chunks_done() const;      // units of kernel work finished so far (by ended calls)
  int64_t chunks_started() const;   // units of kernel work started so far (live)
  int64_t in_flight_calls() const;  // LossService calls being handled now
  // Calls gRPC has accepted and not finished, for every service on this server, including
  // those whose request is still arriving (channelz: the server's calls, at most the streams
  // open on its TCP connections); -1 when channelz cannot say.
  int64_t open_calls() const;
  int workers() const;                 // compute workers in force
  int cpu_threads() const;             // CPU kernel threads in force
  int64_t max_inflight_bytes() const;  // the memory admission limit in force (0: unlimited)
  int64_t held_bytes() const;          // bytes calls in progress hold in that budget
  int64_t memory_trims() const;        // times freed memory was returned to the OS
  // Over all cancelled calls: chunks computed after the cancel was seen, and the longest time
  // from seeing a cancel to the end of the computation it stopped.
  int64_t chunks_after_cancel() const;
  int64_t max_cancel_stop_ns() const;

  // The Unix socket's path (empty without one) and the connections accepted on it so far.
  const std::string& unix_socket() const;
  int64_t unix_connections() const;
  // Shared memory: whether the SharedMemory service accepts regions, the key prefix (empty when
  // disabled: Capabilities.shared_memory and .shared_memory_prefix), the resolver of tensor
  // references (null when disabled; it lives as long as this server) and the regions
  // registered now.
  bool shared_memory_enabled() const;
  const std::string& shared_memory_prefix() const;
  const RegionResolver* region_resolver() const;
  int64_t shared_memory_regions() const;
  // REGION_KIND_CUDA_IPC regions are accepted (Capabilities.cuda_ipc).
  bool cuda_ipc_enabled() const;

  // Graceful drain: health turns NOT_SERVING and new LossService calls get UNAVAILABLE, while
  // calls in flight go on, including those whose request is still arriving (they get
  // UNAVAILABLE once it has). Waits up to `deadline` until gRPC has no open call, then stops;
  // calls still open at the deadline are cancelled.
  void Shutdown(absl::Duration deadline);
  // Blocks until the server has shut down.
  void Wait();

 private:
  struct Impl;
  explicit LossdServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace lossd::server

#endif  // LOSSD_SERVER_SERVER_H_
