// BCE-with-logits block kernels on Highway, compiled for every x86/Arm target Highway supports
// and chosen at run time (foreach_target + HWY_EXPORT + HWY_DYNAMIC_DISPATCH).
//
// Per element (float lanes): e = exp(-|x|) (ExpNegAbs), u = 1+e rounded with its exact error
// c, inv = 1/(u+c) (the AVX-512 or AVX2 estimate or a division, then Newton steps,
// ReciprocalOnePlus),
// log1p(e) without divisions as an unrounded pair (Log1pUnit; a 32-entry table on AVX-512, a
// polynomial elsewhere), then with the weight folded into the coefficients a = w (1-y),
// b = w p y (w p split exactly, so b is rounded once):
//   loss = (a+b) log1p(e) + a max(x,0) + b max(-x,0),  dl/dx = a s(x) - b s(-x),
//   dl/dy = w (p sp(-x) - sp(x)),  s(x), s(-x) = inv or e inv (no cancellation).
// Lanes with far, infinite or NaN logits and lanes whose results are not finite are
// recomputed by the scalar math in a wider type (FixRareLanes). Double lanes use Highway's Exp
// and Log1pUnitF64 (log1p as an unrounded pair too) in the same scheme. Errors:
// tests/kernels/accuracy_test.cc, on every target.
#include <cstring>
#include <limits>
#include <string_view>
#include <type_traits>
#include <utility>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/src/simd_block.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "hwy/contrib/math/math-inl.h"
#include "kernels/src/bce_math.h"
#include "kernels/src/simd_block.h"
#include "lossd/kernels/exact_sum.h"

