// Per-element BCE math of the CUDA backend for float32, float16 and bfloat16 inputs
// (float64 inputs use internal::BceElement<double> from kernels/src/bce_math.h directly).
// Internal header: not part of the public kernels API; compiled by nvcc for the device and by
// the host compiler for tests (tests/kernels/cuda_backend_test.cc measures its error here).
//
// Two element maths: BceElementF32 (all float, the default) and BceElementMixed (the
// transcendental parts in float, the combination in double). Both take exp(-|x|) from
// ExpNonPosParts rather than CUDA's expf (2 ulp); it uses only IEEE operations, so host and
// device compute its bits identically. How each stays within the 4-ulp bound of
// docs/design.md section 4: docs/kernels.md section 5.
#ifndef LOSSD_KERNELS_CUDA_BCE_DEVICE_MATH_H_
#define LOSSD_KERNELS_CUDA_BCE_DEVICE_MATH_H_

#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/src/bce_math.h"  // LOSSD_HD

namespace lossd::kernels::internal {

// 2^k as a float, for -126 <= k <= 127.
LOSSD_HD float Pow2F(int k) {
  const uint32_t bits = static_cast<uint32_t>(k + 127) << 23;
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

// 2^k as a double, for -1022 <= k <= 1023.
LOSSD_HD double Pow2D(int k) {
  const uint64_t bits = static_cast<uint64_t>(k + 1023) << 52;
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(bits));
#else
  double d;
  std::memcpy(&d, &bits, 8);
  return d;
#endif
}

// 1/v within 1 ulp for 1 <= v <= 2 (the hardware approximation on the device, so host and
// device bits may differ; callers refine it).
LOSSD_HD float RcpApproxF(float v) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r;
#else
  return 1.0f / v;
#endif
}

// exp(t) = m * 2^k for -125 <= t <= 0, m in [0.70, 1.42]; m within 0.76 ulp (measured over
// every float t in [-104, 0]). t < -125 or -inf: m = 0, k = 0 (exp(-125) * 1e6 < 2^-150, so
// no float result can see it). NaN: m = NaN. t > 0 is not supported. Every multiply-add is an
// explicit fmaf, so no compiler contraction changes the result between host and device.
LOSSD_HD float ExpNonPosPartsInRange(float t, int* k);  // -125 <= t <= 0 only

LOSSD_HD float ExpNonPosParts(float t, int* k) {
  if (!(t >= -125.0f)) {
    *k = 0;
    return t != t ? t : 0.0f;
  }
  return ExpNonPosPartsInRange(t, k);
}

LOSSD_HD float ExpNonPosPartsInRange(float t, int* k) {
  // t = k*ln2 + r, |r| <= ln2/2 (+ rounding); ln2_hi has 15 significant bits, so k*ln2_hi is
  // exact and the first step is exact by Sterbenz's lemma.
  const float kf = rintf(t * 1.44269504088896341f);  // in [-181, 0]
  float r = fmaf(kf, -kLn2HiF, t);  // ln2_hi = 0x3f317200
  r = fmaf(kf, -kLn2LoF, r);        // ln2_lo = 0x35bfbe8e
  // exp(r) - 1 - r = r^2 * q(r), q the Taylor series to r^6 (truncation < 0.02 ulp).
  float q = 2.48015873015873e-05f;        // 1/8!
  q = fmaf(q, r, 1.98412698412698e-04f);  // 1/7!
  q = fmaf(q, r, 1.38888888888889e-03f);  // 1/6!
  q = fmaf(q, r, 8.33333333333333e-03f);  // 1/5!
  q = fmaf(q, r, 4.16666666666667e-02f);  // 1/4!
  q = fmaf(q, r, 1.66666666666667e-01f);  // 1/3!
  q = fmaf(q, r, 0.5f);
  // 1 + r as hi + lo exactly (Fast2Sum, |r| < 1), so the only full rounding is the last add.
  const float hi = 1.0f + r;
  const float lo = (1.0f - hi) + r;
  const float r2 = r * r;
  *k = static_cast<int>(kf);
  return hi + fmaf(q, r2, lo);
}

