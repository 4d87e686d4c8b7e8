// Tensor references and output placement (docs/data-path.md section 5) through the
// RegionResolver seam (server/regions.h), with a fake resolver over a heap buffer: inputs read
// and outputs written in the buffer match the bytes path bit for bit, resolver errors come back
// with their status, overlaps and outputs that are not produced are refused, and a region
// that shrank during the computation fails the call.
#include <grpc/grpc.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <initializer_list>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "server/core.h"
#include "lossd/kernels/backend.h"
#include "server/message_io.h"
#include "server/metrics.h"
#include "server/regions.h"
#include "server/server.h"
#include "tests/server/test_server_util.h"

namespace lossd::server {
namespace {

// One region "r" over a heap buffer. Counts the spans it handed out that are still alive.
class FakeResolver : public RegionResolver {
 public:
  explicit FakeResolver(size_t bytes) : buffer_(bytes, 0) {}

  absl::StatusOr<RegionSpan> Resolve(std::string_view field, const v1::TensorReference& ref,
                                     int64_t bytes, bool writable) const override {
    const std::string name(field);
    if (ref.region() != "r") {
      return absl::NotFoundError(absl::StrCat(name, ": region \"", ref.region(), "\" is unknown"));
    }
    if (static_cast<int64_t>(ref.byte_size()) != bytes) {
      return absl::InvalidArgumentError(
          absl::StrCat(name, ": byte_size ", ref.byte_size(), " != ", bytes));
    }
    if (ref.offset() > buffer_.size() || bytes > static_cast<int64_t>(buffer_.size() - ref.offset())) {
      return absl::InvalidArgumentError(absl::StrCat(name, ": past the region"));
    }
    writable_calls_ += writable;
    RegionSpan span;
    span.data = const_cast<char*>(buffer_.data()) + ref.offset();
    span.bytes = bytes;
    span.keepalive = keepalive_;
    span.damaged = &damaged_;
    return span;
  }

  char* at(size_t offset) { return buffer_.data() + offset; }
  long live_spans() const { return keepalive_.use_count() - 1; }
  std::atomic<bool>& damaged() { return damaged_; }
  mutable int writable_calls_ = 0;

 private:
  std::vector<char> buffer_;
  std::shared_ptr<const void> keepalive_ = std::make_shared<int>(0);
  std::atomic<bool> damaged_{false};
};

v1::TensorReference Ref(uint64_t offset, uint64_t bytes, const std::string& region = "r") {
  v1::TensorReference ref;
  ref.set_region(region);
  ref.set_offset(offset);
  ref.set_byte_size(bytes);
  return ref;
}

class DataPathRegionsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    core_ = std::make_unique<Core>(CoreConfig(), kernels::MakeCpuBackend({1}), nullptr, "",
                                   &metrics_);
    core_->planner().set_region_resolver(&regions_);
  }

  // A [rows, 64] float32 request with both gradients; its logits and targets copied into the
  // region at 0 and at `bytes` when `by_ref`.
  v1::EvaluateRequest Request(bool by_ref, v1::Reduction reduction = v1::REDUCTION_NONE) {
    v1::EvaluateRequest req = testing::RandomRequest<float>(kRows, 64, 9, reduction);
    req.mutable_gradients()->set_logits(true);
    req.mutable_gradients()->set_targets(true);
    if (by_ref) {
      std::memcpy(regions_.at(0), req.logits().data().data(), kBytes);
      std::memcpy(regions_.at(kBytes), req.targets().data().data(), kBytes);
      req.mutable_logits()->clear_data();
      *req.mutable_logits()->mutable_ref() = Ref(0, kBytes);
      req.mutable_targets()->clear_data();
      *req.mutable_targets()->mutable_ref() = Ref(kBytes, kBytes);
    }
    return req;
  }

