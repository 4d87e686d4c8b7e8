// lossd: the loss-evaluation server. Flags are parsed here and nowhere else.
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "server/log.h"
#include "lossd/kernels/backend.h"
#include "lossd/v1/lossd.grpc.pb.h"
#include "server/server.h"

ABSL_FLAG(std::string, host, "0.0.0.0", "Address to listen on (127.0.0.1 for loopback only).");
ABSL_FLAG(int, port, 50051, "Port to listen on; 0 picks a free port (printed at startup).");
ABSL_FLAG(std::string, device, "auto",
          "auto: use CUDA when a GPU is usable, else CPU; cpu: never use CUDA; cuda: require a "
          "GPU and fail to start without one.");
ABSL_FLAG(int64_t, max_message_bytes, int64_t{256} << 20,
          "Largest request or response message in bytes.");
ABSL_FLAG(int64_t, max_elements, int64_t{1} << 28, "Most elements per tensor in one request.");
ABSL_FLAG(int, workers, 0,
          "Compute worker threads; 0 = the CPU limit of the container (cgroup quota), else "
          "the number of cores.");
ABSL_FLAG(int, queue_capacity, 256,
          "Requests that may wait for a worker; more get RESOURCE_EXHAUSTED.");
ABSL_FLAG(int, cpu_threads, 0,
          "Threads used by the CPU kernels; 0 = the CPU limit of the container (cgroup quota), "
          "else the number of cores.");
ABSL_FLAG(bool, cuda_float_math, true,
          "CUDA: all-float element math for float32/half inputs; false combines in double "
          "(same 4-ulp bound; see docs/perf.md for the speed of each).");
ABSL_FLAG(int64_t, inline_elements, 16384,
          "Unary requests with at most this many elements are computed on the gRPC thread.");
ABSL_FLAG(absl::Duration, batch_max_delay, absl::ZeroDuration(),
          "CUDA requests only: concurrent small requests with the same loss, dtypes and "
          "options wait up to this long (e.g. 100us) to be computed together, each with "
          "the same result bits as alone; 0 turns batching off. CPU requests never wait.");
ABSL_FLAG(int64_t, batch_max_elements, 65536,
          "CUDA requests only: most elements of one dynamic batch (--batch_max_delay); a "
          "batch runs as soon as it is full, and larger requests run alone.");
ABSL_FLAG(int, stream_window, 4, "Batches of one EvaluateStream computed or waiting at once.");
ABSL_FLAG(std::string, metrics_host, "0.0.0.0", "Address of the Prometheus /metrics endpoint.");
ABSL_FLAG(int, metrics_port, -1,
          "Port of the Prometheus /metrics endpoint; -1 disables it, 0 picks a free port.");
ABSL_FLAG(int, http_port, -1,
          "Port of the KServe v2 / Open Inference Protocol REST API (/v2/..., plaintext HTTP, "
          "on --host; docs/interop.md); -1 disables it, 0 picks a free port (printed at "
          "startup). Refused together with --tls_cert.");
ABSL_FLAG(std::string, tls_cert, "", "PEM certificate chain of the server (enables TLS).");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of the server.");
ABSL_FLAG(std::string, tls_client_ca, "",
          "PEM CA bundle; clients must present a certificate it signed (mutual TLS).");
ABSL_FLAG(std::string, auth_token_file, "",
          "File holding a bearer token that LossService calls must present "
          "(\"authorization: Bearer <token>\"); health and reflection stay open.");
ABSL_FLAG(absl::Duration, drain_timeout, absl::Seconds(30),
          "On SIGTERM/SIGINT, how long in-flight calls (including those whose request is still "
          "arriving) may take before they are cancelled.");
ABSL_FLAG(int64_t, max_inflight_bytes, 0,
          "Bytes of requests and replies that calls in progress may hold; calls past it get "
          "RESOURCE_EXHAUSTED at once. 0: 0.6 x the memory limit of the cgroup, else of the "
          "host (logged at startup); negative: unlimited.");
ABSL_FLAG(absl::Duration, max_connection_idle, absl::Minutes(5),
          "Close connections without calls for this long; 0 never.");
ABSL_FLAG(absl::Duration, max_connection_age, absl::Minutes(30),
          "Close every connection gracefully after this long, so round-robin clients rebalance; "
          "0 never.");
