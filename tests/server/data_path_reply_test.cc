// Replies of the data path (server/message_io.h, docs/data-path.md): outputs written into pool
// blocks and sent as slices that reference them, with hand-encoded tensor headers. Compared
// with the path they replaced, written out here independently (protobuf parse, outputs in the
// message's resized strings, protobuf serialization): byte for byte for the encoder, field by
// field over a real socket for Evaluate and EvaluateStream, and against the float64 reference.
#include <grpc/grpc.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "server/core.h"
#include "google/protobuf/util/message_differencer.h"
#include "lossd/kernels/backend.h"
#include "lossd/kernels/reference.h"
#include "lossd/v1/lossd.grpc.pb.h"
#include "server/message_io.h"
#include "server/metrics.h"
#include "server/request.h"
#include "server/server.h"
#include "tests/server/test_server_util.h"

namespace lossd::server {
namespace {

using namespace testing;  // the helpers of tests/server/test_server_util.h

// The reply as lossd built it before the data path: the request's own data, each output a
// std::string resized to its size, then SerializeToString.
v1::EvaluateResponse OldPath(const v1::EvaluateRequest& request) {
  static std::unique_ptr<kernels::Backend> cpu = kernels::MakeCpuBackend({1});
  auto plan = PlanEvaluate(request, Limits());
  EXPECT_TRUE(plan.ok()) << plan.status();
  v1::EvaluateResponse r;
  if (!plan.ok()) return r;
  const size_t item = kernels::ItemSize(plan->args.dtype);
  auto fill = [&](const std::vector<int64_t>& shape, int64_t count, v1::Tensor* t) {
    t->set_dtype(static_cast<v1::DType>(plan->args.dtype));
    for (int64_t d : shape) t->add_shape(d);
    t->mutable_data()->resize(static_cast<size_t>(count) * item);
    return t->mutable_data()->data();
  };
  kernels::BceOutputs out;
  out.loss = fill(plan->LossShape(), plan->loss_count, r.mutable_loss());
  if (plan->grad_logits) out.grad_logits = fill(plan->shape, plan->args.numel, r.mutable_grad_logits());
  if (plan->grad_targets) {
    out.grad_targets = fill(plan->shape, plan->args.numel, r.mutable_grad_targets());
  }
  EXPECT_TRUE(cpu->Bce(plan->args, out).ok());
  r.set_request_id(request.request_id());
  r.set_device(v1::DEVICE_CPU);
  r.set_num_elements(plan->args.numel);
  return r;
}

// Field by field, the tensors' bytes included; the timings are the server's own.
void ExpectSameReply(const v1::EvaluateResponse& expected, const v1::EvaluateResponse& got) {
  v1::EvaluateResponse a = expected, b = got;
  a.clear_timing();
  b.clear_timing();
  std::string diff;
  google::protobuf::util::MessageDifferencer d;
  d.ReportDifferencesToString(&diff);
  EXPECT_TRUE(d.Compare(a, b)) << diff;
  EXPECT_EQ(a.loss().data(), b.loss().data());
  EXPECT_EQ(a.grad_logits().data(), b.grad_logits().data());
  EXPECT_EQ(a.grad_targets().data(), b.grad_targets().data());
}

struct Case {
  v1::Reduction reduction;
  bool grad_logits, grad_targets;
  bool float64;
  int64_t rows;  // x 64 columns; 2048 rows gives 512 KiB float32 tensors (zero-copy slices)
};

std::vector<Case> AllCases() {
  std::vector<Case> cases;
  for (v1::Reduction r : {v1::REDUCTION_UNSPECIFIED, v1::REDUCTION_NONE, v1::REDUCTION_MEAN,
                          v1::REDUCTION_SUM, v1::REDUCTION_PER_SAMPLE_MEAN}) {
    for (int g = 0; g < 4; ++g) {
      for (int64_t rows : {3, 2048}) {
        cases.push_back({r, (g & 1) != 0, (g & 2) != 0, rows == 3 && g == 3, rows});
      }
    }
  }
  return cases;
}

v1::EvaluateRequest MakeRequest(const Case& c, uint64_t seed) {
  v1::EvaluateRequest req = c.float64 ? RandomRequest<double>(c.rows, 64, seed, c.reduction)
                                      : RandomRequest<float>(c.rows, 64, seed, c.reduction);
  req.set_request_id("case-" + std::to_string(seed));
  req.mutable_gradients()->set_logits(c.grad_logits);
  req.mutable_gradients()->set_targets(c.grad_targets);
  return req;
}

class DataPathReplyTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    grpc_init();
    ServerOptions o = LoopbackOptions();
    o.inline_elements = 1000;  // small batches inline, large ones on the workers
    server_ = StartServer(o).release();
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
    grpc_shutdown();
  }
  static LossdServer* server_;
};
LossdServer* DataPathReplyTest::server_ = nullptr;

