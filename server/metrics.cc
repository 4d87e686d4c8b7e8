#include "metrics.h"

#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <exception>

#include "absl/strings/str_cat.h"

namespace lossd::server {

namespace {

// Latency buckets from 10 us to 30 s.
prometheus::Histogram::BucketBoundaries LatencyBuckets() {
  return {1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2,
          2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0};
}

}  // namespace

struct Metrics::Impl {
  std::shared_ptr<prometheus::Registry> registry = std::make_shared<prometheus::Registry>();
  std::unique_ptr<prometheus::Exposer> exposer;
  int port = 0;
  prometheus::Family<prometheus::Counter>& requests =
      prometheus::BuildCounter()
          .Name("lossd_requests_total")
          .Help("Finished calls by method, status code and device")
          .Register(*registry);
  prometheus::Family<prometheus::Histogram>& queue_seconds =
      prometheus::BuildHistogram()
          .Name("lossd_queue_seconds")
          .Help("Time from decode to the start of compute")
          .Register(*registry);
  prometheus::Family<prometheus::Histogram>& compute_seconds =
      prometheus::BuildHistogram()
          .Name("lossd_compute_seconds")
          .Help("Kernel time per call")
          .Register(*registry);
  prometheus::Family<prometheus::Histogram>& total_seconds =
      prometheus::BuildHistogram()
          .Name("lossd_request_seconds")
          .Help("Time from the start of the handler to the reply")
          .Register(*registry);
  prometheus::Family<prometheus::Counter>& elements =
      prometheus::BuildCounter()
          .Name("lossd_elements_total")
          .Help("Tensor elements evaluated")
          .Register(*registry);
  prometheus::Family<prometheus::Counter>& bytes =
      prometheus::BuildCounter()
          .Name("lossd_tensor_bytes_total")
          .Help("Tensor payload bytes received and sent")
          .Register(*registry);
  prometheus::Counter& chunks = prometheus::BuildCounter()
                                    .Name("lossd_compute_chunks_total")
                                    .Help("Units of kernel work finished")
                                    .Register(*registry)
                                    .Add({});
  prometheus::Gauge& in_flight = prometheus::BuildGauge()
                                     .Name("lossd_in_flight_calls")
                                     .Help("Calls being handled")
                                     .Register(*registry)
                                     .Add({});
  prometheus::Gauge& queued = prometheus::BuildGauge()
                                  .Name("lossd_queued_requests")
                                  .Help("Requests waiting for a compute worker")
                                  .Register(*registry)
                                  .Add({});
  prometheus::Gauge& draining = prometheus::BuildGauge()
                                    .Name("lossd_draining")
                                    .Help("1 while the server drains for shutdown")
                                    .Register(*registry)
                                    .Add({});
};

Metrics::Metrics() : impl_(std::make_unique<Impl>()) {}
Metrics::~Metrics() = default;

absl::Status Metrics::Serve(const std::string& host, int port) {
  try {
    impl_->exposer = std::make_unique<prometheus::Exposer>(absl::StrCat(host, ":", port));
    impl_->exposer->RegisterCollectable(impl_->registry);
    const auto ports = impl_->exposer->GetListeningPorts();
    impl_->port = ports.empty() ? 0 : ports.front();
  } catch (const std::exception& e) {
    return absl::UnavailableError(
        absl::StrCat("cannot serve metrics on ", host, ":", port, ": ", e.what()));
  }
  return absl::OkStatus();
}

int Metrics::port() const { return impl_->port; }

void Metrics::RecordCall(const std::string& method, const std::string& code,
                         const std::string& device, double queue_s, double compute_s,
                         double total_s) {
  impl_->requests.Add({{"method", method}, {"code", code}, {"device", device}}).Increment();
  if (queue_s >= 0) {
    impl_->queue_seconds.Add({{"method", method}}, LatencyBuckets()).Observe(queue_s);
  }
  if (compute_s >= 0) {
    impl_->compute_seconds.Add({{"method", method}, {"device", device}}, LatencyBuckets())
        .Observe(compute_s);
  }
  if (total_s >= 0) {
    impl_->total_seconds.Add({{"method", method}}, LatencyBuckets()).Observe(total_s);
  }
}

void Metrics::AddElements(const std::string& device, int64_t elements) {
  impl_->elements.Add({{"device", device}}).Increment(static_cast<double>(elements));
}

void Metrics::AddBytes(int64_t received, int64_t sent) {
  impl_->bytes.Add({{"direction", "received"}}).Increment(static_cast<double>(received));
  impl_->bytes.Add({{"direction", "sent"}}).Increment(static_cast<double>(sent));
}

void Metrics::AddChunks(int64_t chunks) { impl_->chunks.Increment(static_cast<double>(chunks)); }
void Metrics::InFlight(int delta) { impl_->in_flight.Increment(delta); }
void Metrics::SetQueued(int64_t queued) { impl_->queued.Set(static_cast<double>(queued)); }
void Metrics::SetDraining(bool draining) { impl_->draining.Set(draining ? 1.0 : 0.0); }

}  // namespace lossd::server
