// The CUDA backend's device tensors (BceArgs/BceOutputs::on_device), segmented batches
// (BceBatch), pinned chunk pipeline and CUDA IPC memory (OpenCudaIpcMemory, CudaDeviceUuid).
// The oracle is the backend's own single-call path on host tensors, whose accuracy
// cuda_backend_test.cc checks against the float64 reference: every new path must give the
// same bits. Cuda*Test.* need a GPU and skip without one; CudaIpcBuildTest.* runs everywhere.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "lossd/kernels/backend.h"
#include "lossd/kernels/bce.h"
#include "lossd/kernels/dtype.h"
#include "lossd/kernels/operand.h"

#ifdef LOSSD_HAVE_CUDA
#include <cuda_runtime.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include "kernels/cuda/cuda_backend_internal.h"
#include "tests/kernels/cuda_test_util.h"
#include "kernels/cuda/cuda_kernels.h"

extern char** environ;
#endif

namespace lossd::kernels {
namespace {

// ---- Runs everywhere ---------------------------------------------------------------------

TEST(CudaIpcBuildTest, RefusedWithoutDeviceOrWithBadRequests) {
  const std::string handle(64, '\x07');
  if (!CudaCompiled()) {
    auto m = OpenCudaIpcMemory(handle, 0, 16);
    EXPECT_EQ(m.status().code(), absl::StatusCode::kFailedPrecondition) << m.status();
    EXPECT_EQ(CudaDeviceUuid(), "");
    return;
  }
  // A CUDA build checks the request first, whatever the device.
  auto short_handle = OpenCudaIpcMemory(std::string(10, 'x'), 0, 16);
  EXPECT_EQ(short_handle.status().code(), absl::StatusCode::kInvalidArgument)
      << short_handle.status();
  auto empty = OpenCudaIpcMemory(handle, 0, 0);
  EXPECT_EQ(empty.status().code(), absl::StatusCode::kInvalidArgument) << empty.status();
  if (CudaDeviceCount() == 0) {
    auto m = OpenCudaIpcMemory(handle, 0, 16);
    EXPECT_EQ(m.status().code(), absl::StatusCode::kFailedPrecondition) << m.status();
    EXPECT_EQ(CudaDeviceUuid(), "");
  }
}

#ifdef LOSSD_HAVE_CUDA

// ---- Problems and outputs ----------------------------------------------------------------

// A random problem in any dtypes: logits over several magnitudes, hard and soft targets (some
// equal to ignore_index -100), and optional weight (full, [C], or [N,1]) and pos_weight [C].
enum class WeightKind { kNone, kFull, kTrailing, kLeading };

struct Problem {
  int64_t n = 0, c = 1;
  DType dtype = DType::kFloat32, targets_dtype = DType::kFloat32;
  std::vector<char> x, y, w, p;
  DType w_dtype = DType::kFloat32;
  WeightKind kind = WeightKind::kNone;
  bool pos_weight = false;
};

std::vector<char> RandomValues(DType dtype, int64_t count, std::mt19937_64& rng, double lo,
                               double hi) {
  std::vector<char> v(static_cast<size_t>(count) * ItemSize(dtype));
  std::uniform_real_distribution<double> u(lo, hi);
  for (int64_t i = 0; i < count; ++i) StoreFromDouble(dtype, v.data(), i, u(rng));
  return v;
}

Problem MakeProblem(std::mt19937_64& rng, int64_t n, DType dtype, DType targets_dtype,
                    WeightKind kind, bool pos_weight, DType w_dtype = DType::kFloat32) {
  Problem pr;
  pr.n = n;
  pr.c = n % 7 == 0 ? 7 : (n % 5 == 0 ? 5 : 1);
  pr.dtype = dtype;
  pr.targets_dtype = targets_dtype;
  pr.kind = kind;
  pr.pos_weight = pos_weight;
  pr.w_dtype = w_dtype;
  pr.x.resize(static_cast<size_t>(n) * ItemSize(dtype));
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  for (int64_t i = 0; i < n; ++i) {
    const double scale = std::ldexp(1.0, static_cast<int>(rng() % 12) - 4);
    StoreFromDouble(dtype, pr.x.data(), i, u(rng) * scale);
  }
  pr.y.resize(static_cast<size_t>(n) * ItemSize(targets_dtype));
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t r = rng() % 10;
    const double y = r < 4 ? 0.0 : r < 8 ? 1.0 : r == 8 ? -100.0 : 0.25;
    StoreFromDouble(targets_dtype, pr.y.data(), i, y);
  }
  const int64_t wcount = kind == WeightKind::kFull       ? n
                         : kind == WeightKind::kTrailing ? pr.c
                         : kind == WeightKind::kLeading  ? n / pr.c
                                                         : 0;
  // float64 weights: values with more bits than float holds (not float-exact).
  pr.w = RandomValues(w_dtype, wcount, rng, 0.1, 2.0);
  if (pos_weight) pr.p = RandomValues(DType::kFloat32, pr.c, rng, 0.5, 3.0);
  return pr;
}

BceArgs ArgsOf(const Problem& pr, Reduction r) {
  BceArgs a;
  a.numel = pr.n;
  a.dtype = pr.dtype;
  a.logits = pr.x.data();
  a.targets_dtype = pr.targets_dtype;
  a.targets = pr.y.data();
  a.reduction = r;
  if (pr.kind != WeightKind::kNone) {
    a.weight.dtype = pr.w_dtype;
    a.weight.data = pr.w.data();
    a.weight.inner = pr.kind == WeightKind::kLeading ? pr.c : 1;
    a.weight.period = pr.kind == WeightKind::kFull       ? pr.n
                      : pr.kind == WeightKind::kTrailing ? pr.c
                                                         : pr.n / pr.c;
  }
  if (pr.pos_weight) {
    a.pos_weight.dtype = DType::kFloat32;
    a.pos_weight.data = pr.p.data();
    a.pos_weight.period = pr.c;
  }
  return a;
}

// Host outputs of one call, filled with a marker so that unwritten bytes show.
struct Outs {
  std::vector<char> loss, gx, gy;
  int64_t kept = -7;
  Outs(const BceArgs& a, bool grads) {
    loss.assign(static_cast<size_t>(LossCount(a)) * ItemSize(a.dtype), '\x5a');
    if (grads) {
      gx.assign(static_cast<size_t>(a.numel) * ItemSize(a.dtype), '\x5a');
      gy.assign(gx.size(), '\x5a');
    }
  }
  BceOutputs Bind() {
    BceOutputs o;
    o.loss = loss.data();
    o.grad_logits = gx.empty() ? nullptr : gx.data();
    o.grad_targets = gy.empty() ? nullptr : gy.data();
    o.kept = &kept;
    return o;
  }
  bool operator==(const Outs& o) const {
    return loss == o.loss && gx == o.gx && gy == o.gy && kept == o.kept;
  }
};

std::unique_ptr<Backend> CudaWith(const cuda::CudaBackendKnobs& knobs, bool float_math) {
  CudaOptions options;
  options.float_math = float_math;
  auto b = cuda::MakeCudaBackendWithKnobs(options, knobs);
  EXPECT_TRUE(b.ok()) << b.status();
  return b.ok() ? std::move(*b) : nullptr;
}

// Device memory freed at scope exit.
struct DeviceBuffer {
  void* p = nullptr;
  explicit DeviceBuffer(size_t bytes) {
    EXPECT_EQ(cudaMalloc(&p, bytes == 0 ? 1 : bytes), cudaSuccess);
  }
  ~DeviceBuffer() { cudaFree(p); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};
void* Upload(const std::vector<char>& host, std::vector<std::unique_ptr<DeviceBuffer>>* keep) {
  keep->push_back(std::make_unique<DeviceBuffer>(host.size()));
  void* d = keep->back()->p;
  EXPECT_EQ(cudaMemcpy(d, host.data(), host.size(), cudaMemcpyHostToDevice), cudaSuccess);
  return d;
}
std::vector<char> Download(const void* d, size_t bytes) {
  std::vector<char> h(bytes);
  EXPECT_EQ(cudaMemcpy(h.data(), d, bytes, cudaMemcpyDeviceToHost), cudaSuccess);
  return h;
}

// ---- Device tensors ----------------------------------------------------------------------

class CudaDeviceTensorTest : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override { SKIP_WITHOUT_GPU(); }
};
INSTANTIATE_TEST_SUITE_P(Cuda, CudaDeviceTensorTest, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& info) {
                           return std::string(info.param ? "FloatMath" : "MixedMath");
                         });

