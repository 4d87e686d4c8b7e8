// inference.GRPCInferenceService (KServe v2 / Open Inference Protocol): the translation of
// ModelInferRequest into lossd.v1 and, through a running server, replies that equal lossd.v1's
// Evaluate of the same request bit for bit.
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "inference/grpc_predict_v2.grpc.pb.h"
#include "server/buffer_pool.h"
#include "server/oip_models.h"
#include "server/oip_statistics.h"
#include "server/server.h"
#include "tests/server/test_server_util.h"

namespace lossd::server {
namespace {

using inference::ModelInferRequest;
using inference::ModelInferResponse;
using OipStub = inference::GRPCInferenceService::Stub;
using testing::Connect;
using testing::LoopbackOptions;

template <typename T>
std::string Bytes(const std::vector<T>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

ModelInferRequest::InferInputTensor* AddInput(ModelInferRequest* r, const std::string& name,
                                              const std::string& datatype,
                                              const std::vector<int64_t>& shape) {
  auto* in = r->add_inputs();
  in->set_name(name);
  in->set_datatype(datatype);
  for (int64_t d : shape) in->add_shape(d);
  return in;
}

// A raw FP32 bce_with_logits request over rows x cols values (WEIGHT and POS_WEIGHT [cols]).
ModelInferRequest RawRequest(int64_t rows, int64_t cols, uint64_t seed) {
  const v1::EvaluateRequest v1r =
      testing::RandomRequest<float>(rows, cols, seed, v1::REDUCTION_NONE);
  ModelInferRequest r;
  r.set_model_name("bce_with_logits");
  r.set_id("req-7");
  AddInput(&r, "LOGITS", "FP32", {rows, cols});
  r.add_raw_input_contents(v1r.logits().data());
  AddInput(&r, "TARGETS", "FP32", {rows, cols});
  r.add_raw_input_contents(v1r.targets().data());
  AddInput(&r, "WEIGHT", "FP32", {cols});
  r.add_raw_input_contents(v1r.weight().data());
  AddInput(&r, "POS_WEIGHT", "FP32", {cols});
  r.add_raw_input_contents(v1r.bce_with_logits().pos_weight().data());
  return r;
}

absl::Status Translate(ModelInferRequest r, v1::EvaluateRequest* out = nullptr) {
  v1::EvaluateRequest scratch;
  OipTranslation t;
  return TranslateInferRequest(&r, nullptr, out ? out : &scratch, &t);
}

void ExpectError(const ModelInferRequest& r, absl::StatusCode code, const std::string& part) {
  const absl::Status s = Translate(r);
  EXPECT_EQ(s.code(), code) << s;
  EXPECT_NE(s.message().find(part), std::string::npos) << "message: " << s.message()
                                                       << "\nexpected to contain: " << part;
}

TEST(OipTranslate, RawInputBytesAreMovedNotCopied) {
  ModelInferRequest r = RawRequest(4, 64, 1);
  const char* logits = r.raw_input_contents(0).data();
  const char* pos_weight = r.raw_input_contents(3).data();
  v1::EvaluateRequest out;
  OipTranslation t;
  ASSERT_TRUE(TranslateInferRequest(&r, nullptr, &out, &t).ok());
  EXPECT_EQ(out.logits().data().data(), logits);
  EXPECT_EQ(out.bce_with_logits().pos_weight().data().data(), pos_weight);
  EXPECT_EQ(out.logits().dtype(), v1::DTYPE_FLOAT32);
  EXPECT_EQ(out.request_id(), "req-7");
  EXPECT_EQ(out.reduction(), v1::REDUCTION_UNSPECIFIED);  // lossd.v1's default: mean
  ASSERT_EQ(t.outputs.size(), 1u);
  EXPECT_EQ(t.outputs[0], OipOutput::kLoss);
  EXPECT_FALSE(out.gradients().logits());
}

TEST(OipTranslate, ParametersAndOutputsBecomeTheLossdRequest) {
  ModelInferRequest r = RawRequest(2, 8, 2);
  auto& p = *r.mutable_parameters();
  p["reduction"].set_string_param("per_sample_mean");
  p["ignore_index"].set_int64_param(-100);
  p["normalize"].set_bool_param(true);
  p["label_smoothing"].set_double_param(0.1);
  p["reject_nan"].set_bool_param(true);
  p["device"].set_string_param("cpu");
  p["priority"].set_uint64_param(3);  // accepted and ignored
  r.add_outputs()->set_name("GRAD_TARGETS");
  r.add_outputs()->set_name("LOSS");
  v1::EvaluateRequest out;
  OipTranslation t;
  ASSERT_TRUE(TranslateInferRequest(&r, nullptr, &out, &t).ok());
  EXPECT_EQ(out.reduction(), v1::REDUCTION_PER_SAMPLE_MEAN);
  EXPECT_EQ(out.bce_with_logits().ignore_index(), -100);
  EXPECT_TRUE(out.bce_with_logits().normalize());
  EXPECT_EQ(out.bce_with_logits().label_smoothing(), 0.1);
  EXPECT_TRUE(out.reject_nan());
  EXPECT_EQ(out.device(), v1::DEVICE_CPU);
  EXPECT_TRUE(out.gradients().targets());
  EXPECT_FALSE(out.gradients().logits());
  EXPECT_EQ(t.outputs, (std::vector<OipOutput>{OipOutput::kGradTargets, OipOutput::kLoss}));

  ModelInferRequest f;
  f.set_model_name("sigmoid_focal_loss");
  f.set_model_version("1");
  AddInput(&f, "LOGITS", "FP64", {2})->mutable_contents()->add_fp64_contents(0.5);
  f.mutable_inputs(0)->mutable_contents()->add_fp64_contents(-1.5);
  AddInput(&f, "TARGETS", "FP64", {2})->mutable_contents()->add_fp64_contents(1);
  f.mutable_inputs(1)->mutable_contents()->add_fp64_contents(0);
  (*f.mutable_parameters())["alpha"].set_double_param(-1);
  (*f.mutable_parameters())["gamma"].set_int64_param(3);
  ASSERT_TRUE(Translate(f, &out).ok());
  EXPECT_TRUE(out.has_sigmoid_focal_loss());
  EXPECT_EQ(out.sigmoid_focal_loss().alpha(), -1);
  EXPECT_EQ(out.sigmoid_focal_loss().gamma(), 3);
  const std::vector<double> x = {0.5, -1.5};
  EXPECT_EQ(out.logits().data(), Bytes(x));  // typed contents: the same bytes as raw
}

TEST(OipTranslate, BadRequestsNameTheInputOutputOrParameter) {
  using absl::StatusCode;
  const ModelInferRequest r = RawRequest(2, 4, 3);
  // Edits of the good request r, each with a part of the message it gets and the code.
  struct Case {
    std::function<void(ModelInferRequest&)> edit;
    std::string error;
    StatusCode code = StatusCode::kInvalidArgument;
  };
  auto in_shm = [](ModelInferRequest& b) {
    (*b.mutable_inputs(0)->mutable_parameters())["shared_memory_region"].set_string_param("r");
  };
  auto param = [](ModelInferRequest& b, const std::string& name) -> inference::InferParameter& {
    return (*b.mutable_parameters())[name];
  };
  const Case cases[] = {
      {[](ModelInferRequest& b) { b.set_model_name("cross_entropy"); },
       "unknown model 'cross_entropy'; this server has models bce_with_logits, "
       "sigmoid_focal_loss",
       StatusCode::kNotFound},
      {[](ModelInferRequest& b) { b.set_model_version("2"); },
       "model 'bce_with_logits' has no version '2'", StatusCode::kNotFound},
      {[](ModelInferRequest& b) { b.mutable_inputs(2)->set_name("WEIGHTS"); },
       "unknown input 'WEIGHTS' for model 'bce_with_logits'; its inputs are LOGITS, "
       "TARGETS, WEIGHT, POS_WEIGHT"},
      {[](ModelInferRequest& b) { b.mutable_inputs(2)->set_name("LOGITS"); },
       "input 'LOGITS' is given more than once"},
      {[](ModelInferRequest& b) {
         b.mutable_inputs()->DeleteSubrange(1, 3);
         b.mutable_raw_input_contents()->DeleteSubrange(1, 3);
       },
       "missing input 'TARGETS'; model 'bce_with_logits' needs LOGITS and TARGETS"},
      {[](ModelInferRequest& b) { b.mutable_inputs(0)->set_datatype("INT32"); },
       "input 'LOGITS': datatype 'INT32' of model 'bce_with_logits' is not supported; "
       "expected one of FP32, FP64, FP16, BF16"},
      {[](ModelInferRequest& b) { b.mutable_inputs(1)->set_shape(1, 5); },
       "input 'TARGETS': raw_input_contents[1] has 32 bytes, expected 40 for shape "
       "[2,5] of FP32"},
      {[](ModelInferRequest& b) { b.mutable_inputs(1)->set_shape(1, -4); },
       "input 'TARGETS': shape [2,-4] has negative"},
      {[](ModelInferRequest& b) { b.mutable_raw_input_contents()->RemoveLast(); },
       "raw_input_contents has 3 entries for 4 inputs"},
      {[](ModelInferRequest& b) { b.mutable_inputs(0)->mutable_contents()->add_fp32_contents(1); },
       "input 'LOGITS' has both contents and raw_input_contents[0]"},
      {in_shm, "raw_input_contents has 4 entries for 3 inputs not in shared memory"},
      {[&](ModelInferRequest& b) {
         in_shm(b);
         b.mutable_raw_input_contents()->DeleteSubrange(0, 1);  // LOGITS has no raw entry
       },
       "input 'LOGITS' has parameter 'shared_memory_region' but no "
       "'shared_memory_byte_size'"},
      {[](ModelInferRequest& b) {
         (*b.mutable_inputs(0)->mutable_parameters())["cuda_shared_memory"].set_string_param("r");
       },
       "input 'LOGITS': parameter 'cuda_shared_memory' is not supported"},
      {[&](ModelInferRequest& b) { param(b, "reduction").set_string_param("avg"); },
       "parameter 'reduction' 'avg' is not one of none, mean, sum, per_sample_mean"},
      {[&](ModelInferRequest& b) { param(b, "normalize").set_string_param("yes"); },
       "parameter 'normalize' must be a bool; got string 'yes'"},
      {[&](ModelInferRequest& b) { param(b, "alpha").set_double_param(0.5); },
       "unknown parameter 'alpha' for model 'bce_with_logits'; its parameters are "
       "reduction, ignore_index, normalize, label_smoothing, reject_nan, device"},
      {[&](ModelInferRequest& b) { param(b, "device").set_string_param("tpu"); },
       "parameter 'device' 'tpu' is not one of auto, cpu, cuda"},
      {[](ModelInferRequest& b) { b.add_outputs()->set_name("GRAD"); },
       "unknown output 'GRAD' for model 'bce_with_logits'; its outputs are LOSS, "
       "GRAD_LOGITS, GRAD_TARGETS"},
      {[](ModelInferRequest& b) {
         b.add_outputs()->set_name("LOSS");
         b.add_outputs()->set_name("LOSS");
       },
       "output 'LOSS' is requested more than once"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.error);
    ModelInferRequest b = r;
    c.edit(b);
    ExpectError(b, c.code, c.error);
  }
  {
    ModelInferRequest f;
    f.set_model_name("sigmoid_focal_loss");
    AddInput(&f, "LOGITS", "FP16", {1});
    AddInput(&f, "TARGETS", "FP16", {1});
    ExpectError(f, StatusCode::kInvalidArgument,
                "input 'LOGITS': datatype FP16 has no typed contents in the protocol; send its "
                "bytes in raw_input_contents");
    f.mutable_inputs(0)->set_datatype("FP32");
    f.mutable_inputs(0)->mutable_contents()->add_fp32_contents(1);
    f.mutable_inputs(0)->mutable_contents()->add_fp32_contents(2);
    ExpectError(f, StatusCode::kInvalidArgument,
                "input 'LOGITS': fp32_contents has 2 elements, expected 1 for shape [1]");
    f.mutable_inputs(0)->mutable_contents()->clear_fp32_contents();
    f.mutable_inputs(0)->mutable_contents()->add_int_contents(1);
    ExpectError(f, StatusCode::kInvalidArgument,
                "input 'LOGITS': datatype FP32 takes its elements in fp32_contents; 1 elements "
                "are in other contents fields");
    ModelInferRequest g;
    g.set_model_name("sigmoid_focal_loss");
    AddInput(&g, "POS_WEIGHT", "FP32", {0});
    ExpectError(g, StatusCode::kInvalidArgument,
                "unknown input 'POS_WEIGHT' for model 'sigmoid_focal_loss'; its inputs are "
                "LOGITS, TARGETS, WEIGHT");
    ModelInferRequest h;
    h.set_model_name("sigmoid_focal_loss");
    AddInput(&h, "LOGITS", "FP32", {0});
    AddInput(&h, "TARGETS", "FP32", {0});
    h.add_outputs()->set_name("GRAD_TARGETS");
    ExpectError(h, StatusCode::kInvalidArgument,
                "unknown output 'GRAD_TARGETS' for model 'sigmoid_focal_loss'; its outputs are "
                "LOSS, GRAD_LOGITS");
  }
}

TEST(OipModels, MetadataListsEveryInputAndOutput) {
  auto bce = FindOipModel("bce_with_logits", "");
  ASSERT_TRUE(bce.ok());
  inference::ModelMetadataResponse m;
  FillModelMetadata(**bce, &m);
  EXPECT_EQ(m.name(), "bce_with_logits");
  ASSERT_EQ(m.versions_size(), 1);
  EXPECT_EQ(m.versions(0), "1");
  EXPECT_EQ(m.platform(), "lossd");
  std::vector<std::string> names;
  for (const auto& t : m.inputs()) names.push_back(t.name());
  for (const auto& t : m.outputs()) names.push_back(t.name());
  EXPECT_EQ(names, (std::vector<std::string>{"LOGITS", "TARGETS", "WEIGHT", "POS_WEIGHT", "LOSS",
                                             "GRAD_LOGITS", "GRAD_TARGETS"}));
}

TEST(OipReply, EncodedReplyIsProtobufsSerialization) {
  // Small outputs are copied into the first slice, large ones (>= kZeroCopyBytes) are slices of
  // their blocks: either way the bytes are protobuf's serialization of the same message.
  BufferPool pool;
  ComputeResult result;
  auto fill = [&pool](OutputTensor* t, v1::DType dtype, std::vector<int64_t> shape,
                      size_t bytes) {
    t->present = true;
    t->dtype = dtype;
    t->shape = std::move(shape);
    t->block = pool.Get(bytes);
    for (size_t i = 0; i < bytes; ++i) t->block.data()[i] = static_cast<char>(i * 7 + 3);
  };
  fill(&result.loss, v1::DTYPE_FLOAT64, {}, 8);
  fill(&result.grad_logits, v1::DTYPE_FLOAT32, {300, 100}, 120000);
  fill(&result.grad_targets, v1::DTYPE_FLOAT32, {300, 100}, 120000);
  result.device = v1::DEVICE_CPU;
  const std::vector<OipOutput> outputs = {OipOutput::kGradLogits, OipOutput::kLoss,
                                          OipOutput::kGradTargets};
  const OipModel& model = OipModels()[0];
  ModelInferResponse want;
  ASSERT_TRUE(BuildInferResponse(model, "id-1", outputs, result, &want).ok());
  EXPECT_EQ(InferReplyPayloadBytes(outputs, result), 240008);
  grpc::ByteBuffer buffer;
  ASSERT_TRUE(EncodeInferReply(model, "id-1", outputs, &result, &buffer).ok());
  std::vector<grpc::Slice> slices;
  ASSERT_TRUE(buffer.Dump(&slices).ok());
  EXPECT_GE(slices.size(), 3u);
  std::string got;
  for (const grpc::Slice& s : slices) got.append(reinterpret_cast<const char*>(s.begin()), s.size());
  std::string serialized;
  ASSERT_TRUE(want.SerializeToString(&serialized));
  EXPECT_TRUE(got == serialized) << got.size() << " vs " << serialized.size();
  ModelInferResponse parsed;
  ASSERT_TRUE(parsed.ParseFromString(got));
  EXPECT_EQ(parsed.outputs(0).name(), "GRAD_LOGITS");
  EXPECT_EQ(parsed.outputs(1).datatype(), "FP64");
  EXPECT_EQ(parsed.parameters().at("device").string_param(), "cpu");
}

// ---- Triton's statistics and configuration extensions (oip_statistics.h) ----

// `all` lists the two models in order: bce_with_logits, version 1, with `calls` inferences,
// executions and successes and `failures` failures, then sigmoid_focal_loss.
void ExpectBothModels(const inference::ModelStatisticsResponse& all, uint64_t calls,
                      uint64_t failures) {
  ASSERT_EQ(all.model_stats_size(), 2);
  const inference::ModelStatistics& bce = all.model_stats(0);
  EXPECT_EQ(bce.name(), "bce_with_logits");
  EXPECT_EQ(bce.version(), "1");
  EXPECT_EQ(bce.inference_count(), calls);
  EXPECT_EQ(bce.execution_count(), calls);
  EXPECT_EQ(bce.inference_stats().success().count(), calls);
  EXPECT_EQ(bce.inference_stats().fail().count(), failures);
  EXPECT_EQ(all.model_stats(1).name(), "sigmoid_focal_loss");
}

TEST(OipStatistics, CountsEveryRecordFromManyThreads) {
  OipStatistics stats;
  OipModelStatistics* bce = stats.Find("bce_with_logits", "");
  ASSERT_NE(bce, nullptr);
  EXPECT_EQ(stats.Find("bce_with_logits", "1"), bce);
  EXPECT_EQ(stats.Find("bce_with_logits", "2"), nullptr);
  EXPECT_EQ(stats.Find("cross_entropy", ""), nullptr);
  OipModelStatistics* focal = stats.Find("sigmoid_focal_loss", "");
  ASSERT_NE(focal, nullptr);
  EXPECT_NE(focal, bce);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([bce, t] {
      for (int i = 0; i < 1000; ++i) {
        bce->RecordSuccess((int64_t{1700000000000} + t * 1000 + i) * 1000000, 10, 3,
                           5);
        if (i % 4 == 0) bce->RecordFailure(7);
      }
    });
  }
  for (auto& t : threads) t.join();
  inference::ModelStatisticsResponse all;
  ASSERT_TRUE(stats.Fill("", "", &all).ok());
  ASSERT_NO_FATAL_FAILURE(ExpectBothModels(all, 4000, 1000));
  const inference::ModelStatistics& m = all.model_stats(0);
  // The latest end of all: thread 3's last record, in milliseconds.
  EXPECT_EQ(m.last_inference(), uint64_t{1700000000000} + 3999);
  const inference::InferStatistics& s = m.inference_stats();
  EXPECT_EQ(s.success().ns(), 40000u);
  EXPECT_EQ(s.fail().ns(), 7000u);
  EXPECT_EQ(s.queue().count(), 4000u);
  EXPECT_EQ(s.queue().ns(), 12000u);
  EXPECT_EQ(s.compute_infer().count(), 4000u);
  EXPECT_EQ(s.compute_infer().ns(), 20000u);
  EXPECT_EQ(s.compute_input().count(), 0u);
  ASSERT_EQ(m.batch_stats_size(), 1);
  EXPECT_EQ(m.batch_stats(0).batch_size(), 1u);
  EXPECT_EQ(m.batch_stats(0).compute_infer().ns(), 20000u);
  // A model with no calls: zeros, no batch statistics.
  const inference::ModelStatistics& f = all.model_stats(1);
  EXPECT_EQ(f.inference_count(), 0u);
  EXPECT_EQ(f.last_inference(), 0u);
  EXPECT_EQ(f.batch_stats_size(), 0);
  // One model; unknown models and versions.
  inference::ModelStatisticsResponse one;
  ASSERT_TRUE(stats.Fill("sigmoid_focal_loss", "1", &one).ok());
  ASSERT_EQ(one.model_stats_size(), 1);
  EXPECT_EQ(one.model_stats(0).name(), "sigmoid_focal_loss");
  absl::Status st = stats.Fill("cross_entropy", "", &one);
  EXPECT_EQ(st.code(), absl::StatusCode::kNotFound);
  EXPECT_NE(st.message().find("unknown model 'cross_entropy'"), std::string::npos) << st;
  st = stats.Fill("bce_with_logits", "2", &one);
  EXPECT_EQ(st.code(), absl::StatusCode::kNotFound);
  EXPECT_NE(st.message().find("has no version '2'"), std::string::npos) << st;
}

TEST(OipConfig, ListsTheMetadataTensorsWithTritonsDatatypes) {
  inference::ModelConfigResponse r;
  ASSERT_TRUE(FillModelConfig("bce_with_logits", "", &r).ok());
  const inference::ModelConfig& c = r.config();
  EXPECT_EQ(c.name(), "bce_with_logits");
  EXPECT_EQ(c.platform(), "lossd");
  EXPECT_EQ(c.backend(), "lossd");
  EXPECT_EQ(c.max_batch_size(), 0);
  ASSERT_EQ(c.input_size(), 4);
  std::vector<std::string> names;
  for (const auto& in : c.input()) {
    names.push_back(in.name());
    EXPECT_EQ(in.data_type(), inference::TYPE_FP32);
    ASSERT_EQ(in.dims_size(), 1);
    EXPECT_EQ(in.dims(0), -1);
    EXPECT_EQ(in.optional(), in.name() == "WEIGHT" || in.name() == "POS_WEIGHT") << in.name();
  }
  EXPECT_EQ(names, (std::vector<std::string>{"LOGITS", "TARGETS", "WEIGHT", "POS_WEIGHT"}));
  ASSERT_EQ(c.output_size(), 3);
  EXPECT_EQ(c.output(2).name(), "GRAD_TARGETS");
  EXPECT_EQ(c.output(2).data_type(), inference::TYPE_FP32);
  EXPECT_EQ(c.parameters().at("datatypes").string_value(), "FP32,FP64,FP16,BF16");
  ASSERT_TRUE(FillModelConfig("sigmoid_focal_loss", "1", &r).ok());
  EXPECT_EQ(r.config().input_size(), 3);
  EXPECT_EQ(r.config().output_size(), 2);
  EXPECT_EQ(FillModelConfig("sigmoid_focal_loss", "7", &r).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(FillModelConfig("", "", &r).code(), absl::StatusCode::kNotFound);
}

// ---- through a running server ----

class OipServerTest : public ::testing::Test {
 protected:
  void StartServer(ServerOptions o = LoopbackOptions()) {
    server_ = testing::StartServer(o);
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(256 << 20);
    args.SetMaxSendMessageSize(256 << 20);
    auto channel = grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", server_->port()),
                                             grpc::InsecureChannelCredentials(), args);
    oip_ = inference::GRPCInferenceService::NewStub(channel);
    lossd_ = Connect(server_->port());
  }

  // One call of the inference service's `method` on a fresh context, with the bearer `token`
  // unless it is empty.
  template <typename Request, typename Response>
  grpc::Status Call(grpc::Status (OipStub::*method)(grpc::ClientContext*, const Request&,
                                                    Response*),
                    const Request& r, Response* out, const std::string& token = "") {
    grpc::ClientContext ctx;
    if (!token.empty()) ctx.AddMetadata("authorization", "Bearer " + token);
    return (oip_.get()->*method)(&ctx, r, out);
  }

  grpc::Status Infer(const ModelInferRequest& r, ModelInferResponse* out,
                     const std::string& token = "") {
    return Call(&OipStub::ModelInfer, r, out, token);
  }

  v1::EvaluateResponse Evaluate(const v1::EvaluateRequest& r) {
    grpc::ClientContext ctx;
    v1::EvaluateResponse out;
    const grpc::Status s = lossd_->Evaluate(&ctx, r, &out);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return out;
  }

  // ModelInfer of `r` and lossd.v1 Evaluate of the same request give the same bytes.
  void ExpectSameAsEvaluate(const ModelInferRequest& r) {
    v1::EvaluateRequest v1r;
    {
      OipTranslation t;
      ModelInferRequest copy = r;
      ASSERT_TRUE(TranslateInferRequest(&copy, nullptr, &v1r, &t).ok());
    }
    const v1::EvaluateResponse want = Evaluate(v1r);
    ModelInferResponse got;
    const grpc::Status s = Infer(r, &got);
    ASSERT_TRUE(s.ok()) << s.error_message();
    EXPECT_EQ(got.model_name(), r.model_name());
    EXPECT_EQ(got.model_version(), "1");
    EXPECT_EQ(got.id(), r.id());
    EXPECT_EQ(got.parameters().at("device").string_param(), "cpu");
    ASSERT_EQ(got.outputs_size(), got.raw_output_contents_size());
    std::vector<std::string> names;
    if (r.outputs_size() == 0) names.push_back("LOSS");
    for (const auto& o : r.outputs()) names.push_back(o.name());
    ASSERT_EQ(got.outputs_size(), static_cast<int>(names.size()));
    for (int i = 0; i < got.outputs_size(); ++i) {
      const auto& o = got.outputs(i);
      EXPECT_EQ(o.name(), names[i]);
      const v1::Tensor& w = o.name() == "LOSS"          ? want.loss()
                            : o.name() == "GRAD_LOGITS" ? want.grad_logits()
                                                        : want.grad_targets();
      EXPECT_EQ(o.datatype(), OipDatatype(w.dtype()));
      EXPECT_EQ(std::vector<int64_t>(o.shape().begin(), o.shape().end()),
                std::vector<int64_t>(w.shape().begin(), w.shape().end()));
      EXPECT_TRUE(got.raw_output_contents(i) == w.data()) << o.name() << " differs";
    }
  }

  std::unique_ptr<LossdServer> server_;
  std::unique_ptr<OipStub> oip_;
  std::unique_ptr<v1::LossService::Stub> lossd_;
};

TEST_F(OipServerTest, ModelInferEqualsEvaluateBitForBit) {
  StartServer();
  for (const char* reduction : {"none", "mean", "sum", "per_sample_mean"}) {
    ModelInferRequest r = RawRequest(3, 17, 11);
    (*r.mutable_parameters())["reduction"].set_string_param(reduction);
    r.add_outputs()->set_name("GRAD_LOGITS");
    r.add_outputs()->set_name("LOSS");
    r.add_outputs()->set_name("GRAD_TARGETS");
    SCOPED_TRACE(reduction);
    ExpectSameAsEvaluate(r);
  }
  // Larger than --inline_elements (the worker queue) and than the zero-copy threshold (the
  // outputs go out as slices of their blocks).
  ModelInferRequest big = RawRequest(64, 1024, 12);
  (*big.mutable_parameters())["reduction"].set_string_param("none");
  big.add_outputs()->set_name("LOSS");
  big.add_outputs()->set_name("GRAD_LOGITS");
  ExpectSameAsEvaluate(big);
  // Typed contents (the slow path) and the focal loss.
  ModelInferRequest f;
  f.set_model_name("sigmoid_focal_loss");
  f.set_id("focal");
  auto* x = AddInput(&f, "LOGITS", "FP64", {2, 3})->mutable_contents();
  auto* y = AddInput(&f, "TARGETS", "FP64", {2, 3})->mutable_contents();
  for (int i = 0; i < 6; ++i) {
    x->add_fp64_contents(-3.0 + 1.1 * i);
    y->add_fp64_contents(i % 2);
  }
  (*f.mutable_parameters())["gamma"].set_double_param(1.5);
  (*f.mutable_parameters())["reduction"].set_string_param("none");
  f.add_outputs()->set_name("GRAD_LOGITS");
  ExpectSameAsEvaluate(f);
}

TEST_F(OipServerTest, HealthMetadataAndErrors) {
  StartServer();
  {
    grpc::ClientContext ctx;
    inference::ServerLiveResponse live;
    ASSERT_TRUE(oip_->ServerLive(&ctx, {}, &live).ok());
    EXPECT_TRUE(live.live());
  }
  {
    grpc::ClientContext ctx;
    inference::ServerReadyResponse ready;
    ASSERT_TRUE(oip_->ServerReady(&ctx, {}, &ready).ok());
    EXPECT_TRUE(ready.ready());
  }
  for (const char* name : {"bce_with_logits", "sigmoid_focal_loss", "nope"}) {
    grpc::ClientContext ctx;
    inference::ModelReadyRequest req;
    req.set_name(name);
    inference::ModelReadyResponse ready;
    ASSERT_TRUE(oip_->ModelReady(&ctx, req, &ready).ok());
    EXPECT_EQ(ready.ready(), std::string(name) != "nope") << name;
  }
  {
    grpc::ClientContext ctx;
    inference::ServerMetadataResponse meta;
    ASSERT_TRUE(oip_->ServerMetadata(&ctx, {}, &meta).ok());
    EXPECT_EQ(meta.name(), "lossd");
    EXPECT_EQ(meta.version(), LOSSD_VERSION);
  }
  {
    grpc::ClientContext ctx;
    inference::ModelMetadataRequest req;
    req.set_name("sigmoid_focal_loss");
    inference::ModelMetadataResponse meta;
    ASSERT_TRUE(oip_->ModelMetadata(&ctx, req, &meta).ok());
    EXPECT_EQ(meta.inputs_size(), 3);
    EXPECT_EQ(meta.outputs_size(), 2);
    grpc::ClientContext ctx2;
    req.set_name("nope");
    const grpc::Status s = oip_->ModelMetadata(&ctx2, req, &meta);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);
  }
  // Errors of the shared validation (lossd.v1's field names).
  ModelInferRequest r = RawRequest(2, 4, 5);
  r.mutable_inputs(2)->set_shape(0, 3);
  r.mutable_raw_input_contents(2)->resize(12);
  ModelInferResponse out;
  grpc::Status s = Infer(r, &out);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("weight"), std::string::npos) << s.error_message();
  r = RawRequest(2, 4, 5);
  (*r.mutable_parameters())["label_smoothing"].set_double_param(2);
  s = Infer(r, &out);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("label_smoothing 2 is outside [0, 1]"), std::string::npos)
      << s.error_message();
  // Bytes that are not a ModelInferRequest.
  grpc::GenericStub generic(grpc::CreateChannel(absl::StrCat("127.0.0.1:", server_->port()),
                                                grpc::InsecureChannelCredentials()));
  const grpc::Status status = testing::UnaryBytes(
      &generic, "/inference.GRPCInferenceService/ModelInfer",
      std::string("\x0a\xff\xff\xff\xff\x0f", 6));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(status.error_message().find("do not parse as inference.ModelInferRequest"),
            std::string::npos)
      << status.error_message();
}

