// Sigmoid focal loss block kernel on Highway (double lanes), compiled for every target Highway
// supports and chosen at run time, for gamma 0, 1 and 2 (FocalBlock, simd_block.h).
//
// Per lane the formulas and the order of the operations of internal::FocalElementDirect
// (bce_math.h): A = max(y, 1-y), B = min(y, 1-y), z = (1-2y) x with the sign folded so that
// q = 1 - p_t = A s(z) + B s(-z) and ce = A sp(z) + B sp(-z) are sums of non-negative terms,
// e = exp(-|z|), 1/(1+e) and log1p(e); q^gamma is 1, q or q q. Differences from the scalar form:
// exp and log1p are Highway's (1 and 2 ulp in double instead of the C library's), selections
// are exact blends, and multiply-adds are fused where the target has them. So a lane's double
// results are within a few double ulps of the scalar form's, and float results equal its
// rounding or differ by one float ulp where the value lies that close to a rounding boundary
// (tests/kernels/options_test.cc, FocalBlockTest). Lanes with NaN inputs, infinite logits,
// targets outside [0, 1] or tiny (where FocalElement takes the log-space form) are recomputed
// by the scalar FocalElement. Per element the result depends only on that element's inputs:
// a last partial vector is padded, never handled by a scalar loop.

#include <cmath>
#include <cstdint>
#include <cstring>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/src/simd_focal.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "hwy/contrib/math/math-inl.h"
#include "kernels/src/bce_math.h"
#include "kernels/src/simd_block.h"

