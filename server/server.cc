#include "server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "lossd/kernels/kernels.h"
#include "log.h"
#include "service.h"

namespace lossd::server {

struct LossdServer::Impl {
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
std::string LossdServer::device_summary() const { return impl_->devices; }

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
  const int hw = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  std::unique_ptr<kernels::Backend> cuda;
  std::string cuda_name;
  if (options.device != DevicePolicy::kCpu) {
    auto backend = kernels::MakeCudaBackend();
    if (backend.ok()) {
      cuda = *std::move(backend);
      cuda_name = kernels::CudaDeviceName();
    } else if (options.device == DevicePolicy::kCuda) {
      return backend.status();
    }
  }
  auto impl = std::make_unique<Impl>();
  impl->devices = cuda ? absl::StrCat("cpu,cuda (", cuda_name, ")") : "cpu";
  ServiceConfig config;
  config.limits.max_elements = options.max_elements;
  config.max_message_bytes = options.max_message_bytes;
  config.workers = options.workers > 0 ? options.workers : hw;
  config.queue_capacity = options.queue_capacity;
  impl->service = std::make_unique<LossServiceImpl>(
      config, kernels::MakeCpuBackend({options.cpu_threads}), std::move(cuda), cuda_name);

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
  builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &impl->port);
  builder.RegisterService(impl->service.get());
  impl->server = builder.BuildAndStart();
  if (impl->server == nullptr || impl->port == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", address));
  }
  impl->server->GetHealthCheckService()->SetServingStatus(true);
  return std::unique_ptr<LossdServer>(new LossdServer(std::move(impl)));
}

void LossdServer::Shutdown(absl::Duration deadline) {
  if (impl_->shut_down) return;
  impl_->shut_down = true;
  if (auto* health = impl_->server->GetHealthCheckService()) health->SetServingStatus(false);
  impl_->server->Shutdown(absl::ToChronoTime(absl::Now() + deadline));
  impl_->server->Wait();
}

void LossdServer::Wait() { impl_->server->Wait(); }

}  // namespace lossd::server
