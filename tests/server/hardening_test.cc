// Regression tests for inputs and events that once crashed or misled the server: outputs
// larger than their inputs, overflowing shapes, malformed request bytes, client cancellation,
// memory admission and connection hygiene. Each runs an in-process server over a real socket.
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <thread>
#include <vector>

#include <unistd.h>

#include "lossd/kernels/bce.h"
#include "lossd/kernels/dtype.h"
#include "lossd/kernels/operand.h"
#include "tests/server/test_server_util.h"

namespace lossd::server {
namespace {

using namespace testing;  // the helpers of tests/server/test_server_util.h

constexpr int64_t kTwo31 = int64_t{1} << 31;
constexpr int64_t kTwo40 = int64_t{1} << 40;

v1::Tensor EmptyTensor(const std::vector<int64_t>& shape) {
  v1::Tensor t;
  t.set_dtype(v1::DTYPE_FLOAT32);
  for (int64_t d : shape) t.add_shape(d);
  return t;
}

v1::EvaluateRequest EmptyRequest(const std::vector<int64_t>& shape, v1::Reduction reduction) {
  v1::EvaluateRequest req;
  *req.mutable_logits() = EmptyTensor(shape);
  *req.mutable_targets() = EmptyTensor(shape);
  req.mutable_bce_with_logits();
  req.set_reduction(reduction);
  return req;
}

grpc::Status Call(v1::LossService::Stub* stub, const v1::EvaluateRequest& req,
                  v1::EvaluateResponse* resp) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  return stub->Evaluate(&ctx, req, resp);
}

class HardeningTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ServerOptions o = LoopbackOptions();
    o.max_elements = 1'000'000;
    server_ = StartServer(o);
    stub_ = Connect(server_->port());
  }
  std::unique_ptr<LossdServer> server_;
  std::unique_ptr<v1::LossService::Stub> stub_;
};

