// Helpers shared by the CUDA tests (cuda_backend_test.cc, cuda_math_test.cc): tolerances of
// docs/design.md section 4 per dtype, a checker against the float64 reference, random and special
// float32 problems, and the float32 element as the fused kernel computes it.
#ifndef LOSSD_TESTS_KERNELS_CUDA_TEST_UTIL_H_
#define LOSSD_TESTS_KERNELS_CUDA_TEST_UTIL_H_

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <random>
#include <utility>
#include <vector>

#include "../cuda/bce_device_math.h"  // kernels/cuda, reached through the kernels/src include dir
#include "lossd/kernels/backend.h"
#include "lossd/kernels/bce.h"
#include "lossd/kernels/dtype.h"
#include "lossd/kernels/operand.h"
#include "lossd/kernels/reference.h"
#include "tests/kernels/test_util.h"

// Skips a test when no CUDA device is usable (development machines and CI have none).
#define SKIP_WITHOUT_GPU()                                                          \
  do {                                                                              \
    if (CudaDeviceCount() == 0) {                                                   \
      GTEST_SKIP() << "no CUDA device (CudaDeviceCount() == 0): CUDA test skipped"; \
    }                                                                               \
  } while (0)

namespace lossd::kernels::cuda_test {

using lossd::testing::GradTermScales;
using lossd::testing::UlpDistance;
using lossd::testing::UlpF32;
using lossd::testing::UlpF64;

inline constexpr float kInf = std::numeric_limits<float>::infinity();
inline constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

inline std::unique_ptr<Backend> Cuda(bool float_math = false) {
  CudaOptions options;
  options.float_math = float_math;
  auto b = MakeCudaBackend(options);
  EXPECT_TRUE(b.ok()) << b.status();
  return b.ok() ? std::move(*b) : nullptr;
}

inline double OperandAt(const Operand& op, int64_t i) {
  return op.data == nullptr ? 1.0 : LoadAsDouble(op.dtype, op.data, (i / op.inner) % op.period);
}

// Spacing of the output dtype at |v| (for half types: the dtype's own ulp).
inline double UlpOf(DType dtype, double v) {
  const double a = std::fabs(v);
  switch (dtype) {
    case DType::kFloat32:
      return UlpF32(v);
    case DType::kFloat64:
      return UlpF64(v);
    case DType::kFloat16:
      return a < 0x1p-14 ? 0x1p-24 : std::ldexp(1.0, std::ilogb(a) - 10);
    case DType::kBFloat16:
      return a < 0x1p-126 ? 0x1p-133 : std::ldexp(1.0, std::ilogb(a) - 7);
  }
  return 0;
}

// Per-dtype tolerances: float32 is the 4-ulp promise; float64 computes in double with CUDA's
// exp/log1p (1-2 ulp each), compared with 8 ulp; half types compute in float32 and round once,
// so they are within 1 ulp of their own type (plus the float32 error of a cancelling gradient).
struct Tolerance {
  double ulps;      // in ulps of the output dtype (of the value, or of the larger term)
  double f32_ulps;  // extra, in float32 ulps of the larger term (half types only)
};
inline Tolerance TolFor(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return {4, 0};
    case DType::kFloat64:
      return {8, 0};
    default:
      return {1, 4};
  }
}

inline bool Close(double got, double ref, double bound) {
  if (std::isnan(ref) || std::isnan(got)) return std::isnan(ref) && std::isnan(got);
  if (std::isinf(ref) || std::isinf(got)) return got == ref;
  return std::fabs(got - ref) <= bound;
}

// Checks CUDA outputs (in args.dtype, kNone loss or none) against ReferenceBce. Gradients are
// those of args.reduction. Returns the largest float32 ulp distance of the loss (float32 only).
inline int64_t ExpectMatchesReference(const BceArgs& a, const void* loss, const void* gx,
                                      const void* gy) {
  const int64_t n = a.numel;
  std::vector<double> rl(n), rgx(n), rgy(n);
  ReferenceBce(a, rl.data(), rgx.data(), rgy.data());
  const Tolerance tol = TolFor(a.dtype);
  const double div = a.reduction == Reduction::kMean ? static_cast<double>(n) : 1.0;
  int64_t max_ulp = 0, failures = 0;
  for (int64_t i = 0; i < n && failures < 10; ++i) {
    const double x = LoadAsDouble(a.dtype, a.logits, i);
    const double y = LoadAsDouble(a.targets_dtype, a.targets, i);
    const double w = OperandAt(a.weight, i), p = OperandAt(a.pos_weight, i);
    const auto [sx, sy] = GradTermScales(x, y, w, p);
    auto at = [&] {
      return ::testing::Message() << "element " << i << ": x=" << x << " y=" << y << " w=" << w
                                  << " p=" << p << " dtype=" << DTypeName(a.dtype);
    };
    if (loss != nullptr) {
      const double got = LoadAsDouble(a.dtype, loss, i);
      if (a.dtype == DType::kFloat32) {
        const int64_t d = UlpDistance(static_cast<float>(got), static_cast<float>(rl[i]));
        max_ulp = std::max(max_ulp, d);
        if (d > 4) {
          ++failures;
          ADD_FAILURE() << at() << " loss " << got << " vs " << rl[i] << ": " << d << " ulp";
        }
      } else if (!Close(got, rl[i], tol.ulps * UlpOf(a.dtype, rl[i]))) {
        ++failures;
        ADD_FAILURE() << at() << " loss " << got << " vs reference " << rl[i];
      }
    }
    const struct {
      const char* name;
      const void* out;
      double ref, scale;
    } grads[] = {{"grad_logits", gx, rgx[i], sx / div}, {"grad_targets", gy, rgy[i], sy / div}};
    for (const auto& g : grads) {
      if (g.out == nullptr) continue;
      const double got = LoadAsDouble(a.dtype, g.out, i);
      const double bound = a.dtype == DType::kFloat32 || a.dtype == DType::kFloat64
                               ? tol.ulps * UlpOf(a.dtype, g.scale)
                               : tol.ulps * UlpOf(a.dtype, g.ref) + tol.f32_ulps * UlpF32(g.scale);
      // A reference beyond the float32 range must give the infinity it rounds to.
      const bool overflows = a.dtype == DType::kFloat32 && std::isfinite(g.ref) &&
                             std::isinf(static_cast<float>(g.ref));
      if (overflows ? got != static_cast<double>(static_cast<float>(g.ref))
                    : !Close(got, g.ref, bound)) {
        ++failures;
        ADD_FAILURE() << at() << " " << g.name << " " << got << " vs reference " << g.ref
                      << " (bound " << bound << ", larger term " << g.scale << ")";
      }
    }
  }
  return max_ulp;
}

