#include "server/server.h"

#include <grpc/grpc.h>
#include <grpc/support/alloc.h>
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/resource_quota.h>

#include <cmath>
#include <fstream>
#include <optional>
#include <set>
#include <sstream>
#include <thread>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "server/core.h"
#include "google/protobuf/struct.pb.h"
#include "google/protobuf/util/json_util.h"
#include "server/host_limits.h"
#include "server/log.h"
#include "lossd/kernels/backend.h"
#include "lossd/v1/lossd.grpc.pb.h"
#include "server/metrics.h"
#include "server/oip_http.h"
#include "server/oip_service.h"
#include "server/peer_identity.h"
#include "server/regions.h"
#include "server/service.h"
#include "server/oip_shm.h"
#include "server/shm_registry.h"
#include "server/wire.h"

namespace lossd::server {

namespace {

absl::StatusOr<std::string> ReadFile(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::InvalidArgumentError(absl::StrCat("cannot read ", what, " ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeCredentials(
    const ServerOptions& o) {
  if (o.tls_cert_file.empty() != o.tls_key_file.empty()) {
    return absl::InvalidArgumentError("TLS needs both a certificate and a private key file");
  }
  if (o.tls_cert_file.empty()) {
    if (!o.tls_client_ca_file.empty()) {
      return absl::InvalidArgumentError("a client CA (mutual TLS) needs a server certificate");
    }
    return grpc::InsecureServerCredentials();
  }
  auto cert = ReadFile(o.tls_cert_file, "TLS certificate");
  if (!cert.ok()) return cert.status();
  auto key = ReadFile(o.tls_key_file, "TLS private key");
  if (!key.ok()) return key.status();
  grpc::SslServerCredentialsOptions ssl(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  ssl.pem_key_cert_pairs.push_back({*key, *cert});
  if (!o.tls_client_ca_file.empty()) {
    auto ca = ReadFile(o.tls_client_ca_file, "client CA");
    if (!ca.ok()) return ca.status();
    ssl.pem_root_certs = *ca;
    ssl.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  return grpc::SslServerCredentials(ssl);
}

// ---- channelz: the calls gRPC holds, including those not yet handed to a handler ----------
//
// gRPC gives a unary or client-streaming handler its call only once the first message has
// fully arrived, and grpc::Server::Shutdown kills the calls still receiving theirs (the client
// sees CANCELLED). The drain therefore waits for gRPC's own count of open calls, which channelz
// keeps per server: calls started minus calls succeeded and failed.

// A channelz JSON document as a protobuf Struct; nullopt when it does not parse.
std::optional<google::protobuf::Struct> ChannelzJson(char* json) {
  if (json == nullptr) return std::nullopt;
  google::protobuf::Struct doc;
  const bool ok = google::protobuf::util::JsonStringToMessage(json, &doc).ok();
  gpr_free(json);
  if (!ok) return std::nullopt;
  return doc;
}

// An int64 field of a channelz object (rendered as a JSON string; absent means 0).
int64_t ChannelzCount(const google::protobuf::Struct& object, const char* name) {
  auto it = object.fields().find(name);
  if (it == object.fields().end()) return 0;
  int64_t v = 0;
  if (it->second.has_string_value() && absl::SimpleAtoi(it->second.string_value(), &v)) return v;
  if (it->second.has_number_value()) return static_cast<int64_t>(it->second.number_value());
  return 0;
}

// The ids of every gRPC server of this process.
std::set<int64_t> ChannelzServerIds() {
  std::set<int64_t> ids;
  int64_t start = 0;
  for (int page = 0; page < 100; ++page) {
    std::optional<google::protobuf::Struct> doc = ChannelzJson(grpc_channelz_get_servers(start));
    if (!doc) break;
    auto servers = doc->fields().find("server");
    if (servers == doc->fields().end()) break;
    for (const auto& v : servers->second.list_value().values()) {
      const auto& ref = v.struct_value().fields().find("ref");
      if (ref == v.struct_value().fields().end()) continue;
      const int64_t id = ChannelzCount(ref->second.struct_value(), "serverId");
      ids.insert(id);
      start = std::max(start, id + 1);
    }
    auto end = doc->fields().find("end");
    if (end == doc->fields().end() || end->second.bool_value()) break;
  }
  return ids;
}

// Open calls of channelz server `id`, or -1 when channelz cannot say.
int64_t ChannelzOpenCalls(int64_t id) {
  if (id <= 0) return -1;
  std::optional<google::protobuf::Struct> doc = ChannelzJson(grpc_channelz_get_server(id));
  if (!doc) return -1;
  auto server = doc->fields().find("server");
  if (server == doc->fields().end()) return -1;
  auto data = server->second.struct_value().fields().find("data");
  if (data == server->second.struct_value().fields().end()) return 0;
  const auto& d = data->second.struct_value();
  return ChannelzCount(d, "callsStarted") - ChannelzCount(d, "callsSucceeded") -
         ChannelzCount(d, "callsFailed");
}

// Streams open on the live connections of channelz server `id` (started and neither succeeded
// nor failed), or -1 when channelz cannot say. Unlike the server's call counters, which never
// count a call that the client cancels while its request is still arriving (gRPC leaves it
// "started" forever), the transport closes every stream of a connection, and a closed
// connection leaves the list.
int64_t ChannelzOpenStreams(int64_t id) {
  if (id <= 0) return -1;
  int64_t open = 0;
  int64_t start = 0;
  for (int page = 0; page < 1000; ++page) {
    std::optional<google::protobuf::Struct> doc =
        ChannelzJson(grpc_channelz_get_server_sockets(id, start, 100));
    if (!doc) return -1;
    auto refs = doc->fields().find("socketRef");
    if (refs == doc->fields().end()) return open;
    for (const auto& v : refs->second.list_value().values()) {
      const int64_t socket_id = ChannelzCount(v.struct_value(), "socketId");
      start = std::max(start, socket_id + 1);
      std::optional<google::protobuf::Struct> socket = ChannelzJson(grpc_channelz_get_socket(socket_id));
      if (!socket) continue;  // closed meanwhile
      auto s = socket->fields().find("socket");
      if (s == socket->fields().end()) continue;
      auto data = s->second.struct_value().fields().find("data");
      if (data == s->second.struct_value().fields().end()) continue;
      const auto& d = data->second.struct_value();
      open += ChannelzCount(d, "streamsStarted") - ChannelzCount(d, "streamsSucceeded") -
              ChannelzCount(d, "streamsFailed");
    }
    auto end = doc->fields().find("end");
    if (end == doc->fields().end() || end->second.bool_value()) return open;
  }
  return open;
}

// Servers are told apart by the channelz id that appears when one starts; starts are
// serialized so that two servers starting at once in one process cannot swap ids.
absl::Mutex start_mu;

int64_t MillisArg(absl::Duration d) {
  return d <= absl::ZeroDuration() ? 0 : absl::ToInt64Milliseconds(d);
}

}  // namespace

struct LossdServer::Impl {
  // Declared before the core: spans of regions may be held by computations until they end.
  PeerTable peers;
  std::unique_ptr<ShmRegistry> shm;  // null when shared memory is disabled
  // Triton's system shared memory extension over `shm` (null when disabled).
  std::unique_ptr<OipSharedMemory> oip_shm;
  std::unique_ptr<Metrics> metrics;
  std::unique_ptr<Core> core;
  std::unique_ptr<LossServiceImpl> service;
  std::unique_ptr<OipServiceImpl> oip_service;  // inference.GRPCInferenceService (KServe v2)
  std::unique_ptr<SharedMemoryService> shm_service;
  std::unique_ptr<grpc::Server> server;
  std::unique_ptr<OipHttpServer> http;  // KServe v2 REST (null when disabled); before the core
                                        // in destruction
  std::unique_ptr<UnixListener> unix_listener;  // stopped before the server shuts down
  std::string unix_socket;
  std::string shm_prefix;  // empty when disabled
  int port = 0;
  int64_t channelz_id = 0;  // 0: unknown
  int cpu_threads = 1;      // in force (the option, else the CPU limit)
  std::string devices;
  bool shut_down = false;
};

LossdServer::LossdServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

LossdServer::~LossdServer() {
  if (impl_ && !impl_->shut_down) Shutdown(absl::ZeroDuration());
}

int LossdServer::port() const { return impl_->port; }
int LossdServer::metrics_port() const { return impl_->metrics->port(); }
int LossdServer::http_port() const { return impl_->http ? impl_->http->port() : 0; }
std::string LossdServer::device_summary() const { return impl_->devices; }
int64_t LossdServer::chunks_done() const { return impl_->core->executor().chunks_done(); }
int64_t LossdServer::chunks_started() const { return impl_->core->executor().chunks_started(); }
int64_t LossdServer::in_flight_calls() const { return impl_->core->admission().in_flight(); }
int64_t LossdServer::open_calls() const {
  // Calls open in gRPC: the server's call count, but no more than the streams open on its live
  // connections (the call count keeps calls cancelled while their request arrived). Connections
  // accepted on the Unix socket have no channelz socket (gRPC adds them from a descriptor), so
  // once there has been one, the call count alone decides.
  const int64_t calls = ChannelzOpenCalls(impl_->channelz_id);
  if (impl_->unix_listener && impl_->unix_listener->accepted() > 0) return calls;
  const int64_t streams = ChannelzOpenStreams(impl_->channelz_id);
  if (calls < 0 || streams < 0) return std::max(calls, streams);
  return std::min(calls, streams);
}
int LossdServer::workers() const { return impl_->core->config().workers; }
int LossdServer::cpu_threads() const { return impl_->cpu_threads; }
int64_t LossdServer::max_inflight_bytes() const { return impl_->core->executor().memory().limit(); }
int64_t LossdServer::held_bytes() const { return impl_->core->executor().memory().held(); }
int64_t LossdServer::memory_trims() const { return impl_->core->executor().memory().trims(); }
int64_t LossdServer::chunks_after_cancel() const {
  return impl_->core->executor().chunks_after_cancel();
}
int64_t LossdServer::max_cancel_stop_ns() const {
  return impl_->core->executor().max_cancel_stop_ns();
}
const std::string& LossdServer::unix_socket() const { return impl_->unix_socket; }
int64_t LossdServer::unix_connections() const {
  return impl_->unix_listener ? impl_->unix_listener->accepted() : 0;
}
bool LossdServer::shared_memory_enabled() const { return impl_->shm != nullptr; }
const std::string& LossdServer::shared_memory_prefix() const { return impl_->shm_prefix; }
const RegionResolver* LossdServer::region_resolver() const { return impl_->shm.get(); }
bool LossdServer::cuda_ipc_enabled() const {
  return impl_->shm != nullptr && impl_->shm->cuda_ipc_enabled();
}
int64_t LossdServer::shared_memory_regions() const {
  return impl_->shm ? impl_->shm->regions() : 0;
}

absl::StatusOr<std::unique_ptr<LossdServer>> LossdServer::Start(const ServerOptions& options) {
  if (options.max_message_bytes <= 0 || options.max_message_bytes > (int64_t{1} << 31) - 1) {
    return absl::InvalidArgumentError(absl::StrCat("max_message_bytes ",
                                                   options.max_message_bytes,
                                                   " is outside [1, 2147483647]"));
  }
  if (options.max_elements <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_elements ", options.max_elements, " must be positive"));
  }
  auto creds = MakeCredentials(options);
  if (!creds.ok()) return creds.status();
  if (options.http_port >= 0 && !options.tls_cert_file.empty()) {
    return absl::InvalidArgumentError(
        "the KServe v2 REST port (http_port) serves plaintext HTTP and cannot be combined with "
        "TLS; terminate TLS in front of it or serve the gRPC API only (docs/interop.md)");
  }
  // CPU and memory defaults follow the cgroup's limits (a container's quota), else the host's.
  const HostLimits host = ReadHostLimits(options.host_root);
  const int cpus = std::max(1, static_cast<int>(std::ceil(host.cpus - 1e-9)));
  std::unique_ptr<kernels::Backend> cuda;
  std::string cuda_name;
  if (options.device != DevicePolicy::kCpu) {
    kernels::CudaOptions cuda_options;
    cuda_options.float_math = options.cuda_float_math;
    auto backend = options.cuda_seams.make_backend ? options.cuda_seams.make_backend()
                                                   : kernels::MakeCudaBackend(cuda_options);
    if (backend.ok()) {
      cuda = *std::move(backend);
      cuda_name = kernels::CudaDeviceName();
    } else if (options.device == DevicePolicy::kCuda) {
      return backend.status();
    }
  }
  // CUDA IPC regions need the GPU the CUDA backend computes on, named by its UUID
  // (docs/shared-memory.md, "CUDA IPC regions").
  std::string cuda_uuid;
  if (cuda != nullptr) {
    cuda_uuid = options.cuda_seams.device_uuid ? options.cuda_seams.device_uuid()
                                               : kernels::CudaDeviceUuid();
  }
  const bool cuda_ipc = cuda != nullptr && options.cuda_ipc && !cuda_uuid.empty() &&
                        !options.shared_memory_prefix.empty();
  std::string cuda_ipc_unavailable;
  if (!options.cuda_ipc) {
    cuda_ipc_unavailable = "CUDA IPC is disabled on this server (--cuda_ipc=false)";
  } else if (cuda == nullptr) {
    cuda_ipc_unavailable =
        options.device == DevicePolicy::kCpu ? "this server computes on the CPU only (--device=cpu)"
        : !kernels::CudaCompiled()           ? "this server was built without CUDA"
        : kernels::CudaDeviceCount() == 0    ? "this server has no usable GPU"
                                             : "this server has no usable CUDA backend";
  } else if (cuda_uuid.empty()) {
    cuda_ipc_unavailable = "the UUID of this server's GPU is unknown";
  }
  auto impl = std::make_unique<Impl>();
  if (!options.shared_memory_prefix.empty()) {
    ShmRegistryOptions shm;
    shm.prefix = options.shared_memory_prefix;
    shm.max_lease = options.shared_memory_max_lease;
    shm.default_lease =
        std::min(options.shared_memory_default_lease, options.shared_memory_max_lease);
    shm.max_bytes_per_uid = options.shared_memory_max_bytes;
    shm.max_regions_per_uid = options.shared_memory_max_regions;
    shm.cuda_ipc_enabled = cuda_ipc;
    if (!cuda_ipc) shm.cuda_ipc_unavailable = cuda_ipc_unavailable;
    shm.cuda_device_uuid = cuda_uuid;
    shm.open_cuda_ipc = options.cuda_seams.open_ipc;
    auto registry = ShmRegistry::Create(std::move(shm));
    if (!registry.ok()) return registry.status();
    impl->shm = *std::move(registry);
    impl->shm_prefix = options.shared_memory_prefix;
  }
  if (!options.unix_socket.empty()) {
    auto listener = UnixListener::Bind(options.unix_socket, options.unix_socket_mode);
    if (!listener.ok()) return listener.status();
    impl->unix_listener = *std::move(listener);
    impl->unix_socket = options.unix_socket;
  }
  impl->devices = cuda ? absl::StrCat("cpu,cuda (", cuda_name, ")") : "cpu";
  impl->metrics = std::make_unique<Metrics>();
  if (options.metrics_port >= 0) {
    if (absl::Status s = impl->metrics->Serve(options.metrics_host, options.metrics_port);
        !s.ok()) {
      return s;
    }
  }
  int64_t inflight_bytes = options.max_inflight_bytes;
  if (inflight_bytes == 0) {
    inflight_bytes = static_cast<int64_t>(0.6 * static_cast<double>(host.memory_bytes));
    Log(LogLevel::kInfo, absl::StrCat("max_inflight_bytes=", inflight_bytes, " (0.6 x ",
                                      DescribeHostLimits(host), ")"));
  }
  if (inflight_bytes < 0) inflight_bytes = 0;  // unlimited
  CoreConfig config;
  config.max_inflight_bytes = inflight_bytes;
  config.limits.max_elements = options.max_elements;
  config.limits.max_reply_bytes = options.max_message_bytes;
  config.max_message_bytes = options.max_message_bytes;
  config.workers = options.workers > 0 ? options.workers : cpus;
  impl->cpu_threads = options.cpu_threads > 0 ? options.cpu_threads : cpus;
  config.queue_capacity = options.queue_capacity;
  config.stream_window = std::max(1, options.stream_window);
  config.inline_elements = options.inline_elements;
  config.batch_max_delay = options.batch_max_delay;
  config.batch_max_elements = options.batch_max_elements;
  config.auth_token = options.auth_token;
  if (impl->shm != nullptr) config.shared_memory_prefix = options.shared_memory_prefix;
  config.cuda_ipc = cuda_ipc;
  config.cuda_device_uuid = cuda_uuid;
  impl->core = std::make_unique<Core>(config, kernels::MakeCpuBackend({impl->cpu_threads}),
                                      std::move(cuda), cuda_name, impl->metrics.get());
  impl->service = std::make_unique<LossServiceImpl>(impl->core.get());
  if (impl->shm != nullptr) {
    impl->oip_shm =
        std::make_unique<OipSharedMemory>(impl->shm.get(), &impl->peers, options.host_root);
  }
  impl->oip_service = std::make_unique<OipServiceImpl>(impl->core.get(), impl->oip_shm.get());
  impl->core->planner().set_region_resolver(impl->shm.get());  // null: references are refused
  impl->shm_service = std::make_unique<SharedMemoryService>(
      impl->shm.get(), &impl->peers, options.auth_token, options.host_root);
  if (options.http_port >= 0) {
    auto http = OipHttpServer::Start(impl->core.get(), options.host, options.http_port,
                                     impl->oip_shm.get());
    if (!http.ok()) return http.status();
    impl->http = *std::move(http);
  }

  InstallProtobufLogHandler();
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  const int max_bytes = static_cast<int>(options.max_message_bytes);
  builder.SetMaxReceiveMessageSize(max_bytes);
  builder.SetMaxSendMessageSize(max_bytes);
  // A second server on a port in use must fail, not share it (gRPC enables SO_REUSEPORT).
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.AddChannelArgument(GRPC_ARG_ENABLE_CHANNELZ, 1);  // the drain counts open calls
  auto add_ms = [&builder](const char* arg, absl::Duration d) {
    if (const int64_t ms = MillisArg(d); ms > 0) {
      builder.AddChannelArgument(arg, static_cast<int>(std::min<int64_t>(ms, INT32_MAX)));
    }
  };
  add_ms(GRPC_ARG_MAX_CONNECTION_IDLE_MS, options.max_connection_idle);
  add_ms(GRPC_ARG_MAX_CONNECTION_AGE_MS, options.max_connection_age);
  add_ms(GRPC_ARG_MAX_CONNECTION_AGE_GRACE_MS, options.max_connection_age_grace);
  add_ms(GRPC_ARG_KEEPALIVE_TIME_MS, options.keepalive_time);
  add_ms(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, options.keepalive_timeout);
  if (options.max_concurrent_streams > 0) {
    builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS, options.max_concurrent_streams);
  }
  if (inflight_bytes > 0) {
    // Transport buffers (messages still arriving, replies being sent) count against gRPC's
    // resource quota: half the budget, but at least one largest message. Under pressure gRPC
    // shrinks flow-control windows and resets the largest streams (RESOURCE_EXHAUSTED) rather
    // than buffer them, so the process holds at most about 1.5x the budget.
    grpc::ResourceQuota quota("lossd");
    quota.Resize(static_cast<size_t>(
        std::max(inflight_bytes / 2, options.max_message_bytes + (int64_t{1} << 20))));
    builder.SetResourceQuota(quota);
  }
  const std::string address = absl::StrCat(
      options.host.find(':') != std::string::npos ? absl::StrCat("[", options.host, "]")
                                                  : options.host,
      ":", options.port);
  builder.AddListeningPort(address, *creds, &impl->port);
  builder.RegisterService(impl->service.get());
  builder.RegisterService(impl->oip_service.get());
  builder.RegisterService(impl->shm_service.get());
  {
    absl::MutexLock lock(&start_mu);
    const std::set<int64_t> before = ChannelzServerIds();
    impl->server = builder.BuildAndStart();
    for (int64_t id : ChannelzServerIds()) {
      if (!before.count(id)) impl->channelz_id = std::max(impl->channelz_id, id);
    }
  }
  if (impl->server == nullptr || impl->port == 0) {
    return absl::UnavailableError(absl::StrCat(
        "cannot listen on ", address, " (in use by another process, or not an address here)"));
  }
  if (impl->channelz_id == 0) {
    Log(LogLevel::kWarning,
        "channelz shows no id for this server: the drain waits only for calls being handled");
  }
  impl->shm_service->set_server_port(impl->port);
  if (impl->oip_shm) {
    impl->oip_shm->set_port(OipProtocol::kGrpc, impl->port);
    if (impl->http) impl->oip_shm->set_port(OipProtocol::kRest, impl->http->port());
  }
  if (impl->unix_listener) impl->unix_listener->Start(impl->server.get(), &impl->peers);
  impl->server->GetHealthCheckService()->SetServingStatus(true);
  impl->server->GetHealthCheckService()->SetServingStatus(
      std::string(v1::LossService::service_full_name()), true);
  impl->server->GetHealthCheckService()->SetServingStatus(
      std::string(inference::GRPCInferenceService::service_full_name()), true);
  return std::unique_ptr<LossdServer>(new LossdServer(std::move(impl)));
}

void LossdServer::Shutdown(absl::Duration deadline) {
  if (impl_->shut_down) return;
  impl_->shut_down = true;
  const absl::Time end = absl::Now() + deadline;
  // Drain while still listening: probes see NOT_SERVING, new calls get UNAVAILABLE, and calls
  // in flight finish. Then stop, cancelling whatever is left at the deadline.
  impl_->core->admission().set_draining(true);
  impl_->shm_service->set_draining(true);
  if (auto* health = impl_->server->GetHealthCheckService()) {
    health->SetServingStatus(false);
    health->SetServingStatus(std::string(v1::LossService::service_full_name()), false);
    health->SetServingStatus(std::string(inference::GRPCInferenceService::service_full_name()),
                             false);
  }
  Log(LogLevel::kInfo, absl::StrCat("draining: ", impl_->core->admission().in_flight(),
                                    " calls being handled, ", open_calls(),
                                    " open in gRPC, deadline ", absl::FormatDuration(deadline)));
  // Calls whose request is still arriving are open in gRPC but not yet handled: wait for them
  // too (they get UNAVAILABLE from Admit once their request is in). Health Watch streams keep
  // this count up until the deadline. The count must stay at 0 for a quiet period, so that
  // streams that clients opened just as the drain began are seen before gRPC stops (it would
  // cancel those whose request is still arriving).
  constexpr absl::Duration kQuiet = absl::Milliseconds(200);
  absl::Time idle_since = absl::InfiniteFuture();
  for (absl::Time now = absl::Now(); now < end; now = absl::Now()) {
    if (impl_->core->admission().in_flight() > 0 || open_calls() > 0) {
      idle_since = absl::InfiniteFuture();
    } else if (idle_since == absl::InfiniteFuture()) {
      idle_since = now;
    } else if (now - idle_since >= kQuiet) {
      break;
    }
    absl::SleepFor(absl::Milliseconds(5));
  }
  Log(LogLevel::kInfo, absl::StrCat("drained: ", impl_->core->admission().in_flight(),
                                    " calls being handled, ", open_calls(),
                                    " open in gRPC; stopping"));
  // REST calls in flight count in in_flight() (so the wait above covered them): stop it, which
  // waits for the requests being written.
  if (impl_->http) impl_->http->Stop();
  // No new connections on the Unix socket once gRPC stops; its file goes with it.
  if (impl_->unix_listener) impl_->unix_listener->Stop();
  impl_->server->Shutdown(absl::ToChronoTime(end));
  impl_->server->Wait();
}

void LossdServer::Wait() { impl_->server->Wait(); }

}  // namespace lossd::server
