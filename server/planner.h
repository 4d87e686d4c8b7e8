// Planner: turns a parsed request into a checked EvaluatePlan (docs/design.md section 1, step
// 4 of "One Evaluate call"). It owns what a plan depends on besides the request: the limits,
// the registry of shared-memory regions that tensor references name, and which devices this
// server has. The validation itself is request.cc's PlanEvaluate; the Planner adds the
// device check. It allocates nothing sized by the client and starts no computation.
//
// Contract: Prepare returns the plan or the first error: INVALID_ARGUMENT / RESOURCE_EXHAUSTED
// from PlanEvaluate, FAILED_PRECONDITION for tensor references without a region resolver, and
// FAILED_PRECONDITION for device CUDA, or tensors in CUDA device memory, on a server without a
// usable GPU.
//
// Thread-safety: Prepare and the accessors may be called from any thread at once. The region
// resolver is set once, before serving (set_region_resolver is not synchronized).
#ifndef LOSSD_SERVER_PLANNER_H_
#define LOSSD_SERVER_PLANNER_H_

#include <string>

#include "absl/status/statusor.h"
#include "lossd/v1/lossd.pb.h"
#include "server/regions.h"
#include "server/request.h"

namespace lossd::server {

class Planner {
 public:
  // `has_cuda`: the server computes on a GPU (a CUDA backend exists); `cuda_name` is its name.
  Planner(const Limits& limits, bool has_cuda, std::string cuda_name);
  Planner(const Planner&) = delete;
  Planner& operator=(const Planner&) = delete;

  // Validates a request and checks that its device is available. `views` holds the tensors'
  // data when the message does not (message_io.h); tensor references and output placements
  // resolve through the region resolver.
  absl::StatusOr<EvaluatePlan> Prepare(const v1::EvaluateRequest& request,
                                       const TensorDataViews& views = {}) const;

  const Limits& limits() const { return limits_; }

  // The registry of shared-memory regions that tensor references name (regions.h). Set once,
  // before serving; null (the default): requests with references get FAILED_PRECONDITION.
  void set_region_resolver(const RegionResolver* resolver) { regions_ = resolver; }
  const RegionResolver* region_resolver() const { return regions_; }

  // The devices plans may name (GetCapabilities reports them).
  bool has_cuda() const { return has_cuda_; }
  const std::string& cuda_name() const { return cuda_name_; }

 private:
  const Limits limits_;
  const bool has_cuda_;
  const std::string cuda_name_;
  const RegionResolver* regions_ = nullptr;
};

}  // namespace lossd::server

#endif  // LOSSD_SERVER_PLANNER_H_
