// Operand: an input (weight, pos_weight) broadcast to the logits' shape, either a view of the
// caller's tensor or expanded storage that the operand owns; MakeOperand checks a shape against
// numpy broadcasting and builds one. An Operand is a plain value: copies share its owned storage,
// which is immutable once built, so operands may be read from any number of threads.
// MakeOperand has no state and is thread-safe.
#ifndef LOSSD_KERNELS_OPERAND_H_
#define LOSSD_KERNELS_OPERAND_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "lossd/kernels/dtype.h"

namespace lossd::kernels {

// An input broadcast to the logits' shape, viewed as a function of the flat element index i:
// element i reads data[(i / inner) % period]. This covers a full tensor (inner 1, period numel),
// a scalar (period 1), a trailing [C] (inner 1, period C) and [N,1] (inner C, period N).
// Other broadcast patterns are expanded by MakeOperand into owned storage.
struct Operand {
  DType dtype = DType::kFloat32;
  const void* data = nullptr;  // nullptr: the operand is absent and every element reads 1
  int64_t inner = 1;           // >= 1
  int64_t period = 1;          // >= 1
  std::shared_ptr<const void> owned;  // keeps expanded storage alive; null for a view
};

// Checks that `shape` broadcasts to `out_shape` (numpy rules, trailing dimensions aligned,
// operand rank <= output rank) and returns the operand view of `data`. `field` names the
// tensor in error messages. Errors: INVALID_ARGUMENT "weight shape [3] is not broadcastable to
// logits shape [4,7]". The returned operand points into `data` (caller keeps it alive) unless
// the pattern needs expansion, in which case it owns a copy in the operand's dtype. With
// `may_copy` false (data the host cannot read, such as CUDA device memory) a pattern that needs
// expansion is INVALID_ARGUMENT instead ("weight shape [2,1,4] broadcasts to logits shape
// [2,3,4] only by an expanded copy, which cannot be made of this tensor"); data is never read.
absl::StatusOr<Operand> MakeOperand(const std::string& field, DType dtype, const void* data,
                                    const std::vector<int64_t>& shape,
                                    const std::vector<int64_t>& out_shape, bool may_copy = true);

}  // namespace lossd::kernels

#endif  // LOSSD_KERNELS_OPERAND_H_
