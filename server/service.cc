#include "service.h"

#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "grpc_status.h"
#include "log.h"

namespace lossd::server {

namespace {

void FillTensor(kernels::DType dtype, const std::vector<int64_t>& shape, int64_t numel,
                v1::Tensor* t) {
  t->set_dtype(static_cast<v1::DType>(dtype));
  for (int64_t d : shape) t->add_shape(d);
  t->mutable_data()->resize(static_cast<size_t>(numel) * kernels::ItemSize(dtype));
}

void LogFailure(grpc::CallbackServerContext* context, const std::string& request_id,
                const absl::Status& status) {
  Log(LogLevel::kWarning,
      absl::StrCat("Evaluate failed: status=", absl::StatusCodeToString(status.code()),
                   " message=\"", status.message(), "\" peer=", context->peer(),
                   " request_id=\"", request_id, "\""));
}

}  // namespace

LossServiceImpl::LossServiceImpl(const ServiceConfig& config,
                                 std::unique_ptr<kernels::Backend> cpu,
                                 std::unique_ptr<kernels::Backend> cuda, std::string cuda_name)
    : config_(config),
      cpu_(std::move(cpu)),
      cuda_(std::move(cuda)),
      cuda_name_(std::move(cuda_name)),
      queue_(config.workers, config.queue_capacity) {}

LossServiceImpl::~LossServiceImpl() = default;

grpc::ServerUnaryReactor* LossServiceImpl::Evaluate(grpc::CallbackServerContext* context,
                                                    const v1::EvaluateRequest* request,
                                                    v1::EvaluateResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const int64_t start_ns = absl::GetCurrentTimeNanos();
  auto fail = [&](const absl::Status& s) {
    LogFailure(context, request->request_id(), s);
    reactor->Finish(ToGrpcStatus(s));
    return reactor;
  };
  auto plan = PlanEvaluate(*request, config_.limits);
  if (!plan.ok()) return fail(plan.status());
  if (plan->device == v1::DEVICE_CUDA && cuda_ == nullptr) {
    return fail(absl::FailedPreconditionError(absl::StrCat(
        "device CUDA was requested but this server has no usable CUDA device (",
        !kernels::CudaCompiled() ? "built without CUDA"
        : kernels::CudaDeviceCount() == 0 ? "no GPU is visible"
                                          : "CUDA disabled by --device=cpu",
        "); use device AUTO or CPU")));
  }
  auto shared_plan = std::make_shared<EvaluatePlan>(*std::move(plan));
  const bool queued = queue_.TrySubmit([this, context, request, response, reactor, shared_plan,
                                        start_ns] {
    absl::Status s = Compute(context, *shared_plan, start_ns, response);
    if (s.ok()) response->set_request_id(request->request_id());
    if (!s.ok()) LogFailure(context, request->request_id(), s);
    reactor->Finish(ToGrpcStatus(s));
  });
  if (!queued) {
    return fail(absl::ResourceExhaustedError(absl::StrCat(
        "work queue is full (", config_.queue_capacity, " waiting requests); retry later")));
  }
  return reactor;
}

absl::Status LossServiceImpl::Compute(grpc::CallbackServerContext* context,
                                      const EvaluatePlan& plan, int64_t start_ns,
                                      v1::EvaluateResponse* response) {
  const int64_t begin_ns = absl::GetCurrentTimeNanos();
  if (context->IsCancelled()) return absl::CancelledError("the call was cancelled");
  if (context->deadline() < std::chrono::system_clock::now()) {
    return absl::DeadlineExceededError("the deadline passed before compute started");
  }
  if (plan.reject_nan) {
    if (absl::Status s = CheckNoNan(plan); !s.ok()) return s;
  }
  kernels::Backend* backend = cpu_.get();
  v1::Device device = v1::DEVICE_CPU;
  if (plan.device != v1::DEVICE_CPU && cuda_ != nullptr) {
    backend = cuda_.get();
    device = v1::DEVICE_CUDA;
  }
  kernels::BceOutputs out;
  const std::vector<int64_t> loss_shape = plan.LossShape();
  int64_t loss_count = 1;
  for (int64_t d : loss_shape) loss_count *= d;
  FillTensor(plan.args.dtype, loss_shape, loss_count, response->mutable_loss());
  out.loss = response->mutable_loss()->mutable_data()->data();
  if (plan.grad_logits) {
    FillTensor(plan.args.dtype, plan.shape, plan.args.numel, response->mutable_grad_logits());
    out.grad_logits = response->mutable_grad_logits()->mutable_data()->data();
  }
  if (plan.grad_targets) {
    FillTensor(plan.args.dtype, plan.shape, plan.args.numel, response->mutable_grad_targets());
    out.grad_targets = response->mutable_grad_targets()->mutable_data()->data();
  }
  const int64_t compute_start = absl::GetCurrentTimeNanos();
  absl::Status s;
  if (plan.args.reduction == kernels::Reduction::kPerSampleMean && plan.args.last_dim == 0) {
    // Means over empty rows are NaN; there is nothing to compute.
    for (int64_t r = 0; r < loss_count; ++r) {
      kernels::StoreFromDouble(plan.args.dtype, out.loss, r, std::nan(""));
    }
  } else {
    s = backend->Bce(plan.args, out);
  }
  const int64_t compute_end = absl::GetCurrentTimeNanos();
  if (!s.ok()) {
    response->Clear();
    return s;
  }
  response->set_device(device);
  response->set_num_elements(plan.args.numel);
  v1::Timing* timing = response->mutable_timing();
  timing->set_queue_ns(begin_ns - start_ns);
  timing->set_compute_ns(compute_end - compute_start);
  timing->set_total_ns(absl::GetCurrentTimeNanos() - start_ns);
  return absl::OkStatus();
}

grpc::ServerUnaryReactor* LossServiceImpl::GetCapabilities(
    grpc::CallbackServerContext* context, const v1::GetCapabilitiesRequest* /*request*/,
    v1::Capabilities* response) {
  response->set_server_version(LOSSD_VERSION);
  response->add_losses("bce_with_logits");
  response->add_losses("sigmoid_focal_loss");
  for (v1::DType d : {v1::DTYPE_FLOAT32, v1::DTYPE_FLOAT64, v1::DTYPE_FLOAT16,
                      v1::DTYPE_BFLOAT16}) {
    response->add_dtypes(d);
  }
  response->add_devices(v1::DEVICE_CPU);
  if (cuda_ != nullptr) response->add_devices(v1::DEVICE_CUDA);
  for (v1::Reduction r : {v1::REDUCTION_NONE, v1::REDUCTION_MEAN, v1::REDUCTION_SUM,
                          v1::REDUCTION_PER_SAMPLE_MEAN}) {
    response->add_reductions(r);
  }
  response->set_max_message_bytes(config_.max_message_bytes);
  response->set_max_elements(config_.limits.max_elements);
  response->set_cuda_device_name(cuda_ != nullptr ? cuda_name_ : "");
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace lossd::server