TEST_F(OipServerTest, StatisticsCountModelInferCallsAndConfigListsTensors) {
  StartServer();
  const uint64_t before_ms = static_cast<uint64_t>(absl::GetCurrentTimeNanos() / 1000000);
  ModelInferResponse out;
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(Infer(RawRequest(2, 4, 20 + i), &out).ok());
  // Failures of a known model: a bad parameter (translation) and lossd.v1's validation.
  ModelInferRequest bad = RawRequest(2, 4, 5);
  (*bad.mutable_parameters())["reduction"].set_string_param("avg");
  EXPECT_FALSE(Infer(bad, &out).ok());
  bad = RawRequest(2, 4, 5);
  (*bad.mutable_parameters())["label_smoothing"].set_double_param(2);
  EXPECT_FALSE(Infer(bad, &out).ok());
  // An unknown model counts for no model.
  bad = RawRequest(2, 4, 5);
  bad.set_model_name("cross_entropy");
  EXPECT_EQ(Infer(bad, &out).error_code(), grpc::StatusCode::NOT_FOUND);
  const uint64_t after_ms = static_cast<uint64_t>(absl::GetCurrentTimeNanos() / 1000000);

  grpc::ClientContext ctx;
  inference::ModelStatisticsRequest req;
  inference::ModelStatisticsResponse stats;
  ASSERT_TRUE(oip_->ModelStatistics(&ctx, req, &stats).ok());
  ASSERT_NO_FATAL_FAILURE(ExpectBothModels(stats, 3, 2));
  const inference::ModelStatistics& bce = stats.model_stats(0);
  EXPECT_GE(bce.last_inference(), before_ms);
  EXPECT_LE(bce.last_inference(), after_ms);
  const inference::InferStatistics& s = bce.inference_stats();
  EXPECT_GT(s.success().ns(), 0u);
  EXPECT_GT(s.fail().ns(), 0u);
  EXPECT_EQ(s.compute_infer().count(), 3u);
  EXPECT_LE(s.compute_infer().ns(), s.success().ns());
  EXPECT_EQ(stats.model_stats(1).inference_count(), 0u);
  EXPECT_EQ(stats.model_stats(1).inference_stats().fail().count(), 0u);

  grpc::ClientContext ctx2;
  req.set_name("cross_entropy");
  const grpc::Status missing = oip_->ModelStatistics(&ctx2, req, &stats);
  EXPECT_EQ(missing.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_NE(missing.error_message().find("unknown model 'cross_entropy'"), std::string::npos)
      << missing.error_message();

  grpc::ClientContext ctx3;
  inference::ModelConfigRequest creq;
  creq.set_name("sigmoid_focal_loss");
  inference::ModelConfigResponse config;
  ASSERT_TRUE(oip_->ModelConfig(&ctx3, creq, &config).ok());
  EXPECT_EQ(config.config().name(), "sigmoid_focal_loss");
  ASSERT_EQ(config.config().input_size(), 3);
  EXPECT_EQ(config.config().input(0).data_type(), inference::TYPE_FP32);
  grpc::ClientContext ctx4;
  creq.set_version("2");
  EXPECT_EQ(oip_->ModelConfig(&ctx4, creq, &config).error_code(), grpc::StatusCode::NOT_FOUND);
}

TEST_F(OipServerTest, BearerTokenGuardsInferenceButNotProbes) {
  ServerOptions o = LoopbackOptions();
  o.auth_token = "t0ken";
  StartServer(o);
  ModelInferRequest r = RawRequest(1, 4, 6);
  ModelInferResponse out;
  EXPECT_EQ(Infer(r, &out).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(Infer(r, &out, "wrong").error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_TRUE(Infer(r, &out, "t0ken").ok());
  inference::ServerMetadataResponse meta;
  EXPECT_EQ(Call(&OipStub::ServerMetadata, {}, &meta).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  inference::ServerLiveResponse live;
  EXPECT_TRUE(Call(&OipStub::ServerLive, {}, &live).ok());
  // The extensions need the token; a refused call counts for no model.
  inference::ModelStatisticsResponse stats;
  EXPECT_EQ(Call(&OipStub::ModelStatistics, {}, &stats).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  inference::ModelConfigRequest creq;
  creq.set_name("bce_with_logits");
  inference::ModelConfigResponse config;
  EXPECT_EQ(Call(&OipStub::ModelConfig, creq, &config).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  ASSERT_TRUE(Call(&OipStub::ModelStatistics, {}, &stats, "t0ken").ok());
  EXPECT_EQ(stats.model_stats(0).inference_count(), 1u);
  EXPECT_EQ(stats.model_stats(0).inference_stats().fail().count(), 0u);
}

}  // namespace
}  // namespace lossd::server
