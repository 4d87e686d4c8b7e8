// The Accumulator (accumulator.h): reduction rules across calls, against a long double
// reference and exact integer cases; and the backends' part of them: BceOutputs::kept and the
// per-sample means of empty rows (docs/design.md section 3, "Reductions").
#include "lossd/kernels/accumulator.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "lossd/kernels/backend.h"
#include "lossd/kernels/bce.h"
#include "lossd/kernels/dtype.h"
#include "absl/strings/str_cat.h"
#include "lossd/kernels/exact_sum.h"
#include "tests/kernels/test_util.h"

namespace lossd::kernels {
namespace {

using lossd::testing::Bits;

ReductionRule Rule(Reduction r, bool normalize, bool ignore) {
  ReductionRule rule;
  rule.reduction = r;
  rule.normalize = normalize;
  rule.has_ignore_index = ignore;
  return rule;
}

TEST(AccumulatorTest, ExactIntegerCases) {
  // 1 + 2 + ... + 10 = 55, every division exact or rounded once.
  std::vector<double> v(10);
  for (int i = 0; i < 10; ++i) v[i] = i + 1;
  {
    Accumulator a(Rule(Reduction::kSum, false, false));
    a.Add(v.data(), 4, /*kept=*/0);  // kept is not read: every element counts
    a.Add(v.data() + 4, 6, 0);
    EXPECT_EQ(a.Value(), 55.0);
    EXPECT_EQ(a.num_elements(), 10);
    EXPECT_EQ(a.kept(), 10);
    EXPECT_EQ(a.num_kept(), 10);
  }
  {
    Accumulator a(Rule(Reduction::kMean, false, false));
    a.Add(v.data(), 10, 0);
    EXPECT_EQ(a.Value(), 5.5);
  }
  {
    // normalize with ignore_index: 5 of 10 kept; SUM divides by 5, MEAN then by 10.
    Accumulator s(Rule(Reduction::kSum, true, true));
    Accumulator m(Rule(Reduction::kMean, true, true));
    s.Add(v.data(), 6, 3);
    s.Add(v.data() + 6, 4, 2);
    m.Add(v.data(), 10, 5);
    EXPECT_EQ(s.Value(), 11.0);
    EXPECT_EQ(m.Value(), 1.1);  // 55 / 5 = 11, rounded once more by / 10
    EXPECT_EQ(s.num_kept(), 5);
    EXPECT_EQ(s.kept(), 5);
  }
  {
    // Nothing kept: the divisor is 1 (as every backend's).
    Accumulator a(Rule(Reduction::kSum, true, true));
    a.Add(v.data(), 10, 0);
    EXPECT_EQ(a.Value(), 55.0);
    EXPECT_EQ(a.num_kept(), 0);
  }
  {
    // normalize without ignore_index divides by the element count.
    Accumulator a(Rule(Reduction::kSum, true, false));
    a.Add(v.data(), 10, 3);
    EXPECT_EQ(a.Value(), 5.5);
    EXPECT_EQ(a.num_kept(), 10);
  }
  {
    // A mean of no elements is NaN; a sum of none 0.
    Accumulator m(Rule(Reduction::kMean, false, false));
    Accumulator s(Rule(Reduction::kSum, false, false));
    EXPECT_TRUE(std::isnan(m.Value()));
    EXPECT_EQ(s.Value(), 0.0);
  }
}

TEST(AccumulatorTest, MatchesLongDoubleReferenceAndOneBlockSum) {
  std::mt19937_64 rng(14);
  std::uniform_real_distribution<double> value(0.0, 30.0);
  for (int trial = 0; trial < 20; ++trial) {
    const int64_t n = 1 + static_cast<int64_t>(rng() % 20000);
    std::vector<double> v(n);
    long double ref = 0.0L;
    for (double& x : v) {
      x = value(rng);
      ref += x;
    }
    // Random batches, each with a random kept count; some trials keep nothing.
    std::vector<int64_t> cuts, kepts;
    int64_t kept = 0;
    for (int64_t at = 0; at < n;) {
      const int64_t m = std::min<int64_t>(n - at, 1 + rng() % 5000);
      const int64_t k = trial % 5 == 0 ? 0 : static_cast<int64_t>(rng() % (m + 1));
      cuts.push_back(m);
      kepts.push_back(k);
      kept += k;
      at += m;
    }
    for (Reduction r : {Reduction::kSum, Reduction::kMean}) {
      for (bool normalize : {false, true}) {
        const ReductionRule rule = Rule(r, normalize, true);
        Accumulator a(rule);
        int64_t at = 0;
        for (size_t b = 0; b < cuts.size(); ++b) {
          a.Add(v.data() + at, cuts[b], kepts[b]);
          at += cuts[b];
        }
        long double want = ref;
        if (normalize) want /= kept > 0 ? kept : 1;
        if (r == Reduction::kMean) want /= n;
        const double got = a.Value();
        EXPECT_NEAR(got, static_cast<double>(want), 1e-13 * std::fabs(static_cast<double>(want)))
            << "n=" << n << " kept=" << kept;
        // Bitwise: the exact sum of one BlockSum, then the same divisions.
        BlockSum one;
        one.Add(v.data(), n);
        double expect = one.Value();
        if (normalize) expect /= kept > 0 ? static_cast<double>(kept) : 1.0;
        if (r == Reduction::kMean) expect /= static_cast<double>(n);
        EXPECT_EQ(Bits(got), Bits(expect));
        EXPECT_EQ(a.num_kept(), normalize ? kept : n);
      }
    }
  }
}

TEST(AccumulatorTest, AppendedSlicesEqualOneAccumulator) {
  std::mt19937_64 rng(3);
  std::uniform_real_distribution<double> value(-5.0, 5.0);
  const int64_t n = 3 * kReduceBlock + 777;
  std::vector<double> v(n);
  for (double& x : v) x = value(rng);
  const ReductionRule rule = Rule(Reduction::kMean, true, true);
  Accumulator whole(rule);
  whole.Add(v.data(), n, n - 100);
  const int64_t cut = kReduceBlock + 123;
  Accumulator left(rule, 0), right(rule, cut);
  left.Add(v.data(), cut, cut - 40);
  right.Add(v.data() + cut, n - cut, n - cut - 60);
  ASSERT_TRUE(left.Append(right).ok());
  EXPECT_EQ(Bits(left.Value()), Bits(whole.Value()));
  EXPECT_EQ(left.kept(), whole.kept());
  EXPECT_EQ(left.num_elements(), n);

  // Not adjacent, or another rule: InvalidArgument, nothing changed.
  Accumulator gap(rule, n + 5);
  EXPECT_EQ(whole.Append(gap).code(), absl::StatusCode::kInvalidArgument);
  Accumulator other(Rule(Reduction::kSum, true, true), n);
  const absl::Status s = whole.Append(other);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("reduction rules"), std::string::npos) << s;
  EXPECT_EQ(whole.num_elements(), n);
}

TEST(AccumulatorTest, FromStateValidates) {
  BlockSum sum;
  const double v[3] = {1, 2, 3};
  sum.Add(v, 3);
  const ReductionRule rule = Rule(Reduction::kSum, true, true);
  absl::StatusOr<Accumulator> a = Accumulator::FromState(rule, sum, 2);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->Value(), 3.0);
  for (int64_t kept : {int64_t{-1}, int64_t{4}}) {
    absl::StatusOr<Accumulator> bad = Accumulator::FromState(rule, sum, kept);
    ASSERT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(bad.status().message().find(absl::StrCat("kept ", kept)), std::string::npos)
        << bad.status();
  }
  absl::StatusOr<Accumulator> none =
      Accumulator::FromState(Rule(Reduction::kNone, false, false), sum, 3);
  EXPECT_EQ(none.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(none.status().message().find("SUM or MEAN"), std::string::npos) << none.status();
}

// ---- The backend's part: BceOutputs::kept and empty rows ----------------------------------

struct KeptCase {
  Reduction reduction;
  bool normalize;
  int64_t whole_kept;
  Precision precision;
};

TEST(BackendKeptTest, CpuReportsKeptCountOfItsOwnTargets) {
  auto backend = MakeCpuBackend({2});
  const int64_t n = 3 * kChunkElements + 1001;
  std::mt19937_64 rng(7);
  std::vector<float> x(n), y(n);
  std::vector<double> y64(n);
  int64_t expect = 0;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = static_cast<float>(static_cast<int>(rng() % 200) - 100) / 10.0f;
    const bool ignored = rng() % 5 == 0;
    y[i] = ignored ? -100.0f : static_cast<float>(rng() % 2);
    y64[i] = y[i];
    expect += !ignored;
  }
  const KeptCase cases[] = {
      {Reduction::kNone, false, -1, Precision::kDefault},
      {Reduction::kSum, true, -1, Precision::kDefault},
      {Reduction::kMean, true, 5, Precision::kDefault},  // whole_kept does not change `kept`
      {Reduction::kPerSampleMean, false, -1, Precision::kDefault},
      {Reduction::kMean, false, -1, Precision::kCorrectlyRounded},
  };
  for (const KeptCase& c : cases) {
    for (DType tdt : {DType::kFloat32, DType::kFloat64}) {
      BceArgs a;
      a.numel = n;
      a.logits = x.data();
      a.targets_dtype = tdt;
      a.targets = tdt == DType::kFloat32 ? static_cast<const void*>(y.data()) : y64.data();
      a.reduction = c.reduction;
      a.last_dim = c.reduction == Reduction::kPerSampleMean ? n : 1;
      a.has_ignore_index = true;
      a.normalize = c.normalize;
      if (c.whole_kept >= 0) {
        a.whole_numel = n;
        a.whole_kept = c.whole_kept;
      }
      a.precision = c.precision;
      std::vector<float> loss(LossCount(a));
      int64_t kept = -7;
      BceOutputs out;
      out.loss = loss.data();
      out.kept = &kept;
      const absl::Status s = backend->Bce(a, out);
      if (s.code() == absl::StatusCode::kUnimplemented) continue;  // no correctly rounded mode
      ASSERT_TRUE(s.ok()) << s;
      EXPECT_EQ(kept, expect) << "reduction " << static_cast<int>(c.reduction);
      // Without ignore_index every element is kept.
      a.has_ignore_index = false;
      a.normalize = false;
      a.whole_numel = 0;
      a.whole_kept = -1;
      ASSERT_TRUE(backend->Bce(a, out).ok());
      EXPECT_EQ(kept, n);
    }
  }
  // Only the count requested.
  BceArgs a;
  a.numel = n;
  a.logits = x.data();
  a.targets = y.data();
  a.has_ignore_index = true;
  int64_t kept = -1;
  BceOutputs out;
  out.kept = &kept;
  ASSERT_TRUE(backend->Bce(a, out).ok());
  EXPECT_EQ(kept, expect);
  // An ignore_index that float cannot hold matches no float target (compared in double).
  a.ignore_index = -100.1;
  ASSERT_TRUE(backend->Bce(a, out).ok());
  EXPECT_EQ(kept, n);
}

