// Accumulate over slices of a dataset (accumulate_slice) and MergePartials over a real socket:
// the merge of the slices' partial states equals one Accumulate over all of them, bit for bit,
// and malformed or mismatched states are INVALID_ARGUMENT naming partial_states[i].
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "server/service.h"
#include "tests/server/test_server_util.h"

namespace lossd::server {
namespace {

using namespace testing;  // the helpers of tests/server/test_server_util.h

uint64_t Bits(double v) {
  uint64_t b;
  std::memcpy(&b, &v, sizeof(b));
  return b;
}

constexpr int64_t kNoSlice = std::numeric_limits<int64_t>::min();

// One Accumulate call over rows [r0, r1) of `full`, cut into batches of `batch` rows; unless
// `offset` is kNoSlice the first batch sets accumulate_slice.element_offset = offset.
v1::AccumulateResponse AccumulateRows(v1::LossService::Stub* stub, const v1::EvaluateRequest& full,
                                      int64_t r0, int64_t r1, int64_t batch, int64_t offset,
                                      grpc::Status* status = nullptr) {
  grpc::ClientContext ctx;
  v1::AccumulateResponse acc;
  auto writer = stub->Accumulate(&ctx, &acc);
  bool first = true;
  for (int64_t r = r0; r < r1 || first; r += batch) {
    v1::EvaluateRequest part = SliceRows(full, r, std::min(r1, r + batch));
    if (offset != kNoSlice && first) part.mutable_accumulate_slice()->set_element_offset(offset);
    first = false;
    if (!writer->Write(part)) break;
  }
  writer->WritesDone();
  grpc::Status s = writer->Finish();
  if (status != nullptr) {
    *status = s;
  } else {
    EXPECT_TRUE(s.ok()) << s.error_message();
  }
  return acc;
}

grpc::Status Merge(v1::LossService::Stub* stub, const std::vector<std::string>& states,
                   v1::AccumulateResponse* out) {
  grpc::ClientContext ctx;
  v1::MergePartialsRequest req;
  for (const std::string& s : states) req.add_partial_states(s);
  return stub->MergePartials(&ctx, req, out);
}

void CheckMergedSlices(v1::Reduction reduction, int specials) {
  auto server = StartServer();
  auto stub = Connect(server->port());
  const int64_t rows = 1733, cols = 13;  // 22529 elements: several reduction blocks
  v1::EvaluateRequest full = RandomRequest<float>(rows, cols, 17, reduction);
  const float inf = std::numeric_limits<float>::infinity(), zero = 0.0f;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  if (specials >= 1) {
    // An infinite logit with target 0 gives an infinite loss element.
    std::memcpy(full.mutable_logits()->mutable_data()->data() + 4 * 5000, &inf, 4);
    std::memcpy(full.mutable_targets()->mutable_data()->data() + 4 * 5000, &zero, 4);
  }
  if (specials >= 2) {
    std::memcpy(full.mutable_logits()->mutable_data()->data() + 4 * 12000, &nan, 4);
  }
  const v1::AccumulateResponse one = AccumulateRows(stub.get(), full, 0, rows, 97, kNoSlice);
  EXPECT_TRUE(one.partial_state().empty());  // only slices carry the state
  std::mt19937 rng(3);
  for (int trial = 0; trial < 6; ++trial) {
    std::vector<int64_t> cuts = {0, rows};
    for (int k = 0; k < trial; ++k) cuts.push_back(static_cast<int64_t>(rng() % rows));
    std::sort(cuts.begin(), cuts.end());
    std::vector<std::string> states;
    int64_t batches = 0;
    for (size_t k = 0; k + 1 < cuts.size(); ++k) {
      const v1::AccumulateResponse part = AccumulateRows(
          stub.get(), full, cuts[k], cuts[k + 1], 1 + static_cast<int64_t>(rng() % 300),
          cuts[k] * cols);
      ASSERT_FALSE(part.partial_state().empty());
      states.push_back(part.partial_state());
      batches += part.num_batches();
    }
    std::shuffle(states.begin(), states.end(), rng);  // any order
    v1::AccumulateResponse merged;
    grpc::Status s = Merge(stub.get(), states, &merged);
    ASSERT_TRUE(s.ok()) << s.error_message();
    EXPECT_EQ(Bits(merged.loss()), Bits(one.loss())) << merged.loss() << " vs " << one.loss();
    EXPECT_EQ(merged.num_elements(), rows * cols);
    EXPECT_EQ(merged.num_kept(), rows * cols);
    EXPECT_EQ(merged.num_batches(), batches);
    EXPECT_EQ(merged.reduction(), reduction);
    // The merged state merges again (a merge of one state is that state's result).
    v1::AccumulateResponse again;
    ASSERT_TRUE(Merge(stub.get(), {merged.partial_state()}, &again).ok());
    EXPECT_EQ(Bits(again.loss()), Bits(one.loss()));
  }
  if (specials == 1) EXPECT_TRUE(std::isinf(one.loss()));
  if (specials == 2) EXPECT_TRUE(std::isnan(one.loss()));
}

TEST(AccumulatePartialTest, MergedSlicesEqualOneAccumulateSum) {
  CheckMergedSlices(v1::REDUCTION_SUM, 0);
}
TEST(AccumulatePartialTest, MergedSlicesEqualOneAccumulateMean) {
  CheckMergedSlices(v1::REDUCTION_MEAN, 0);
}
TEST(AccumulatePartialTest, MergedSlicesEqualOneAccumulateWithInfinity) {
  CheckMergedSlices(v1::REDUCTION_SUM, 1);
}
TEST(AccumulatePartialTest, MergedSlicesEqualOneAccumulateWithNaN) {
  CheckMergedSlices(v1::REDUCTION_MEAN, 2);
}

TEST(AccumulatePartialTest, NormalizeWithIgnoreIndexMergesKeptCounts) {
  auto server = StartServer();
  auto stub = Connect(server->port());
  const int64_t rows = 500, cols = 9;
  v1::EvaluateRequest full = RandomRequest<float>(rows, cols, 5, v1::REDUCTION_MEAN);
  full.mutable_bce_with_logits()->set_ignore_index(0);  // targets that are exactly 0
  full.mutable_bce_with_logits()->set_normalize(true);
  const v1::AccumulateResponse one = AccumulateRows(stub.get(), full, 0, rows, 50, kNoSlice);
  ASSERT_LT(one.num_kept(), rows * cols);
  const v1::AccumulateResponse a = AccumulateRows(stub.get(), full, 0, 211, 40, 0);
  const v1::AccumulateResponse b = AccumulateRows(stub.get(), full, 211, rows, 33, 211 * cols);
  v1::AccumulateResponse merged;
  ASSERT_TRUE(Merge(stub.get(), {b.partial_state(), a.partial_state()}, &merged).ok());
  EXPECT_EQ(Bits(merged.loss()), Bits(one.loss()));
  EXPECT_EQ(merged.num_kept(), one.num_kept());
}

TEST(AccumulatePartialTest, RejectsMalformedAndMismatchedStates) {
  auto server = StartServer();
  auto stub = Connect(server->port());
  const int64_t rows = 300, cols = 11;
  const v1::EvaluateRequest full = RandomRequest<float>(rows, cols, 8, v1::REDUCTION_SUM);
  const std::string a = AccumulateRows(stub.get(), full, 0, 100, 30, 0).partial_state();
  const std::string b = AccumulateRows(stub.get(), full, 100, 200, 30, 100 * cols).partial_state();
  const std::string c = AccumulateRows(stub.get(), full, 200, rows, 30, 200 * cols).partial_state();
  v1::EvaluateRequest mean = full;
  mean.set_reduction(v1::REDUCTION_MEAN);
  const std::string c_mean = AccumulateRows(stub.get(), mean, 200, rows, 30, 200 * cols).partial_state();
  v1::EvaluateRequest smooth = full;
  smooth.mutable_bce_with_logits()->set_label_smoothing(0.1);
  const std::string c_smooth =
      AccumulateRows(stub.get(), smooth, 200, rows, 30, 200 * cols).partial_state();
  auto expect_bad = [&](const std::vector<std::string>& states, const std::string& what) {
    v1::AccumulateResponse out;
    grpc::Status s = Merge(stub.get(), states, &out);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << what;
    EXPECT_NE(s.error_message().find(what), std::string::npos) << s.error_message();
  };
  v1::AccumulateResponse ok;
  ASSERT_TRUE(Merge(stub.get(), {c, a, b}, &ok).ok());
  expect_bad({}, "partial_states is empty");
  expect_bad({a, c}, "partial_states[1] covers elements [2200, 3300), but the states before it "
                     "end at 1100 (a gap)");
  expect_bad({a, b, b, c}, "(an overlap)");
  expect_bad({a, b, c_mean}, "partial_states[2] has reduction REDUCTION_MEAN");
  expect_bad({a, b, c_smooth}, "partial_states[2] has loss options");
  std::string v2 = b;
  v2[4] = 2;
  expect_bad({a, v2, c}, "partial_states[1] has format version 2; this server reads version 1");
  expect_bad({a, b.substr(0, b.size() - 8), c}, "partial_states[1] exact sum state has");
  expect_bad({a, b, "hello"}, "partial_states[2] has 5 bytes");
  std::string magic = b;
  magic[0] = 'X';
  expect_bad({a, magic, c}, "partial_states[1] is not a partial state");
  std::string kept = b;  // kept > elements
  kept[24 + 7] = 0x10;
  expect_bad({a, kept, c}, "partial_states[1] has");
  std::string block = b;
  block[kPartialStateHeaderBytes + 1] = 0x04;  // 1024
  expect_bad({a, block, c}, "partial_states[1] reduction block is 1024");
}

TEST(AccumulatePartialTest, SliceOffsetIsValidated) {
  auto server = StartServer();
  auto stub = Connect(server->port());
  const v1::EvaluateRequest full = RandomRequest<float>(100, 5, 8, v1::REDUCTION_SUM);
  grpc::Status s;
  AccumulateRows(stub.get(), full, 0, 100, 30, -5, &s);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("batch 0: accumulate_slice.element_offset must be in"),
            std::string::npos)
      << s.error_message();
  {
    v1::EvaluateRequest p0 = SliceRows(full, 0, 50), p1 = SliceRows(full, 50, 100);
    p0.mutable_accumulate_slice()->set_element_offset(10);
    p1.mutable_accumulate_slice()->set_element_offset(11);
    s = Accumulate(stub.get(), {p0, p1});
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(s.error_message().find("batch 1: accumulate_slice.element_offset 11 differs"),
              std::string::npos)
        << s.error_message();
  }
  // Capabilities announce the format.
  grpc::ClientContext cctx;
  v1::Capabilities caps;
  ASSERT_TRUE(stub->GetCapabilities(&cctx, v1::GetCapabilitiesRequest(), &caps).ok());
  ASSERT_EQ(caps.partial_state_versions_size(), 1);
  EXPECT_EQ(caps.partial_state_versions(0), kPartialStateVersion);
}

}  // namespace
}  // namespace lossd::server