// The call with the tensors of `in_bits` / `out_bits` in device memory gives the bits of the
// all-host call, for the fused kernel (NONE/SUM/MEAN) and the option kernel (per-sample mean,
// focal, loss_values).
TEST_P(CudaDeviceTensorTest, DeviceTensorsMatchHostTensors) {
  cuda::CudaBackendKnobs knobs;
  auto cuda = CudaWith(knobs, GetParam());
  ASSERT_NE(cuda, nullptr);
  std::mt19937_64 rng(3);
  struct Case {
    DType dtype, tdtype, wdtype;
    Reduction r;
    bool focal, values, normalize;
  };
  const Case cases[] = {
      {DType::kFloat32, DType::kFloat32, DType::kFloat32, Reduction::kNone, false, false, false},
      {DType::kFloat32, DType::kFloat32, DType::kFloat64, Reduction::kMean, false, false, true},
      {DType::kFloat16, DType::kFloat32, DType::kFloat32, Reduction::kSum, false, false, false},
      {DType::kFloat64, DType::kFloat64, DType::kFloat64, Reduction::kMean, false, false, false},
      {DType::kBFloat16, DType::kBFloat16, DType::kFloat32, Reduction::kNone, false, false, true},
      {DType::kFloat32, DType::kFloat32, DType::kFloat32, Reduction::kPerSampleMean, false, false,
       false},
      {DType::kFloat32, DType::kFloat32, DType::kFloat32, Reduction::kMean, true, false, false},
      {DType::kFloat32, DType::kFloat32, DType::kFloat32, Reduction::kSum, false, true, false},
  };
  for (const Case& cs : cases) {
    for (uint32_t in_bits : {0xfu, 0x1u, 0x6u, 0x9u}) {
      for (uint32_t out_bits : {0x7u, 0x0u, 0x1u, 0x6u}) {
        if (in_bits == 0 && out_bits == 0) continue;
        const Problem pr = MakeProblem(rng, 2 * 2048 * 7 + 35, cs.dtype, cs.tdtype,
                                       WeightKind::kTrailing, true, cs.wdtype);
        BceArgs a = ArgsOf(pr, cs.r);
        a.last_dim = pr.c;
        if (cs.focal) a.loss = Loss::kFocal;
        if (cs.focal) a.pos_weight = Operand();
        a.has_ignore_index = true;
        a.normalize = cs.normalize;
        Outs host(a, true);
        std::vector<double> host_values(cs.values ? pr.n : 0);
        BceOutputs ho = host.Bind();
        ho.loss_values = cs.values ? host_values.data() : nullptr;
        ASSERT_TRUE(cuda->Bce(a, ho).ok());

        std::vector<std::unique_ptr<DeviceBuffer>> keep;
        BceArgs d = a;
        d.on_device = in_bits;
        if (in_bits & on_device::kLogits) d.logits = Upload(pr.x, &keep);
        if (in_bits & on_device::kTargets) d.targets = Upload(pr.y, &keep);
        if ((in_bits & on_device::kWeight) && a.weight.data != nullptr) {
          d.weight.data = Upload(pr.w, &keep);
        }
        if ((in_bits & on_device::kPosWeight) && a.pos_weight.data != nullptr) {
          d.pos_weight.data = Upload(pr.p, &keep);
        }
        Outs dev(a, true);
        BceOutputs o = dev.Bind();
        std::vector<double> dev_values(cs.values ? pr.n : 0);
        o.loss_values = cs.values ? dev_values.data() : nullptr;
        o.on_device = out_bits;
        const std::vector<char> blank_loss = dev.loss, blank_g = dev.gx;
        if (out_bits & on_device::kLoss) o.loss = Upload(blank_loss, &keep);
        if (out_bits & on_device::kGradLogits) o.grad_logits = Upload(blank_g, &keep);
        if (out_bits & on_device::kGradTargets) o.grad_targets = Upload(blank_g, &keep);
        const absl::Status st = cuda->Bce(d, o);
        ASSERT_TRUE(st.ok()) << st;
        if (out_bits & on_device::kLoss) dev.loss = Download(o.loss, dev.loss.size());
        if (out_bits & on_device::kGradLogits) dev.gx = Download(o.grad_logits, dev.gx.size());
        if (out_bits & on_device::kGradTargets) {
          dev.gy = Download(o.grad_targets, dev.gy.size());
        }
        EXPECT_TRUE(dev == host) << "dtype " << DTypeName(cs.dtype) << " reduction "
                                 << static_cast<int>(cs.r) << " in " << in_bits << " out "
                                 << out_bits;
        EXPECT_EQ(dev_values, host_values);
      }
    }
  }
}

