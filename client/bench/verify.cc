#include "client/bench/verify.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace lossd::bench {

double UlpOf(ValueType type, double v) {
  const double a = std::fabs(v);
  if (!std::isfinite(a)) return std::numeric_limits<double>::infinity();
  int mantissa_bits = 52, min_exp = -1022;
  switch (type) {
    case ValueType::kFloat64: mantissa_bits = 52; min_exp = -1022; break;
    case ValueType::kFloat32: mantissa_bits = 23; min_exp = -126; break;
    case ValueType::kFloat16: mantissa_bits = 10; min_exp = -14; break;
    case ValueType::kBFloat16: mantissa_bits = 7; min_exp = -126; break;
  }
  int e = a == 0 ? min_exp : std::ilogb(a);
  e = std::max(e, min_exp);  // subnormals share the smallest normal exponent's spacing
  return std::ldexp(1.0, e - mantissa_bits);
}

namespace {

bool SpecialMatch(double got, double reference, bool* decided) {
  *decided = true;
  if (std::isnan(reference) || std::isnan(got)) return std::isnan(reference) && std::isnan(got);
  if (std::isinf(reference) || std::isinf(got)) return got == reference;
  *decided = false;
  return false;
}

}  // namespace

bool ElementWithinBound(ValueType type, double got, double reference, double scale) {
  bool decided = false;
  const bool match = SpecialMatch(got, reference, &decided);
  if (decided) return match;
  const double mag = std::max(std::fabs(reference), std::fabs(scale));
  double bound = 0;
  switch (type) {
    case ValueType::kFloat64:
      bound = 1e-13 * mag + std::numeric_limits<double>::denorm_min();
      break;
    case ValueType::kFloat32:
      // Measured from the reference rounded to float32 (docs/design.md section 4).
      return std::fabs(got - static_cast<double>(static_cast<float>(reference))) <=
             4 * UlpOf(ValueType::kFloat32, mag);
    case ValueType::kFloat16:
    case ValueType::kBFloat16:
      bound = UlpOf(type, reference) + 4 * UlpOf(ValueType::kFloat32, mag);
      break;
  }
  return std::fabs(got - reference) <= bound;
}

bool ReducedWithinBound(ValueType type, double got, double reference) {
  bool decided = false;
  const bool match = SpecialMatch(got, reference, &decided);
  if (decided) return match;
  return std::fabs(got - reference) <= 1e-6 * std::fabs(reference) + UlpOf(type, reference);
}

std::pair<double, double> GradTermScale(double x, double y, double w, double p) {
  const double e = std::exp(-std::fabs(x));
  const double l = std::log1p(e);
  const double s_pos = x >= 0 ? 1 / (1 + e) : e / (1 + e);  // s(x)
  const double s_neg = x >= 0 ? e / (1 + e) : 1 / (1 + e);  // s(-x)
  const double gx = std::max(std::fabs(w * (1 - y) * s_pos), std::fabs(w * p * y * s_neg));
  const double gy = std::max(std::fabs(w * (std::max(x, 0.0) + l)),
                             std::fabs(w * p * (std::max(-x, 0.0) + l)));
  return {std::isnan(gx) ? 0.0 : gx, std::isnan(gy) ? 0.0 : gy};
}

}  // namespace lossd::bench
