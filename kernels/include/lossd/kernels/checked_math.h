// Overflow-checked integer arithmetic for sizes that come from clients: shapes, element counts,
// byte counts and broadcast index ranges. Every product of client-declared dimensions goes
// through these functions (docs/design.md section 5, "Errors and limits"), so an extreme shape
// gives an error instead of a wrapped size. Header-only, no state; thread-safe.
#ifndef LOSSD_KERNELS_CHECKED_MATH_H_
#define LOSSD_KERNELS_CHECKED_MATH_H_

#include <cstdint>
#include <optional>
#include <vector>

namespace lossd::kernels {

// a * b, or nullopt when the exact product does not fit int64_t.
inline std::optional<int64_t> CheckedMul(int64_t a, int64_t b) {
  int64_t out;
  if (__builtin_mul_overflow(a, b, &out)) return std::nullopt;
  return out;
}

// a + b, or nullopt when the exact sum does not fit int64_t.
inline std::optional<int64_t> CheckedAdd(int64_t a, int64_t b) {
  int64_t out;
  if (__builtin_add_overflow(a, b, &out)) return std::nullopt;
  return out;
}

// The product of dims[begin, end) (1 for an empty range), or nullopt when a partial product
// overflows int64_t. Dimensions must be >= 0. A zero dimension does not excuse an overflow of
// the others: [2^40, 2^40, 0] is rejected, as every consumer of a shape multiplies its leading
// dimensions on their own (row counts, strides, broadcast periods).
inline std::optional<int64_t> CheckedProduct(const std::vector<int64_t>& dims, size_t begin,
                                             size_t end) {
  int64_t p = 1;
  for (size_t k = begin; k < end && k < dims.size(); ++k) {
    const std::optional<int64_t> next = CheckedMul(p, dims[k]);
    if (!next) return std::nullopt;
    p = *next;
  }
  return p;
}

inline std::optional<int64_t> CheckedProduct(const std::vector<int64_t>& dims) {
  return CheckedProduct(dims, 0, dims.size());
}

}  // namespace lossd::kernels

#endif  // LOSSD_KERNELS_CHECKED_MATH_H_