TEST_P(CudaDeviceTensorTest, KeptAloneAndEmptyCallsWithDeviceTensors) {
  auto cuda = CudaWith({}, GetParam());
  ASSERT_NE(cuda, nullptr);
  std::mt19937_64 rng(5);
  const Problem pr =
      MakeProblem(rng, 10007, DType::kFloat32, DType::kFloat16, WeightKind::kNone, false);
  BceArgs a = ArgsOf(pr, Reduction::kMean);
  a.has_ignore_index = true;
  int64_t kept_host = -1, kept_dev = -1;
  BceOutputs only_kept;
  only_kept.kept = &kept_host;
  ASSERT_TRUE(cuda->Bce(a, only_kept).ok());
  std::vector<std::unique_ptr<DeviceBuffer>> keep;
  BceArgs d = a;
  d.targets = Upload(pr.y, &keep);
  d.on_device = on_device::kTargets;
  only_kept.kept = &kept_dev;
  ASSERT_TRUE(cuda->Bce(d, only_kept).ok());
  EXPECT_EQ(kept_dev, kept_host);
  int64_t ignored = 0;
  for (int64_t i = 0; i < pr.n; ++i)
    ignored += LoadAsDouble(pr.targets_dtype, pr.y.data(), i) == -100.0;
  EXPECT_EQ(kept_host, pr.n - ignored);

  // numel 0: MEAN's NaN and SUM's 0 land in device memory.
  for (Reduction r : {Reduction::kMean, Reduction::kSum}) {
    BceArgs e;
    e.numel = 0;
    e.reduction = r;
    const std::vector<char> marker(4, '\x5a');
    BceOutputs o;
    o.loss = Upload(marker, &keep);
    o.on_device = on_device::kLoss;
    ASSERT_TRUE(cuda->Bce(e, o).ok());
    float v = 0;
    ASSERT_EQ(cudaMemcpy(&v, o.loss, 4, cudaMemcpyDeviceToHost), cudaSuccess);
    if (r == Reduction::kMean) {
      EXPECT_TRUE(std::isnan(v));
    } else {
      EXPECT_EQ(v, 0.0f);
    }
  }
  // Per-sample means of 3 empty rows, into device memory.
  BceArgs rows;
  rows.numel = 0;
  rows.reduction = Reduction::kPerSampleMean;
  rows.last_dim = 0;
  rows.empty_rows = 3;
  const std::vector<char> marker(12, '\x5a');
  BceOutputs ro;
  ro.loss = Upload(marker, &keep);
  ro.on_device = on_device::kLoss;
  ASSERT_TRUE(cuda->Bce(rows, ro).ok());
  const std::vector<char> got = Download(ro.loss, 12);
  for (int i = 0; i < 3; ++i) {
    float v;
    std::memcpy(&v, got.data() + 4 * i, 4);
    EXPECT_TRUE(std::isnan(v)) << i;
  }
}