HWY_BEFORE_NAMESPACE();
namespace lossd::kernels::internal {
namespace HWY_NAMESPACE {

namespace hn = hwy::HWY_NAMESPACE;

#if HWY_TARGET <= HWY_AVX3
// Tables of the AVX-512 log1p below, for j = floor(31 e): r_j = 1/c_j rounded to 6 significant
// bits (c_j = 1 + (j + 0.5)/31; r_0 = 1) and -log(r_j) as hi + lo (tools: Python's math.log in
// double, split into two floats).
alignas(64) constexpr float kLog1pR[32] = {
    0x1.0000000000000p+0f, 0x1.e800000000000p-1f, 0x1.d800000000000p-1f, 0x1.d000000000000p-1f,
    0x1.c000000000000p-1f, 0x1.b000000000000p-1f, 0x1.a800000000000p-1f, 0x1.a000000000000p-1f,
    0x1.9000000000000p-1f, 0x1.8800000000000p-1f, 0x1.8000000000000p-1f, 0x1.7800000000000p-1f,
    0x1.7000000000000p-1f, 0x1.6800000000000p-1f, 0x1.6000000000000p-1f, 0x1.5800000000000p-1f,
    0x1.5000000000000p-1f, 0x1.4800000000000p-1f, 0x1.4000000000000p-1f, 0x1.3800000000000p-1f,
    0x1.3800000000000p-1f, 0x1.3000000000000p-1f, 0x1.2800000000000p-1f, 0x1.2000000000000p-1f,
    0x1.2000000000000p-1f, 0x1.1800000000000p-1f, 0x1.1800000000000p-1f, 0x1.1000000000000p-1f,
    0x1.0800000000000p-1f, 0x1.0800000000000p-1f, 0x1.0000000000000p-1f, 0x1.f800000000000p-2f};
alignas(64) constexpr float kLog1pLogHi[32] = {
    0.0f, 0x1.894aa20000000p-5f, 0x1.4d31160000000p-4f, 0x1.9335e60000000p-4f,
    0x1.1178e80000000p-3f, 0x1.5bf4060000000p-3f, 0x1.823c160000000p-3f, 0x1.a93ed40000000p-3f,
    0x1.f991c60000000p-3f, 0x1.1178e80000000p-2f, 0x1.2696220000000p-2f, 0x1.3c25280000000p-2f,
    0x1.522ae00000000p-2f, 0x1.68ac840000000p-2f, 0x1.7fafa40000000p-2f, 0x1.973a340000000p-2f,
    0x1.af52960000000p-2f, 0x1.c7ff9c0000000p-2f, 0x1.e148a20000000p-2f, 0x1.fb358a0000000p-2f,
    0x1.fb358a0000000p-2f, 0x1.0ae76e0000000p-1f, 0x1.188ee40000000p-1f, 0x1.2696220000000p-1f,
    0x1.2696220000000p-1f, 0x1.35028a0000000p-1f, 0x1.35028a0000000p-1f, 0x1.43da000000000p-1f,
    0x1.5322e20000000p-1f, 0x1.5322e20000000p-1f, 0x1.62e4300000000p-1f, 0x1.6af45c0000000p-1f};
alignas(64) constexpr float kLog1pLogLo[32] = {
    0.0f, -0x1.6c09980000000p-30f, -0x1.6fc0aa0000000p-31f, -0x1.535b3c0000000p-31f,
    0x1.13f23e0000000p-30f, 0x1.6a87b60000000p-28f, 0x1.5468f00000000p-29f,
    -0x1.ba930e0000000p-30f, 0x1.9676700000000p-28f, 0x1.13f23e0000000p-29f,
    -0x1.d9648e0000000p-27f, -0x1.1999d00000000p-27f, 0x1.ce28f60000000p-28f,
    -0x1.6395ec0000000p-30f, -0x1.09fab80000000p-28f, 0x1.89ab580000000p-29f,
    -0x1.b6e6460000000p-27f, 0x1.d155320000000p-28f, -0x1.76364c0000000p-28f,
    0x1.ef49100000000p-27f, 0x1.ef49100000000p-27f, 0x1.682a7c0000000p-28f,
    0x1.e4794c0000000p-30f, -0x1.d9648e0000000p-26f, -0x1.d9648e0000000p-26f,
    0x1.b3b1900000000p-26f, 0x1.b3b1900000000p-26f, -0x1.a0db880000000p-26f,
    0x1.a19e160000000p-27f, 0x1.a19e160000000p-27f, -0x1.05c6100000000p-29f,
    -0x1.c8256a0000000p-26f};

// log1p(e) for e in [0, 1], given u = 1+e rounded, c = e-(u-1) (exact) and inv_u = 1/u (float
// lanes, AVX-512): log1p(e) = log(u) + c/u. j = floor(31 e) from the top mantissa bits of
// 1 + e 31/32 (two 16-lane table lookups per table). f = u r_j - 1 is exact (r_j has 6 bits and
// |f| < 2^-5), log(u) = -log(r_j) + log1p(f), log1p(f) = f - f^2/2 + f^3 (q0 + q1 f + q2 f^2)
// (minimax on |f| <= 0.0325, relative error 2^-30). Returned as hi + *lo, unrounded.
HWY_INLINE hn::Vec512<float> Log1pUnitAvx512(hn::Vec512<float> e, hn::Vec512<float> u,
                                             hn::Vec512<float> c, hn::Vec512<float> inv_u,
                                             hn::Vec512<float>* lo) {
  const hn::Full512<float> d;
  const hn::RebindToSigned<decltype(d)> di;
  using V = hn::Vec512<float>;
  const V one = hn::Set(d, 1.0f);
  // The lookups use the low 5 bits of each index lane: the top 5 mantissa bits of 1 + e 31/32.
  const __m512i idx =
      hn::ShiftRight<18>(hn::BitCast(di, hn::MulAdd(e, hn::Set(d, 0.96875f), one))).raw;
  const auto lookup = [&](const float* t) {
    return V{_mm512_permutex2var_ps(hn::Load(d, t).raw, idx, hn::Load(d, t + 16).raw)};
  };
  const V r = lookup(kLog1pR);
  const V log_hi = lookup(kLog1pLogHi);
  const V log_lo = lookup(kLog1pLogLo);
  const V f = hn::MulSub(u, r, one);
  // log1p(f) - f = f^2 (-1/2 + f (q0 + f (q1 + f q2))), plus the table's low part.
  V q = hn::MulAdd(hn::Set(d, 0x1.99f3dep-3f), f, hn::Set(d, -0x1.002818p-2f));
  q = hn::MulAdd(q, f, hn::Set(d, 0x1.555554p-2f));
  q = hn::MulAdd(q, f, hn::Set(d, -0.5f));
  const V corr = hn::MulAdd(hn::Mul(f, f), q, log_lo);
  // hi + lo with hi = -log(r_j) + f (exact for j = 0, where -log r_j = 0 and small e needs
  // it most; rounded once otherwise) and lo the small terms, for callers to use unrounded.
  *lo = hn::MulAdd(c, inv_u, corr);
  return hn::Add(log_hi, f);
}
#endif

// log1p(e) for e in [0, 1] in double lanes, given u = 1+e rounded, c = e-(u-1) (exact) and
// inv_u = 1/u: log1p(e) = log(u) + c/u, returned as hi + *lo unrounded. log(u) = k ln2 +
// log1p(f), k = [u > sqrt 2], f = u/2^k - 1 exact in [-0.293, 0.415]; log1p(f) = 2 atanh(s)
// with s = f/(2+f) in [-0.172, 0.172] kept as s + s_lo (the division's residual by FMA, and
// 1/(2+f) to 2^-7 for the small part), 2 atanh(s) = 2s + 2s s^2 R(s^2), R the Taylor series
// 1/3 + s^2/5 + ... + s^18/21 (the first term left out is below 2^-57 of the result). The only
// roundings of note are in the small terms, so the pair is within about 2^-56 of log1p(e)
// (Highway's Log1p, rounded, was about 1 ulp, and with the exp before it the loss reached 5 ulp).
template <class D, class V = hn::Vec<D>>
HWY_INLINE V Log1pUnitF64(D d, V u, V c, V inv_u, V* lo) {
  const V one = hn::Set(d, 1.0);
  const V two = hn::Set(d, 2.0);
  const auto k = hn::Gt(u, hn::Set(d, 1.4142135623730951));
  const V f = hn::Sub(hn::IfThenElse(k, hn::Mul(u, hn::Set(d, 0.5)), u), one);
  const V den = hn::Add(two, f);
  const V den_lo = hn::Sub(f, hn::Sub(den, two));  // exact (Fast2Sum, |f| < 2)
  const V s = hn::Div(f, den);
  // f - s (den + den_lo): the first product's error is exact in the FMA.
  const V r = hn::NegMulAdd(s, den_lo, hn::NegMulAdd(s, den, f));
  const V rden = hn::MulAdd(hn::MulAdd(hn::Set(d, 0.125), f, hn::Set(d, -0.25)), f,
                            hn::Set(d, 0.5));  // 1/(2+f) within 0.5%
  const V s_lo = hn::Mul(r, rden);
  const V s2 = hn::Mul(s, s);
  V q = hn::Set(d, 1.0 / 21);
  for (double coef : {1.0 / 19, 1.0 / 17, 1.0 / 15, 1.0 / 13, 1.0 / 11, 1.0 / 9, 1.0 / 7,
                      1.0 / 5, 1.0 / 3}) {
    q = hn::MulAdd(q, s2, hn::Set(d, coef));
  }
  const V two_s = hn::Add(s, s);  // exact
  // k ln2_hi + 2s as hi plus its rounding error (Fast2Sum: |2s| < ln 2 where k = 1).
  const V a = hn::IfThenElseZero(k, hn::Set(d, 0.69314718055994529));
  const V hi = hn::Add(a, two_s);
  const V sum_err = hn::Add(hn::Sub(a, hi), two_s);
  const V small = hn::MulAdd(hn::Mul(two_s, s2), q, hn::Add(s_lo, s_lo));
  *lo = hn::Add(hn::Add(sum_err, hn::IfThenElseZero(k, hn::Set(d, 2.3190468138462996e-17))),
                hn::MulAdd(c, inv_u, small));
  return hi;
}

// log1p(e) for e in [0, 1], given u = 1+e rounded, c = e-(u-1) (exact) and inv_u = 1/u (float
// lanes): log1p(e) = log(u) + c/u. log(u) = k ln2 + log1p(f) with k = [u > sqrt 2],
// f = u/2^k - 1 exact in [-0.293, 0.415], log1p(f) = f - f^2/2 + f^3 Q(f) (Q: degree-7
// minimax fit of the relative error, 2^-27.2). k ln2_hi + f is exact; it is returned, and the
// remaining small terms go to *lo, so that callers can use hi + lo without rounding it. No
// division, unlike the general Log1p. Double lanes: Log1pUnitF64.
template <class D, class V = hn::Vec<D>>
HWY_INLINE V Log1pUnit(D d, V e, V u, V c, V inv_u, V* lo) {
  using T = hn::TFromD<D>;
  if constexpr (sizeof(T) != 4) {
    (void)e;
    return Log1pUnitF64(d, u, c, inv_u, lo);
#if HWY_TARGET <= HWY_AVX3
  } else if constexpr (hn::MaxLanes(D()) == 16) {
    return Log1pUnitAvx512(e, u, c, inv_u, lo);
#endif
  } else {
    const V one = hn::Set(d, 1.0f);
    const auto k = hn::Gt(u, hn::Set(d, 1.41421356f));
    const V f = hn::Sub(hn::IfThenElse(k, hn::Mul(u, hn::Set(d, 0.5f)), u), one);
    // Estrin's scheme: short dependency chains.
    const V f2 = hn::Mul(f, f);
    const V f4 = hn::Mul(f2, f2);
    const auto pair = [&](float c1, float c0) {
      return hn::MulAdd(hn::Set(d, c1), f, hn::Set(d, c0));
    };
    const V q01 = pair(kLog1pQ1, kLog1pQ0);
    const V q23 = pair(kLog1pQ3, kLog1pQ2);
    const V q45 = pair(kLog1pQ5, kLog1pQ4);
    const V q67 = pair(kLog1pQ7, kLog1pQ6);
    const V q = hn::MulAdd(hn::MulAdd(q67, f2, q45), f4, hn::MulAdd(q23, f2, q01));
    const V corr = hn::MulAdd(hn::Mul(f2, f), q, hn::Mul(f2, hn::Set(d, -0.5f)));
    const V hi = hn::Add(hn::IfThenElseZero(k, hn::Set(d, kLn2HiF)), f);
    *lo = hn::Add(hn::MulAdd(c, inv_u, corr),
                  hn::IfThenElseZero(k, hn::Set(d, kLn2LoF)));
    return hi;
  }
}

// exp(t) for t = -ax <= 0 (float lanes; double lanes use Highway's Exp): q = round(t / ln 2) by the
// 1.5 * 2^23 shifter, r = t - q ln 2 in two parts, Highway's degree-5 polynomial for exp(r) - 1 - r
// (1 ulp), and 2^q from the shifter's bits in one step. Lanes in `far` (|x| > kFarX, which
// covers t < -87 where 2^q would leave the normal range, infinities and NaN) give meaningless
// values: the caller recomputes them in a wider type.
template <class D, class V = hn::Vec<D>>
HWY_INLINE V ExpNegAbs(D d, V ax, hn::Mask<D> far) {
  using T = hn::TFromD<D>;
  if constexpr (sizeof(T) != 4) {
    (void)far;
    return hn::Exp(d, hn::Neg(ax));
  } else {
    const hn::RebindToSigned<D> di;
    const V shifter = hn::Set(d, 12582912.0f);  // 1.5 * 2^23
    // t = -ax folded into the FMAs: q = round(-ax / ln 2), r = -ax - q ln 2.
    const V qs = hn::MulAdd(ax, hn::Set(d, -1.44269504088896341f), shifter);
    const V q = hn::Sub(qs, shifter);
    V r = hn::NegMulSub(q, hn::Set(d, kLn2HiF), ax);
    r = hn::NegMulAdd(q, hn::Set(d, kLn2LoF), r);
    const V r2 = hn::Mul(r, r);
    const V p01 = hn::MulAdd(hn::Set(d, 0.166666671633720397949219f), r, hn::Set(d, 0.5f));
    const V p23 = hn::MulAdd(hn::Set(d, 0.00833336077630519866943359f), r,
                             hn::Set(d, 0.0416664853692054748535156f));
    const V p45 = hn::MulAdd(hn::Set(d, 0.000198527617612853646278381f), r,
                             hn::Set(d, 0.00139304355252534151077271f));
    // r + r^2 p01 + r^4 (p23 + r^2 p45): the two halves in parallel.
    const V em1 = hn::MulAdd(hn::Mul(r2, r2), hn::MulAdd(p45, r2, p23), hn::MulAdd(r2, p01, r));
    // The shifter's low bits hold q (two's complement); (bits + 127) << 23 is 2^q.
    const V scale = hn::BitCast(
        d, hn::ShiftLeft<23>(hn::Add(hn::BitCast(di, qs), hn::Set(di, 127))));
    const V y = hn::MulAdd(em1, scale, scale);
    (void)far;  // those lanes are recomputed: their value does not matter
    return y;
  }
}

// 1/(1+e) for e in [0, 1], given u = 1+e rounded and c = e-(u-1) (exact); also *inv_u = 1/u.
// r = 1/u (AVX-512 float: the 14-bit hardware estimate; AVX2 float: the 12-bit estimate and a
// Newton step; elsewhere a division), then Newton steps
// in FMA form with the residual t = 1 - u r: *inv_u = r + r t, and 1/(u+c) = r + r (t - c r),
// which takes in u's rounding (1/u alone is off by up to half an ulp of 1+e, enough to push
// dl/dx past 4 ulp where its terms are large). Relative error 2^-28 before the final rounding
// (AVX-512), 2^-44 (AVX2) or 2^-46 (division), so within 0.5 ulp + 2^-4 ulp.
template <class D, class V = hn::Vec<D>>
HWY_INLINE V ReciprocalOnePlus(D d, V u, V c, V* inv_u) {
  using T = hn::TFromD<D>;
  V r;
#if HWY_TARGET <= HWY_AVX3
  if constexpr (sizeof(T) == 4) {
    r = hn::ApproximateReciprocal(u);
  } else {
    r = hn::Div(hn::Set(d, T(1)), u);
  }
#elif HWY_TARGET == HWY_AVX2
  if constexpr (sizeof(T) == 4) {
    // vrcpps (relative error below 1.5 2^-12) and one Newton step (2^-22 with its rounding)
    // instead of vdivps, whose latency sits in every lane's dependency chain; the steps below
    // then reach 2^-44 before the final rounding.
    const V r0 = hn::ApproximateReciprocal(u);
    r = hn::MulAdd(r0, hn::NegMulAdd(u, r0, hn::Set(d, T(1))), r0);
  } else {
    r = hn::Div(hn::Set(d, T(1)), u);
  }
#else
  r = hn::Div(hn::Set(d, T(1)), u);
#endif
#if HWY_NATIVE_FMA
  const V t = hn::NegMulAdd(u, r, hn::Set(d, T(1)));
  *inv_u = hn::MulAdd(r, t, r);
  return hn::MulAdd(r, hn::NegMulAdd(c, r, t), r);
#else
  // Without FMA the residual would not be exact: r (1 - c r) from the division alone.
  *inv_u = r;
  return hn::Mul(r, hn::NegMulAdd(c, r, hn::Set(d, T(1))));
#endif
}

// g / div from r = 1/div (rounded): q = g r, then one correction step with the exact residual
// g - q div (FMA), which rounds correctly but in rare cases (then 1 ulp). Cheaper than a division.
// g is finite here (lanes with non-finite results are recomputed by FixRareLanes). Targets
// without FMA divide (their residual would not be exact).
template <class V>
HWY_INLINE V DivideByReciprocal(V g, V div, V r) {
#if HWY_NATIVE_FMA
  const V q = hn::Mul(g, r);
  return hn::MulAdd(hn::NegMulAdd(q, div, g), r, q);
#else
  (void)r;
  return hn::Div(g, div);
#endif
}

// The same for a divisor div + div_lo that the lane type cannot hold (a float lane's MEAN
// divisor beyond 2^24, or the normalize count times numel): the residual g - q div - q div_lo
// by two FMAs, so the quotient is the float one of g / divisor, rounded once (within 1 ulp in
// rare cases), without a pass in double afterwards.
template <class V>
HWY_INLINE V DivideByReciprocalPair(V g, V div, V div_lo, V r) {
#if HWY_NATIVE_FMA
  const V q = hn::Mul(g, r);
  return hn::MulAdd(hn::NegMulAdd(q, div_lo, hn::NegMulAdd(q, div, g)), r, q);
#else
  (void)r;
  return hn::Div(g, hn::Add(div, div_lo));
#endif
}

// Lanes with |x| beyond kFarX<T> (where exp(-|x|) would be subnormal in T and lose its relative
// precision), infinite x, NaN inputs and overflowing products are "rare": the vector code
// leaves them to FixRareLanes.
template <typename T>
constexpr T kFarX = sizeof(T) == 4 ? T(80) : T(700);

// Vector part of BceElement (bce_math.h) for lanes with finite |x| <= kFarX: there every
// softplus and sigmoid value is finite, so a zero coefficient gives an exactly zero term without
// masks. Returns the mask of lanes that are not rare; the outputs of the others are not
// meaningful.
template <class D, class V = hn::Vec<D>>
HWY_INLINE hn::Mask<D> BceVector(D d, V x, V y, V w, V p, bool has_w, bool has_p, V div,
                                 V div_lo, bool scale, bool scale_lo, V rdiv, bool want_gx,
                                 bool want_gy, V* loss, V* gx,
                                 V* gy) {
  using T = hn::TFromD<D>;
  const V zero = hn::Zero(d);
  const V one = hn::Set(d, T(1));
  const V ax = hn::Abs(x);
  // Far, infinite or NaN x (a NaN x must not rely on propagation: Highway's double Exp gives 0
  // for it and Max drops it).
  const auto far = hn::Not(hn::Le(ax, hn::Set(d, kFarX<T>)));
  const V e = ExpNegAbs(d, ax, far);  // meaningless where far
  const V u = hn::Add(one, e);
  const V c = hn::Sub(e, hn::Sub(u, one));  // u's rounding error, exact
  V inv_u;
  const V inv = ReciprocalOnePlus(d, u, c, &inv_u);
  V l_lo;
  const V l = Log1pUnit(d, e, u, c, inv_u, &l_lo);  // log1p(e) = l + l_lo
  const auto x_ge0 = hn::Ge(x, zero);
  // The coefficients with the weight folded in: a = w (1 - y) (one rounding, and +0 for w = 0),
  // b = w p y. With finite inputs a zero weight then gives +0 everywhere without masks.
#if HWY_NATIVE_FMA
  V a = has_w ? hn::NegMulAdd(w, y, w) : hn::Sub(one, y);
#else
  // Without FMA, w - w y would cancel: w (1 - y), plus +0 so that w = 0 gives +0.
  V a = has_w ? hn::Add(hn::Mul(w, hn::Sub(one, y)), zero) : hn::Sub(one, y);
#endif
  // b = w p y: with both factors, w p is split exactly into hi + lo (FMA), so b is rounded once
  // instead of twice (dl/dx's larger term carries b's error).
  V b = y;
  if (has_w && has_p) {
#if HWY_NATIVE_FMA
    const V wp = hn::Mul(w, p);
    b = hn::MulAdd(wp, y, hn::Mul(hn::MulSub(w, p, wp), y));
#else
    b = hn::Mul(w, hn::Mul(p, y));
#endif
  } else if (has_w || has_p) {
    b = hn::Mul(has_w ? w : p, y);
  }
  // a sp(x) + b sp(-x) = (a + b) l + (a max(x,0) + b max(-x,0)), the second part one product
  // (x a for x >= 0, -x b else), ready before l, so only one FMA waits for l.
  const V ab = hn::Add(a, b);
  const V a_or_nb = hn::IfThenElse(x_ge0, a, hn::Neg(b));
  const V lin = hn::Mul(x, a_or_nb);
  V lv = hn::MulAdd(ab, l, hn::MulAdd(ab, l_lo, lin));
  V gxv = zero;
  if (want_gx) {
    // a s(x) - b s(-x) = inv (P - Q e) with (P, Q) = (a, b) for x >= 0, (-b, -a) else.
    const V q = hn::IfThenElse(x_ge0, b, hn::Neg(a));
    gxv = hn::Mul(inv, hn::NegMulAdd(q, e, a_or_nb));
  }
  V gyv = zero;
  if (want_gy) {
    const V l_sum = hn::Add(l, l_lo);
    const V sp_pos = hn::Add(hn::Max(x, zero), l_sum);
    const V sp_neg = hn::Add(hn::Max(hn::Neg(x), zero), l_sum);
    gyv = has_p ? hn::MulSub(p, sp_neg, sp_pos) : hn::Sub(sp_neg, sp_pos);
  }
  if (has_w && want_gy) {
    // A zero weight gives +0 (not -0) like the scalar math.
    gyv = hn::IfThenZeroElse(hn::Eq(w, zero), hn::Mul(w, gyv));
  }
  // NaN in y, w or p makes lv NaN (w = 0 included: 0 * NaN), overflow makes it infinite (an
  // infinite a or b makes ab infinite, and l > 0 here). dl/dx is finite in exact arithmetic
  // (|a s(x) - b s(-x)| <= max(|a|, |b|)), but P - Q e can overflow for huge coefficients of
  // opposite signs, so it is probed too.
  const V probe = want_gx ? hn::Add(lv, gxv) : lv;
#if HWY_TARGET <= HWY_AVX3
  const auto ok = hn::AndNot(far, hn::IsFinite(probe));  // vfpclassps
#else
  // |v| < inf (false for NaN): two operations, where IsFinite takes five integer ones.
  const auto ok =
      hn::AndNot(far, hn::Lt(hn::Abs(probe), hn::Set(d, std::numeric_limits<T>::infinity())));
#endif
  if (scale) {
    if (scale_lo) {
      gxv = DivideByReciprocalPair(gxv, div, div_lo, rdiv);
      if (want_gy) gyv = DivideByReciprocalPair(gyv, div, div_lo, rdiv);
    } else {
      gxv = DivideByReciprocal(gxv, div, rdiv);
      if (want_gy) gyv = DivideByReciprocal(gyv, div, rdiv);
    }
  }
  *loss = lv;
  *gx = gxv;
  *gy = gyv;
  return ok;
}

// Recomputes the lanes flagged in `rare` (nonzero) by the scalar math in a wider type. The flag
// depends only on each element's own inputs, so results stay position-independent.
template <typename T>
HWY_NOINLINE void FixRareLanes(size_t lanes, const T* rare, const T* x, const T* y, const T* w,
                               const T* p, T div_hi, T div_lo, T* l, T* gx, T* gy) {
  using Wide = std::conditional_t<sizeof(T) == 4, double, long double>;
  const Wide div = static_cast<Wide>(div_hi) + static_cast<Wide>(div_lo);
  for (size_t j = 0; j < lanes; ++j) {
    if (rare[j] == T(0)) continue;
    Wide lw, gxw, gyw;
    BceElement<Wide>(x[j], y[j], w ? w[j] : Wide(1), p ? p[j] : Wide(1), &lw, &gxw, &gyw);
    l[j] = static_cast<T>(lw);
    gx[j] = static_cast<T>(gxw / div);
    gy[j] = static_cast<T>(gyw / div);
  }
}

// AVX2: the lambdas of the block loop are inlined even where the compiler would not (the
// loops per shape below would otherwise call them per vector). Other targets keep the
// compiler's choice (this file is compiled once per target, so the macro is set each time).
#undef LOSSD_LAMBDA_INLINE
#if defined(__GNUC__) && HWY_TARGET == HWY_AVX2
#define LOSSD_LAMBDA_INLINE __attribute__((always_inline))
#else
#define LOSSD_LAMBDA_INLINE
#endif

// Which operands and outputs a call has, as bits of BceBlockImpl's kShape (kShapeRuntime: read
// from the arguments at run time instead).
constexpr int kShapeW = 1, kShapeP = 2, kShapeGx = 4, kShapeGy = 8, kShapeScale = 16;
constexpr int kShapeRuntime = -1;

template <typename T>
int BceShape(const BlockArgs<T>& a) {
  return (a.w != nullptr ? kShapeW : 0) | (a.p != nullptr ? kShapeP : 0) |
         (a.gx != nullptr ? kShapeGx : 0) | (a.gy != nullptr ? kShapeGy : 0) |
         (a.grad_divisor != T(1) || a.grad_divisor_lo != T(0) ? kShapeScale : 0);
}

template <typename T, int kShape>
HWY_INLINE void BceBlockImpl(const BlockArgs<T>& a) {
  const hn::ScalableTag<T> d;
  using V = hn::Vec<decltype(d)>;
  constexpr size_t kMaxLanes = HWY_MAX_BYTES / sizeof(T);
  const size_t N = hn::Lanes(d);
  // With kShape fixed, the flags are constants and the loop body has no branch on them.
  constexpr bool kRt = kShape == kShapeRuntime;
  const bool has_w = kRt ? a.w != nullptr : (kShape & kShapeW) != 0;
  const bool has_p = kRt ? a.p != nullptr : (kShape & kShapeP) != 0;
  const bool scale_lo = a.grad_divisor_lo != T(0);
  const bool scale = kRt ? a.grad_divisor != T(1) || scale_lo : (kShape & kShapeScale) != 0;
  const bool want_gx = kRt ? a.gx != nullptr : (kShape & kShapeGx) != 0;
  const bool want_gy = kRt ? a.gy != nullptr : (kShape & kShapeGy) != 0;
  const V div = hn::Set(d, a.grad_divisor);
  const V div_lo = hn::Set(d, a.grad_divisor_lo);
  const V rdiv = hn::Set(
      d, scale_lo ? static_cast<T>(1.0 / (static_cast<double>(a.grad_divisor) +
                                          static_cast<double>(a.grad_divisor_lo)))
                  : T(1) / a.grad_divisor);
  const V one = hn::Set(d, T(1));
  // The inputs and outputs of one vector of lanes (absent ones null).
  struct Ptrs {
    const T *x, *y, *w, *p;
    T *l, *gx, *gy;
  };
  const auto at = [&](size_t i) LOSSD_LAMBDA_INLINE {
    return Ptrs{a.x + i,
                a.y + i,
                has_w ? a.w + i : nullptr,
                has_p ? a.p + i : nullptr,
                a.loss + i,
                want_gx ? a.gx + i : nullptr,
                want_gy ? a.gy + i : nullptr};
  };
  const auto compute = [&](const Ptrs& q, V* l, V* gx, V* gy) LOSSD_LAMBDA_INLINE {
    return BceVector(d, hn::LoadU(d, q.x), hn::LoadU(d, q.y), has_w ? hn::LoadU(d, q.w) : one,
                     has_p ? hn::LoadU(d, q.p) : one, has_w, has_p, div, div_lo, scale,
                     scale_lo, rdiv, want_gx, want_gy, l, gx, gy);
  };
  // Stores n_out <= N lanes of computed results, recomputing the rare lanes first.
  const auto finish = [&](hn::Mask<decltype(d)> ok, V l, V gx, V gy, const Ptrs& q,
                          size_t n_out) LOSSD_LAMBDA_INLINE {
    if (HWY_LIKELY(n_out == N && hn::AllTrue(d, ok))) {
      hn::StoreU(l, d, q.l);
      if (q.gx) hn::StoreU(gx, d, q.gx);
      if (q.gy) hn::StoreU(gy, d, q.gy);
      return;
    }
    HWY_ALIGN T rb[kMaxLanes], lb[kMaxLanes], gxb[kMaxLanes], gyb[kMaxLanes];
    hn::Store(hn::VecFromMask(d, hn::Not(ok)), d, rb);
    hn::Store(l, d, lb);
    hn::Store(gx, d, gxb);
    hn::Store(gy, d, gyb);
    FixRareLanes<T>(n_out, rb, q.x, q.y, q.w, q.p, a.grad_divisor, a.grad_divisor_lo, lb, gxb,
                    gyb);
    std::memcpy(q.l, lb, n_out * sizeof(T));
    if (q.gx) std::memcpy(q.gx, gxb, n_out * sizeof(T));
    if (q.gy) std::memcpy(q.gy, gyb, n_out * sizeof(T));
  };
  const auto eval = [&](const Ptrs& q, size_t n_out) LOSSD_LAMBDA_INLINE {
    V l, gx, gy;
    const auto ok = compute(q, &l, &gx, &gy);
    finish(ok, l, gx, gy, q, n_out);
  };
  const size_t n = static_cast<size_t>(a.n);
  size_t i = 0;
  // Two vectors per iteration, both computed before either is checked and stored: one basic
  // block with two independent dependency chains (three or four spill more on AVX2 and run
  // slower there).
  for (; i + 2 * N <= n; i += 2 * N) {
    const Ptrs q0 = at(i), q1 = at(i + N);
    V l0, gx0, gy0, l1, gx1, gy1;
    const auto ok0 = compute(q0, &l0, &gx0, &gy0);
    const auto ok1 = compute(q1, &l1, &gx1, &gy1);
    finish(ok0, l0, gx0, gy0, q0, N);
    finish(ok1, l1, gx1, gy1, q1, N);
  }
  for (; i + N <= n; i += N) eval(at(i), N);
  if (i < n) {
    // The tail goes through the same vector code on padded copies, so an element's result
    // never depends on where it sits.
    const size_t r = n - i;
    HWY_ALIGN T buf[4][kMaxLanes] = {};
    Ptrs q = at(i);
    std::memcpy(buf[0], q.x, r * sizeof(T));
    std::memcpy(buf[1], q.y, r * sizeof(T));
    if (has_w) std::memcpy(buf[2], q.w, r * sizeof(T));
    if (has_p) std::memcpy(buf[3], q.p, r * sizeof(T));
    q.x = buf[0];
    q.y = buf[1];
    q.w = has_w ? buf[2] : nullptr;
    q.p = has_p ? buf[3] : nullptr;
    eval(q, r);
  }
}

// TreeSumBlock (common.cc) with the float-to-double conversion folded into the first level and
// every level of h >= lanes done in vectors. The additions are the same, pair for pair, so the
// result is bitwise identical.
template <class DD, typename T>
HWY_INLINE hn::Vec<DD> LoadWide(DD dd, const T* p) {
  if constexpr (sizeof(T) == sizeof(double)) {
    return hn::LoadU(dd, p);
  } else {
    return hn::PromoteTo(dd, hn::LoadU(hn::Rebind<T, DD>(), p));
  }
}

template <typename T>
HWY_INLINE double BlockTreeSumImpl(const T* v, int64_t n, double* s) {
  const hn::ScalableTag<double> dd;
  const int64_t N = static_cast<int64_t>(hn::Lanes(dd));
  if (n <= 0) return 0.0;
  int64_t h = kReduceBlock / 2;
  while (h >= 1 && n <= h) h /= 2;
  if (h == 0) return static_cast<double>(v[0]);
  int64_t j = 0;
  if (n == 2 * h && h / 2 >= N) {
    // A full tree: the first two levels at once, s[j] = (v[j] + v[j+h]) + (v[j+q] + v[j+q+h]).
    const int64_t q = h / 2;
    for (; j < q; j += N) {
      const auto a = hn::Add(LoadWide(dd, v + j), LoadWide(dd, v + j + h));
      const auto b = hn::Add(LoadWide(dd, v + j + q), LoadWide(dd, v + j + q + h));
      hn::StoreU(hn::Add(a, b), dd, s + j);
    }
    h = q;
  } else {
    // First level: s[j] = v[j] + v[j + h] for j < n - h, s[j] = v[j] for n - h <= j < h.
    for (; j + N <= n - h; j += N) {
      hn::StoreU(hn::Add(LoadWide(dd, v + j), LoadWide(dd, v + j + h)), dd, s + j);
    }
    for (; j < n - h; ++j) s[j] = static_cast<double>(v[j]) + static_cast<double>(v[j + h]);
    for (; j < h; ++j) s[j] = static_cast<double>(v[j]);
  }
  // Remaining levels, two at a time where both are whole vectors.
  for (h /= 2; h >= 1;) {
    if (h >= 2 * N) {
      const int64_t q = h / 2;
      for (int64_t k = 0; k < q; k += N) {
        const auto a = hn::Add(hn::LoadU(dd, s + k), hn::LoadU(dd, s + k + h));
        const auto b = hn::Add(hn::LoadU(dd, s + k + q), hn::LoadU(dd, s + k + q + h));
        hn::StoreU(hn::Add(a, b), dd, s + k);
      }
      h = q / 2;
    } else if (h >= N) {
      for (int64_t k = 0; k < h; k += N) {
        hn::StoreU(hn::Add(hn::LoadU(dd, s + k), hn::LoadU(dd, s + k + h)), dd, s + k);
      }
      h /= 2;
    } else {
      for (int64_t k = 0; k < h; ++k) s[k] += s[k + h];
      h /= 2;
    }
  }
  return s[0];
}

// AVX2 (16 vector registers): one loop per shape. With the flags known only at run time the
// loop body branches on them, and values live across those branches are spilled to the stack
// (perf annotate: stores and reloads of ymm registers in the loop); AVX-512 has 32 registers,
// and there one loop for every shape is as fast (docs/perf.md).
template <typename T, int kShape>
HWY_NOINLINE void BceBlockShape(const BlockArgs<T>& a) {
  BceBlockImpl<T, kShape>(a);
}

template <typename T, int... kShapes>
HWY_INLINE void BceBlockByShape(const BlockArgs<T>& a, std::integer_sequence<int, kShapes...>) {
  using Fn = void (*)(const BlockArgs<T>&);
  static constexpr Fn kByShape[] = {&BceBlockShape<T, kShapes>...};
  kByShape[BceShape(a)](a);
}

void BceBlockF32(const BlockArgs<float>& a) {
#if HWY_TARGET == HWY_AVX2
  BceBlockByShape<float>(a, std::make_integer_sequence<int, 32>());
#else
  BceBlockImpl<float, kShapeRuntime>(a);
#endif
}
double BlockTreeSumF32(const float* v, int64_t n, double* s) { return BlockTreeSumImpl(v, n, s); }
double BlockTreeSumF64(const double* v, int64_t n, double* s) { return BlockTreeSumImpl(v, n, s); }
void BceBlockF64(const BlockArgs<double>& a) { BceBlockImpl<double, kShapeRuntime>(a); }
const char* TargetNameHere() { return hwy::TargetName(HWY_TARGET); }
bool HasNativeFmaHere() { return HWY_NATIVE_FMA != 0; }

}  // namespace HWY_NAMESPACE
}  // namespace lossd::kernels::internal
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace lossd::kernels::internal {

HWY_EXPORT(BceBlockF32);
HWY_EXPORT(BceBlockF64);
HWY_EXPORT(TargetNameHere);
HWY_EXPORT(HasNativeFmaHere);
HWY_EXPORT(BlockTreeSumF32);
HWY_EXPORT(BlockTreeSumF64);

void BceBlock(const BlockArgs<float>& a) { HWY_DYNAMIC_DISPATCH(BceBlockF32)(a); }
void BceBlock(const BlockArgs<double>& a) { HWY_DYNAMIC_DISPATCH(BceBlockF64)(a); }
double BlockTreeSum(const float* v, int64_t n, double* scratch) {
  return HWY_DYNAMIC_DISPATCH(BlockTreeSumF32)(v, n, scratch);
}
double BlockTreeSum(const double* v, int64_t n, double* scratch) {
  return HWY_DYNAMIC_DISPATCH(BlockTreeSumF64)(v, n, scratch);
}
const char* BceBlockTargetName() { return HWY_DYNAMIC_DISPATCH(TargetNameHere)(); }

bool LimitSimdTargets(const char* name) {
  const std::string_view n(name);
  if (n == "native") return true;
#if HWY_ARCH_X86
  int64_t avx512 = HWY_AVX3 | HWY_AVX3_DL;
#ifdef HWY_AVX3_ZEN4
  avx512 |= HWY_AVX3_ZEN4;
#endif
#ifdef HWY_AVX3_SPR
  avx512 |= HWY_AVX3_SPR;
#endif
  if (n == "avx2") {
    if ((hwy::SupportedTargets() & HWY_AVX2) == 0) return false;
    hwy::DisableTargets(avx512);
    return true;
  }
  if (n == "avx3") return (hwy::SupportedTargets() & HWY_AVX3) != 0;
#endif
  return false;
}
bool FloatBlockIsExact() { return HWY_DYNAMIC_DISPATCH(HasNativeFmaHere)(); }

}  // namespace lossd::kernels::internal
#endif  // HWY_ONCE
