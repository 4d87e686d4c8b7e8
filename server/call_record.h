#ifndef LOSSD_SERVER_CALL_RECORD_H_
#define LOSSD_SERVER_CALL_RECORD_H_

// What an operator sees of one call (or of one EvaluateStream batch): a log line when it failed
// and the lossd_requests_total, latency and byte metrics, recorded exactly once
// (docs/design.md section 1, "Around the data path").
//
// Ok() or Fail() records the outcome; later calls of either are ignored. A record destroyed
// without an outcome counts as CANCELLED (the call ended before producing one). A record
// without metrics (null) only logs a failure: the SharedMemory service's calls
// ("SharedMemory.RegisterRegion", ...) are logged like every other call but are not counted in
// lossd_requests_total, whose method label lists the loss and inference calls only. Not
// thread-safe: one owner records it. A ModelInfer call that names a model of this server also
// records its outcome in that model's statistics (set_statistics, oip_statistics.h).

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "grpcpp/server_context.h"
#include "lossd/v1/lossd.pb.h"
#include "server/metrics.h"

namespace lossd::server {

class OipModelStatistics;  // oip_statistics.h

class CallRecord {
 public:
  // `context` (may be null) names the peer in the failure log line; `start_ns` is the wall
  // clock (absl::GetCurrentTimeNanos) when the call or batch arrived. `metrics` null: log only.
  CallRecord(Metrics* metrics, const char* method, const grpc::CallbackServerContext* context,
             int64_t start_ns);
  // A call that did not come through gRPC: `peer` is the caller's address and `protocol`
  // (e.g. "http") is added to the failure log line.
  CallRecord(Metrics* metrics, const char* method, std::string peer, const char* protocol,
             int64_t start_ns);
  CallRecord(const CallRecord&) = delete;
  CallRecord& operator=(const CallRecord&) = delete;
  ~CallRecord();

  // A successful call on `device`: the queue and compute seconds of `timing` (those it leaves
  // at 0 are not observed), and the tensor payload bytes received and sent (-1: not counted).
  void Ok(v1::Device device, const v1::Timing& timing, int64_t received = -1,
          int64_t sent = -1);
  // A failed call: logged (rate-limited, log.h) with its request id, counted under its code.
  void Fail(const absl::Status& status, std::string_view request_id = "");
  // Ok() without a device or timing (calls that compute nothing on a backend).
  void Ok() { Ok(v1::DEVICE_AUTO, v1::Timing()); }
  // Ok() when `status` is OK, else Fail().
  void Finish(const absl::Status& status, std::string_view request_id = "") {
    if (status.ok()) {
      Ok();
    } else {
      Fail(status, request_id);
    }
  }

  // The outcome also counts in `statistics` (null: none), with the call's duration and, when
  // it succeeded, its timing.
  void set_statistics(OipModelStatistics* statistics) { statistics_ = statistics; }

  bool recorded() const { return recorded_; }
  int64_t start_ns() const { return start_ns_; }

 private:
  Metrics* const metrics_;
  const char* const method_;
  const grpc::CallbackServerContext* const context_;  // null: peer_ and protocol_
  const std::string peer_;
  const char* const protocol_ = nullptr;
  const int64_t start_ns_;
  OipModelStatistics* statistics_ = nullptr;
  bool recorded_ = false;
};

// One log line for a failed call or batch: method, status, message, peer, request id (escaped).
// Rate-limited (log.h). CallRecord::Fail writes it; `peer` is the caller's address; a
// `protocol` other than gRPC is named at the end (" protocol=http").
void LogFailure(const char* method, std::string_view peer, std::string_view request_id,
                const absl::Status& status, const char* protocol = nullptr);

}  // namespace lossd::server

#endif  // LOSSD_SERVER_CALL_RECORD_H_
