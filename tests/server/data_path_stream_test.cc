// EvaluateStream on the data path over a real socket: the pipelining instants of Timing show
// batches overlapping (a batch computes and is answered while later ones are still arriving),
// and small batches computed inline keep the stream's order among large ones.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <string>
#include <thread>
#include <vector>

#include "lossd/v1/lossd.grpc.pb.h"
#include "server/server.h"
#include "tests/server/test_server_util.h"

namespace lossd::server {
namespace {

using namespace testing;  // the helpers of tests/server/test_server_util.h

// Sends `batches` on one EvaluateStream (writing while reading) into `replies`, and checks that
// the stream ends OK with one reply per batch, in order, none of them an error.
void RunStream(v1::LossService::Stub* stub, const std::vector<v1::EvaluateRequest>& batches,
               std::vector<v1::EvaluateStreamResponse>* replies) {
  grpc::ClientContext ctx;
  auto stream = stub->EvaluateStream(&ctx);
  std::thread writer([&] {
    for (const auto& b : batches) {
      if (!stream->Write(b)) break;
    }
    stream->WritesDone();
  });
  v1::EvaluateStreamResponse r;
  while (stream->Read(&r)) replies->push_back(r);
  writer.join();
  const grpc::Status status = stream->Finish();
  ASSERT_TRUE(status.ok()) << status.error_message();
  ASSERT_EQ(replies->size(), batches.size());
  for (size_t k = 0; k < replies->size(); ++k) {
    ASSERT_TRUE((*replies)[k].has_response()) << (*replies)[k].error().message();
    EXPECT_EQ((*replies)[k].request_id(), batches[k].request_id());
  }
}

// One worker computes the batches in order; the window lets the reactor read batch k+1 while
// batch k computes. Batch 0 starts computing before the last batch has arrived, and is
// answered before the last one finishes computing. Only the order is asserted.
TEST(DataPathStreamTest, BatchesOverlapOnTheStream) {
  ServerOptions o = LoopbackOptions();
  o.workers = 1;
  o.cpu_threads = 1;
  o.stream_window = 4;
  auto server = StartServer(o);
  auto stub = Connect(server->port());
  std::vector<v1::EvaluateRequest> batches;
  for (int k = 0; k < 4; ++k) {
    // 1M float32 elements: 8 MiB of logits and targets per batch.
    v1::EvaluateRequest b = RandomRequest<float>(1 << 14, 64, 20 + k, v1::REDUCTION_MEAN);
    b.set_request_id("batch-" + std::to_string(k));
    b.mutable_gradients()->set_logits(true);
    batches.push_back(std::move(b));
  }
  std::vector<v1::EvaluateStreamResponse> replies;
  ASSERT_NO_FATAL_FAILURE(RunStream(stub.get(), batches, &replies));
  for (size_t k = 0; k < replies.size(); ++k) {
    const v1::Timing& t = replies[k].response().timing();
    EXPECT_GT(t.received_unix_ns(), 0);
    EXPECT_LE(t.received_unix_ns(), t.compute_start_unix_ns());
    EXPECT_LE(t.compute_start_unix_ns(), t.compute_end_unix_ns());
    EXPECT_LE(t.compute_end_unix_ns(), t.reply_unix_ns());
  }
  const v1::Timing& first = replies.front().response().timing();
  const v1::Timing& last = replies.back().response().timing();
  EXPECT_LT(first.compute_start_unix_ns(), last.received_unix_ns())
      << "batch 0 did not start computing before the last batch arrived";
  EXPECT_LT(first.reply_unix_ns(), last.compute_end_unix_ns())
      << "batch 0 was not answered before the last batch finished computing";
}

// Small batches (computed on the gRPC thread) between large ones (computed on the workers):
// replies stay in request order and carry their own results.
TEST(DataPathStreamTest, InlineSmallBatchesKeepTheOrder) {
  ServerOptions o = LoopbackOptions();
  o.inline_elements = 4096;
  auto server = StartServer(o);
  auto stub = Connect(server->port());
  std::vector<v1::EvaluateRequest> batches;
  std::vector<v1::EvaluateResponse> expected;
  for (int k = 0; k < 24; ++k) {
    const int64_t rows = k % 3 == 0 ? 2048 : 1 + k;  // 128k or a few hundred elements
    v1::EvaluateRequest b = RandomRequest<float>(rows, 64, 40 + k, v1::REDUCTION_SUM);
    b.set_request_id("b" + std::to_string(k));
    b.mutable_gradients()->set_logits(k % 2 == 0);
    grpc::ClientContext ctx;
    v1::EvaluateResponse unary;
    ASSERT_TRUE(stub->Evaluate(&ctx, b, &unary).ok());
    expected.push_back(unary);
    batches.push_back(std::move(b));
  }
  std::vector<v1::EvaluateStreamResponse> replies;
  ASSERT_NO_FATAL_FAILURE(RunStream(stub.get(), batches, &replies));
  for (size_t k = 0; k < replies.size(); ++k) {
    EXPECT_EQ(replies[k].response().loss().data(), expected[k].loss().data()) << k;
    EXPECT_EQ(replies[k].response().grad_logits().data(), expected[k].grad_logits().data()) << k;
  }
  for (int i = 0; i < 500 && server->held_bytes() != 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  EXPECT_EQ(server->held_bytes(), 0);
}

}  // namespace
}  // namespace lossd::server
