#include "service.h"

#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/time/clock.h"
#include "grpc_status.h"
#include "log.h"

namespace lossd::server {

namespace {

// At most kLogBurst failure lines per second; the rest are counted and reported in the next
// line, so a misbehaving client cannot flood the log.
constexpr int kLogBurst = 50;
absl::Mutex log_mu;
int64_t log_second ABSL_GUARDED_BY(log_mu) = 0;
int log_count ABSL_GUARDED_BY(log_mu) = 0;
int64_t log_suppressed ABSL_GUARDED_BY(log_mu) = 0;

}  // namespace

void LogFailure(const char* method, const grpc::CallbackServerContext& context,
                const std::string& request_id, const absl::Status& status) {
  int64_t suppressed = 0;
  {
    absl::MutexLock lock(&log_mu);
    const int64_t now = absl::ToUnixSeconds(absl::Now());
    if (now != log_second) {
      log_second = now;
      log_count = 0;
    }
    if (++log_count > kLogBurst) {
      ++log_suppressed;
      return;
    }
    suppressed = log_suppressed;
    log_suppressed = 0;
  }
  Log(LogLevel::kWarning,
      absl::StrCat(method, " failed: status=", absl::StatusCodeToString(status.code()),
                   " message=\"", status.message(), "\" peer=", context.peer(),
                   " request_id=\"", request_id, "\"",
                   suppressed > 0 ? absl::StrCat(" (", suppressed, " earlier failure lines "
                                                 "suppressed)")
                                  : ""));
}

grpc::ServerUnaryReactor* LossServiceImpl::Evaluate(grpc::CallbackServerContext* context,
                                                    const v1::EvaluateRequest* request,
                                                    v1::EvaluateResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const int64_t start_ns = absl::GetCurrentTimeNanos();
  Core* core = core_;
  core->CallStarted();
  // Finishes the call: log, metrics, reply. Runs exactly once per call.
  auto finish = [core, context, request, response, reactor, start_ns](const absl::Status& s) {
    const double total = (absl::GetCurrentTimeNanos() - start_ns) * 1e-9;
    if (s.ok()) {
      response->set_request_id(request->request_id());
      core->metrics().RecordCall("Evaluate", "OK", DeviceLabel(response->device()),
                                 response->timing().queue_ns() * 1e-9,
                                 response->timing().compute_ns() * 1e-9, total);
      core->metrics().AddBytes(PayloadBytes(*request), PayloadBytes(*response));
    } else {
      LogFailure("Evaluate", *context, request->request_id(), s);
      core->metrics().RecordCall("Evaluate", absl::StatusCodeToString(s.code()), "none", -1, -1,
                                 total);
    }
    core->CallEnded();
    reactor->Finish(ToGrpcStatus(s));
  };
  if (absl::Status s = core->Admit(*context); !s.ok()) {
    finish(s);
    return reactor;
  }
  auto plan = core->Prepare(*request);
  if (!plan.ok()) {
    finish(plan.status());
    return reactor;
  }
  if (plan->args.numel <= core->config().inline_elements) {
    // Small: a few microseconds of compute, cheaper than a hop to a worker thread.
    finish(core->Compute(context, *plan, start_ns, response));
    return reactor;
  }
  auto shared_plan = std::make_shared<EvaluatePlan>(*std::move(plan));
  const absl::Status queued =
      core->Submit([core, context, response, shared_plan, start_ns, finish] {
        finish(core->Compute(context, *shared_plan, start_ns, response));
      });
  if (!queued.ok()) finish(queued);
  return reactor;
}

grpc::ServerUnaryReactor* LossServiceImpl::GetCapabilities(
    grpc::CallbackServerContext* context, const v1::GetCapabilitiesRequest* /*request*/,
    v1::Capabilities* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (absl::Status s = core_->Admit(*context); !s.ok()) {
    reactor->Finish(ToGrpcStatus(s));
    return reactor;
  }
  response->set_server_version(LOSSD_VERSION);
  response->add_losses("bce_with_logits");
  response->add_losses("sigmoid_focal_loss");
  for (v1::DType d : {v1::DTYPE_FLOAT32, v1::DTYPE_FLOAT64, v1::DTYPE_FLOAT16,
                      v1::DTYPE_BFLOAT16}) {
    response->add_dtypes(d);
  }
  response->add_devices(v1::DEVICE_CPU);
  if (core_->has_cuda()) response->add_devices(v1::DEVICE_CUDA);
  for (v1::Reduction r : {v1::REDUCTION_NONE, v1::REDUCTION_MEAN, v1::REDUCTION_SUM,
                          v1::REDUCTION_PER_SAMPLE_MEAN}) {
    response->add_reductions(r);
  }
  response->set_max_message_bytes(core_->config().max_message_bytes);
  response->set_max_elements(core_->config().limits.max_elements);
  response->set_cuda_device_name(core_->has_cuda() ? core_->cuda_name() : "");
  core_->metrics().RecordCall("GetCapabilities", "OK", "none", -1, -1, -1);
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerBidiReactor<v1::EvaluateRequest, v1::EvaluateStreamResponse>*
LossServiceImpl::EvaluateStream(grpc::CallbackServerContext* context) {
  return NewEvaluateStream(core_, context);
}

grpc::ServerReadReactor<v1::EvaluateRequest>* LossServiceImpl::Accumulate(
    grpc::CallbackServerContext* context, v1::AccumulateResponse* response) {
  return NewAccumulate(core_, context, response);
}

}  // namespace lossd::server