TEST_P(CudaDeviceTensorTest, RefusesHostPointersAndUnknownBits) {
  auto cuda = CudaWith({}, GetParam());
  ASSERT_NE(cuda, nullptr);
  std::mt19937_64 rng(9);
  const Problem pr =
      MakeProblem(rng, 100, DType::kFloat32, DType::kFloat32, WeightKind::kNone, false);
  BceArgs a = ArgsOf(pr, Reduction::kSum);
  float loss = 0;
  BceOutputs o;
  o.loss = &loss;
  a.on_device = on_device::kLogits;  // a host pointer marked as device memory
  absl::Status st = cuda->Bce(a, o);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_NE(st.message().find("logits"), std::string::npos) << st;
  a.on_device = 1u << 7;
  st = cuda->Bce(a, o);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  a.on_device = 0;
  o.on_device = on_device::kLoss;  // host loss marked as device memory
  st = cuda->Bce(a, o);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_NE(st.message().find("loss"), std::string::npos) << st;
  // The backend still works afterwards.
  o.on_device = 0;
  EXPECT_TRUE(cuda->Bce(a, o).ok());
}

// ---- Segmented batches -------------------------------------------------------------------

class CudaBatchTest : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override { SKIP_WITHOUT_GPU(); }
};
INSTANTIATE_TEST_SUITE_P(Cuda, CudaBatchTest, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& info) {
                           return std::string(info.param ? "FloatMath" : "MixedMath");
                         });

