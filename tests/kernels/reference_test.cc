// The float64 reference against hand-derived values, and the shared building blocks
// (broadcast operands, exact summation, block trees, half conversions).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "lossd/kernels/backend.h"
#include "lossd/kernels/bce.h"
#include "lossd/kernels/dtype.h"
#include "lossd/kernels/exact_sum.h"
#include "lossd/kernels/operand.h"
#include "lossd/kernels/reference.h"
#include "tests/kernels/test_util.h"

namespace lossd::kernels {
namespace {

using lossd::testing::FlatArgs;

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

struct One {
  double loss, gx, gy;
};

// Reference on a single element with reduction NONE.
One Ref(double x, double y, double w = 1, double p = 1) {
  BceArgs a;
  a.numel = 1;
  a.dtype = DType::kFloat64;
  a.targets_dtype = DType::kFloat64;
  a.logits = &x;
  a.targets = &y;
  a.weight = {DType::kFloat64, &w, 1, 1, nullptr};
  a.pos_weight = {DType::kFloat64, &p, 1, 1, nullptr};
  a.reduction = Reduction::kNone;
  One o;
  ReferenceBce(a, &o.loss, &o.gx, &o.gy);
  return o;
}

TEST(ReferenceTest, HandDerivedValues) {
  // x = 0: sp(0) = log 2, s(0) = 1/2.
  One o = Ref(0, 0);
  EXPECT_DOUBLE_EQ(o.loss, std::log(2.0));
  EXPECT_DOUBLE_EQ(o.gx, 0.5);
  EXPECT_DOUBLE_EQ(o.gy, 0.0);  // -log2 + log2
  o = Ref(0, 1);
  EXPECT_DOUBLE_EQ(o.loss, std::log(2.0));
  EXPECT_DOUBLE_EQ(o.gx, -0.5);
  // Soft label, weights: loss = w[(1-y) sp(x) + p y sp(-x)].
  o = Ref(2.0, 0.25, 3.0, 2.0);
  const double sp2 = 2.0 + std::log1p(std::exp(-2.0));
  const double spm2 = std::log1p(std::exp(-2.0));
  const double s2 = 1.0 / (1.0 + std::exp(-2.0));
  EXPECT_NEAR(o.loss, 3.0 * (0.75 * sp2 + 2.0 * 0.25 * spm2), 1e-15);
  EXPECT_NEAR(o.gx, 3.0 * (0.75 * s2 - 2.0 * 0.25 * (1.0 - s2)), 1e-15);
  EXPECT_NEAR(o.gy, 3.0 * (-sp2 + 2.0 * spm2), 1e-14);
  // Large logits: no cancellation.
  o = Ref(30, 0);
  EXPECT_DOUBLE_EQ(o.loss, 30.0 + std::log1p(std::exp(-30.0)));
  o = Ref(-30, 0);
  EXPECT_DOUBLE_EQ(o.loss, std::log1p(std::exp(-30.0)));  // torch float32 gives 0 here
  EXPECT_GT(o.loss, 9e-14);
  EXPECT_DOUBLE_EQ(o.gx, std::exp(-30.0) / (1.0 + std::exp(-30.0)));
  o = Ref(-30, 1);
  EXPECT_DOUBLE_EQ(o.loss, 30.0 + std::log1p(std::exp(-30.0)));
  EXPECT_DOUBLE_EQ(o.gx, -1.0 / (1.0 + std::exp(-30.0)));
  o = Ref(-17, 0);
  EXPECT_NEAR(o.loss, 4.139937633089e-08, 1e-19);
}

TEST(ReferenceTest, InfinitiesGiveLimits) {
  One o = Ref(kInf, 1);
  EXPECT_EQ(o.loss, 0.0);
  EXPECT_EQ(o.gx, 0.0);
  o = Ref(-kInf, 0);
  EXPECT_EQ(o.loss, 0.0);
  EXPECT_EQ(o.gx, 0.0);
  o = Ref(kInf, 0);
  EXPECT_EQ(o.loss, kInf);
  EXPECT_EQ(o.gx, 1.0);
  o = Ref(-kInf, 1);
  EXPECT_EQ(o.loss, kInf);
  EXPECT_EQ(o.gx, -1.0);
  o = Ref(kInf, 0.5);
  EXPECT_EQ(o.loss, kInf);
  EXPECT_EQ(o.gx, 0.5);
  // Zero weight zeroes everything, even where the unweighted loss is infinite.
  o = Ref(kInf, 0, 0.0);
  EXPECT_EQ(o.loss, 0.0);
  EXPECT_EQ(o.gx, 0.0);
  // pos_weight 0 removes the positive term.
  o = Ref(-kInf, 1, 1.0, 0.0);
  EXPECT_EQ(o.loss, 0.0);
}

// Focal loss at infinite logits: +inf where a term with a positive coefficient diverges, even
// when (1 - p_t)^gamma underflows (gamma = 1e4, the largest accepted), and 0, not NaN, when
// alpha_t = 0 (then the loss is 0 for every x). The reference and the CPU backend, float32 and
// float64 (the backend's focal path is the same element code in the logits' type).
TEST(ReferenceTest, FocalInfiniteLogitsGiveLimits) {
  struct Case {
    double x, y, alpha, gamma, loss, gx;
  };
  const Case cases[] = {
      {kInf, 0.3, 0.25, 1e4, kInf, 0.0},  {-kInf, 0.3, 0.25, 1e4, kInf, 0.0},
      {kInf, 0.0, 1.0, 2.0, 0.0, 0.0},    {-kInf, 1.0, 0.0, 2.0, 0.0, 0.0},
      {kInf, 1.0, 0.25, 1e4, 0.0, 0.0},   {-kInf, 0.0, 0.25, 0.5, 0.0, 0.0},
      {kInf, 0.0, -1.0, 1e4, kInf, 1.0},
  };
  auto cpu = MakeCpuBackend({1});
  for (const Case& c : cases) {
    for (DType dt : {DType::kFloat64, DType::kFloat32}) {
      double xd = c.x, yd = c.y;
      float xf = static_cast<float>(c.x), yf = static_cast<float>(c.y);
      BceArgs a = FlatArgs(dt, 1, dt == DType::kFloat64 ? static_cast<const void*>(&xd) : &xf,
                           dt == DType::kFloat64 ? static_cast<const void*>(&yd) : &yf, nullptr,
                           nullptr, Reduction::kNone);
      a.loss = Loss::kFocal;
      a.focal_alpha = c.alpha;
      a.focal_gamma = c.gamma;
      double rl = 0, rgx = 0;
      ReferenceBce(a, &rl, &rgx, nullptr);
      double l[1] = {0}, gx[1] = {0};
      float lf[1] = {0}, gxf[1] = {0};
      void* lo = dt == DType::kFloat64 ? static_cast<void*>(l) : lf;
      void* go = dt == DType::kFloat64 ? static_cast<void*>(gx) : gxf;
      ASSERT_TRUE(cpu->Bce(a, {lo, go, nullptr}).ok());
      const double bl = dt == DType::kFloat64 ? l[0] : lf[0];
      const double bg = dt == DType::kFloat64 ? gx[0] : gxf[0];
      const std::string at = ::testing::PrintToString(c.x) + " y=" +
                             ::testing::PrintToString(c.y) + " alpha=" +
                             ::testing::PrintToString(c.alpha) + " gamma=" +
                             ::testing::PrintToString(c.gamma) + " " + DTypeName(dt);
      EXPECT_EQ(rl, c.loss) << "reference loss, x=" << at;
      EXPECT_EQ(rgx, c.gx) << "reference dl/dx, x=" << at;
      EXPECT_EQ(bl, c.loss) << "cpu loss, x=" << at;
      EXPECT_EQ(bg, c.gx) << "cpu dl/dx, x=" << at;
    }
  }
}

// The focal loss offers no dl/dy: a caller that asks for it gets NaN in every element, as
// from the reference, never what the buffer held before (float32 writes in place, float16
// goes through scratch space).
TEST(ReferenceTest, FocalGradTargetsAreNaN) {
  auto cpu = MakeCpuBackend({2});
  constexpr int kN = 5000;
  std::vector<float> x(kN), y(kN);
  for (int i = 0; i < kN; ++i) {
    x[i] = static_cast<float>(i % 41) - 20.0f;
    y[i] = static_cast<float>(i % 3) * 0.5f;
  }
  std::vector<uint16_t> xh(kN), yh(kN);
  for (int i = 0; i < kN; ++i) {
    xh[i] = FloatToHalf(x[i]);
    yh[i] = FloatToHalf(y[i]);
  }
  for (DType dt : {DType::kFloat32, DType::kFloat16}) {
    BceArgs a =
        FlatArgs(dt, kN, dt == DType::kFloat32 ? static_cast<const void*>(x.data()) : xh.data(),
                 dt == DType::kFloat32 ? static_cast<const void*>(y.data()) : yh.data(), nullptr,
                 nullptr, Reduction::kNone);
    a.loss = Loss::kFocal;
    std::vector<float> gy(kN, 7.0f);
    std::vector<uint16_t> gyh(kN, FloatToHalf(7.0f));
    void* out = dt == DType::kFloat32 ? static_cast<void*>(gy.data()) : gyh.data();
    ASSERT_TRUE(cpu->Bce(a, {nullptr, nullptr, out}).ok());
    std::vector<double> ref(kN);
    ReferenceBce(a, nullptr, nullptr, ref.data());
    for (int i = 0; i < kN; ++i) {
      ASSERT_TRUE(std::isnan(ref[i]));
      ASSERT_TRUE(std::isnan(LoadAsDouble(dt, out, i))) << DTypeName(dt) << " element " << i;
    }
  }
}

// ignore_index matches a target only when they are equal as numbers: 2^24 + 1 is no float32,
// so it must not match the float32 target 2^24 (to which it would round), while 2^24 does. The
// CPU backend (float compute) against the reference (double compute), with normalize.
TEST(ReferenceTest, IgnoreIndexComparesExactly) {
  auto cpu = MakeCpuBackend({1});
  const float x[2] = {0.5f, -1.0f};
  const float y[2] = {16777216.0f, 0.0f};
  for (double ignore : {16777217.0, 16777216.0}) {
    BceArgs a;
    a.numel = 2;
    a.logits = x;
    a.targets = y;
    a.reduction = Reduction::kNone;
    a.has_ignore_index = true;
    a.ignore_index = ignore;
    a.normalize = true;
    double ref[2];
    ReferenceBce(a, ref, nullptr, nullptr);
    float got[2];
    ASSERT_TRUE(cpu->Bce(a, {got, nullptr, nullptr}).ok());
    EXPECT_EQ(ref[0] == 0.0, ignore == 16777216.0) << ref[0];
    for (int i = 0; i < 2; ++i) {  // an element ignored or counted wrongly is off by 2x or all
      EXPECT_NEAR(got[i], ref[i], 1e-6 * std::fabs(ref[i])) << "ignore_index " << ignore
                                                            << " element " << i;
    }
  }
}

TEST(ReferenceTest, NaNPropagates) {
  for (One o : {Ref(kNaN, 0), Ref(0, kNaN), Ref(1, 1, kNaN), Ref(1, 1, 1, kNaN), Ref(kNaN, 0, 0)}) {
    EXPECT_TRUE(std::isnan(o.loss));
    EXPECT_TRUE(std::isnan(o.gx));
    EXPECT_TRUE(std::isnan(o.gy));
  }
}

TEST(ReferenceTest, ReductionsAndBroadcast) {
  // logits [2,3], weight [3] and pos_weight [2,1].
  std::vector<double> x = {0.5, -1.0, 2.0, 3.0, 0.0, -0.25};
  std::vector<double> y = {1, 0, 0.5, 0, 1, 1};
  std::vector<double> w = {1.0, 2.0, 3.0};
  std::vector<double> p = {2.0, 4.0};
  auto wop = MakeOperand("weight", DType::kFloat64, w.data(), {3}, {2, 3});
  auto pop = MakeOperand("pos_weight", DType::kFloat64, p.data(), {2, 1}, {2, 3});
  ASSERT_TRUE(wop.ok());
  ASSERT_TRUE(pop.ok());
  EXPECT_EQ(wop->inner, 1);
  EXPECT_EQ(wop->period, 3);
  EXPECT_EQ(pop->inner, 3);
  EXPECT_EQ(pop->period, 2);
  BceArgs a;
  a.numel = 6;
  a.dtype = a.targets_dtype = DType::kFloat64;
  a.logits = x.data();
  a.targets = y.data();
  a.weight = *wop;
  a.pos_weight = *pop;
  a.reduction = Reduction::kNone;
  std::vector<double> l(6), gx(6), gy(6);
  ReferenceBce(a, l.data(), gx.data(), gy.data());
  double sum = 0;
  for (int i = 0; i < 6; ++i) {
    One e = Ref(x[i], y[i], w[i % 3], p[i / 3]);
    EXPECT_EQ(l[i], e.loss) << i;
    EXPECT_EQ(gx[i], e.gx) << i;
    EXPECT_EQ(gy[i], e.gy) << i;
    sum += e.loss;
  }
  a.reduction = Reduction::kSum;
  double s;
  std::vector<double> gxs(6);
  ReferenceBce(a, &s, gxs.data(), nullptr);
  EXPECT_NEAR(s, sum, 1e-14);
  EXPECT_EQ(gxs, gx);
  a.reduction = Reduction::kMean;
  double m;
  ReferenceBce(a, &m, gxs.data(), nullptr);
  EXPECT_NEAR(m, sum / 6, 1e-15);
  for (int i = 0; i < 6; ++i) EXPECT_DOUBLE_EQ(gxs[i], gx[i] / 6);
  // Empty tensors: MEAN is NaN, SUM is 0.
  a.numel = 0;
  ReferenceBce(a, &m, nullptr, nullptr);
  EXPECT_TRUE(std::isnan(m));
  a.reduction = Reduction::kSum;
  ReferenceBce(a, &s, nullptr, nullptr);
  EXPECT_EQ(s, 0.0);
}

TEST(MakeOperandTest, PatternsAndErrors) {
  float v[24];
  for (int i = 0; i < 24; ++i) v[i] = static_cast<float>(i);
  auto full = MakeOperand("weight", DType::kFloat32, v, {4, 6}, {4, 6});
  ASSERT_TRUE(full.ok());
  EXPECT_EQ(full->inner, 1);
  EXPECT_EQ(full->period, 24);
  auto scalar = MakeOperand("weight", DType::kFloat32, v, {}, {4, 6});
  ASSERT_TRUE(scalar.ok());
  EXPECT_EQ(scalar->period, 1);
  auto ones = MakeOperand("weight", DType::kFloat32, v, {1, 1}, {4, 6});
  ASSERT_TRUE(ones.ok());
  EXPECT_EQ(ones->period, 1);
  // [2,1,3] against [2,4,3]: two separated full groups -> expanded copy.
  auto split = MakeOperand("weight", DType::kFloat32, v, {2, 1, 3}, {2, 4, 3});
  ASSERT_TRUE(split.ok());
  ASSERT_NE(split->owned, nullptr);
  const float* e = static_cast<const float*>(split->data);
  for (int a = 0; a < 2; ++a)
    for (int b = 0; b < 4; ++b)
      for (int c = 0; c < 3; ++c) EXPECT_EQ(e[(a * 4 + b) * 3 + c], v[a * 3 + c]);
  auto bad = MakeOperand("weight", DType::kFloat32, v, {3}, {4, 7});
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(bad.status().message(), "weight shape [3] is not broadcastable to logits shape [4,7]");
  auto too_long = MakeOperand("pos_weight", DType::kFloat32, v, {1, 4, 7}, {4, 7});
  EXPECT_FALSE(too_long.ok());
  // Data the host cannot read (may_copy false): views are made without reading it, and an
  // expansion is refused instead of copied (the pointer here is not readable).
  const auto* unreadable = reinterpret_cast<const void*>(uintptr_t{8});
  auto view = MakeOperand("weight", DType::kFloat32, unreadable, {4, 1}, {4, 6}, false);
  ASSERT_TRUE(view.ok());
  EXPECT_EQ(view->data, unreadable);
  EXPECT_EQ(view->inner, 6);
  EXPECT_EQ(view->period, 4);
  auto refused = MakeOperand("weight", DType::kFloat32, unreadable, {2, 1, 3}, {2, 4, 3}, false);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(refused.status().message(),
            "weight shape [2,1,3] broadcasts to logits shape [2,4,3] only by an expanded copy, "
            "which cannot be made of this tensor");
}

// ExactSum against an independent exact sum: values m * 2^e with 53-bit integers m and e in
// [-30, 30] (so sums of 1000 of them fit a signed 128-bit integer in units of 2^-30, and the
// conversion of that integer to double rounds once, to nearest even), with heavy cancellation
// (each value also added negated with a small change) and ties; and subnormal values (small
// multiples of 2^-1074, whose sums are exact doubles).
TEST(ExactSumTest, MatchesAnExactIntegerSum) {
  std::mt19937_64 rng(11);
  for (int trial = 0; trial < 2000; ++trial) {
    ExactSum s;
    __int128 exact = 0;  // in units of 2^-30
    const int terms = 1 + static_cast<int>(rng() % 1000);
    for (int i = 0; i < terms; ++i) {
      int64_t m = static_cast<int64_t>(rng() >> (11 + rng() % 53));  // 0 to 53 bits
      if (rng() & 1) m = -m;
      const int e = static_cast<int>(rng() % 61) - 30;
      const double v = std::ldexp(static_cast<double>(m), e);  // exact: |m| < 2^53
      s.Add(v);
      exact += static_cast<__int128>(m) << (e + 30);
      if (trial % 2 == 0 && i % 3 == 0) {  // cancel it, up to a small change
        const int64_t m2 = -m + static_cast<int64_t>(rng() % 7) - 3;
        s.Add(std::ldexp(static_cast<double>(m2), e));
        exact += static_cast<__int128>(m2) << (e + 30);
      }
    }
    const double want = std::ldexp(static_cast<double>(exact), -30);
    ASSERT_EQ(s.Value(), want) << "trial " << trial;
  }
  for (int trial = 0; trial < 200; ++trial) {
    ExactSum s;
    int64_t units = 0;  // of 2^-1074
    for (int i = 0; i < 100; ++i) {
      const int64_t k = static_cast<int64_t>(rng() % (int64_t{1} << 40)) - (int64_t{1} << 39);
      s.Add(std::ldexp(static_cast<double>(k), -1074));
      units += k;
    }
    ASSERT_EQ(s.Value(), std::ldexp(static_cast<double>(units), -1074)) << "trial " << trial;
  }
}

// ExactSumOf gives ExactSum's bits, on its fast path (finite values within 2^60 of each other,
// at most 8192) and off it (wider spreads, subnormals, zeros only, infinities and NaN, values
// near overflow, longer runs); and on narrow runs of integers times powers of two it equals an
// independent 128-bit integer sum rounded once.
TEST(ExactSumTest, ExactSumOfMatchesExactSum) {
  std::mt19937_64 rng(23);
  const double inf = std::numeric_limits<double>::infinity();
  for (int trial = 0; trial < 3000; ++trial) {
    const int kind = trial % 6;
    const int64_t n = kind == 5 ? 8190 + static_cast<int64_t>(rng() % 5)
                                : static_cast<int64_t>(rng() % 300);
    const int spread = kind == 0 ? 10 : kind == 1 || kind == 5 ? 60 : kind == 2 ? 61 : 200;
    const int base = kind == 3 ? static_cast<int>(rng() % 2000) - 1070
                               : static_cast<int>(rng() % 200) - 100;
    std::vector<double> v(n);
    for (double& d : v) {
      // 53-bit significands, so the exponents spread over exactly [base, base + spread].
      const double mag = static_cast<double>((uint64_t{1} << 52) | (rng() >> 12));
      d = std::ldexp((rng() & 1) ? mag : -mag, base - 52 + static_cast<int>(rng() % (spread + 1)));
      if (rng() % 40 == 0) d = 0.0;
      if (rng() % 50 == 0 && n > 2) d = -v[rng() % n];  // cancellation
    }
    if (kind == 4 && n > 0) {
      const double specials[] = {inf, -inf, std::numeric_limits<double>::quiet_NaN(), 1e308,
                                 -1e308, 0x1p-1074, -0.0};
      v[rng() % n] = specials[rng() % 7];
    }
    ExactSum s;
    for (double d : v) s.Add(d);
    const double want = s.Value(), got = ExactSumOf(v.data(), n);
    ASSERT_TRUE(std::memcmp(&want, &got, sizeof(double)) == 0 ||
                (std::isnan(want) && std::isnan(got)))
        << "trial " << trial << " kind " << kind << " n " << n << ": " << got << " vs " << want;
  }
  EXPECT_EQ(ExactSumOf(nullptr, 0), 0.0);
  for (int trial = 0; trial < 1000; ++trial) {
    std::vector<double> v;
    __int128 exact = 0;  // in units of 2^-30
    for (int i = 0; i < 1 + static_cast<int>(rng() % 1000); ++i) {
      int64_t m = static_cast<int64_t>(rng() >> 11);
      if (rng() & 1) m = -m;
      const int e = static_cast<int>(rng() % 5) - 30;  // a spread of 4 + 53 bits
      v.push_back(std::ldexp(static_cast<double>(m), e));
      exact += static_cast<__int128>(m) << (e + 30);
    }
    ASSERT_EQ(ExactSumOf(v.data(), static_cast<int64_t>(v.size())),
              std::ldexp(static_cast<double>(exact), -30))
        << "trial " << trial;
  }
}

TEST(ExactSumTest, OrderIndependentAndExact) {
  ExactSum s;
  s.Add(1e300);
  s.Add(1.0);
  s.Add(-1e300);
  EXPECT_EQ(s.Value(), 1.0);
  ExactSum t;
  t.Add(0x1p-1074);
  t.Add(0x1p-1074);
  EXPECT_EQ(t.Value(), 0x1p-1073);
  ExactSum u;
  u.Add(1.0);
  u.Add(0x1p-53);  // exact sum is a tie: rounds to even (1.0)
  EXPECT_EQ(u.Value(), 1.0);
  u.Add(0x1p-1000);  // now just above the tie: rounds up
  EXPECT_EQ(u.Value(), 1.0 + 0x1p-52);
  ExactSum neg;
  neg.Add(-2.5);
  neg.Add(1.0);
  EXPECT_EQ(neg.Value(), -1.5);
  ExactSum inf;
  inf.Add(kInf);
  inf.Add(1.0);
  EXPECT_EQ(inf.Value(), kInf);
  inf.Add(-kInf);
  EXPECT_TRUE(std::isnan(inf.Value()));
  // Random values in shuffled orders and split/merged give identical results.
  std::mt19937_64 rng(7);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::vector<double> v(10000);
  for (double& d : v) d = nd(rng) * std::pow(10.0, static_cast<int>(rng() % 20) - 10);
  ExactSum a;
  for (double d : v) a.Add(d);
  std::shuffle(v.begin(), v.end(), rng);
  ExactSum b, c;
  for (size_t i = 0; i < v.size(); ++i) (i % 3 ? b : c).Add(v[i]);
  b.Merge(c);
  EXPECT_EQ(a.Value(), b.Value());
  // And equals a long double compensated sum to within double rounding.
  long double ld = 0;
  for (double d : v) ld += d;
  EXPECT_NEAR(a.Value(), static_cast<double>(ld), 1e-9 * std::fabs(static_cast<double>(ld)) + 1e-12);
}

TEST(TreeSumBlockTest, MatchesFullTree) {
  std::mt19937_64 rng(3);
  std::uniform_real_distribution<double> ud(-1, 1);
  for (int64_t n : {1, 2, 3, 100, 1024, 1025, 2047, 2048}) {
    std::vector<double> v(kReduceBlock, 0.0), full(kReduceBlock, 0.0);
    for (int64_t i = 0; i < n; ++i) full[i] = v[i] = ud(rng);
    for (int64_t h = kReduceBlock / 2; h >= 1; h /= 2)
      for (int64_t j = 0; j < h; ++j) full[j] += full[j + h];
    EXPECT_EQ(TreeSumBlock(v.data(), n), full[0]) << n;
  }
}

TEST(HalfTest, RoundTripsAndRounding) {
  EXPECT_EQ(FloatToHalf(1.0f), 0x3c00);
  EXPECT_EQ(HalfToFloat(0x3c00), 1.0f);
  EXPECT_EQ(FloatToHalf(65504.0f), 0x7bff);
  EXPECT_EQ(FloatToHalf(65520.0f), 0x7c00);  // rounds to inf
  EXPECT_EQ(FloatToHalf(-0.0f), 0x8000);
  EXPECT_EQ(HalfToFloat(0x0001), 0x1p-24f);
  EXPECT_EQ(FloatToHalf(0x1p-24f), 0x0001);
  EXPECT_EQ(FloatToHalf(0x1p-25f), 0x0000);          // tie to even (0)
  EXPECT_EQ(FloatToHalf(1.0f + 0x1p-11f), 0x3c00);   // tie to even
  EXPECT_EQ(FloatToHalf(1.0f + 0x1p-10f + 0x1p-11f), 0x3c02);
  EXPECT_TRUE(std::isnan(HalfToFloat(FloatToHalf(std::nanf("")))));
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = HalfToFloat(static_cast<uint16_t>(h));
    if (std::isnan(f)) continue;
    EXPECT_EQ(FloatToHalf(f), h) << h;
  }
  EXPECT_EQ(FloatToBFloat16(1.0f), 0x3f80);
  EXPECT_EQ(BFloat16ToFloat(0x3f80), 1.0f);
  EXPECT_EQ(FloatToBFloat16(1.0f + 0x1p-8f), 0x3f80);  // tie to even
  EXPECT_EQ(FloatToBFloat16(1.0f + 0x1p-7f + 0x1p-8f), 0x3f82);
  EXPECT_TRUE(std::isnan(BFloat16ToFloat(FloatToBFloat16(std::nanf("")))));
}

}  // namespace
}  // namespace lossd::kernels