// The encoder against protobuf's serializer: the same bytes, unary and stream, small (one
// slice) and large (zero-copy slices of pool blocks).
TEST_F(DataPathReplyTest, EncodedBytesEqualProtobufSerialization) {
  Metrics metrics;
  CoreConfig config;
  Core core(config, kernels::MakeCpuBackend({1}), nullptr, "", &metrics);
  uint64_t seed = 100;
  for (const Case& c : AllCases()) {
    SCOPED_TRACE(::testing::Message() << "reduction " << c.reduction << " grads "
                                      << c.grad_logits << c.grad_targets << " rows " << c.rows);
    const v1::EvaluateRequest req = MakeRequest(c, ++seed);
    auto plan = core.planner().Prepare(req);
    ASSERT_TRUE(plan.ok()) << plan.status();
    for (bool stream : {false, true}) {
      CallControl control;
      ComputeResult result;
      ASSERT_TRUE(core.executor().Compute(control, *plan, 7, &result).ok());
      result.timing.set_reply_unix_ns(11);
      // What protobuf makes of the old path's message with the same server-side fields.
      v1::EvaluateResponse expected = OldPath(req);
      expected.set_device(result.device);
      *expected.mutable_timing() = result.timing;
      std::string want;
      if (stream) {
        v1::EvaluateStreamResponse wrapper;
        wrapper.set_request_id(req.request_id());
        *wrapper.mutable_response() = expected;
        wrapper.SerializeToString(&want);
      } else {
        expected.SerializeToString(&want);
      }
      bool large = false;
      for (const OutputTensor* t : {&result.loss, &result.grad_logits, &result.grad_targets}) {
        large = large || (t->present && t->block.size() >= kZeroCopyBytes);
      }
      grpc::ByteBuffer out;
      ASSERT_TRUE(EncodeEvaluateReply(req.request_id(), stream, &result, &out).ok());
      std::vector<grpc::Slice> slices;
      ASSERT_TRUE(out.Dump(&slices).ok());
      std::string got;
      for (const grpc::Slice& s : slices) got.append(reinterpret_cast<const char*>(s.begin()), s.size());
      EXPECT_EQ(got.size(), want.size());
      EXPECT_TRUE(got == want) << "encoded bytes differ from protobuf's serialization";
      // Large outputs travel as their own slices; a small reply is one slice.
      EXPECT_EQ(slices.size() > 1, large) << slices.size() << " slices";
    }
  }
}

TEST_F(DataPathReplyTest, EvaluateOverASocketEqualsTheOldPath) {
  auto stub = Connect(server_->port());
  uint64_t seed = 500;
  for (const Case& c : AllCases()) {
    SCOPED_TRACE(::testing::Message() << "reduction " << c.reduction << " grads "
                                      << c.grad_logits << c.grad_targets << " rows " << c.rows);
    const v1::EvaluateRequest req = MakeRequest(c, ++seed);
    grpc::ClientContext ctx;
    v1::EvaluateResponse resp;
    const grpc::Status s = stub->Evaluate(&ctx, req, &resp);
    ASSERT_TRUE(s.ok()) << s.error_message();
    ExpectSameReply(OldPath(req), resp);
    EXPECT_GT(resp.timing().received_unix_ns(), 0);
    EXPECT_LE(resp.timing().received_unix_ns(), resp.timing().compute_start_unix_ns());
    EXPECT_LE(resp.timing().compute_start_unix_ns(), resp.timing().compute_end_unix_ns());
    EXPECT_LE(resp.timing().compute_end_unix_ns(), resp.timing().reply_unix_ns());
  }
}