// Random float32 problem: logits over many magnitudes plus specials, hard and soft labels.
struct F32Problem {
  int64_t rows = 0, c = 0, n = 0;
  std::vector<float> x, y, w, p;
};

inline F32Problem MakeF32Problem(int64_t rows, int64_t c, uint64_t seed, bool nonfinite) {
  F32Problem pr;
  pr.rows = rows;
  pr.c = c;
  pr.n = rows * c;
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(0, 1);
  std::vector<float> specials = {0.0f,    -0.0f, 30.0f,  -30.0f, 1e30f, -1e30f,  1e-30f,
                                 -1e-30f, 88.0f, -88.0f, -17.0f, 17.0f, -103.0f, -87.5f};
  if (nonfinite) specials.insert(specials.end(), {kInf, -kInf});
  for (int64_t i = 0; i < pr.n; ++i) {
    const double r = u(rng);
    pr.x.push_back(
        r < 0.05 ? specials[rng() % specials.size()]
                 : static_cast<float>(std::pow(10.0, -8 + 12 * u(rng)) * (u(rng) < 0.5 ? -1 : 1)));
    const double t = u(rng);
    pr.y.push_back(t < 0.4 ? 0.0f : t < 0.8 ? 1.0f : static_cast<float>(u(rng)));
  }
  for (int64_t k = 0; k < std::max(rows, c); ++k) {
    pr.w.push_back(k % 7 == 0 ? 0.0f : static_cast<float>(1e3 * u(rng)));
    pr.p.push_back(k % 5 == 0 ? 0.0f : static_cast<float>(1e3 * u(rng)));
  }
  return pr;
}

inline BceArgs F32Args(const F32Problem& pr, Reduction r, const std::vector<int64_t>& wshape,
                       const std::vector<int64_t>& pshape) {
  BceArgs a;
  a.numel = pr.n;
  a.logits = pr.x.data();
  a.targets = pr.y.data();
  const std::vector<int64_t> shape = {pr.rows, pr.c};
  a.weight = *MakeOperand("weight", DType::kFloat32, pr.w.data(), wshape, shape);
  a.pos_weight = *MakeOperand("pos_weight", DType::kFloat32, pr.p.data(), pshape, shape);
  a.reduction = r;
  return a;
}

// One float32 element as the fused kernel computes it: BceElementF32 when `all_float` and it
// handles the element, else BceElementMixed rounded to float. Returns whether BceElementF32 did.
inline bool F32Element(float x, float y, float w, float p, float* l, float* gx, float* gy,
                       bool all_float) {
  float l1p;
  if (all_float && internal::BceElementF32(x, y, w, p, l, gx, &l1p)) {
    *gy = internal::BceGradTargetsF32(x, w, p, l1p);
    return true;
  }
  double dl, dx, dy;
  internal::BceElementMixed(x, y, w, p, &dl, &dx, &dy);
  *l = static_cast<float>(dl);
  *gx = static_cast<float>(dx);
  *gy = static_cast<float>(dy);
  return false;
}

// Every combination of special logits, targets, weights and pos_weights, as full tensors.
struct SpecialGrid {
  std::vector<float> x, y, w, p;
  SpecialGrid() {
    const float xs[] = {0.0f,   -0.0f, 30.0f, -30.0f, 1e30f,   -1e30f, kInf,    -kInf,  kNaN, 17.0f,
                        -17.0f, 17.5f, 88.0f, -88.0f, -103.5f, 124.0f, -126.0f, 1e-30f, 1e-8f};
    const float ys[] = {0.0f, 1.0f, 0.25f, 0.5f, 0.75f, 1e-3f, kNaN};
    const float ws[] = {0.0f, 1.0f, 3.5f, 1e3f, kNaN};
    const float ps[] = {0.0f, 1.0f, 2.5f, 1e3f};
    for (float xv : xs)
      for (float yv : ys)
        for (float wv : ws)
          for (float pv : ps) {
            x.push_back(xv);
            y.push_back(yv);
            w.push_back(wv);
            p.push_back(pv);
          }
  }
};

}  // namespace lossd::kernels::cuda_test

#endif  // LOSSD_TESTS_KERNELS_CUDA_TEST_UTIL_H_