// D1: a PER_SAMPLE_MEAN over a zero-size last axis has no elements but prod(leading dims)
// outputs. [2^31, 2^31, 0] (a 39-byte request) wrapped the reply size and crashed the server.
TEST_F(HardeningTest, PerSampleMeanOutputCountIsLimited) {
  v1::EvaluateResponse resp;
  grpc::Status s =
      Call(stub_.get(), EmptyRequest({kTwo31, kTwo31, 0}, v1::REDUCTION_PER_SAMPLE_MEAN), &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
  EXPECT_NE(s.error_message().find("[2147483648,2147483648]"), std::string::npos)
      << s.error_message();
  // Within int64 but over --max_elements (1e6): 2M NaN means from 0 elements.
  s = Call(stub_.get(), EmptyRequest({2000, 1000, 0}, v1::REDUCTION_PER_SAMPLE_MEAN), &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
  EXPECT_NE(s.error_message().find("2000000 values"), std::string::npos) << s.error_message();
  // Leading dims whose product overflows int64: INVALID_ARGUMENT, not a wrapped count.
  s = Call(stub_.get(), EmptyRequest({kTwo31, kTwo31, 4, 0}, v1::REDUCTION_PER_SAMPLE_MEAN),
           &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  // Within the limit: one NaN per empty row, in the loss's shape.
  s = Call(stub_.get(), EmptyRequest({300, 7, 0}, v1::REDUCTION_PER_SAMPLE_MEAN), &resp);
  ASSERT_TRUE(s.ok()) << s.error_message();
  ASSERT_EQ(resp.loss().shape_size(), 2);
  EXPECT_EQ(resp.loss().shape(0), 300);
  EXPECT_EQ(resp.loss().shape(1), 7);
  const std::vector<float> loss = testing::Values<float>(resp.loss());
  ASSERT_EQ(loss.size(), 2100u);
  for (float v : loss) ASSERT_TRUE(std::isnan(v));
  // The server is still up.
  EXPECT_TRUE(Call(stub_.get(), RandomRequest<float>(4, 7, 1, v1::REDUCTION_SUM), &resp).ok());
}

// A reply larger than the message limit is refused before computing, naming the sizes.
TEST(HardeningReplyTest, ReplyOverMessageLimitIsRefusedUpFront) {
  ServerOptions o = LoopbackOptions();
  o.max_message_bytes = 1 << 20;
  auto server = StartServer(o);
  auto stub = Connect(server->port());
  // 96k float32 elements: 768 KiB of request, 1152 KiB of reply with both gradients.
  v1::EvaluateRequest req = RandomRequest<float>(1536, 64, 2, v1::REDUCTION_NONE);
  req.clear_weight();
  req.clear_bce_with_logits();
  req.mutable_bce_with_logits();
  req.mutable_gradients()->set_logits(true);
  req.mutable_gradients()->set_targets(true);
  v1::EvaluateResponse resp;
  grpc::Status s = Call(stub.get(), req, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
  EXPECT_NE(s.error_message().find("more than the message limit 1048576"), std::string::npos)
      << s.error_message();
  req.mutable_gradients()->set_targets(false);  // 768 KiB of reply: fits
  s = Call(stub.get(), req, &resp);
  EXPECT_TRUE(s.ok()) << s.error_message();
}

// D5: broadcasting an operand to an empty output whose extents have no int64 product.
TEST_F(HardeningTest, EmptyOutputWithHugeExtentsBroadcasts) {
  v1::EvaluateRequest req = EmptyRequest({0, kTwo40, kTwo40}, v1::REDUCTION_SUM);
  *req.mutable_weight() = EmptyTensor({0, 1, 1});
  *req.mutable_bce_with_logits()->mutable_pos_weight() = EmptyTensor({0, kTwo40, 1});
  v1::EvaluateResponse resp;
  grpc::Status s = Call(stub_.get(), req, &resp);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(testing::Values<float>(resp.loss()), std::vector<float>{0.0f});
  // The kernel-level view: nothing reads an operand of an empty output.
  auto op = kernels::MakeOperand("weight", kernels::DType::kFloat32, nullptr, {0, 1, 1},
                                 {0, kTwo40, kTwo40});
  ASSERT_TRUE(op.ok()) << op.status();
  EXPECT_EQ(op->inner, 1);
  EXPECT_EQ(op->period, 1);
}

// D3: bytes that are not an EvaluateRequest get INVALID_ARGUMENT with protobuf's reason (the
// callback API's default was UNIMPLEMENTED with an empty message).
TEST_F(HardeningTest, UnparseableBytesAreInvalidArgument) {
  auto channel = grpc::CreateChannel(absl::StrCat("127.0.0.1:", server_->port()),
                                     grpc::InsecureChannelCredentials());
  grpc::GenericStub generic(channel);
  // A length-delimited field 1 whose length runs past the end.
  grpc::Status s =
      UnaryBytes(&generic, "/lossd.v1.LossService/Evaluate", std::string("\x0a\xff\x01\x00", 4));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_NE(s.error_message().find("do not parse as lossd.v1.EvaluateRequest"),
            std::string::npos)
      << s.error_message();
  // A request_id (a proto3 string) that is not UTF-8.
  v1::EvaluateRequest bad = RandomRequest<float>(2, 3, 1, v1::REDUCTION_SUM);
  bad.set_request_id("ok");
  std::string bytes = bad.SerializeAsString();
  const size_t at = bytes.find("ok");
  ASSERT_NE(at, std::string::npos);
  bytes[at] = static_cast<char>(0xff);
  s = UnaryBytes(&generic, "/lossd.v1.LossService/Evaluate", bytes);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_NE(s.error_message().find("UTF-8"), std::string::npos) << s.error_message();
  s = UnaryBytes(&generic, "/lossd.v1.LossService/GetCapabilities",
                 std::string("\x0a\xff\x01", 3));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
}

// D3 for streams: a malformed batch gets its own error in EvaluateStream, and fails the whole
// Accumulate call (it used to end the stream as if the client had finished, dropping it).
TEST_F(HardeningTest, UnparseableBatchInStreams) {
  auto channel = grpc::CreateChannel(absl::StrCat("127.0.0.1:", server_->port()),
                                     grpc::InsecureChannelCredentials());
  grpc::GenericStub generic(channel);
  grpc::CompletionQueue cq;
  auto run = [&](const std::string& method, const std::vector<std::string>& messages,
                 std::vector<std::string>* replies) {
    grpc::ClientContext ctx;
    auto call = generic.PrepareCall(&ctx, method, &cq);
    void* tag;
    bool ok;
    call->StartCall(reinterpret_cast<void*>(1));
    cq.Next(&tag, &ok);
    for (const std::string& m : messages) {
      grpc::Slice slice(m);
      grpc::ByteBuffer b(&slice, 1);
      call->Write(b, reinterpret_cast<void*>(2));
      cq.Next(&tag, &ok);
    }
    call->WritesDone(reinterpret_cast<void*>(3));
    cq.Next(&tag, &ok);
    while (true) {
      grpc::ByteBuffer reply;
      call->Read(&reply, reinterpret_cast<void*>(4));
      cq.Next(&tag, &ok);
      if (!ok) break;
      std::vector<grpc::Slice> slices;
      EXPECT_TRUE(reply.Dump(&slices).ok());
      std::string joined;
      for (const auto& sl : slices) joined.append(reinterpret_cast<const char*>(sl.begin()),
                                                  sl.size());
      replies->push_back(joined);
    }
    grpc::Status status;
    call->Finish(&status, reinterpret_cast<void*>(5));
    cq.Next(&tag, &ok);
    return status;
  };
  const std::string good = RandomRequest<float>(4, 7, 1, v1::REDUCTION_SUM).SerializeAsString();
  const std::string garbage("\x0a\xff\x01\x00", 4);
  std::vector<std::string> replies;
  grpc::Status s = run("/lossd.v1.LossService/EvaluateStream", {good, garbage, good}, &replies);
  EXPECT_TRUE(s.ok()) << s.error_message();
  ASSERT_EQ(replies.size(), 3u);
  v1::EvaluateStreamResponse r;
  ASSERT_TRUE(r.ParseFromString(replies[0]));
  EXPECT_TRUE(r.has_response());
  ASSERT_TRUE(r.ParseFromString(replies[1]));
  ASSERT_TRUE(r.has_error());
  EXPECT_EQ(r.error().code(), static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
  EXPECT_NE(r.error().message().find("do not parse"), std::string::npos) << r.error().message();
  ASSERT_TRUE(r.ParseFromString(replies[2]));
  EXPECT_TRUE(r.has_response());

  replies.clear();
  s = run("/lossd.v1.LossService/Accumulate", {good, garbage, good}, &replies);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_NE(s.error_message().find("batch 1: request bytes"), std::string::npos)
      << s.error_message();
  cq.Shutdown();
  void* tag;
  bool ok;
  while (cq.Next(&tag, &ok)) {
  }
}

// D6: once the server sees the client's cancel, each kernel thread finishes at most the chunk
// it is in. The stop latency (cancel seen -> computation ended) is printed for the record.
TEST(HardeningCancelTest, CancelStopsWithinOneChunkPerThread) {
  ServerOptions o = LoopbackOptions();
  o.workers = 1;
  o.cpu_threads = 2;
  auto server = StartServer(o);
  auto stub = Connect(server->port());
  const v1::EvaluateRequest req = testing::SlowRequest(1 << 17);  // 8M elements
  const int64_t total_chunks = (int64_t{1} << 23) / kernels::kChunkElements;
  double most_client_to_idle_ms = 0;
  for (int round = 0; round < 3; ++round) {
    const int64_t c0 = server->chunks_done();
    grpc::ClientContext ctx;
    v1::EvaluateResponse resp;
    const int64_t s0 = server->chunks_started();
    std::chrono::steady_clock::time_point cancelled_at;
    std::thread canceller([&] {
      // Cancel once the computation is under way (a few chunks started), not at a fixed time.
      for (int i = 0; i < 10000 && server->chunks_started() - s0 < 4; ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
      cancelled_at = std::chrono::steady_clock::now();
      ctx.TryCancel();
    });
    grpc::Status s = stub->Evaluate(&ctx, req, &resp);
    canceller.join();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::CANCELLED);
    for (int i = 0; i < 5000 && server->in_flight_calls() > 0; ++i) {
      std::this_thread::sleep_for(std::chrono::microseconds(500));
    }
    most_client_to_idle_ms = std::max(
        most_client_to_idle_ms,
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - cancelled_at)
            .count());
    EXPECT_LT(server->chunks_done() - c0, total_chunks) << "the call ran to completion";
  }
  EXPECT_GT(server->max_cancel_stop_ns(), 0) << "no cancel was seen during a computation";
  EXPECT_LE(server->chunks_after_cancel(), 3 * o.cpu_threads)
      << "more than one chunk per kernel thread after the cancel was seen";
  std::printf("client cancel -> call ended on the server: at most %.2f ms; cancel seen -> "
              "computation stopped: at most %.2f ms; chunks after the cancel was seen: %lld in 3 "
              "calls (%d kernel threads)\n",
              most_client_to_idle_ms, server->max_cancel_stop_ns() * 1e-6,
              static_cast<long long>(server->chunks_after_cancel()), o.cpu_threads);
}

// Memory admission: a call whose request and reply would pass --max_inflight_bytes gets
// RESOURCE_EXHAUSTED at once; concurrent calls share the budget; nothing stays held.
TEST(HardeningMemoryTest, InflightBytesAreBounded) {
  ServerOptions o = LoopbackOptions();
  o.max_inflight_bytes = 24 << 20;
  o.workers = 1;
  o.cpu_threads = 1;
  auto server = StartServer(o);
  EXPECT_EQ(server->max_inflight_bytes(), 24 << 20);
  auto stub = Connect(server->port());
  // 2M float32 elements: 16 MiB of request, held twice (bytes and parsed): over 24 MiB.
  v1::EvaluateRequest big = RandomRequest<float>(1 << 15, 64, 4, v1::REDUCTION_SUM);
  v1::EvaluateResponse resp;
  grpc::Status s = Call(stub.get(), big, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
  EXPECT_NE(s.error_message().find("--max_inflight_bytes"), std::string::npos)
      << s.error_message();
  // 256k elements (2 MiB, with gradient ~8 MiB held): two fit at once, not eight.
  // Slow enough to overlap.
  v1::EvaluateRequest mid = testing::SlowRequest(1 << 12, v1::REDUCTION_NONE, 5);
  mid.mutable_gradients()->set_logits(true);
  const testing::CodeCounts n = testing::ConcurrentCalls(8, [&] {
    auto own = Connect(server->port());
    v1::EvaluateResponse r;
    return Call(own.get(), mid, &r).error_code();
  });
  EXPECT_EQ(n.other, 0);
  EXPECT_GE(n.ok, 1);
  EXPECT_GE(n.exhausted, 1) << "8 concurrent calls of ~8 MiB each under a 24 MiB budget";
  for (int i = 0; i < 500 && server->held_bytes() != 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  EXPECT_EQ(server->held_bytes(), 0) << "bytes still held after every call ended";
  // A small call still works.
  EXPECT_TRUE(Call(stub.get(), RandomRequest<float>(4, 7, 1, v1::REDUCTION_SUM), &resp).ok());
}

// The defaults of workers, kernel threads and the memory budget follow the cgroup's limits
// (a container's CPU quota and memory limit), not the host's cores and memory.
TEST(HardeningMemoryTest, DefaultsFollowTheCgroupLimits) {
  const std::filesystem::path root =
      std::filesystem::path(::testing::TempDir()) / absl::StrCat("lossd_cgroup_", getpid());
  std::filesystem::create_directories(root / "proc/self");
  std::filesystem::create_directories(root / "sys/fs/cgroup/pod");
  auto write = [&](const std::filesystem::path& p, const std::string& text) {
    std::ofstream(root / p) << text;
  };
  write("proc/self/cgroup", "0::/pod\n");
  write("sys/fs/cgroup/pod/cpu.max", "150000 100000\n");   // 1.5 CPUs
  write("sys/fs/cgroup/pod/memory.max", "1073741824\n");   // 1 GiB
  write("proc/meminfo", "MemTotal:       16384000 kB\n");
  ServerOptions o = LoopbackOptions();
  o.workers = 0;
  o.cpu_threads = 0;
  o.host_root = root.string();
  auto server = StartServer(o);
  EXPECT_EQ(server->workers(), 2);
  EXPECT_EQ(server->cpu_threads(), 2);
  EXPECT_EQ(server->max_inflight_bytes(), static_cast<int64_t>(0.6 * 1073741824.0));
  std::filesystem::remove_all(root);
}

// After a large call the allocator's free memory goes back to the OS once the server is idle.
TEST(HardeningMemoryTest, IdleServerTrimsAfterLargeCall) {
  auto server = StartServer();
  auto stub = Connect(server->port());
  const int64_t trims = server->memory_trims();
  v1::EvaluateResponse resp;
  // 4M float32 elements: 32 MiB of request (a call that leaves megabytes in the allocator).
  ASSERT_TRUE(
      Call(stub.get(), RandomRequest<float>(1 << 16, 64, 6, v1::REDUCTION_SUM), &resp).ok());
  for (int i = 0; i < 400 && server->memory_trims() == trims; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_GT(server->memory_trims(), trims);
}

// A second server on a port in use fails to start (gRPC's default SO_REUSEPORT let both bind
// and split the connections between them).
TEST(HardeningConnectionTest, PortInUseFailsToStart) {
  auto first = StartServer();
  ServerOptions o = LoopbackOptions();
  o.port = first->port();
  auto second = LossdServer::Start(o);
  EXPECT_FALSE(second.ok()) << "a second server bound port " << o.port;
  if (!second.ok()) EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable);
}

// Idle connections are closed after max_connection_idle, and every connection after
// max_connection_age: the client's channel goes back to IDLE (and reconnects for the next call).
TEST(HardeningConnectionTest, IdleAndAgedConnectionsAreClosed) {
  for (const bool by_age : {false, true}) {
    ServerOptions o = LoopbackOptions();
    o.max_connection_idle = by_age ? absl::ZeroDuration() : absl::Milliseconds(300);
    o.max_connection_age = by_age ? absl::Milliseconds(300) : absl::ZeroDuration();
    o.max_connection_age_grace = absl::Milliseconds(300);
    auto server = StartServer(o);
    auto channel = grpc::CreateChannel(absl::StrCat("127.0.0.1:", server->port()),
                                       grpc::InsecureChannelCredentials());
    auto stub = v1::LossService::NewStub(channel);
    v1::EvaluateResponse resp;
    ASSERT_TRUE(Call(stub.get(), RandomRequest<float>(4, 7, 1, v1::REDUCTION_SUM), &resp).ok());
    EXPECT_EQ(channel->GetState(false), GRPC_CHANNEL_READY);
    bool closed = false;
    for (int i = 0; i < 300 && !closed; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
      closed = channel->GetState(false) == GRPC_CHANNEL_IDLE;
    }
    EXPECT_TRUE(closed) << (by_age ? "max_connection_age" : "max_connection_idle")
                        << " did not close the connection";
    EXPECT_TRUE(Call(stub.get(), RandomRequest<float>(4, 7, 1, v1::REDUCTION_SUM), &resp).ok());
  }
}

// At most max_concurrent_streams calls of one connection are open at once: while a stream is
// open on a connection capped at 1, a unary call on it cannot start (its deadline passes while
// it waits); on a connection capped at 2 it runs.
TEST(HardeningConnectionTest, ConcurrentStreamsPerConnectionAreCapped) {
  for (const int cap : {1, 2}) {
    ServerOptions o = LoopbackOptions();
    o.max_concurrent_streams = cap;
    auto server = StartServer(o);
    auto stub = Connect(server->port());  // one channel, one connection
    const v1::EvaluateRequest req = RandomRequest<float>(4, 7, 1, v1::REDUCTION_SUM);
    grpc::ClientContext stream_ctx;
    auto stream = stub->EvaluateStream(&stream_ctx);
    ASSERT_TRUE(stream->Write(req));
    v1::EvaluateStreamResponse reply;
    ASSERT_TRUE(stream->Read(&reply));  // the stream is open on the server
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(500));
    v1::EvaluateResponse resp;
    const grpc::Status s = stub->Evaluate(&ctx, req, &resp);
    if (cap == 1) {
      EXPECT_EQ(s.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << s.error_message();
    } else {
      EXPECT_TRUE(s.ok()) << s.error_message();
    }
    ASSERT_TRUE(stream->WritesDone());
    while (stream->Read(&reply)) {
    }
    EXPECT_TRUE(stream->Finish().ok());
    EXPECT_TRUE(Call(stub.get(), req, &resp).ok()) << "cap " << cap;
  }
}

}  // namespace
}  // namespace lossd::server
