// lossd-bench's flag vocabulary against values written out by hand.
#include "client/bench/spec.h"

#include <gtest/gtest.h>

#include <vector>

namespace lossd::bench {
namespace {

TEST(SpecTest, CountsWithSuffixes) {
  EXPECT_EQ(*ParseCount("1000"), 1000);
  EXPECT_EQ(*ParseCount("1k"), 1000);
  EXPECT_EQ(*ParseCount("16M"), 16000000);
  EXPECT_EQ(*ParseCount("1Ki"), 1024);
  EXPECT_EQ(*ParseCount("4Mi"), 4 * 1048576);
  EXPECT_EQ(*ParseCount("0"), 0);
  for (const char* bad : {"", "k", "-1", "1.5", "1x", "abc", "1kk"}) {
    EXPECT_FALSE(ParseCount(bad).ok()) << bad;
  }
}

TEST(SpecTest, MultiplicativeRangesIncludeTheEndWhenReached) {
  EXPECT_EQ(*ParseRange("1:64:x2"), (std::vector<double>{1, 2, 4, 8, 16, 32, 64}));
  EXPECT_EQ(*ParseRange("1:100:x2"), (std::vector<double>{1, 2, 4, 8, 16, 32, 64}));
  EXPECT_EQ(*ParseRange("1:64"), (std::vector<double>{1, 2, 4, 8, 16, 32, 64}));
  EXPECT_EQ(*ParseRange("1k:9k:x3"), (std::vector<double>{1000, 3000, 9000}));
  EXPECT_EQ(*ParseRange("8:8:x2"), (std::vector<double>{8}));
}

TEST(SpecTest, AdditiveRangesListsAndSinglePoints) {
  EXPECT_EQ(*ParseRange("100:1000:+300"), (std::vector<double>{100, 400, 700, 1000}));
  EXPECT_EQ(*ParseRange("100:999:+300"), (std::vector<double>{100, 400, 700}));
  EXPECT_EQ(*ParseRange("0.1:0.3:+0.1"), (std::vector<double>{0.1, 0.2, 0.3}));
  EXPECT_EQ(*ParseRange("1,4,16"), (std::vector<double>{1, 4, 16}));
  EXPECT_EQ(*ParseRange("2k"), (std::vector<double>{2000}));
}

TEST(SpecTest, BadRangesAreRejected) {
  for (const char* bad : {"", "0", "1:0", "64:1:x2", "1:64:x1", "1:64:x0.5", "1:64:+0",
                          "1:64:-2", "1:2:3:4", "a:b", "1,,2", "1:1000000:+1"}) {
    EXPECT_FALSE(ParseRange(bad).ok()) << bad;
  }
}

TEST(SpecTest, MixEntriesWithWeightsAndVariants) {
  auto mix = ParseMix("0.9:1k,0.1:1M");
  ASSERT_TRUE(mix.ok());
  ASSERT_EQ(mix->size(), 2u);
  EXPECT_EQ((*mix)[0].weight, 0.9);
  EXPECT_EQ((*mix)[0].elements, 1000);
  EXPECT_EQ((*mix)[0].variant, "ok");
  EXPECT_EQ((*mix)[1].elements, 1000000);
  auto bad = ParseMix("3:1k, 1:64:badshape");
  ASSERT_TRUE(bad.ok());
  EXPECT_EQ((*bad)[1].variant, "badshape");
  EXPECT_EQ((*bad)[1].elements, 64);
  auto single = ParseMix("1Ki");
  ASSERT_TRUE(single.ok());
  EXPECT_EQ((*single)[0].elements, 1024);
  for (const char* wrong : {"", "0:1k", "-1:1k", "x:1k", "1:0", "1:1k:oops", "1:1:badshape",
                            "1:2:3:4", "1:1k,"}) {
    EXPECT_FALSE(ParseMix(wrong).ok()) << wrong;
  }
}

TEST(SpecTest, PickerFollowsTheCumulativeWeights) {
  MixPicker p({{1, 1, "ok"}, {3, 2, "ok"}, {0.0001, 3, "ok"}});
  // Shares: 1/4.0001, 3/4.0001, 0.0001/4.0001.
  EXPECT_EQ(p.Pick(0.0), 0);
  EXPECT_EQ(p.Pick(0.2499), 0);
  EXPECT_EQ(p.Pick(0.2501), 1);
  EXPECT_EQ(p.Pick(0.9999), 1);
  EXPECT_EQ(p.Pick(0.99999), 2);
  EXPECT_EQ(p.Pick(1.0), 2);
  // Counting over a fine grid of u gives each entry its share.
  std::vector<int> counts(3, 0);
  const int n = 400010;
  for (int i = 0; i < n; ++i) ++counts[p.Pick((i + 0.5) / n)];
  EXPECT_NEAR(counts[0], n * 1 / 4.0001, 2);
  EXPECT_NEAR(counts[2], n * 0.0001 / 4.0001, 2);
}

TEST(SpecTest, StopRules) {
  StopRule any_error;
  EXPECT_EQ(StopReason(any_error, 5000, 100, 0), "");
  EXPECT_NE(StopReason(any_error, 5000, 100, 1), "");
  StopRule tolerant{.max_p99_ns = 2000000, .max_error_fraction = 0.2};
  EXPECT_EQ(StopReason(tolerant, 2000000, 100, 20), "");
  EXPECT_NE(StopReason(tolerant, 2000000, 100, 21), "");
  EXPECT_NE(StopReason(tolerant, 2000001, 100, 0), "");
  EXPECT_EQ(StopReason(tolerant, 0, 0, 0), "");
}

}  // namespace
}  // namespace lossd::bench
