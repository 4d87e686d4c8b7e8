// ResolveLoss (kernels/src/resolved_loss.h): the compute type rule, the element options with
// the smoothing coefficients, and the divisors, against hand-computed values.
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "kernels/src/divisors.h"
#include "lossd/kernels/bce.h"
#include "lossd/kernels/dtype.h"
#include "kernels/src/resolved_loss.h"

namespace lossd::kernels {
namespace {

using internal::ResolveLoss;

TEST(ResolveLossTest, ComputeTypeIsDoubleForFloat64InputsSmoothingAndFocal) {
  const std::vector<float> f(4, 0.5f);
  const std::vector<double> d(4, 0.5);
  BceArgs a;
  a.numel = 4;
  a.logits = f.data();
  a.targets = f.data();
  EXPECT_FALSE(ResolveLoss(a).wide);
  a.dtype = DType::kFloat16;
  EXPECT_FALSE(ResolveLoss(a).wide);

  BceArgs b = a;
  b.dtype = DType::kFloat64;
  b.logits = d.data();
  EXPECT_TRUE(ResolveLoss(b).wide);
  b = a;
  b.targets_dtype = DType::kFloat64;
  b.targets = d.data();
  EXPECT_TRUE(ResolveLoss(b).wide);
  b = a;
  b.weight = {DType::kFloat64, d.data(), 1, 4};
  EXPECT_TRUE(ResolveLoss(b).wide);
  b = a;
  b.pos_weight = {DType::kFloat64, d.data(), 1, 4};
  EXPECT_TRUE(ResolveLoss(b).wide);
  // An absent operand's dtype does not count.
  b = a;
  b.weight.dtype = DType::kFloat64;
  EXPECT_FALSE(ResolveLoss(b).wide);
  b = a;
  b.label_smoothing = 0.1;
  EXPECT_TRUE(ResolveLoss(b).wide);
  b = a;
  b.loss = Loss::kFocal;
  EXPECT_TRUE(ResolveLoss(b).wide);
}

TEST(ResolveLossTest, ElementOptionsAndSmoothingCoefficients) {
  BceArgs a;
  a.has_ignore_index = true;
  a.ignore_index = 3.0;
  a.label_smoothing = 0.1;
  a.loss = Loss::kFocal;
  a.focal_alpha = -1.0;
  a.focal_gamma = 3.5;
  const internal::ResolvedLoss r = ResolveLoss(a);
  EXPECT_EQ(r.loss, Loss::kFocal);
  EXPECT_TRUE(r.smooth);
  EXPECT_TRUE(r.element.focal);
  EXPECT_TRUE(r.element.has_ignore_index);
  EXPECT_EQ(r.element.ignore_index, 3.0);
  EXPECT_EQ(r.element.smoothing, 0.1);
  EXPECT_EQ(r.element.smooth_keep, 0.9);  // 1 - 0.1 rounds to the double nearest 0.9
  EXPECT_EQ(r.element.smooth_half, 0.05);  // 0.1 * 0.5 is exact: the double nearest 0.05
  EXPECT_EQ(r.element.alpha, -1.0);
  EXPECT_EQ(r.element.gamma, 3.5);

  const internal::ResolvedLoss plain = ResolveLoss(BceArgs());
  EXPECT_FALSE(plain.smooth);
  EXPECT_FALSE(plain.element.focal);
  EXPECT_FALSE(plain.element.has_ignore_index);
  EXPECT_EQ(plain.element.smoothing, 0.0);
  EXPECT_EQ(plain.element.smooth_keep, 1.0);
  EXPECT_EQ(plain.element.smooth_half, 0.0);
  EXPECT_EQ(plain.element.alpha, 0.25);
  EXPECT_EQ(plain.element.gamma, 2.0);
}

TEST(ResolveLossTest, Divisors) {
  BceArgs a;
  a.numel = 12;
  a.reduction = Reduction::kMean;
  internal::Divisors d = ResolveLoss(a).divisors.For(0);
  EXPECT_EQ(d.count, 1.0);
  EXPECT_EQ(d.mean_n, 12.0);
  EXPECT_EQ(d.grad_div, 12.0);

  // normalize with ignore_index: 12 - 5 kept; MEAN's gradients divide by 7 * 12.
  a.normalize = true;
  a.has_ignore_index = true;
  internal::ResolvedLoss r = ResolveLoss(a);
  EXPECT_TRUE(r.divisors.CountsIgnored());
  d = r.divisors.For(5);
  EXPECT_EQ(d.count, 7.0);
  EXPECT_EQ(d.grad_div, 84.0);
  EXPECT_EQ(r.divisors.KeptDivisor(5), 7);
  EXPECT_EQ(r.divisors.KeptDivisor(12), 1);  // nothing kept: at least 1
  EXPECT_EQ(r.divisors.For(12).count, 1.0);

  // A part of a larger evaluation: the whole's counts.
  a.whole_numel = 100;
  a.whole_kept = 40;
  r = ResolveLoss(a);
  EXPECT_FALSE(r.divisors.CountsIgnored());
  d = r.divisors.For(0);
  EXPECT_EQ(d.count, 40.0);
  EXPECT_EQ(d.mean_n, 100.0);
  EXPECT_EQ(d.grad_div, 4000.0);

  // Per-sample mean: gradients divide by last_dim; normalize without ignore_index keeps all.
  BceArgs p;
  p.numel = 12;
  p.reduction = Reduction::kPerSampleMean;
  p.last_dim = 3;
  p.normalize = true;
  r = ResolveLoss(p);
  EXPECT_FALSE(r.divisors.CountsIgnored());
  d = r.divisors.For(0);
  EXPECT_EQ(d.count, 12.0);
  EXPECT_EQ(d.grad_div, 36.0);

  // The same rule as ResolveDivisors on BceArgs (the reference's).
  for (const BceArgs& x : {a, p}) {
    const internal::Divisors want = internal::ResolveDivisors(x, 5);
    const internal::Divisors got = ResolveLoss(x).divisors.For(5);
    EXPECT_EQ(got.count, want.count);
    EXPECT_EQ(got.mean_n, want.mean_n);
    EXPECT_EQ(got.grad_div, want.grad_div);
  }
}

}  // namespace
}  // namespace lossd::kernels
