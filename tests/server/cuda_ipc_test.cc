// CUDA IPC regions (docs/shared-memory.md, "CUDA IPC regions") on a host without a GPU.
//
// A fake device stands for the GPU: an exported "allocation" is a host buffer (the client's
// memory) named by a 64-byte handle, and opening a handle maps PROT_NONE pages, so that any
// read or write of a device pointer by server code crashes the test. A side table maps each
// opened range to its place in the allocation. A fake CUDA backend, injected through
// ServerOptions::cuda_seams, translates the pointers whose on_device bit is set through that
// table and computes with the real CPU backend (bits cleared), writing outputs into the
// allocation; it fails a call whose bits do not match its pointers. Covered: registration
// rules and errors (handle size, GPU UUID, key, sizes, the opener's errors, limits, leases,
// listing, servers without CUDA), resolution of device spans, results bitwise equal to the
// same request with bytes on the CPU backend (reductions, gradients, broadcast weights, outputs
// placed in device memory or returned, host bytes mixed with device references, Accumulate,
// EvaluateStream), the refused combinations, and that device requests are never batched.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "lossd/kernels/backend.h"
#include "lossd/kernels/bce.h"
#include "lossd/v1/lossd.grpc.pb.h"
#include "server/server.h"
#include "server/shm_registry.h"
#include "tests/server/test_server_util.h"

namespace lossd::server {
namespace {

// `text` contains `part` (the test links GoogleTest without its matchers).
#define EXPECT_HAS(text, part)                               \
  EXPECT_NE(std::string(text).find(part), std::string::npos) \
      << "\"" << std::string(text) << "\" does not contain \"" << (part) << "\" "

constexpr char kUuid[] = "GPU-12345678-9abc-def0-1234-56789abcdef0";

// The fake GPU: exported allocations and the ranges this process opened. Thread-safe.
class FakeDevice {
 public:
  // A new allocation of `bytes` zero bytes (the client's cudaMalloc) and its handle.
  std::string Export(size_t bytes) {
    absl::MutexLock lock(&mu_);
    std::string handle = absl::StrCat("fake-cuda-ipc-handle-", ++exported_);
    handle.resize(64, '#');
    allocations_[handle] = std::make_shared<std::vector<char>>(bytes, 0);
    return handle;
  }
  // The client's view of an allocation (the test reads and writes it as the client would).
  char* memory(const std::string& handle) {
    absl::MutexLock lock(&mu_);
    return allocations_.at(handle)->data();
  }

  // kernels::OpenCudaIpcMemory's contract: errors name the values; the keepalive unmaps.
  absl::StatusOr<kernels::DeviceMemory> Open(std::string_view handle, uint64_t offset,
                                             uint64_t bytes) {
    absl::MutexLock lock(&mu_);
    auto it = allocations_.find(std::string(handle));
    if (it == allocations_.end()) {
      return absl::InvalidArgumentError("cudaIpcOpenMemHandle: invalid argument (fake)");
    }
    const uint64_t size = it->second->size();
    if (bytes == 0 || offset > size || bytes > size - offset) {
      return absl::InvalidArgumentError(absl::StrCat(
          "offset ", offset, " + bytes ", bytes, " lies past the end of the exported "
          "allocation (", size, " bytes)"));
    }
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t length = (bytes + page - 1) / page * page;
    void* base = mmap(nullptr, length, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) return absl::ResourceExhaustedError("mmap PROT_NONE failed");
    ranges_[reinterpret_cast<uintptr_t>(base)] =
        Range{bytes, it->second, static_cast<size_t>(offset)};
    ++opened_;
    kernels::DeviceMemory memory;
    memory.data = base;
    memory.bytes = static_cast<int64_t>(bytes);
    memory.keepalive = std::shared_ptr<void>(base, [this, length](void* p) {
      absl::MutexLock lock(&mu_);
      ranges_.erase(reinterpret_cast<uintptr_t>(p));
      munmap(p, length);
      ++closed_;
    });
    return memory;
  }

  // The host place of the device bytes [p, p + bytes), null unless they lie in one open range.
  void* Translate(const void* p, size_t bytes) const {
    absl::MutexLock lock(&mu_);
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    auto it = ranges_.upper_bound(a);
    if (it == ranges_.begin()) return nullptr;
    --it;
    const Range& r = it->second;
    if (a - it->first > r.bytes || bytes > r.bytes - (a - it->first)) return nullptr;
    return r.allocation->data() + r.offset + (a - it->first);
  }
  bool IsDevice(const void* p) const {
    absl::MutexLock lock(&mu_);
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    auto it = ranges_.upper_bound(a);
    if (it == ranges_.begin()) return false;
    --it;
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    return a - it->first < (it->second.bytes + page - 1) / page * page;
  }

  int opened() const {
    absl::MutexLock lock(&mu_);
    return opened_;
  }
  int closed() const {
    absl::MutexLock lock(&mu_);
    return closed_;
  }