// An item's bits alone and in 100 random batches: random sizes 1..70000, random companions of
// the same kind (its batch key) and of other dtypes, with and without gradients, NONE, SUM
// and MEAN, with options (ignore_index with normalize, label smoothing, float64 weights).
TEST_P(CudaBatchTest, ItemsAreBitwiseTheSameAloneAndInAnyBatch) {
  std::atomic<int64_t> launches{0};
  cuda::CudaBackendKnobs knobs;
  knobs.segmented_launches = &launches;
  auto cuda = CudaWith(knobs, GetParam());
  ASSERT_NE(cuda, nullptr);
  std::mt19937_64 rng(2024);
  const DType dtypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16, DType::kFloat64};
  const Reduction reductions[] = {Reduction::kNone, Reduction::kSum, Reduction::kMean};
  struct Kind {
    DType dtype, tdtype, wdtype;
    Reduction r;
    bool grads, normalize, smoothing;
    WeightKind weight;
    bool pos_weight;
  };
  auto random_kind = [&]() {
    Kind k;
    k.dtype = dtypes[rng() % 4];
    k.tdtype = rng() % 3 == 0 ? dtypes[rng() % 4] : k.dtype;
    k.wdtype = rng() % 4 == 0 ? DType::kFloat64 : DType::kFloat32;
    k.r = reductions[rng() % 3];
    k.grads = rng() % 2 == 0;
    k.normalize = rng() % 4 == 0;
    k.smoothing = rng() % 5 == 0;
    k.weight = static_cast<WeightKind>(rng() % 4);
    k.pos_weight = rng() % 2 == 0;
    return k;
  };
  struct Item {
    Problem pr;
    BceArgs args;
    bool grads = false;
  };
  auto make_item = [&](const Kind& k) {
    auto it = std::make_unique<Item>();
    const int64_t n = 1 + static_cast<int64_t>(rng() % 70000);
    it->pr = MakeProblem(rng, n, k.dtype, k.tdtype, k.weight, k.pos_weight, k.wdtype);
    it->args = ArgsOf(it->pr, k.r);
    it->args.has_ignore_index = true;
    it->args.normalize = k.normalize;
    it->args.label_smoothing = k.smoothing ? 0.1 : 0.0;
    it->grads = k.grads;
    return it;
  };
  for (int trial = 0; trial < 100; ++trial) {
    const Kind kind = random_kind();
    std::vector<std::unique_ptr<Item>> items;
    items.push_back(make_item(kind));
    const int companions = 1 + static_cast<int>(rng() % 12);
    for (int c = 0; c < companions; ++c) {
      items.push_back(make_item(rng() % 4 == 0 ? random_kind() : kind));
    }
    std::shuffle(items.begin(), items.end(), rng);
    // Alone.
    std::vector<Outs> alone;
    for (const auto& it : items) {
      alone.emplace_back(it->args, it->grads);
      const absl::Status st = cuda->Bce(it->args, alone.back().Bind());
      ASSERT_TRUE(st.ok()) << st;
    }
    // Batched.
    std::vector<Outs> batched;
    std::vector<BceOutputs> outs;
    for (const auto& it : items) batched.emplace_back(it->args, it->grads);
    for (auto& b : batched) outs.push_back(b.Bind());
    std::vector<BceItem> batch;
    for (size_t i = 0; i < items.size(); ++i) batch.push_back({&items[i]->args, &outs[i]});
    const std::vector<absl::Status> st = cuda->BceBatch(batch);
    ASSERT_EQ(st.size(), items.size());
    for (size_t i = 0; i < items.size(); ++i) {
      ASSERT_TRUE(st[i].ok()) << st[i];
      EXPECT_TRUE(batched[i] == alone[i])
          << "trial " << trial << " item " << i << " of " << items.size() << ": numel "
          << items[i]->args.numel << " dtype " << DTypeName(items[i]->args.dtype) << " reduction "
          << static_cast<int>(items[i]->args.reduction);
    }
  }
  EXPECT_GT(launches.load(), 0) << "no batch took the segmented launch";
}

