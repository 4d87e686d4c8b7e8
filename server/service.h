// LossService on gRPC's callback API. Each call is validated on the gRPC thread (O(1) work),
// then computed on the WorkQueue; the worker finishes the reactor. Thread-safe.
#ifndef LOSSD_SERVER_SERVICE_H_
#define LOSSD_SERVER_SERVICE_H_

#include <memory>
#include <string>

#include "lossd/kernels/kernels.h"
#include "lossd/v1/lossd.grpc.pb.h"
#include "request.h"
#include "work_queue.h"

namespace lossd::server {

struct ServiceConfig {
  Limits limits;
  int64_t max_message_bytes = 0;  // reported by GetCapabilities
  int workers = 1;
  int queue_capacity = 256;
};

class LossServiceImpl final : public v1::LossService::CallbackService {
 public:
  // `cpu` is required; `cuda` may be null (no usable GPU or disabled by policy).
  LossServiceImpl(const ServiceConfig& config, std::unique_ptr<kernels::Backend> cpu,
                  std::unique_ptr<kernels::Backend> cuda, std::string cuda_name);
  ~LossServiceImpl() override;

  grpc::ServerUnaryReactor* Evaluate(grpc::CallbackServerContext* context,
                                     const v1::EvaluateRequest* request,
                                     v1::EvaluateResponse* response) override;
  grpc::ServerUnaryReactor* GetCapabilities(grpc::CallbackServerContext* context,
                                            const v1::GetCapabilitiesRequest* request,
                                            v1::Capabilities* response) override;

 private:
  // Runs a validated plan on the worker thread; fills `response`.
  absl::Status Compute(grpc::CallbackServerContext* context, const EvaluatePlan& plan,
                       int64_t start_ns, v1::EvaluateResponse* response);

  const ServiceConfig config_;
  std::unique_ptr<kernels::Backend> cpu_;
  std::unique_ptr<kernels::Backend> cuda_;
  const std::string cuda_name_;
  WorkQueue queue_;  // last member: destroyed (drained) first
};

}  // namespace lossd::server

#endif  // LOSSD_SERVER_SERVICE_H_