// exp(t) as a float for t <= 0 (0.76 ulp; results below 2^-126 are rounded once more onto
// the subnormal grid). Used by tests; the kernel keeps the parts.
LOSSD_HD float ExpNonPos(float t) {
  if (!(t >= -104.0f)) return t != t ? t : 0.0f;  // exp(-104) < 2^-150: rounds to 0
  int k;
  const float m = ExpNonPosParts(t, &k);
  return (m * Pow2F(k + 64)) * 0x1p-64f;  // exact, then at most one rounding
}

// BceElementMixed's rare elements: any NaN, infinite x, or |x| > 125, where e = exp(-|x|) is
// below 2^-180 and taken as 0 (every term it scales is then below half the smallest float
// for w, p <= 1e3, so float results do not change). Applies internal::BceElement's rules:
// terms with an exact-zero coefficient are skipped, so x = +-inf gives the limits.
LOSSD_HD void BceElementSaturated(float xf, double y, double w, double p, double* loss, double* gx,
                                  double* gy) {
  if (xf != xf || y != y || w != w || p != p) {
    *loss = NAN;
    *gx = NAN;
    *gy = NAN;
    return;
  }
  const double x = xf;
  const double sp_pos = x > 0.0 ? x : 0.0;   // sp(x)
  const double sp_neg = x < 0.0 ? -x : 0.0;  // sp(-x)
  const double s_pos = x > 0.0 ? 1.0 : 0.0;  // s(x)
  const double s_neg = 1.0 - s_pos;          // s(-x)
  const double a = 1.0 - y;
  const double b = p * y;
  double l_val = 0.0, gx_val = 0.0, gy_val = -sp_pos;
  if (a != 0.0) {
    l_val = a * sp_pos;
    gx_val = a * s_pos;
  }
  if (b != 0.0) {
    l_val += b * sp_neg;
    gx_val -= b * s_neg;
  }
  if (p != 0.0) gy_val += p * sp_neg;
  if (w == 0.0) {
    l_val = 0.0;
    gx_val = 0.0;
    gy_val = 0.0;
  } else if (w != 1.0) {
    l_val *= w;
    gx_val *= w;
    gy_val *= w;
  }
  *loss = l_val;
  *gx = gx_val;
  *gy = gy_val;
}

// The element for float32, float16 and bfloat16 inputs: the transcendental parts in float
// (e = exp(-|x|) as m * 2^k from ExpNonPosParts, log1pf, a reciprocal), everything else in
// double, rounded once by the caller. Same contract as internal::BceElement (docs/design.md
// section 3): NaN in any input gives NaN outputs, infinite logits give the limits (those and
// |x| > 125 go to BceElementSaturated). For other x every term is finite, so a term with an
// exact-zero coefficient is an exact zero and needs no test.
// e is exact in double down to 2^-181, log1p(e) = e - e^2/2 for |x| > 17, and 1/(1+e) gets a
// Newton step in double (why this split: docs/kernels.md section 5). Error (2e7 random inputs,
// CUDA's log1pf emulated): loss within 2 ulp, gradients within 2.3 ulp of the larger term.
// y, w and p come in double: float64 targets stay exact, and the backend uploads small
// operands converted to double, which saves two conversions per element.
LOSSD_HD void BceElementMixed(float xf, double y, double w, double p, double* loss, double* gx,
                              double* gy) {
  const float ax = fabsf(xf);
  if (!(ax <= 125.0f) || y != y || w != w || p != p) {
    return BceElementSaturated(xf, y, w, p, loss, gx, gy);
  }
  int k;
  const float m = ExpNonPosPartsInRange(-ax, &k);
  const double e = static_cast<double>(m) * Pow2D(k);  // exact
  // As a float: exact for |x| <= 87; below, only 1 + ef matters and it rounds to 1 either way.
  const float ef = m * Pow2F(k > -126 ? k : -126);
  // log1p(e) = e - e^2/2 + e^3/3 - ...: for e < 2^-24 (|x| > 17) two terms are exact enough.
  const double l = ax > 17.0f ? fma(-0.5 * e, e, e) : static_cast<double>(log1pf(ef));
  const double d = 1.0 + e;
  const double r0 = static_cast<double>(RcpApproxF(1.0f + ef));
  const double inv = fma(r0, fma(-d, r0, 1.0), r0);  // 1/(1+e) to ~2^-44
  const double x = xf;
  const bool pos = xf >= 0.0f;
  const double sp_pos = (pos ? x : 0.0) + l;   // sp(x)
  const double sp_neg = (pos ? 0.0 : -x) + l;  // sp(-x)
  const double s_small = e * inv;
  const double s_pos = pos ? inv : s_small;  // s(x)
  const double s_neg = pos ? s_small : inv;  // s(-x)
  const double a = 1.0 - y;                  // exact
  const double b = p * y;                    // exact
  // A zero weight gives +0, as internal::BceElement does (w * a negative term would be -0).
  const double wz = w == 0.0 ? 0.0 : w;
  *loss = w == 0.0 ? 0.0 : wz * (a * sp_pos + b * sp_neg);
  *gx = w == 0.0 ? 0.0 : wz * (a * s_pos - b * s_neg);
  *gy = w == 0.0 ? 0.0 : wz * (p * sp_neg - sp_pos);
}

