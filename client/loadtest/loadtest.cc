// lossd_loadtest: closed-loop load generator for lossd, with a same-bytes gRPC echo baseline.
//
// Without --target it starts, in this process, a lossd server (CPU) and an echo server on
// loopback, then measures both with the same requests, concurrency and duration, and prints
// QPS, latency percentiles, MB/s and the ratios lossd/echo (docs/design.md section 6). With
// --target it only loads that server.
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "lossd/v1/lossd.grpc.pb.h"
#include "server.h"
#include "tools/bench/echo.grpc.pb.h"

ABSL_FLAG(std::string, target, "", "host:port of a running lossd; empty starts one in-process");
ABSL_FLAG(int64_t, elements, 1000, "Elements per request (float32, shape [elements/64, 64])");
ABSL_FLAG(int, concurrency, 1, "Concurrent callers, each with its own channel");
ABSL_FLAG(absl::Duration, duration, absl::Seconds(3), "Measuring time per run");
ABSL_FLAG(bool, grad, true, "Request dl/dx (reduction NONE)");
ABSL_FLAG(int, workers, 0, "In-process server: compute workers (0 = cores)");

namespace {

using Clock = std::chrono::steady_clock;

lossd::v1::EvaluateRequest MakeRequest(int64_t n, bool grad) {
  const int64_t cols = std::min<int64_t>(64, std::max<int64_t>(1, n));
  const int64_t rows = std::max<int64_t>(1, n / cols);
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> u(-4, 4);
  std::vector<float> x(rows * cols), y(rows * cols), w(cols, 1.5f);
  for (size_t i = 0; i < x.size(); ++i) {
    x[i] = u(rng);
    y[i] = static_cast<float>(i % 2);
  }
  auto tensor = [](const std::vector<float>& v, std::vector<int64_t> shape) {
    lossd::v1::Tensor t;
    t.set_dtype(lossd::v1::DTYPE_FLOAT32);
    for (int64_t d : shape) t.add_shape(d);
    t.set_data(std::string(reinterpret_cast<const char*>(v.data()), v.size() * 4));
    return t;
  };
  lossd::v1::EvaluateRequest r;
  *r.mutable_logits() = tensor(x, {rows, cols});
  *r.mutable_targets() = tensor(y, {rows, cols});
  *r.mutable_bce_with_logits()->mutable_pos_weight() = tensor(w, {cols});
  r.set_reduction(lossd::v1::REDUCTION_NONE);
  r.mutable_gradients()->set_logits(grad);
  return r;
}

class EchoService final : public lossd::bench::v1::Echo::CallbackService {
  grpc::ServerUnaryReactor* Echo(grpc::CallbackServerContext* ctx,
                                 const lossd::v1::EvaluateRequest* req,
                                 lossd::v1::EvaluateResponse* resp) override {
    *resp->mutable_loss() = req->logits();
    if (req->gradients().logits()) *resp->mutable_grad_logits() = req->logits();
    auto* reactor = ctx->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }
};

struct Result {
  double qps = 0, mbps = 0, p50_us = 0, p99_us = 0;
  int64_t calls = 0, errors = 0;
};

std::shared_ptr<grpc::Channel> Channel(const std::string& target, int index) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(1 << 30);
  args.SetMaxSendMessageSize(1 << 30);
  args.SetInt("lossd.loadtest.channel", index);  // distinct channels, distinct connections
  return grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), args);
}

template <typename CallFn>
Result Run(int concurrency, absl::Duration duration, int64_t bytes_per_call, CallFn call) {
  std::vector<std::vector<double>> lat(concurrency);
  std::atomic<int64_t> errors{0};
  std::atomic<bool> stop{false};
  std::vector<std::thread> threads;
  const auto start = Clock::now();
  for (int t = 0; t < concurrency; ++t) {
    threads.emplace_back([&, t] {
      // Warm up the connection, then measure.
      for (int i = 0; i < 20; ++i) call(t);
      while (!stop.load(std::memory_order_relaxed)) {
        const auto a = Clock::now();
        if (!call(t)) errors++;
        lat[t].push_back(std::chrono::duration<double, std::micro>(Clock::now() - a).count());
      }
    });
  }
  std::this_thread::sleep_for(absl::ToChronoMilliseconds(duration));
  stop = true;
  for (auto& th : threads) th.join();
  const double secs = std::chrono::duration<double>(Clock::now() - start).count();
  std::vector<double> all;
  for (auto& v : lat) all.insert(all.end(), v.begin(), v.end());
  std::sort(all.begin(), all.end());
  Result r;
  r.calls = static_cast<int64_t>(all.size());
  r.errors = errors.load();
  if (all.empty()) return r;
  r.qps = r.calls / secs;
  r.mbps = r.qps * bytes_per_call / 1e6;
  r.p50_us = all[all.size() / 2];
  r.p99_us = all[std::min(all.size() - 1, all.size() * 99 / 100)];
  return r;
}