 private:
  struct Range {
    uint64_t bytes;
    std::shared_ptr<std::vector<char>> allocation;  // the client's memory outlives the mapping
    size_t offset;
  };
  mutable absl::Mutex mu_;
  std::map<std::string, std::shared_ptr<std::vector<char>>> allocations_ ABSL_GUARDED_BY(mu_);
  std::map<uintptr_t, Range> ranges_ ABSL_GUARDED_BY(mu_);
  int exported_ ABSL_GUARDED_BY(mu_) = 0;
  int opened_ ABSL_GUARDED_BY(mu_) = 0;
  int closed_ ABSL_GUARDED_BY(mu_) = 0;
};

// Stands for the CUDA backend: translates device pointers (on_device bits) to their host
// places and computes with the CPU backend. A device pointer without its bit, or a bit on a
// pointer that is not fake device memory, fails the call with INTERNAL.
class FakeCudaBackend final : public kernels::Backend {
 public:
  explicit FakeCudaBackend(FakeDevice* device)
      : device_(device), cpu_(kernels::MakeCpuBackend({1})) {}
  std::string Name() const override { return "cuda"; }

  absl::Status Bce(const kernels::BceArgs& args, const kernels::BceOutputs& out) override {
    kernels::BceArgs a = args;
    kernels::BceOutputs o = out;
    absl::Status status;
    auto translate = [&](const void* p, int64_t count, kernels::DType dtype, bool on_device,
                         const char* what) -> void* {
      if (p == nullptr) return nullptr;
      const size_t bytes = static_cast<size_t>(count) * kernels::ItemSize(dtype);
      if (!on_device) {
        if (device_->IsDevice(p) && status.ok()) {
          status = absl::InternalError(absl::StrCat(what, " is device memory without its bit"));
        }
        return const_cast<void*>(p);
      }
      void* host = device_->Translate(p, bytes);
      if (host == nullptr && status.ok()) {
        status = absl::InternalError(absl::StrCat(what, " has its bit but is not device memory"));
      }
      return host;
    };
    namespace od = kernels::on_device;
    const int64_t n = args.numel;
    a.logits = translate(args.logits, n, args.dtype, args.on_device & od::kLogits, "logits");
    a.targets = translate(args.targets, n, args.targets_dtype, args.on_device & od::kTargets,
                          "targets");
    a.weight.data = translate(args.weight.data, args.weight.period, args.weight.dtype,
                              args.on_device & od::kWeight, "weight");
    a.pos_weight.data = translate(args.pos_weight.data, args.pos_weight.period,
                                  args.pos_weight.dtype, args.on_device & od::kPosWeight,
                                  "pos_weight");
    o.loss = translate(out.loss, kernels::LossCount(args), args.dtype,
                       out.on_device & od::kLoss, "loss");
    o.grad_logits = translate(out.grad_logits, n, args.dtype, out.on_device & od::kGradLogits,
                              "grad_logits");
    o.grad_targets = translate(out.grad_targets, n, args.dtype,
                               out.on_device & od::kGradTargets, "grad_targets");
    {
      absl::MutexLock lock(&mu_);
      ++calls_;
      if (args.on_device != 0 || out.on_device != 0) ++device_calls_;
      last_in_ = args.on_device;
      last_out_ = out.on_device;
    }
    if (!status.ok()) return status;
    a.on_device = 0;
    o.on_device = 0;
    return cpu_->Bce(a, o);
  }

  std::vector<absl::Status> BceBatch(const std::vector<kernels::BceItem>& items) override {
    {
      absl::MutexLock lock(&mu_);
      ++batches_;
      for (const kernels::BceItem& item : items) {
        if (item.args->on_device != 0 || item.out->on_device != 0) ++batched_device_items_;
      }
    }
    return Backend::BceBatch(items);
  }

  int calls() const {
    absl::MutexLock lock(&mu_);
    return calls_;
  }
  int device_calls() const {
    absl::MutexLock lock(&mu_);
    return device_calls_;
  }
  int batches() const {
    absl::MutexLock lock(&mu_);
    return batches_;
  }
  int batched_device_items() const {
    absl::MutexLock lock(&mu_);
    return batched_device_items_;
  }
  uint32_t last_in() const {
    absl::MutexLock lock(&mu_);
    return last_in_;
  }
  uint32_t last_out() const {
    absl::MutexLock lock(&mu_);
    return last_out_;
  }

