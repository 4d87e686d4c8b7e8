// The KServe v2 REST front-end (oip_http.h, docs/interop.md "HTTP/REST") without a socket:
// routes, JSON and binary tensor data, and the edge cases of parsing them. Every malformed
// request gets a clear 4xx with a JSON {"error": ...} naming the field and the values, never a
// crash; results are checked against a float64 evaluation of the loss written here.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "server/core.h"
#include "lossd/kernels/backend.h"
#include "server/metrics.h"
#include "server/oip_http.h"

namespace lossd::server {
namespace {

using Json = nlohmann::json;

// A request with `body`; Content-Length is the body's size unless `content_length` says
// otherwise (-1: absent). The body is handed out in pieces of at most `chunk` bytes, like a
// socket's reads.
struct Exchange {
  std::string method = "POST";
  std::string path = "/v2/models/bce_with_logits/infer";
  std::string body;
  std::map<std::string, std::string> headers;  // lower-case names
  int64_t content_length = -2;
  size_t chunk = 7;
};

HttpResponse Call(Core* core, const Exchange& e) {
  HttpRequest r;
  r.method = e.method;
  r.path = e.path;
  r.content_length = e.content_length == -2 ? static_cast<int64_t>(e.body.size())
                                            : e.content_length;
  auto headers = std::make_shared<std::map<std::string, std::string>>(e.headers);
  r.header = [headers](const char* name) -> const char* {
    auto it = headers->find(absl::AsciiStrToLower(name));
    return it == headers->end() ? nullptr : it->second.c_str();
  };
  auto body = std::make_shared<std::string>(e.body);
  auto pos = std::make_shared<size_t>(0);
  const size_t chunk = e.chunk;
  r.read = [body, pos, chunk](char* buf, size_t n) -> int64_t {
    const size_t k = std::min({n, chunk, body->size() - *pos});
    std::memcpy(buf, body->data() + *pos, k);
    *pos += k;
    return static_cast<int64_t>(k);
  };
  r.peer = "ipv4:127.0.0.1:1";
  return HandleOipHttp(core, r);
}

Json Body(const HttpResponse& r) {
  return Json::parse(r.body);  // throws (fails the test) when a reply is not JSON
}

std::string Binary(const HttpResponse& r) {
  std::string out;
  for (absl::string_view b : r.binary) out.append(b.data(), b.size());
  return out;
}

template <typename T>
std::string Bytes(const std::vector<T>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

// float64 BCE with logits, per element (docs/design.md section 3).
double Bce(double x, double y) {
  const auto softplus = [](double t) { return std::max(t, 0.0) + std::log1p(std::exp(-std::abs(t))); };
  return (1 - y) * softplus(x) + y * softplus(-x);
}
double BceGrad(double x, double y) { return 1 / (1 + std::exp(-x)) - y; }

class OipHttpTest : public ::testing::Test {
 protected:
  void SetUp() override { Make(CoreConfig()); }

  void Make(CoreConfig config) {
    if (config.max_message_bytes == 0) config.max_message_bytes = int64_t{1} << 20;
    core_.reset();
    core_ = std::make_unique<Core>(config, kernels::MakeCpuBackend({1}), nullptr, "", &metrics_);
  }

  HttpResponse Post(const std::string& body, std::map<std::string, std::string> headers = {}) {
    Exchange e;
    e.body = body;
    e.headers = std::move(headers);
    return Call(core_.get(), e);
  }

  HttpResponse Get(const std::string& path, std::map<std::string, std::string> headers = {}) {
    Exchange e;
    e.method = "GET";
    e.path = path;
    e.headers = std::move(headers);
    return Call(core_.get(), e);
  }

  // A 4xx whose {"error"} contains `part`.
  void ExpectError(const HttpResponse& r, int status, const std::string& part) {
    EXPECT_EQ(r.status, status) << r.body;
    const Json j = Body(r);
    ASSERT_TRUE(j.contains("error")) << r.body;
    const std::string message = j["error"].get<std::string>();
    EXPECT_NE(message.find(part), std::string::npos)
        << "message: " << message << "\nexpected to contain: " << part;
  }

  void ExpectBadJson(const std::string& body, const std::string& part) {
    SCOPED_TRACE(body.substr(0, 200));
    ExpectError(Post(body), 400, part);
  }

  Metrics metrics_;
  std::unique_ptr<Core> core_;
};

const char* kInputs =
    R"({"inputs":[{"name":"LOGITS","datatype":"FP32","shape":[2,2],"data":[[0.5,-2],[3,0]]},)"
    R"({"name":"TARGETS","datatype":"FP32","shape":[2,2],"data":[1,0,0.25,1]}])";

TEST_F(OipHttpTest, HealthMetadataAndRoutes) {
  EXPECT_EQ(Body(Get("/v2/health/live"))["live"], true);
  EXPECT_EQ(Get("/v2/health/ready").status, 200);
  EXPECT_EQ(Get("/v2/models/bce_with_logits/ready").status, 200);
  EXPECT_EQ(Get("/v2/models/sigmoid_focal_loss/versions/1/ready").status, 200);
  EXPECT_EQ(Get("/v2/models/sigmoid_focal_loss/versions/2/ready").status, 400);
  EXPECT_EQ(Get("/v2/models/cross_entropy/ready").status, 400);
  const Json server = Body(Get("/v2"));
  EXPECT_EQ(server["name"], "lossd");
  EXPECT_EQ(server["extensions"],
            Json({"parameters", "model_configuration", "statistics", "system_shared_memory",
                  "binary_tensor_data"}));
  const Json bce = Body(Get("/v2/models/bce_with_logits"));
  EXPECT_EQ(bce["versions"], Json({"1"}));
  EXPECT_EQ(bce["platform"], "lossd");
  ASSERT_EQ(bce["inputs"].size(), 4u);
  EXPECT_EQ(bce["inputs"][3]["name"], "POS_WEIGHT");
  EXPECT_EQ(bce["inputs"][0]["shape"], Json({-1}));
  EXPECT_EQ(Body(Get("/v2/models/sigmoid_focal_loss/versions/1"))["outputs"].size(), 2u);
  ExpectError(Get("/v2/models/cross_entropy"), 404, "unknown model 'cross_entropy'");
  ExpectError(Get("/v2/models/bce_with_logits/versions/3"), 404, "has no version '3'");
  ExpectError(Get("/v2/models/bce_with_logits/trace/setting"), 404, "no route GET");
  ExpectError(Get("/metrics"), 404, "no route GET /metrics");
  const HttpResponse wrong = Get("/v2/models/bce_with_logits/infer");
  ExpectError(wrong, 405, "method GET is not allowed");
  ASSERT_EQ(wrong.headers.size(), 1u);
  EXPECT_EQ(wrong.headers[0].second, "POST");
  Exchange post_live;
  post_live.path = "/v2/health/live";
  ExpectError(Call(core_.get(), post_live), 405, "use GET");
}

TEST_F(OipHttpTest, JsonInferMatchesFloat64Reference) {
  const HttpResponse r = Post(absl::StrCat(
      kInputs, R"(,"id":"q1","parameters":{"reduction":"none"},)",
      R"("outputs":[{"name":"GRAD_LOGITS"},{"name":"LOSS"}]})"));
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(r.content_type, "application/json");
  EXPECT_TRUE(r.binary.empty());
  const Json j = Body(r);
  EXPECT_EQ(j["model_name"], "bce_with_logits");
  EXPECT_EQ(j["model_version"], "1");
  EXPECT_EQ(j["id"], "q1");
  EXPECT_EQ(j["parameters"]["device"], "cpu");
  ASSERT_EQ(j["outputs"].size(), 2u);
  EXPECT_EQ(j["outputs"][0]["name"], "GRAD_LOGITS");
  EXPECT_EQ(j["outputs"][1]["name"], "LOSS");
  EXPECT_EQ(j["outputs"][1]["shape"], Json({2, 2}));
  EXPECT_EQ(j["outputs"][1]["datatype"], "FP32");
  const double x[] = {0.5, -2, 3, 0}, y[] = {1, 0, 0.25, 1};
  for (int i = 0; i < 4; ++i) {
    const double loss = j["outputs"][1]["data"][i].get<double>();
    const double grad = j["outputs"][0]["data"][i].get<double>();
    EXPECT_NEAR(loss, Bce(x[i], y[i]), 1e-6 * std::max(1.0, Bce(x[i], y[i]))) << i;
    EXPECT_NEAR(grad, BceGrad(x[i], y[i]), 1e-6) << i;
    // JSON numbers are exact: the value is a float32.
    EXPECT_EQ(static_cast<double>(static_cast<float>(loss)), loss);
  }
  // Defaults: LOSS only, mean, as JSON.
  const Json mean = Body(Post(absl::StrCat(kInputs, "}")));
  ASSERT_EQ(mean["outputs"].size(), 1u);
  EXPECT_EQ(mean["outputs"][0]["shape"], Json::array());
  double sum = 0;
  for (int i = 0; i < 4; ++i) sum += Bce(x[i], y[i]);
  EXPECT_NEAR(mean["outputs"][0]["data"][0].get<double>(), sum / 4, 1e-6);
}

TEST_F(OipHttpTest, BinaryTensorDataInAndOut) {
  const std::vector<double> x = {0.5, -2, 3, 0, 7, -0.125};
  const std::vector<float> y = {1, 0, 0.25, 1, 0, 1};
  // LOGITS as binary FP64, TARGETS as JSON: both kinds in one request.
  const std::string json = R"({"inputs":[)"
      R"({"name":"LOGITS","datatype":"FP64","shape":[3,2],"parameters":{"binary_data_size":48}},)"
      R"({"name":"TARGETS","datatype":"FP32","shape":[3,2],"data":[1,0,0.25,1,0,1]}],)"
      R"("parameters":{"reduction":"none","binary_data_output":true},)"
      R"("outputs":[{"name":"LOSS"},{"name":"GRAD_LOGITS","parameters":{"binary_data":false}}]})";
  const HttpResponse r =
      Post(json + Bytes(x), {{"inference-header-content-length", absl::StrCat(json.size())}});
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(r.content_type, "application/octet-stream");
  ASSERT_EQ(r.headers.size(), 1u);
  EXPECT_EQ(r.headers[0].first, "Inference-Header-Content-Length");
  EXPECT_EQ(r.headers[0].second, absl::StrCat(r.body.size()));
  const Json j = Body(r);
  EXPECT_EQ(j["outputs"][0]["parameters"]["binary_data_size"], 48);
  EXPECT_FALSE(j["outputs"][0].contains("data"));
  EXPECT_EQ(j["outputs"][1]["datatype"], "FP64");
  const std::string loss = Binary(r);
  ASSERT_EQ(loss.size(), 48u);
  EXPECT_EQ(r.content_length(), static_cast<int64_t>(r.body.size() + 48));
  for (int i = 0; i < 6; ++i) {
    double v;
    std::memcpy(&v, loss.data() + 8 * i, 8);
    EXPECT_NEAR(v, Bce(x[i], y[i]), 1e-12 * std::max(1.0, v)) << i;
    EXPECT_NEAR(j["outputs"][1]["data"][i].get<double>(), BceGrad(x[i], y[i]), 1e-12) << i;
  }
  // FP16 and BF16 go as binary data; JSON outputs of them are exact numbers.
  const std::vector<uint16_t> half = {0x3800, 0xC000};  // 0.5, -2
  const std::string hjson = R"({"inputs":[)"
      R"({"name":"LOGITS","datatype":"FP16","shape":[2],"parameters":{"binary_data_size":4}},)"
      R"({"name":"TARGETS","datatype":"FP16","shape":[2],"parameters":{"binary_data_size":4}}],)"
      R"("parameters":{"reduction":"none"}})";
  const std::vector<uint16_t> ones = {0x3C00, 0x3C00};
  const HttpResponse h = Post(hjson + Bytes(half) + Bytes(ones),
                              {{"inference-header-content-length", absl::StrCat(hjson.size())}});
  ASSERT_EQ(h.status, 200) << h.body;
  const Json hj = Body(h);
  EXPECT_EQ(hj["outputs"][0]["datatype"], "FP16");
  EXPECT_NEAR(hj["outputs"][0]["data"][0].get<double>(), Bce(0.5, 1), 2e-3);
  EXPECT_NEAR(hj["outputs"][0]["data"][1].get<double>(), Bce(-2, 1), 4e-3);
}

TEST_F(OipHttpTest, NanAndInfinityTravelAsStrings) {
  const HttpResponse r = Post(
      R"({"inputs":[{"name":"LOGITS","datatype":"FP32","shape":[3],"data":["NaN","Infinity","-Infinity"]},)"
      R"({"name":"TARGETS","datatype":"FP32","shape":[3],"data":[1,0,1]}],"parameters":{"reduction":"none"}})");
  ASSERT_EQ(r.status, 200) << r.body;
  const Json j = Body(r);
  EXPECT_EQ(j["outputs"][0]["data"][0], "NaN");
  EXPECT_EQ(j["outputs"][0]["data"][1], "Infinity");  // y=0, x=+inf: softplus(inf)
  EXPECT_EQ(j["outputs"][0]["data"][2], "Infinity");  // y=1, x=-inf
  ExpectBadJson(
      R"({"inputs":[{"name":"LOGITS","datatype":"FP32","shape":[1],"data":["nan"]},)"
      R"({"name":"TARGETS","datatype":"FP32","shape":[1],"data":[1]}]})",
      "input 'LOGITS': data element 0 is string \"nan\"; elements are numbers (or \"NaN\"");
}

TEST_F(OipHttpTest, MalformedJsonGetsA400) {
  ExpectBadJson("", "the request's JSON is malformed");
  ExpectBadJson("{", "the request's JSON is malformed: parse error at line 1, column 2");
  ExpectBadJson(R"({"inputs":[]} trailing)", "the request's JSON is malformed");
  ExpectBadJson("{\"id\":\"\xff\"}", "the request's JSON is malformed");
  ExpectBadJson("[1,2]", "the request's JSON must be an object; got array [1,2]");
  ExpectBadJson(std::string(100000, '['), "nests arrays and objects deeper than 64 levels");
  ExpectBadJson(R"({"inputs":[{"name":"LOGITS","datatype":"FP32","shape":[1],"data":)" +
                    std::string(70, '[') + "1" + std::string(70, ']') + "}]}",
                "deeper than 64 levels");
  ExpectBadJson("{}", "the inference request has no \"inputs\"");
  ExpectBadJson(R"({"inputs":{}})", "\"inputs\" must be an array; got object");
  ExpectBadJson(R"({"inputs":[],"model":"x"})",
                "unknown field \"model\" in the inference request; its fields are id, "
                "parameters, inputs, outputs");
  ExpectBadJson(R"({"inputs":[],"id":7})", "\"id\" must be a string; got integer 7");
}

TEST_F(OipHttpTest, WrongTensorsNameTheFieldAndValues) {
  const std::string targets = R"({"name":"TARGETS","datatype":"FP32","shape":[2],"data":[1,0]})";
  auto with_logits = [&](const std::string& logits, const std::string& rest = "") {
    return absl::StrCat(R"({"inputs":[)", logits, ",", targets, "]", rest, "}");
  };
  ExpectBadJson(with_logits("3"), "inputs[0] must be an object; got integer 3");
  ExpectBadJson(with_logits(R"({"datatype":"FP32","shape":[2],"data":[1,2]})"),
                "inputs[0] needs a string \"name\"");
  ExpectBadJson(with_logits(R"({"name":"LOGITS","shape":[2],"data":[1,2]})"),
                "input 'LOGITS' needs \"datatype\"");
  ExpectBadJson(with_logits(R"({"name":"LOGITS","datatype":"FP32","data":[1,2]})"),
                "input 'LOGITS' needs \"shape\"");
  ExpectBadJson(with_logits(R"({"name":"LOGITS","datatype":"FP32","shape":2,"data":[1,2]})"),
                "input 'LOGITS': shape must be an array; got integer 2");
  ExpectBadJson(with_logits(R"({"name":"LOGITS","datatype":"FP32","shape":[2.5],"data":[1,2]})"),
                "input 'LOGITS': shape[0] must be an integer; got number 2.5");
  ExpectBadJson(
      with_logits(R"({"name":"LOGITS","datatype":"FP32","shape":[18446744073709551615]})"),
      "input 'LOGITS': shape[0] 18446744073709551615 is above 9223372036854775807");
  ExpectBadJson(with_logits(R"({"name":"LOGITS","datatype":"FP32","shape":[-2],"data":[1,2]})"),
                "input 'LOGITS': shape [-2] has negative dimension 0 (-2)");
  ExpectBadJson(with_logits(R"({"name":"LOGITS","datatype":"INT32","shape":[2],"data":[1,2]})"),
                "input 'LOGITS': datatype 'INT32' of model 'bce_with_logits' is not supported; "
                "expected one of FP32, FP64, FP16, BF16");
  ExpectBadJson(with_logits(R"({"name":"LOGITS","datatype":"FP16","shape":[2],"data":[1,2]})"),
                "input 'LOGITS': datatype FP16 has no JSON data in the protocol; send its bytes "
                "as binary data (parameter binary_data_size)");
  // An FP32 LOGITS of shape [2] with these fields after its shape.
  const std::pair<const char*, const char*> fp32_logits_fields[] = {
      {R"(,"data":[1,2,3])", "input 'LOGITS': data has 3 elements, expected 2 for shape [2]"},
      {"", "input 'LOGITS': data has 0 elements, expected 2 for shape [2]"},
      {R"(,"data":[1,"x"])", "input 'LOGITS': data element 1 is string \"x\""},
      {R"(,"data":[1,null])", "input 'LOGITS': data element 1 is null null"},
      {R"(,"data":{"a":1})", "input 'LOGITS': data must be an array; got object"},
      {R"(,"data":[1,1e39])",
       "input 'LOGITS': data element 1 (1e+39) is outside the range of FP32"},
      {R"(,"data":[1,2],"dims":[2])",
       "unknown field \"dims\" in input 'LOGITS'; its fields are name, shape, datatype, "
       "parameters, data"},
      {R"(,"data":[1,2],"parameters":{"shared_memory_region":"r"})",
       "input 'LOGITS' has parameter 'shared_memory_region' but no 'shared_memory_byte_size'"},
  };
  for (const auto& [fields, error] : fp32_logits_fields) {
    ExpectBadJson(
        with_logits(absl::StrCat(R"({"name":"LOGITS","datatype":"FP32","shape":[2])", fields, "}")),
        error);
  }
  ExpectBadJson(with_logits(R"({"name":"LABELS","datatype":"FP32","shape":[2],"data":[1,2]})"),
                "unknown input 'LABELS' for model 'bce_with_logits'; its inputs are LOGITS, "
                "TARGETS, WEIGHT, POS_WEIGHT");
  ExpectBadJson(absl::StrCat(R"({"inputs":[)", targets, "]}"),
                "missing input 'LOGITS'; model 'bce_with_logits' needs LOGITS and TARGETS");
  ExpectBadJson(with_logits(R"({"name":"LOGITS","datatype":"FP32","shape":[3],"data":[1,2,3]})"),
                "targets shape [2] != logits shape [3]");
  const std::string logits = R"({"name":"LOGITS","datatype":"FP32","shape":[2],"data":[1,2]})";
  ExpectBadJson(with_logits(logits, R"(,"parameters":{"reduction":"avg"})"),
                "parameter 'reduction' 'avg' is not one of none, mean, sum, per_sample_mean");
  ExpectBadJson(with_logits(logits, R"(,"parameters":{"reduction":["none"]})"),
                "parameter 'reduction' must be a bool, number or string; got array");
  ExpectBadJson(with_logits(logits, R"(,"parameters":{"ignore_index":2.5})"),
                "parameter 'ignore_index' must be an integer (int64); got double 2.5");
  ExpectBadJson(with_logits(logits, R"(,"parameters":{"binary_data_output":"yes"})"),
                "parameter 'binary_data_output' must be a bool; got string \"yes\"");
  ExpectBadJson(with_logits(logits, R"(,"outputs":[{"name":"LOSS","parameters":{"binary_data":1}}])"),
                "output 'LOSS': parameter 'binary_data' must be a bool; got integer 1");
  ExpectBadJson(with_logits(logits, R"(,"outputs":[{"name":"LOSS","parameters":{"classification":2}}])"),
                "output 'LOSS': parameter 'classification' is not supported");
  ExpectBadJson(with_logits(logits, R"(,"outputs":[{"name":"GRAD_X"}])"),
                "unknown output 'GRAD_X' for model 'bce_with_logits'");
  ExpectBadJson(with_logits(logits, R"(,"outputs":[{"name":"LOSS","shape":[1]}])"),
                "unknown field \"shape\" in output 'LOSS'; its fields are name, parameters");
  Exchange e;
  e.path = "/v2/models/cross_entropy/infer";
  e.body = with_logits(logits);
  ExpectError(Call(core_.get(), e), 404, "unknown model 'cross_entropy'");
}

TEST_F(OipHttpTest, BinarySizesAndHeaderLengthsAreChecked) {
  const std::string json = R"({"inputs":[)"
      R"({"name":"LOGITS","datatype":"FP32","shape":[2],"parameters":{"binary_data_size":8}},)"
      R"({"name":"TARGETS","datatype":"FP32","shape":[2],"parameters":{"binary_data_size":8}}]})";
  const std::string data = Bytes(std::vector<float>{0.5f, 1.0f, 1.0f, 0.0f});
  const std::string length = absl::StrCat(json.size());
  ASSERT_EQ(Post(json + data, {{"inference-header-content-length", length}}).status, 200);
  // The header length larger than the body, negative, or not a number.
  for (const std::string bad : {absl::StrCat(json.size() + data.size() + 1), std::string("-1"),
                                std::string("12abc"), std::string(""),
                                std::string("99999999999999999999999")}) {
    SCOPED_TRACE(bad);
    ExpectError(Post(json + data, {{"inference-header-content-length", bad}}), 400,
                "header Inference-Header-Content-Length");
  }
  // Binary data missing (the header covers the whole body): the sizes do not add up.
  ExpectError(Post(json, {{"inference-header-content-length", length}}), 400,
              "input 'LOGITS': binary_data_size 8 is more than the 0 bytes of binary data left");
  ExpectError(Post(json + data + "xx", {{"inference-header-content-length", length}}), 400,
              "the request has 18 bytes of binary data after its JSON but its inputs' "
              "binary_data_size add up to 16");
  // Negative, oversized and non-integer binary_data_size.
  auto sized = [](const std::string& size) {
    return absl::StrCat(
        R"({"inputs":[{"name":"LOGITS","datatype":"FP32","shape":[2],"parameters":{"binary_data_size":)",
        size,
        R"(}},{"name":"TARGETS","datatype":"FP32","shape":[2],"data":[1,0]}]})");
  };
  for (const std::string size : {"-8", "8.0", "\"8\"", "18446744073709551615", "1e300"}) {
    SCOPED_TRACE(size);
    const std::string j = sized(size);
    ExpectError(Post(j + data.substr(0, 8), {{"inference-header-content-length",
                                              absl::StrCat(j.size())}}),
                400, "input 'LOGITS': parameter 'binary_data_size' must be a non-negative integer");
  }
  const std::string huge = sized("9223372036854775807");
  ExpectError(Post(huge + data, {{"inference-header-content-length", absl::StrCat(huge.size())}}),
              400, "binary_data_size 9223372036854775807 is more than the 16 bytes");
  // The right total, the wrong split: the input's bytes do not match its shape.
  const std::string split = absl::StrCat(
      R"({"inputs":[)"
      R"({"name":"LOGITS","datatype":"FP32","shape":[2],"parameters":{"binary_data_size":12}},)"
      R"({"name":"TARGETS","datatype":"FP32","shape":[2],"parameters":{"binary_data_size":4}}]})");
  ExpectError(Post(split + data, {{"inference-header-content-length", absl::StrCat(split.size())}}),
              400, "input 'LOGITS': binary data has 12 bytes, expected 8 for shape [2] of FP32");
  // Both data and binary data for one input.
  const std::string both = absl::StrCat(
      R"({"inputs":[)"
      R"({"name":"LOGITS","datatype":"FP32","shape":[2],"data":[1,2],"parameters":{"binary_data_size":8}},)"
      R"({"name":"TARGETS","datatype":"FP32","shape":[2],"data":[1,0]}]})");
  ExpectError(
      Post(both + data.substr(0, 8), {{"inference-header-content-length", absl::StrCat(both.size())}}),
      400, "input 'LOGITS' has both data and binary data; send its elements in one of them");
}

TEST_F(OipHttpTest, BodyLengthEncodingAndLimits) {
  Exchange e;
  e.body = absl::StrCat(kInputs, "}");
  // A body shorter than its Content-Length (the client went away).
  e.content_length = static_cast<int64_t>(e.body.size()) + 10;
  ExpectError(Call(core_.get(), e), 400, "the request body ended after");
  e.content_length = -1;
  ExpectError(Call(core_.get(), e), 411, "no Content-Length");
  e.content_length = (int64_t{1} << 20) + 1;
  ExpectError(Call(core_.get(), e), 413,
              "the request body of 1048577 bytes is over the server's limit of 1048576 bytes");
  e.content_length = -2;
  e.headers["content-encoding"] = "gzip";
  ExpectError(Call(core_.get(), e), 415, "Content-Encoding \"gzip\" is not supported");
  // A memory budget too small for the parsed JSON: RESOURCE_EXHAUSTED, 429.
  CoreConfig small;
  small.max_inflight_bytes = 1024;
  Make(small);
  ExpectError(Post(absl::StrCat(kInputs, "}")), 429, "the parsed JSON of the request");
  EXPECT_EQ(core_->executor().memory().held(), 0);
}

TEST_F(OipHttpTest, TokenAndDrain) {
  CoreConfig config;
  config.auth_token = "s3cret";
  Make(config);
  const std::string body = absl::StrCat(kInputs, "}");
  EXPECT_EQ(Get("/v2/health/ready").status, 200);  // probes need no token
  EXPECT_EQ(Get("/v2/models/bce_with_logits/ready").status, 200);
  const HttpResponse missing = Post(body);
  ExpectError(missing, 401, "missing \"Authorization: Bearer <token>\" header");
  ASSERT_EQ(missing.headers.size(), 1u);
  EXPECT_EQ(missing.headers[0].first, "WWW-Authenticate");
  ExpectError(Post(body, {{"authorization", "Bearer wrong"}}), 401, "invalid bearer token");
  ExpectError(Get("/v2"), 401, "missing");
  ExpectError(Get("/v2/models/bce_with_logits", {{"authorization", "Bearer s3cre"}}), 401,
              "invalid bearer token");
  EXPECT_EQ(Post(body, {{"authorization", "Bearer s3cret"}}).status, 200);
  EXPECT_EQ(Get("/v2", {{"authorization", "Bearer s3cret"}}).status, 200);
  core_->admission().set_draining(true);
  EXPECT_EQ(Get("/v2/health/live").status, 200);
  EXPECT_EQ(Get("/v2/health/ready").status, 400);
  EXPECT_EQ(Get("/v2/models/bce_with_logits/ready").status, 400);
  ExpectError(Post(body, {{"authorization", "Bearer s3cret"}}), 503, "draining");
  EXPECT_EQ(core_->admission().in_flight(), 0);
}

TEST_F(OipHttpTest, StatisticsAndConfigAsTritonsJson) {
  const std::string body = absl::StrCat(kInputs, "}");
  const int64_t before_ms = absl::GetCurrentTimeNanos() / 1000000;
  for (int i = 0; i < 2; ++i) ASSERT_EQ(Post(body).status, 200);
  // Failures of a known model (a bad parameter, bad JSON) and of an unknown one (not counted).
  EXPECT_EQ(Post(absl::StrCat(kInputs, R"(,"parameters":{"reduction":"avg"}})")).status, 400);
  EXPECT_EQ(Post("{").status, 400);
  Exchange unknown;
  unknown.path = "/v2/models/cross_entropy/infer";
  unknown.body = body;
  EXPECT_EQ(Call(core_.get(), unknown).status, 404);
  const int64_t after_ms = absl::GetCurrentTimeNanos() / 1000000;

  const Json all = Body(Get("/v2/models/stats"));
  ASSERT_EQ(all["model_stats"].size(), 2u) << all;
  const Json& bce = all["model_stats"][0];
  EXPECT_EQ(bce["name"], "bce_with_logits");
  EXPECT_EQ(bce["version"], "1");
  EXPECT_EQ(bce["inference_count"], 2);
  EXPECT_EQ(bce["execution_count"], 2);
  EXPECT_GE(bce["last_inference"].get<int64_t>(), before_ms);
  EXPECT_LE(bce["last_inference"].get<int64_t>(), after_ms);
  const Json& s = bce["inference_stats"];
  EXPECT_EQ(s["success"]["count"], 2);
  EXPECT_GT(s["success"]["ns"].get<int64_t>(), 0);
  EXPECT_EQ(s["fail"]["count"], 2);
  EXPECT_EQ(s["queue"]["count"], 2);
  EXPECT_EQ(s["compute_infer"]["count"], 2);
  EXPECT_EQ(s["compute_input"], Json({{"count", 0}, {"ns", 0}}));
  EXPECT_EQ(s["compute_output"], Json({{"count", 0}, {"ns", 0}}));
  ASSERT_EQ(bce["batch_stats"].size(), 1u);
  EXPECT_EQ(bce["batch_stats"][0]["batch_size"], 1);
  EXPECT_EQ(all["model_stats"][1]["name"], "sigmoid_focal_loss");
  EXPECT_EQ(all["model_stats"][1]["inference_count"], 0);
  EXPECT_EQ(all["model_stats"][1]["inference_stats"]["fail"]["count"], 0);
  const Json one = Body(Get("/v2/models/bce_with_logits/versions/1/stats"));
  ASSERT_EQ(one["model_stats"].size(), 1u);
  EXPECT_EQ(one["model_stats"][0], bce);
  ExpectError(Get("/v2/models/cross_entropy/stats"), 404, "unknown model 'cross_entropy'");
  ExpectError(Get("/v2/models/bce_with_logits/versions/2/stats"), 404, "has no version '2'");
  Exchange post_stats;
  post_stats.path = "/v2/models/stats";
  ExpectError(Call(core_.get(), post_stats), 405, "use GET");

  const Json config = Body(Get("/v2/models/bce_with_logits/config"));
  EXPECT_EQ(config["name"], "bce_with_logits");
  EXPECT_EQ(config["platform"], "lossd");
  EXPECT_EQ(config["backend"], "lossd");
  EXPECT_EQ(config["max_batch_size"], 0);
  ASSERT_EQ(config["input"].size(), 4u);
  EXPECT_EQ(config["input"][0],
            Json({{"name", "LOGITS"}, {"data_type", "TYPE_FP32"}, {"dims", {-1}},
                  {"optional", false}}));
  EXPECT_EQ(config["input"][3]["name"], "POS_WEIGHT");
  EXPECT_EQ(config["input"][3]["optional"], true);
  ASSERT_EQ(config["output"].size(), 3u);
  EXPECT_EQ(config["output"][1],
            Json({{"name", "GRAD_LOGITS"}, {"data_type", "TYPE_FP32"}, {"dims", {-1}}}));
  EXPECT_EQ(config["parameters"]["datatypes"]["string_value"], "FP32,FP64,FP16,BF16");
  EXPECT_EQ(Body(Get("/v2/models/sigmoid_focal_loss/versions/1/config"))["input"].size(), 3u);
  ExpectError(Get("/v2/models/cross_entropy/config"), 404, "unknown model 'cross_entropy'");
  ExpectError(Get("/v2/models/config"), 404, "unknown model 'config'");
}

TEST_F(OipHttpTest, StatisticsAndConfigNeedTheToken) {
  CoreConfig config;
  config.auth_token = "s3cret";
  Make(config);
  ExpectError(Get("/v2/models/stats"), 401, "missing");
  ExpectError(Get("/v2/models/bce_with_logits/config"), 401, "missing");
  // A refused infer counts for no model.
  ExpectError(Post(absl::StrCat(kInputs, "}")), 401, "missing");
  const HttpResponse r = Get("/v2/models/bce_with_logits/stats", {{"authorization", "Bearer s3cret"}});
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(Body(r)["model_stats"][0]["inference_stats"]["fail"]["count"], 0);
  EXPECT_EQ(Get("/v2/models/bce_with_logits/config", {{"authorization", "Bearer s3cret"}}).status,
            200);
}

// Random damage to valid requests (bytes replaced, cut, headers changed): always a reply with a
// JSON body, 200 or a 4xx, and nothing held afterwards.
TEST_F(OipHttpTest, DamagedRequestsNeverCrash) {
  const std::string json = R"({"id":"z","inputs":[)"
      R"({"name":"LOGITS","datatype":"FP32","shape":[2,2],"parameters":{"binary_data_size":16}},)"
      R"({"name":"TARGETS","datatype":"FP64","shape":[2,2],"data":[[1,0],[0.5,1]]},)"
      R"({"name":"WEIGHT","datatype":"FP32","shape":[2],"data":[1,2]}],)"
      R"("parameters":{"reduction":"per_sample_mean","label_smoothing":0.1},)"
      R"("outputs":[{"name":"LOSS","parameters":{"binary_data":true}},{"name":"GRAD_TARGETS"}]})";
  const std::string data = Bytes(std::vector<float>{0.5f, -1.0f, 2.0f, 0.0f});
  std::mt19937_64 rng(17);
  const std::string alphabet = "{}[]\",:0123456789-+.eE \\u\xff\x00tfn";
  int ok = 0;
  for (int iter = 0; iter < 3000; ++iter) {
    std::string body = json + data;
    int64_t header = static_cast<int64_t>(json.size());
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int k = 0; k < edits; ++k) {
      switch (rng() % 5) {
        case 0:
          body[rng() % body.size()] = alphabet[rng() % alphabet.size()];
          break;
        case 1:
          body.resize(rng() % body.size());
          break;
        case 2:
          body.insert(rng() % body.size(), 1, alphabet[rng() % alphabet.size()]);
          break;
        case 3:
          header += static_cast<int64_t>(rng() % 41) - 20;
          break;
        default:
          body.erase(rng() % body.size(), 1 + rng() % 8);
          break;
      }
      if (body.empty()) body = "{";
    }
    Exchange e;
    e.body = body;
    e.headers["inference-header-content-length"] = absl::StrCat(header);
    e.chunk = 1 + rng() % 64;
    const HttpResponse r = Call(core_.get(), e);
    ASSERT_TRUE(r.status == 200 || (r.status >= 400 && r.status < 500)) << r.status << r.body;
    const Json j = Body(r);
    if (r.status == 200) {
      ++ok;
    } else {
      ASSERT_TRUE(j.contains("error")) << r.body;
    }
  }
  EXPECT_GT(ok, 0);  // some edits keep the request valid (digits of the data, ...)
  EXPECT_EQ(core_->executor().memory().held(), 0);
  EXPECT_EQ(core_->admission().in_flight(), 0);
}

TEST(OipHttpStatus, FollowsTheStatusCodeMapping) {
  EXPECT_EQ(HttpStatus(absl::StatusCode::kOk), 200);
  EXPECT_EQ(HttpStatus(absl::StatusCode::kInvalidArgument), 400);
  EXPECT_EQ(HttpStatus(absl::StatusCode::kFailedPrecondition), 400);
  EXPECT_EQ(HttpStatus(absl::StatusCode::kUnauthenticated), 401);
  EXPECT_EQ(HttpStatus(absl::StatusCode::kNotFound), 404);
  EXPECT_EQ(HttpStatus(absl::StatusCode::kResourceExhausted), 429);
  EXPECT_EQ(HttpStatus(absl::StatusCode::kUnavailable), 503);
  EXPECT_EQ(HttpStatus(absl::StatusCode::kDeadlineExceeded), 504);
  EXPECT_EQ(HttpStatus(absl::StatusCode::kInternal), 500);
}

}  // namespace
}  // namespace lossd::server
