// The CPU backend against the float64 reference, and its determinism across thread counts.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "lossd/kernels/kernels.h"
#include "test_util.h"

namespace lossd::kernels {
namespace {

using lossd::testing::UlpDistance;
using lossd::testing::UlpF32;

// Random float32 problem: logits over many magnitudes plus specials, soft and hard labels,
// weight [C], pos_weight [C].
struct Problem {
  int64_t n, c;
  std::vector<float> x, y, w, p;
  BceArgs args(Reduction r) const {
    BceArgs a;
    a.numel = n;
    a.dtype = a.targets_dtype = DType::kFloat32;
    a.logits = x.data();
    a.targets = y.data();
    a.weight = *MakeOperand("weight", DType::kFloat32, w.data(), {c}, {n / c, c});
    a.pos_weight = *MakeOperand("pos_weight", DType::kFloat32, p.data(), {c}, {n / c, c});
    a.reduction = r;
    return a;
  }
};

Problem MakeProblem(int64_t rows, int64_t c, uint64_t seed) {
  Problem pr;
  pr.n = rows * c;
  pr.c = c;
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(0, 1);
  const float specials[] = {0.0f, -0.0f, 30.0f, -30.0f, 1e30f, -1e30f, 1e-30f, -1e-30f,
                            std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(), 88.0f, -88.0f, -17.0f};
  for (int64_t i = 0; i < pr.n; ++i) {
    float x;
    const double r = u(rng);
    if (r < 0.05) {
      x = specials[rng() % std::size(specials)];
    } else {
      // log-uniform magnitude in [1e-8, 1e4], random sign
      x = static_cast<float>(std::pow(10.0, -8 + 12 * u(rng)) * (u(rng) < 0.5 ? -1 : 1));
    }
    pr.x.push_back(x);
    const double t = u(rng);
    pr.y.push_back(t < 0.4 ? 0.0f : t < 0.8 ? 1.0f : static_cast<float>(u(rng)));
  }
  for (int64_t k = 0; k < c; ++k) {
    pr.w.push_back(k % 7 == 0 ? 0.0f : static_cast<float>(1e3 * u(rng)));
    pr.p.push_back(k % 5 == 0 ? 0.0f : static_cast<float>(1e3 * u(rng)));
  }
  return pr;
}

// Magnitude of the larger of the two gradient terms, for the gradient's ulp bound.
double GradScale(double x, double y, double w, double p) {
  const double e = std::exp(-std::fabs(x));
  const double sp = x >= 0 ? 1 / (1 + e) : e / (1 + e);
  const double sn = x >= 0 ? e / (1 + e) : 1 / (1 + e);
  return std::max(std::fabs(w * (1 - y) * sp), std::fabs(w * p * y * sn));
}

TEST(CpuBackendTest, Float32WithinFourUlpOfReference) {
  Problem pr = MakeProblem(3001, 37, 11);  // not a multiple of the block size
  auto cpu = MakeCpuBackend({2});
  BceArgs a = pr.args(Reduction::kNone);
  std::vector<float> l(pr.n), gx(pr.n), gy(pr.n);
  ASSERT_TRUE(cpu->Bce(a, {l.data(), gx.data(), gy.data()}).ok());
  std::vector<double> rl(pr.n), rgx(pr.n), rgy(pr.n);
  ReferenceBce(a, rl.data(), rgx.data(), rgy.data());
  int64_t worst = 0;
  for (int64_t i = 0; i < pr.n; ++i) {
    const int64_t d = UlpDistance(l[i], static_cast<float>(rl[i]));
    worst = std::max(worst, d);
    ASSERT_LE(d, 4) << "i=" << i << " x=" << pr.x[i] << " y=" << pr.y[i] << " got " << l[i]
                    << " want " << rl[i];
    const double scale = GradScale(pr.x[i], pr.y[i], pr.w[i % pr.c], pr.p[i % pr.c]);
    if (!std::isnan(rgx[i])) {
      ASSERT_LE(std::fabs(gx[i] - rgx[i]), 4 * UlpF32(scale) + 0.0) << "gx i=" << i;
    }
    if (std::isfinite(rgy[i])) {
      ASSERT_LE(std::fabs(gy[i] - rgy[i]), 4 * UlpF32(rgy[i]) + 4 * UlpF32(pr.w[i % pr.c] * (std::fabs(pr.x[i]) + 1)))
          << "gy i=" << i;
    } else {
      ASSERT_EQ(static_cast<double>(gy[i]), rgy[i]) << "gy i=" << i;
    }
  }
  RecordProperty("worst_loss_ulp", static_cast<int>(worst));
}

TEST(CpuBackendTest, OtherDtypesMatchReference) {
  std::mt19937_64 rng(5);
  std::uniform_real_distribution<double> u(-20, 20), t(0, 1);
  const int64_t n = 5000;
  std::vector<double> xd(n), yd(n);
  for (int64_t i = 0; i < n; ++i) {
    xd[i] = u(rng);
    yd[i] = t(rng) < 0.5 ? std::round(t(rng)) : t(rng);
  }
  // float64: within 4 ulp of a long double evaluation of the same formula is checked in the
  // float64 accuracy suite; here the backend must agree with the reference to ~1e-15.
  {
    BceArgs a;
    a.numel = n;
    a.dtype = a.targets_dtype = DType::kFloat64;
    a.logits = xd.data();
    a.targets = yd.data();
    a.reduction = Reduction::kNone;
    std::vector<double> l(n), rl(n);
    ASSERT_TRUE(MakeCpuBackend({1})->Bce(a, {l.data(), nullptr, nullptr}).ok());
    ReferenceBce(a, rl.data(), nullptr, nullptr);
    for (int64_t i = 0; i < n; ++i) ASSERT_LE(std::fabs(l[i] - rl[i]), 4 * lossd::testing::UlpF64(rl[i]));
  }
  for (DType dt : {DType::kFloat16, DType::kBFloat16}) {
    std::vector<uint16_t> xh(n), yh(n);
    for (int64_t i = 0; i < n; ++i) {
      StoreFromDouble(dt, xh.data(), i, xd[i]);
      StoreFromDouble(dt, yh.data(), i, yd[i]);
    }
    BceArgs a;
    a.numel = n;
    a.dtype = a.targets_dtype = dt;
    a.logits = xh.data();
    a.targets = yh.data();
    a.reduction = Reduction::kNone;
    std::vector<uint16_t> l(n), gx(n);
    ASSERT_TRUE(MakeCpuBackend({2})->Bce(a, {l.data(), gx.data(), nullptr}).ok());
    std::vector<double> rl(n), rgx(n);
    ReferenceBce(a, rl.data(), rgx.data(), nullptr);  // reference reads the same half inputs
    for (int64_t i = 0; i < n; ++i) {
      // Computed wider and rounded once: exactly the reference rounded to the half type
      // (except where double->float->half double rounding differs by one half-ulp step).
      std::vector<uint16_t> want(1);
      StoreFromDouble(dt, want.data(), 0, rl[i]);
      const double got = LoadAsDouble(dt, l.data(), i);
      const double exp = LoadAsDouble(dt, want.data(), 0);
      ASSERT_LE(std::fabs(got - exp), std::fabs(exp) * (dt == DType::kFloat16 ? 1e-3 : 8e-3))
          << DTypeName(dt) << " i=" << i;
    }
  }
}

TEST(CpuBackendTest, MixedDtypesAndFullWeight) {
  const int64_t n = 4099;
  std::mt19937_64 rng(9);
  std::uniform_real_distribution<double> u(-5, 5), t(0, 1);
  std::vector<float> x(n);
  std::vector<double> y(n);
  std::vector<uint16_t> w(n);
  for (int64_t i = 0; i < n; ++i) {
    x[i] = static_cast<float>(u(rng));
    y[i] = t(rng);
    w[i] = FloatToBFloat16(static_cast<float>(3 * t(rng)));
  }
  BceArgs a;
  a.numel = n;
  a.dtype = DType::kFloat32;
  a.logits = x.data();
  a.targets_dtype = DType::kFloat64;
  a.targets = y.data();
  a.weight = *MakeOperand("weight", DType::kBFloat16, w.data(), {n}, {n});
  a.reduction = Reduction::kNone;
  std::vector<float> l(n);
  ASSERT_TRUE(MakeCpuBackend({2})->Bce(a, {l.data(), nullptr, nullptr}).ok());
  std::vector<double> rl(n);
  ReferenceBce(a, rl.data(), nullptr, nullptr);
  for (int64_t i = 0; i < n; ++i) ASSERT_LE(UlpDistance(l[i], static_cast<float>(rl[i])), 4) << i;
}

TEST(CpuBackendTest, ReductionsMatchReferenceAndGradsAreScaled) {
  Problem pr = MakeProblem(20000, 13, 21);
  for (Reduction r : {Reduction::kSum, Reduction::kMean}) {
    BceArgs a = pr.args(r);
    // Keep the sum finite: drop infinite logits with zero coefficients' complements.
    float loss;
    std::vector<float> gx(pr.n);
    ASSERT_TRUE(MakeCpuBackend({2})->Bce(a, {&loss, gx.data(), nullptr}).ok());
    double rloss;
    std::vector<double> rgx(pr.n);
    ReferenceBce(a, &rloss, rgx.data(), nullptr);
    if (std::isfinite(rloss)) {
      EXPECT_NEAR(loss, rloss, 1e-6 * std::fabs(rloss));
    } else {
      EXPECT_EQ(static_cast<double>(loss), rloss);
    }
    const double div = r == Reduction::kMean ? static_cast<double>(pr.n) : 1.0;
    for (int64_t i = 0; i < pr.n; ++i) {
      if (std::isnan(rgx[i])) continue;
      const double scale = GradScale(pr.x[i], pr.y[i], pr.w[i % pr.c], pr.p[i % pr.c]) / div;
      ASSERT_LE(std::fabs(gx[i] - rgx[i]), 4 * UlpF32(scale) + 1e-44) << i;
    }
  }
}

TEST(CpuBackendTest, ReductionBitwiseIdenticalForAnyThreadCount) {
  // Finite data so the sum is an ordinary number sensitive to summation order.
  const int64_t n = 3'000'001;
  std::mt19937_64 rng(1);
  std::uniform_real_distribution<float> u(-8, 8), t(0, 1);
  std::vector<float> x(n), y(n);
  for (int64_t i = 0; i < n; ++i) {
    x[i] = u(rng);
    y[i] = t(rng);
  }
  BceArgs a;
  a.numel = n;
  a.dtype = a.targets_dtype = DType::kFloat32;
  a.logits = x.data();
  a.targets = y.data();
  for (Reduction r : {Reduction::kSum, Reduction::kMean}) {
    a.reduction = r;
    uint32_t first_bits = 0;
    for (int threads : {1, 2, 3, 7, 16}) {
      auto cpu = MakeCpuBackend({threads});
      for (int run = 0; run < 2; ++run) {
        float v;
        ASSERT_TRUE(cpu->Bce(a, {&v, nullptr, nullptr}).ok());
        uint32_t bits;
        std::memcpy(&bits, &v, 4);
        if (threads == 1 && run == 0) first_bits = bits;
        EXPECT_EQ(bits, first_bits) << "threads=" << threads << " run=" << run;
      }
    }
    // Double output exposes all bits of the accumulation.
    std::vector<double> xd(x.begin(), x.end()), yd(y.begin(), y.end());
    BceArgs ad = a;
    ad.dtype = ad.targets_dtype = DType::kFloat64;
    ad.logits = xd.data();
    ad.targets = yd.data();
    double d1, d7;
    ASSERT_TRUE(MakeCpuBackend({1})->Bce(ad, {&d1, nullptr, nullptr}).ok());
    ASSERT_TRUE(MakeCpuBackend({7})->Bce(ad, {&d7, nullptr, nullptr}).ok());
    EXPECT_EQ(std::memcmp(&d1, &d7, 8), 0);
    double ref;
    ReferenceBce(ad, &ref, nullptr, nullptr);
    EXPECT_NEAR(d1, ref, 1e-12 * std::fabs(ref));
  }
}

TEST(CpuBackendTest, EmptyAndConcurrentCalls) {
  auto cpu = MakeCpuBackend({3});
  BceArgs a;
  a.numel = 0;
  a.reduction = Reduction::kMean;
  float v = 0;
  ASSERT_TRUE(cpu->Bce(a, {&v, nullptr, nullptr}).ok());
  EXPECT_TRUE(std::isnan(v));
  a.reduction = Reduction::kSum;
  ASSERT_TRUE(cpu->Bce(a, {&v, nullptr, nullptr}).ok());
  EXPECT_EQ(v, 0.0f);
  // Several threads share one backend.
  Problem pr = MakeProblem(5000, 40, 2);
  BceArgs b = pr.args(Reduction::kSum);
  float want;
  ASSERT_TRUE(cpu->Bce(b, {&want, nullptr, nullptr}).ok());
  std::vector<std::thread> ts;
  std::vector<float> got(6);
  for (int k = 0; k < 6; ++k) {
    ts.emplace_back([&, k] { (void)cpu->Bce(b, {&got[k], nullptr, nullptr}); });
  }
  for (auto& t : ts) t.join();
  for (float g : got) EXPECT_EQ(std::memcmp(&g, &want, 4), 0);
}

}  // namespace
}  // namespace lossd::kernels
