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

// The softplus and sigmoid values of one logit in the cancellation-free forms of
// docs/design.md section 3: e = exp(-|x|), l = log1p(e), sp(x) = max(x,0) + l,
// sp(-x) = max(-x,0) + l, s(x) = 1/(1+e) for x >= 0 else e/(1+e), and s(-x) likewise.
template <typename T>
struct LogitTerms {
  T sp_pos, sp_neg, s_pos, s_neg;
};

template <typename T>
LOSSD_HD LogitTerms<T> TermsOf(T x) {
  using std::exp;
  using std::fabs;
  using std::log1p;
  const T e = exp(-fabs(x));
  const T l = log1p(e);
  const T inv = T(1) / (T(1) + e);
  return {(x > T(0) ? x : T(0)) + l, (x < T(0) ? -x : T(0)) + l, x >= T(0) ? inv : e * inv,
          x >= T(0) ? e * inv : inv};
}

// a sp(x) + b sp(-x) into *l and a s(x) - b s(-x) into *g, a term with an exact-zero
// coefficient skipped (so that x = +-inf yields the limit, not inf * 0).
template <typename T>
LOSSD_HD void CombineTerms(const LogitTerms<T>& t, T a, T b, T* l, T* g) {
  *l = T(0);
  *g = T(0);
  if (a != T(0)) {
    *l = a * t.sp_pos;
    *g = a * t.s_pos;
  }
  if (b != T(0)) {
    *l += b * t.sp_neg;
    *g -= b * t.s_neg;
  }
}

