#include "server/planner.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "lossd/kernels/backend.h"

namespace lossd::server {

Planner::Planner(const Limits& limits, bool has_cuda, std::string cuda_name)
    : limits_(limits), has_cuda_(has_cuda), cuda_name_(std::move(cuda_name)) {}

absl::StatusOr<EvaluatePlan> Planner::Prepare(const v1::EvaluateRequest& request,
                                              const TensorDataViews& views) const {
  auto plan = PlanEvaluate(request, limits_, views, regions_);
  if (!plan.ok()) return plan.status();
  if (plan->on_device() && !has_cuda_) {
    // Registration refuses CUDA IPC regions without a CUDA backend; a resolver that returns
    // device spans anyway still never reaches the CPU backend.
    return absl::FailedPreconditionError(
        "the request names CUDA device memory (a REGION_KIND_CUDA_IPC region) but this server "
        "has no usable CUDA backend to compute it");
  }
  if (plan->device == v1::DEVICE_CUDA && !has_cuda_) {
    return absl::FailedPreconditionError(absl::StrCat(
        "device CUDA was requested but this server has no usable CUDA device (",
        !kernels::CudaCompiled()             ? "built without CUDA"
        : kernels::CudaDeviceCount() == 0    ? "no GPU is visible"
                                             : "CUDA disabled by --device=cpu",
        "); use device AUTO or CPU"));
  }
  return plan;
}

}  // namespace lossd::server
