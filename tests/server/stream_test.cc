// EvaluateStream and Accumulate over a real socket.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "tests/server/test_server_util.h"

namespace lossd::server {
namespace {

using namespace testing;  // the helpers of tests/server/test_server_util.h

TEST(EvaluateStreamTest, RepliesInOrderWithPerBatchErrors) {
  auto server = StartServer();
  auto stub = Connect(server->port());
  grpc::ClientContext ctx;
  auto stream = stub->EvaluateStream(&ctx);
  std::vector<v1::EvaluateRequest> sent;
  for (int i = 0; i < 12; ++i) {
    // Sizes vary so that later batches can finish before earlier ones.
    v1::EvaluateRequest req =
        RandomRequest<float>(i % 3 == 0 ? 3000 : 5, 7, i, v1::REDUCTION_SUM);
    req.set_request_id(absl::StrCat("batch-", i));
    if (i % 4 == 1) req.mutable_targets()->set_shape(1, 8);  // a bad batch
    sent.push_back(req);
    ASSERT_TRUE(stream->Write(req));
  }
  stream->WritesDone();
  v1::EvaluateStreamResponse reply;
  int got = 0;
  while (stream->Read(&reply)) {
    const v1::EvaluateRequest& req = sent[got];
    EXPECT_EQ(reply.request_id(), req.request_id());
    if (got % 4 == 1) {
      ASSERT_TRUE(reply.has_error()) << got;
      EXPECT_EQ(reply.error().code(), static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
      EXPECT_NE(reply.error().message().find("targets: data has"), std::string::npos)
          << reply.error().message();
    } else {
      ASSERT_TRUE(reply.has_response()) << got << " " << reply.error().message();
      const auto loss = Values<float>(reply.response().loss());
      ASSERT_EQ(loss.size(), 1u);
      // The same batch as a unary call gives the same bits.
      grpc::ClientContext uctx;
      v1::EvaluateResponse unary;
      ASSERT_TRUE(stub->Evaluate(&uctx, req, &unary).ok());
      EXPECT_EQ(unary.loss().data(), reply.response().loss().data());
    }
    ++got;
  }
  EXPECT_EQ(got, 12);
  EXPECT_TRUE(stream->Finish().ok());
}

TEST(EvaluateStreamTest, EmptyStreamAndEarlyClientCancel) {
  auto server = StartServer();
  auto stub = Connect(server->port());
  {
    grpc::ClientContext ctx;
    auto stream = stub->EvaluateStream(&ctx);
    stream->WritesDone();
    v1::EvaluateStreamResponse reply;
    EXPECT_FALSE(stream->Read(&reply));
    EXPECT_TRUE(stream->Finish().ok());
  }
  {
    grpc::ClientContext ctx;
    auto stream = stub->EvaluateStream(&ctx);
    for (int i = 0; i < 6; ++i) stream->Write(RandomRequest<float>(20000, 8, i, v1::REDUCTION_NONE));
    ctx.TryCancel();
    EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::CANCELLED);
  }
  // The server keeps serving.
  grpc::ClientContext ctx;
  v1::EvaluateResponse resp;
  EXPECT_TRUE(stub->Evaluate(&ctx, RandomRequest<float>(4, 7, 1, v1::REDUCTION_MEAN), &resp).ok());
}

// Accumulate over any split equals a one-shot Evaluate of all rows, bit for bit.
template <typename T>
void CheckAccumulateSplits(v1::Reduction reduction) {
  auto server = StartServer();
  auto stub = Connect(server->port());
  const int64_t rows = 1733, cols = 13;  // 22529 elements: several reduction blocks
  const v1::EvaluateRequest full = RandomRequest<T>(rows, cols, 99, reduction);
  grpc::ClientContext octx;
  v1::EvaluateResponse one_shot;
  ASSERT_TRUE(stub->Evaluate(&octx, full, &one_shot).ok());
  const T want = Values<T>(one_shot.loss())[0];
  const std::vector<std::vector<int64_t>> splits = {
      {rows}, {1, rows - 1}, {157, 158, 1, 700, rows - 1016}, {rows - 2, 1, 1}};
  std::mt19937 rng(5);
  std::vector<int64_t> random_split;
  for (int64_t left = rows; left > 0;) {
    const int64_t take = std::min<int64_t>(left, 1 + rng() % 400);
    random_split.push_back(take);
    left -= take;
  }
  std::vector<std::vector<int64_t>> all = splits;
  all.push_back(random_split);
  for (const auto& split : all) {
    grpc::ClientContext ctx;
    v1::AccumulateResponse acc;
    auto writer = stub->Accumulate(&ctx, &acc);
    int64_t r0 = 0;
    for (int64_t take : split) {
      ASSERT_TRUE(writer->Write(SliceRows(full, r0, r0 + take)));
      r0 += take;
    }
    writer->WritesDone();
    grpc::Status s = writer->Finish();
    ASSERT_TRUE(s.ok()) << s.error_message();
    EXPECT_EQ(acc.num_elements(), rows * cols);
    EXPECT_EQ(acc.num_batches(), static_cast<int64_t>(split.size()));
    const T got = static_cast<T>(acc.loss());
    EXPECT_EQ(std::memcmp(&got, &want, sizeof(T)), 0)
        << "split of " << split.size() << " batches: " << got << " vs " << want;
  }
}

TEST(AccumulateTest, BitwiseEqualToOneShotForAnySplitFloat64Sum) {
  CheckAccumulateSplits<double>(v1::REDUCTION_SUM);
}
TEST(AccumulateTest, BitwiseEqualToOneShotForAnySplitFloat64Mean) {
  CheckAccumulateSplits<double>(v1::REDUCTION_MEAN);
}
TEST(AccumulateTest, BitwiseEqualToOneShotForAnySplitFloat32Mean) {
  CheckAccumulateSplits<float>(v1::REDUCTION_MEAN);
}

TEST(AccumulateTest, RejectsMixedOptionsAndBadBatches) {
  auto server = StartServer();
  auto stub = Connect(server->port());
  {
    grpc::Status s = Accumulate(stub.get(), {RandomRequest<float>(10, 7, 1, v1::REDUCTION_SUM),
                                             RandomRequest<float>(10, 7, 2, v1::REDUCTION_MEAN)});
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(s.error_message().find("batch 1"), std::string::npos) << s.error_message();
  }
  {
    grpc::Status s = Accumulate(stub.get(), {RandomRequest<float>(10, 7, 1, v1::REDUCTION_NONE)});
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(s.error_message().find("SUM or MEAN"), std::string::npos) << s.error_message();
  }
  {
    v1::EvaluateRequest bad = RandomRequest<float>(10, 7, 1, v1::REDUCTION_SUM);
    bad.mutable_logits()->mutable_data()->resize(3);
    grpc::Status s =
        Accumulate(stub.get(), {RandomRequest<float>(10, 7, 1, v1::REDUCTION_SUM), bad});
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(s.error_message().find("batch 1: logits: data has 3 bytes"), std::string::npos)
        << s.error_message();
  }
  {
    // Refused when the batch arrives, before it is computed.
    v1::EvaluateRequest cr = RandomRequest<float>(10, 7, 1, v1::REDUCTION_SUM);
    cr.set_precision(v1::PRECISION_CORRECTLY_ROUNDED);
    grpc::Status s = Accumulate(stub.get(), {cr});
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(s.error_message().find("batch 0: precision PRECISION_CORRECTLY_ROUNDED is not "
                                     "offered for Accumulate; use Evaluate"),
              std::string::npos)
        << s.error_message();
  }
  {
    // No batches: SUM is 0.
    v1::AccumulateResponse acc;
    ASSERT_TRUE(Accumulate(stub.get(), {}, &acc).ok());
    EXPECT_EQ(acc.num_elements(), 0);
  }
}

}  // namespace
}  // namespace lossd::server