TEST_P(CudaBatchTest, ErrorsAndCancellationStayPerItem) {
  std::atomic<int64_t> launches{0};
  cuda::CudaBackendKnobs knobs;
  knobs.segmented_launches = &launches;
  auto cuda = CudaWith(knobs, GetParam());
  ASSERT_NE(cuda, nullptr);
  std::mt19937_64 rng(77);
  std::vector<Problem> prs;
  for (int i = 0; i < 4; ++i) {
    prs.push_back(MakeProblem(rng, 1000 + 999 * i, DType::kFloat32, DType::kFloat32,
                              WeightKind::kNone, false));
  }
  std::vector<BceArgs> args;
  for (const Problem& pr : prs) args.push_back(ArgsOf(pr, Reduction::kMean));
  args[1].weight.data = prs[1].x.data();
  args[1].weight.period = 0;  // malformed
  args[2].should_stop = [] { return true; };
  std::vector<Outs> outs;
  std::vector<BceOutputs> bound;
  for (const BceArgs& a : args) outs.emplace_back(a, true);
  for (auto& o : outs) bound.push_back(o.Bind());
  std::vector<BceItem> batch;
  for (size_t i = 0; i < args.size(); ++i) batch.push_back({&args[i], &bound[i]});
  const std::vector<absl::Status> st = cuda->BceBatch(batch);
  ASSERT_EQ(st.size(), 4u);
  EXPECT_TRUE(st[0].ok()) << st[0];
  EXPECT_EQ(st[1].code(), absl::StatusCode::kInvalidArgument) << st[1];
  EXPECT_EQ(st[2].code(), absl::StatusCode::kCancelled) << st[2];
  EXPECT_TRUE(st[3].ok()) << st[3];
  EXPECT_EQ(launches.load(), 1);
  for (size_t i : {size_t{0}, size_t{3}}) {
    Outs alone(args[i], true);
    ASSERT_TRUE(cuda->Bce(args[i], alone.Bind()).ok());
    EXPECT_TRUE(alone == outs[i]) << i;
  }
}

// ---- Pinned chunk pipeline ---------------------------------------------------------------

class CudaChunkTest : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override { SKIP_WITHOUT_GPU(); }
};
INSTANTIATE_TEST_SUITE_P(Cuda, CudaChunkTest, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& info) {
                           return std::string(info.param ? "FloatMath" : "MixedMath");
                         });

// Chunks of 3 reduction blocks against the request in one piece: every weight layout (its
// slices streamed, or indexed by the request's element index), every dtype, reduction and
// output.
TEST_P(CudaChunkTest, ChunkedIsBitwiseUnchunked) {
  std::atomic<int64_t> chunked_runs{0};
  cuda::CudaBackendKnobs small;
  small.chunk_elements = 3 * kReduceBlock;
  small.chunked_runs = &chunked_runs;
  cuda::CudaBackendKnobs whole;
  whole.chunked = false;
  auto chunked = CudaWith(small, GetParam());
  auto one_piece = CudaWith(whole, GetParam());
  ASSERT_NE(chunked, nullptr);
  ASSERT_NE(one_piece, nullptr);
  std::mt19937_64 rng(11);
  int64_t expected_runs = 0;
  for (DType dtype : {DType::kFloat32, DType::kFloat16, DType::kFloat64}) {
    for (WeightKind wk :
         {WeightKind::kNone, WeightKind::kFull, WeightKind::kTrailing, WeightKind::kLeading}) {
      for (Reduction r : {Reduction::kNone, Reduction::kSum, Reduction::kMean}) {
        for (bool grads : {false, true}) {
          const int64_t n = 7 * (9 * kReduceBlock + 13);  // 64 blocks: 22 chunks, the last short
          const DType wdtype = rng() % 2 == 0 ? DType::kFloat64 : DType::kFloat32;
          const Problem pr = MakeProblem(rng, n, dtype, dtype, wk, true, wdtype);
          BceArgs a = ArgsOf(pr, r);
          a.label_smoothing = rng() % 2 == 0 ? 0.05 : 0.0;
          Outs x(a, grads), y(a, grads);
          BceOutputs xo = x.Bind(), yo = y.Bind();
          xo.kept = yo.kept = nullptr;  // a kept count with ignore_index is not chunked
          ASSERT_TRUE(chunked->Bce(a, xo).ok());
          ASSERT_TRUE(one_piece->Bce(a, yo).ok());
          ++expected_runs;
          EXPECT_TRUE(x == y) << DTypeName(dtype) << " weight " << static_cast<int>(wk)
                              << " reduction " << static_cast<int>(r) << " grads " << grads;
        }
      }
    }
  }
  EXPECT_EQ(chunked_runs.load(), expected_runs);
}

