// The server in-process over a real TCP socket: success paths and one test per error row of
// docs/design.md section 5 that applies to Evaluate.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "lossd/kernels/bce.h"
#include "lossd/kernels/dtype.h"
#include "lossd/kernels/operand.h"
#include "lossd/kernels/reference.h"
#include "lossd/v1/lossd.grpc.pb.h"
#include "server/server.h"
#include "tests/server/test_server_util.h"
#include "grpc/health/v1/health.grpc.pb.h"

namespace lossd::server {
namespace {

v1::Tensor F32(const std::vector<float>& v, const std::vector<int64_t>& shape) {
  v1::Tensor t;
  t.set_dtype(v1::DTYPE_FLOAT32);
  for (int64_t d : shape) t.add_shape(d);
  t.set_data(std::string(reinterpret_cast<const char*>(v.data()), v.size() * 4));
  return t;
}

std::vector<float> AsF32(const v1::Tensor& t) {
  std::vector<float> v(t.data().size() / 4);
  std::memcpy(v.data(), t.data().data(), t.data().size());
  return v;
}

class ServerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    // Device kCpu: a server without a usable GPU, on any machine.
    ServerOptions o = testing::LoopbackOptions();
    o.max_elements = 1 << 20;
    server_ = testing::StartServer(o).release();
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }
  void SetUp() override {
    channel_ = grpc::CreateChannel(absl::StrCat("127.0.0.1:", server_->port()),
                                   grpc::InsecureChannelCredentials());
    stub_ = v1::LossService::NewStub(channel_);
  }

  // A valid [4,7] request: logits, targets, weight [7], pos_weight [7].
  v1::EvaluateRequest Valid(v1::Reduction r) {
    std::vector<float> x(28), y(28), w(7), p(7);
    for (int i = 0; i < 28; ++i) {
      x[i] = 0.37f * static_cast<float>(i) - 5.0f;
      y[i] = (i % 3 == 0) ? 1.0f : (i % 3 == 1 ? 0.0f : 0.25f);
    }
    for (int c = 0; c < 7; ++c) {
      w[c] = 2.0f + static_cast<float>(c % 2);
      p[c] = 3.0f - static_cast<float>(c % 2);
    }
    v1::EvaluateRequest req;
    req.set_request_id("req-1");
    *req.mutable_logits() = F32(x, {4, 7});
    *req.mutable_targets() = F32(y, {4, 7});
    *req.mutable_weight() = F32(w, {7});
    *req.mutable_bce_with_logits()->mutable_pos_weight() = F32(p, {7});
    req.set_reduction(r);
    req.mutable_gradients()->set_logits(true);
    return req;
  }

  grpc::Status Call(const v1::EvaluateRequest& req, v1::EvaluateResponse* resp) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
    return stub_->Evaluate(&ctx, req, resp);
  }

  void ExpectError(const v1::EvaluateRequest& req, grpc::StatusCode code,
                   const std::vector<std::string>& needles) {
    v1::EvaluateResponse resp;
    grpc::Status s = Call(req, &resp);
    EXPECT_EQ(s.error_code(), code) << s.error_message();
    for (const std::string& n : needles) {
      EXPECT_NE(s.error_message().find(n), std::string::npos)
          << "message \"" << s.error_message() << "\" lacks \"" << n << "\"";
    }
  }

  static LossdServer* server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::LossService::Stub> stub_;
};

LossdServer* ServerTest::server_ = nullptr;

// Reference values through the kernels' float64 reference on the same bytes.
std::vector<double> Expected(const v1::EvaluateRequest& req, kernels::Reduction r,
                             std::vector<double>* grad) {
  kernels::BceArgs a;
  a.numel = 28;
  a.logits = req.logits().data().data();
  a.targets = req.targets().data().data();
  a.weight = *kernels::MakeOperand("weight", kernels::DType::kFloat32,
                                   req.weight().data().data(), {7}, {4, 7});
  a.pos_weight = *kernels::MakeOperand("pos_weight", kernels::DType::kFloat32,
                                       req.bce_with_logits().pos_weight().data().data(), {7},
                                       {4, 7});
  a.reduction = r;
  std::vector<double> loss(r == kernels::Reduction::kNone ? 28 : 1);
  grad->resize(28);
  kernels::ReferenceBce(a, loss.data(), grad->data(), nullptr);
  return loss;
}

