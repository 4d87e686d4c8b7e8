// The mergeable state of BlockSum (slices with an element offset, Append, Serialize and
// Deserialize): joining the slices of any cut of a stream gives the bits, and the very state,
// of one BlockSum over the whole stream.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "lossd/kernels/exact_sum.h"
#include "tests/kernels/test_util.h"

namespace lossd::kernels {
namespace {

using lossd::testing::Bits;

// Values of very different magnitudes and signs, so that the block tree's rounding matters.
std::vector<double> Values(int64_t n, uint32_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  std::uniform_int_distribution<int> e(-60, 60);
  std::vector<double> v(static_cast<size_t>(n));
  for (double& x : v) x = std::ldexp(u(rng), e(rng));
  return v;
}

std::string StateOf(const BlockSum& s) {
  std::string out;
  s.Serialize(&out);
  return out;
}

// One BlockSum over [0, n), fed in pieces of random size.
BlockSum Whole(const std::vector<double>& v, std::mt19937* rng) {
  BlockSum s;
  size_t i = 0;
  std::uniform_int_distribution<int64_t> piece(0, 3000);
  while (i < v.size()) {
    const size_t take = std::min<size_t>(v.size() - i, static_cast<size_t>(piece(*rng)));
    s.Add(v.data() + i, static_cast<int64_t>(take));
    i += take;
  }
  return s;
}

// The slices of `v` cut at `cuts` (sorted, within [0, n]), each computed on its own (fed in
// random pieces), serialized and read back, then joined in order.
BlockSum Joined(const std::vector<double>& v, std::vector<int64_t> cuts, std::mt19937* rng) {
  cuts.insert(cuts.begin(), 0);
  cuts.push_back(static_cast<int64_t>(v.size()));
  std::vector<BlockSum> slices;
  std::uniform_int_distribution<int64_t> piece(0, 700);
  for (size_t k = 0; k + 1 < cuts.size(); ++k) {
    BlockSum s(cuts[k]);
    int64_t i = cuts[k];
    while (i < cuts[k + 1]) {
      const int64_t take = std::min(cuts[k + 1] - i, piece(*rng));
      s.Add(v.data() + i, take);
      i += take;
    }
    absl::StatusOr<BlockSum> back = BlockSum::Deserialize(StateOf(s));
    EXPECT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(StateOf(*back), StateOf(s));
    slices.push_back(*std::move(back));
  }
  BlockSum joined = slices[0];
  for (size_t k = 1; k < slices.size(); ++k) {
    const absl::Status st = joined.Append(slices[k]);
    EXPECT_TRUE(st.ok()) << st;
  }
  return joined;
}

TEST(ExactSumStateTest, JoinedSlicesOfAnyCutEqualOneSumBitForBit) {
  std::mt19937 rng(7);
  for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{2047}, int64_t{2048}, int64_t{2049},
                    int64_t{5000}, int64_t{20000}}) {
    const std::vector<double> v = Values(n, static_cast<uint32_t>(n + 1));
    const BlockSum whole = Whole(v, &rng);
    for (int trial = 0; trial < 25; ++trial) {
      std::uniform_int_distribution<int64_t> at(0, n);
      std::vector<int64_t> cuts(static_cast<size_t>(trial % 9));
      for (int64_t& c : cuts) c = at(rng);
      if (trial == 3) cuts = {std::min<int64_t>(n, 2048)};       // on a block boundary
      if (trial == 4) for (int64_t c = 1; c < std::min<int64_t>(n, 40); ++c) cuts.push_back(c);
      std::sort(cuts.begin(), cuts.end());
      const BlockSum joined = Joined(v, cuts, &rng);
      ASSERT_EQ(joined.count(), n);
      EXPECT_EQ(Bits(joined.Value()), Bits(whole.Value())) << "n=" << n << " trial " << trial;
      EXPECT_EQ(StateOf(joined), StateOf(whole)) << "n=" << n << " trial " << trial;
    }
  }
}