// The default chunk size (8 MiB buffers) on a request of many chunks, and cancellation
// between chunks.
TEST_P(CudaChunkTest, DefaultChunksAndCancellation) {
  std::atomic<int64_t> chunked_runs{0};
  cuda::CudaBackendKnobs knobs;
  knobs.chunked_runs = &chunked_runs;
  cuda::CudaBackendKnobs whole;
  whole.chunked = false;
  auto chunked = CudaWith(knobs, GetParam());
  auto one_piece = CudaWith(whole, GetParam());
  ASSERT_NE(chunked, nullptr);
  ASSERT_NE(one_piece, nullptr);
  std::mt19937_64 rng(12);
  const Problem pr = MakeProblem(rng, (int64_t{5} << 20) + 3, DType::kFloat32, DType::kFloat32,
                                 WeightKind::kTrailing, true);
  for (Reduction r : {Reduction::kNone, Reduction::kMean}) {
    BceArgs a = ArgsOf(pr, r);
    Outs x(a, true), y(a, true);
    ASSERT_TRUE(chunked->Bce(a, x.Bind()).ok());
    ASSERT_TRUE(one_piece->Bce(a, y.Bind()).ok());
    EXPECT_TRUE(x == y) << static_cast<int>(r);
  }
  EXPECT_EQ(chunked_runs.load(), 2);
  BceArgs a = ArgsOf(pr, Reduction::kMean);
  std::atomic<int> polls{0};
  a.should_stop = [&polls] { return polls.fetch_add(1) >= 2; };
  Outs x(a, true);
  EXPECT_EQ(chunked->Bce(a, x.Bind()).code(), absl::StatusCode::kCancelled);
  EXPECT_GT(polls.load(), 2);
  // The slot is usable afterwards.
  BceArgs b = ArgsOf(pr, Reduction::kSum);
  Outs u(b, false), v(b, false);
  ASSERT_TRUE(chunked->Bce(b, u.Bind()).ok());
  ASSERT_TRUE(one_piece->Bce(b, v.Bind()).ok());
  EXPECT_TRUE(u == v);
}

// ---- CUDA IPC ------------------------------------------------------------------------------

TEST(CudaIpcTest, UuidAndForeignHandles) {
  SKIP_WITHOUT_GPU();
  const std::string uuid = CudaDeviceUuid();
  ASSERT_EQ(uuid.size(), 40u) << uuid;
  EXPECT_EQ(uuid.substr(0, 4), "GPU-");
  for (size_t i = 4; i < uuid.size(); ++i) {
    const bool dash = i == 12 || i == 17 || i == 22 || i == 27;
    const unsigned char ch = static_cast<unsigned char>(uuid[i]);
    EXPECT_TRUE(dash ? ch == '-' : std::isxdigit(ch) && !std::isupper(ch)) << uuid;
  }
  // A handle that no process exported.
  auto m = OpenCudaIpcMemory(std::string(64, '\x11'), 0, 16);
  EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument) << m.status();
}

// The layout that the parent exports to the child process below: logits, targets and room
// for the child's grad_logits, each kIpcN float32 at these offsets of one allocation.
constexpr int64_t kIpcN = 5000;
constexpr uint64_t kIpcX = 0, kIpcY = 32768, kIpcG = 65536, kIpcBytes = 1 << 20;

std::vector<float> IpcLogits() {
  std::vector<float> x(kIpcN);
  for (int64_t i = 0; i < kIpcN; ++i) x[i] = static_cast<float>(i % 17 - 8) * 0.37f;
  return x;
}
std::vector<float> IpcTargets() {
  std::vector<float> y(kIpcN);
  for (int64_t i = 0; i < kIpcN; ++i) y[i] = static_cast<float>(i % 3) * 0.5f;
  return y;
}

std::string Hex(const void* p, size_t n) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string s;
  for (size_t i = 0; i < n; ++i) {
    const unsigned char b = static_cast<const unsigned char*>(p)[i];
    s.push_back(kHex[b >> 4]);
    s.push_back(kHex[b & 15]);
  }
  return s;
}
std::string Unhex(const std::string& s) {
  std::string out;
  for (size_t i = 0; i + 1 < s.size(); i += 2) {
    out.push_back(static_cast<char>(std::stoi(s.substr(i, 2), nullptr, 16)));
  }
  return out;
}