 private:
  FakeDevice* const device_;
  std::unique_ptr<kernels::Backend> cpu_;
  mutable absl::Mutex mu_;
  int calls_ ABSL_GUARDED_BY(mu_) = 0;
  int device_calls_ ABSL_GUARDED_BY(mu_) = 0;
  int batches_ ABSL_GUARDED_BY(mu_) = 0;
  int batched_device_items_ ABSL_GUARDED_BY(mu_) = 0;
  uint32_t last_in_ ABSL_GUARDED_BY(mu_) = 0;
  uint32_t last_out_ ABSL_GUARDED_BY(mu_) = 0;
};

v1::RegisterRegionRequest IpcRequest(const std::string& handle, uint64_t offset, uint64_t bytes,
                                     const std::string& uuid = kUuid) {
  v1::RegisterRegionRequest r;
  r.set_name("ipc");
  r.set_kind(v1::REGION_KIND_CUDA_IPC);
  r.set_cuda_ipc_handle(handle);
  r.set_cuda_device_uuid(uuid);
  r.set_offset(offset);
  r.set_byte_size(bytes);
  return r;
}

v1::TensorReference Ref(const std::string& region, uint64_t offset, uint64_t bytes) {
  v1::TensorReference ref;
  ref.set_region(region);
  ref.set_offset(offset);
  ref.set_byte_size(bytes);
  return ref;
}

// ---- the registry ---------------------------------------------------------------------------

class CudaIpcRegistryTest : public ::testing::Test {
 protected:
  std::unique_ptr<ShmRegistry> Make(bool enabled = true) {
    ShmRegistryOptions o;
    o.cuda_ipc_enabled = enabled;
    if (!enabled) o.cuda_ipc_unavailable = "this server was built without CUDA";
    o.cuda_device_uuid = kUuid;
    o.open_cuda_ipc = [this](std::string_view h, uint64_t off, uint64_t n) {
      return device_.Open(h, off, n);
    };
    o.max_regions_per_uid = 3;
    o.max_bytes_per_uid = 1 << 20;
    o.now = [this] { return now_; };
    auto r = ShmRegistry::Create(std::move(o));
    EXPECT_TRUE(r.ok()) << r.status();
    return *std::move(r);
  }
  FakeDevice device_;
  absl::Time now_ = absl::FromUnixSeconds(1000000);
  const uid_t uid_ = geteuid();
};

TEST_F(CudaIpcRegistryTest, RegistersResolvesListsAndCloses) {
  auto registry = Make();
  ASSERT_TRUE(registry->cuda_ipc_enabled());
  const std::string handle = device_.Export(4096);
  auto registered = registry->Register(uid_, IpcRequest(handle, 1024, 2048));
  ASSERT_TRUE(registered.ok()) << registered.status();
  EXPECT_EQ(registered->lease_ms(), 30000u);
  EXPECT_EQ(device_.opened(), 1);
  EXPECT_EQ(registry->registered_bytes(uid_), 2048);

  auto listed = registry->List(uid_);
  ASSERT_TRUE(listed.ok());
  ASSERT_EQ(listed->regions_size(), 1);
  EXPECT_EQ(listed->regions(0).kind(), v1::REGION_KIND_CUDA_IPC);
  EXPECT_EQ(listed->regions(0).key(), "");
  EXPECT_EQ(listed->regions(0).offset(), 1024u);
  EXPECT_EQ(listed->regions(0).byte_size(), 2048u);

  // A device span: the opened range, offset by the reference; never dereferenced here.
  auto span = registry->Resolve("logits.ref", Ref(registered->region(), 100, 400), 400, false);
  ASSERT_TRUE(span.ok()) << span.status();
  EXPECT_TRUE(span->device);
  EXPECT_EQ(span->bytes, 400);
  EXPECT_EQ(span->damaged, nullptr);
  EXPECT_EQ(device_.Translate(span->data, 400), device_.memory(handle) + 1024 + 100);
  // The last byte of the range is reachable, one past it is not.
  auto last = registry->Resolve("outputs.loss", Ref(registered->region(), 2044, 4), 4, true);
  ASSERT_TRUE(last.ok()) << last.status();
  auto past = registry->Resolve("outputs.loss", Ref(registered->region(), 2045, 4), 4, true);
  EXPECT_EQ(past.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_HAS(std::string(past.status().message()), "outputs.loss");
  EXPECT_HAS(std::string(past.status().message()), "2048 bytes, CUDA IPC");
  auto huge = registry->Resolve("logits.ref", Ref(registered->region(), ~uint64_t{0}, 8), 8,
                                false);
  EXPECT_EQ(huge.status().code(), absl::StatusCode::kInvalidArgument);

  // Unregistered: references fail; the handle closes once the spans let go.
  v1::UnregisterRegionRequest un;
  un.set_region(registered->region());
  ASSERT_TRUE(registry->Unregister(uid_, un).ok());
  EXPECT_EQ(registry->registered_bytes(uid_), 0);
  auto gone = registry->Resolve("logits.ref", Ref(registered->region(), 0, 4), 4, false);
  EXPECT_EQ(gone.status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(device_.closed(), 0) << "spans still hold the opened handle";
  span = absl::UnknownError("dropped");
  last = absl::UnknownError("dropped");
  EXPECT_EQ(device_.closed(), 1);
}

TEST_F(CudaIpcRegistryTest, LeaseEndsAndSweepCloses) {
  auto registry = Make();
  const std::string handle = device_.Export(256);
  v1::RegisterRegionRequest request = IpcRequest(handle, 0, 256);
  request.set_lease_ms(2000);
  auto registered = registry->Register(uid_, request);
  ASSERT_TRUE(registered.ok()) << registered.status();
  now_ += absl::Seconds(3);
  auto expired = registry->Resolve("targets.ref", Ref(registered->region(), 0, 4), 4, false);
  EXPECT_EQ(expired.status().code(), absl::StatusCode::kNotFound);
  EXPECT_HAS(std::string(expired.status().message()), "targets.ref");
  EXPECT_EQ(registry->Sweep(), 1);
  EXPECT_EQ(device_.closed(), 1);
  EXPECT_EQ(registry->registered_bytes(uid_), 0);
}

TEST_F(CudaIpcRegistryTest, RefusesBadRegistrations) {
  auto registry = Make();
  const std::string handle = device_.Export(1024);
  struct Case {
    const char* what;
    v1::RegisterRegionRequest request;
    absl::StatusCode code;
    std::vector<std::string> parts;
  };
  std::vector<Case> cases;
  {
    v1::RegisterRegionRequest r = IpcRequest(handle.substr(0, 63), 0, 16);
    cases.push_back({"short handle", r, absl::StatusCode::kInvalidArgument,
                     {"cuda_ipc_handle is 63 bytes", "64 bytes"}});
    r.set_cuda_ipc_handle(handle + "x");
    cases.push_back({"long handle", r, absl::StatusCode::kInvalidArgument,
                     {"cuda_ipc_handle is 65 bytes"}});
    r.clear_cuda_ipc_handle();
    cases.push_back({"no handle", r, absl::StatusCode::kInvalidArgument,
                     {"cuda_ipc_handle is 0 bytes"}});
  }
  cases.push_back({"other GPU", IpcRequest(handle, 0, 16, "GPU-other"),
                   absl::StatusCode::kFailedPrecondition,
                   {"cuda_device_uuid \"GPU-other\"", kUuid}});
  cases.push_back({"no GPU named", IpcRequest(handle, 0, 16, ""),
                   absl::StatusCode::kFailedPrecondition, {"cuda_device_uuid \"\"", kUuid}});
  {
    v1::RegisterRegionRequest r = IpcRequest(handle, 0, 16);
    r.set_key("/lossd-x");
    cases.push_back({"key", r, absl::StatusCode::kInvalidArgument,
                     {"key must be empty for REGION_KIND_CUDA_IPC", "/lossd-x"}});
  }
  cases.push_back({"empty", IpcRequest(handle, 0, 0), absl::StatusCode::kInvalidArgument,
                   {"byte_size must be positive"}});
  cases.push_back({"overflow", IpcRequest(handle, ~uint64_t{0} - 4, 16),
                   absl::StatusCode::kInvalidArgument, {"overflows"}});
  cases.push_back({"past the allocation", IpcRequest(handle, 1000, 100),
                   absl::StatusCode::kInvalidArgument,
                   {"cuda_ipc_handle (offset 1000, byte_size 100)", "past the end",
                    "(1024 bytes)"}});
  {
    std::string unknown(64, 'u');
    cases.push_back({"unknown handle", IpcRequest(unknown, 0, 16),
                     absl::StatusCode::kInvalidArgument, {"cudaIpcOpenMemHandle"}});
  }
  cases.push_back({"over the byte limit", IpcRequest(handle, 0, (1 << 20) + 1),
                   absl::StatusCode::kResourceExhausted, {"--shared_memory_max_bytes"}});
  for (const Case& c : cases) {
    auto r = registry->Register(uid_, c.request);
    ASSERT_FALSE(r.ok()) << c.what;
    EXPECT_EQ(r.status().code(), c.code) << c.what << ": " << r.status();
    for (const std::string& part : c.parts) {
      EXPECT_HAS(std::string(r.status().message()), part) << c.what;
    }
  }
  EXPECT_EQ(registry->regions(), 0);
  EXPECT_EQ(device_.opened(), device_.closed()) << "no failed registration keeps a handle";

  // The inference protocol's registration is system shared memory only.
  auto oip = registry->RegisterWithoutLease(uid_, IpcRequest(handle, 0, 16));
  EXPECT_EQ(oip.status().code(), absl::StatusCode::kInvalidArgument);
  // A SYSTEM registration still refuses a handle.
  v1::RegisterRegionRequest system = IpcRequest(handle, 0, 16);
  system.set_kind(v1::REGION_KIND_SYSTEM);
  system.set_key("/lossd-none");
  EXPECT_EQ(registry->Register(uid_, system).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(CudaIpcRegistryTest, CountsAgainstTheUidsLimits) {
  auto registry = Make();
  const std::string handle = device_.Export(1 << 20);
  std::vector<std::string> regions;
  for (int i = 0; i < 3; ++i) {
    auto r = registry->Register(uid_, IpcRequest(handle, 0, 1024));
    ASSERT_TRUE(r.ok()) << r.status();
    regions.push_back(r->region());
  }
  auto fourth = registry->Register(uid_, IpcRequest(handle, 0, 1024));
  EXPECT_EQ(fourth.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_HAS(std::string(fourth.status().message()), "regions registered");
  // Another uid neither sees nor unregisters them.
  auto other = registry->List(uid_ + 1);
  ASSERT_TRUE(other.ok());
  EXPECT_EQ(other->regions_size(), 0);
  v1::UnregisterRegionRequest un;
  un.set_region(regions[0]);
  EXPECT_EQ(registry->Unregister(uid_ + 1, un).code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(registry->Unregister(uid_, un).ok());
  auto bytes = registry->Register(uid_, IpcRequest(handle, 0, (1 << 20) - 2047));
  EXPECT_EQ(bytes.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_HAS(std::string(bytes.status().message()), "2048 bytes registered");
  registry.reset();
  EXPECT_EQ(device_.opened(), device_.closed());
}

TEST_F(CudaIpcRegistryTest, DisabledSaysWhy) {
  auto registry = Make(/*enabled=*/false);
  EXPECT_FALSE(registry->cuda_ipc_enabled());
  auto r = registry->Register(uid_, IpcRequest(device_.Export(64), 0, 64));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_HAS(std::string(r.status().message()),
             "REGION_KIND_CUDA_IPC is not available: this server was built without CUDA");
  EXPECT_EQ(device_.opened(), 0);
}

// ---- a real server with the fake GPU ----------------------------------------------------------

class CudaIpcServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           absl::StrCat("lossd-ipc-test-", getpid(), "-", ++counter_);
    std::filesystem::create_directories(dir_);
    socket_ = (dir_ / "lossd.sock").string();
  }
  void TearDown() override {
    server_.reset();
    std::filesystem::remove_all(dir_);
  }

  ServerOptions Options() {
    ServerOptions o;
    o.host = "127.0.0.1";
    o.port = 0;
    o.device = DevicePolicy::kAuto;
    o.workers = 2;
    o.cpu_threads = 1;
    o.unix_socket = socket_;
    o.cuda_seams.make_backend = [this]() -> absl::StatusOr<std::unique_ptr<kernels::Backend>> {
      auto backend = std::make_unique<FakeCudaBackend>(&device_);
      cuda_ = backend.get();
      return backend;
    };
    o.cuda_seams.device_uuid = [] { return std::string(kUuid); };
    o.cuda_seams.open_ipc = [this](std::string_view h, uint64_t off, uint64_t n) {
      return device_.Open(h, off, n);
    };
    return o;
  }
  void Start(const ServerOptions& o) {
    server_ = testing::StartServer(o);
    auto channel = grpc::CreateChannel("unix:" + socket_, grpc::InsecureChannelCredentials());
    stub_ = v1::LossService::NewStub(channel);
    shm_ = v1::SharedMemory::NewStub(channel);
  }
  void Start() { Start(Options()); }

  // Exports an allocation of `bytes` and registers [kRegionOffset, bytes) of it.
  static constexpr uint64_t kRegionOffset = 256;
  void Allocate(size_t bytes) {
    handle_ = device_.Export(bytes);
    grpc::ClientContext ctx;
    v1::RegisterRegionResponse registered;
    grpc::Status s =
        shm_->RegisterRegion(&ctx, IpcRequest(handle_, kRegionOffset, bytes - kRegionOffset),
                             &registered);
    ASSERT_TRUE(s.ok()) << s.error_message();
    region_ = registered.region();
    used_ = 0;
  }
  // Reserves `bytes` of the region (64-byte aligned) and returns their reference.
  v1::TensorReference Reserve(size_t bytes) {
    v1::TensorReference ref = Ref(region_, used_, bytes);
    used_ += (bytes + 63) / 64 * 64;
    return ref;
  }
  char* At(const v1::TensorReference& ref) {
    return device_.memory(handle_) + kRegionOffset + ref.offset();
  }
  // Moves a tensor's bytes into device memory: the client's copy to its GPU.
  void ToDevice(v1::Tensor* t) {
    v1::TensorReference ref = Reserve(t->data().size());
    std::memcpy(At(ref), t->data().data(), t->data().size());
    t->clear_data();
    *t->mutable_ref() = ref;
  }
  std::string Read(const v1::TensorReference& ref) {
    return std::string(At(ref), ref.byte_size());
  }

  grpc::Status Evaluate(const v1::EvaluateRequest& req, v1::EvaluateResponse* resp) {
    return testing::Evaluate(stub_.get(), req, resp);
  }
  // The reference: `req` with bytes, on the CPU backend.
  v1::EvaluateResponse OnCpu(v1::EvaluateRequest req) {
    req.set_device(v1::DEVICE_CPU);
    v1::EvaluateResponse resp;
    grpc::Status s = Evaluate(req, &resp);
    EXPECT_TRUE(s.ok()) << s.error_message();
    EXPECT_EQ(resp.device(), v1::DEVICE_CPU);
    return resp;
  }
  // Evaluate must fail with `code` and a message containing each of `parts`.
  void ExpectError(const v1::EvaluateRequest& req, grpc::StatusCode code,
                   const std::vector<std::string>& parts) {
    v1::EvaluateResponse resp;
    grpc::Status s = Evaluate(req, &resp);
    EXPECT_EQ(s.error_code(), code) << s.error_message();
    for (const std::string& part : parts) {
      EXPECT_HAS(s.error_message(), part);
    }
  }

  static inline int counter_ = 0;
  std::filesystem::path dir_;
  std::string socket_;
  FakeDevice device_;  // outlives the server: its spans close through it
  FakeCudaBackend* cuda_ = nullptr;
  std::unique_ptr<LossdServer> server_;
  std::unique_ptr<v1::LossService::Stub> stub_;
  std::unique_ptr<v1::SharedMemory::Stub> shm_;
  std::string handle_;
  std::string region_;
  uint64_t used_ = 0;
};

TEST_F(CudaIpcServerTest, CapabilitiesReportCudaIpc) {
  Start();
  EXPECT_TRUE(server_->cuda_ipc_enabled());
  grpc::ClientContext ctx;
  v1::Capabilities caps;
  ASSERT_TRUE(stub_->GetCapabilities(&ctx, v1::GetCapabilitiesRequest(), &caps).ok());
  EXPECT_TRUE(caps.cuda_ipc());
  EXPECT_EQ(caps.cuda_device_uuid(), kUuid);
  EXPECT_TRUE(caps.shared_memory());
}

// Every input in device memory, outputs returned as bytes and placed in device memory: the
// bits of the same request computed from bytes on the CPU backend.
TEST_F(CudaIpcServerTest, DeviceTensorsMatchTheCpuBitForBit) {
  Start();
  Allocate(1 << 20);
  for (v1::Reduction reduction : {v1::REDUCTION_NONE, v1::REDUCTION_SUM, v1::REDUCTION_MEAN}) {
    for (bool placed : {false, true}) {
      SCOPED_TRACE(absl::StrCat(v1::Reduction_Name(reduction), placed ? " placed" : " returned"));
      used_ = 0;
      v1::EvaluateRequest req = testing::RandomRequest<float>(16, 24, 5, reduction);
      req.mutable_gradients()->set_logits(true);
      req.mutable_gradients()->set_targets(true);
      const v1::EvaluateResponse want = OnCpu(req);
      ToDevice(req.mutable_logits());
      ToDevice(req.mutable_targets());
      ToDevice(req.mutable_weight());  // [24], broadcast over rows
      ToDevice(req.mutable_bce_with_logits()->mutable_pos_weight());
      v1::TensorReference loss, gl, gt;
      if (placed) {
        loss = Reserve(want.loss().data().size());
        gl = Reserve(want.grad_logits().data().size());
        gt = Reserve(want.grad_targets().data().size());
        *req.mutable_outputs()->mutable_loss() = loss;
        *req.mutable_outputs()->mutable_grad_logits() = gl;
        *req.mutable_outputs()->mutable_grad_targets() = gt;
      }
      const int device_calls = cuda_->device_calls();
      v1::EvaluateResponse got;
      grpc::Status s = Evaluate(req, &got);
      ASSERT_TRUE(s.ok()) << s.error_message();
      EXPECT_EQ(got.device(), v1::DEVICE_CUDA);
      EXPECT_EQ(cuda_->device_calls(), device_calls + 1);
      namespace od = kernels::on_device;
      EXPECT_EQ(cuda_->last_in(), od::kLogits | od::kTargets | od::kWeight | od::kPosWeight);
      EXPECT_EQ(cuda_->last_out(),
                placed ? od::kLoss | od::kGradLogits | od::kGradTargets : 0u);
      if (placed) {
        // The reply names where the outputs were written, with their dtype and shape.
        ASSERT_TRUE(got.loss().has_ref());
        EXPECT_EQ(got.loss().ref().region(), region_);
        EXPECT_EQ(got.loss().ref().offset(), loss.offset());
        EXPECT_EQ(got.loss().data(), "");
        EXPECT_EQ(got.loss().dtype(), v1::DTYPE_FLOAT32);
        EXPECT_EQ(std::vector<int64_t>(got.loss().shape().begin(), got.loss().shape().end()),
                  std::vector<int64_t>(want.loss().shape().begin(), want.loss().shape().end()));
        ASSERT_TRUE(got.grad_logits().has_ref());
        EXPECT_EQ(got.grad_logits().shape_size(), 2);
        ASSERT_TRUE(got.grad_targets().has_ref());
        EXPECT_EQ(Read(loss), want.loss().data());
        EXPECT_EQ(Read(gl), want.grad_logits().data());
        EXPECT_EQ(Read(gt), want.grad_targets().data());
      } else {
        EXPECT_EQ(got.loss().data(), want.loss().data());
        EXPECT_EQ(got.grad_logits().data(), want.grad_logits().data());
        EXPECT_EQ(got.grad_targets().data(), want.grad_targets().data());
      }
    }
  }
}

// Host bytes and device references in one request, float64, a scalar pos_weight and a
// per-row weight [R, 1]; some outputs placed, others returned.
TEST_F(CudaIpcServerTest, MixedHostAndDeviceTensors) {
  Start();
  Allocate(1 << 20);
  v1::EvaluateRequest req = testing::RandomRequest<double>(12, 10, 8, v1::REDUCTION_MEAN);
  std::vector<double> w(12);
  for (size_t i = 0; i < w.size(); ++i) w[i] = 0.25 + 0.125 * static_cast<double>(i);
  *req.mutable_weight() = testing::MakeTensor(w, {12, 1});
  *req.mutable_bce_with_logits()->mutable_pos_weight() =
      testing::MakeTensor(std::vector<double>{1.5}, {});
  req.mutable_bce_with_logits()->set_label_smoothing(0.1);
  req.mutable_gradients()->set_logits(true);
  req.mutable_gradients()->set_targets(true);
  const v1::EvaluateResponse want = OnCpu(req);
  ToDevice(req.mutable_logits());  // targets stay bytes
  ToDevice(req.mutable_weight());
  ToDevice(req.mutable_bce_with_logits()->mutable_pos_weight());
  const v1::TensorReference gl = Reserve(want.grad_logits().data().size());
  *req.mutable_outputs()->mutable_grad_logits() = gl;
  v1::EvaluateResponse got;
  grpc::Status s = Evaluate(req, &got);
  ASSERT_TRUE(s.ok()) << s.error_message();
  namespace od = kernels::on_device;
  EXPECT_EQ(cuda_->last_in(), od::kLogits | od::kWeight | od::kPosWeight);
  EXPECT_EQ(cuda_->last_out(), od::kGradLogits);
  EXPECT_EQ(got.loss().data(), want.loss().data());
  EXPECT_EQ(got.grad_targets().data(), want.grad_targets().data());
  EXPECT_EQ(Read(gl), want.grad_logits().data());
  EXPECT_TRUE(got.grad_logits().has_ref());

  // Host inputs with an output placed in device memory.
  v1::EvaluateRequest host = testing::RandomRequest<float>(4, 8, 2, v1::REDUCTION_NONE);
  const v1::EvaluateResponse host_want = OnCpu(host);
  const v1::TensorReference loss = Reserve(host_want.loss().data().size());
  *host.mutable_outputs()->mutable_loss() = loss;
  ASSERT_TRUE(Evaluate(host, &got).ok());
  EXPECT_EQ(cuda_->last_in(), 0u);
  EXPECT_EQ(cuda_->last_out(), od::kLoss);
  EXPECT_EQ(Read(loss), host_want.loss().data());
}

TEST_F(CudaIpcServerTest, AccumulateAndEvaluateStreamUseDeviceTensors) {
  Start();
  Allocate(1 << 20);
  v1::EvaluateRequest full = testing::RandomRequest<float>(40, 16, 4, v1::REDUCTION_MEAN);
  full.clear_weight();
  full.mutable_bce_with_logits()->clear_pos_weight();
  full.mutable_bce_with_logits()->set_ignore_index(1.0f);
  full.mutable_bce_with_logits()->set_normalize(true);
  std::vector<v1::EvaluateRequest> host, device;
  for (int b = 0; b < 4; ++b) {
    v1::EvaluateRequest part = testing::SliceRows(full, b * 10, b * 10 + 10);
    v1::EvaluateRequest cpu = part;
    cpu.set_device(v1::DEVICE_CPU);
    host.push_back(cpu);
    ToDevice(part.mutable_logits());
    ToDevice(part.mutable_targets());
    device.push_back(part);
  }
  v1::AccumulateResponse want, got;
  ASSERT_TRUE(testing::Accumulate(stub_.get(), host, &want).ok());
  const int device_calls = cuda_->device_calls();
  grpc::Status s = testing::Accumulate(stub_.get(), device, &got);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(got.device(), v1::DEVICE_CUDA);
  EXPECT_EQ(cuda_->device_calls(), device_calls + 4);
  EXPECT_EQ(got.loss(), want.loss());  // the same bits: both are exact sums rounded once
  EXPECT_EQ(got.num_elements(), want.num_elements());
  EXPECT_EQ(want.device(), v1::DEVICE_CPU);

  // EvaluateStream: each batch as its own Evaluate on the CPU.
  grpc::ClientContext ctx;
  auto stream = stub_->EvaluateStream(&ctx);
  for (const v1::EvaluateRequest& part : device) ASSERT_TRUE(stream->Write(part));
  stream->WritesDone();
  for (size_t b = 0; b < device.size(); ++b) {
    v1::EvaluateStreamResponse reply;
    ASSERT_TRUE(stream->Read(&reply));
    ASSERT_TRUE(reply.has_response()) << reply.error().message();
    EXPECT_EQ(reply.response().device(), v1::DEVICE_CUDA);
    EXPECT_EQ(reply.response().loss().data(), OnCpu(host[b]).loss().data()) << "batch " << b;
  }
  grpc::Status finished = stream->Finish();
  EXPECT_TRUE(finished.ok()) << finished.error_message();
}

TEST_F(CudaIpcServerTest, RefusesWhatWouldReadDeviceMemoryOnTheHost) {
  Start();
  Allocate(1 << 20);
  v1::EvaluateRequest base = testing::RandomRequest<float>(6, 8, 3, v1::REDUCTION_SUM);
  ToDevice(base.mutable_targets());
  const int calls = cuda_->calls();

  v1::EvaluateRequest req = base;
  req.set_device(v1::DEVICE_CPU);
  ExpectError(req, grpc::StatusCode::INVALID_ARGUMENT,
              {"targets.ref", "CUDA device memory", "device CPU cannot read it",
               "use device AUTO or CUDA"});
  req = base;
  req.set_reject_nan(true);
  ExpectError(req, grpc::StatusCode::INVALID_ARGUMENT,
              {"reject_nan", "not supported with CUDA IPC tensors", "targets.ref"});
  req = base;
  req.set_precision(v1::PRECISION_CORRECTLY_ROUNDED);
  ExpectError(req, grpc::StatusCode::INVALID_ARGUMENT,
              {"PRECISION_CORRECTLY_ROUNDED", "not supported with CUDA IPC tensors"});
  // A weight whose broadcast needs an expanded copy ([2,1,4] over [2,3,4]).
  {
    v1::EvaluateRequest e;
    std::vector<float> x(24, 0.5f), y(24, 1.0f), w(8, 2.0f);
    *e.mutable_logits() = testing::MakeTensor(x, {2, 3, 4});
    *e.mutable_targets() = testing::MakeTensor(y, {2, 3, 4});
    *e.mutable_weight() = testing::MakeTensor(w, {2, 1, 4});
    e.mutable_bce_with_logits();
    OnCpu(e);  // valid with the weight as bytes (OnCpu checks the status)
    ToDevice(e.mutable_weight());
    ExpectError(e, grpc::StatusCode::INVALID_ARGUMENT,
                {"weight.ref", "[2,1,4]", "expanded copy", "CUDA IPC tensors are not supported"});
  }
  // An output may not overwrite a device input.
  req = base;
  *req.mutable_outputs()->mutable_loss() = Ref(region_, req.targets().ref().offset(), 4);
  ExpectError(req, grpc::StatusCode::INVALID_ARGUMENT, {"outputs.loss", "overlaps",
                                                         "targets.ref"});
  // References outside the region, of the wrong size, of unknown regions.
  req = base;
  req.mutable_targets()->mutable_ref()->set_offset((1 << 20) - kRegionOffset - 8);
  ExpectError(req, grpc::StatusCode::INVALID_ARGUMENT, {"targets.ref", "lies outside region"});
  req = base;
  req.mutable_targets()->mutable_ref()->set_byte_size(4);
  ExpectError(req, grpc::StatusCode::INVALID_ARGUMENT, {"targets.ref.byte_size is 4"});
  req = base;
  req.mutable_targets()->mutable_ref()->set_region("no-such-region");
  ExpectError(req, grpc::StatusCode::NOT_FOUND, {"targets.ref.region", "is not registered"});
  req = base;
  *req.mutable_logits()->mutable_ref() = Ref(region_, 0, 4);
  ExpectError(req, grpc::StatusCode::INVALID_ARGUMENT, {"logits", "both data"});
  EXPECT_EQ(cuda_->calls(), calls) << "nothing refused reached the backend";

  // Unregistered: the region's references fail, and its handle is closed.
  grpc::ClientContext ctx;
  v1::UnregisterRegionRequest un;
  un.set_region(region_);
  v1::UnregisterRegionResponse unregistered;
  ASSERT_TRUE(shm_->UnregisterRegion(&ctx, un, &unregistered).ok());
  ExpectError(base, grpc::StatusCode::NOT_FOUND, {"targets.ref.region", "is not registered"});
  EXPECT_EQ(device_.opened(), 1);
  EXPECT_EQ(device_.closed(), 1);
}

// Registration over the service: listed with its kind; errors come back with their status.
TEST_F(CudaIpcServerTest, SharedMemoryServiceRegistersCudaIpc) {
  Start();
  const std::string handle = device_.Export(4096);
  {
    grpc::ClientContext ctx;
    v1::RegisterRegionResponse r;
    grpc::Status s = shm_->RegisterRegion(&ctx, IpcRequest(handle, 0, 4096, "GPU-nope"), &r);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
    EXPECT_HAS(s.error_message(), "GPU-nope");
    EXPECT_HAS(s.error_message(), kUuid);
  }
  {
    grpc::ClientContext ctx;
    v1::RegisterRegionResponse r;
    grpc::Status s = shm_->RegisterRegion(&ctx, IpcRequest("short", 0, 4096), &r);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_HAS(s.error_message(), "cuda_ipc_handle is 5 bytes");
  }
  grpc::ClientContext ctx;
  v1::RegisterRegionResponse r;
  ASSERT_TRUE(shm_->RegisterRegion(&ctx, IpcRequest(handle, 0, 4096), &r).ok());
  grpc::ClientContext list_ctx;
  v1::ListRegionsResponse listed;
  ASSERT_TRUE(shm_->ListRegions(&list_ctx, v1::ListRegionsRequest(), &listed).ok());
  ASSERT_EQ(listed.regions_size(), 1);
  EXPECT_EQ(listed.regions(0).kind(), v1::REGION_KIND_CUDA_IPC);
  EXPECT_EQ(server_->shared_memory_regions(), 1);
  // Draining refuses new registrations as for system regions.
  server_->Shutdown(absl::ZeroDuration());
  EXPECT_EQ(device_.opened(), 1);
}

// Device requests run alone even with dynamic batching on.
TEST_F(CudaIpcServerTest, DeviceRequestsAreNeverBatched) {
  ServerOptions o = Options();
  o.batch_max_delay = absl::Milliseconds(1);
  Start(o);
  Allocate(1 << 20);
  v1::EvaluateRequest host = testing::RandomRequest<float>(4, 8, 6, v1::REDUCTION_MEAN);
  v1::EvaluateResponse resp;
  ASSERT_TRUE(Evaluate(host, &resp).ok());
  EXPECT_EQ(cuda_->batches(), 1) << "host requests go through the batcher";
  v1::EvaluateRequest device = host;
  ToDevice(device.mutable_logits());
  v1::EvaluateResponse got;
  ASSERT_TRUE(Evaluate(device, &got).ok());
  EXPECT_EQ(got.loss().data(), resp.loss().data());
  EXPECT_EQ(cuda_->batches(), 1);
  EXPECT_EQ(cuda_->batched_device_items(), 0);
  EXPECT_EQ(cuda_->device_calls(), 1);
}

// Servers that cannot compute device memory refuse the registration and say why.
TEST_F(CudaIpcServerTest, ServersWithoutCudaRefuseRegistration) {
  struct Case {
    const char* what;
    ServerOptions options;
    const char* reason;
  };
  ServerOptions cpu = Options();
  cpu.device = DevicePolicy::kCpu;
  ServerOptions off = Options();
  off.cuda_ipc = false;
  ServerOptions no_gpu = Options();
  no_gpu.cuda_seams.make_backend = []() -> absl::StatusOr<std::unique_ptr<kernels::Backend>> {
    return absl::FailedPreconditionError("no GPU");
  };
  // Without a backend the reason depends on the build ("built without CUDA", "no usable GPU").
  for (const Case& c : {Case{"cpu", cpu, "--device=cpu"}, Case{"off", off, "--cuda_ipc=false"},
                        Case{"no gpu", no_gpu, "this server"}}) {
    SCOPED_TRACE(c.what);
    Start(c.options);
    EXPECT_FALSE(server_->cuda_ipc_enabled());
    grpc::ClientContext ctx;
    v1::RegisterRegionResponse r;
    grpc::Status s = shm_->RegisterRegion(&ctx, IpcRequest(device_.Export(64), 0, 64), &r);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
    EXPECT_HAS(s.error_message(), "REGION_KIND_CUDA_IPC is not available");
    EXPECT_HAS(s.error_message(), c.reason);
    grpc::ClientContext caps_ctx;
    v1::Capabilities caps;
    ASSERT_TRUE(stub_->GetCapabilities(&caps_ctx, v1::GetCapabilitiesRequest(), &caps).ok());
    EXPECT_FALSE(caps.cuda_ipc());
    server_.reset();
  }
  EXPECT_EQ(device_.opened(), 0);
}

}  // namespace
}  // namespace lossd::server
