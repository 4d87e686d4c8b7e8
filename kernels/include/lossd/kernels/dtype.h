// Element types (DType) and the conversions between tensor elements and float or double: the
// one place where every backend, the server's tensor decoding and the tests read and write
// elements of float32, float64, float16 and bfloat16 tensors. Plain enum and stateless
// functions; thread-safe.
#ifndef LOSSD_KERNELS_DTYPE_H_
#define LOSSD_KERNELS_DTYPE_H_

#include <cstddef>
#include <cstdint>
#include <string>

namespace lossd::kernels {

// Element types. The numbering matches lossd.v1.DType.
enum class DType : int { kFloat32 = 1, kFloat64 = 2, kFloat16 = 3, kBFloat16 = 4 };

// Bytes per element; 0 for a value outside the enum.
size_t ItemSize(DType dtype);
// "FLOAT32", "FLOAT64", "FLOAT16", "BFLOAT16" or "DTYPE(<n>)".
std::string DTypeName(DType dtype);

// Conversions used by every backend and by tests.
float HalfToFloat(uint16_t h);
uint16_t FloatToHalf(float f);  // round to nearest even; overflow to inf; NaN preserved
float BFloat16ToFloat(uint16_t h);
uint16_t FloatToBFloat16(float f);  // round to nearest even; NaN preserved
// Reads element i of `data` as double.
double LoadAsDouble(DType dtype, const void* data, int64_t i);
// Writes v (rounded once to dtype) as element i of `data`.
void StoreFromDouble(DType dtype, void* data, int64_t i, double v);

}  // namespace lossd::kernels

#endif  // LOSSD_KERNELS_DTYPE_H_
