#include "server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include <fstream>
#include <sstream>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "core.h"
#include "log.h"
#include "lossd/kernels/kernels.h"
#include "metrics.h"
#include "lossd/v1/lossd.grpc.pb.h"
#include "service.h"

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

}  // namespace

struct LossdServer::Impl {
  std::unique_ptr<Metrics> metrics;
  std::unique_ptr<Core> core;
  std::unique_ptr<LossServiceImpl> service;
  std::unique_ptr<grpc::Server> server;
  int port = 0;
  std::string devices;
  bool shut_down = false;
};

LossdServer::LossdServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

LossdServer::~LossdServer() {
  if (impl_ && !impl_->shut_down) Shutdown(absl::ZeroDuration());
}

int LossdServer::port() const { return impl_->port; }
int LossdServer::metrics_port() const { return impl_->metrics->port(); }
std::string LossdServer::device_summary() const { return impl_->devices; }
int64_t LossdServer::chunks_done() const { return impl_->core->chunks_done(); }
int64_t LossdServer::in_flight_calls() const { return impl_->core->in_flight(); }

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
  const int hw = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  std::unique_ptr<kernels::Backend> cuda;
  std::string cuda_name;
  if (options.device != DevicePolicy::kCpu) {
    kernels::CudaOptions cuda_options;
    cuda_options.float_math = options.cuda_float_math;
    auto backend = kernels::MakeCudaBackend(cuda_options);
    if (backend.ok()) {
      cuda = *std::move(backend);
      cuda_name = kernels::CudaDeviceName();
    } else if (options.device == DevicePolicy::kCuda) {
      return backend.status();
    }
  }
  auto impl = std::make_unique<Impl>();
  impl->devices = cuda ? absl::StrCat("cpu,cuda (", cuda_name, ")") : "cpu";
  impl->metrics = std::make_unique<Metrics>();
  if (options.metrics_port >= 0) {
    if (absl::Status s = impl->metrics->Serve(options.metrics_host, options.metrics_port);
        !s.ok()) {
      return s;
    }
  }
  CoreConfig config;
  config.limits.max_elements = options.max_elements;
  config.max_message_bytes = options.max_message_bytes;
  config.workers = options.workers > 0 ? options.workers : hw;
  config.queue_capacity = options.queue_capacity;
  config.stream_window = std::max(1, options.stream_window);
  config.inline_elements = options.inline_elements;
  config.auth_token = options.auth_token;
  impl->core = std::make_unique<Core>(config, kernels::MakeCpuBackend({options.cpu_threads}),
                                      std::move(cuda), cuda_name, impl->metrics.get());
  impl->service = std::make_unique<LossServiceImpl>(impl->core.get());

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  const int max_bytes = static_cast<int>(options.max_message_bytes);
  builder.SetMaxReceiveMessageSize(max_bytes);
  builder.SetMaxSendMessageSize(max_bytes);
  const std::string address = absl::StrCat(
      options.host.find(':') != std::string::npos ? absl::StrCat("[", options.host, "]")
                                                  : options.host,
      ":", options.port);
  builder.AddListeningPort(address, *creds, &impl->port);
  builder.RegisterService(impl->service.get());
  impl->server = builder.BuildAndStart();
  if (impl->server == nullptr || impl->port == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", address));
  }
  impl->server->GetHealthCheckService()->SetServingStatus(true);
  impl->server->GetHealthCheckService()->SetServingStatus(
      std::string(v1::LossService::service_full_name()), true);
  return std::unique_ptr<LossdServer>(new LossdServer(std::move(impl)));
}

void LossdServer::Shutdown(absl::Duration deadline) {
  if (impl_->shut_down) return;
  impl_->shut_down = true;
  const absl::Time end = absl::Now() + deadline;
  // Drain while still listening: probes see NOT_SERVING, new calls get UNAVAILABLE, and calls
  // in flight finish. Then stop, cancelling whatever is left at the deadline.
  impl_->core->set_draining(true);
  if (auto* health = impl_->server->GetHealthCheckService()) {
    health->SetServingStatus(false);
    health->SetServingStatus(std::string(v1::LossService::service_full_name()), false);
  }
  Log(LogLevel::kInfo, absl::StrCat("draining: ", impl_->core->in_flight(),
                                    " calls in flight, deadline ", absl::FormatDuration(deadline)));
  while (impl_->core->in_flight() > 0 && absl::Now() < end) absl::SleepFor(absl::Milliseconds(5));
  impl_->server->Shutdown(absl::ToChronoTime(end));
  impl_->server->Wait();
}

void LossdServer::Wait() { impl_->server->Wait(); }

}  // namespace lossd::server
