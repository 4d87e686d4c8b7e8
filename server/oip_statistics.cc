#include "server/oip_statistics.h"

#include <algorithm>
#include <nlohmann/json.hpp>

#include "server/oip_models.h"

namespace lossd::server {

namespace {

using OrderedJson = nlohmann::ordered_json;

uint64_t NonNegative(int64_t v) { return v > 0 ? static_cast<uint64_t>(v) : 0; }

OrderedJson DurationJson(const inference::StatisticDuration& d) {
  return {{"count", d.count()}, {"ns", d.ns()}};
}

// The inputs a request may leave out.
bool OptionalInput(absl::string_view name) { return name == "WEIGHT" || name == "POS_WEIGHT"; }

// The datatypes every tensor of a model accepts (TranslateInferInputs), in the order its
// messages list them.
constexpr absl::string_view kDatatypes = "FP32,FP64,FP16,BF16";

inference::DataType ConfigDatatype(absl::string_view datatype) {
  if (datatype == "FP64") return inference::TYPE_FP64;
  if (datatype == "FP16") return inference::TYPE_FP16;
  if (datatype == "BF16") return inference::TYPE_BF16;
  return inference::TYPE_FP32;
}

}  // namespace

void OipModelStatistics::Duration::Add(int64_t value_ns) {
  count.fetch_add(1, std::memory_order_relaxed);
  ns.fetch_add(NonNegative(value_ns), std::memory_order_relaxed);
}

void OipModelStatistics::Duration::Fill(inference::StatisticDuration* out) const {
  out->set_count(count.load(std::memory_order_relaxed));
  out->set_ns(ns.load(std::memory_order_relaxed));
}

void OipModelStatistics::RecordSuccess(int64_t end_ns, int64_t total_ns, int64_t queue_ns,
                                    int64_t compute_ns) {
  success_.Add(total_ns);
  queue_.Add(queue_ns);
  compute_infer_.Add(compute_ns);
  // The latest end wins when calls end out of order.
  const uint64_t ms = NonNegative(end_ns) / 1000000;
  uint64_t seen = last_inference_ms_.load(std::memory_order_relaxed);
  while (seen < ms &&
         !last_inference_ms_.compare_exchange_weak(seen, ms, std::memory_order_relaxed)) {
  }
}

void OipModelStatistics::RecordFailure(int64_t total_ns) { fail_.Add(total_ns); }

void OipModelStatistics::Fill(inference::ModelStatistics* out) const {
  inference::InferStatistics* s = out->mutable_inference_stats();
  success_.Fill(s->mutable_success());
  fail_.Fill(s->mutable_fail());
  queue_.Fill(s->mutable_queue());
  compute_infer_.Fill(s->mutable_compute_infer());
  s->mutable_compute_input();
  s->mutable_compute_output();
  // lossd runs every request as one execution of its own (no batching across requests): one
  // inference and one execution per successful request, all of batch size 1.
  const uint64_t n = s->success().count();
  out->set_inference_count(n);
  out->set_execution_count(n);
  out->set_last_inference(last_inference_ms_.load(std::memory_order_relaxed));
  if (s->compute_infer().count() > 0) {
    inference::InferBatchStatistics* b = out->add_batch_stats();
    b->set_batch_size(1);
    b->mutable_compute_input();
    *b->mutable_compute_infer() = s->compute_infer();
    b->mutable_compute_output();
  }
}

OipStatistics::OipStatistics() : models_(OipModels().size()) {}
OipStatistics::~OipStatistics() = default;

OipModelStatistics* OipStatistics::Find(absl::string_view name, absl::string_view version) {
  auto model = FindOipModel(name, version);
  if (!model.ok()) return nullptr;
  return &models_[static_cast<size_t>(*model - OipModels().data())];
}

absl::Status OipStatistics::Fill(absl::string_view name, absl::string_view version,
                                 inference::ModelStatisticsResponse* out) const {
  out->Clear();
  const std::vector<OipModel>& models = OipModels();
  size_t first = 0, last = models.size();
  if (!name.empty()) {
    auto model = FindOipModel(name, version);
    if (!model.ok()) return model.status();
    first = static_cast<size_t>(*model - models.data());
    last = first + 1;
  }
  for (size_t i = first; i < last; ++i) {
    inference::ModelStatistics* m = out->add_model_stats();
    m->set_name(std::string(models[i].name));
    m->set_version(std::string(kOipModelVersion));
    models_[i].Fill(m);
  }
  return absl::OkStatus();
}

absl::Status FillModelConfig(absl::string_view name, absl::string_view version,
                             inference::ModelConfigResponse* out) {
  out->Clear();
  auto model = FindOipModel(name, version);
  if (!model.ok()) return model.status();
  inference::ModelMetadataResponse meta;
  FillModelMetadata(**model, &meta);
  inference::ModelConfig* c = out->mutable_config();
  c->set_name(meta.name());
  c->set_platform(meta.platform());
  c->set_backend(std::string(kOipPlatform));
  c->set_max_batch_size(0);
  for (const auto& t : meta.inputs()) {
    inference::ModelInput* in = c->add_input();
    in->set_name(t.name());
    in->set_data_type(ConfigDatatype(t.datatype()));
    *in->mutable_dims() = t.shape();
    in->set_optional(OptionalInput(t.name()));
  }
  for (const auto& t : meta.outputs()) {
    inference::ModelOutput* o = c->add_output();
    o->set_name(t.name());
    o->set_data_type(ConfigDatatype(t.datatype()));
    *o->mutable_dims() = t.shape();
  }
  (*c->mutable_parameters())["datatypes"].set_string_value(std::string(kDatatypes));
  return absl::OkStatus();
}

std::string ModelStatisticsJson(const inference::ModelStatisticsResponse& stats) {
  OrderedJson list = OrderedJson::array();
  for (const inference::ModelStatistics& m : stats.model_stats()) {
    const inference::InferStatistics& s = m.inference_stats();
    OrderedJson batches = OrderedJson::array();
    for (const inference::InferBatchStatistics& b : m.batch_stats()) {
      batches.push_back({{"batch_size", b.batch_size()},
                         {"compute_input", DurationJson(b.compute_input())},
                         {"compute_infer", DurationJson(b.compute_infer())},
                         {"compute_output", DurationJson(b.compute_output())}});
    }
    list.push_back({{"name", m.name()},
                    {"version", m.version()},
                    {"last_inference", m.last_inference()},
                    {"inference_count", m.inference_count()},
                    {"execution_count", m.execution_count()},
                    {"inference_stats",
                     {{"success", DurationJson(s.success())},
                      {"fail", DurationJson(s.fail())},
                      {"queue", DurationJson(s.queue())},
                      {"compute_input", DurationJson(s.compute_input())},
                      {"compute_infer", DurationJson(s.compute_infer())},
                      {"compute_output", DurationJson(s.compute_output())}}},
                    {"batch_stats", batches}});
  }
  OrderedJson j = {{"model_stats", list}};
  return j.dump(-1, ' ', false, OrderedJson::error_handler_t::replace);
}

std::string ModelConfigJson(const inference::ModelConfig& config) {
  // name, data_type and dims of a ModelInput or ModelOutput.
  const auto tensor = [](const auto& t) {
    OrderedJson dims = OrderedJson::array();
    for (int64_t d : t.dims()) dims.push_back(d);
    return OrderedJson{{"name", t.name()},
                       {"data_type", inference::DataType_Name(t.data_type())},
                       {"dims", dims}};
  };
  OrderedJson inputs = OrderedJson::array();
  for (const inference::ModelInput& in : config.input()) {
    inputs.push_back(tensor(in));
    inputs.back()["optional"] = in.optional();
  }
  OrderedJson outputs = OrderedJson::array();
  for (const inference::ModelOutput& o : config.output()) outputs.push_back(tensor(o));
  OrderedJson parameters = OrderedJson::object();
  // A protobuf map has no order: list the parameters sorted, for a stable reply.
  std::vector<std::string> keys;
  for (const auto& [key, p] : config.parameters()) keys.push_back(key);
  std::sort(keys.begin(), keys.end());
  for (const std::string& key : keys) {
    parameters[key] = {{"string_value", config.parameters().at(key).string_value()}};
  }
  OrderedJson j = {{"name", config.name()},
                   {"platform", config.platform()},
                   {"backend", config.backend()},
                   {"max_batch_size", config.max_batch_size()},
                   {"input", inputs},
                   {"output", outputs},
                   {"parameters", parameters}};
  return j.dump(-1, ' ', false, OrderedJson::error_handler_t::replace);
}

}  // namespace lossd::server
