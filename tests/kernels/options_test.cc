// Paddle's ignore_index/normalize, Keras's label_smoothing and per-sample mean, and
// torchvision's sigmoid focal loss: reference against independent formulas, and the CPU
// backend against the reference.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kernels/src/bce_math.h"
#include "lossd/kernels/backend.h"
#include "lossd/kernels/bce.h"
#include "lossd/kernels/dtype.h"
#include "lossd/kernels/operand.h"
#include "lossd/kernels/reference.h"
#include "kernels/src/simd_block.h"
#include "tests/kernels/test_util.h"

namespace lossd::kernels {
namespace {

using internal::FocalElement;
using internal::FocalElementDirect;
using internal::FocalElementHard;
using internal::FocalElementLogSpace;
using lossd::testing::ScaledCount;
using lossd::testing::UlpDistance;
using lossd::testing::UlpF32;
using lossd::testing::UlpF64;

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

// The focal loss and dl/dx for a hard label (y = 0 or 1) in long double, by a closed form
// that shares no code with FocalElement: with z = x for y = 0 and -x for y = 1,
//   q = 1 - p_t = 1/(1+e^-z),  ce = max(z, 0) + log1p(e^-|z|),  loss = w alpha_t ce q^gamma,
//   dl/dx = (1-2y) w alpha_t q^gamma (q + gamma ce p_t),  p_t = 1/(1+e^z).
// No step cancels (NaiveFocal's 1 - p_t does for large |x|), so it serves for every x, 1e30 and
// the infinities included.
struct FocalLD {
  long double loss, gx;
};
FocalLD HardLabelFocal(double x, double y, double w, double alpha, double gamma) {
  using L = long double;
  const L z = y == 1 ? -static_cast<L>(x) : static_cast<L>(x);
  const L q = 1 / (1 + std::exp(-z)), pt = 1 / (1 + std::exp(z));
  const L ce = std::max(z, 0.0L) + std::log1p(std::exp(-std::fabs(z)));
  const L mod = gamma == 0 ? 1.0L : std::pow(q, static_cast<L>(gamma));
  const L at = alpha >= 0 ? (y == 1 ? alpha : 1.0L - alpha) : 1.0L;
  const L wat = static_cast<L>(w) * at;
  // The limit at z = +inf: ce = inf, pt = 0, and the gamma term tends to 0.
  const L gterm = std::isinf(ce) ? 0.0L : gamma * ce * pt;
  return {wat == 0 ? 0.0L : wat * ce * mod, (y == 1 ? -1 : 1) * wat * mod * (q + gterm)};
}

// The focal loss and dl/dx for a soft label y in (0, 1) in long double, by the direct form
// (written apart from FocalElement, which takes the same algebra in float64): with a = 1-y,
// b = y,
//   q = 1 - p_t = a s(x) + b s(-x),  ce = a sp(x) + b sp(-x),  loss = w alpha_t ce q^gamma,
//   dl/dx = w alpha_t [ (a s(x) - b s(-x)) q^gamma + gamma (a-b) s(x) s(-x) ce q^(gamma-1) ]
// (the derivative of ce q^gamma: ce' = a s(x) - b s(-x), q' = (a-b) s(x) s(-x)).
// q and ce are sums of non-negative terms and q >= min(a, b), so nothing cancels but the
// gradient's first two terms, whose difference long double holds to a few 2^-64 of the larger
// term (FocalGradTermScale); NaiveFocal's 1 - p_t and x - x y cancel where y is near 0 or 1.
// SoftLabelReferenceMatchesNaiveFormula checks it against NaiveFocal and its numeric
// derivative. Every finite x, 1e30 included; y in (0, 1).
FocalLD SoftLabelFocal(double x, double y, double w, double alpha, double gamma) {
  using L = long double;
  const L lx = x, a = 1 - static_cast<L>(y), b = y, g = gamma;
  const L s_pos = 1 / (1 + std::exp(-lx)), s_neg = 1 / (1 + std::exp(lx));  // s(x), s(-x)
  const L l = std::log1p(std::exp(-std::fabs(lx)));
  const L ce = a * (std::max(lx, 0.0L) + l) + b * (std::max(-lx, 0.0L) + l);
  const L q = a * s_pos + b * s_neg;
  const L mod = gamma == 0 ? 1.0L : std::pow(q, g);
  const L at = alpha >= 0 ? alpha * b + (1.0L - alpha) * a : 1.0L;
  const L wat = static_cast<L>(w) * at;
  const L dq = gamma == 0 ? 0.0L : g * (a - b) * s_pos * s_neg * ce * std::pow(q, g - 1);
  return {wat == 0 ? 0.0L : wat * ce * mod, wat * ((a * s_pos - b * s_neg) * mod + dq)};
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

// The draws and checks of the float64 focal accuracy tests: `n` draws of x uniform in
// [-40, 40] (a quarter in [-8, 8]) and now and then +-700, +-1e3, +-1e30 or +-1e-30, the target
// from draw_y(i, rng), w in [0, 1e3] with 0 and 1 among them, alpha 0.25, off (-1), 0 and 1,
// gamma 0, 0.5, 1, 2 and 3.7. FocalElement<double> against want_of(x, y, w, alpha, gamma) (long
// double): the loss within loss_bound ulps of its value, dl/dx within grad_bound ulps of its
// larger term (FocalGradTermScale). Records per gamma the worst errors of FocalElement and of
// FocalElementLogSpace on the same draws (the latter not checked).
template <typename DrawY, typename WantOf>
void CheckFocalAgainstLongDouble(int n, uint64_t seed, double loss_bound, double grad_bound,
                                 DrawY draw_y, WantOf want_of) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> ux(-40, 40), ux8(-8, 8), uw(0, 1e3);
  const double alphas[] = {0.25, -1.0, 0.0, 1.0};
  const double gammas[] = {0.0, 0.5, 1.0, 2.0, 3.7};
  const double far[] = {700, 1e3, 1e30, 1e-30};
  // Per gamma: the worst loss and dl/dx errors of FocalElement, then of FocalElementLogSpace.
  double worst[5][4] = {};
  for (int i = 0; i < n; ++i) {
    double x = i % 4 == 0 ? ux8(rng) : ux(rng);
    if (i % 512 == 7) x = far[(i / 512) % 4] * ((i / 2048) % 2 ? -1 : 1);
    const double y = draw_y(i, rng);
    const double w = i % 64 == 0 ? 0.0 : i % 8 == 1 ? 1.0 : uw(rng);
    const int k = static_cast<int>(rng() % 5);
    const double alpha = alphas[rng() % 4], gamma = gammas[k];
    const FocalLD want = want_of(x, y, w, alpha, gamma);
    const double scale = FocalGradTermScale(x, y, w, alpha, gamma);
    const double ulp_l = UlpF64(static_cast<double>(want.loss)), ulp_g = UlpF64(scale);
    double l, gx;
    FocalElement<double>(x, y, w, alpha, gamma, &l, &gx);
    const double el = static_cast<double>(std::fabs(l - want.loss)) / ulp_l;
    const double eg = static_cast<double>(std::fabs(gx - want.gx)) / ulp_g;
    worst[k][0] = std::max(worst[k][0], el);
    worst[k][1] = std::max(worst[k][1], eg);
    const std::string at = "x=" + ::testing::PrintToString(x) + " y=" +
                           ::testing::PrintToString(y) + " w=" + ::testing::PrintToString(w) +
                           " alpha=" + std::to_string(alpha) + " gamma=" + std::to_string(gamma);
    ASSERT_LE(el, loss_bound) << at << " loss " << l << " want "
                              << static_cast<double>(want.loss);
    ASSERT_LE(eg, grad_bound) << at << " dl/dx " << gx << " want "
                              << static_cast<double>(want.gx) << " larger term " << scale;
    FocalElementLogSpace<double>(x, y, w, alpha, gamma, &l, &gx);
    worst[k][2] = std::max(worst[k][2], static_cast<double>(std::fabs(l - want.loss)) / ulp_l);
    worst[k][3] = std::max(worst[k][3], static_cast<double>(std::fabs(gx - want.gx)) / ulp_g);
  }
  for (int k = 0; k < 5; ++k) {
    const std::string g = "_gamma" + ::testing::PrintToString(gammas[k]);
    ::testing::Test::RecordProperty("worst_loss_ulp" + g, std::to_string(worst[k][0]));
    ::testing::Test::RecordProperty("worst_grad_logits_ulp_of_term" + g,
                                    std::to_string(worst[k][1]));
    ::testing::Test::RecordProperty("log_space_worst_loss_ulp" + g, std::to_string(worst[k][2]));
    ::testing::Test::RecordProperty("log_space_worst_grad_logits_ulp_of_term" + g,
                                    std::to_string(worst[k][3]));
  }
}

// The hard-label form of FocalElement (y = 0 or 1) against the independent long double closed
// form, in float64 ulps: the loss in ulps of its value, dl/dx in ulps of the larger of its two
// terms (FocalGradTermScale; for a hard label the terms have one sign). 2^18 draws: x uniform
// in [-40, 40] (a quarter in [-8, 8]) and now and then +-700, +-1e3, +-1e30 or +-1e-30; w in
// [0, 1e3] with 0 and 1 among them; alpha 0.25, off (-1), 0 and 1; gamma 0, 0.5, 1, 2 and 3.7.
// Bounds 9 and 15 ulp. Measured worst (recorded per gamma): loss 6.8 ulp at gamma 2, dl/dx
// 13.1 ulp at gamma 1 (q^gamma is q or q * q there, with the rounding of q = 1/(1+e^-z) once
// per factor); 4.1 and 7.0 ulp for gamma 0.5 and 3.7 (a corrected exp); 2.4 and 2.9 for
// gamma 0. The log-space form (FocalElementLogSpace) on the same draws:
// up to 172 ulp and 374 ulp at gamma 3.7, growing with gamma |log q|; recorded, not checked.
TEST(FocalTest, HardLabelsMatchLongDouble) {
  CheckFocalAgainstLongDouble(
      static_cast<int>(ScaledCount(1 << 18)), 23, 9.0, 15.0,
      [](int, std::mt19937_64& rng) { return (rng() & 1) ? 1.0 : 0.0; },
      HardLabelFocal);
}

// x of the focal tests' draw i, a float: from ux, every 4th from ux8, every 512th far out
// (+-1e3, 1e30 or 1e-30).
double FocalX(int i, std::mt19937_64& rng, std::uniform_real_distribution<double>& ux,
              std::uniform_real_distribution<double>& ux8) {
  constexpr double kFar[] = {1e3, 1e30, 1e-30};
  double xd = i % 4 == 0 ? ux8(rng) : ux(rng);
  if (i % 512 == 7) xd = kFar[(i / 512) % 3] * ((i / 1536) % 2 ? -1 : 1);
  return static_cast<float>(xd);
}

// The draws and checks of the float32 focal rounding tests: 2^18 draws from `seed` of x
// (FocalX), the target from draw_y(i, rng), w a float in [0, 1e3] with 0 and 1 among them,
// alpha 0.25, off (-1), 0 and 1, gamma 0, 0.5, 1, 2 and 3.7. FocalElement<double> rounded to
// float against want_of(x, y, w, alpha, gamma) (long double): the loss within 1 float32 ulp of
// its value, dl/dx within 1 float32 ulp of grad_ulp_at(want dl/dx, its larger term
// (FocalGradTermScale)). Records the worst errors.
template <typename DrawY, typename WantOf, typename GradUlpAt>
void CheckFocalRoundedToFloat(uint64_t seed, DrawY draw_y, WantOf want_of,
                              GradUlpAt grad_ulp_at) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> ux(-40, 40), ux8(-8, 8), uw(0, 1e3);
  const double alphas[] = {0.25, -1.0, 0.0, 1.0};
  const double gammas[] = {0.0, 0.5, 1.0, 2.0, 3.7};
  double worst_loss = 0, worst_gx = 0;
  const int draws = static_cast<int>(ScaledCount(1 << 18));
  for (int i = 0; i < draws; ++i) {
    const double x = FocalX(i, rng, ux, ux8);
    const double y = draw_y(i, rng);
    const double w = static_cast<float>(i % 64 == 0 ? 0.0 : i % 8 == 1 ? 1.0 : uw(rng));
    const double alpha = alphas[rng() % 4], gamma = gammas[rng() % 5];
    const FocalLD want = want_of(x, y, w, alpha, gamma);
    const double scale = FocalGradTermScale(x, y, w, alpha, gamma);
    const double want_gx = static_cast<double>(want.gx);
    double l, gx;
    FocalElement<double>(x, y, w, alpha, gamma, &l, &gx);
    const float lf = static_cast<float>(l), gf = static_cast<float>(gx);
    const double el = static_cast<double>(std::fabs(lf - want.loss)) /
                      UlpF32(static_cast<double>(want.loss));
    const double eg =
        static_cast<double>(std::fabs(gf - want.gx)) / UlpF32(grad_ulp_at(want_gx, scale));
    worst_loss = std::max(worst_loss, el);
    worst_gx = std::max(worst_gx, eg);
    ASSERT_LE(el, 1.0) << "x=" << x << " y=" << y << " w=" << w << " gamma=" << gamma
                       << " loss " << lf << " want " << static_cast<double>(want.loss);
    ASSERT_LE(eg, 1.0) << "x=" << x << " y=" << y << " w=" << w << " gamma=" << gamma
                       << " dl/dx " << gf << " want " << want_gx << " larger term " << scale;
  }
  ::testing::Test::RecordProperty("worst_loss_ulp_f32", std::to_string(worst_loss));
  ::testing::Test::RecordProperty("worst_grad_logits_ulp_f32", std::to_string(worst_gx));
}

// Equal bit for bit, or both NaN.
bool SameBits(double a, double b) {
  return std::memcmp(&a, &b, sizeof(double)) == 0 || (std::isnan(a) && std::isnan(b));
}

// The checks of the focal special-value tests that do not depend on the label: a NaN x, y or w
// gives a NaN loss l and dl/dx g, and otherwise w = 0 gives +0 for both. False where neither
// applies.
bool ExpectNaNOrZeroWeight(double x, double y, double w, double l, double g,
                           const std::string& where) {
  if (std::isnan(x) || std::isnan(y) || std::isnan(w)) {
    EXPECT_TRUE(std::isnan(l) && std::isnan(g)) << where;
    return true;
  }
  if (w == 0) {
    EXPECT_FALSE(std::signbit(l) || std::signbit(g)) << where;  // +0
    EXPECT_EQ(l, 0.0) << where;
    EXPECT_EQ(g, 0.0) << where;
    return true;
  }
  return false;
}

// The backends evaluate the focal loss in double for every dtype and round once: for float
// inputs and hard labels, the float32 loss and dl/dx are within 1 float32 ulp of the exact
// value (the double error is far below the final rounding; the gradient's terms have one sign).
TEST(FocalTest, HardLabelsRoundedToFloatWithinOneUlp) {
  CheckFocalRoundedToFloat(
      29, [](int, std::mt19937_64& rng) { return (rng() & 1) ? 1.0 : 0.0; }, HardLabelFocal,
      [](double want_gx, double) { return want_gx; });
}

// Special values on the hard-label form give exactly what the log-space form gives, bit for
// bit (the sign of zero included): NaN inputs, infinite logits and logits beyond the range of
// exp(-|x|) (the limits), w = 0 (+0), alpha_t = 0 (0 loss), and gamma < 1 or up to 1e4. Where
// q = 1 - p_t is tiny but not 0, gamma < 1 gives finite values within the float64 bound.
TEST(FocalTest, HardLabelSpecialValuesMatchLogSpace) {
  const double inf = std::numeric_limits<double>::infinity(), nan = std::nan("");
  const double gammas[] = {0.0, 0.25, 0.5, 0.99, 1.0, 2.0, 3.7, 1e4};
  const double alphas[] = {0.25, -1.0, 0.0, 1.0};
  int compared = 0;
  for (double x : {inf, -inf, nan, 1e30, -1e30, 1e3, -1e3, 800.0, -800.0, 30.0, -3.0, 0.0,
                   -0.0, 1e-30}) {
    for (double y : {0.0, 1.0, nan}) {
      for (double w : {0.0, 1.0, 2.5, nan}) {
        for (double alpha : alphas) {
          for (double gamma : gammas) {
            const double at = alpha < 0 ? 1 : y == 1 ? alpha : 1 - alpha;
            // Bitwise where the result does not depend on rounding: exp(-|x|) = 0 or NaN
            // inputs or w = 0, or a loss of 0 from alpha_t = 0 (dl/dx is then a signed 0).
            const bool exact = !(std::fabs(x) < 746) || std::isnan(y) || !(w != 0) || at == 0;
            if (!exact) continue;
            double l0, g0, l1, g1;
            FocalElementLogSpace<double>(x, y, w, alpha, gamma, &l0, &g0);
            FocalElement<double>(x, y, w, alpha, gamma, &l1, &g1);
            const std::string where = "x=" + ::testing::PrintToString(x) + " y=" +
                                      std::to_string(y) + " w=" + std::to_string(w) +
                                      " alpha=" + std::to_string(alpha) +
                                      " gamma=" + std::to_string(gamma);
            EXPECT_TRUE(SameBits(l1, l0)) << where << " loss " << l1 << " log space " << l0;
            EXPECT_TRUE(SameBits(g1, g0)) << where << " dl/dx " << g1 << " log space " << g0;
            if (!ExpectNaNOrZeroWeight(x, y, w, l1, g1, where)) {
              EXPECT_FALSE(std::isnan(l1) || std::isnan(g1)) << where;
              EXPECT_TRUE(std::isfinite(g1)) << where;  // |dl/dx| <= w alpha_t
            }
            ++compared;
          }
        }
      }
    }
  }
  EXPECT_GT(compared, 1000);
  // The limits themselves (FocalInfiniteLogitsGiveLimits checks more through the backends):
  // right and confident -> 0, wrong and confident -> loss +inf, dl/dx -> (1-2y) w alpha_t.
  double l, gx;
  FocalElement<double>(inf, 1.0, 2.0, 0.25, 0.5, &l, &gx);
  EXPECT_EQ(l, 0.0);
  EXPECT_EQ(gx, 0.0);
  FocalElement<double>(-inf, 1.0, 2.0, 0.25, 0.5, &l, &gx);
  EXPECT_EQ(l, inf);
  EXPECT_EQ(gx, -0.5);
  FocalElement<double>(inf, 0.0, 2.0, -1.0, 1e4, &l, &gx);
  EXPECT_EQ(l, inf);
  EXPECT_EQ(gx, 2.0);
  // gamma < 1 where q = 1 - p_t is small but not 0: q^(gamma-1) is large, yet dl/dx is finite
  // and accurate (no q^(gamma-1) is formed).
  for (double gamma : {0.25, 0.5, 0.99}) {
    for (double ax : {30.0, 100.0, 300.0, 700.0}) {
      for (double y : {0.0, 1.0}) {
        const double x = y == 1 ? ax : -ax;  // the right side: q = s(-|x|)
        FocalElement<double>(x, y, 3.0, 0.25, gamma, &l, &gx);
        const FocalLD want = HardLabelFocal(x, y, 3.0, 0.25, gamma);
        const double scale = FocalGradTermScale(x, y, 3.0, 0.25, gamma);
        ASSERT_TRUE(std::isfinite(l) && std::isfinite(gx)) << "x=" << x << " gamma=" << gamma;
        EXPECT_LE(static_cast<double>(std::fabs(l - want.loss)),
                  9 * UlpF64(static_cast<double>(want.loss)))
            << "x=" << x << " y=" << y << " gamma=" << gamma;
        EXPECT_LE(static_cast<double>(std::fabs(gx - want.gx)), 15 * UlpF64(scale))
            << "x=" << x << " y=" << y << " gamma=" << gamma;
      }
    }
  }
}

// The soft-label reference (SoftLabelFocal) against NaiveFocal and a numeric derivative of it,
// where NaiveFocal is accurate (x in [-8, 8], y in [0.01, 0.99]: its cancellations lose at
// most 7 of long double's 64 bits): the loss within 1e-15 relative, dl/dx within 1e-9 of the
// gradient's larger term (a five-point central difference, h = 2^-10: truncation about
// h^4 / 30 of the fifth derivative). A wrong derivative formula is off by O(1) of that term.
TEST(FocalTest, SoftLabelReferenceMatchesNaiveFormula) {
  std::mt19937_64 rng(31);
  std::uniform_real_distribution<double> ux(-8, 8), uy(0.01, 0.99);
  const double alphas[] = {0.25, -1.0, 0.0, 1.0};
  const double gammas[] = {0.0, 0.5, 1.0, 2.0, 3.7};
  for (int i = 0; i < 4000; ++i) {
    const double x = ux(rng), y = uy(rng), alpha = alphas[rng() % 4], gamma = gammas[i % 5];
    const FocalLD want = SoftLabelFocal(x, y, 1.0, alpha, gamma);
    const long double naive = NaiveFocal(x, y, alpha, gamma);
    const std::string at = "x=" + ::testing::PrintToString(x) + " y=" +
                           ::testing::PrintToString(y) + " alpha=" + std::to_string(alpha) +
                           " gamma=" + std::to_string(gamma);
    ASSERT_LE(std::fabs(static_cast<double>(want.loss - naive)),
              1e-15 * std::fabs(static_cast<double>(naive)))
        << at;
    const long double h = 1.0L / 1024;
    auto f = [&](long double dx) { return NaiveFocal(x + dx, y, alpha, gamma); };
    const long double num = (f(-2 * h) - 8 * f(-h) + 8 * f(h) - f(2 * h)) / (12 * h);
    ASSERT_LE(std::fabs(static_cast<double>(want.gx - num)),
              1e-9 * FocalGradTermScale(x, y, 1.0, alpha, gamma))
        << at << " dl/dx " << static_cast<double>(want.gx) << " numeric "
        << static_cast<double>(num);
  }
}

// Soft labels (0 < y < 1) on FocalElement's direct form against the long double direct form
// (SoftLabelFocal), in float64 ulps: the loss in ulps of its value, dl/dx in ulps of the larger
// of its three terms (FocalGradTermScale: the first two cancel for a soft label). 2^19 draws:
// x as in HardLabelsMatchLongDouble (uniform in [-40, 40], a quarter in [-8, 8], now and then
// +-700, +-1e3, +-1e30 or +-1e-30); y uniform in (0, 1), one draw in four instead from 1e-6,
// 1 - 1e-6, 1e-12, 1 - 1e-12, 1e-30 and 0.5; w in [0, 1e3] with 0 and 1 among them; alpha
// 0.25, off (-1), 0 and 1; gamma 0, 0.5, 1, 2 and 3.7. Bounds 12 and 18 ulp (the hard-label
// ones are 9 and 15: q = N / (1+e) takes one or two roundings more). Measured worst (recorded
// per gamma): loss 8.3 ulp at gamma 2 and 9.3 at gamma 3.7, dl/dx 13.4 ulp at gamma 1 and 14.8
// at gamma 3.7; 4.6 and 7.0 at gamma 0.5, 4.5 and 4.7 at gamma 0 (over 2^23 draws: 10.2 and
// 15.4). The log-space form (FocalElementLogSpace) on the same draws: 84 and 172 ulp at gamma
// 2, 223 and 309 at gamma 3.7, growing with gamma |log q|; recorded, not checked.
TEST(FocalTest, SoftLabelsMatchLongDouble) {
  const double edge_y[] = {1e-6, 1 - 1e-6, 1e-12, 1 - 1e-12, 1e-30, 0.5};
  CheckFocalAgainstLongDouble(
      static_cast<int>(ScaledCount(1 << 19)), 37, 12.0, 18.0,
      [&edge_y](int i, std::mt19937_64& rng) {
        double y = std::uniform_real_distribution<double>(0, 1)(rng);
        if (i % 4 == 1) y = edge_y[rng() % 6];
        return y == 0 ? 0.25 : y;
      },
      SoftLabelFocal);
}

// The backends evaluate the focal loss in double for every dtype and round once: for float
// inputs and soft labels (the draws of SoftLabelsMatchLongDouble rounded to float), the
// float32 loss is within 1 float32 ulp of the exact value, and so is dl/dx wherever it is at
// least 2^-20 of its larger term; below that (the two terms of dl/dx nearly cancel) it is
// within 1 float32 ulp of that term (docs/design.md section 4), as the float64 error of up to 15
// ulp of the term is then no longer far below the final rounding.
TEST(FocalTest, SoftLabelsRoundedToFloatWithinOneUlp) {
  std::uniform_real_distribution<double> uy(0, 1);
  const double edge_y[] = {1e-6, 1 - 1e-6, 1e-12, 1e-30, 0.5};
  CheckFocalRoundedToFloat(
      41,
      [&](int i, std::mt19937_64& rng) {
        const double y = static_cast<float>(i % 4 == 1 ? edge_y[rng() % 5] : uy(rng));
        return y == 0 || y == 1 ? 0.25 : y;
      },
      SoftLabelFocal,
      [](double want_gx, double scale) {
        return std::fabs(want_gx) >= 0x1p-20 * scale ? want_gx : scale;
      });
}

// Special values with soft labels: bitwise what the log-space form gives (the sign of zero
// included) where the result does not depend on rounding: NaN inputs, infinite logits (the
// limits), w = 0 (+0), alpha_t = 0 (alpha 1.5 at y = 0.25, which requests cannot ask for: a
// loss of 0 and a signed 0 gradient), and targets below 4 times the smallest normal double
// (they take the log-space form). Elsewhere (|x| up to 1e30, gamma up to 1e4) no NaN, a
// finite gradient, and the log-space values within 1e-11 of the loss and of the gradient's
// larger term. Where q = 1 - p_t is about y or 1-y (y or 1-y tiny, x on the right side),
// gamma < 1 gives finite values, within the float64 bounds where they and y are normal: no
// q^(gamma-1) is formed.
TEST(FocalTest, SoftLabelSpecialValuesMatchLogSpace) {
  const double inf = std::numeric_limits<double>::infinity(), nan = std::nan("");
  const double gammas[] = {0.0, 0.25, 0.5, 0.99, 1.0, 2.0, 3.7, 1e4};
  const double alphas[] = {0.25, -1.0, 0.0, 1.0, 1.5};
  int bitwise = 0, close = 0;
  for (double x : {inf, -inf, nan, 1e30, -1e30, 1e3, -1e3, 800.0, -800.0, 30.0, -3.0, 0.0,
                   -0.0, 1e-30}) {
    for (double y : {0.25, 0.5, 0.75, 1e-6, 1 - 1e-6, 1e-12, 1e-300, 1e-310, 5e-324, nan}) {
      for (double w : {0.0, 1.0, 2.5, nan}) {
        for (double alpha : alphas) {
          for (double gamma : gammas) {
            const double at = alpha < 0 ? 1 : alpha * y + (1 - alpha) * (1 - y);
            const std::string where = "x=" + ::testing::PrintToString(x) + " y=" +
                                      ::testing::PrintToString(y) + " w=" + std::to_string(w) +
                                      " alpha=" + std::to_string(alpha) +
                                      " gamma=" + std::to_string(gamma);
            double l0, g0, l1, g1;
            FocalElementLogSpace<double>(x, y, w, alpha, gamma, &l0, &g0);
            FocalElement<double>(x, y, w, alpha, gamma, &l1, &g1);
            const bool exact = !(std::fabs(x) < inf) || std::isnan(y) || y < 1e-307 ||
                               std::isnan(w) || w == 0 || at == 0;
            if (exact) {
              EXPECT_TRUE(SameBits(l1, l0)) << where << " loss " << l1 << " log space " << l0;
              EXPECT_TRUE(SameBits(g1, g0)) << where << " dl/dx " << g1 << " log space " << g0;
              ++bitwise;
            } else {
              ASSERT_FALSE(std::isnan(l1) || std::isnan(g1)) << where;
              EXPECT_TRUE(std::isfinite(g1)) << where;  // |dl/dx| <= w alpha_t (1 + gamma)
              EXPECT_EQ(std::isinf(l1), std::isinf(l0)) << where;
              EXPECT_LE(std::fabs(l1 - l0), 1e-11 * std::fabs(l0)) << where;
              EXPECT_LE(std::fabs(g1 - g0), 1e-11 * FocalGradTermScale(x, y, w, alpha, gamma))
                  << where << " dl/dx " << g1 << " log space " << g0;
              ++close;
            }
            if (!ExpectNaNOrZeroWeight(x, y, w, l1, g1, where) && at == 0) {
              EXPECT_EQ(l1, 0.0) << where;
              EXPECT_EQ(g1, 0.0) << where;
            }
          }
        }
      }
    }
  }
  EXPECT_GT(bitwise, 10000);
  EXPECT_GT(close, 5000);
  // Soft labels at infinite logits: the limits, loss +inf (ce grows like |x|), and dl/dx ->
  // w alpha_t (1-y)^(1+gamma) for x -> +inf (q -> 1-y), -w alpha_t y^(1+gamma) for x -> -inf.
  double l, gx;
  FocalElement<double>(inf, 0.25, 2.0, -1.0, 2.0, &l, &gx);
  EXPECT_EQ(l, inf);
  EXPECT_DOUBLE_EQ(gx, 2.0 * 0.75 * 0.75 * 0.75);
  FocalElement<double>(-inf, 0.25, 2.0, -1.0, 2.0, &l, &gx);
  EXPECT_EQ(l, inf);
  EXPECT_DOUBLE_EQ(gx, -2.0 * 0.25 * 0.25 * 0.25);
  // gamma < 1 where q = 1 - p_t is about min(y, 1-y), tiny: finite, and within the float64
  // bounds of SoftLabelsMatchLongDouble where the values are normal.
  for (double gamma : {0.25, 0.5, 0.99}) {
    for (double ax : {30.0, 100.0, 300.0, 700.0, 1e30}) {
      for (double y : {1e-12, 1 - 1e-12, 1e-30, 1e-300, 1e-310}) {
        const double x = y > 0.5 ? ax : -ax;  // the right side: q = y s(x) + (1-y) s(-x)
        FocalElement<double>(x, y, 3.0, 0.25, gamma, &l, &gx);
        const std::string where = "x=" + ::testing::PrintToString(x) + " y=" +
                                  ::testing::PrintToString(y) + " gamma=" +
                                  std::to_string(gamma);
        ASSERT_TRUE(std::isfinite(l) && std::isfinite(gx)) << where;
        const FocalLD want = SoftLabelFocal(x, y, 3.0, 0.25, gamma);
        const double scale = FocalGradTermScale(x, y, 3.0, 0.25, gamma);
        if (y < 1e-307) continue;  // the log-space form, finite
        if (std::fabs(static_cast<double>(want.loss)) >= 0x1p-1000) {
          EXPECT_LE(static_cast<double>(std::fabs(l - want.loss)),
                    12 * UlpF64(static_cast<double>(want.loss)))
              << where;
        }
        if (scale >= 0x1p-1000) {
          EXPECT_LE(static_cast<double>(std::fabs(gx - want.gx)), 18 * UlpF64(scale))
              << where;
        }
      }
    }
  }
}

// The direct form (FocalElementDirect, what the CUDA kernels run for every target) gives, for
// hard labels, the bits of FocalElementHard (what the host runs for them, and what
// HardLabels* measure): 2^20 draws of x over every scale (subnormal to 1e3, and beyond the
// range of exp(-|x|)), w 0, 1 or in [0, 1e3], alpha 0.25, off, 0, 1 and 0.75, gamma 0, 0.25,
// 0.5, 0.99, 1, 2, 3.7 and 1e4; the sign of zero included.
TEST(FocalTest, DirectFormGivesHardLabelFormBits) {
  std::mt19937_64 rng(43);
  std::uniform_real_distribution<double> u(-1, 1), uw(0, 1e3);
  const double gammas[] = {0.0, 0.25, 0.5, 0.99, 1.0, 2.0, 3.7, 1e4};
  const double alphas[] = {0.25, -1.0, 0.0, 1.0, 0.75};
  int differ = 0;
  for (int i = 0; i < (1 << 20); ++i) {
    const int k = i % 5;
    const double x = k == 0   ? 8 * u(rng)
                     : k == 1 ? 40 * u(rng)
                     : k == 2 ? 760 * u(rng)
                     : k == 3 ? std::ldexp(u(rng), static_cast<int>(rng() % 1100) - 1074)
                              : 1e3 * u(rng);
    const double y = (rng() & 1) ? 1.0 : 0.0;
    const double w = i % 7 == 0 ? 0.0 : i % 3 == 0 ? 1.0 : uw(rng);
    const double alpha = alphas[rng() % 5], gamma = gammas[rng() % 8];
    double l0, g0, l1, g1;
    FocalElementHard<double>(x, y, w, alpha, gamma, &l0, &g0);
    FocalElementDirect<double>(x, y, w, alpha, gamma, &l1, &g1);
    if (std::memcmp(&l0, &l1, sizeof(double)) != 0 || std::memcmp(&g0, &g1, sizeof(double)) != 0) {
      ADD_FAILURE() << "x=" << ::testing::PrintToString(x) << " y=" << y << " w=" << w
                    << " alpha=" << alpha << " gamma=" << gamma << ": loss " << l1 << " vs "
                    << l0 << ", dl/dx " << g1 << " vs " << g0;
      if (++differ == 10) return;
    }
  }
}

// Inputs for the SIMD focal block: x over the float range's interesting parts (moderate,
// saturating, beyond exp's underflow, tiny, float-rounded), hard, soft, near-hard and
// float-rounded targets, weights in [0, 1e3] with zeros; and about 2% special lanes (NaN and
// infinite logits, NaN, negative, above-1 and tiny targets, NaN and infinite weights), which
// FocalElement leaves to its log-space form.
struct FocalDraws {
  std::vector<double> x, y, w;
};
FocalDraws DrawFocalInputs(int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(-1, 1), u01(0, 1), uw(0, 1e3);
  FocalDraws d;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    const int kx = static_cast<int>(rng() % 8), ky = static_cast<int>(rng() % 10);
    double x = kx < 2   ? 8 * u(rng)
               : kx < 4 ? 40 * u(rng)
               : kx == 4 ? 800 * u(rng)
               : kx == 5 ? std::ldexp(u(rng), -static_cast<int>(rng() % 120))
                         : static_cast<float>(20 * u(rng));
    double y = ky < 4    ? static_cast<double>(rng() & 1)
               : ky < 8  ? u01(rng)
               : ky == 8 ? ((rng() & 1) ? 1e-12 * u01(rng) : 1 - 1e-12 * u01(rng))
                         : static_cast<float>(u01(rng));
    double w = rng() % 20 == 0 ? 0.0 : uw(rng);
    if (rng() % 50 == 0) {
      switch (rng() % 9) {
        case 0: x = nan; break;
        case 1: x = inf; break;
        case 2: x = -inf; break;
        case 3: y = nan; break;
        case 4: y = -100; break;
        case 5: y = 1.5; break;
        case 6: y = 1e-310; break;
        case 7: w = nan; break;
        default: w = inf; break;
      }
    }
    d.x.push_back(x);
    d.y.push_back(y);
    d.w.push_back(w);
  }
  return d;
}