// a * b rounded, never fused with a following addition by the device compiler.
LOSSD_HD float MulRn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

// The coefficients of the all-float element for targets exact in float, with the weight folded
// in: a = w (1 - y) and b = w p y, each rounded once (w p is split exactly by an FMA, so b is
// not rounded twice).
LOSSD_HD void CoefF32(float y, float w, float p, float* a, float* b) {
  *a = fmaf(-w, y, w);
  const float wp = MulRn(w, p);
  *b = fmaf(wp, y, MulRn(fmaf(w, p, -wp), y));
}

// The label-smoothed target y (1 - s) + s/2 in double, as LossElement forms it (a product
// and a sum, each rounded; never fused by the device compiler). keep = 1 - s, half = s / 2.
LOSSD_HD double SmoothedTarget(double y, double keep, double half) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(__dmul_rn(y, keep), half);
#else
  return y * keep + half;
#endif
}

// The coefficients for a smoothed target ys, which float cannot hold: w (1 - ys) and w p ys
// formed in double (w p is exact there) and rounded once to float, so the element's error
// analysis is that of CoefF32. Adding +0 turns the -0 of a zero weight into +0, as CoefF32
// gives.
LOSSD_HD void CoefF32Smoothed(double ys, float w, float p, float* a, float* b) {
  const double wd = w;
  *a = static_cast<float>(wd * (1.0 - ys)) + 0.0f;
  *b = static_cast<float>(wd * static_cast<double>(p) * ys) + 0.0f;
}

