#include "server/core.h"

#include <utility>

namespace lossd::server {

namespace {

ExecutorOptions ExecutorOptionsOf(const CoreConfig& config) {
  ExecutorOptions o;
  o.workers = config.workers;
  o.queue_capacity = config.queue_capacity;
  o.inline_elements = config.inline_elements;
  o.max_inflight_bytes = config.max_inflight_bytes;
  o.pool_cached_bytes = config.pool_cached_bytes;
  o.batch_max_delay = config.batch_max_delay;
  o.batch_max_elements = config.batch_max_elements;
  return o;
}

}  // namespace

Core::Core(const CoreConfig& config, std::unique_ptr<kernels::Backend> cpu,
           std::unique_ptr<kernels::Backend> cuda, std::string cuda_name, Metrics* metrics)
    : config_(config),
      metrics_(metrics),
      admission_(config.auth_token, metrics),
      planner_(config.limits, cuda != nullptr, std::move(cuda_name)),
      executor_(ExecutorOptionsOf(config), std::move(cpu), std::move(cuda), metrics) {}

}  // namespace lossd::server
