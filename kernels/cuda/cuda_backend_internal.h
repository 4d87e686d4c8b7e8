// Internal knobs of the CUDA backend (cuda_backend.cu) for its tests and gpu_bench: the chunk
// size of the pinned chunk pipeline, and counters that prove which path ran. Plain C++; the
// function exists only in CUDA builds (LOSSD_HAVE_CUDA). Not part of the public kernels API.
#ifndef LOSSD_KERNELS_CUDA_CUDA_BACKEND_INTERNAL_H_
#define LOSSD_KERNELS_CUDA_CUDA_BACKEND_INTERNAL_H_

#include <atomic>
#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "lossd/kernels/backend.h"

namespace lossd::kernels::cuda {

struct CudaBackendKnobs {
  // false: large host requests run in one piece (the path before the pipeline), to compare.
  bool chunked = true;
  // Elements per chunk of the pipeline (a positive multiple of kReduceBlock); 0: as many as
  // fit a staging buffer (kPinnedChunkBytes in cuda_backend.cu).
  int64_t chunk_elements = 0;
  // When set, incremented per segmented launch (BceBatch) and per chunked request.
  std::atomic<int64_t>* segmented_launches = nullptr;
  std::atomic<int64_t>* chunked_runs = nullptr;
};

// MakeCudaBackend with knobs. The counters must outlive the backend.
absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackendWithKnobs(const CudaOptions& options,
                                                                  const CudaBackendKnobs& knobs);

}  // namespace lossd::kernels::cuda

#endif  // LOSSD_KERNELS_CUDA_CUDA_BACKEND_INTERNAL_H_
