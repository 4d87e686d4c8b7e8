// Helpers shared by the kernel tests.
#ifndef LOSSD_TESTS_KERNELS_TEST_UTIL_H_
#define LOSSD_TESTS_KERNELS_TEST_UTIL_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "lossd/kernels/bce.h"
#include "lossd/kernels/dtype.h"
#include "lossd/kernels/operand.h"

namespace lossd::testing {

// The bits of `v`: compares doubles bit for bit (the sign of a zero, a NaN's payload).
inline uint64_t Bits(double v) {
  uint64_t b;
  std::memcpy(&b, &v, sizeof(b));
  return b;
}

// LOSSD_TEST_SCALE (environment variable, default 1): the fraction of their random draws that
// the longest tests make, in (0, 1]. Only for slow machines and emulators: `make test-arm` runs
// the suite under qemu with 0.25 (docs/kernels.md section "ARM"). Unset, empty or out of range:
// 1, every draw.
inline double TestScale() {
  static const double scale = [] {
    const char* env = std::getenv("LOSSD_TEST_SCALE");
    if (env == nullptr || *env == '\0') return 1.0;
    char* end = nullptr;
    const double v = std::strtod(env, &end);
    return *end == '\0' && v > 0 && v <= 1 ? v : 1.0;
  }();
  return scale;
}

// n draws scaled by TestScale(), and never fewer than `at_least` (what the test's structure
// needs, such as enough elements for several tasks); n itself when TestScale() is 1.
inline int64_t ScaledCount(int64_t n, int64_t at_least = 1) {
  if (TestScale() >= 1) return n;
  const auto scaled = static_cast<int64_t>(static_cast<double>(n) * TestScale());
  return std::min(n, std::max(at_least, scaled));
}

// Distance in units in the last place between two floats or two doubles (0 when both NaN;
// the largest int64_t when one is, or when the distance does not fit).
template <typename F>
int64_t UlpDistanceIn(F a, F b) {
  if (std::isnan(a) || std::isnan(b)) {
    return std::isnan(a) && std::isnan(b) ? 0 : std::numeric_limits<int64_t>::max();
  }
  if (a == b) return 0;
  using I = std::conditional_t<sizeof(F) == 4, int32_t, int64_t>;
  // Keys ordered like the values; those of finite values and infinities differ by < 2^64.
  auto key = [](F f) {
    I i;
    std::memcpy(&i, &f, sizeof(F));
    return static_cast<int64_t>(i < 0 ? std::numeric_limits<I>::min() - i : i);
  };
  const int64_t ka = key(a), kb = key(b);
  const uint64_t d = ka >= kb ? static_cast<uint64_t>(ka) - static_cast<uint64_t>(kb)
                              : static_cast<uint64_t>(kb) - static_cast<uint64_t>(ka);
  return d > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())
             ? std::numeric_limits<int64_t>::max()
             : static_cast<int64_t>(d);
}
inline int64_t UlpDistance(float a, float b) { return UlpDistanceIn(a, b); }
inline int64_t UlpDistanceF64(double a, double b) { return UlpDistanceIn(a, b); }

// The float32 spacing at |v| (ulp of the float nearest v).
inline double UlpF32(double v) {
  const float f = std::fabs(static_cast<float>(v));
  if (!std::isfinite(f)) return std::numeric_limits<double>::infinity();
  return static_cast<double>(std::nextafter(f, std::numeric_limits<float>::infinity())) - f;
}

inline double UlpF64(double v) {
  const double a = std::fabs(v);
  return std::nextafter(a, std::numeric_limits<double>::infinity()) - a;
}

// The larger of the two terms of each gradient, in T (docs/design.md section 4: a gradient is
// within 4 ulp of it): {dl/dx: max(|w (1-y) s(x)|, |w p y s(-x)|), dl/dy: max(|w sp(x)|,
// |w p sp(-x)|)}. A NaN term gives 0. T = long double serves the float64 kernels.
template <typename T>
std::pair<T, T> GradTermScalesIn(T x, T y, T w, T p) {
  using std::exp;
  using std::fabs;
  using std::log1p;
  const T e = exp(-fabs(x));
  const T l = log1p(e);
  const T sp = x >= 0 ? 1 / (1 + e) : e / (1 + e);
  const T sn = x >= 0 ? e / (1 + e) : 1 / (1 + e);
  const T gxs = std::max(fabs(w * (1 - y) * sp), fabs(w * p * y * sn));
  const T gys = std::max(fabs(w * (std::max(x, T(0)) + l)), fabs(w * p * (std::max(-x, T(0)) + l)));
  return {std::isnan(gxs) ? T(0) : gxs, std::isnan(gys) ? T(0) : gys};
}

// The scales in double, for the float32 kernels.
inline std::pair<double, double> GradTermScales(double x, double y, double w, double p) {
  return GradTermScalesIn<double>(x, y, w, p);
}

// Dense grid of float32 logits: every 997th bit pattern with |x| in [1e-38, 3e38], both signs.
inline std::vector<float> DenseLogitGrid() {
  std::vector<float> xs;
  for (uint32_t bits = 0x00800000u; bits < 0x7f000000u; bits += 997u * 64u) {
    float f;
    std::memcpy(&f, &bits, 4);
    xs.push_back(f);
    xs.push_back(-f);
  }
  return xs;
}

// n elements of `dtype` as flat tensors: logits x, targets y, and weight w and pos_weight p of
// the full shape (nullptr: absent).
inline lossd::kernels::BceArgs FlatArgs(lossd::kernels::DType dtype, int64_t n, const void* x,
                                        const void* y, const void* w, const void* p,
                                        lossd::kernels::Reduction reduction) {
  lossd::kernels::BceArgs a;
  a.numel = n;
  a.dtype = a.targets_dtype = dtype;
  a.logits = x;
  a.targets = y;
  if (w != nullptr) a.weight = *lossd::kernels::MakeOperand("weight", dtype, w, {n}, {n});
  if (p != nullptr) a.pos_weight = *lossd::kernels::MakeOperand("pos_weight", dtype, p, {n}, {n});
  a.reduction = reduction;
  return a;
}

}  // namespace lossd::testing

#endif  // LOSSD_TESTS_KERNELS_TEST_UTIL_H_