// Run by the test below in a child process (cudaIpcOpenMemHandle refuses the exporting
// process): opens the parent's allocation (the logits twice: one mapping shared), checks the
// range checks, computes with device inputs and a device gradient in the parent's memory.
// Skipped when run directly.
TEST(CudaIpcChildTest, OpensParentMemory) {
  const char* env = std::getenv("LOSSD_IPC_TEST_HANDLE");
  if (env == nullptr) GTEST_SKIP() << "run by CudaIpcTest.OpenedByAnotherProcess only";
  SKIP_WITHOUT_GPU();
  const std::string handle = Unhex(env);
  auto x = OpenCudaIpcMemory(handle, kIpcX, kIpcN * 4);
  auto x2 = OpenCudaIpcMemory(handle, kIpcX, kIpcN * 4);
  auto y = OpenCudaIpcMemory(handle, kIpcY, kIpcN * 4);
  auto g = OpenCudaIpcMemory(handle, kIpcG, kIpcN * 4);
  ASSERT_TRUE(x.ok() && x2.ok() && y.ok() && g.ok()) << x.status() << y.status() << g.status();
  EXPECT_EQ(x->data, x2->data);  // the same mapping
  x2->keepalive.reset();         // x's mapping stays open
  // Past the end (far enough for any rounding of the allocation's size by the driver).
  auto past = OpenCudaIpcMemory(handle, 64 * kIpcBytes, 9);
  EXPECT_EQ(past.status().code(), absl::StatusCode::kInvalidArgument) << past.status();
  EXPECT_NE(past.status().message().find("allocation of"), std::string::npos) << past.status();
  auto wrap = OpenCudaIpcMemory(handle, ~uint64_t{0}, 2);
  EXPECT_EQ(wrap.status().code(), absl::StatusCode::kInvalidArgument) << wrap.status();

  auto cuda = CudaWith({}, true);
  ASSERT_NE(cuda, nullptr);
  const std::vector<float> hx = IpcLogits(), hy = IpcTargets();
  BceArgs a;
  a.numel = kIpcN;
  a.logits = hx.data();
  a.targets = hy.data();
  a.reduction = Reduction::kSum;
  float host_loss = 0, dev_loss = 0;
  std::vector<float> host_g(kIpcN);
  ASSERT_TRUE(cuda->Bce(a, {&host_loss, host_g.data(), nullptr}).ok());
  BceArgs d = a;
  d.logits = x->data;
  d.targets = y->data;
  d.on_device = on_device::kLogits | on_device::kTargets;
  BceOutputs o{&dev_loss, g->data, nullptr};
  o.on_device = on_device::kGradLogits;
  const absl::Status st = cuda->Bce(d, o);
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_EQ(std::memcmp(&host_loss, &dev_loss, 4), 0);
  EXPECT_EQ(Download(g->data, kIpcN * 4),
            std::vector<char>(reinterpret_cast<char*>(host_g.data()),
                              reinterpret_cast<char*>(host_g.data()) + kIpcN * 4));
}

TEST(CudaIpcTest, OpenedByAnotherProcess) {
  SKIP_WITHOUT_GPU();
  DeviceBuffer mem(kIpcBytes);
  ASSERT_EQ(cudaMemset(mem.p, 0, kIpcBytes), cudaSuccess);
  const std::vector<float> hx = IpcLogits(), hy = IpcTargets();
  char* base = static_cast<char*>(mem.p);
  ASSERT_EQ(cudaMemcpy(base + kIpcX, hx.data(), kIpcN * 4, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(base + kIpcY, hy.data(), kIpcN * 4, cudaMemcpyHostToDevice), cudaSuccess);
  cudaIpcMemHandle_t h;
  ASSERT_EQ(cudaIpcGetMemHandle(&h, mem.p), cudaSuccess);
  std::vector<std::string> env_strings;
  for (char** e = environ; *e != nullptr; ++e) env_strings.emplace_back(*e);
  env_strings.push_back("LOSSD_IPC_TEST_HANDLE=" + Hex(&h, sizeof(h)));
  std::vector<char*> envp;
  for (auto& s : env_strings) envp.push_back(s.data());
  envp.push_back(nullptr);
  std::string self = "/proc/self/exe";
  std::string filter = "--gtest_filter=CudaIpcChildTest.OpensParentMemory";
  char* argv[] = {self.data(), filter.data(), nullptr};
  pid_t pid = 0;
  ASSERT_EQ(posix_spawn(&pid, self.c_str(), nullptr, nullptr, argv, envp.data()), 0);
  int wstatus = 0;
  ASSERT_EQ(waitpid(pid, &wstatus, 0), pid);
  ASSERT_TRUE(WIFEXITED(wstatus) && WEXITSTATUS(wstatus) == 0) << "child status " << wstatus;
  // The child's gradient, written in place into this process's memory.
  auto cuda = CudaWith({}, true);
  ASSERT_NE(cuda, nullptr);
  BceArgs a;
  a.numel = kIpcN;
  a.logits = hx.data();
  a.targets = hy.data();
  a.reduction = Reduction::kSum;
  std::vector<float> g(kIpcN);
  ASSERT_TRUE(cuda->Bce(a, {nullptr, g.data(), nullptr}).ok());
  std::vector<float> child(kIpcN);
  ASSERT_EQ(cudaMemcpy(child.data(), base + kIpcG, kIpcN * 4, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(std::memcmp(child.data(), g.data(), kIpcN * 4), 0);
}

#endif  // LOSSD_HAVE_CUDA

}  // namespace
}  // namespace lossd::kernels
