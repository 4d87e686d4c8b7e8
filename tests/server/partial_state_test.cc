// The partial state's wire encoding (lossd.proto, AccumulateResponse.partial_state) around the
// kernels' Accumulator: the header layout, byte-identical re-encoding after a decode, and the
// reply fields SetReducedLoss takes from the Accumulator.
#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "lossd/kernels/accumulator.h"
#include "server/service.h"

namespace lossd::server {
namespace {

uint64_t LittleEndian(const std::string& b, size_t at, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) {
    v |= static_cast<uint64_t>(static_cast<unsigned char>(b[at + i])) << (8 * i);
  }
  return v;
}
uint64_t U64At(const std::string& b, size_t at) { return LittleEndian(b, at, 8); }
uint32_t U32At(const std::string& b, size_t at) {
  return static_cast<uint32_t>(LittleEndian(b, at, 4));
}

TEST(PartialStateTest, HeaderLayoutAndReencoding) {
  kernels::ReductionRule rule;
  rule.reduction = kernels::Reduction::kSum;
  rule.normalize = true;
  rule.has_ignore_index = true;
  std::vector<double> v(5000);
  for (size_t i = 0; i < v.size(); ++i) v[i] = 0.25 * static_cast<double>(i % 17);
  PartialState state;
  state.fingerprint = 0x0123456789abcdefull;
  state.batches = 2;
  state.acc = kernels::Accumulator(rule, /*offset=*/100);
  state.acc.Add(v.data(), 3000, 2500);
  state.acc.Add(v.data() + 3000, 2000, 1999);
  const std::string bytes = EncodePartialState(state);
  ASSERT_GE(bytes.size(), kPartialStateHeaderBytes + kernels::BlockSum::kStateFixedBytes);
  EXPECT_EQ(bytes.substr(0, 4), "LDPS");
  EXPECT_EQ(U32At(bytes, 4), kPartialStateVersion);
  EXPECT_EQ(U32At(bytes, 8), static_cast<uint32_t>(v1::REDUCTION_SUM));
  EXPECT_EQ(U32At(bytes, 12), 3u);  // normalize | ignore_index
  EXPECT_EQ(U64At(bytes, 16), state.fingerprint);
  EXPECT_EQ(U64At(bytes, 24), 4499u);
  EXPECT_EQ(U64At(bytes, 32), 2u);
  std::string sum_bytes;
  state.acc.sum().Serialize(&sum_bytes);
  EXPECT_EQ(bytes.substr(kPartialStateHeaderBytes), sum_bytes);

  absl::StatusOr<PartialState> decoded = DecodePartialState(bytes);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(EncodePartialState(*decoded), bytes);

  v1::AccumulateResponse reply;
  SetReducedLoss(*decoded, &reply);
  EXPECT_EQ(reply.loss(), state.acc.Value());
  EXPECT_EQ(reply.num_elements(), 5000);
  EXPECT_EQ(reply.num_kept(), 4499);
  EXPECT_EQ(reply.num_batches(), 2);
  EXPECT_EQ(reply.reduction(), v1::REDUCTION_SUM);

  // Without ignore_index every element counts as kept, whatever the batch reported.
  rule.has_ignore_index = false;
  rule.reduction = kernels::Reduction::kMean;
  PartialState plain;
  plain.acc = kernels::Accumulator(rule);
  plain.acc.Add(v.data(), 10, 3);
  const std::string plain_bytes = EncodePartialState(plain);
  EXPECT_EQ(U32At(plain_bytes, 8), static_cast<uint32_t>(v1::REDUCTION_MEAN));
  EXPECT_EQ(U32At(plain_bytes, 12), 1u);
  EXPECT_EQ(U64At(plain_bytes, 24), 10u);
  SetReducedLoss(plain, &reply);
  EXPECT_EQ(reply.num_kept(), 10);
}

TEST(PartialStateTest, MergeSumsKeptCountsThroughTheAccumulator) {
  kernels::ReductionRule rule;
  rule.reduction = kernels::Reduction::kMean;
  rule.normalize = true;
  rule.has_ignore_index = true;
  std::vector<double> v(4100, 1.5);
  PartialState a, b;
  a.acc = kernels::Accumulator(rule, 0);
  b.acc = kernels::Accumulator(rule, 2500);
  a.acc.Add(v.data(), 2500, 2000);
  b.acc.Add(v.data(), 1600, 1000);
  a.batches = b.batches = 1;
  absl::StatusOr<PartialState> merged = MergePartialStates({b, a});  // any order
  ASSERT_TRUE(merged.ok()) << merged.status();
  EXPECT_EQ(merged->acc.kept(), 3000);
  EXPECT_EQ(merged->acc.num_elements(), 4100);
  EXPECT_EQ(merged->batches, 2);
  EXPECT_EQ(merged->acc.Value(), 1.5 * 4100 / 3000 / 4100);
}

}  // namespace
}  // namespace lossd::server
