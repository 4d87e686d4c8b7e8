// lossd_bench_server: one baseline service (tools/bench/baseline_services.h) as a process, for
// the service benchmark and load tests. Prints "<service> listening on HOST:PORT" (and
// "<service> listening on unix:PATH") on stderr once it serves; SIGTERM or SIGINT stops it.
#include <csignal>
#include <cstdio>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "tools/bench/baseline_services.h"

ABSL_FLAG(std::string, service, "echo",
          "echo: parse the EvaluateRequest, reply an EvaluateResponse of lossd's size; raw: "
          "Raw.Call, request not parsed, reply of x-reply-bytes bytes from a reused buffer");
ABSL_FLAG(std::string, host, "127.0.0.1", "TCP address to listen on.");
ABSL_FLAG(int, port, 0, "TCP port; 0 picks a free port (printed); -1: no TCP listener.");
ABSL_FLAG(std::string, unix_socket, "", "Also listen on this Unix socket path.");
ABSL_FLAG(int64_t, max_message_bytes, int64_t{256} << 20,
          "Largest request or reply (lossd's default).");
ABSL_FLAG(int64_t, reserve_bytes, 0,
          "raw: zero reply buffer allocated at start (grows on demand).");

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("Baseline gRPC server (echo or raw) for lossd benchmarks.");
  absl::ParseCommandLine(argc, argv);
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);  // before any gRPC thread starts

  lossd::bench::BaselineServerOptions o;
  o.service = absl::GetFlag(FLAGS_service);
  o.host = absl::GetFlag(FLAGS_host);
  o.port = absl::GetFlag(FLAGS_port);
  o.unix_socket = absl::GetFlag(FLAGS_unix_socket);
  o.max_message_bytes = absl::GetFlag(FLAGS_max_message_bytes);
  o.reserve_bytes = absl::GetFlag(FLAGS_reserve_bytes);
  auto server = lossd::bench::BaselineServer::Start(o);
  if (!server.ok()) {
    std::fprintf(stderr, "lossd_bench_server: %s\n", server.status().ToString().c_str());
    return 1;
  }
  if (o.port >= 0) {
    std::fprintf(stderr, "%s listening on %s:%d\n", o.service.c_str(), o.host.c_str(),
                 (*server)->port());
  }
  if (!o.unix_socket.empty()) {
    std::fprintf(stderr, "%s listening on unix:%s\n", o.service.c_str(), o.unix_socket.c_str());
  }
  std::fflush(stderr);
  int sig = 0;
  sigwait(&signals, &sig);
  (*server)->Shutdown();
  return 0;
}
