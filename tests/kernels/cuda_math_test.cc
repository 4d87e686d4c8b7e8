// The CUDA backend's element math (kernels/cuda/bce_device_math.h) compiled for the host, where
// it runs everywhere: it uses only IEEE operations, so the host results are the device's bit for
// bit, except log1pf (BceElementMixed) and the reciprocal's seed (refined by a Newton step).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <utility>
#include <vector>

#include "tests/kernels/cuda_test_util.h"
#include "hwy/targets.h"
#include "lossd/kernels/backend.h"
#include "lossd/kernels/bce.h"
#include "lossd/kernels/dtype.h"
#include "lossd/kernels/operand.h"
#include "lossd/kernels/reference.h"

namespace lossd::kernels {
namespace {

using namespace cuda_test;  // the helpers of tests/kernels/cuda_test_util.h

// ExpNonPos (the device exp) over a dense sample of [-104, 0]: below 0.8 ulp (the header
// states 0.76 measured exhaustively), subnormal results below 1 ulp of the subnormal grid.
TEST(CudaMathTest, ExpNonPosBelowOneUlp) {
  double max_err = 0;
  for (uint64_t b = 0x80000000u; b <= 0xC2D00000u; b += 251) {
    const uint32_t bits = static_cast<uint32_t>(b);
    float t;
    std::memcpy(&t, &bits, 4);
    const double ref = std::exp(static_cast<double>(t));
    const double ulp = ref < 0x1p-126 ? 0x1p-149 : UlpF32(ref);
    const double err = std::fabs(internal::ExpNonPos(t) - ref) / ulp;
    max_err = std::max(max_err, err);
    ASSERT_LT(err, ref < 0x1p-126 ? 1.0 : 0.8) << "t=" << t;
  }
  EXPECT_GT(max_err, 0.3);  // the sample is dense enough to see real rounding
  EXPECT_EQ(internal::ExpNonPos(-kInf), 0.0f);
  EXPECT_EQ(internal::ExpNonPos(-200.0f), 0.0f);
  EXPECT_EQ(internal::ExpNonPos(-0.0f), 1.0f);
  EXPECT_EQ(internal::ExpNonPos(0.0f), 1.0f);
  EXPECT_TRUE(std::isnan(internal::ExpNonPos(kNaN)));
}

// The float32 element function on the host (host log1pf instead of CUDA's, which is within
// 1 ulp too): 4-ulp loss and gradient bounds on random inputs and specials, including the
// ranges where exp(-|x|) is subnormal.
TEST(CudaMathTest, HostBceElementMixedWithinFourUlp) {
  F32Problem pr = MakeF32Problem(2001, 37, 5, true);
  BceArgs a = F32Args(pr, Reduction::kNone, {pr.c}, {pr.c});
  std::vector<float> l(pr.n), gx(pr.n), gy(pr.n);
  for (int64_t i = 0; i < pr.n; ++i) {
    double dl, dx, dy;
    internal::BceElementMixed(pr.x[i], pr.y[i], pr.w[i % pr.c], pr.p[i % pr.c], &dl, &dx, &dy);
    l[i] = static_cast<float>(dl);
    gx[i] = static_cast<float>(dx);
    gy[i] = static_cast<float>(dy);
  }
  const int64_t max_ulp = ExpectMatchesReference(a, l.data(), gx.data(), gy.data());
  EXPECT_LE(max_ulp, 4);
}

// Per element the CPU backend and the CUDA element math agree within 4 float32 ulp of the loss
// (docs/design.md section 4). Here the CUDA math runs on the host, where log1pf is the host's
// (CUDA's is within the same 1 ulp): on a GPU machine gpu_check.sh measures the device itself.
// Data as in tools/gpu/server_gpu_check.py, plus soft labels; every SIMD target compiled in.
TEST(CudaMathTest, CpuBackendAgreesWithDeviceMathPerElement) {
  const int64_t c = 64, n = 1 << 21;
  std::mt19937_64 rng(7);
  std::normal_distribution<float> nx(0.0f, 8.0f);
  std::uniform_real_distribution<float> uw(0.5f, 3.0f), u01(0.0f, 1.0f);
  std::vector<float> x(n), y(n), w(c), p(c), l(n);
  for (int64_t i = 0; i < n; ++i) {
    x[i] = nx(rng);
    y[i] = i % 5 == 0 ? u01(rng) : static_cast<float>(rng() & 1);
  }
  for (float& v : w) v = uw(rng);
  for (float& v : p) v = uw(rng);
  BceArgs a;
  a.numel = n;
  a.logits = x.data();
  a.targets = y.data();
  a.weight = *MakeOperand("weight", DType::kFloat32, w.data(), {c}, {n / c, c});
  a.pos_weight = *MakeOperand("pos_weight", DType::kFloat32, p.data(), {c}, {n / c, c});
  a.reduction = Reduction::kNone;
  std::vector<float> mixed(n), all_float(n);
  for (int64_t i = 0; i < n; ++i) {
    float gxf, gyf;
    F32Element(x[i], y[i], w[i % c], p[i % c], &mixed[i], &gxf, &gyf, false);
    F32Element(x[i], y[i], w[i % c], p[i % c], &all_float[i], &gxf, &gyf, true);
  }
  for (int64_t target : hwy::SupportedAndGeneratedTargets()) {
    hwy::SetSupportedTargetsForTest(target);
    ASSERT_TRUE(MakeCpuBackend({2})->Bce(a, {l.data(), nullptr, nullptr}).ok());
    for (const auto* device : {&mixed, &all_float}) {
      int64_t worst = 0;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t d = UlpDistance(l[i], (*device)[i]);
        worst = std::max(worst, d);
        ASSERT_LE(d, 4) << hwy::TargetName(target) << " x=" << x[i] << " y=" << y[i];
      }
      std::printf("target %s: CPU backend vs CUDA element math %s (host): worst %lld ulp\n",
                  hwy::TargetName(target), device == &mixed ? "BceElementMixed" : "BceElementF32",
                  static_cast<long long>(worst));
    }
  }
  hwy::SetSupportedTargetsForTest(0);
}

// BceElementF32 with the fallback the kernel uses, on the random problem with specials and on
// a dense grid of logits over the whole float range: the 4-ulp bounds of docs/design.md section 4.
TEST(CudaMathTest, HostBceElementF32WithinFourUlp) {
  F32Problem pr = MakeF32Problem(2001, 37, 11, true);
  BceArgs a = F32Args(pr, Reduction::kNone, {pr.c}, {pr.c});
  std::vector<float> l(pr.n), gx(pr.n), gy(pr.n);
  int64_t handled = 0;
  for (int64_t i = 0; i < pr.n; ++i) {
    handled +=
        F32Element(pr.x[i], pr.y[i], pr.w[i % pr.c], pr.p[i % pr.c], &l[i], &gx[i], &gy[i], true);
  }
  EXPECT_GT(handled, pr.n / 2);  // the rest: |x| > 80 and non-finite values
  const int64_t max_ulp = ExpectMatchesReference(a, l.data(), gx.data(), gy.data());
  EXPECT_LE(max_ulp, 3);
  std::printf("BceElementF32, random problem: loss worst %lld ulp\n",
              static_cast<long long>(max_ulp));

  const std::vector<float> xs = lossd::testing::DenseLogitGrid();
  const int64_t n = static_cast<int64_t>(xs.size());
  for (float yv : {0.0f, 1.0f, 0.3f, 1e-6f}) {
    for (const auto& wp : {std::pair{1.0f, 1.0f}, std::pair{0.0f, 2.0f}, std::pair{1e3f, 1e3f},
                           std::pair{0.01f, 7.0f}}) {
      std::vector<float> y(n, yv), w(n, wp.first), p(n, wp.second), gl(n), ggx(n), ggy(n);
      for (int64_t i = 0; i < n; ++i) {
        F32Element(xs[i], yv, wp.first, wp.second, &gl[i], &ggx[i], &ggy[i], true);
        if (wp.first == 0.0f) {
          ASSERT_TRUE(gl[i] == 0.0f && !std::signbit(gl[i]) && !std::signbit(ggx[i]) &&
                      !std::signbit(ggy[i]))
              << "x=" << xs[i];
        }
      }
      const BceArgs g = lossd::testing::FlatArgs(DType::kFloat32, n, xs.data(), y.data(),
                                                 w.data(), p.data(), Reduction::kNone);
      EXPECT_LE(ExpectMatchesReference(g, gl.data(), ggx.data(), ggy.data()), 3)
          << "y=" << yv << " w=" << wp.first << " p=" << wp.second;
    }
  }
}

// BceElementF32 where both sigmoids are large and w p y is large: x uniform in [-8, 8], w and p
// uniform in [0, 1e3] per element, hard and soft labels. dl/dx's larger term carries every
// rounding of b = w p y and of 1/(1+e) here (before b was rounded once and 1/(1+e) took in the
// rounding of 1+e, dl/dx reached 4.4 ulp on these draws).
TEST(CudaMathTest, HostBceElementF32ModerateLogitsLargeCoefficients) {
  const int64_t kN = lossd::testing::ScaledCount(1 << 21);
  std::mt19937_64 rng(5);
  std::uniform_real_distribution<float> ux(-8.0f, 8.0f), u01(0.0f, 1.0f), uf(0.0f, 1e3f);
  std::vector<float> x(kN), y(kN), w(kN), p(kN), l(kN), gx(kN), gy(kN);
  int64_t handled = 0;
  for (int64_t i = 0; i < kN; ++i) {
    x[i] = ux(rng);
    const float t = u01(rng);
    y[i] = t < 0.25f ? 0.0f : t < 0.5f ? 1.0f : u01(rng);
    w[i] = uf(rng);
    p[i] = uf(rng);
    handled += F32Element(x[i], y[i], w[i], p[i], &l[i], &gx[i], &gy[i], true);
  }
  EXPECT_EQ(handled, kN);  // all of these stay on the float path
  const BceArgs a = lossd::testing::FlatArgs(DType::kFloat32, kN, x.data(), y.data(), w.data(),
                                             p.data(), Reduction::kNone);
  const int64_t max_ulp = ExpectMatchesReference(a, l.data(), gx.data(), gy.data());
  EXPECT_LE(max_ulp, 3);
}

// The fused all-float kernel under label smoothing, element by element on the host:
// SmoothedTarget, CoefF32Smoothed and BceElementF32Coef, dl/dy from BceGradTargetsF32Smoothed;
// declined elements through BceElementMixed on the smoothed target (as RareElementF32Smoothed).
// Against the float64 reference with the option set (LossElement: smoothed target, BCE, dl/dy
// times 1 - s): loss within 4 ulp, dl/dx within 4 ulp of the larger term of the smoothed
// target's gradient, dl/dy within 4 ulp of (1 - s) times its larger term (docs/design.md section 4,
// as tests/kernels/options_test.cc bounds the CPU backend), and the loss within 4 ulp of the CPU
// backend's. Draws: a quarter of x in [-8, 8], a quarter in [-90, 90], the rest over 1e-8..1e4
// and specials; hard and soft labels; w and p per element in [0, 1e3] with zeros; smoothing
// 0.1, 0.05, 0.3 and 1.
TEST(CudaMathTest, HostBceElementF32SmoothedWithinFourUlp) {
  const int64_t kN = lossd::testing::ScaledCount(1 << 19);
  const float specials[] = {0.0f, -0.0f, 17.0f, -17.0f, 30.0f, -30.0f, 80.0f, -80.5f,
                            88.0f, -103.0f, 1e30f, -1e30f, 1e-30f, -1e-30f, kInf, -kInf};
  double worst_l = 0, worst_gx = 0, worst_gy = 0;
  for (double s : {0.1, 0.05, 0.3, 1.0}) {
    std::mt19937_64 rng(static_cast<uint64_t>(s * 1000) + 3);
    std::uniform_real_distribution<double> u(0, 1);
    std::vector<float> x(kN), y(kN), w(kN), p(kN), l(kN), gx(kN), gy(kN);
    const double keep = 1.0 - s, half = s * 0.5;
    int64_t handled = 0;
    for (int64_t i = 0; i < kN; ++i) {
      const double r = u(rng);
      x[i] = r < 0.25   ? static_cast<float>(16 * u(rng) - 8)
             : r < 0.5  ? static_cast<float>(180 * u(rng) - 90)
             : r < 0.53 ? specials[rng() % std::size(specials)]
                        : static_cast<float>(std::pow(10.0, -8 + 12 * u(rng)) *
                                             (u(rng) < 0.5 ? -1 : 1));
      const double t = u(rng);
      y[i] = t < 0.35 ? 0.0f : t < 0.7 ? 1.0f : static_cast<float>(u(rng));
      w[i] = i % 11 == 0 ? 0.0f : static_cast<float>(1e3 * u(rng));
      p[i] = i % 13 == 0 ? 0.0f : static_cast<float>(1e3 * u(rng));
      const double ys = internal::SmoothedTarget(y[i], keep, half);
      float a, b, l1p;
      internal::CoefF32Smoothed(ys, w[i], p[i], &a, &b);
      if (internal::BceElementF32Coef(x[i], a, b, &l[i], &gx[i], &l1p)) {
        gy[i] = internal::BceGradTargetsF32Smoothed(x[i], w[i], p[i], l1p, keep);
        ++handled;
        if (w[i] == 0.0f) {
          ASSERT_TRUE(l[i] == 0.0f && !std::signbit(l[i]) && !std::signbit(gx[i]) &&
                      !std::signbit(gy[i]))
              << "x=" << x[i];
        }
      } else {
        double dl, dx, dy;
        internal::BceElementMixed(x[i], ys, w[i], p[i], &dl, &dx, &dy);
        l[i] = static_cast<float>(dl);
        gx[i] = static_cast<float>(dx);
        gy[i] = static_cast<float>(dy * keep);
      }
    }
    EXPECT_GT(handled, kN / 2);
    BceArgs a = lossd::testing::FlatArgs(DType::kFloat32, kN, x.data(), y.data(), w.data(),
                                         p.data(), Reduction::kNone);
    a.label_smoothing = s;
    std::vector<double> rl(kN), rgx(kN), rgy(kN);
    ReferenceBce(a, rl.data(), rgx.data(), rgy.data());
    // Per element, the CPU backend (smoothing in double) and this math agree within 4 ulp.
    std::vector<float> cpu_l(kN);
    ASSERT_TRUE(MakeCpuBackend({2})->Bce(a, {cpu_l.data(), nullptr, nullptr}).ok());
    int64_t worst_cpu = 0;
    for (int64_t i = 0; i < kN; ++i) {
      worst_cpu = std::max(worst_cpu, UlpDistance(cpu_l[i], l[i]));
    }
    EXPECT_LE(worst_cpu, 4) << "s=" << s;
    int64_t failures = 0;
    for (int64_t i = 0; i < kN && failures < 10; ++i) {
      const double ys = static_cast<double>(y[i]) * keep + half;
      const auto [sx, sy] = GradTermScales(x[i], ys, w[i], p[i]);
      const double el = static_cast<double>(UlpDistance(l[i], static_cast<float>(rl[i])));
      auto grad_err = [](float got, double ref, double scale) {
        if (std::isnan(ref)) return std::isnan(got) ? 0.0 : kInf;
        if (std::isinf(ref)) return got == ref ? 0.0 : kInf;
        return std::fabs(got - ref) / UlpF32(scale);
      };
      const double ex = grad_err(gx[i], rgx[i], sx);
      const double ey = grad_err(gy[i], rgy[i], sy * keep);
      worst_l = std::max(worst_l, el);
      worst_gx = std::max(worst_gx, ex);
      worst_gy = std::max(worst_gy, ey);
      if (el > 4 || !(ex <= 4) || !(ey <= 4)) {
        ++failures;
        ADD_FAILURE() << "s=" << s << " x=" << x[i] << " y=" << y[i] << " w=" << w[i]
                      << " p=" << p[i] << ": loss " << l[i] << " vs " << rl[i] << " (" << el
                      << " ulp), dl/dx " << gx[i] << " vs " << rgx[i] << " (" << ex
                      << "), dl/dy " << gy[i] << " vs " << rgy[i] << " (" << ey << ")";
      }
    }
  }
  std::printf("BceElementF32 with label smoothing: loss worst %.0f ulp, dl/dx %.2f, dl/dy %.2f "
              "ulp of the larger term\n",
              worst_l, worst_gx, worst_gy);
}

// The elements BceElementF32 leaves to the double path: far, infinite and NaN logits, NaN
// operands, overflowing products.
TEST(CudaMathTest, HostBceElementF32DeclinesRareElements) {
  float l, gx, l1p;
  for (float x : {80.5f, -81.0f, 1e30f, kInf, -kInf, kNaN}) {
    EXPECT_FALSE(internal::BceElementF32(x, 0.5f, 1.0f, 1.0f, &l, &gx, &l1p)) << x;
  }
  EXPECT_FALSE(internal::BceElementF32(1.0f, kNaN, 1.0f, 1.0f, &l, &gx, &l1p));
  EXPECT_FALSE(internal::BceElementF32(1.0f, 0.5f, kNaN, 1.0f, &l, &gx, &l1p));
  EXPECT_FALSE(internal::BceElementF32(1.0f, 0.5f, 0.0f, kNaN, &l, &gx, &l1p));
  EXPECT_FALSE(internal::BceElementF32(-60.0f, 1.0f, 3e38f, 1e10f, &l, &gx, &l1p));  // overflow
  EXPECT_TRUE(internal::BceElementF32(80.0f, 0.5f, 1.0f, 1.0f, &l, &gx, &l1p));
  EXPECT_TRUE(internal::BceElementF32(0.0f, 0.0f, 1.0f, 1.0f, &l, &gx, &l1p));
  EXPECT_EQ(l, static_cast<float>(std::log(2.0)));
  EXPECT_EQ(gx, 0.5f);
  EXPECT_EQ(l1p, static_cast<float>(std::log(2.0)));
  EXPECT_EQ(internal::BceGradTargetsF32(0.0f, 1.0f, 1.0f, l1p), 0.0f);  // w (p sp(0) - sp(0))
  EXPECT_EQ(internal::BceGradTargetsF32(0.0f, 2.0f, 3.0f, l1p), 4.0f * l1p);
}

TEST(CudaMathTest, HostBceElementMixedSpecialValues) {
  SpecialGrid g;
  const int64_t n = static_cast<int64_t>(g.x.size());
  const BceArgs a = lossd::testing::FlatArgs(DType::kFloat32, n, g.x.data(), g.y.data(),
                                             g.w.data(), g.p.data(), Reduction::kNone);
  std::vector<float> l(n), gx(n), gy(n);
  for (int64_t i = 0; i < n; ++i) {
    double dl, dx, dy;
    internal::BceElementMixed(g.x[i], g.y[i], g.w[i], g.p[i], &dl, &dx, &dy);
    l[i] = static_cast<float>(dl);
    gx[i] = static_cast<float>(dx);
    gy[i] = static_cast<float>(dy);
  }
  ExpectMatchesReference(a, l.data(), gx.data(), gy.data());
}

}  // namespace
}  // namespace lossd::kernels
