// The accuracy bounds lossd promises (docs/design.md section 4), as checks of one reply value
// against the float64 reference: lossd-bench --verify counts a reply with any value outside its
// bound as a mismatch (an error). Pure; unit-tested in tests/bench/verify_test.cc.
//   float32      within 4 ulp (float32) of max(|reference|, scale) of the reference rounded
//                to float32
//   half types   1 ulp of their own type at the reference, plus the float32 bound
//   float64      1e-13 relative to max(|reference|, scale)
//   reduced      (SUM, MEAN, Accumulate) 1e-6 relative, plus one ulp of the output type
// `scale` is 0 for a loss element; for a gradient it is the larger of the two terms the
// gradient subtracts (GradTermScale), divided by the reduction's divisor, because a gradient of
// a soft label may cancel. NaN matches only NaN, an infinity only itself.
#ifndef LOSSD_CLIENT_BENCH_VERIFY_H_
#define LOSSD_CLIENT_BENCH_VERIFY_H_

#include <utility>

namespace lossd::bench {

enum class ValueType { kFloat32, kFloat64, kFloat16, kBFloat16 };

// The spacing of `type` at |v| (the ulp of the nearest value of that type).
double UlpOf(ValueType type, double v);

bool ElementWithinBound(ValueType type, double got, double reference, double scale);
bool ReducedWithinBound(ValueType type, double got, double reference);

// The larger term of each BCE gradient at one element (x logit, y target after label
// smoothing, w weight, p pos_weight): {dl/dx: max(|w (1-y) s(x)|, |w p y s(-x)|),
// dl/dy: max(|w sp(x)|, |w p sp(-x)|)}.
std::pair<double, double> GradTermScale(double x, double y, double w, double p);

}  // namespace lossd::bench

#endif  // LOSSD_CLIENT_BENCH_VERIFY_H_