// Computes, for one element, the loss and its gradients wrt x and y in type T, with the
// cancellation-free forms of docs/design.md section 3:
//   e = exp(-|x|), l = log1p(e), sp(x) = max(x,0) + l, sp(-x) = max(-x,0) + l,
//   s(x) = 1/(1+e) for x >= 0 else e/(1+e), s(-x) = 1 - s(x) computed without cancellation.
// Terms with an exact-zero coefficient are skipped (so x = +-inf yields the limit); any NaN
// input yields NaN outputs. Error: a few ulp of T for finite inputs.
template <typename T>
LOSSD_HD void BceElement(T x, T y, T w, T p, T* loss, T* gx, T* gy) {
  if (x != x || y != y || w != w || p != p) {
    const T nan = T(NAN);
    *loss = nan;
    *gx = nan;
    *gy = nan;
    return;
  }
  const LogitTerms<T> t = TermsOf(x);
  T l_val, gx_val, gy_val = -t.sp_pos;
  CombineTerms(t, T(1) - y, p * y, &l_val, &gx_val);
  if (p != T(0)) gy_val += p * t.sp_neg;
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


// The focal element's outputs times the weight: +0 (not -0 or NaN) for w = 0.
template <typename T>
LOSSD_HD void StoreWeightedFocal(T w, T lv, T g, T* loss, T* gx) {
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

// q^gamma for gamma 0, 1 and 2 (1, q and q q): true; false for other gammas, whose power the
// caller computes from -log q (FocalPowFromNegLog).
template <typename T>
LOSSD_HD bool FocalPowSmall(T q, T gamma, T* mod) {
  if (gamma == T(0)) {
    *mod = T(1);
  } else if (gamma == T(1)) {
    *mod = q;
  } else if (gamma == T(2)) {
    *mod = q * q;
  } else {
    return false;
  }
  return true;
}

// The last steps of the direct focal forms (FocalElementDirect, FocalElementHard), from the
// element's parts: alpha_t `at`, ce, q^gamma `mod`, the gradient's gamma-term factor v and
// (1-2y) ce' `dce`, sgn = 1-2y folded sign:
//   loss = at ce mod (0 where ce or at is 0),  dl/dx = (dce + sgn gamma ce v) mod at,
// both times the weight (StoreWeightedFocal).
template <typename T>
LOSSD_HD void FinishFocal(T w, T at, T ce, T mod, T gamma, T v, T dce, T sgn, T* loss, T* gx) {
  const T lv = ce == T(0) || at == T(0) ? T(0) : at * ce * mod;
  const T tq = gamma * ce * v;
  T g = (dce + sgn * tq) * mod;
  g *= at;
  StoreWeightedFocal(w, lv, g, loss, gx);
}

// q^gamma = exp(-gamma nlq) for nlq = -log q, given nlq's rounding error nlq_err: the rounding
// errors of nlq and of gamma * nlq corrected to first order, exp(-t - t_err) = e^-t (1 - t_err)
// (otherwise a relative error of about gamma nlq ulp). 0 where t is infinite (t_err is then
// NaN).
template <typename T>
LOSSD_HD T FocalPowFromNegLog(T gamma, T nlq, T nlq_err) {
  using std::exp;
  using std::fma;
  const T t = gamma * nlq;
  const T t_err = fma(gamma, nlq, -t) + gamma * nlq_err;
  T mod = exp(-t);
  if (mod != T(0)) mod -= mod * t_err;
  return mod;
}

// torchvision's sigmoid focal loss for one element, in log space, for any target y in [0, 1]
// (FocalElement uses it for NaN inputs, infinite logits and targets outside [0, 1] or tiny):
//   q = 1 - p_t = (1-y) s(x) + y s(-x),  log q = logaddexp(log(1-y) - sp(-x), log(y) - sp(x))
//   loss = w * alpha_t * ce * q^gamma,   ce = (1-y) sp(x) + y sp(-x)
//   dl/dx = w * alpha_t * [ ce' q^gamma + gamma (1-2y) exp((gamma-1) log q + log ce - sp(x)
//           - sp(-x)) ],  ce' = (1-y) s(x) - y s(-x)
// Zero-coefficient terms are skipped, so the gradient stays finite for gamma < 1 and infinite
// logits give the limits. alpha < 0 disables alpha_t. NaN inputs give NaN.
// Error: exp of a log-space sum carries the sum's rounding (about |sum| ulp of T) as a relative
// error, so it grows with gamma |log q| and |x|: in float64, a few ulp for |x| < 2 and 20-50
// ulp of the gradient in the tails (|x| about 11; docs/golden.md), still within 1e-13
// relative; with x in [-40, 40], up to 180 ulp of the loss and 410 ulp of the gradient's
// larger term at gamma 3.7 for hard labels, 224 and 422 for soft labels
// (FocalTest.HardLabelsMatchLongDouble, FocalTest.SoftLabelsMatchLongDouble).
template <typename T>
LOSSD_HD void FocalElementLogSpace(T x, T y, T w, T alpha, T gamma, T* loss, T* gx) {
  using std::exp;
  using std::log;
  using std::log1p;
  if (x != x || y != y || w != w) {
    *loss = T(NAN);
    *gx = T(NAN);
    return;
  }
  const T inf = T(INFINITY);
  const LogitTerms<T> t = TermsOf(x);
  const T sp_pos = t.sp_pos, sp_neg = t.sp_neg, s_pos = t.s_pos, s_neg = t.s_neg;
  const T a = T(1) - y;
  const T b = y;
  T ce, dce;
  CombineTerms(t, a, b, &ce, &dce);
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
  StoreWeightedFocal(w, lv, g, loss, gx);
}

// c ? a : b for finite a and b. On the host as a * c + b * (1 - c), which is exact for c in
// {0, 1} (the sign of a zero aside): compilers turn a floating-point select into a branch on
// targets without a blend instruction, and FocalElementDirect's conditions (the sign of x,
// y > 1/2) are as random as the data.
template <typename T>
LOSSD_HD T Pick(bool c, T a, T b) {
#if defined(__CUDA_ARCH__)
  return c ? a : b;
#else
  const T t = T(c);
  return a * t + b * (T(1) - t);
#endif
}

// FocalElementLogSpace for the elements FocalElement leaves to it (NaN inputs, infinite logits,
// targets outside [0, 1] or tiny), out of line on the host: inlined, its code would keep
// FocalElement from being inlined into the backends' element loops.
template <typename T>
#if defined(__CUDACC__)
LOSSD_HD
#else
__attribute__((noinline, cold))
#endif
void FocalElementFallback(T x, T y, T w, T alpha, T gamma, T* loss, T* gx) {
  FocalElementLogSpace<T>(x, y, w, alpha, gamma, loss, gx);
}

// a * b + c, rounded once where the target has a fused multiply-add (CUDA devices, hosts
// compiled for FMA), else twice: on a host without it std::fma is a library call, dearer than
// the rounding it saves.
template <typename T>
LOSSD_HD T MulAdd(T a, T b, T c) {
#if defined(__CUDA_ARCH__) || defined(__FMA__)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// torchvision's sigmoid focal loss for one element (the semantics of FocalElementLogSpace) in a
// direct form without logarithms for gamma 0, 1 and 2, one code path for hard (y = 0 or 1)
// and soft labels, for y in [0, 1] outside (0, 4 times the smallest normal), finite x and w
// not NaN (FocalElement gives the rest to FocalElementLogSpace). With A = max(y, 1-y) >= 1/2,
// B = min(y, 1-y) and z = x for y <= 1/2, z = -x for y > 1/2 (sgn = +-1: 1-2y = sgn (A-B)):
//   q = 1 - p_t = A s(z) + B s(-z),  ce = A sp(z) + B sp(-z),  loss = w alpha_t ce q^gamma,
//   dl/dx = sgn w alpha_t q^gamma [ A s(z) - B s(-z) + gamma (A-B) ce v ],  v = s(z) s(-z) / q,
// (the gamma term is gamma (1-2y) ce s(x) s(-x) q^(gamma-1), the derivative of q^gamma). q and
// ce are sums of non-negative terms, and q >= A s(z) >= s(z)/2 bounds v by 2 s(-z): no
// q^(gamma-1) is formed, and the gradient stays finite for gamma < 1. With e = exp(-|z|):
// q = N / (1+e), N = A + B e (z >= 0) or A e + B (z < 0), v = s(-z) c / N with c = 1 or e;
// 1 - y is kept as A + A_lo where it rounds. q^gamma is 1, q or q*q for gamma 0, 1 or 2, else
// exp(-gamma (-log q)) corrected to first order for the rounding of -log q and of the product,
// -log q being sp(-z) (exact terms) for a hard label, sp(-z) - log(A + B/e) for z < 0 and
// A e >= B, else l - log N with a Newton step on log N where |log N| > 2 (its rounding would
// otherwise be gamma |log N| / 2 ulp). For a hard label (A = 1, B = 0) the terms collapse to the
// closed form ce = sp(z), q = s(z), v = s(-z), dl/dx = (1-2y) w alpha_t q^gamma (s(z) +
// gamma ce s(-z)), with the roundings of FocalElementHard, bit for bit.
// Per element: exp, log1p and two divisions; for other gamma one more exp (hard labels), or a
// log, one or two exps and a division (soft labels). No branch depends on the element for
// gamma 0, 1 and 2 (selects by Pick), so a GPU warp with hard and soft labels takes one path.
// w = 0 gives +0, alpha_t = 0 a loss of 0. Tiny targets (where q would lose precision), NaN
// and infinite inputs are FocalElementLogSpace's: special values are the log-space ones.
// Error in float64 for finite x and w in [0, 1e3], in ulps of the loss and of the larger term
// of dl/dx (FocalGradTermScale: for soft labels the first two terms cancel):
// - hard labels (FocalTest.HardLabels*, on FocalElementHard's bits): within 9 and 15 ulp (10
//   ulp of dl/dx itself); over 2^23 draws 8.8 and 14.2 ulp, the worst at gamma 1 and 2, where
//   q's rounding counts once per factor; 4.4 and 8.3 for the other gamma.
// - soft labels (FocalTest.SoftLabels*, y near 0 and 1 included): within 12 and 18 ulp; over
//   2^23 draws 10.2 and 15.4 ulp (gamma 2), 9.6 and 14.8 (gamma 3.7), 5.7 and 13.7 (gamma 1),
//   5.4 and 8.0 (gamma 0.5); with MulAdd fused (the CUDA form, host libm) 8.9 and 15.5 at most
//   over 2^22 draws. The log-space form reaches 224 and 422 ulp there (gamma 3.7).
// Where an intermediate is subnormal (e.g. q^gamma below 2^-1022) the error is in units of the
// subnormal spacing instead, as in the log-space form. The backends evaluate it in double for
// every dtype and round once: float results are within 1 ulp of the exact value.
template <typename T>
LOSSD_HD void FocalElementDirect(T x, T y, T w, T alpha, T gamma, T* loss, T* gx) {
  using std::exp;
  using std::fabs;
  using std::log;
  using std::log1p;
  const T omy = T(1) - y;
  const T A_lo = (T(1) - omy) - y;  // 1 - y = omy + A_lo exactly; 0 for y >= 1/2
  const bool flip = omy < y;        // y > 1/2
  const T sgn = Pick(flip, T(-1), T(1));
  const T A = Pick(flip, y, omy);  // max(y, 1-y) >= 1/2; A + A_lo exactly
  const T B = Pick(flip, omy, y);  // min(y, 1-y) <= 1/2, exact
  const T d = fabs(T(1) - T(2) * y);  // A - B
  const T z = sgn * x;
  const bool pos = z >= T(0);
  const T e = exp(-fabs(z));
  // What does not need log1p(e) comes first: the divisions can run during the call.
  const T inv = T(1) / (T(1) + e);
  const T c = Pick(pos, T(1), e);  // s(z) (1 + e)
  const T N = MulAdd(Pick(pos, B, A), e, Pick(pos, A_lo, B)) + Pick(pos, A, T(0));  // q (1 + e)
  // s(z) / q = c / N: exactly 1 for a hard label (N = c).
  T u = T(1);
  if (gamma != T(0)) u = Pick(N > T(0), c, T(1)) / Pick(N > T(0), N, T(1));
  const T qz = c * inv;                   // s(z)
  const T rz = Pick(pos, e, T(1)) * inv;  // s(-z)
  const T q = N * inv;                    // 1 - p_t = A s(z) + B s(-z)
  // s(z) s(-z) / q times A - B: s(-z) for a hard label.
  const T vd = rz * u * d;
  // dl/dx / (w alpha_t q^gamma) without the gamma term: (1-2y) ce' = sgn (A s(z) - B s(-z)),
  // +0 where that is 0.
  const T sdce = sgn * MulAdd(A, qz, -(B * rz)) + T(0);
  // ce - l = A z (z >= 0, A with A_lo) or -B z (z < 0)
  const T ce_m = MulAdd(Pick(pos, A, -B), z, Pick(pos, A_lo, T(0)) * z);
  const T at = alpha >= T(0) ? alpha * y + ((T(1) - alpha) * omy + (T(1) - alpha) * A_lo) : T(1);
  const T l = log1p(e);
  const T ce = ce_m + l;  // A sp(z) + B sp(-z)
  T mod;
  if (!FocalPowSmall(q, gamma, &mod)) {
    T M = pos ? T(0) : -z;  // -log N, exact for a hard label (N = 1 or e)
    T M_err = T(0);
    if (B != T(0) && !pos && A * e >= B) {
      // q = s(z) (A + B e^-z): -log q = sp(-z) - log(A + B / e), the log's argument in [A, 2A].
      const T lk = log(A + B / e);
      M = -z - lk;
      M_err = (-z - M) - lk;  // Fast2Sum: |z| >= |lk|
    } else if (B != T(0)) {
      const T ln = log(N);
      M = -ln;
      if (fabs(ln) > T(2)) {
        // log N rounded carries up to half an ulp of |log N|: one Newton step,
        // log N = ln + (N - exp(ln)) / N to first order (N - exp(ln) is exact).
        M_err = (exp(ln) - N) / N;
      }
    }
    const T nlq = M + l;  // -log q
    const T bb = nlq - M;
    const T s_err = (M - (nlq - bb)) + (l - bb);  // 2Sum: the rounding error of M + l
    mod = FocalPowFromNegLog(gamma, nlq, s_err + M_err);
  }
  FinishFocal(w, at, ce, mod, gamma, vd, sdce, sgn, loss, gx);
}

// FocalElementDirect for a hard label (y = 0 or 1; x finite, w not NaN) in fewer operations and
// with the same roundings, so the same bits (FocalTest.DirectFormGivesHardLabelFormBits):
// z = (1-2y) x, ce = sp(z), q = s(z), dl/dx = (1-2y) w alpha_t q^gamma (s(z) + gamma ce s(-z)).
template <typename T>
LOSSD_HD void FocalElementHard(T x, T y, T w, T alpha, T gamma, T* loss, T* gx) {
  using std::exp;
  using std::fabs;
  using std::log1p;
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
  T mod;
  if (!FocalPowSmall(q, gamma, &mod)) {
    const T nlq = m_neg + l;  // -log q
    // The rounding error of m_neg + l (Fast2Sum: the larger operand first).
    const T big = m_neg > l ? m_neg : l;
    const T small = m_neg > l ? l : m_neg;
    mod = FocalPowFromNegLog(gamma, nlq, (big - nlq) + small);
  }
  const T at = alpha >= T(0) ? alpha * y + (T(1) - alpha) * (T(1) - y) : T(1);
  // ce' = (1-y) s(x) - y s(-x) = (1-2y) q, with the general form's zero: +0 for y = 1, q = 0.
  const T dce = sgn * q + T(0);
  FinishFocal(w, at, ce, mod, gamma, r, dce, sgn, loss, gx);
}

// Whether FocalElement leaves the element to FocalElementLogSpace: NaN inputs, infinite
// logits, targets outside [0, 1] or in (0, 4 times the smallest normal T). One comparison per
// condition (y > 0 would be a branch as random as hard labels are).
template <typename T>
LOSSD_HD bool FocalNeedsLogSpace(T x, T y, T w) {
  using std::fabs;
  const T inf = T(INFINITY);
  // Twice the smallest normal T (float or double); a literal, for device code.
  const T tiny = sizeof(T) == sizeof(float) ? T(0x1p-125) : T(0x1p-1021);
  return !(y >= T(0) && y <= T(1)) || !(fabs(x) < inf) || w != w || fabs(y - tiny) < tiny;
}

// torchvision's sigmoid focal loss for one element: FocalElementDirect, or FocalElementLogSpace
// for what the direct form leaves to it (NaN inputs, infinite logits, targets outside [0, 1]
// or in (0, 4 times the smallest normal)). The host takes FocalElementHard for hard labels
// (the same bits, about a fifth faster there); the device does not, so that a warp with hard
// and soft labels runs one path.
template <typename T>
LOSSD_HD void FocalElement(T x, T y, T w, T alpha, T gamma, T* loss, T* gx) {
  if (FocalNeedsLogSpace(x, y, w)) {
    FocalElementFallback<T>(x, y, w, alpha, gamma, loss, gx);
    return;
  }
#if !defined(__CUDA_ARCH__)
  if (y * (T(1) - y) == T(0)) {
    FocalElementHard<T>(x, y, w, alpha, gamma, loss, gx);
    return;
  }
#endif
  FocalElementDirect<T>(x, y, w, alpha, gamma, loss, gx);
}

// The per-element options of a loss: LossElement's argument, host and device (the CUDA
// launch parameters carry it by value). Filled once per call by ResolveLoss (resolved_loss.h);
// the float64 reference fills its own.
template <typename T>
struct ElementOptions {
  bool focal = false;
  bool has_ignore_index = false;
  T ignore_index = T(-100);
  // Label smoothing s (Keras; 0 = off): targets become y (1 - s) + s / 2. smooth_keep = 1 - s
  // and smooth_half = s * 0.5, formed once, for the kernels that take the two coefficients
  // (the fused CUDA kernel); LossElement forms the same expression from s.
  T smoothing = T(0);
  T smooth_keep = T(1);
  T smooth_half = T(0);
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
  const T s = o.smoothing;
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