TEST(ExactSumStateTest, InfinitiesAndNaNAsInOneSum) {
  std::mt19937 rng(11);
  const double inf = std::numeric_limits<double>::infinity();
  // A NaN with a payload and its sign set, unlike the canonical quiet NaN.
  double odd_nan;
  const uint64_t odd_bits = 0xfff8000000000123ull;
  std::memcpy(&odd_nan, &odd_bits, sizeof(odd_nan));
  struct Case {
    std::vector<std::pair<int64_t, double>> specials;
  };
  const std::vector<Case> cases = {
      {{{100, inf}}},
      {{{100, -inf}, {9000, -inf}}},
      {{{100, inf}, {9000, -inf}}},         // +inf and -inf: NaN
      {{{5, std::nan("")}}},
      {{{5, inf}, {4000, -inf}, {8191, odd_nan}}},
      {{{4000, odd_nan}, {8000, std::nan("")}}},
  };
  for (size_t c = 0; c < cases.size(); ++c) {
    std::vector<double> v = Values(10000, static_cast<uint32_t>(c));
    for (auto [i, x] : cases[c].specials) v[static_cast<size_t>(i)] = x;
    const BlockSum whole = Whole(v, &rng);
    const double expected = whole.Value();
    if (std::isnan(expected)) {
      EXPECT_EQ(Bits(expected), Bits(std::numeric_limits<double>::quiet_NaN()));
    }
    for (int trial = 0; trial < 10; ++trial) {
      std::uniform_int_distribution<int64_t> at(0, 10000);
      std::vector<int64_t> cuts(static_cast<size_t>(1 + trial % 5));
      for (int64_t& k : cuts) k = at(rng);
      std::sort(cuts.begin(), cuts.end());
      EXPECT_EQ(Bits(Joined(v, cuts, &rng).Value()), Bits(expected)) << "case " << c;
    }
  }
}

TEST(ExactSumStateTest, EncodingIsLittleEndianWithTheDocumentedLayout) {
  BlockSum s(2045);  // head of 3 values, then one tail value
  const double v[4] = {1.0, 2.0, 0.5, -4.0};
  s.Add(v, 4);
  const std::string b = StateOf(s);
  ASSERT_EQ(b.size(), BlockSum::kStateFixedBytes + 8 * 4);
  auto u32 = [&](size_t at) {
    uint32_t x = 0;
    for (int i = 0; i < 4; ++i) x |= uint32_t{static_cast<unsigned char>(b[at + i])} << (8 * i);
    return x;
  };
  auto u64 = [&](size_t at) {
    uint64_t x = 0;
    for (int i = 0; i < 8; ++i) x |= uint64_t{static_cast<unsigned char>(b[at + i])} << (8 * i);
    return x;
  };
  EXPECT_EQ(u32(0), 2048u);
  EXPECT_EQ(u32(4), static_cast<uint32_t>(ExactSum::kWords));
  EXPECT_EQ(u32(8), 3u);   // head
  EXPECT_EQ(u32(12), 1u);  // tail
  EXPECT_EQ(u64(16), 2045u);
  EXPECT_EQ(u64(24), 4u);
  EXPECT_EQ(u64(32), 0u);  // no infinity or NaN
  for (int k = 0; k < ExactSum::kWords; ++k) EXPECT_EQ(u64(40 + 8 * k), 0u) << k;
  EXPECT_EQ(u64(BlockSum::kStateFixedBytes), Bits(1.0));
  EXPECT_EQ(u64(BlockSum::kStateFixedBytes + 24), Bits(-4.0));
  // One complete block of ones: 2048 = 2^11 is word 2 + (11 + 1126) / 32 = 37, bit 17.
  BlockSum ones;
  const std::vector<double> one(2048, 1.0);
  ones.Add(one.data(), 2048);
  const std::string o = StateOf(ones);
  ASSERT_EQ(o.size(), BlockSum::kStateFixedBytes);
  for (int k = 0; k < ExactSum::kWords; ++k) {
    uint64_t w = 0;
    for (int i = 0; i < 8; ++i) {
      w |= uint64_t{static_cast<unsigned char>(o[40 + 8 * k + i])} << (8 * i);
    }
    EXPECT_EQ(w, k == 37 ? (uint64_t{1} << 17) : 0u) << "word " << k;
  }
  // A negative sum: the top word holds the sign.
  BlockSum neg;
  const double m = -1.0;
  neg.Add(&m, 1);
  neg.Add(one.data(), 2047);  // completes a block: -1 + 2047
  EXPECT_EQ(neg.Value(), 2046.0);
  BlockSum minus;
  const std::vector<double> mones(2048, -1.0);
  minus.Add(mones.data(), 2048);
  const std::string mo = StateOf(minus);
  uint64_t top = 0;
  for (int i = 0; i < 8; ++i) {
    top |= uint64_t{static_cast<unsigned char>(mo[40 + 8 * (ExactSum::kWords - 1) + i])}
           << (8 * i);
  }
  EXPECT_EQ(static_cast<int64_t>(top), -1);
  EXPECT_EQ(BlockSum::Deserialize(mo)->Value(), -2048.0);
}

