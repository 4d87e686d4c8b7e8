// Per-element BCE-with-logits math shared by the reference, the CPU and the CUDA backends.
// Internal header: not part of the public kernels API.
#ifndef LOSSD_KERNELS_SRC_BCE_MATH_H_
#define LOSSD_KERNELS_SRC_BCE_MATH_H_

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define LOSSD_HD __host__ __device__ __forceinline__
#else
#define LOSSD_HD inline
#endif

namespace lossd::kernels::internal {

// Constants of the float32 kernels, shared by the SIMD CPU kernel (simd_block.cc) and the CUDA
// all-float element (kernels/cuda/bce_device_math.h).
// ln 2 = kLn2HiF (16 significant bits, so q * kLn2HiF is exact for |q| < 2^8) + kLn2LoF.
inline constexpr float kLn2HiF = 0.693145751953125f;
inline constexpr float kLn2LoF = 1.4286068203094172e-06f;
// log1p(f) = f - f^2/2 + f^3 Q(f) for f in [-0.293, 0.415], Q(f) = kLog1pQ0 + kLog1pQ1 f + ...
// + kLog1pQ7 f^7: a minimax fit of the relative error (2^-27.2).
inline constexpr float kLog1pQ0 = 0.3333333134651184f;
inline constexpr float kLog1pQ1 = -0.2500081956386566f;
inline constexpr float kLog1pQ2 = 0.2000122368335724f;
inline constexpr float kLog1pQ3 = -0.16623379290103912f;
inline constexpr float kLog1pQ4 = 0.14201843738555908f;
inline constexpr float kLog1pQ5 = -0.13160046935081482f;
inline constexpr float kLog1pQ6 = 0.12760886549949646f;
inline constexpr float kLog1pQ7 = -0.07633990049362183f;

// The normalize divisor (paddle): the elements kept, numel minus those whose target equals
// ignore_index, at least 1. Every backend divides by it the same way.
LOSSD_HD double KeptCount(int64_t numel, int64_t ignored) {
  const int64_t kept = numel - ignored;
  return kept > 0 ? static_cast<double>(kept) : 1.0;
}

// Computes, for one element, the loss and its gradients wrt x and y in type T, with the
// cancellation-free forms of DESIGN.md section 4:
//   e = exp(-|x|), l = log1p(e), sp(x) = max(x,0) + l, sp(-x) = max(-x,0) + l,
//   s(x) = 1/(1+e) for x >= 0 else e/(1+e), s(-x) = 1 - s(x) computed without cancellation.
// Terms with an exact-zero coefficient are skipped (so x = +-inf yields the limit); any NaN
// input yields NaN outputs. Error: a few ulp of T for finite inputs.
template <typename T>
LOSSD_HD void BceElement(T x, T y, T w, T p, T* loss, T* gx, T* gy) {
  using std::exp;
  using std::fabs;
  using std::log1p;
  if (x != x || y != y || w != w || p != p) {
    const T nan = T(NAN);
    *loss = nan;
    *gx = nan;
    *gy = nan;
    return;
  }
  const T e = exp(-fabs(x));
  const T l = log1p(e);
  const T sp_pos = (x > T(0) ? x : T(0)) + l;   // sp(x)
  const T sp_neg = (x < T(0) ? -x : T(0)) + l;  // sp(-x)
  const T inv = T(1) / (T(1) + e);
  const T s_pos = x >= T(0) ? inv : e * inv;    // s(x)
  const T s_neg = x >= T(0) ? e * inv : inv;    // s(-x)
  const T a = T(1) - y;
  const T b = p * y;
  T l_val = T(0), gx_val = T(0), gy_val = -sp_pos;
  if (a != T(0)) {
    l_val = a * sp_pos;
    gx_val = a * s_pos;
  }
  if (b != T(0)) {
    l_val += b * sp_neg;
    gx_val -= b * s_neg;
  }
  if (p != T(0)) gy_val += p * sp_neg;
  if (w == T(0)) {
    l_val = T(0);
    gx_val = T(0);
    gy_val = T(0);
  } else if (w != T(1)) {
    l_val *= w;
    gx_val *= w;
    gy_val *= w;
  }
  *loss = l_val;
  *gx = gx_val;
  *gy = gy_val;
}


// torchvision's sigmoid focal loss for one element, in log space, for any target y in [0, 1]
// (FocalElement uses it for soft labels):
//   q = 1 - p_t = (1-y) s(x) + y s(-x),  log q = logaddexp(log(1-y) - sp(-x), log(y) - sp(x))
//   loss = w * alpha_t * ce * q^gamma,   ce = (1-y) sp(x) + y sp(-x)
//   dl/dx = w * alpha_t * [ ce' q^gamma + gamma (1-2y) exp((gamma-1) log q + log ce - sp(x)
//           - sp(-x)) ],  ce' = (1-y) s(x) - y s(-x)
// Zero-coefficient terms are skipped, so the gradient stays finite for gamma < 1 and infinite
// logits give the limits. alpha < 0 disables alpha_t. NaN inputs give NaN.
// Error: exp of a log-space sum carries the sum's rounding (about |sum| ulp of T) as a relative
// error, so it grows with gamma |log q| and |x|: in float64, a few ulp for |x| < 2 and 20-50
// ulp of the gradient in the tails (|x| about 11; docs/golden.md), still within 1e-13
// relative; for hard labels with x in [-40, 40], up to 180 ulp of the loss and 410 ulp of the
// gradient's larger term at gamma 3.7 (FocalTest.HardLabelsMatchLongDouble).
template <typename T>
LOSSD_HD void FocalElementLogSpace(T x, T y, T w, T alpha, T gamma, T* loss, T* gx) {
  using std::exp;
  using std::fabs;
  using std::log;
  using std::log1p;
  if (x != x || y != y || w != w) {
    *loss = T(NAN);
    *gx = T(NAN);
    return;
  }
  const T inf = T(INFINITY);
  const T e = exp(-fabs(x));
  const T l = log1p(e);
  const T sp_pos = (x > T(0) ? x : T(0)) + l;
  const T sp_neg = (x < T(0) ? -x : T(0)) + l;
  const T inv = T(1) / (T(1) + e);
  const T s_pos = x >= T(0) ? inv : e * inv;
  const T s_neg = x >= T(0) ? e * inv : inv;
  const T a = T(1) - y;
  const T b = y;
  T ce = T(0), dce = T(0);
  if (a != T(0)) {
    ce = a * sp_pos;
    dce = a * s_pos;
  }
  if (b != T(0)) {
    ce += b * sp_neg;
    dce -= b * s_neg;
  }
  const T t1 = a > T(0) ? log(a) - sp_neg : -inf;
  const T t2 = b > T(0) ? log(b) - sp_pos : -inf;
  const T hi = t1 > t2 ? t1 : t2;
  const T lo = t1 > t2 ? t2 : t1;
  const T log_q = hi == -inf ? -inf : (lo == -inf ? hi : hi + log1p(exp(lo - hi)));
  const T mod = gamma == T(0) ? T(1) : exp(gamma * log_q);
  const T at = alpha >= T(0) ? alpha * y + (T(1) - alpha) * (T(1) - y) : T(1);
  // ce is infinite only at an infinite logit whose term has a positive coefficient, where q > 0:
  // the limit is +inf even when q^gamma underflows to 0 (and 0 when at = 0, a loss that is 0
  // for every x).
  T lv = ce == T(0) || at == T(0) ? T(0) : ce == inf ? inf : at * ce * mod;
  T g = dce * mod;
  const T dq = (a - b) * s_pos * s_neg;
  if (gamma != T(0) && ce != T(0) && dq != T(0) && ce < inf) {
    const T mag = exp((gamma - T(1)) * log_q + log(ce) - sp_pos - sp_neg);
    g += gamma * (a - b) * mag;
  }
  g *= at;
  if (w == T(0)) {
    lv = T(0);
    g = T(0);
  } else if (w != T(1)) {
    lv *= w;
    g *= w;
  }
  *loss = lv;
  *gx = g;
}

// torchvision's sigmoid focal loss for one element (the semantics of FocalElementLogSpace),
// with a shorter form for hard labels (y = 0 or 1, the usual detection targets) that needs no
// logarithm; soft labels and NaN inputs go to FocalElementLogSpace. With z = x for y = 0 and
// z = -x for y = 1, the terms of the log-space form collapse to
//   ce = sp(z),  q = 1 - p_t = s(z),  log q = -sp(-z),  loss = w * alpha_t * ce * q^gamma,
//   dl/dx = (1-2y) * w * alpha_t * q^gamma * (s(z) + gamma ce s(-z)),
// two terms of one sign (gamma ce q^(gamma-1) s(x) s(-x) = gamma ce q^gamma s(-z)). q^gamma is
// q or q*q for gamma = 1 or 2, else exp(-gamma sp(-z)) corrected to first order for the
// rounding of sp(-z) and of the product (which would otherwise add a relative error of about
// gamma sp(-z) ulp). Per element: exp, log1p and one division, plus one exp for gamma other
// than 0, 1 and 2. Special values give what FocalElementLogSpace gives, bit for bit: NaN for
// NaN inputs, the limits at infinite logits (+inf loss where ce is infinite, 0 where alpha_t
// is), +0 for w = 0, finite gradients for gamma < 1.
// Error in float64 for hard labels, finite x and w in [0, 1e3] (FocalTest.HardLabels*): loss
// within 9 ulp, dl/dx within 15 ulp of its larger term (10 ulp of dl/dx itself); the worst
// cases are at gamma 1 and 2, where q's rounding counts once per factor (over 2^23 draws: 8.8
// and 14.2 ulp; 4.4 and 8.3 for the other gamma). Where an intermediate is subnormal (e.g.
// q^gamma below 2^-1022) the error is in units of the subnormal spacing instead, as in the
// log-space form. The backends evaluate it in double for every dtype and round once: float
// results are within 1 ulp of the exact value.
template <typename T>
LOSSD_HD void FocalElement(T x, T y, T w, T alpha, T gamma, T* loss, T* gx) {
  using std::exp;
  using std::fabs;
  using std::fma;
  using std::log1p;
  if (!(y == T(0) || y == T(1)) || x != x || w != w) {
    FocalElementLogSpace<T>(x, y, w, alpha, gamma, loss, gx);
    return;
  }
  const T inf = T(INFINITY);
  const T sgn = T(1) - T(2) * y;  // 1 - 2y: +1 for y = 0, -1 for y = 1
  const T z = sgn * x;
  const T e = exp(-fabs(z));
  const T l = log1p(e);
  const T inv = T(1) / (T(1) + e);
  const T q = z >= T(0) ? inv : e * inv;  // s(z) = 1 - p_t
  const T r = z >= T(0) ? e * inv : inv;  // s(-z) = p_t
  const T m = z > T(0) ? z : T(0);
  const T m_neg = z < T(0) ? -z : T(0);
  const T ce = m + l;  // sp(z); -log q = sp(-z) = m_neg + l
  T mod = T(1);
  if (gamma == T(1)) {
    mod = q;
  } else if (gamma == T(2)) {
    mod = q * q;
  } else if (gamma != T(0)) {
    const T nlq = m_neg + l;  // -log q
    // The rounding error of m_neg + l (Fast2Sum: the larger operand first) and of gamma * nlq.
    const T big = m_neg > l ? m_neg : l;
    const T small = m_neg > l ? l : m_neg;
    const T t = gamma * nlq;
    const T t_err = fma(gamma, nlq, -t) + gamma * ((big - nlq) + small);
    mod = exp(-t);
    // exp(-t - t_err) = mod (1 - t_err); mod = 0 where t is infinite (t_err is then NaN).
    if (mod != T(0)) mod -= mod * t_err;
  }
  const T at = alpha >= T(0) ? alpha * y + (T(1) - alpha) * (T(1) - y) : T(1);
  // As in FocalElementLogSpace: +inf where ce is (z = +inf, q = 1), 0 where ce or at is 0.
  T lv = ce == T(0) || at == T(0) ? T(0) : ce == inf ? inf : at * ce * mod;
  // The gamma term is 0 where s(-z) = 0, except at ce = inf, where it is dropped (the limit).
  const T tq = ce < inf ? gamma * ce * r : T(0);
  // ce' = (1-y) s(x) - y s(-x) = (1-2y) q, with the general form's zero: +0 for y = 1, q = 0.
  const T dce = sgn * q + T(0);
  T g = (dce + sgn * tq) * mod;
  g *= at;
  if (w == T(0)) {
    lv = T(0);
    g = T(0);
  } else if (w != T(1)) {
    lv *= w;
    g *= w;
  }
  *loss = lv;
  *gx = g;
}

// Per-element options shared by every backend.
template <typename T>
struct ElementOptions {
  bool focal = false;
  bool has_ignore_index = false;
  T ignore_index = T(-100);
  T label_smoothing = T(0);
  T alpha = T(0.25);
  T gamma = T(2);
};

// One element with every option: ignore_index (on the raw target), label smoothing, then BCE or
// focal. For focal, *gy is set to NaN (dl/dy is not offered for it).
template <typename T>
LOSSD_HD void LossElement(const ElementOptions<T>& o, T x, T y_raw, T w, T p, T* loss, T* gx,
                          T* gy) {
  if (o.has_ignore_index && y_raw == o.ignore_index) {
    *loss = T(0);
    *gx = T(0);
    *gy = T(0);
    return;
  }
  const T s = o.label_smoothing;
  const T y = s != T(0) ? y_raw * (T(1) - s) + s * T(0.5) : y_raw;
  if (o.focal) {
    FocalElement<T>(x, y, w, o.alpha, o.gamma, loss, gx);
    *gy = T(NAN);
    return;
  }
  BceElement<T>(x, y, w, p, loss, gx, gy);
  if (s != T(0)) *gy *= (T(1) - s);
}

}  // namespace lossd::kernels::internal

#endif  // LOSSD_KERNELS_SRC_BCE_MATH_H_
