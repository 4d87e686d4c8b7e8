// Triton's system shared memory extension (server/oip_shm.h): the translation of tensors that
// name a region into lossd.v1 references and placements (server/oip_models.h), the regions
// without a lease in the registry (server/shm_registry.h), the REST routes (server/oip_http.h)
// and the gRPC calls of a real server.
#include <fcntl.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "inference/grpc_predict_v2.grpc.pb.h"
#include "lossd/kernels/backend.h"
#include "server/core.h"
#include "server/metrics.h"
#include "server/oip_http.h"
#include "server/oip_models.h"
#include "server/oip_shm.h"
#include "server/server.h"
#include "server/shm_registry.h"
#include "tests/server/test_server_util.h"

namespace lossd::server {
namespace {

using inference::ModelInferRequest;
using inference::ModelInferResponse;
using Json = nlohmann::json;

// A POSIX shared-memory object of this process, unlinked at the end of the test.
class ShmObject {
 public:
  explicit ShmObject(size_t bytes)
      : name_(absl::StrCat("/lossd-oiptest-", getpid(), "-", counter_++)), bytes_(bytes) {
    fd_ = shm_open(name_.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    EXPECT_GE(fd_, 0) << name_ << ": " << std::strerror(errno);
    EXPECT_EQ(ftruncate(fd_, static_cast<off_t>(bytes)), 0);
    data_ = static_cast<char*>(mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd_, 0));
    EXPECT_NE(data_, MAP_FAILED);
  }
  ~ShmObject() {
    munmap(data_, bytes_);
    close(fd_);
    shm_unlink(name_.c_str());
  }
  const std::string& name() const { return name_; }
  char* data() { return data_; }

