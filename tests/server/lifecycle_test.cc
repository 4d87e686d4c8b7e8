// Backpressure, limits, deadlines and cancellation (work really stops), graceful drain, and many
// concurrent clients, against an in-process server over a real socket.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include "grpc/health/v1/health.grpc.pb.h"
#include "lossd/kernels/bce.h"
#include "tests/server/test_server_util.h"

namespace lossd::server {
namespace {

using namespace testing;  // the helpers of tests/server/test_server_util.h

constexpr int64_t kSlowRows = 1 << 16;  // 4M elements, 64 chunks
constexpr int64_t kSlowChunks = (kSlowRows * 64) / kernels::kChunkElements;

ServerOptions OneThreadOptions() {
  ServerOptions o = LoopbackOptions();
  o.workers = 1;
  o.cpu_threads = 1;
  return o;
}

TEST(LifecycleTest, DeadlineStopsWork) {
  auto server = StartServer(OneThreadOptions());
  auto stub = Connect(server->port());
  const v1::EvaluateRequest req = SlowRequest(kSlowRows);
  // Reference: the full request completes all chunks.
  const int64_t c0 = server->chunks_done();
  ASSERT_TRUE(Evaluate(stub.get(), req).ok());
  const int64_t full = server->chunks_done() - c0;
  EXPECT_EQ(full, kSlowChunks);
  const int64_t c1 = server->chunks_done();
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(60));
  v1::EvaluateResponse resp;
  grpc::Status s = stub->Evaluate(&ctx, req, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  // The server notices within one chunk; give it time to settle, then count.
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  const int64_t partial = server->chunks_done() - c1;
  EXPECT_LT(partial, full / 2) << "work went on after the deadline";
}

TEST(LifecycleTest, CancelStopsWork) {
  auto server = StartServer(OneThreadOptions());
  auto stub = Connect(server->port());
  const v1::EvaluateRequest req = SlowRequest(kSlowRows);
  const int64_t c0 = server->chunks_done();
  grpc::ClientContext ctx;
  v1::EvaluateResponse resp;
  std::thread canceller([&ctx] {
    std::this_thread::sleep_for(std::chrono::milliseconds(80));
    ctx.TryCancel();
  });
  grpc::Status s = stub->Evaluate(&ctx, req, &resp);
  canceller.join();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::CANCELLED);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_LT(server->chunks_done() - c0, kSlowChunks / 2) << "work went on after cancel";
  // Still serving.
  grpc::ClientContext ctx2;
  EXPECT_TRUE(stub->Evaluate(&ctx2, RandomRequest<float>(4, 7, 1, v1::REDUCTION_SUM), &resp).ok());
}

TEST(LifecycleTest, FullQueueFailsFastWithResourceExhausted) {
  ServerOptions o = OneThreadOptions();
  o.queue_capacity = 1;
  auto server = StartServer(o);
  auto stub = Connect(server->port());
  const v1::EvaluateRequest req = SlowRequest(kSlowRows / 8);
  const testing::CodeCounts n = testing::ConcurrentCalls(8, [&] {
    grpc::ClientContext ctx;
    v1::EvaluateResponse resp;
    return stub->Evaluate(&ctx, req, &resp).error_code();
  });
  EXPECT_EQ(n.other, 0);
  EXPECT_GE(n.ok, 1);
  EXPECT_GE(n.exhausted, 1) << "1 worker, 1 queue slot and 8 concurrent slow calls";
}

TEST(LifecycleTest, MessageSizeLimit) {
  ServerOptions o = LoopbackOptions();
  o.max_message_bytes = 1 << 20;
  auto server = StartServer(o);
  auto stub = Connect(server->port());
  grpc::ClientContext ctx;
  v1::EvaluateResponse resp;
  grpc::Status s = stub->Evaluate(&ctx, RandomRequest<float>(8192, 64, 1, v1::REDUCTION_SUM), &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
}

TEST(LifecycleTest, GracefulDrain) {
  auto server = StartServer(OneThreadOptions());
  const int port = server->port();
  auto stub = Connect(port);
  auto channel = grpc::CreateChannel(absl::StrCat("127.0.0.1:", port),
                                     grpc::InsecureChannelCredentials());
  auto health = grpc::health::v1::Health::NewStub(channel);
  // A call in flight when the drain starts...
  grpc::Status inflight;
  v1::EvaluateResponse inflight_resp;
  std::thread caller([&] {
    grpc::ClientContext ctx;
    inflight = stub->Evaluate(&ctx, SlowRequest(kSlowRows / 2), &inflight_resp);
  });
  for (int i = 0; i < 1000 && server->in_flight_calls() == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_EQ(server->in_flight_calls(), 1);
  std::thread drainer([&] { server->Shutdown(absl::Seconds(20)); });
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  // ...while draining: health says NOT_SERVING and new calls are refused.
  {
    grpc::ClientContext ctx;
    grpc::health::v1::HealthCheckResponse hr;
    grpc::Status hs = health->Check(&ctx, grpc::health::v1::HealthCheckRequest(), &hr);
    if (hs.ok()) EXPECT_EQ(hr.status(), grpc::health::v1::HealthCheckResponse::NOT_SERVING);
  }
  {
    grpc::ClientContext ctx;
    v1::EvaluateResponse resp;
    grpc::Status s = stub->Evaluate(&ctx, RandomRequest<float>(4, 7, 1, v1::REDUCTION_SUM), &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();
  }
  caller.join();
  drainer.join();
  // ...and the call in flight completed normally.
  EXPECT_TRUE(inflight.ok()) << inflight.error_message();
  EXPECT_EQ(inflight_resp.num_elements(), kSlowRows / 2 * 64);
}

TEST(LifecycleTest, ManyConcurrentClients) {
  ServerOptions o = LoopbackOptions();
  o.queue_capacity = 1024;
  auto server = StartServer(o);
  const v1::EvaluateRequest req = RandomRequest<float>(300, 11, 7, v1::REDUCTION_SUM);
  v1::EvaluateResponse first;
  ASSERT_TRUE(Evaluate(Connect(server->port()).get(), req, &first).ok());
  const std::string want = first.loss().data();
  std::atomic<int> failures{0}, mismatches{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 16; ++t) {
    threads.emplace_back([&, t] {
      auto stub = Connect(server->port());  // a channel per client
      for (int i = 0; i < 40; ++i) {
        if ((i + t) % 5 == 0) {
          grpc::ClientContext ctx;
          auto stream = stub->EvaluateStream(&ctx);
          for (int k = 0; k < 3; ++k) stream->Write(req);
          stream->WritesDone();
          v1::EvaluateStreamResponse r;
          while (stream->Read(&r)) mismatches += r.response().loss().data() != want;
          failures += !stream->Finish().ok();
        } else {
          grpc::ClientContext ctx;
          v1::EvaluateResponse resp;
          grpc::Status s = stub->Evaluate(&ctx, req, &resp);
          failures += !s.ok();
          mismatches += s.ok() && resp.loss().data() != want;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(mismatches.load(), 0);
}

}  // namespace
}  // namespace lossd::server
