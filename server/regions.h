// Registered shared-memory regions as tensor storage: the seam between request decoding and
// output placement (request.cc, core.cc) and the registry of regions (shm_registry.cc).
// docs/design.md ("Data path") describes the life of a region.
#ifndef LOSSD_SERVER_REGIONS_H_
#define LOSSD_SERVER_REGIONS_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <string_view>

#include "absl/status/statusor.h"
#include "lossd/v1/lossd.pb.h"

namespace lossd::server {

// Bytes inside a mapped region, valid while `keepalive` lives: a computation holds its spans
// until it ends, so unregistering a region, its lease ending or its object being unlinked never
// unmaps memory that a kernel is reading or writing.
struct RegionSpan {
  void* data = nullptr;
  int64_t bytes = 0;
  std::shared_ptr<const void> keepalive;
  // Set when the object shrank under the mapping (its owner truncated it) and the pages past
  // the new end were replaced so that no access faults. A computation that used the span
  // checks it afterwards and fails with FAILED_PRECONDITION. Null when that cannot happen.
  // Valid while `keepalive` lives.
  const std::atomic<bool>* damaged = nullptr;
  // `data` is CUDA device memory (a REGION_KIND_CUDA_IPC region, docs/shared-memory.md "CUDA
  // IPC regions"): only the CUDA backend may read or write it, through the on_device bits of
  // kernels::BceArgs / BceOutputs. Host code may compare and offset the pointer, never
  // dereference it.
  bool device = false;
};

// Looks up tensor references. Thread-safe.
class RegionResolver {
 public:
  virtual ~RegionResolver() = default;

  // The `bytes` bytes at ref.offset of the region with handle ref.region. `field` names the
  // reference in messages ("logits.ref", "outputs.grad_logits"). Errors, each naming the field
  // and the values:
  //   NOT_FOUND          the handle is unknown, unregistered or its lease ended;
  //   INVALID_ARGUMENT   ref.byte_size != bytes, or offset + bytes overflows or lies past the
  //                      registered range (never a read or write outside it).
  // A span of CUDA device memory has `device` set.
  // `writable`: the span receives an output.
  virtual absl::StatusOr<RegionSpan> Resolve(std::string_view field,
                                             const v1::TensorReference& ref, int64_t bytes,
                                             bool writable) const = 0;
};

}  // namespace lossd::server

#endif  // LOSSD_SERVER_REGIONS_H_
