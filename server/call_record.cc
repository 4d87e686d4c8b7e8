#include "server/call_record.h"

#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "server/metrics.h"
#include "server/log.h"
#include "server/oip_statistics.h"

namespace lossd::server {

void LogFailure(const char* method, std::string_view peer, std::string_view request_id,
                const absl::Status& status, const char* protocol) {
  LogRateLimited(LogLevel::kWarning,
                 absl::StrCat(method, " failed: status=", absl::StatusCodeToString(status.code()),
                              " message=\"", status.message(), "\" peer=",
                              absl::string_view(peer.data(), peer.size()), " request_id=\"",
                              absl::CHexEscape(absl::string_view(request_id.data(),
                                                                 request_id.size())),
                              "\"", protocol != nullptr ? " protocol=" : "",
                              protocol != nullptr ? protocol : ""));
}

CallRecord::CallRecord(Metrics* metrics, const char* method,
                       const grpc::CallbackServerContext* context, int64_t start_ns)
    : metrics_(metrics), method_(method), context_(context), start_ns_(start_ns) {}

CallRecord::CallRecord(Metrics* metrics, const char* method, std::string peer,
                       const char* protocol, int64_t start_ns)
    : metrics_(metrics),
      method_(method),
      context_(nullptr),
      peer_(std::move(peer)),
      protocol_(protocol),
      start_ns_(start_ns) {}

CallRecord::~CallRecord() {
  if (!recorded_) Fail(absl::CancelledError("the call ended before it had an outcome"));
}

void CallRecord::Ok(v1::Device device, const v1::Timing& timing, int64_t received,
                    int64_t sent) {
  if (recorded_) return;
  recorded_ = true;
  const int64_t end_ns = absl::GetCurrentTimeNanos();
  if (statistics_ != nullptr) {
    statistics_->RecordSuccess(end_ns, end_ns - start_ns_, timing.queue_ns(),
                               timing.compute_ns());
  }
  if (metrics_ == nullptr) return;
  const double total = (end_ns - start_ns_) * 1e-9;
  metrics_->RecordCall(method_, "OK", DeviceLabel(device),
                       timing.queue_ns() > 0 ? timing.queue_ns() * 1e-9 : -1,
                       timing.compute_ns() > 0 ? timing.compute_ns() * 1e-9 : -1, total);
  if (received >= 0 || sent >= 0) {
    metrics_->AddBytes(method_, received < 0 ? 0 : received, sent < 0 ? 0 : sent);
  }
}

void CallRecord::Fail(const absl::Status& status, std::string_view request_id) {
  if (recorded_) return;
  recorded_ = true;
  const int64_t end_ns = absl::GetCurrentTimeNanos();
  const double total = (end_ns - start_ns_) * 1e-9;
  if (statistics_ != nullptr) statistics_->RecordFailure(end_ns - start_ns_);
  LogFailure(method_, context_ != nullptr ? context_->peer() : peer_, request_id, status,
             protocol_);
  if (metrics_ == nullptr) return;
  metrics_->RecordCall(method_, absl::StatusCodeToString(status.code()), "none", -1, -1, total);
}

}  // namespace lossd::server