TEST_F(ServerTest, EachReductionMatchesReference) {
  struct Case {
    v1::Reduction wire;
    kernels::Reduction kernel;
  };
  for (Case c : {Case{v1::REDUCTION_NONE, kernels::Reduction::kNone},
                 Case{v1::REDUCTION_MEAN, kernels::Reduction::kMean},
                 Case{v1::REDUCTION_SUM, kernels::Reduction::kSum},
                 Case{v1::REDUCTION_UNSPECIFIED, kernels::Reduction::kMean}}) {
    v1::EvaluateRequest req = Valid(c.wire);
    v1::EvaluateResponse resp;
    grpc::Status s = Call(req, &resp);
    ASSERT_TRUE(s.ok()) << s.error_message();
    std::vector<double> grad;
    std::vector<double> want = Expected(req, c.kernel, &grad);
    EXPECT_EQ(resp.request_id(), "req-1");
    EXPECT_EQ(resp.device(), v1::DEVICE_CPU);
    EXPECT_EQ(resp.num_elements(), 28);
    EXPECT_EQ(resp.loss().dtype(), v1::DTYPE_FLOAT32);
    if (c.kernel == kernels::Reduction::kNone) {
      ASSERT_EQ(resp.loss().shape_size(), 2);
      EXPECT_EQ(resp.loss().shape(0), 4);
      EXPECT_EQ(resp.loss().shape(1), 7);
    } else {
      EXPECT_EQ(resp.loss().shape_size(), 0);
    }
    std::vector<float> loss = AsF32(resp.loss());
    ASSERT_EQ(loss.size(), want.size());
    for (size_t i = 0; i < want.size(); ++i) {
      EXPECT_NEAR(loss[i], want[i], 1e-6 * std::fabs(want[i]) + 1e-30) << i;
    }
    std::vector<float> g = AsF32(resp.grad_logits());
    ASSERT_EQ(g.size(), 28u);
    for (size_t i = 0; i < 28; ++i) EXPECT_NEAR(g[i], grad[i], 1e-6 * std::fabs(grad[i]) + 1e-30);
    EXPECT_FALSE(resp.has_grad_targets());
    EXPECT_GE(resp.timing().total_ns(), resp.timing().compute_ns());
  }
}

TEST_F(ServerTest, MalformedTensorDtypeUnset) {
  v1::EvaluateRequest req = Valid(v1::REDUCTION_MEAN);
  req.mutable_logits()->set_dtype(v1::DTYPE_UNSPECIFIED);
  ExpectError(req, grpc::StatusCode::INVALID_ARGUMENT, {"logits", "dtype is unset"});
  req = Valid(v1::REDUCTION_MEAN);
  req.mutable_targets()->set_dtype(static_cast<v1::DType>(42));
  ExpectError(req, grpc::StatusCode::INVALID_ARGUMENT, {"targets", "42"});
  req = Valid(v1::REDUCTION_MEAN);
  req.clear_logits();
  ExpectError(req, grpc::StatusCode::INVALID_ARGUMENT, {"logits", "missing"});
}

TEST_F(ServerTest, MalformedTensorShape) {
  v1::EvaluateRequest req = Valid(v1::REDUCTION_MEAN);
  req.mutable_logits()->set_shape(1, -7);
  ExpectError(req, grpc::StatusCode::INVALID_ARGUMENT, {"logits", "[4,-7]", "negative"});
  req = Valid(v1::REDUCTION_MEAN);
  for (int i = 0; i < 8; ++i) req.mutable_targets()->add_shape(1);
  ExpectError(req, grpc::StatusCode::INVALID_ARGUMENT, {"targets", "rank 10"});
  // numel overflow: never allocates from the declared size.
  req = Valid(v1::REDUCTION_MEAN);
  req.mutable_logits()->clear_shape();
  for (int i = 0; i < 4; ++i) req.mutable_logits()->add_shape(int64_t{1} << 20);
  ExpectError(req, grpc::StatusCode::INVALID_ARGUMENT, {"logits", "overflow"});
}