  absl::Status Run(const v1::EvaluateRequest& req, v1::EvaluateResponse* reply) {
    auto plan = core_->planner().Prepare(req);
    if (!plan.ok()) return plan.status();
    CallControl control;
    ComputeResult result;
    absl::Status s = core_->executor().Compute(control, *plan, 1, &result);
    if (!s.ok()) return s;
    grpc::ByteBuffer out;
    if (absl::Status e = EncodeEvaluateReply(req.request_id(), false, &result, &out); !e.ok()) {
      return e;
    }
    grpc::Slice flat;
    EXPECT_TRUE(out.DumpToSingleSlice(&flat).ok());
    EXPECT_TRUE(reply->ParseFromArray(flat.begin(), static_cast<int>(flat.size())));
    return absl::OkStatus();
  }

  // Runs `req`, which must fail with `code` and a message that names each of `parts`.
  void ExpectFailure(const v1::EvaluateRequest& req, absl::StatusCode code,
                     std::initializer_list<const char*> parts = {}) {
    v1::EvaluateResponse reply;
    const absl::Status s = Run(req, &reply);
    EXPECT_EQ(s.code(), code) << s;
    for (const char* part : parts) EXPECT_NE(s.message().find(part), std::string::npos) << s;
  }

  static constexpr int64_t kRows = 300;
  static constexpr size_t kBytes = kRows * 64 * 4;
  Metrics metrics_;
  FakeResolver regions_{8 * kBytes};
  std::unique_ptr<Core> core_;
};

TEST_F(DataPathRegionsTest, InputsAndOutputsInARegionMatchTheBytesPathBitForBit) {
  v1::EvaluateResponse bytes_reply;
  ASSERT_TRUE(Run(Request(false), &bytes_reply).ok());

  v1::EvaluateRequest req = Request(true);
  v1::OutputPlacement* out = req.mutable_outputs();
  *out->mutable_loss() = Ref(2 * kBytes, kBytes);
  *out->mutable_grad_logits() = Ref(3 * kBytes, kBytes);
  *out->mutable_grad_targets() = Ref(4 * kBytes, kBytes);
  v1::EvaluateResponse reply;
  ASSERT_TRUE(Run(req, &reply).ok());
  EXPECT_EQ(regions_.writable_calls_, 3);
  EXPECT_EQ(regions_.live_spans(), 0) << "spans are held only until the computation ends";
  const v1::Tensor* got[] = {&reply.loss(), &reply.grad_logits(), &reply.grad_targets()};
  const v1::Tensor* want[] = {&bytes_reply.loss(), &bytes_reply.grad_logits(),
                              &bytes_reply.grad_targets()};
  for (int i = 0; i < 3; ++i) {
    SCOPED_TRACE(i);
    EXPECT_TRUE(got[i]->data().empty());
    EXPECT_EQ(got[i]->dtype(), want[i]->dtype());
    EXPECT_EQ(got[i]->shape_size(), 2);
    EXPECT_EQ(got[i]->ref().offset(), (2 + i) * kBytes);
    EXPECT_EQ(got[i]->ref().region(), "r");
    EXPECT_EQ(got[i]->ref().byte_size(), kBytes);
    ASSERT_EQ(want[i]->data().size(), kBytes);
    EXPECT_EQ(std::memcmp(regions_.at((2 + i) * kBytes), want[i]->data().data(), kBytes), 0);
  }
  // Only some outputs placed: the rest travel as bytes.
  req.mutable_outputs()->clear_loss();
  req.mutable_outputs()->clear_grad_targets();
  std::memset(regions_.at(3 * kBytes), 0, kBytes);
  ASSERT_TRUE(Run(req, &reply).ok());
  EXPECT_EQ(reply.loss().data(), bytes_reply.loss().data());
  EXPECT_EQ(reply.grad_targets().data(), bytes_reply.grad_targets().data());
  EXPECT_TRUE(reply.grad_logits().data().empty());
  EXPECT_EQ(std::memcmp(regions_.at(3 * kBytes), bytes_reply.grad_logits().data().data(), kBytes),
            0);
}

