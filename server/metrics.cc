#include "server/metrics.h"

#include <prometheus/collectable.h>
#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <sys/resource.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "lossd/kernels/backend.h"
#include "server/oip_statistics.h"

namespace lossd::server {

namespace {

// Latency buckets from 1 us to 30 s (small requests take microseconds).
prometheus::Histogram::BucketBoundaries LatencyBuckets() {
  return {1e-6,   2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3,
          1e-2, 2.5e-2, 5e-2, 0.1,  0.25,   0.5,  1.0,  2.5,    5.0,  10.0, 30.0};
}

// Tensor payload sizes from 64 B to 1 GiB, in powers of 4.
prometheus::Histogram::BucketBoundaries SizeBuckets() {
  prometheus::Histogram::BucketBoundaries b;
  for (double v = 64; v <= double(1 << 30); v *= 4) b.push_back(v);
  return b;
}

// Computations per dynamic batch (batcher.h): 1 to 1024, in powers of 2.
prometheus::Histogram::BucketBoundaries BatchBuckets() {
  prometheus::Histogram::BucketBoundaries b;
  for (double v = 1; v <= 1024; v *= 2) b.push_back(v);
  return b;
}

// The standard process_* metrics of Prometheus clients (prometheus-cpp has none), read from
// /proc/self at each scrape.
class ProcessCollector final : public prometheus::Collectable {
 public:
  std::vector<prometheus::MetricFamily> Collect() const override {
    std::vector<prometheus::MetricFamily> out;
    auto gauge = [&out](const char* name, const char* help, prometheus::MetricType type,
                        double value) {
      prometheus::MetricFamily f;
      f.name = name;
      f.help = help;
      f.type = type;
      prometheus::ClientMetric m;
      if (type == prometheus::MetricType::Counter) {
        m.counter.value = value;
      } else {
        m.gauge.value = value;
      }
      f.metric.push_back(std::move(m));
      out.push_back(std::move(f));
    };
    const double page = static_cast<double>(sysconf(_SC_PAGESIZE));
    const double ticks = static_cast<double>(sysconf(_SC_CLK_TCK));
    std::ifstream stat("/proc/self/stat");
    std::string line;
    if (std::getline(stat, line)) {
      // Fields after the command name (which may hold spaces) in parentheses.
      const size_t close = line.rfind(')');
      std::istringstream rest(close == std::string::npos ? "" : line.substr(close + 2));
      std::vector<std::string> f{std::istream_iterator<std::string>(rest),
                                 std::istream_iterator<std::string>()};
      // f[0] is field 3 (state): utime 14, stime 15, starttime 22, vsize 23, rss 24.
      if (f.size() > 21) {
        const double cpu = (std::stod(f[11]) + std::stod(f[12])) / ticks;
        gauge("process_cpu_seconds_total", "User and system CPU time spent in seconds",
              prometheus::MetricType::Counter, cpu);
        gauge("process_virtual_memory_bytes", "Virtual memory size in bytes",
              prometheus::MetricType::Gauge, std::stod(f[20]));
        gauge("process_resident_memory_bytes", "Resident memory size in bytes",
              prometheus::MetricType::Gauge, std::stod(f[21]) * page);
        gauge("process_start_time_seconds", "Start time of the process since the epoch",
              prometheus::MetricType::Gauge, BootTime() + std::stod(f[19]) / ticks);
      }
    }
    int fds = 0;
    std::error_code ec;
    for (auto it = std::filesystem::directory_iterator("/proc/self/fd", ec);
         !ec && it != std::filesystem::directory_iterator(); it.increment(ec)) {
      ++fds;
    }
    gauge("process_open_fds", "Number of open file descriptors", prometheus::MetricType::Gauge,
          fds);
    rlimit limit{};
    if (getrlimit(RLIMIT_NOFILE, &limit) == 0) {
      gauge("process_max_fds", "Maximum number of open file descriptors",
            prometheus::MetricType::Gauge, static_cast<double>(limit.rlim_cur));
    }
    return out;
  }