// The SIMD focal block's arguments over all of `d` (w absent unless `weighted`), writing the
// loss to l and dl/dx to g (each as long as d), with the default alpha, gamma and divisor.
internal::FocalBlockArgs BlockArgs(const FocalDraws& d, bool weighted, std::vector<double>& l,
                                   std::vector<double>& g) {
  internal::FocalBlockArgs a;
  a.x = d.x.data();
  a.y = d.y.data();
  a.w = weighted ? d.w.data() : nullptr;
  a.n = static_cast<int64_t>(d.x.size());
  a.loss = l.data();
  a.gx = g.data();
  return a;
}

// The SIMD focal block (double lanes, Highway's exp and log1p) against the scalar
// FocalElement, the reference's math: on ordinary lanes the loss within 32 double ulps
// (relative) and dl/dx within 32 double ulps of its larger term (FocalGradTermScale), so float
// results within one float ulp of the reference's rounding; on special lanes the same bits
// (they are the scalar form's). With and without weights, with a gradient divisor.
// Measured worst (AVX3 here, 2^17 + 3 draws per case): loss 5.5 and dl/dx 9.5 double ulps, no
// float loss off the reference's rounding.
TEST(FocalBlockTest, MatchesFocalElement) {
  const int64_t n = ScaledCount(1 << 17) + 3;
  const FocalDraws d = DrawFocalInputs(n, 71);
  const double eps = std::numeric_limits<double>::epsilon();
  double worst_l = 0, worst_g = 0;
  int64_t float_off = 0;
  for (double gamma : {0.0, 1.0, 2.0}) {
    for (double alpha : {0.25, -1.0, 0.0}) {
      for (bool weighted : {true, false}) {
        const double div = weighted ? 3.0 : 1.0;
        std::vector<double> l(n), g(n);
        internal::FocalBlockArgs a = BlockArgs(d, weighted, l, g);
        a.alpha = alpha;
        a.gamma = gamma;
        a.grad_divisor = div;
        internal::FocalBlock(a);
        for (int64_t i = 0; i < n; ++i) {
          const double x = d.x[i], y = d.y[i], w = weighted ? d.w[i] : 1.0;
          double rl, rg;
          FocalElement<double>(x, y, w, alpha, gamma, &rl, &rg);
          rg /= div;
          const std::string at = "x=" + ::testing::PrintToString(x) + " y=" +
                                 ::testing::PrintToString(y) + " w=" + std::to_string(w) +
                                 " alpha=" + std::to_string(alpha) +
                                 " gamma=" + std::to_string(gamma);
          const bool special = !(y >= 0 && y <= 1) || !std::isfinite(x) || std::isnan(w) ||
                               std::isinf(w) || std::fabs(y - 0x1p-1021) < 0x1p-1021;
          if (special) {
            ASSERT_TRUE(SameBits(l[i], rl) && SameBits(g[i], rg))
                << at << ": loss " << l[i] << " vs " << rl << ", dl/dx " << g[i] << " vs "
                << rg;
            continue;
          }
          const double el = std::fabs(l[i] - rl) / (eps * std::fabs(rl) + 1e-300);
          const double scale = FocalGradTermScale(x, y, w, alpha, gamma) / div;
          const double eg = std::fabs(g[i] - rg) / (eps * scale + 1e-300);
          worst_l = std::max(worst_l, el);
          worst_g = std::max(worst_g, eg);
          ASSERT_LE(el, 32) << at << ": loss " << l[i] << " vs " << rl;
          ASSERT_LE(eg, 32) << at << ": dl/dx " << g[i] << " vs " << rg << ", larger term "
                            << scale;
          ASSERT_LE(UlpDistance(static_cast<float>(l[i]), static_cast<float>(rl)), 1) << at;
          float_off += static_cast<float>(l[i]) != static_cast<float>(rl);
        }
      }
    }
  }
  RecordProperty("worst_loss_f64_ulps", std::to_string(worst_l));
  RecordProperty("worst_grad_f64_ulps_of_term", std::to_string(worst_g));
  RecordProperty("float_losses_one_ulp_off", std::to_string(float_off));
}

