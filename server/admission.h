// Admission: the first step of every call (docs/design.md section 1, "One Evaluate call").
// It decides whether a call may start (draining, the bearer token) and counts the calls being
// handled. It knows nothing of requests, plans or compute: it runs before the request is
// parsed.
//
// Contract: Admit returns UNAVAILABLE while draining, else UNAUTHENTICATED without the
// configured bearer token (compared in constant time), else OK. CallStarted/CallEnded bracket
// every call a handler accepts from gRPC or HTTP, admitted or not; in_flight() is their
// difference, also exported as the lossd_in_flight gauge.
//
// Thread-safety: every method may be called from any thread (atomics only; the token is set at
// construction).
#ifndef LOSSD_SERVER_ADMISSION_H_
#define LOSSD_SERVER_ADMISSION_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "server/metrics.h"

namespace lossd::server {

class Admission {
 public:
  // `auth_token` empty: no authentication. `metrics` must outlive this.
  Admission(std::string auth_token, Metrics* metrics);
  Admission(const Admission&) = delete;
  Admission& operator=(const Admission&) = delete;

  // Called at the start of every LossService and inference-protocol call that needs the
  // token: reads the "authorization" metadata.
  absl::Status Admit(const grpc::CallbackServerContext& context) const;
  // The same rule for credentials that arrive another way (the REST front end's Authorization
  // header): `authorization` is their value, nullopt when absent; `carrier` names where a
  // token is expected, for the error message (e.g. "\"Authorization: Bearer <token>\" header").
  absl::Status Admit(std::optional<std::string_view> authorization,
                     std::string_view carrier) const;

  // Calls being handled (also exported as a gauge).
  void CallStarted();
  void CallEnded();
  int64_t in_flight() const { return in_flight_.load(); }

  // A draining server refuses new calls (UNAVAILABLE); calls in progress go on.
  void set_draining(bool draining);
  bool draining() const { return draining_.load(); }

 private:
  const std::string auth_token_;
  Metrics* const metrics_;
  std::atomic<bool> draining_{false};
  std::atomic<int64_t> in_flight_{0};
};

}  // namespace lossd::server

#endif  // LOSSD_SERVER_ADMISSION_H_