// All-float element (the formulas of the CPU SIMD kernel, kernels/src/simd_block.cc, one lane)
// from the coefficients a = w (1-y) and b = w p y, each rounded once to float (CoefF32 for
// targets exact in float, CoefF32Smoothed for smoothed ones): for float32 and half inputs.
// Returns false (the outputs are then not meaningful) for the elements it does not handle:
// |x| > 80 or NaN x (exp(-|x|) would be subnormal in float), and any non-finite loss or dl/dx
// (NaN in y, w or p, or overflow); the caller then uses BceElementMixed. Otherwise every term is finite, so a zero
// coefficient gives an exact zero without tests, and a zero weight gives +0.
//   e = exp(-|x|), u = 1+e rounded with its exact error c, inv = 1/(u+c) (reciprocal seed and
//   a Newton step), log1p(e) = log(u) + c/u = hi + lo unrounded (k = [u > sqrt 2],
//   f = u/2^k - 1, f - f^2/2 + f^3 Q(f)), loss = (a+b) (hi+lo) + x P, dl/dx = inv (P - Q e)
//   with (P, Q) = (a, b) for x >= 0, (-b, -a) else; *log1p_e = hi + lo rounded, for
//   BceGradTargetsF32 (apart so that a kernel without dl/dy skips it). Why each step keeps the
//   4-ulp bound: docs/kernels.md section 5.
// Branch-free for the elements it handles (no divergence between hard and soft labels). Every
// multiply-add is an explicit fmaf and no product feeds a plain addition, so the host and the
// device compute the same bits, except the reciprocal's seed (refined by the Newton step).
// Error (host, 8e7 random draws with |x| up to 6, 20, 40 and 90, y in [0, 1], w and p in
// [0, 1e3]; tests/kernels/cuda_math_test.cc): loss within 3.1 ulp of the exact value,
// dl/dx within 3.3 and dl/dy within 3 ulp of the larger term.
LOSSD_HD bool BceElementF32Coef(float x, float a, float b, float* loss, float* gx,
                                float* log1p_e) {
  const float ax = fabsf(x);
  const bool near = ax <= 80.0f;  // false for NaN
  int k;
  // Elements beyond 80 are evaluated at 80 (and declined below): no branch, so the lanes of a
  // warp never split here.
  const float m = ExpNonPosPartsInRange(near ? -ax : -80.0f, &k);
  const float e = m * Pow2F(k);  // exact: k >= -116
  const float u = 1.0f + e;
  const float c = e - (u - 1.0f);  // exact
  const float r0 = RcpApproxF(u);
  const float t = fmaf(-u, r0, 1.0f);
  const float inv = fmaf(r0, fmaf(-c, r0, t), r0);  // 1/(1+e), for the sigmoids
  const float inv_u = fmaf(r0, t, r0);               // 1/u, for log1p's c/u
  // log1p(e) as hi + lo.
  const bool big = u > 1.41421356f;
  const float f = (big ? u * 0.5f : u) - 1.0f;
  const float f2 = f * f;
  const float f4 = f2 * f2;
  const float q01 = fmaf(kLog1pQ1, f, kLog1pQ0);
  const float q23 = fmaf(kLog1pQ3, f, kLog1pQ2);
  const float q45 = fmaf(kLog1pQ5, f, kLog1pQ4);
  const float q67 = fmaf(kLog1pQ7, f, kLog1pQ6);
  const float q = fmaf(fmaf(q67, f2, q45), f4, fmaf(q23, f2, q01));
  const float corr = fmaf(f2 * f, q, f2 * -0.5f);
  const float hi = (big ? kLn2HiF : 0.0f) + f;  // exact
  const float lo = fmaf(c, inv_u, corr) + (big ? kLn2LoF : 0.0f);
  // An overflowing w p makes b NaN or infinite, and the element is declined by the probe
  // below.
  const float ab = a + b;
  const bool pos = x >= 0.0f;
  const float pc = pos ? a : -b;
  const float qc = pos ? b : -a;
  const float lv = fmaf(ab, hi, fmaf(ab, lo, MulRn(x, pc)));
  const float g = MulRn(inv, fmaf(-qc, e, pc));
  const float probe = lv + g;
  *loss = lv;
  *gx = g;
  *log1p_e = hi + lo;
  return near && probe - probe == 0.0f;  // probe finite
}

// BceElementF32Coef with the coefficients of float targets (CoefF32).
LOSSD_HD bool BceElementF32(float x, float y, float w, float p, float* loss, float* gx,
                            float* log1p_e) {
  float a, b;
  CoefF32(y, w, p, &a, &b);
  return BceElementF32Coef(x, a, b, loss, gx, log1p_e);
}

// dl/dy of an element that BceElementF32 handled, from its log1p_e: w (p sp(-x) - sp(x)), +0
// for a zero weight.
LOSSD_HD float BceGradTargetsF32(float x, float w, float p, float log1p_e) {
  const float sp_pos = (x > 0.0f ? x : 0.0f) + log1p_e;
  const float sp_neg = (x < 0.0f ? -x : 0.0f) + log1p_e;
  return w == 0.0f ? 0.0f : w * fmaf(p, sp_neg, -sp_pos);
}

// dl/dy of the raw target under label smoothing, keep = 1 - s: keep w (p sp(-x) - sp(x)), the
// product formed in double and rounded once (as many roundings as BceGradTargetsF32); +0 for a
// zero weight.
LOSSD_HD float BceGradTargetsF32Smoothed(float x, float w, float p, float log1p_e, double keep) {
  const float sp_pos = (x > 0.0f ? x : 0.0f) + log1p_e;
  const float sp_neg = (x < 0.0f ? -x : 0.0f) + log1p_e;
  return w == 0.0f ? 0.0f
                   : static_cast<float>(static_cast<double>(w) * keep *
                                        static_cast<double>(fmaf(p, sp_neg, -sp_pos)));
}

}  // namespace lossd::kernels::internal

#endif  // LOSSD_KERNELS_CUDA_BCE_DEVICE_MATH_H_