 private:
  static double BootTime() {
    std::ifstream in("/proc/stat");
    std::string key;
    double value = 0;
    while (in >> key) {
      if (key == "btime" && in >> value) return value;
      in.ignore(std::numeric_limits<std::streamsize>::max(), '\n');
    }
    return 0;
  }
};

// Index of a label value in a fixed list, or -1. The lists are short; a few string compares cost
// less than a label-map lookup in the registry.
template <size_t N>
int IndexOf(const std::array<std::string_view, N>& names, std::string_view value) {
  for (size_t i = 0; i < N; ++i) {
    if (names[i] == value) return static_cast<int>(i);
  }
  return -1;
}

constexpr std::array<std::string_view, 19> kMethods = {
    "Evaluate",       "EvaluateStream", "Accumulate",       "GetCapabilities",
    "RegisterRegion", "RenewLease",     "UnregisterRegion", "ListRegions",
    // inference.GRPCInferenceService (oip_service.h)
    "ServerLive",     "ServerReady",    "ModelReady",       "ServerMetadata",
    "ModelMetadata",  "ModelInfer",     "ModelConfig",      "ModelStatistics",
    "SystemSharedMemoryStatus", "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister"};
constexpr std::array<std::string_view, 3> kDevices = {"cpu", "cuda", "none"};
constexpr int kCodes = 17;  // gRPC status codes 0..16

int CodeIndex(std::string_view code) {
  for (int c = 0; c < kCodes; ++c) {
    if (absl::StatusCodeToString(static_cast<absl::StatusCode>(c)) == code) return c;
  }
  return -1;
}

// Metric handles looked up once per label combination and then reused: prometheus-cpp's
// Family::Add takes a mutex, hashes a label map and (for histograms) copies the bucket list on
// every call, which showed in profiles of small requests. Handles live as long as the registry.
template <typename T, size_t N>
class HandleCache {
 public:
  template <typename MakeFn>
  T& Get(size_t index, MakeFn make) {
    T* h = slots_[index].load(std::memory_order_acquire);
    if (h == nullptr) {
      h = &make();  // Family::Add returns the existing metric for the same labels
      slots_[index].store(h, std::memory_order_release);
    }
    return *h;
  }

