// Triton's statistics and model configuration extensions of the KServe v2 / Open Inference
// Protocol (docs/interop.md, "Statistics and configuration"): per-model inference statistics,
// recorded once per ModelInfer call of either front-end (gRPC and REST) where the call ends
// (call_record.h), and the configuration of each model, as the inference.* messages that
// ModelStatistics and ModelConfig answer and as Triton's JSON for the REST routes.
#ifndef LOSSD_SERVER_OIP_STATISTICS_H_
#define LOSSD_SERVER_OIP_STATISTICS_H_

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "inference/grpc_predict_v2.pb.h"

namespace lossd::server {

// The statistics of one model. Thread-safe (relaxed atomics): every call that ends records
// into it from its own thread; a snapshot may mix calls that end while it is taken.
class OipModelStatistics {
 public:
  // A call that succeeded: it ended at `end_ns` (Unix epoch, ns) after `total_ns`, of which
  // `queue_ns` waiting for compute and `compute_ns` computing (0: not measured).
  void RecordSuccess(int64_t end_ns, int64_t total_ns, int64_t queue_ns, int64_t compute_ns);
  // A call that failed after `total_ns`.
  void RecordFailure(int64_t total_ns);

  // The counters as Triton's message (name and version left empty).
  void Fill(inference::ModelStatistics* out) const;

 private:
  struct Duration {
    std::atomic<uint64_t> count{0};
    std::atomic<uint64_t> ns{0};
    void Add(int64_t value_ns);
    void Fill(inference::StatisticDuration* out) const;
  };
  std::atomic<uint64_t> last_inference_ms_{0};
  Duration success_, fail_, queue_, compute_infer_;
};

// The statistics of every model of the inference protocol (OipModels(), oip_models.h), owned
// by Metrics beside the Prometheus metrics.
class OipStatistics {
 public:
  OipStatistics();
  OipStatistics(const OipStatistics&) = delete;
  OipStatistics& operator=(const OipStatistics&) = delete;
  ~OipStatistics();

  // The statistics of the model `name` at `version` ("" or "1"), or null for a model this
  // server does not have (a call that names one counts for no model).
  OipModelStatistics* Find(absl::string_view name, absl::string_view version);

  // ModelStatistics: the model `name` at `version`, or every model when `name` is empty.
  // NOT_FOUND for an unknown model or version, with FindOipModel's message.
  absl::Status Fill(absl::string_view name, absl::string_view version,
                    inference::ModelStatisticsResponse* out) const;

 private:
  std::vector<OipModelStatistics> models_;  // in the order of OipModels()
};

// ModelConfig: the configuration of the model `name` at `version`: name, platform and backend
// "lossd", max_batch_size 0, its inputs (WEIGHT and POS_WEIGHT optional) and outputs as
// TYPE_FP32 with dims [-1] (as ModelMetadata lists them), and the parameter "datatypes"
// ("FP32,FP64,FP16,BF16": the datatypes every tensor accepts). NOT_FOUND as FindOipModel.
absl::Status FillModelConfig(absl::string_view name, absl::string_view version,
                             inference::ModelConfigResponse* out);

// Triton's JSON of the REST routes: GET /v2/models[/{name}[/versions/{v}]]/stats
// ({"model_stats":[{"name", "version", "last_inference", "inference_count",
// "execution_count", "inference_stats": {"success": {"count", "ns"}, ...}, "batch_stats"}]})
// and GET /v2/models/{name}[/versions/{v}]/config (the ModelConfig object itself).
std::string ModelStatisticsJson(const inference::ModelStatisticsResponse& stats);
std::string ModelConfigJson(const inference::ModelConfig& config);

}  // namespace lossd::server

#endif  // LOSSD_SERVER_OIP_STATISTICS_H_