ABSL_FLAG(absl::Duration, max_connection_age_grace, absl::Minutes(1),
          "How long calls may go on once max_connection_age closes their connection.");
ABSL_FLAG(absl::Duration, keepalive_time, absl::Minutes(2),
          "Ping idle connections this often to find dead peers; 0 never.");
ABSL_FLAG(absl::Duration, keepalive_timeout, absl::Seconds(20),
          "Close a connection whose keepalive ping is not answered within this time.");
ABSL_FLAG(std::string, log_format, "text",
          "text: \"<UTC time> <LEVEL> <message>\" lines; json: one JSON object per line "
          "({\"time\", \"level\", \"message\"}) for log collectors.");
ABSL_FLAG(std::string, health_check, "",
          "Probe mode for container health checks: ask the gRPC health service at HOST:PORT "
          "(plaintext) whether lossd is SERVING; exit 0 if it answers so within 2 s, else 1. "
          "Starts no server.");
ABSL_FLAG(int, max_concurrent_streams, 256,
          "Most concurrent calls on one connection; 0: gRPC's default.");
ABSL_FLAG(std::string, unix_socket, "",
          "Also listen on this Unix-domain socket (plaintext, local only: TLS applies to TCP; "
          "the bearer token applies to both). A stale socket file there is replaced; the file "
          "is removed at exit. Clients connect to unix:PATH.");
ABSL_FLAG(std::string, unix_socket_mode, "0660",
          "Permissions of the --unix_socket file (octal): who may connect.");
ABSL_FLAG(std::string, shared_memory_prefix, "/lossd-",
          "Clients on this host may register POSIX shared-memory objects whose names start "
          "with this prefix and pass tensors by reference (docs/shared-memory.md); empty "
          "disables the SharedMemory service.");
ABSL_FLAG(absl::Duration, shared_memory_max_lease, absl::Minutes(5),
          "Longest lease of a shared-memory region; a region whose client stops renewing it "
          "is dropped after its lease (default lease 30s, or this if shorter).");
ABSL_FLAG(int64_t, shared_memory_max_bytes, int64_t{64} << 30,
          "Bytes of shared-memory regions one uid may have registered at once.");
ABSL_FLAG(bool, cuda_ipc, true,
          "Accept REGION_KIND_CUDA_IPC regions (a local client's CUDA memory, computed on the "
          "GPU in place; docs/shared-memory.md) when the server computes on a GPU and shared "
          "memory is enabled; false refuses them.");

namespace {

// --health_check: one grpc.health.v1 Check of the LossService; 0 when SERVING.
int HealthCheck(const std::string& target) {
  auto channel = grpc::CreateChannel(target, grpc::InsecureChannelCredentials());
  auto stub = grpc::health::v1::Health::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(std::string(lossd::v1::LossService::service_full_name()));
  grpc::health::v1::HealthCheckResponse response;
  const grpc::Status status = stub->Check(&context, request, &response);
  if (!status.ok()) {
    std::fprintf(stderr, "lossd health check of %s: %s %s\n", target.c_str(),
                 absl::StatusCodeToString(static_cast<absl::StatusCode>(status.error_code()))
                     .c_str(),
                 status.error_message().c_str());
    return 1;
  }
  const bool serving = response.status() == grpc::health::v1::HealthCheckResponse::SERVING;
  std::fprintf(stderr, "lossd health check of %s: %s\n", target.c_str(),
               grpc::health::v1::HealthCheckResponse::ServingStatus_Name(response.status())
                   .c_str());
  return serving ? 0 : 1;
}

// "lossd 0.1.0 (Release build, CUDA compiled in)" for --version.
std::string VersionString() {
  return absl::StrCat("lossd ", LOSSD_VERSION, " (", LOSSD_BUILD_TYPE, " build, CUDA ",
                      lossd::kernels::CudaCompiled() ? "compiled in" : "not compiled in",
                      ")\n");
}

}  // namespace

