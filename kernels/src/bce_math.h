// Per-element BCE-with-logits math shared by the reference, the CPU and the CUDA backends.
// Internal header: not part of the public kernels API.
#ifndef LOSSD_KERNELS_SRC_BCE_MATH_H_
#define LOSSD_KERNELS_SRC_BCE_MATH_H_

#include <cmath>

#if defined(__CUDACC__)
#define LOSSD_HD __host__ __device__ __forceinline__
#else
#define LOSSD_HD inline
#endif

namespace lossd::kernels::internal {

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

}  // namespace lossd::kernels::internal

#endif  // LOSSD_KERNELS_SRC_BCE_MATH_H_