HWY_BEFORE_NAMESPACE();
namespace lossd::kernels::internal {
namespace HWY_NAMESPACE {

namespace hn = hwy::HWY_NAMESPACE;

// One vector of elements: loss and dl/dx (weighted, dl/dx not yet divided).
template <class D, class V = hn::Vec<D>>
HWY_INLINE void FocalLanes(D d, V x, V y, V w, double alpha, double gamma, V* loss, V* gx) {
  const V zero = hn::Zero(d);
  const V one = hn::Set(d, 1.0);
  const V omy = hn::Sub(one, y);
  const V A_lo = hn::Sub(hn::Sub(one, omy), y);  // 1 - y = omy + A_lo exactly
  const auto flip = hn::Lt(omy, y);              // y > 1/2
  const V sgn = hn::IfThenElse(flip, hn::Set(d, -1.0), one);
  const V A = hn::IfThenElse(flip, y, omy);
  const V B = hn::IfThenElse(flip, omy, y);
  const V dd = hn::Abs(hn::Sub(one, hn::Mul(hn::Set(d, 2.0), y)));  // A - B
  const V z = hn::Mul(sgn, x);
  const auto pos = hn::Ge(z, zero);
  const V e = hn::Exp(d, hn::Neg(hn::Abs(z)));
  const V inv = hn::Div(one, hn::Add(one, e));
  const V c = hn::IfThenElse(pos, one, e);  // s(z) (1 + e)
  const V N = hn::Add(hn::MulAdd(hn::IfThenElse(pos, B, A), e, hn::IfThenElse(pos, A_lo, B)),
                      hn::IfThenElseZero(pos, A));  // q (1 + e)
  V u = one;  // s(z) / q
  if (gamma != 0.0) {
    const auto npos = hn::Gt(N, zero);
    u = hn::Div(hn::IfThenElse(npos, c, one), hn::IfThenElse(npos, N, one));
  }
  const V qz = hn::Mul(c, inv);                            // s(z)
  const V rz = hn::Mul(hn::IfThenElse(pos, e, one), inv);  // s(-z)
  const V q = hn::Mul(N, inv);                             // 1 - p_t
  const V vd = hn::Mul(hn::Mul(rz, u), dd);
  // sgn (A s(z) - B s(-z)), +0 where that is 0.
  const V sdce = hn::Add(hn::Mul(sgn, hn::MulAdd(A, qz, hn::Neg(hn::Mul(B, rz)))), zero);
  // ce - log1p(e): A z (z >= 0, with A_lo) or -B z (z < 0).
  const V ce_m = hn::MulAdd(hn::IfThenElse(pos, A, hn::Neg(B)), z,
                            hn::Mul(hn::IfThenElseZero(pos, A_lo), z));
  V at = one;
  if (alpha >= 0.0) {
    const V oma = hn::Set(d, 1.0 - alpha);
    at = hn::Add(hn::Mul(hn::Set(d, alpha), y), hn::Add(hn::Mul(oma, omy), hn::Mul(oma, A_lo)));
  }
  const V ce = hn::Add(ce_m, hn::Log1p(d, e));  // A sp(z) + B sp(-z)
  V mod = one;
  if (gamma == 1.0) {
    mod = q;
  } else if (gamma == 2.0) {
    mod = hn::Mul(q, q);
  }
  V lv = hn::Mul(hn::Mul(at, ce), mod);
  lv = hn::IfThenZeroElse(hn::Or(hn::Eq(ce, zero), hn::Eq(at, zero)), lv);
  const V tq = hn::Mul(hn::Mul(hn::Set(d, gamma), ce), vd);
  V g = hn::Mul(hn::Add(sdce, hn::Mul(sgn, tq)), mod);
  g = hn::Mul(g, at);
  // The weight: +0 outputs for w = 0 (StoreWeightedFocal); w = 1 leaves them as they are.
  const auto w0 = hn::Eq(w, zero);
  *loss = hn::IfThenZeroElse(w0, hn::Mul(lv, w));
  *gx = hn::IfThenZeroElse(w0, hn::Mul(g, w));
}

// Elements [i, i + count) of `a` from lanes-wide arrays x, y, w (count lanes valid), written
// to loss and gx (count lanes).
template <class D>
HWY_INLINE void FocalVector(D d, const FocalBlockArgs& a, const double* x, const double* y,
                            const double* w, size_t count, double* loss, double* gx) {
  using V = hn::Vec<D>;
  const V xv = hn::LoadU(d, x);
  const V yv = hn::LoadU(d, y);
  const V wv = w != nullptr ? hn::LoadU(d, w) : hn::Set(d, 1.0);
  V lv, gv;
  FocalLanes(d, xv, yv, wv, a.alpha, a.gamma, &lv, &gv);
  if (a.grad_divisor != 1.0) gv = hn::Div(gv, hn::Set(d, a.grad_divisor));
  hn::StoreU(lv, d, loss);
  hn::StoreU(gv, d, gx);
  // Rare lanes (FocalNeedsLogSpace, vector form): the scalar element, its log-space form.
  const double tiny = 0x1p-1021;
  const V inf = hn::Set(d, INFINITY);
  const auto rare = hn::Or(
      hn::Or(hn::Not(hn::And(hn::Ge(yv, hn::Zero(d)), hn::Le(yv, hn::Set(d, 1.0)))),
             hn::Not(hn::Lt(hn::Abs(xv), inf))),
      hn::Or(hn::Ne(wv, wv), hn::Lt(hn::Abs(hn::Sub(yv, hn::Set(d, tiny))), hn::Set(d, tiny))));
  if (hn::AllFalse(d, rare)) return;
  for (size_t j = 0; j < count; ++j) {
    const double wj = w != nullptr ? w[j] : 1.0;
    if (!FocalNeedsLogSpace(x[j], y[j], wj)) continue;
    double l, g;
    FocalElement<double>(x[j], y[j], wj, a.alpha, a.gamma, &l, &g);
    loss[j] = l;
    gx[j] = g / a.grad_divisor;
  }
}

void FocalBlockF64(const FocalBlockArgs& a) {
  const hn::ScalableTag<double> d;
  const size_t N = hn::Lanes(d);
  HWY_ALIGN double gx_scratch[HWY_MAX_BYTES / sizeof(double)];
  int64_t i = 0;
  for (; i + static_cast<int64_t>(N) <= a.n; i += N) {
    FocalVector(d, a, a.x + i, a.y + i, a.w != nullptr ? a.w + i : nullptr, N, a.loss + i,
                a.gx != nullptr ? a.gx + i : gx_scratch);
  }
  if (i == a.n) return;
  // The last partial vector, padded with x = 0, y = 0, w = 1 (results discarded).
  HWY_ALIGN double xb[HWY_MAX_BYTES / sizeof(double)];
  HWY_ALIGN double yb[HWY_MAX_BYTES / sizeof(double)];
  HWY_ALIGN double wb[HWY_MAX_BYTES / sizeof(double)];
  HWY_ALIGN double lb[HWY_MAX_BYTES / sizeof(double)];
  HWY_ALIGN double gb[HWY_MAX_BYTES / sizeof(double)];
  const size_t rest = static_cast<size_t>(a.n - i);
  for (size_t j = 0; j < N; ++j) {
    xb[j] = j < rest ? a.x[i + j] : 0.0;
    yb[j] = j < rest ? a.y[i + j] : 0.0;
    wb[j] = j < rest && a.w != nullptr ? a.w[i + j] : 1.0;
  }
  FocalVector(d, a, xb, yb, a.w != nullptr ? wb : nullptr, rest, lb, gb);
  std::memcpy(a.loss + i, lb, rest * sizeof(double));
  if (a.gx != nullptr) std::memcpy(a.gx + i, gb, rest * sizeof(double));
}

}  // namespace HWY_NAMESPACE
}  // namespace lossd::kernels::internal
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace lossd::kernels::internal {

HWY_EXPORT(FocalBlockF64);

void FocalBlock(const FocalBlockArgs& a) { HWY_DYNAMIC_DISPATCH(FocalBlockF64)(a); }

}  // namespace lossd::kernels::internal
#endif  // HWY_ONCE