TEST(BackendKeptTest, CpuEmptyRowsAreNaNInChunks) {
  auto backend = MakeCpuBackend({2});
  BceArgs a;
  a.numel = 0;
  a.reduction = Reduction::kPerSampleMean;
  a.last_dim = 0;
  a.empty_rows = 2 * kChunkElements + 5;
  a.has_ignore_index = true;
  a.normalize = true;
  ASSERT_EQ(LossCount(a), a.empty_rows);
  for (Precision p : {Precision::kDefault, Precision::kCorrectlyRounded}) {
    a.precision = p;
    std::vector<float> loss(a.empty_rows, 1.0f);
    std::atomic<int64_t> chunks{0};
    a.chunks_done = &chunks;
    int64_t kept = -1;
    BceOutputs out;
    out.loss = loss.data();
    out.kept = &kept;
    ASSERT_TRUE(backend->Bce(a, out).ok());
    for (float v : loss) ASSERT_TRUE(std::isnan(v));
    EXPECT_EQ(chunks.load(), 3);
    EXPECT_EQ(kept, 0);
  }
  // Stopped before the second chunk: CANCELLED, one chunk counted.
  a.precision = Precision::kDefault;
  std::vector<float> loss(a.empty_rows);
  std::atomic<int64_t> chunks{0};
  int polls = 0;
  a.chunks_done = &chunks;
  a.should_stop = [&polls] { return ++polls > 1; };
  BceOutputs out;
  out.loss = loss.data();
  EXPECT_EQ(backend->Bce(a, out).code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(chunks.load(), 1);
}

}  // namespace
}  // namespace lossd::kernels