int main(int argc, char** argv) {
  // Debian's Abseil is built without NDEBUG, which turns on the Mutex deadlock detector: a
  // graph update on every lock, measured at ~5% of server CPU on small requests. Debug builds
  // (NDEBUG unset) keep it.
#ifdef NDEBUG
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
#endif
  absl::SetProgramUsageMessage("gRPC loss-evaluation service. Usage: lossd [--flags]");
  absl::FlagsUsageConfig usage;
  // --help lists this program's flags (by default only those of a file named like the binary).
  usage.contains_help_flags = [](absl::string_view file) {
    return absl::StrContains(file, "server/main.cc");
  };
  usage.contains_helpshort_flags = usage.contains_help_flags;
  usage.version_string = VersionString;
  usage.normalize_filename = [](absl::string_view file) {
    const size_t at = file.rfind("server/main.cc");
    return std::string(at == absl::string_view::npos ? file : file.substr(at));
  };
  absl::SetFlagsUsageConfig(usage);
  absl::ParseCommandLine(argc, argv);
  if (const std::string target = absl::GetFlag(FLAGS_health_check); !target.empty()) {
    return HealthCheck(target);
  }
  if (const std::string format = absl::GetFlag(FLAGS_log_format); format == "json") {
    lossd::server::SetLogFormat(lossd::server::LogFormat::kJson);
  } else if (format != "text") {
    std::fprintf(stderr, "lossd: --log_format must be text or json, not \"%s\"\n",
                 format.c_str());
    return 2;
  }
  using lossd::server::DevicePolicy;
  using lossd::server::Log;
  using lossd::server::LogLevel;

  lossd::server::ServerOptions options;
  options.host = absl::GetFlag(FLAGS_host);
  options.port = absl::GetFlag(FLAGS_port);
  const std::string device = absl::GetFlag(FLAGS_device);
  if (device == "auto") {
    options.device = DevicePolicy::kAuto;
  } else if (device == "cpu") {
    options.device = DevicePolicy::kCpu;
  } else if (device == "cuda") {
    options.device = DevicePolicy::kCuda;
  } else {
    std::fprintf(stderr, "lossd: --device must be auto, cpu or cuda, not \"%s\"\n",
                 device.c_str());
    return 2;
  }
  options.max_message_bytes = absl::GetFlag(FLAGS_max_message_bytes);
  options.max_elements = absl::GetFlag(FLAGS_max_elements);
  options.workers = absl::GetFlag(FLAGS_workers);
  options.queue_capacity = absl::GetFlag(FLAGS_queue_capacity);
  options.cpu_threads = absl::GetFlag(FLAGS_cpu_threads);
  options.cuda_float_math = absl::GetFlag(FLAGS_cuda_float_math);
  options.stream_window = absl::GetFlag(FLAGS_stream_window);
  options.inline_elements = absl::GetFlag(FLAGS_inline_elements);
  options.batch_max_delay = absl::GetFlag(FLAGS_batch_max_delay);
  options.batch_max_elements = absl::GetFlag(FLAGS_batch_max_elements);
  if (options.batch_max_delay < absl::ZeroDuration() || options.batch_max_elements < 1) {
    std::fprintf(stderr, "lossd: --batch_max_delay must be >= 0 and --batch_max_elements >= 1\n");
    return 2;
  }
  options.metrics_host = absl::GetFlag(FLAGS_metrics_host);
  options.metrics_port = absl::GetFlag(FLAGS_metrics_port);
  options.http_port = absl::GetFlag(FLAGS_http_port);
  options.tls_cert_file = absl::GetFlag(FLAGS_tls_cert);
  options.tls_key_file = absl::GetFlag(FLAGS_tls_key);
  options.tls_client_ca_file = absl::GetFlag(FLAGS_tls_client_ca);
  options.max_inflight_bytes = absl::GetFlag(FLAGS_max_inflight_bytes);
  options.max_connection_idle = absl::GetFlag(FLAGS_max_connection_idle);
  options.max_connection_age = absl::GetFlag(FLAGS_max_connection_age);
  options.max_connection_age_grace = absl::GetFlag(FLAGS_max_connection_age_grace);
  options.keepalive_time = absl::GetFlag(FLAGS_keepalive_time);
  options.keepalive_timeout = absl::GetFlag(FLAGS_keepalive_timeout);
  options.max_concurrent_streams = absl::GetFlag(FLAGS_max_concurrent_streams);
  options.unix_socket = absl::GetFlag(FLAGS_unix_socket);
  {
    const std::string mode = absl::GetFlag(FLAGS_unix_socket_mode);
    char* end = nullptr;
    const unsigned long value = std::strtoul(mode.c_str(), &end, 8);
    if (mode.empty() || end == nullptr || *end != '\0' || value > 0777) {
      std::fprintf(stderr, "lossd: --unix_socket_mode must be an octal mode such as 0660, not "
                   "\"%s\"\n", mode.c_str());
      return 2;
    }
    options.unix_socket_mode = static_cast<mode_t>(value);
  }
  options.shared_memory_prefix = absl::GetFlag(FLAGS_shared_memory_prefix);
  options.shared_memory_max_lease = absl::GetFlag(FLAGS_shared_memory_max_lease);
  options.shared_memory_max_bytes = absl::GetFlag(FLAGS_shared_memory_max_bytes);
  options.cuda_ipc = absl::GetFlag(FLAGS_cuda_ipc);
  if (const std::string path = absl::GetFlag(FLAGS_auth_token_file); !path.empty()) {
    std::ifstream in(path);
    std::string token;
    if (!in || !std::getline(in, token) || token.empty()) {
      std::fprintf(stderr, "lossd: cannot read a token from --auth_token_file=%s\n", path.c_str());
      return 2;
    }
    while (!token.empty() && (token.back() == '\r' || token.back() == ' ')) token.pop_back();
    options.auth_token = token;
  }

  // Block the shutdown signals before any thread starts, then wait for them here.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  auto server = lossd::server::LossdServer::Start(options);
  if (!server.ok()) {
    std::fprintf(stderr, "lossd: cannot start: %s\n", server.status().ToString().c_str());
    return 1;
  }
  Log(LogLevel::kInfo,
      absl::StrCat("lossd ", LOSSD_VERSION, " config: host=", options.host,
                   " port=", (*server)->port(), " device=", device,
                   " devices=", (*server)->device_summary(),
                   " max_message_bytes=", options.max_message_bytes,
                   " max_elements=", options.max_elements, " workers=", (*server)->workers(),
                   " queue_capacity=", options.queue_capacity,
                   " cpu_threads=", (*server)->cpu_threads(),
                   " cuda_float_math=", options.cuda_float_math ? "on" : "off",
                   " stream_window=", options.stream_window,
                   " inline_elements=", options.inline_elements,
                   " batch_max_delay=", absl::FormatDuration(options.batch_max_delay),
                   " batch_max_elements=", options.batch_max_elements,
                   " metrics_port=", (*server)->metrics_port(),
                   " http_port=", (*server)->http_port(),
                   " tls=", options.tls_cert_file.empty() ? "off"
                            : options.tls_client_ca_file.empty() ? "on" : "mutual",
                   " auth=", options.auth_token.empty() ? "off" : "bearer-token",
                   " drain_timeout=", absl::FormatDuration(absl::GetFlag(FLAGS_drain_timeout)),
                   " max_inflight_bytes=", (*server)->max_inflight_bytes(),
                   " max_connection_idle=", absl::FormatDuration(options.max_connection_idle),
                   " max_connection_age=", absl::FormatDuration(options.max_connection_age),
                   " keepalive_time=", absl::FormatDuration(options.keepalive_time),
                   " max_concurrent_streams=", options.max_concurrent_streams,
                   " unix_socket=", options.unix_socket.empty() ? "off" : options.unix_socket,
                   " shared_memory=", (*server)->shared_memory_enabled()
                                          ? (*server)->shared_memory_prefix() : "off",
                   " shared_memory_max_lease=",
                   absl::FormatDuration(options.shared_memory_max_lease),
                   " shared_memory_max_bytes=", options.shared_memory_max_bytes,
                   " cuda_ipc=", (*server)->cuda_ipc_enabled() ? "on" : "off"));
  if ((*server)->metrics_port() > 0) {
    std::fprintf(stderr, "lossd metrics on %s:%d\n", options.metrics_host.c_str(),
                 (*server)->metrics_port());
  }
  if ((*server)->http_port() > 0) {
    std::fprintf(stderr, "lossd http on %s:%d\n", options.host.c_str(), (*server)->http_port());
  }
  if (!options.unix_socket.empty()) {
    std::fprintf(stderr, "lossd unix socket at %s\n", options.unix_socket.c_str());
  }
  std::fprintf(stderr, "lossd listening on %s:%d\n", options.host.c_str(), (*server)->port());
  std::fflush(stderr);

  int sig = 0;
  sigwait(&signals, &sig);
  Log(LogLevel::kInfo, absl::StrCat("received signal ", sig, ", draining"));
  (*server)->Shutdown(absl::GetFlag(FLAGS_drain_timeout));
  Log(LogLevel::kInfo, "stopped");
  return 0;
}