TEST_F(ServerTest, WholeRequestCountsAreValidated) {
  v1::EvaluateRequest req = Valid(v1::REDUCTION_MEAN);
  req.mutable_whole()->set_num_elements(27);
  ExpectError(req, grpc::StatusCode::INVALID_ARGUMENT,
              {"whole.num_elements 27 is less than this part's 28 elements"});
  req.mutable_whole()->set_num_elements(100);
  req.mutable_whole()->set_num_kept(101);
  ExpectError(req, grpc::StatusCode::INVALID_ARGUMENT, {"whole.num_kept 101", "[0, "});
  req.mutable_whole()->clear_num_kept();
  req.mutable_bce_with_logits()->set_normalize(true);
  req.mutable_bce_with_logits()->set_ignore_index(-100);
  ExpectError(req, grpc::StatusCode::INVALID_ARGUMENT, {"whole.num_kept is required"});
  // A valid part: MEAN gradients divided by the whole's 100 elements, not the part's 28.
  req = Valid(v1::REDUCTION_MEAN);
  v1::EvaluateResponse one_shot, part;
  ASSERT_TRUE(Call(req, &one_shot).ok());
  req.mutable_whole()->set_num_elements(100);
  ASSERT_TRUE(Call(req, &part).ok());
  const std::vector<float> g1 = AsF32(one_shot.grad_logits()), g2 = AsF32(part.grad_logits());
  ASSERT_EQ(g1.size(), g2.size());
  for (size_t i = 0; i < g1.size(); ++i) {
    EXPECT_NEAR(g2[i], g1[i] * 28.0f / 100.0f, 1e-6f * std::fabs(g1[i])) << i;
  }
  grpc::ClientContext ctx;
  v1::Capabilities caps;
  ASSERT_TRUE(stub_->GetCapabilities(&ctx, v1::GetCapabilitiesRequest(), &caps).ok());
  EXPECT_TRUE(caps.whole_requests());
  // Accumulate reports the kept count a split normalize request passes on, and refuses whole.
  for (const bool with_whole : {false, true}) {
    grpc::ClientContext actx;
    v1::AccumulateResponse acc;
    auto writer = stub_->Accumulate(&actx, &acc);
    v1::EvaluateRequest batch = Valid(v1::REDUCTION_SUM);
    batch.clear_gradients();
    batch.mutable_bce_with_logits()->set_normalize(true);
    batch.mutable_bce_with_logits()->set_ignore_index(1);  // targets i % 3 == 0 are 1: 10 of 28
    if (with_whole) batch.mutable_whole()->set_num_elements(28);
    ASSERT_TRUE(writer->Write(batch));
    writer->WritesDone();
    const grpc::Status status = writer->Finish();
    if (with_whole) {
      EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
      EXPECT_NE(status.error_message().find("whole is not allowed"), std::string::npos);
    } else {
      ASSERT_TRUE(status.ok()) << status.error_message();
      EXPECT_EQ(acc.num_elements(), 28);
      EXPECT_EQ(acc.num_kept(), 18);
    }
  }
}

TEST_F(ServerTest, DataLengthMismatch) {
  v1::EvaluateRequest req = Valid(v1::REDUCTION_MEAN);
  req.mutable_logits()->mutable_data()->resize(12);
  ExpectError(req, grpc::StatusCode::INVALID_ARGUMENT,
              {"logits: data has 12 bytes, expected 112 (FLOAT32 [4,7])"});
}

TEST_F(ServerTest, ShapeMismatch) {
  v1::EvaluateRequest req = Valid(v1::REDUCTION_MEAN);
  std::vector<float> y(32, 0.0f);
  *req.mutable_targets() = F32(y, {4, 8});
  ExpectError(req, grpc::StatusCode::INVALID_ARGUMENT, {"targets shape [4,8] != logits shape [4,7]"});
}

TEST_F(ServerTest, WeightNotBroadcastable) {
  v1::EvaluateRequest req = Valid(v1::REDUCTION_MEAN);
  *req.mutable_weight() = F32({1, 2, 3}, {3});
  ExpectError(req, grpc::StatusCode::INVALID_ARGUMENT,
              {"weight shape [3] is not broadcastable to logits shape [4,7]"});
  req = Valid(v1::REDUCTION_MEAN);
  *req.mutable_bce_with_logits()->mutable_pos_weight() = F32(std::vector<float>(8, 1), {2, 4});
  ExpectError(req, grpc::StatusCode::INVALID_ARGUMENT, {"pos_weight shape [2,4]"});
}

TEST_F(ServerTest, UnknownReductionDeviceAndLoss) {
  v1::EvaluateRequest req = Valid(v1::REDUCTION_MEAN);
  req.set_reduction(static_cast<v1::Reduction>(99));
  ExpectError(req, grpc::StatusCode::INVALID_ARGUMENT, {"reduction 99"});
  req = Valid(v1::REDUCTION_MEAN);
  req.set_device(static_cast<v1::Device>(7));
  ExpectError(req, grpc::StatusCode::INVALID_ARGUMENT, {"device 7"});
  req = Valid(v1::REDUCTION_MEAN);
  req.clear_bce_with_logits();
  ExpectError(req, grpc::StatusCode::INVALID_ARGUMENT, {"loss", "bce_with_logits"});
}