// An element's results are the same bits wherever it stands in the run and however long the
// run is (the last partial vector is padded, not left to a scalar loop), so reductions do not
// depend on how a request is split.
TEST(FocalBlockTest, ResultDependsOnlyOnTheElement) {
  const int64_t n = 1000;
  const FocalDraws d = DrawFocalInputs(n, 5);
  for (bool weighted : {true, false}) {
    std::vector<double> l(n), g(n);
    const internal::FocalBlockArgs a = BlockArgs(d, weighted, l, g);
    internal::FocalBlock(a);
    for (int64_t off : {0, 1, 2, 3, 5, 8, 13, 101}) {
      for (int64_t len : {1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 31, 64, 65}) {
        // Copies one element further into their buffers, so the loads are unaligned too.
        std::vector<double> x(len + 1), y(len + 1), w(len + 1), l2(len + 1), g2(len + 1);
        std::copy_n(d.x.begin() + off, len, x.begin() + 1);
        std::copy_n(d.y.begin() + off, len, y.begin() + 1);
        std::copy_n(d.w.begin() + off, len, w.begin() + 1);
        internal::FocalBlockArgs b = a;
        b.x = x.data() + 1;
        b.y = y.data() + 1;
        b.w = weighted ? w.data() + 1 : nullptr;
        b.n = len;
        b.loss = l2.data() + 1;
        b.gx = (len % 2 == 0) ? g2.data() + 1 : nullptr;  // dl/dx is optional
        internal::FocalBlock(b);
        for (int64_t j = 0; j < len; ++j) {
          ASSERT_TRUE(SameBits(l2[j + 1], l[off + j])) << "offset " << off << " length " << len;
          if (b.gx) ASSERT_TRUE(SameBits(g2[j + 1], g[off + j])) << "offset " << off;
        }
      }
    }
  }
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
  // At least 3 blocks under LOSSD_TEST_SCALE.
  const int64_t rows = ScaledCount(1500, 700), cols = 9, n = rows * cols;
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
  // Focal loss with gamma 1.5 takes the scalar FocalElement, with gamma 2 the SIMD block.
  struct Case {
    Loss loss;
    bool ignore, normalize;
    double smoothing;
    Reduction red;
    double gamma;
  };
  std::vector<Case> cases;
  for (Loss loss : {Loss::kBce, Loss::kFocal})
    for (double gamma : {1.5, 2.0})
      for (bool ignore : {false, true})
        for (bool normalize : {false, true})
          for (double sm : {0.0, 0.1})
            for (Reduction red : {Reduction::kNone, Reduction::kSum, Reduction::kMean,
                                  Reduction::kPerSampleMean}) {
              if (loss == Loss::kBce && gamma != 1.5) continue;
              cases.push_back({loss, ignore, normalize, sm, red, gamma});
            }
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
    a.focal_gamma = c.gamma;
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
        " gamma=" + std::to_string(c.gamma) +
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
    // Gradient bound (docs/design.md section 4): 4 float32 ulps of the larger of the gradient's
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
