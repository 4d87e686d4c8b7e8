// Prometheus metrics of the lossd server (prometheus-cpp), served on /metrics when enabled.
// Thread-safe: every method may be called from any thread.
#ifndef LOSSD_SERVER_METRICS_H_
#define LOSSD_SERVER_METRICS_H_

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "lossd/v1/lossd.pb.h"

namespace prometheus {
class Exposer;
class Registry;
}  // namespace prometheus

namespace lossd::server {

class OipStatistics;  // oip_statistics.h

class Metrics {
 public:
  Metrics();
  ~Metrics();

  // Serves /metrics on host:port (port 0 picks a free one). Errors: UNAVAILABLE when the
  // address cannot be bound.
  absl::Status Serve(const std::string& host, int port);
  int port() const;  // bound port, 0 when not serving

  // One finished call. method: "Evaluate", "EvaluateStream", "Accumulate", "GetCapabilities";
  // code: gRPC status code name ("OK", "INVALID_ARGUMENT", ...); device "cpu", "cuda" or
  // "none" (failed before choosing one). Durations in seconds; negative ones are not observed.
  void RecordCall(std::string_view method, std::string_view code, std::string_view device,
                  double queue_s, double compute_s, double total_s);
  void AddElements(std::string_view device, int64_t elements);
  // Tensor payload bytes of one answered request (or batch of a stream): counted in
  // lossd_tensor_bytes_total and observed in the lossd_request_bytes histogram.
  void AddBytes(std::string_view method, int64_t received, int64_t sent);
  void AddChunks(int64_t chunks);
  // One batch of CUDA computations run together (batcher.h): its number of computations, in
  // the lossd_cuda_batch_requests histogram.
  void ObserveBatch(int64_t requests);
  void InFlight(int delta);  // calls being handled
  void SetQueued(int64_t queued);
  void SetDraining(bool draining);

  // The per-model statistics of the inference protocol (Triton's statistics extension),
  // recorded beside these metrics when a ModelInfer call ends (call_record.h).
  OipStatistics& oip_statistics() { return *oip_statistics_; }

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::unique_ptr<OipStatistics> oip_statistics_;
};

// "cpu", "cuda" or "none": the device label of a call's metrics.
std::string DeviceLabel(v1::Device device);

}  // namespace lossd::server

#endif  // LOSSD_SERVER_METRICS_H_
