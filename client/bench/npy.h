// A small reader of NumPy .npy files (format versions 1.0, 2.0 and 3.0, as numpy.save writes
// them) for lossd-bench's --logits/--targets/--weight inputs (README.md, "Load testing with
// lossd-bench"). It reads little-endian float16, float32 and float64 arrays in C order, and
// refuses anything else (big-endian, Fortran order, integer or other types, truncated or
// trailing data) with an error that names what it found. No Debian package ships a maintained
// C++ .npy reader, hence this one. Unit-tested in tests/bench/npy_test.cc.
#ifndef LOSSD_CLIENT_BENCH_NPY_H_
#define LOSSD_CLIENT_BENCH_NPY_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace lossd::bench {

struct NpyArray {
  enum class DType { kFloat16, kFloat32, kFloat64 };
  DType dtype = DType::kFloat32;
  std::string descr;            // as in the header, e.g. "<f4"
  std::vector<int64_t> shape;   // () for a 0-d array (one element)
  std::vector<double> values;   // every element, widened exactly to double, in C order

  int64_t size() const { return static_cast<int64_t>(values.size()); }
};

// Parses the bytes of a .npy file. Errors start with what is wrong ("not a .npy file", "...
// big-endian ...", ...).
absl::StatusOr<NpyArray> ParseNpy(absl::string_view bytes);

// Reads and parses a file; errors name the path.
absl::StatusOr<NpyArray> ReadNpy(const std::string& path);

// IEEE binary16 bits to double (exact; subnormals, infinities and NaN included).
double HalfToDouble(uint16_t bits);

}  // namespace lossd::bench

#endif  // LOSSD_CLIENT_BENCH_NPY_H_