void Print(const char* name, const Result& r) {
  std::printf("%-8s %10.0f %10.1f %10.1f %10.1f %8lld\n", name, r.qps, r.mbps, r.p50_us,
              r.p99_us, static_cast<long long>(r.errors));
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const int64_t n = absl::GetFlag(FLAGS_elements);
  const int conc = absl::GetFlag(FLAGS_concurrency);
  const absl::Duration dur = absl::GetFlag(FLAGS_duration);
  const bool grad = absl::GetFlag(FLAGS_grad);
  const lossd::v1::EvaluateRequest req = MakeRequest(n, grad);
  const int64_t numel = req.logits().shape(0) * req.logits().shape(1);
  const int64_t bytes = 8 * numel + 4 * numel * (grad ? 2 : 1);  // request + reply tensors

  std::string target = absl::GetFlag(FLAGS_target);
  std::unique_ptr<lossd::server::LossdServer> lossd_server;
  std::unique_ptr<grpc::Server> echo_server;
  EchoService echo;
  int echo_port = 0;
  if (target.empty()) {
    lossd::server::ServerOptions o;
    o.host = "127.0.0.1";
    o.port = 0;
    o.device = lossd::server::DevicePolicy::kCpu;
    o.workers = absl::GetFlag(FLAGS_workers);
    auto s = lossd::server::LossdServer::Start(o);
    if (!s.ok()) {
      std::fprintf(stderr, "cannot start lossd: %s\n", s.status().ToString().c_str());
      return 1;
    }
    lossd_server = *std::move(s);
    target = absl::StrCat("127.0.0.1:", lossd_server->port());
    grpc::ServerBuilder b;
    b.SetMaxReceiveMessageSize(1 << 30);
    b.SetMaxSendMessageSize(1 << 30);
    b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &echo_port);
    b.RegisterService(&echo);
    echo_server = b.BuildAndStart();
  }
  std::printf("lossd_loadtest: %lld float32 elements per call%s, concurrency %d, %s per run\n",
              static_cast<long long>(numel), grad ? " with dl/dx" : "", conc,
              absl::FormatDuration(dur).c_str());
  std::printf("%-8s %10s %10s %10s %10s %8s\n", "server", "calls/s", "MB/s", "p50 us", "p99 us",
              "errors");
  std::vector<std::unique_ptr<lossd::v1::LossService::Stub>> stubs;
  for (int t = 0; t < conc; ++t) stubs.push_back(lossd::v1::LossService::NewStub(Channel(target, t)));
  Result echo_result;
  if (echo_server) {
    std::vector<std::unique_ptr<lossd::bench::v1::Echo::Stub>> estubs;
    for (int t = 0; t < conc; ++t) {
      estubs.push_back(lossd::bench::v1::Echo::NewStub(
          Channel(absl::StrCat("127.0.0.1:", echo_port), t)));
    }
    echo_result = Run(conc, dur, bytes, [&](int t) {
      grpc::ClientContext ctx;
      lossd::v1::EvaluateResponse resp;
      return estubs[t]->Echo(&ctx, req, &resp).ok();
    });
    Print("echo", echo_result);
  }
  const Result r = Run(conc, dur, bytes, [&](int t) {
    grpc::ClientContext ctx;
    lossd::v1::EvaluateResponse resp;
    return stubs[t]->Evaluate(&ctx, req, &resp).ok();
  });
  Print("lossd", r);
  if (echo_server && echo_result.qps > 0) {
    std::printf("lossd/echo: calls/s %.2f, p50 %.2fx, p99 %.2fx\n", r.qps / echo_result.qps,
                r.p50_us / echo_result.p50_us, r.p99_us / echo_result.p99_us);
  }
  if (lossd_server) lossd_server->Shutdown(absl::Seconds(1));
  if (echo_server) echo_server->Shutdown();
  return r.errors > 0 ? 1 : 0;
}