TEST_F(ServerTest, CudaWithoutGpuIsFailedPrecondition) {
  v1::EvaluateRequest req = Valid(v1::REDUCTION_MEAN);
  req.set_device(v1::DEVICE_CUDA);
  ExpectError(req, grpc::StatusCode::FAILED_PRECONDITION, {"CUDA"});
  // AUTO falls back to the CPU.
  req.set_device(v1::DEVICE_AUTO);
  v1::EvaluateResponse resp;
  ASSERT_TRUE(Call(req, &resp).ok());
  EXPECT_EQ(resp.device(), v1::DEVICE_CPU);
}

TEST_F(ServerTest, TooManyElementsIsResourceExhausted) {
  v1::EvaluateRequest req = Valid(v1::REDUCTION_MEAN);
  req.mutable_logits()->set_shape(0, 1 << 20);  // 7M elements > limit 1M; data not sent
  ExpectError(req, grpc::StatusCode::RESOURCE_EXHAUSTED, {"logits", "limit"});
}

TEST_F(ServerTest, NaNPropagatesOrIsRejected) {
  v1::EvaluateRequest req = Valid(v1::REDUCTION_NONE);
  float nan = std::nanf("");
  std::memcpy(req.mutable_logits()->mutable_data()->data() + 4 * 5, &nan, 4);
  v1::EvaluateResponse resp;
  ASSERT_TRUE(Call(req, &resp).ok());
  std::vector<float> l = AsF32(resp.loss());
  EXPECT_TRUE(std::isnan(l[5]));
  EXPECT_FALSE(std::isnan(l[4]));
  req.set_reject_nan(true);
  ExpectError(req, grpc::StatusCode::INVALID_ARGUMENT, {"logits contains NaN at flat index 5"});
}

TEST_F(ServerTest, CapabilitiesAndHealth) {
  grpc::ClientContext ctx;
  v1::Capabilities caps;
  ASSERT_TRUE(stub_->GetCapabilities(&ctx, v1::GetCapabilitiesRequest(), &caps).ok());
  ASSERT_EQ(caps.losses_size(), 2);
  EXPECT_EQ(caps.losses(0), "bce_with_logits");
  EXPECT_EQ(caps.dtypes_size(), 4);
  ASSERT_EQ(caps.devices_size(), 1);
  EXPECT_EQ(caps.devices(0), v1::DEVICE_CPU);
  EXPECT_EQ(caps.max_elements(), 1 << 20);
  EXPECT_EQ(caps.max_message_bytes(), int64_t{256} << 20);

  auto health = grpc::health::v1::Health::NewStub(channel_);
  grpc::ClientContext hctx;
  grpc::health::v1::HealthCheckRequest hreq;
  grpc::health::v1::HealthCheckResponse hresp;
  ASSERT_TRUE(health->Check(&hctx, hreq, &hresp).ok());
  EXPECT_EQ(hresp.status(), grpc::health::v1::HealthCheckResponse::SERVING);
}

TEST_F(ServerTest, BigRequestAboveGrpcDefaultLimit) {
  // 1M float32 logits + targets = 8 MiB > gRPC's 4 MiB default.
  const int n = 1 << 20;
  std::vector<float> x(n), y(n);
  for (int i = 0; i < n; ++i) {
    x[i] = static_cast<float>(i % 200) * 0.05f - 5.0f;
    y[i] = static_cast<float>(i % 2);
  }
  v1::EvaluateRequest req;
  *req.mutable_logits() = F32(x, {n});
  *req.mutable_targets() = F32(y, {n});
  req.mutable_bce_with_logits();
  req.set_reduction(v1::REDUCTION_NONE);
  req.mutable_gradients()->set_logits(true);
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  args.SetMaxSendMessageSize(64 << 20);
  auto ch = grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", server_->port()),
                                      grpc::InsecureChannelCredentials(), args);
  auto stub = v1::LossService::NewStub(ch);
  grpc::ClientContext ctx;
  v1::EvaluateResponse resp;
  grpc::Status s = stub->Evaluate(&ctx, req, &resp);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(resp.loss().data().size(), static_cast<size_t>(n) * 4);
  EXPECT_EQ(resp.grad_logits().data().size(), static_cast<size_t>(n) * 4);
}

}  // namespace
}  // namespace lossd::server