TEST_F(DataPathReplyTest, EvaluateStreamOverASocketEqualsTheOldPath) {
  auto stub = Connect(server_->port());
  grpc::ClientContext ctx;
  auto stream = stub->EvaluateStream(&ctx);
  std::vector<v1::EvaluateRequest> sent;
  uint64_t seed = 900;
  for (const Case& c : AllCases()) sent.push_back(MakeRequest(c, ++seed));
  v1::EvaluateRequest bad = sent[1];
  bad.mutable_targets()->set_data("short");
  sent.insert(sent.begin() + 2, bad);
  std::thread writer([&] {
    for (const auto& r : sent) ASSERT_TRUE(stream->Write(r));
    stream->WritesDone();
  });
  v1::EvaluateStreamResponse reply;
  size_t k = 0;
  for (; stream->Read(&reply); ++k) {
    ASSERT_LT(k, sent.size());
    EXPECT_EQ(reply.request_id(), sent[k].request_id());
    if (k == 2) {
      EXPECT_EQ(reply.error().code(), static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
      EXPECT_NE(reply.error().message().find("targets"), std::string::npos);
      continue;
    }
    ASSERT_TRUE(reply.has_response()) << reply.error().message();
    ExpectSameReply(OldPath(sent[k]), reply.response());
    EXPECT_GT(reply.response().timing().compute_start_unix_ns(), 0);
    EXPECT_GE(reply.response().timing().reply_unix_ns(),
              reply.response().timing().compute_end_unix_ns());
  }
  writer.join();
  EXPECT_EQ(k, sent.size());
  EXPECT_TRUE(stream->Finish().ok());
}

// The values against the float64 reference (float32 outputs within a few ulp).
TEST_F(DataPathReplyTest, OutputsMatchTheFloat64Reference) {
  auto stub = Connect(server_->port());
  Case c{v1::REDUCTION_NONE, true, true, false, 2048};
  const v1::EvaluateRequest req = MakeRequest(c, 77);
  grpc::ClientContext ctx;
  v1::EvaluateResponse resp;
  ASSERT_TRUE(stub->Evaluate(&ctx, req, &resp).ok());
  auto plan = PlanEvaluate(req, Limits());
  ASSERT_TRUE(plan.ok());
  const size_t n = static_cast<size_t>(plan->args.numel);
  std::vector<double> loss(n), gx(n), gy(n);
  kernels::ReferenceBce(plan->args, loss.data(), gx.data(), gy.data());
  const std::vector<float> got_loss = testing::Values<float>(resp.loss());
  const std::vector<float> got_gx = testing::Values<float>(resp.grad_logits());
  const std::vector<float> got_gy = testing::Values<float>(resp.grad_targets());
  ASSERT_EQ(got_loss.size(), n);
  ASSERT_EQ(got_gx.size(), n);
  ASSERT_EQ(got_gy.size(), n);
  // The loss within 4 ulp (docs/design.md section 4); a gradient within 4 ulp of its larger
  // term, bounded here by the inputs' ranges (|w| <= 1.5, |p| <= 2.5, |x| <= 6).
  auto close = [](double want, float got, double scale) {
    return std::fabs(got - want) <= 4 * 1.1920929e-7 * (std::fabs(want) + scale) + 1e-37;
  };
  int bad = 0;
  for (size_t i = 0; i < n; ++i) {
    bad += !close(loss[i], got_loss[i], 0) + !close(gx[i], got_gx[i], 4) +
           !close(gy[i], got_gy[i], 24);
  }
  EXPECT_EQ(bad, 0);
}

}  // namespace
}  // namespace lossd::server