 private:
  static inline std::atomic<int> counter_{0};
  std::string name_;
  size_t bytes_;
  int fd_ = -1;
  char* data_ = nullptr;
};

template <typename T>
std::string Bytes(const std::vector<T>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

const std::vector<float> kX = {0.5f, -2.0f, 3.0f, 0.0f, 1.5f, -0.25f};
const std::vector<float> kY = {1.0f, 0.0f, 0.25f, 1.0f, 0.0f, 1.0f};

ModelInferRequest::InferInputTensor* AddInput(ModelInferRequest* r, const std::string& name) {
  auto* in = r->add_inputs();
  in->set_name(name);
  in->set_datatype("FP32");
  in->add_shape(2);
  in->add_shape(3);
  return in;
}

void SetShm(google::protobuf::Map<std::string, inference::InferParameter>* p,
            const std::string& region, int64_t byte_size, int64_t offset = 0) {
  (*p)["shared_memory_region"].set_string_param(region);
  (*p)["shared_memory_byte_size"].set_int64_param(byte_size);
  if (offset != 0) (*p)["shared_memory_offset"].set_int64_param(offset);
}

// A lookup that knows one region "r" of 64 bytes, handle "H".
class FakeLookup final : public OipShmLookup {
 public:
  absl::StatusOr<v1::TensorReference> Reference(std::string_view what, std::string_view name,
                                                uint64_t offset,
                                                uint64_t byte_size) const override {
    if (name != "r") return absl::NotFoundError(absl::StrCat(std::string(what), " unknown"));
    if (offset + byte_size > 64) return absl::InvalidArgumentError("outside");
    v1::TensorReference ref;
    ref.set_region("H");
    ref.set_offset(offset);
    ref.set_byte_size(byte_size);
    return ref;
  }
};

TEST(OipShmTranslate, RegionsBecomeReferencesAndPlacements) {
  ModelInferRequest r;
  r.set_model_name("bce_with_logits");
  SetShm(AddInput(&r, "LOGITS")->mutable_parameters(), "r", 24, 8);
  AddInput(&r, "TARGETS");
  r.add_raw_input_contents(Bytes(kY));  // the only raw entry: TARGETS's
  (*r.mutable_parameters())["reduction"].set_string_param("none");
  auto* loss = r.add_outputs();
  loss->set_name("LOSS");
  SetShm(loss->mutable_parameters(), "r", 32, 32);  // larger than the 24 bytes needed
  r.add_outputs()->set_name("GRAD_LOGITS");
  FakeLookup lookup;
  v1::EvaluateRequest out;
  OipTranslation t;
  ASSERT_TRUE(TranslateInferRequest(&r, nullptr, &out, &t, &lookup).ok());
  EXPECT_TRUE(out.logits().data().empty());
  EXPECT_EQ(out.logits().ref().region(), "H");
  EXPECT_EQ(out.logits().ref().offset(), 8u);
  EXPECT_EQ(out.logits().ref().byte_size(), 24u);
  EXPECT_EQ(out.targets().data(), Bytes(kY));
  ASSERT_TRUE(out.outputs().has_loss());
  EXPECT_EQ(out.outputs().loss().offset(), 32u);
  EXPECT_EQ(out.outputs().loss().byte_size(), 24u);  // the output's size
  EXPECT_FALSE(out.outputs().has_grad_logits());
  EXPECT_TRUE(out.gradients().logits());
}

TEST(OipShmTranslate, ErrorsNameTheTensorAndTheNumbers) {
  ModelInferRequest base;
  base.set_model_name("bce_with_logits");
  AddInput(&base, "LOGITS");
  AddInput(&base, "TARGETS");
  base.add_raw_input_contents(Bytes(kY));
  FakeLookup lookup;
  auto expect = [&](ModelInferRequest r, const OipShmLookup* shm, absl::StatusCode code,
                    const std::string& part) {
    v1::EvaluateRequest out;
    OipTranslation t;
    const absl::Status s = TranslateInferRequest(&r, nullptr, &out, &t, shm);
    EXPECT_EQ(s.code(), code) << s;
    EXPECT_NE(s.message().find(part), std::string::npos) << s.message() << "\nwanted: " << part;
  };
  ModelInferRequest r = base;
  SetShm(r.mutable_inputs(0)->mutable_parameters(), "r", 20);
  expect(r, &lookup, absl::StatusCode::kInvalidArgument,
         "input 'LOGITS': shared_memory_byte_size 20 is not the tensor's 24 bytes (shape [2,3] "
         "of FP32)");
  r = base;
  SetShm(r.mutable_inputs(0)->mutable_parameters(), "r", 24);
  expect(r, nullptr, absl::StatusCode::kFailedPrecondition,
         "input 'LOGITS' names shared_memory_region 'r' but system shared memory is disabled");
  expect(r, &lookup, absl::StatusCode::kOk, "");
  r.add_raw_input_contents(Bytes(kX));
  expect(r, &lookup, absl::StatusCode::kInvalidArgument,
         "raw_input_contents has 2 entries for 1 inputs not in shared memory");
  r = base;
  SetShm(r.mutable_inputs(0)->mutable_parameters(), "r", 24);
  (*r.mutable_inputs(0)->mutable_parameters())["shared_memory_offset"].set_int64_param(-8);
  expect(r, &lookup, absl::StatusCode::kInvalidArgument,
         "input 'LOGITS': parameter 'shared_memory_offset' -8 is negative");
  r = base;
  r.add_raw_input_contents(Bytes(kX));
  r.mutable_raw_input_contents()->SwapElements(0, 1);
  (*r.mutable_inputs(0)->mutable_parameters())["shared_memory_byte_size"].set_int64_param(24);
  expect(r, &lookup, absl::StatusCode::kInvalidArgument,
         "input 'LOGITS' has parameter 'shared_memory_byte_size' but no 'shared_memory_region'");
  r = base;
  r.add_raw_input_contents(Bytes(kX));
  r.mutable_raw_input_contents()->SwapElements(0, 1);
  auto* grad = r.add_outputs();
  grad->set_name("GRAD_LOGITS");
  SetShm(grad->mutable_parameters(), "r", 20);
  expect(r, &lookup, absl::StatusCode::kInvalidArgument,
         "output 'GRAD_LOGITS': shared_memory_byte_size 20 is less than the output's 24 bytes");
  SetShm(grad->mutable_parameters(), "r", 24);
  (*grad->mutable_parameters())["classification"].set_int64_param(2);
  expect(r, &lookup, absl::StatusCode::kInvalidArgument,
         "output 'GRAD_LOGITS': parameter 'classification' is not supported");
}

// ---- the registry of the protocol's regions ----

TEST(OipShmRegions, RegisterStatusUnregisterWithoutLease) {
  ShmRegistryOptions options;
  absl::Time now = absl::Now();
  options.now = [&now] { return now; };
  auto registry = ShmRegistry::Create(options);
  ASSERT_TRUE(registry.ok()) << registry.status();
  PeerTable peers;
  OipSharedMemory shm(registry->get(), &peers, "/");
  ShmObject object(4096);
  const uid_t uid = geteuid();
  inference::SystemSharedMemoryRegisterRequest request;
  request.set_name("in");
  request.set_key(object.name());
  request.set_offset(64);
  request.set_byte_size(1024);
  ASSERT_TRUE(shm.Register(uid, request).ok());
  EXPECT_EQ(shm.Register(uid, request).code(), absl::StatusCode::kAlreadyExists);
  // Another uid has names of its own (it may not register this object, which it does not own).
  EXPECT_EQ(shm.Register(uid + 1, request).code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ((*registry)->registered_bytes(uid), 1024);
  // No lease: an hour later the region is still there; lossd.v1's List does not show it.
  now += absl::Hours(1);
  EXPECT_EQ((*registry)->Sweep(), 0);
  EXPECT_EQ((*registry)->List(uid)->regions_size(), 0);
  auto status = shm.Status(uid, "");
  ASSERT_TRUE(status.ok());
  ASSERT_EQ(status->regions().size(), 1u);
  const auto& region = status->regions().at("in");
  EXPECT_EQ(region.key(), object.name());
  EXPECT_EQ(region.offset(), 64u);
  EXPECT_EQ(region.byte_size(), 1024u);
  EXPECT_EQ(shm.Status(uid + 1, "").value().regions().size(), 0u);
  EXPECT_EQ(shm.Status(uid, "out").status().code(), absl::StatusCode::kNotFound);
  // References resolve through the registry like lossd.v1's.
  auto ref = shm.Reference(uid, "input 'LOGITS'", "in", 16, 8);
  ASSERT_TRUE(ref.ok()) << ref.status();
  std::memcpy(object.data() + 64 + 16, "abcdefgh", 8);
  auto span = (*registry)->Resolve("logits.ref", *ref, 8, false);
  ASSERT_TRUE(span.ok()) << span.status();
  EXPECT_EQ(std::string(static_cast<const char*>(span->data), 8), "abcdefgh");
  const absl::Status outside = shm.Reference(uid, "input 'LOGITS'", "in", 1020, 8).status();
  EXPECT_EQ(outside.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(outside.message().find("shared_memory_offset 1020 + shared_memory_byte_size 8 lies "
                                   "outside region 'in' of 1024 bytes"),
            std::string::npos)
      << outside;
  EXPECT_EQ(shm.Reference(uid + 1, "input 'LOGITS'", "in", 0, 8).status().code(),
            absl::StatusCode::kNotFound);
  // The registry's limits apply.
  request.set_name("too-big");
  request.set_offset(0);
  request.set_byte_size(8192);
  EXPECT_EQ(shm.Register(uid, request).code(), absl::StatusCode::kInvalidArgument);
  request.set_key("/elsewhere");
  request.set_byte_size(8);
  EXPECT_EQ(shm.Register(uid, request).code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(shm.Unregister(uid, "never").ok());
  ASSERT_TRUE(shm.Unregister(uid, "in").ok());
  EXPECT_EQ((*registry)->regions(), 0);
  EXPECT_EQ((*registry)->registered_bytes(uid), 0);
  EXPECT_EQ(shm.Reference(uid, "input 'LOGITS'", "in", 0, 8).status().code(),
            absl::StatusCode::kNotFound);

  OipSharedMemory off(nullptr, &peers, "/");
  EXPECT_EQ(off.Register(uid, request).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(off.Status(uid, "").status().code(), absl::StatusCode::kFailedPrecondition);
}

// ---- REST, without a socket: the caller is a Unix-socket peer of this uid ----

class OipShmHttpTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto registry = ShmRegistry::Create(ShmRegistryOptions());
    ASSERT_TRUE(registry.ok());
    registry_ = *std::move(registry);
    peers_.Set(7, PeerCredentials{geteuid(), getpid()});
    shm_ = std::make_unique<OipSharedMemory>(registry_.get(), &peers_, "/");
    CoreConfig config;
    config.max_message_bytes = int64_t{1} << 20;
    core_ = std::make_unique<Core>(config, kernels::MakeCpuBackend({1}), nullptr, "", &metrics_);
    core_->planner().set_region_resolver(registry_.get());
  }

  HttpResponse Call(const std::string& method, const std::string& path,
                    const std::string& body = "") {
    HttpRequest r;
    r.method = method;
    r.path = path;
    r.content_length = static_cast<int64_t>(body.size());
    r.header = [](const char*) -> const char* { return nullptr; };
    auto data = std::make_shared<std::string>(body);
    auto pos = std::make_shared<size_t>(0);
    r.read = [data, pos](char* buf, size_t n) -> int64_t {
      const size_t k = std::min(n, data->size() - *pos);
      std::memcpy(buf, data->data() + *pos, k);
      *pos += k;
      return static_cast<int64_t>(k);
    };
    r.peer = "fd:7";
    return HandleOipHttp(core_.get(), r, shm_.get());
  }

  Metrics metrics_;
  std::unique_ptr<ShmRegistry> registry_;
  PeerTable peers_;
  std::unique_ptr<OipSharedMemory> shm_;
  std::unique_ptr<Core> core_;
};

TEST_F(OipShmHttpTest, RoutesAndInferThroughRegions) {
  ShmObject object(4096);
  std::memcpy(object.data(), kX.data(), 24);
  std::memcpy(object.data() + 24, kY.data(), 24);
  HttpResponse r = Call("POST", "/v2/systemsharedmemory/region/buf/register",
                        absl::StrCat(R"({"key":")", object.name(),
                                     R"(","offset":0,"byte_size":4096})"));
  ASSERT_EQ(r.status, 200) << r.body;
  r = Call("GET", "/v2/systemsharedmemory/status");
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(Json::parse(r.body),
            Json::parse(absl::StrCat(R"([{"name":"buf","key":")", object.name(),
                                     R"(","offset":0,"byte_size":4096}])")));
  EXPECT_EQ(Call("GET", "/v2/systemsharedmemory/region/nope/status").status, 404);
  EXPECT_EQ(Call("GET", "/v2/systemsharedmemory/region/buf/register").status, 405);
  r = Call("POST", "/v2/systemsharedmemory/region/x/register", R"({"key":"/lossd-a","size":1})");
  EXPECT_EQ(r.status, 400);
  EXPECT_NE(r.body.find("unknown field"), std::string::npos) << r.body;

  // Inputs from the region, GRAD_LOGITS into it, LOSS as JSON: the same values as JSON inputs.
  const std::string tensors =
      R"({"name":"LOGITS","datatype":"FP32","shape":[2,3],"parameters":)"
      R"({"shared_memory_region":"buf","shared_memory_byte_size":24}},)"
      R"({"name":"TARGETS","datatype":"FP32","shape":[2,3],"parameters":)"
      R"({"shared_memory_region":"buf","shared_memory_byte_size":24,"shared_memory_offset":24}})";
  r = Call("POST", "/v2/models/bce_with_logits/infer",
           absl::StrCat(R"({"parameters":{"reduction":"none"},"inputs":[)", tensors,
                        R"(],"outputs":[{"name":"LOSS"},{"name":"GRAD_LOGITS","parameters":)",
                        R"({"shared_memory_region":"buf","shared_memory_byte_size":24,)",
                        R"("shared_memory_offset":1024}}]})"));
  ASSERT_EQ(r.status, 200) << r.body;
  const Json j = Json::parse(r.body);
  ASSERT_EQ(j["outputs"].size(), 2u);
  EXPECT_FALSE(j["outputs"][1].contains("data"));
  EXPECT_EQ(j["outputs"][1]["shape"], Json::parse("[2,3]"));
  const HttpResponse want = Call(
      "POST", "/v2/models/bce_with_logits/infer",
      R"({"parameters":{"reduction":"none"},"inputs":[)"
      R"({"name":"LOGITS","datatype":"FP32","shape":[2,3],"data":[0.5,-2,3,0,1.5,-0.25]},)"
      R"({"name":"TARGETS","datatype":"FP32","shape":[2,3],"data":[1,0,0.25,1,0,1]}],)"
      R"("outputs":[{"name":"LOSS"},{"name":"GRAD_LOGITS","parameters":{"binary_data":true}}]})");
  ASSERT_EQ(want.status, 200) << want.body;
  EXPECT_EQ(j["outputs"][0]["data"], Json::parse(want.body)["outputs"][0]["data"]);
  ASSERT_EQ(want.binary.size(), 1u);
  EXPECT_EQ(std::string(object.data() + 1024, 24), std::string(want.binary[0]));

  r = Call("POST", "/v2/systemsharedmemory/region/buf/unregister");
  EXPECT_EQ(r.status, 200) << r.body;
  r = Call("POST", "/v2/models/bce_with_logits/infer",
           absl::StrCat(R"({"inputs":[)", tensors, "]}"));
  EXPECT_EQ(r.status, 404) << r.body;
  EXPECT_NE(r.body.find("input 'LOGITS': shared_memory_region 'buf' is not registered"),
            std::string::npos)
      << r.body;
  EXPECT_EQ(Call("POST", "/v2/systemsharedmemory/unregister").status, 200);
  EXPECT_EQ(registry_->regions(), 0);
}

// ---- gRPC: a real server on loopback TCP ----

TEST(OipShmServer, RegisterInferStatusUnregister) {
  auto server = testing::StartServer();
  auto stub = inference::GRPCInferenceService::NewStub(grpc::CreateChannel(
      absl::StrCat("127.0.0.1:", server->port()), grpc::InsecureChannelCredentials()));
  ShmObject object(256);
  std::memcpy(object.data(), kX.data(), 24);
  {
    grpc::ClientContext ctx;
    inference::SystemSharedMemoryRegisterRequest request;
    request.set_name("io");
    request.set_key(object.name());
    request.set_byte_size(256);
    inference::SystemSharedMemoryRegisterResponse response;
    const grpc::Status s = stub->SystemSharedMemoryRegister(&ctx, request, &response);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }
  auto infer = [&](bool shm, ModelInferResponse* out) {
    ModelInferRequest r;
    r.set_model_name("bce_with_logits");
    auto* logits = AddInput(&r, "LOGITS");
    if (shm) {
      SetShm(logits->mutable_parameters(), "io", 24);
    } else {
      r.add_raw_input_contents(Bytes(kX));
    }
    AddInput(&r, "TARGETS");
    r.add_raw_input_contents(Bytes(kY));
    (*r.mutable_parameters())["reduction"].set_string_param("none");
    auto* loss = r.add_outputs();
    loss->set_name("LOSS");
    if (shm) SetShm(loss->mutable_parameters(), "io", 24, 128);
    grpc::ClientContext ctx;
    return stub->ModelInfer(&ctx, r, out);
  };
  ModelInferResponse raw;
  ASSERT_TRUE(infer(false, &raw).ok());
  ModelInferResponse placed;
  const grpc::Status s = infer(true, &placed);
  ASSERT_TRUE(s.ok()) << s.error_message();
  ASSERT_EQ(placed.outputs_size(), 1);
  EXPECT_EQ(placed.outputs(0).datatype(), "FP32");
  EXPECT_EQ(placed.outputs(0).shape_size(), 2);
  ASSERT_EQ(placed.raw_output_contents_size(), 1);
  EXPECT_TRUE(placed.raw_output_contents(0).empty());
  EXPECT_EQ(std::string(object.data() + 128, 24), raw.raw_output_contents(0));
  {
    grpc::ClientContext ctx;
    inference::SystemSharedMemoryStatusRequest request;
    inference::SystemSharedMemoryStatusResponse response;
    ASSERT_TRUE(stub->SystemSharedMemoryStatus(&ctx, request, &response).ok());
    ASSERT_EQ(response.regions().size(), 1u);
    EXPECT_EQ(response.regions().at("io").byte_size(), 256u);
  }
  {
    grpc::ClientContext ctx;
    inference::SystemSharedMemoryUnregisterRequest request;
    request.set_name("io");
    inference::SystemSharedMemoryUnregisterResponse response;
    ASSERT_TRUE(stub->SystemSharedMemoryUnregister(&ctx, request, &response).ok());
  }
  EXPECT_EQ(server->shared_memory_regions(), 0);
  ModelInferResponse gone;
  const grpc::Status after = infer(true, &gone);
  EXPECT_EQ(after.error_code(), grpc::StatusCode::NOT_FOUND) << after.error_message();
  server->Shutdown(absl::Seconds(5));
}

TEST(OipShmServer, DisabledSharedMemoryIsAFailedPrecondition) {
  ServerOptions options = testing::LoopbackOptions();
  options.shared_memory_prefix = "";
  auto server = testing::StartServer(options);
  auto stub = inference::GRPCInferenceService::NewStub(grpc::CreateChannel(
      absl::StrCat("127.0.0.1:", server->port()), grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  inference::SystemSharedMemoryRegisterRequest request;
  request.set_name("io");
  request.set_key("/lossd-x");
  request.set_byte_size(8);
  inference::SystemSharedMemoryRegisterResponse response;
  const grpc::Status s = stub->SystemSharedMemoryRegister(&ctx, request, &response);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_NE(s.error_message().find("system shared memory is disabled on this server "
                                   "(--shared_memory_prefix is empty)"),
            std::string::npos)
      << s.error_message();
  server->Shutdown(absl::Seconds(5));
}

}  // namespace
}  // namespace lossd::server