TEST_F(DataPathRegionsTest, ResolverErrorsComeBackWithTheirStatus) {
  v1::EvaluateRequest req = Request(true);
  *req.mutable_targets()->mutable_ref() = Ref(kBytes, kBytes, "gone");
  ExpectFailure(req, absl::StatusCode::kNotFound, {"targets.ref"});

  req = Request(true);
  req.mutable_logits()->mutable_ref()->set_byte_size(kBytes - 4);
  ExpectFailure(req, absl::StatusCode::kInvalidArgument, {"logits.ref"});

  req = Request(true);
  *req.mutable_outputs()->mutable_loss() = Ref(8 * kBytes - 8, kBytes);
  ExpectFailure(req, absl::StatusCode::kInvalidArgument, {"outputs.loss"});
}

TEST_F(DataPathRegionsTest, DataAndRefTogetherAreRefused) {
  v1::EvaluateRequest req = Request(true);
  req.mutable_logits()->set_data("xxxx");
  ExpectFailure(req, absl::StatusCode::kInvalidArgument, {"logits"});
}

TEST_F(DataPathRegionsTest, PlacingAnOutputThatIsNotProducedIsRefused) {
  v1::EvaluateRequest req = Request(true);
  req.mutable_gradients()->set_targets(false);
  *req.mutable_outputs()->mutable_grad_targets() = Ref(2 * kBytes, kBytes);
  ExpectFailure(req, absl::StatusCode::kInvalidArgument, {"outputs.grad_targets"});
}

TEST_F(DataPathRegionsTest, OverlapsAreRefusedNamingBothFields) {
  v1::EvaluateRequest req = Request(true);
  *req.mutable_outputs()->mutable_loss() = Ref(2 * kBytes, kBytes);
  *req.mutable_outputs()->mutable_grad_logits() = Ref(2 * kBytes + 4, kBytes);
  ExpectFailure(req, absl::StatusCode::kInvalidArgument, {"outputs.grad_logits", "outputs.loss"});

  req.mutable_outputs()->clear_loss();
  *req.mutable_outputs()->mutable_grad_logits() = Ref(kBytes / 2, kBytes);  // over the inputs
  ExpectFailure(req, absl::StatusCode::kInvalidArgument, {"outputs.grad_logits", "logits.ref"});
  EXPECT_EQ(regions_.live_spans(), 0);
}

TEST_F(DataPathRegionsTest, ARegionThatShrankFailsTheCall) {
  v1::EvaluateRequest req = Request(true);
  *req.mutable_outputs()->mutable_grad_logits() = Ref(2 * kBytes, kBytes);
  regions_.damaged() = true;
  ExpectFailure(req, absl::StatusCode::kFailedPrecondition, {"shrank during the request"});
  regions_.damaged() = false;
}

TEST_F(DataPathRegionsTest, WithoutAResolverReferencesNeedSharedMemory) {
  core_->planner().set_region_resolver(nullptr);
  ExpectFailure(Request(true), absl::StatusCode::kFailedPrecondition,
                {"shared memory is not enabled on this server (start lossd with "
                 "--shared_memory_prefix)"});
  v1::EvaluateRequest req = Request(false);
  *req.mutable_outputs()->mutable_loss() = Ref(0, kBytes);
  ExpectFailure(req, absl::StatusCode::kFailedPrecondition);
}

// Accumulate takes no output placement; over a real socket.
TEST(DataPathRegionsServerTest, AccumulateRefusesOutputPlacement) {
  auto server = testing::StartServer();
  auto stub = testing::Connect(server->port());
  grpc::ClientContext ctx;
  v1::AccumulateResponse resp;
  auto writer = stub->Accumulate(&ctx, &resp);
  v1::EvaluateRequest req = testing::RandomRequest<float>(4, 7, 1, v1::REDUCTION_SUM);
  *req.mutable_outputs()->mutable_loss() = Ref(0, 4);
  writer->Write(req);
  writer->WritesDone();
  const grpc::Status s = writer->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_NE(s.error_message().find("outputs"), std::string::npos) << s.error_message();
}

}  // namespace
}  // namespace lossd::server
