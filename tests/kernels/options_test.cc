// Paddle's ignore_index/normalize, Keras's label_smoothing and per-sample mean, and
// torchvision's sigmoid focal loss: reference against independent formulas, and the CPU
// backend against the reference.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "lossd/kernels/kernels.h"
#include "test_util.h"

namespace lossd::kernels {
namespace {

using lossd::testing::UlpDistance;

// Naive torchvision sigmoid_focal_loss in long double (fine for moderate |x|).
long double NaiveFocal(long double x, long double y, long double alpha, long double gamma) {
  const long double p = 1.0L / (1.0L + std::exp(-x));
  const long double ce = std::max(x, 0.0L) - x * y + std::log1p(std::exp(-std::fabs(x)));
  const long double p_t = p * y + (1 - p) * (1 - y);
  long double loss = ce * std::pow(1 - p_t, gamma);
  if (alpha >= 0) loss *= alpha * y + (1 - alpha) * (1 - y);
  return loss;
}

BceArgs Args64(const std::vector<double>& x, const std::vector<double>& y) {
  BceArgs a;
  a.numel = static_cast<int64_t>(x.size());
  a.dtype = a.targets_dtype = DType::kFloat64;
  a.logits = x.data();
  a.targets = y.data();
  a.reduction = Reduction::kNone;
  return a;
}

TEST(FocalTest, ReferenceMatchesNaiveFormulaAndNumericGradient) {
  std::vector<double> xs, ys;
  for (double x = -12; x <= 12; x += 0.37) {
    for (double y : {0.0, 1.0, 0.3, 0.9}) {
      xs.push_back(x);
      ys.push_back(y);
    }
  }
  for (double gamma : {0.0, 0.5, 1.0, 2.0, 3.5}) {
    for (double alpha : {0.25, 0.8, -1.0}) {
      BceArgs a = Args64(xs, ys);
      a.loss = Loss::kFocal;
      a.focal_alpha = alpha;
      a.focal_gamma = gamma;
      std::vector<double> l(xs.size()), gx(xs.size());
      ReferenceBce(a, l.data(), gx.data(), nullptr);
      for (size_t i = 0; i < xs.size(); ++i) {
        const long double want = NaiveFocal(xs[i], ys[i], alpha, gamma);
        ASSERT_NEAR(l[i], static_cast<double>(want), 1e-13 * std::fabs(static_cast<double>(want)) + 1e-300)
            << "x=" << xs[i] << " y=" << ys[i] << " gamma=" << gamma << " alpha=" << alpha;
        const long double h = 1e-6L;
        const long double num =
            (NaiveFocal(xs[i] + h, ys[i], alpha, gamma) - NaiveFocal(xs[i] - h, ys[i], alpha, gamma)) /
            (2 * h);
        ASSERT_NEAR(gx[i], static_cast<double>(num), 1e-7 * std::fabs(static_cast<double>(num)) + 1e-9)
            << "grad x=" << xs[i] << " y=" << ys[i] << " gamma=" << gamma;
      }
    }
  }
}

TEST(FocalTest, FiniteGradientsForSmallGammaAndLimitsAtInfinity) {
  const double inf = INFINITY;
  std::vector<double> xs = {60, -60, 700, -700, inf, -inf, 1e-300, 0};
  std::vector<double> ys = {1, 0, 1, 0, 1, 0, 1, 0};
  for (double gamma : {0.0, 0.25, 0.5, 0.99, 2.0}) {
    BceArgs a = Args64(xs, ys);
    a.loss = Loss::kFocal;
    a.focal_gamma = gamma;
    std::vector<double> l(xs.size()), gx(xs.size());
    ReferenceBce(a, l.data(), gx.data(), nullptr);
    for (size_t i = 0; i < xs.size(); ++i) {
      EXPECT_TRUE(std::isfinite(l[i])) << "x=" << xs[i] << " gamma=" << gamma;
      EXPECT_TRUE(std::isfinite(gx[i])) << "x=" << xs[i] << " gamma=" << gamma;
      if (std::isinf(xs[i])) {
        EXPECT_EQ(l[i], 0.0);  // confident and right: the limit is 0
        EXPECT_EQ(gx[i], 0.0);
      }
    }
  }
  // Wrong and confident: loss grows like |x|, gradient tends to +-alpha_t.
  std::vector<double> x2 = {inf, -inf}, y2 = {0, 1};
  BceArgs a = Args64(x2, y2);
  a.loss = Loss::kFocal;
  std::vector<double> l(2), gx(2);
  ReferenceBce(a, l.data(), gx.data(), nullptr);
  EXPECT_EQ(l[0], inf);
  EXPECT_EQ(l[1], inf);
  EXPECT_DOUBLE_EQ(gx[0], 0.75);
  EXPECT_DOUBLE_EQ(gx[1], -0.25);
}

TEST(OptionsTest, IgnoreIndexNormalizeAndSmoothingInReference) {
  std::vector<double> x = {0.5, -1.0, 2.0, 3.0}, y = {1, -100, 0, 0.5};
  BceArgs a = Args64(x, y);
  a.has_ignore_index = true;
  a.ignore_index = -100;
  std::vector<double> l(4), gx(4), gy(4);
  ReferenceBce(a, l.data(), gx.data(), gy.data());
  EXPECT_EQ(l[1], 0.0);
  EXPECT_EQ(gx[1], 0.0);
  EXPECT_EQ(gy[1], 0.0);
  const double l0 = std::log1p(std::exp(-0.5));
  EXPECT_DOUBLE_EQ(l[0], l0);
  a.normalize = true;  // 3 elements kept
  std::vector<double> ln(4), gxn(4);
  ReferenceBce(a, ln.data(), gxn.data(), nullptr);
  for (int i = 0; i < 4; ++i) {
    EXPECT_DOUBLE_EQ(ln[i], l[i] / 3) << i;
    EXPECT_DOUBLE_EQ(gxn[i], gx[i] / 3) << i;
  }
  // Smoothing s = 0.2: y' = y * 0.8 + 0.1, dl/dy scaled by 0.8.
  BceArgs b = Args64(x, y);
  b.label_smoothing = 0.2;
  std::vector<double> ls(4), gys(4);
  ReferenceBce(b, ls.data(), nullptr, gys.data());
  std::vector<double> ysm = {0.9, -100 * 0.8 + 0.1, 0.1, 0.5};
  BceArgs c = Args64(x, ysm);
  std::vector<double> lc(4), gyc(4);
  ReferenceBce(c, lc.data(), nullptr, gyc.data());
  for (int i = 0; i < 4; ++i) {
    EXPECT_NEAR(ls[i], lc[i], 1e-15 * std::fabs(lc[i]));
    EXPECT_NEAR(gys[i], 0.8 * gyc[i], 1e-15 * std::fabs(gyc[i]));
  }
}

TEST(OptionsTest, PerSampleMeanInReference) {
  std::vector<double> x = {0.5, -1.0, 2.0, 3.0, 0.0, -2.0}, y = {1, 0, 0, 1, 0.5, 1};
  BceArgs a = Args64(x, y);
  std::vector<double> l(6), g(6);
  ReferenceBce(a, l.data(), g.data(), nullptr);
  a.reduction = Reduction::kPerSampleMean;
  a.last_dim = 3;
  ASSERT_EQ(LossCount(a), 2);
  std::vector<double> r(2), gr(6);
  ReferenceBce(a, r.data(), gr.data(), nullptr);
  EXPECT_NEAR(r[0], (l[0] + l[1] + l[2]) / 3, 1e-15);
  EXPECT_NEAR(r[1], (l[3] + l[4] + l[5]) / 3, 1e-15);
  for (int i = 0; i < 6; ++i) EXPECT_DOUBLE_EQ(gr[i], g[i] / 3);
}

// The CPU backend equals the reference (float32 within 4 ulp, or the gradient bound) for every
// option combination.
TEST(OptionsTest, CpuBackendMatchesReferenceForEveryOption) {
  const int64_t rows = 1500, cols = 9, n = rows * cols;
  std::mt19937_64 rng(17);
  std::uniform_real_distribution<double> ux(-15, 15), u(0, 1);
  // y holds -100 markers (ignored when ignore_index is on); y_clean has 0 there, since the ulp
  // bounds apply to targets in [0, 1].
  std::vector<float> x(n), y(n), y_clean(n), w(cols), p(cols);
  for (int64_t i = 0; i < n; ++i) {
    x[i] = static_cast<float>(ux(rng));
    const double r = u(rng);
    y[i] = r < 0.1 ? -100.0f : r < 0.5 ? 0.0f : r < 0.9 ? 1.0f : static_cast<float>(u(rng));
    y_clean[i] = y[i] == -100.0f ? 0.0f : y[i];
  }
  for (int64_t c = 0; c < cols; ++c) {
    w[c] = static_cast<float>(2 * u(rng));
    p[c] = static_cast<float>(3 * u(rng));
  }
  auto cpu = MakeCpuBackend({2});
  struct Case {
    Loss loss;
    bool ignore, normalize;
    double smoothing;
    Reduction red;
  };
  std::vector<Case> cases;
  for (Loss loss : {Loss::kBce, Loss::kFocal})
    for (bool ignore : {false, true})
      for (bool normalize : {false, true})
        for (double sm : {0.0, 0.1})
          for (Reduction red : {Reduction::kNone, Reduction::kSum, Reduction::kMean,
                                Reduction::kPerSampleMean})
            cases.push_back({loss, ignore, normalize, sm, red});
  for (const Case& c : cases) {
    BceArgs a;
    a.numel = n;
    a.logits = x.data();
    a.targets = c.ignore ? y.data() : y_clean.data();
    a.weight = *MakeOperand("weight", DType::kFloat32, w.data(), {cols}, {rows, cols});
    if (c.loss == Loss::kBce) {
      a.pos_weight = *MakeOperand("pos_weight", DType::kFloat32, p.data(), {cols}, {rows, cols});
    }
    a.loss = c.loss;
    a.focal_gamma = 1.5;
    a.focal_alpha = 0.3;
    a.has_ignore_index = c.ignore;
    a.ignore_index = -100;
    a.normalize = c.normalize;
    a.label_smoothing = c.smoothing;
    a.reduction = c.red;
    a.last_dim = cols;
    const int64_t m = LossCount(a);
    std::vector<float> l(m), gx(n);
    ASSERT_TRUE(cpu->Bce(a, {l.data(), gx.data(), nullptr}).ok());
    std::vector<double> rl(m), rgx(n);
    ReferenceBce(a, rl.data(), rgx.data(), nullptr);
    const std::string label = "loss=" + std::to_string(static_cast<int>(c.loss)) + " ignore=" +
                              std::to_string(c.ignore) + " normalize=" + std::to_string(c.normalize) +
                              " smoothing=" + std::to_string(c.smoothing) +
                              " reduction=" + std::to_string(static_cast<int>(c.red));
    for (int64_t i = 0; i < m; ++i) {
      if (c.red == Reduction::kNone) {
        const int64_t tol = 4;
        ASSERT_LE(UlpDistance(l[i], static_cast<float>(rl[i])), tol)
            << label << " i=" << i << " got " << l[i] << " want " << rl[i];
      } else {
        ASSERT_NEAR(l[i], rl[i], 1e-6 * std::fabs(rl[i]) + 1e-30) << label << " i=" << i;
      }
    }
    // Gradient bound: a few float32 ulp of the larger of its terms, w * max(1-y, p*y) (times
    // the focal factors, at most 1), over the reduction's divisor.
    double div = c.red == Reduction::kMean ? n : c.red == Reduction::kPerSampleMean ? cols : 1;
    if (c.normalize) {
      int64_t kept = 0;
      for (int64_t i = 0; i < n; ++i) kept += !(c.ignore && y[i] == -100.0f);
      div *= kept;
    }
    for (int64_t i = 0; i < n; ++i) {
      const double yv = (c.ignore ? y : y_clean)[i];
      const double pv = c.loss == Loss::kBce ? p[i % cols] : 1.0;
      const double term = w[i % cols] * std::max(std::fabs(1 - yv), pv * std::fabs(yv)) / div;
      ASSERT_LE(std::fabs(gx[i] - rgx[i]), 8 * 0x1p-24 * term + 1e-45)
          << label << " grad i=" << i << " got " << gx[i] << " want " << rgx[i];
    }
  }
}

}  // namespace
}  // namespace lossd::kernels