TEST(ExactSumStateTest, DeserializeRejectsMalformedStates) {
  BlockSum s(10);
  const std::vector<double> v = Values(5000, 3);
  s.Add(v.data(), 5000);
  const std::string good = StateOf(s);
  ASSERT_TRUE(BlockSum::Deserialize(good).ok());
  auto expect_bad = [](std::string bytes, const char* what) {
    absl::StatusOr<BlockSum> r = BlockSum::Deserialize(bytes);
    ASSERT_FALSE(r.ok()) << what;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << what;
    EXPECT_NE(r.status().message().find(what), std::string::npos) << r.status();
  };
  auto put = [](std::string b, size_t at, uint64_t x, int n) {
    for (int i = 0; i < n; ++i) b[at + i] = static_cast<char>((x >> (8 * i)) & 0xff);
    return b;
  };
  expect_bad(good.substr(0, 100), "fewer than");
  expect_bad(good.substr(0, good.size() - 8), "expected");
  expect_bad(good + "x", "expected");
  expect_bad(put(good, 0, 1024, 4), "reduction block is 1024");
  expect_bad(put(good, 4, 73, 4), "73 words");
  expect_bad(put(good, 8, 5000, 4), "below 2048");
  expect_bad(put(good, 16, 11, 8), "do not match");    // offset changes the head size
  expect_bad(put(good, 24, 5001, 8), "do not match");  // count changes the tail size
  expect_bad(put(good, 16, uint64_t{1} << 63, 8), "out of range");
  expect_bad(put(good, 32, Bits(1.5), 8), "non-finite sum");
  expect_bad(put(good, 40, 1, 8), "word 0");
  expect_bad(put(good, 40 + 8 * 40, uint64_t{1} << 32, 8), "word 40");
  expect_bad(put(good, 40 + 8 * (ExactSum::kWords - 1), uint64_t{1} << 40, 8), "word 73");
}

TEST(ExactSumStateTest, AppendRejectsSlicesThatDoNotFollow) {
  const std::vector<double> v = Values(100, 5);
  BlockSum a(0), b(60), c(50);
  a.Add(v.data(), 50);
  b.Add(v.data() + 60, 40);
  c.Add(v.data() + 50, 50);
  const std::string before = StateOf(a);
  absl::Status gap = a.Append(b);
  EXPECT_EQ(gap.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(gap.message().find("slice at element 60 does not follow the slice [0, 50)"),
            std::string::npos)
      << gap;
  EXPECT_EQ(StateOf(a), before);  // unchanged
  ASSERT_TRUE(a.Append(c).ok());
  EXPECT_EQ(a.count(), 100);
  EXPECT_FALSE(a.Append(c).ok());  // overlap
}

TEST(ExactSumStateTest, SliceValueReducesHeadAndTailAsBlocks) {
  // A slice on its own: head and tail are each one tree-summed block.
  const std::vector<double> v = Values(6000, 9);
  BlockSum s(1000);
  s.Add(v.data(), 6000);
  std::vector<double> head(v.begin(), v.begin() + 1048), mid(v.begin() + 1048, v.begin() + 3096),
      mid2(v.begin() + 3096, v.begin() + 5144), tail(v.begin() + 5144, v.end());
  ExactSum e;
  for (auto* part : {&head, &mid, &mid2, &tail}) {
    std::vector<double> scratch(kReduceBlock);
    std::copy(part->begin(), part->end(), scratch.begin());
    e.Add(TreeSumBlock(scratch.data(), static_cast<int64_t>(part->size())));
  }
  EXPECT_EQ(Bits(s.Value()), Bits(e.Value()));
}

}  // namespace
}  // namespace lossd::kernels
