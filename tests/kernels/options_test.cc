// Paddle's ignore_index/normalize, Keras's label_smoothing and per-sample mean, and
// torchvision's sigmoid focal loss: reference against independent formulas, and the CPU
// backend against the reference.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "lossd/kernels/kernels.h"
#include "test_util.h"

namespace lossd::kernels {
namespace {

using lossd::testing::UlpDistance;
using lossd::testing::UlpF32;

// Naive torchvision sigmoid_focal_loss in long double (fine for moderate |x|).
long double NaiveFocal(long double x, long double y, long double alpha, long double gamma) {
  const long double p = 1.0L / (1.0L + std::exp(-x));
  const long double ce = std::max(x, 0.0L) - x * y + std::log1p(std::exp(-std::fabs(x)));
  const long double p_t = p * y + (1 - p) * (1 - y);
  long double loss = ce * std::pow(1 - p_t, gamma);
  if (alpha >= 0) loss *= alpha * y + (1 - alpha) * (1 - y);
  return loss;
}

// The largest of the three terms of the focal gradient (FocalElement, kernels/src/bce_math.h):
// the focal counterpart of GradTermScales, for the same 4-ulp gradient bound. With
// q = 1 - p_t = (1-y) s(x) + y s(-x) and ce = (1-y) sp(x) + y sp(-x),
//   dl/dx = w alpha_t [ (1-y) s(x) q^g - y s(-x) q^g + g (1-2y) ce q^(g-1) s(x) s(-x) ].
// The first two cancel for soft labels, and the third has the sign of 1-2y. Each term is
// evaluated in long double in log space (log s(x) = -sp(-x)), so q^(g-1) neither overflows nor
// meets 0 * inf for g < 1; a term with a zero coefficient is 0. Finite x, y in [0, 1].
double FocalGradTermScale(double x, double y, double w, double alpha, double gamma) {
  using L = long double;
  const L lx = x, ly = y, lg = gamma;
  const L at = alpha >= 0 ? alpha * ly + (1 - alpha) * (1 - ly) : 1.0L;
  if (w == 0 || at == 0) return 0;
  const L l = std::log1p(std::exp(-std::fabs(lx)));
  const L sp_pos = std::max(lx, 0.0L) + l, sp_neg = std::max(-lx, 0.0L) + l;  // sp(x), sp(-x)
  const L a = 1 - ly, b = ly;
  const L inf = std::numeric_limits<L>::infinity();
  const L t1 = a > 0 ? std::log(a) - sp_neg : -inf;  // log((1-y) s(x))
  const L t2 = b > 0 ? std::log(b) - sp_pos : -inf;  // log(y s(-x))
  const L hi = std::max(t1, t2), lo = std::min(t1, t2);
  const L log_q = lo == -inf ? hi : hi + std::log1p(std::exp(lo - hi));
  const L log_mod = gamma == 0 ? 0.0L : lg * log_q;
  const L log_wat = std::log(static_cast<L>(w) * std::fabs(at));
  const L ce = (a > 0 ? a * sp_pos : 0.0L) + (b > 0 ? b * sp_neg : 0.0L);
  const L term_a = a > 0 ? std::exp(log_wat + t1 + log_mod) : 0.0L;
  const L term_b = b > 0 ? std::exp(log_wat + t2 + log_mod) : 0.0L;
  const L term_q = gamma != 0 && a != b && ce > 0
                       ? std::exp(log_wat + std::log(lg * std::fabs(a - b)) + (lg - 1) * log_q +
                                  std::log(ce) - sp_pos - sp_neg)
                       : 0.0L;
  return static_cast<double>(std::max({term_a, term_b, term_q}));
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
        ASSERT_NEAR(l[i], static_cast<double>(want),
                    1e-13 * std::fabs(static_cast<double>(want)) + 1e-300)
            << "x=" << xs[i] << " y=" << ys[i] << " gamma=" << gamma << " alpha=" << alpha;
        const long double h = 1e-6L;
        const long double num = (NaiveFocal(xs[i] + h, ys[i], alpha, gamma) -
                                 NaiveFocal(xs[i] - h, ys[i], alpha, gamma)) /
                                (2 * h);
        ASSERT_NEAR(gx[i], static_cast<double>(num),
                    1e-7 * std::fabs(static_cast<double>(num)) + 1e-9)
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
  double worst_gx = 0, worst_gy = 0;  // in float32 ulps of the larger term
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
    // dl/dy is not offered for the focal loss.
    std::vector<float> l(m), gx(n), gy(n);
    ASSERT_TRUE(
        cpu->Bce(a, {l.data(), gx.data(), c.loss == Loss::kBce ? gy.data() : nullptr}).ok());
    std::vector<double> rl(m), rgx(n), rgy(n);
    ReferenceBce(a, rl.data(), rgx.data(), rgy.data());
    const std::string label =
        "loss=" + std::to_string(static_cast<int>(c.loss)) + " ignore=" +
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
    // Gradient bound (DESIGN.md section 5): 4 float32 ulps of the larger of the gradient's
    // terms, over the reduction's divisor. The terms are those of the smoothed target y'
    // (GradTermScales for BCE, FocalGradTermScale for focal); dl/dy, of the raw target, has the
    // BCE dl/dy terms times (1 - s). Ignored elements have gradients of exactly 0.
    // Measured worst (seed 17) in float32 ulps of the larger term: plain BCE, computed in float,
    // dl/dx 3.56 (3.11 without a divisor; x = 6.11, y = 1 over MEAN's 13500) and dl/dy 2.45;
    // label smoothing, computed in double and rounded once, 0.50 and 0.50; focal, in double,
    // 1.00 (0.50 ulp of the gradient itself, whose terms add). A gradient off by a relative
    // 1e-6, or 0 where the reference is not (e.g. at |x| > 14.5), fails.
    double div = c.red == Reduction::kMean ? n : c.red == Reduction::kPerSampleMean ? cols : 1;
    if (c.normalize) {
      int64_t kept = 0;
      for (int64_t i = 0; i < n; ++i) kept += !(c.ignore && y[i] == -100.0f);
      div *= kept;
    }
    const bool focal = c.loss == Loss::kFocal;
    for (int64_t i = 0; i < n; ++i) {
      const double yv = (c.ignore ? y : y_clean)[i];
      if (c.ignore && yv == -100.0) {
        ASSERT_EQ(gx[i], 0.0f) << label << " ignored i=" << i;
        if (!focal) ASSERT_EQ(gy[i], 0.0f) << label << " ignored i=" << i;
        continue;
      }
      const double xv = x[i], wv = w[i % cols], pv = p[i % cols];
      const double ys = c.smoothing != 0 ? yv * (1 - c.smoothing) + c.smoothing * 0.5 : yv;
      const auto [sx, sy] = lossd::testing::GradTermScales(xv, ys, wv, pv);
      const double scale_x =
          (focal ? FocalGradTermScale(xv, ys, wv, a.focal_alpha, a.focal_gamma) : sx) / div;
      // The larger term is at least half the gradient (at most three terms, two of one sign),
      // and for a hard label (no cancellation) at most the gradient: the bound is not loose.
      ASSERT_LE(std::fabs(rgx[i]), 2 * scale_x * (1 + 1e-12)) << label << " i=" << i;
      if (ys == 0 || ys == 1) ASSERT_GE(std::fabs(rgx[i]), scale_x * (1 - 1e-12)) << label;
      const double ulp_x = UlpF32(scale_x);
      worst_gx = std::max(worst_gx, std::fabs(gx[i] - rgx[i]) / ulp_x);
      ASSERT_LE(std::fabs(gx[i] - rgx[i]), 4 * ulp_x)
          << label << " grad i=" << i << " x=" << xv << " y'=" << ys << " got " << gx[i]
          << " want " << rgx[i] << " larger term " << scale_x;
      if (focal) continue;
      const double ulp_y = UlpF32(sy * (1 - c.smoothing) / div);
      worst_gy = std::max(worst_gy, std::fabs(gy[i] - rgy[i]) / ulp_y);
      ASSERT_LE(std::fabs(gy[i] - rgy[i]), 4 * ulp_y)
          << label << " dl/dy i=" << i << " x=" << xv << " y'=" << ys << " got " << gy[i]
          << " want " << rgy[i];
    }
  }
  RecordProperty("worst_grad_logits_ulp_of_term", std::to_string(worst_gx));
  RecordProperty("worst_grad_targets_ulp_of_term", std::to_string(worst_gy));
}

}  // namespace
}  // namespace lossd::kernels