 private:
  std::array<std::atomic<T*>, N> slots_{};
};

}  // namespace

struct Metrics::Impl {
  static constexpr size_t kM = kMethods.size();
  static constexpr size_t kD = kDevices.size();
  HandleCache<prometheus::Counter, kM * kCodes * kD> requests_cache;
  HandleCache<prometheus::Histogram, kM> queue_cache;
  HandleCache<prometheus::Histogram, kM * kD> compute_cache;
  HandleCache<prometheus::Histogram, kM> total_cache;
  HandleCache<prometheus::Histogram, kM> request_bytes_cache;
  HandleCache<prometheus::Counter, kD> elements_cache;

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
  prometheus::Family<prometheus::Histogram>& request_bytes =
      prometheus::BuildHistogram()
          .Name("lossd_request_bytes")
          .Help("Tensor payload bytes of each answered request (batch of a stream)")
          .Register(*registry);
  prometheus::Histogram& batch_requests =
      prometheus::BuildHistogram()
          .Name("lossd_cuda_batch_requests")
          .Help("Requests computed together by one dynamic batch on CUDA (--batch_max_delay)")
          .Register(*registry)
          .Add({}, BatchBuckets());
  prometheus::Family<prometheus::Gauge>& build_info =
      prometheus::BuildGauge()
          .Name("lossd_build_info")
          .Help("1, labelled with the version, whether CUDA is compiled in and the SIMD target")
          .Register(*registry);
  std::shared_ptr<ProcessCollector> process = std::make_shared<ProcessCollector>();
  prometheus::Counter& bytes_received = bytes.Add({{"direction", "received"}});
  prometheus::Counter& bytes_sent = bytes.Add({{"direction", "sent"}});
};

Metrics::Metrics()
    : impl_(std::make_unique<Impl>()), oip_statistics_(std::make_unique<OipStatistics>()) {
  impl_->build_info
      .Add({{"version", LOSSD_VERSION},
            {"cuda", kernels::CudaCompiled() ? "compiled" : "none"},
            {"simd_target", kernels::CpuSimdTarget()}})
      .Set(1);
}
Metrics::~Metrics() = default;

absl::Status Metrics::Serve(const std::string& host, int port) {
  try {
    impl_->exposer = std::make_unique<prometheus::Exposer>(absl::StrCat(host, ":", port));
    impl_->exposer->RegisterCollectable(impl_->registry);
    impl_->exposer->RegisterCollectable(impl_->process);
    const auto ports = impl_->exposer->GetListeningPorts();
    impl_->port = ports.empty() ? 0 : ports.front();
  } catch (const std::exception& e) {
    return absl::UnavailableError(
        absl::StrCat("cannot serve metrics on ", host, ":", port, ": ", e.what()));
  }
  return absl::OkStatus();
}

int Metrics::port() const { return impl_->port; }

void Metrics::RecordCall(std::string_view method, std::string_view code,
                         std::string_view device, double queue_s, double compute_s,
                         double total_s) {
  Impl& m = *impl_;
  const int mi = IndexOf(kMethods, method);
  const int ci = CodeIndex(code);
  const int di = IndexOf(kDevices, device);
  if (mi < 0 || ci < 0 || di < 0) {  // a label outside the known sets: the uncached path
    m.requests.Add({{"method", std::string(method)}, {"code", std::string(code)}, {"device", std::string(device)}}).Increment();
    if (queue_s >= 0) m.queue_seconds.Add({{"method", std::string(method)}}, LatencyBuckets()).Observe(queue_s);
    if (compute_s >= 0) {
      m.compute_seconds.Add({{"method", std::string(method)}, {"device", std::string(device)}}, LatencyBuckets())
          .Observe(compute_s);
    }
    if (total_s >= 0) m.total_seconds.Add({{"method", std::string(method)}}, LatencyBuckets()).Observe(total_s);
    return;
  }
  m.requests_cache
      .Get((mi * kCodes + ci) * Impl::kD + di,
           [&]() -> prometheus::Counter& {
             return m.requests.Add({{"method", std::string(method)}, {"code", std::string(code)}, {"device", std::string(device)}});
           })
      .Increment();
  if (queue_s >= 0) {
    m.queue_cache
        .Get(mi,
             [&]() -> prometheus::Histogram& {
               return m.queue_seconds.Add({{"method", std::string(method)}}, LatencyBuckets());
             })
        .Observe(queue_s);
  }
  if (compute_s >= 0) {
    m.compute_cache
        .Get(mi * Impl::kD + di,
             [&]() -> prometheus::Histogram& {
               return m.compute_seconds.Add({{"method", std::string(method)}, {"device", std::string(device)}},
                                            LatencyBuckets());
             })
        .Observe(compute_s);
  }
  if (total_s >= 0) {
    m.total_cache
        .Get(mi,
             [&]() -> prometheus::Histogram& {
               return m.total_seconds.Add({{"method", std::string(method)}}, LatencyBuckets());
             })
        .Observe(total_s);
  }
}

void Metrics::AddElements(std::string_view device, int64_t elements) {
  Impl& m = *impl_;
  const int di = IndexOf(kDevices, device);
  prometheus::Counter& c =
      di < 0 ? m.elements.Add({{"device", std::string(device)}})
             : m.elements_cache.Get(di, [&]() -> prometheus::Counter& {
                 return m.elements.Add({{"device", std::string(device)}});
               });
  c.Increment(static_cast<double>(elements));
}

void Metrics::AddBytes(std::string_view method, int64_t received, int64_t sent) {
  Impl& m = *impl_;
  const int mi = IndexOf(kMethods, method);
  prometheus::Histogram& h =
      mi < 0 ? m.request_bytes.Add({{"method", std::string(method)}}, SizeBuckets())
             : m.request_bytes_cache.Get(mi, [&]() -> prometheus::Histogram& {
                 return m.request_bytes.Add({{"method", std::string(method)}}, SizeBuckets());
               });
  h.Observe(static_cast<double>(received));
  m.bytes_received.Increment(static_cast<double>(received));
  m.bytes_sent.Increment(static_cast<double>(sent));
}

void Metrics::AddChunks(int64_t chunks) { impl_->chunks.Increment(static_cast<double>(chunks)); }
void Metrics::ObserveBatch(int64_t requests) {
  impl_->batch_requests.Observe(static_cast<double>(requests));
}
void Metrics::InFlight(int delta) { impl_->in_flight.Increment(delta); }
void Metrics::SetQueued(int64_t queued) { impl_->queued.Set(static_cast<double>(queued)); }
void Metrics::SetDraining(bool draining) { impl_->draining.Set(draining ? 1.0 : 0.0); }

std::string DeviceLabel(v1::Device device) {
  switch (device) {
    case v1::DEVICE_CPU:
      return "cpu";
    case v1::DEVICE_CUDA:
      return "cuda";
    default:
      return "none";
  }
}

}  // namespace lossd::server
