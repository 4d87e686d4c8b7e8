// GPU validation and bandwidth benchmark for the CUDA backend (docs/design.md sections 6 and 9).
//
// 1. Validates MakeCudaBackend() against ReferenceBce on ~1M random float32 elements with
//    weight [C] and pos_weight [C]: per-element loss (max ulp), gradients (max error in ulp of
//    the larger term), the loss against the CPU backend per element, MEAN (relative error; and
//    vs the CPU backend); the same with CudaOptions::float_math, then cuda::LaunchBce with
//    DeviceBce::float_math and full-tensor operands on the same data. Prints PASS or FAIL for
//    each.
// 2. Times (each element math only when its validation passed), with CUDA events on
//    device-resident data, the fused kernel (cuda::LaunchBce) next to a device-to-device
//    cudaMemcpy that moves the same number of bytes (read + written), for float32 sizes
//    1M..256M. Bytes counted for the kernel: x and y read (+ w and p when
//    they are full tensors), loss and grad_logits written; MEAN writes grad_logits only.
//    [C] operands are passed in double, as CudaBackend uploads operands of <= 64K elements
//    (in float for the "/f32" variants, which repeat the problems with DeviceBce::float_math
//    from 16M elements). Then, from 16M elements, in the fused all-float kernel: ignore_index +
//    normalize (MEAN, [C] weights, the count kernel included: its read of the targets counts,
//    so 16 bytes per element) and label smoothing 0.1 (MEAN, [C] weights); and in the option
//    kernel (cuda::LaunchGeneric, math in double): focal loss (NONE), on the mixed labels and
//    on hard labels only ("focal/none/hard": half zeros, half ones); each validated first
//    through the backend against the reference (4 ulp per NONE element, MEAN within 1e-6).
//
// 3. Times the backend's host paths (docs/kernels.md, "Segmented batch launch" and "Pinned
//    chunk pipeline"), each checked bitwise against its plain counterpart first: 64 items of
//    1024 float32 elements (MEAN with grad_logits) through one BceBatch against 64 Bce calls
//    (calls per second, host wall clock), and one float32 MEAN-with-grad_logits request of
//    64M host elements (capped by --max-elements) through Bce, pipelined in pinned chunks and
//    in one piece, against the kernel alone on device data (elements per second).
//
// Output: a table, plus one machine-readable line per row:
//   RESULT <variant> <numel> <kernel_gbps> <copy_gbps> <gelem_per_s>
// and for part 3 (other prefixes, so that parsers of RESULT rows skip them):
//   BATCH <items> <elements_per_item> <batch_calls_per_s> <single_calls_per_s> <ratio>
//   E2E <numel> <pipelined_gelem_per_s> <one_piece_gelem_per_s> <kernel_gelem_per_s>
//       <pipelined/kernel> <pipelined/one_piece>
// Usage: gpu_bench [--min-elements N] [--max-elements N] [--only VARIANT] [--skip-validation]
// (--min-elements raises every variant's smallest size; --only times one variant, e.g. to profile
// one kernel under ncu; --only host runs part 3 alone). Exit status 1 on FAIL or error.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/cuda/cuda_backend_internal.h"
#include "kernels/cuda/cuda_kernels.h"
#include "lossd/kernels/backend.h"
#include "lossd/kernels/bce.h"
#include "lossd/kernels/dtype.h"
#include "lossd/kernels/operand.h"
#include "lossd/kernels/reference.h"
#include "kernels/src/resolved_loss.h"
#include "tests/kernels/test_util.h"  // lossd_kernels_test_util: the ulp helpers of the kernel tests

namespace lk = lossd::kernels;
using lossd::testing::GradTermScales;
using lossd::testing::UlpDistance;
using lossd::testing::UlpF32;

namespace {

#define CHECK_CUDA(expr)                                                                   \
  do {                                                                                     \
    const cudaError_t e_ = (expr);                                                         \
    if (e_ != cudaSuccess) {                                                               \
      std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorName(e_), __FILE__, \
                   __LINE__, cudaGetErrorString(e_));                                      \
      std::exit(1);                                                                        \
    }                                                                                      \
  } while (0)

// Error of a float gradient in ulps of the larger of its two terms (docs/design.md section 4).
double GradErrUlps(float got, double ref, double scale) {
  if (std::isnan(ref) || std::isnan(got)) return std::isnan(ref) == std::isnan(got) ? 0 : 1e30;
  if (std::isinf(ref) || std::isinf(got)) return static_cast<float>(ref) == got ? 0 : 1e30;
  const double err = std::fabs(static_cast<double>(got) - ref);
  if (err == 0) return 0;
  return err / UlpF32(scale);
}

// ~1M random float32 elements with weight [C] and pos_weight [C] (magnitudes 1e-6..1e2, 2%
// specials including infinities, hard and soft labels, zero weights).
struct ValidationData {
  int64_t c = 64, rows = 16411, n = 16411 * 64;  // not a multiple of 2048
  std::vector<float> x, y, w, p;
  ValidationData() {
    std::mt19937_64 rng(20240601);
    std::uniform_real_distribution<double> u(0, 1);
    x.resize(n);
    y.resize(n);
    w.resize(c);
    p.resize(c);
    const float specials[] = {0.0f,
                              30.0f,
                              -30.0f,
                              1e30f,
                              -1e30f,
                              -17.0f,
                              88.0f,
                              -88.0f,
                              std::numeric_limits<float>::infinity(),
                              -std::numeric_limits<float>::infinity()};
    for (int64_t i = 0; i < n; ++i) {
      x[i] = u(rng) < 0.02
                 ? specials[rng() % std::size(specials)]
                 : static_cast<float>(std::pow(10.0, -6 + 8 * u(rng)) * (u(rng) < 0.5 ? -1 : 1));
      const double t = u(rng);
      y[i] = t < 0.4 ? 0.0f : t < 0.8 ? 1.0f : static_cast<float>(u(rng));
    }
    for (int64_t k = 0; k < c; ++k) {
      w[k] = k % 13 == 0 ? 0.0f : static_cast<float>(1e3 * u(rng));
      p[k] = k % 11 == 0 ? 0.0f : static_cast<float>(1e3 * u(rng));
    }
  }
  lk::BceArgs Args(lk::Reduction r) const {
    lk::BceArgs a;
    a.numel = n;
    a.logits = x.data();
    a.targets = y.data();
    a.weight = *lk::MakeOperand("weight", lk::DType::kFloat32, w.data(), {c}, {rows, c});
    a.pos_weight = *lk::MakeOperand("pos_weight", lk::DType::kFloat32, p.data(), {c}, {rows, c});
    a.reduction = r;
    return a;
  }
};

struct ElementErrors {
  int64_t loss_ulp = 0;      // max ulp distance of the loss from the reference
  double gx = 0, gy = 0;     // max gradient errors, in ulps of the larger term
  int64_t vs_cpu_ulp = 0;    // max ulp distance of the loss from the CPU backend's
  bool Pass() const { return loss_ulp <= 4 && gx <= 4 && gy <= 4 && vs_cpu_ulp <= 4; }
};

ElementErrors CompareElements(const ValidationData& v, const std::vector<float>& l,
                              const std::vector<float>& gx, const std::vector<float>& gy) {
  const lk::BceArgs a = v.Args(lk::Reduction::kNone);
  std::vector<double> rl(v.n), rgx(v.n), rgy(v.n);
  lk::ReferenceBce(a, rl.data(), rgx.data(), rgy.data());
  std::vector<float> cpu(v.n);
  ElementErrors e;
  if (!lk::MakeCpuBackend()->Bce(a, {cpu.data(), nullptr, nullptr}).ok()) {
    e.vs_cpu_ulp = std::numeric_limits<int64_t>::max();
    return e;
  }
  for (int64_t i = 0; i < v.n; ++i) {
    e.loss_ulp = std::max(e.loss_ulp, UlpDistance(l[i], static_cast<float>(rl[i])));
    e.vs_cpu_ulp = std::max(e.vs_cpu_ulp, UlpDistance(l[i], cpu[i]));
    const double wi = v.w[i % v.c], pi = v.p[i % v.c];
    const auto [sx, sy] = GradTermScales(v.x[i], v.y[i], wi, pi);
    e.gx = std::max(e.gx, GradErrUlps(gx[i], rgx[i], sx));
    e.gy = std::max(e.gy, GradErrUlps(gy[i], rgy[i], sy));
  }
  return e;
}

void PrintElementErrors(const ElementErrors& e) {
  std::printf(
      "  loss max ulp %lld (<= 4); grad_logits max err %.3f ulp of larger term (<= 4);"
      " grad_targets %.3f (<= 4); loss vs CPU backend max %lld ulp (<= 4)\n",
      static_cast<long long>(e.loss_ulp), e.gx, e.gy, static_cast<long long>(e.vs_cpu_ulp));
}

// MakeCudaBackend() against the reference and the CPU backend, per element and for MEAN.
bool Validate(const ValidationData& v, bool float_math) {
  lk::CudaOptions options;
  options.float_math = float_math;
  auto backend = lk::MakeCudaBackend(options);
  if (!backend.ok()) {
    std::printf("validation: FAIL (%s)\n", backend.status().ToString().c_str());
    return false;
  }
  lk::BceArgs a = v.Args(lk::Reduction::kNone);
  std::vector<float> l(v.n), gx(v.n), gy(v.n);
  absl::Status st = (*backend)->Bce(a, {l.data(), gx.data(), gy.data()});
  if (!st.ok()) {
    std::printf("validation: FAIL (%s)\n", st.ToString().c_str());
    return false;
  }
  const ElementErrors e = CompareElements(v, l, gx, gy);
  // MEAN against the reference and the CPU backend.
  a.reduction = lk::Reduction::kMean;
  float mean_gpu = 0, mean_cpu = 0;
  double mean_ref = 0;
  const absl::Status st_mean = (*backend)->Bce(a, {&mean_gpu, gx.data(), nullptr});
  if (!st_mean.ok()) {
    std::printf("validation: FAIL (%s)\n", st_mean.ToString().c_str());
    return false;
  }
  lk::ReferenceBce(a, &mean_ref, nullptr, nullptr);
  if (!lk::MakeCpuBackend()->Bce(a, {&mean_cpu, nullptr, nullptr}).ok()) return false;
  // Equal values (infinities included, when the data holds infinite logits) differ by 0.
  const double rel_ref = mean_gpu == static_cast<float>(mean_ref)
                             ? 0.0
                             : std::fabs(mean_gpu - mean_ref) / std::fabs(mean_ref);
  const double rel_cpu = mean_gpu == mean_cpu ? 0.0
                             : std::fabs(static_cast<double>(mean_gpu) - mean_cpu) /
                                   std::fabs(mean_cpu);
  const bool pass = e.Pass() && rel_ref <= 1e-6 && rel_cpu <= 1e-6;
  std::printf("validation%s (%lld float32 elements, weight [%lld], pos_weight [%lld]): %s\n",
              float_math ? " with CudaOptions::float_math" : "", static_cast<long long>(v.n),
              static_cast<long long>(v.c), static_cast<long long>(v.c), pass ? "PASS" : "FAIL");
  PrintElementErrors(e);
  std::printf("  MEAN rel err vs reference %.3g, vs CPU backend %.3g (<= 1e-6)\n", rel_ref,
              rel_cpu);
  return pass;
}

// cuda::LaunchBce with DeviceBce::float_math (the all-float element math) on the same data,
// with weight and pos_weight as full tensors.
bool ValidateFloatMath(const ValidationData& v) {
  float *x, *y, *w, *p, *l, *gx, *gy;
  const size_t fb = v.n * sizeof(float);
  for (float** q : {&x, &y, &w, &p, &l, &gx, &gy}) CHECK_CUDA(cudaMalloc(q, fb));
  std::vector<float> wfull(v.n), pfull(v.n);
  for (int64_t i = 0; i < v.n; ++i) {
    wfull[i] = v.w[i % v.c];
    pfull[i] = v.p[i % v.c];
  }
  CHECK_CUDA(cudaMemcpy(x, v.x.data(), fb, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(y, v.y.data(), fb, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(w, wfull.data(), fb, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(p, pfull.data(), fb, cudaMemcpyHostToDevice));
  lossd::kernels::cuda::DeviceBce d;
  d.numel = v.n;
  d.logits = x;
  d.targets = y;
  d.weight = {lk::DType::kFloat32, w, 1, v.n};
  d.pos_weight = {lk::DType::kFloat32, p, 1, v.n};
  d.reduction = lk::Reduction::kNone;
  d.loss = l;
  d.grad_logits = gx;
  d.grad_targets = gy;
  d.float_math = true;
  CHECK_CUDA(lossd::kernels::cuda::LaunchBce(d, nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<float> hl(v.n), hgx(v.n), hgy(v.n);
  CHECK_CUDA(cudaMemcpy(hl.data(), l, fb, cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(hgx.data(), gx, fb, cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(hgy.data(), gy, fb, cudaMemcpyDeviceToHost));
  for (float* q : {x, y, w, p, l, gx, gy}) CHECK_CUDA(cudaFree(q));
  const ElementErrors e = CompareElements(v, hl, hgx, hgy);
  std::printf("validation of DeviceBce::float_math (same data, full operands, LaunchBce): %s\n",
              e.Pass() ? "PASS" : "FAIL");
  PrintElementErrors(e);
  return e.Pass();
}

// The options (focal loss in the option kernel; ignore_index + normalize and label smoothing in
// the fused kernel) through the backend on
// the same data with every 9th target set to -100: per-element NONE losses within 4 ulp of the
// reference and MEAN within 1e-6 relative.
bool ValidateOptions(const ValidationData& v) {
  auto backend = lk::MakeCudaBackend();
  if (!backend.ok()) return false;
  std::vector<float> y = v.y;
  for (int64_t i = 0; i < v.n; i += 9) y[i] = -100.0f;
  bool all = true;
  for (int option = 0; option < 3; ++option) {
    int64_t worst = 0;
    double mean_rel = 0;
    for (lk::Reduction r : {lk::Reduction::kNone, lk::Reduction::kMean}) {
      lk::BceArgs a = v.Args(r);
      a.targets = y.data();
      std::vector<float> ys;
      if (option == 0) {
        a.loss = lk::Loss::kFocal;
        a.pos_weight = lk::Operand();
      }
      if (option == 1) {
        a.has_ignore_index = true;
        a.normalize = true;
      }
      if (option != 1) {  // -100 is an ordinary (out-of-range) label there: use 0
        ys = y;
        for (float& t : ys) t = t == -100.0f ? 0.0f : t;
        a.targets = ys.data();
      }
      if (option == 2) a.label_smoothing = 0.1;
      const int64_t nl = lk::LossCount(a);
      std::vector<float> l(nl);
      std::vector<double> rl(nl);
      if (!(*backend)->Bce(a, {l.data(), nullptr, nullptr}).ok()) return false;
      lk::ReferenceBce(a, rl.data(), nullptr, nullptr);
      if (r == lk::Reduction::kNone) {
        for (int64_t i = 0; i < nl; ++i) {
          worst = std::max(worst, UlpDistance(l[i], static_cast<float>(rl[i])));
        }
      } else {
        mean_rel = l[0] == static_cast<float>(rl[0]) ? 0.0 : std::fabs(l[0] - rl[0]) /
                                                               std::fabs(rl[0]);
      }
    }
    const char* names[] = {"focal (gamma 2, alpha 0.25)", "ignore_index + normalize",
                           "label smoothing 0.1"};
    const bool pass = worst <= 4 && mean_rel <= 1e-6;
    all = all && pass;
    std::printf("validation of the options, %s: %s (loss max %lld ulp, MEAN rel err %.3g)\n",
                names[option], pass ? "PASS" : "FAIL", static_cast<long long>(worst), mean_rel);
  }
  return all;
}

// 64 pseudo-random bits for element i.
__device__ uint64_t MixIndex(int64_t i, uint64_t seed) {
  uint64_t h = (static_cast<uint64_t>(i) + seed) * 0x9E3779B97F4A7C15ull;
  h ^= h >> 31;
  h *= 0xBF58476D1CE4E5B9ull;
  h ^= h >> 29;
  return h;
}

// Fills x with logits in [-20, 20] and y with 40% zeros, 40% ones, 20% uniform soft labels.
__global__ void FillInputs(float* x, float* y, int64_t n, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const uint64_t h = MixIndex(i, seed);
    const float u1 = static_cast<float>(h & 0xffffff) * 0x1p-24f;
    const float u2 = static_cast<float>((h >> 24) & 0xffffff) * 0x1p-24f;
    x[i] = 40.0f * u1 - 20.0f;
    y[i] = u2 < 0.4f ? 0.0f : u2 < 0.8f ? 1.0f : (u2 - 0.8f) * 5.0f;
  }
}

// Fills y with hard labels: half zeros, half ones.
__global__ void FillHardLabels(float* y, int64_t n, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    y[i] = static_cast<float>(MixIndex(i, seed) >> 63);
  }
}

__global__ void FillConst(float* p, int64_t n, float v) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    p[i] = v + 1e-3f * static_cast<float>(i % 97);
  }
}

// Average milliseconds per call of `body` over `iters` calls (after 3 warm-up calls).
template <typename F>
double TimeMs(int iters, F body) {
  for (int i = 0; i < 3; ++i) body();
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  CHECK_CUDA(cudaEventRecord(start));
  for (int i = 0; i < iters; ++i) body();
  CHECK_CUDA(cudaEventRecord(stop));
  CHECK_CUDA(cudaEventSynchronize(stop));
  float ms = 0;
  CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
  CHECK_CUDA(cudaEventDestroy(start));
  CHECK_CUDA(cudaEventDestroy(stop));
  return ms / iters;
}

// Seconds of host wall clock per call of `body` over `iters` calls (after 3 warm-up calls).
template <typename F>
double WallSeconds(int iters, F body) {
  for (int i = 0; i < 3; ++i) body();
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < iters; ++i) body();
  const std::chrono::duration<double> dt = std::chrono::steady_clock::now() - t0;
  return dt.count() / iters;
}

std::unique_ptr<lk::Backend> BackendWith(const lk::cuda::CudaBackendKnobs& knobs) {
  auto b = lk::cuda::MakeCudaBackendWithKnobs(lk::CudaOptions(), knobs);
  if (!b.ok()) {
    std::printf("backend: FAIL (%s)\n", b.status().ToString().c_str());
    return nullptr;
  }
  return std::move(*b);
}

// Part 3: BATCH and E2E lines. Returns false when a path's bits differ from its counterpart's.
bool BenchHostPaths(int64_t max_n) {
  bool ok = true;
  std::mt19937 rng(99);
  std::uniform_real_distribution<float> ux(-6.0f, 6.0f), uy(0.0f, 1.0f);
  // (a) 64 items of 1024 elements: one segmented launch against 64 calls.
  {
    constexpr int kItems = 64;
    constexpr int64_t kN = 1024;
    std::atomic<int64_t> launches{0};
    lk::cuda::CudaBackendKnobs knobs;
    knobs.segmented_launches = &launches;
    auto backend = BackendWith(knobs);
    if (backend == nullptr) return false;
    std::vector<std::vector<float>> x(kItems, std::vector<float>(kN)), y = x, g = x, g1 = x;
    std::vector<float> loss(kItems), loss1(kItems);
    std::vector<lk::BceArgs> args(kItems);
    std::vector<lk::BceOutputs> outs(kItems), outs1(kItems);
    std::vector<lk::BceItem> items(kItems);
    for (int i = 0; i < kItems; ++i) {
      for (int64_t j = 0; j < kN; ++j) {
        x[i][j] = ux(rng);
        y[i][j] = uy(rng);
      }
      args[i].numel = kN;
      args[i].logits = x[i].data();
      args[i].targets = y[i].data();
      args[i].reduction = lk::Reduction::kMean;
      outs[i] = {&loss[i], g[i].data(), nullptr};
      outs1[i] = {&loss1[i], g1[i].data(), nullptr};
      items[i] = {&args[i], &outs[i]};
    }
    auto batch = [&] {
      for (const absl::Status& st : backend->BceBatch(items)) {
        if (!st.ok()) {
          std::printf("BceBatch: FAIL (%s)\n", st.ToString().c_str());
          std::exit(1);
        }
      }
    };
    auto single = [&] {
      for (int i = 0; i < kItems; ++i) {
        const absl::Status st = backend->Bce(args[i], outs1[i]);
        if (!st.ok()) {
          std::printf("Bce: FAIL (%s)\n", st.ToString().c_str());
          std::exit(1);
        }
      }
    };
    batch();
    single();
    bool same = launches.load() > 0 && std::memcmp(loss.data(), loss1.data(), 4 * kItems) == 0;
    for (int i = 0; i < kItems; ++i) same = same && g[i] == g1[i];
    std::printf("\nsegmented batch (%d items of %lld float32, MEAN + grad_logits) bitwise "
                "equal to single calls: %s\n",
                kItems, static_cast<long long>(kN), same ? "PASS" : "FAIL");
    ok = ok && same;
    if (same) {
      const double tb = WallSeconds(200, batch), ts = WallSeconds(200, single);
      const double batch_cps = kItems / tb, single_cps = kItems / ts;
      std::printf("  BceBatch %.0f calls/s, Bce %.0f calls/s: %.2fx\n", batch_cps, single_cps,
                  batch_cps / single_cps);
      std::printf("BATCH %d %lld %.0f %.0f %.3f\n", kItems, static_cast<long long>(kN),
                  batch_cps, single_cps, batch_cps / single_cps);
    }
  }
  // (b) One large host request: pipelined, in one piece, and the kernel alone.
  {
    const int64_t n = std::min<int64_t>(int64_t{64} << 20, max_n);
    std::atomic<int64_t> chunked_runs{0};
    lk::cuda::CudaBackendKnobs knobs;
    knobs.chunked_runs = &chunked_runs;
    lk::cuda::CudaBackendKnobs whole;
    whole.chunked = false;
    auto pipelined = BackendWith(knobs);
    auto one_piece = BackendWith(whole);
    if (pipelined == nullptr || one_piece == nullptr) return false;
    std::vector<float> x(n), y(n), g(n), g1(n);
    for (int64_t j = 0; j < n; ++j) {
      x[j] = ux(rng);
      y[j] = uy(rng);
    }
    lk::BceArgs a;
    a.numel = n;
    a.logits = x.data();
    a.targets = y.data();
    a.reduction = lk::Reduction::kMean;
    float l = 0, l1 = 0;
    auto run = [&](lk::Backend* b, float* loss, float* grad) {
      const absl::Status st = b->Bce(a, {loss, grad, nullptr});
      if (!st.ok()) {
        std::printf("Bce: FAIL (%s)\n", st.ToString().c_str());
        std::exit(1);
      }
    };
    run(pipelined.get(), &l, g.data());
    run(one_piece.get(), &l1, g1.data());
    const bool same = chunked_runs.load() > 0 && std::memcmp(&l, &l1, 4) == 0 && g == g1;
    std::printf("\npinned chunk pipeline (%lld float32, MEAN + grad_logits) bitwise equal to "
                "one piece: %s\n",
                static_cast<long long>(n), same ? "PASS" : "FAIL");
    ok = ok && same;
    if (same) {
      const double tp = WallSeconds(5, [&] { run(pipelined.get(), &l, g.data()); });
      const double to = WallSeconds(5, [&] { run(one_piece.get(), &l1, g1.data()); });
      // The kernel alone on device copies of the same data.
      float *dx = nullptr, *dy = nullptr, *dg = nullptr;
      double* dsums = nullptr;
      CHECK_CUDA(cudaMalloc(&dx, n * 4));
      CHECK_CUDA(cudaMalloc(&dy, n * 4));
      CHECK_CUDA(cudaMalloc(&dg, n * 4));
      CHECK_CUDA(cudaMalloc(&dsums, lk::cuda::NumReduceBlocks(n) * sizeof(double)));
      CHECK_CUDA(cudaMemcpy(dx, x.data(), n * 4, cudaMemcpyHostToDevice));
      CHECK_CUDA(cudaMemcpy(dy, y.data(), n * 4, cudaMemcpyHostToDevice));
      lk::cuda::DeviceBce d;
      d.numel = n;
      d.logits = dx;
      d.targets = dy;
      d.reduction = lk::Reduction::kMean;
      d.grad_logits = dg;
      d.block_sums = dsums;
      d.float_math = true;
      const double tk = TimeMs(20, [&] { CHECK_CUDA(lk::cuda::LaunchBce(d, nullptr)); }) / 1e3;
      CHECK_CUDA(cudaDeviceSynchronize());
      for (void* q : {static_cast<void*>(dx), static_cast<void*>(dy), static_cast<void*>(dg),
                      static_cast<void*>(dsums)}) {
        CHECK_CUDA(cudaFree(q));
      }
      const double ep = n / tp / 1e9, eo = n / to / 1e9, ek = n / tk / 1e9;
      std::printf("  host->device->host: pipelined %.3f Gelem/s, one piece %.3f Gelem/s; "
                  "kernel alone %.3f Gelem/s; pipelined/kernel %.3f, pipelined/one piece %.2fx\n",
                  ep, eo, ek, ep / ek, ep / eo);
      std::printf("E2E %lld %.4f %.4f %.4f %.4f %.3f\n", static_cast<long long>(n), ep, eo, ek,
                  ep / ek, ep / eo);
    }
  }
  return ok;
}

struct Variant {
  const char* name;
  lk::Reduction reduction;
  int weights;  // 0 absent, 1 [C], 2 full tensors
  bool float_math = false;        // DeviceBce::float_math
  int64_t min_n = int64_t{1} << 20;  // smallest size timed
  // 1 focal (option kernel), 2 ignore_index + normalize, 3 smoothing (fused), 4 focal on hard
  // labels
  int option = 0;
};

}  // namespace

int main(int argc, char** argv) {
  int64_t max_n = int64_t{1} << 28;
  int64_t min_n = 0;
  const char* only = nullptr;
  bool validate = true;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--max-elements") == 0 && i + 1 < argc) {
      max_n = std::atoll(argv[++i]);
    } else if (std::strcmp(argv[i], "--min-elements") == 0 && i + 1 < argc) {
      min_n = std::atoll(argv[++i]);
    } else if (std::strcmp(argv[i], "--only") == 0 && i + 1 < argc) {
      only = argv[++i];
    } else if (std::strcmp(argv[i], "--skip-validation") == 0) {
      validate = false;
    } else {
      std::fprintf(stderr,
                   "usage: %s [--min-elements N] [--max-elements N] [--only VARIANT]"
                   " [--skip-validation]\n",
                   argv[0]);
      return 2;
    }
  }
  const int devices = lk::CudaDeviceCount();
  if (devices == 0) {
    std::printf("gpu_bench: no CUDA device; nothing to do\n");
    return 1;
  }
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s (sm_%d%d, %d SMs, %.1f GiB)\n", prop.name, prop.major, prop.minor,
              prop.multiProcessorCount, prop.totalGlobalMem / 1073741824.0);

  // Each element math is timed only when its validation passed.
  bool ok_mixed = true, ok_float = true, ok_options = true;
  if (validate) {
    const ValidationData v;
    ok_mixed = Validate(v, false);
    ok_float = Validate(v, true);
    ok_float = ValidateFloatMath(v) && ok_float;
    ok_options = ValidateOptions(v);
  }
  const bool ok = ok_mixed && ok_float && ok_options;

  // Device buffers for the largest size.
  const int64_t c = 64;
  const int64_t n_max = max_n;
  float *x, *y, *yh, *w, *p, *loss, *grad, *src, *dst;
  double *wc, *pc, *sums;  // [C] operands in double, as the backend uploads small operands
  float *wcf, *pcf;        // and in float, as it uploads them for the all-float kernel
  const size_t fb = n_max * sizeof(float);
  CHECK_CUDA(cudaMalloc(&x, fb));
  CHECK_CUDA(cudaMalloc(&y, fb));
  CHECK_CUDA(cudaMalloc(&yh, fb));
  CHECK_CUDA(cudaMalloc(&w, fb));
  CHECK_CUDA(cudaMalloc(&p, fb));
  CHECK_CUDA(cudaMalloc(&loss, fb));
  CHECK_CUDA(cudaMalloc(&grad, fb));
  CHECK_CUDA(cudaMalloc(&wc, c * sizeof(double)));
  CHECK_CUDA(cudaMalloc(&pc, c * sizeof(double)));
  CHECK_CUDA(cudaMalloc(&wcf, c * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&pcf, c * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&sums, lossd::kernels::cuda::NumReduceBlocks(n_max) * sizeof(double)));
  unsigned long long* ignored;  // the ignored-target count (ignnorm rows)
  CHECK_CUDA(cudaMalloc(&ignored, sizeof(unsigned long long)));
  const size_t copy_max = 3 * fb;  // half of the largest byte count (24 B/element)
  CHECK_CUDA(cudaMalloc(&src, copy_max));
  CHECK_CUDA(cudaMalloc(&dst, copy_max));
  FillInputs<<<1024, 256>>>(x, y, n_max, 7);
  FillHardLabels<<<1024, 256>>>(yh, n_max, 11);
  FillConst<<<1024, 256>>>(w, n_max, 0.5f);
  FillConst<<<1024, 256>>>(p, n_max, 2.0f);
  {
    // The same values (exact in float) in double and in float.
    std::vector<float> hf(c);
    for (const auto& [dst_d, dst_f, base] : {std::tuple{wc, wcf, 0.5}, std::tuple{pc, pcf, 2.0}}) {
      for (int64_t k = 0; k < c; ++k) hf[k] = static_cast<float>(base + 1e-3 * k);
      const std::vector<double> hd(hf.begin(), hf.end());
      CHECK_CUDA(cudaMemcpy(dst_d, hd.data(), c * sizeof(double), cudaMemcpyHostToDevice));
      CHECK_CUDA(cudaMemcpy(dst_f, hf.data(), c * sizeof(float), cudaMemcpyHostToDevice));
    }
  }
  CHECK_CUDA(cudaMemset(src, 0x3c, copy_max));
  CHECK_CUDA(cudaGetLastError());
  CHECK_CUDA(cudaDeviceSynchronize());

  const Variant variants[] = {
      {"none/noweight", lk::Reduction::kNone, 0},
      {"none/wC", lk::Reduction::kNone, 1},
      {"none/wfull", lk::Reduction::kNone, 2},
      {"mean/wC", lk::Reduction::kMean, 1},
      // The same problems with the all-float element math, from 16M elements.
      {"none/noweight/f32", lk::Reduction::kNone, 0, true, int64_t{1} << 24},
      {"none/wC/f32", lk::Reduction::kNone, 1, true, int64_t{1} << 24},
      {"none/wfull/f32", lk::Reduction::kNone, 2, true, int64_t{1} << 24},
      {"mean/wC/f32", lk::Reduction::kMean, 1, true, int64_t{1} << 24},
      // From 16M elements: ignore_index (-100) + normalize (the count kernel included) and
      // label smoothing 0.1 in the fused all-float kernel; focal loss (no pos_weight) in the
      // option kernel (double math).
      {"ignnorm/mean/wC/f32", lk::Reduction::kMean, 1, true, int64_t{1} << 24, 2},
      {"smooth/mean/wC/f32", lk::Reduction::kMean, 1, true, int64_t{1} << 24, 3},
      {"focal/none", lk::Reduction::kNone, 0, false, int64_t{1} << 24, 1},
      {"focal/none/hard", lk::Reduction::kNone, 0, false, int64_t{1} << 24, 4},
  };
  std::printf("\nfused loss+grad_logits kernel vs device-to-device copy of the same bytes\n");
  std::printf("%-18s %11s %8s %11s %10s %7s %9s\n", "variant", "elements", "B/elem", "kernel GB/s",
              "copy GB/s", "ratio", "Gelem/s");
  for (const Variant& v : variants) {
    if (only != nullptr && std::strcmp(only, v.name) != 0) continue;
    if (!(v.option != 0 ? ok_options && (!v.float_math || ok_float)
                        : v.float_math ? ok_float : ok_mixed)) {
      std::printf("%-18s not timed: its validation failed\n", v.name);
      continue;
    }
    for (int64_t n = std::max(v.min_n, min_n); n <= n_max; n *= 4) {
      lossd::kernels::cuda::DeviceBce d;
      d.numel = n;
      d.float_math = v.float_math;
      d.logits = x;
      d.targets = y;
      d.reduction = v.reduction;
      if (v.weights == 1 && v.float_math) {
        d.weight = {lk::DType::kFloat32, wcf, 1, c};
        d.pos_weight = {lk::DType::kFloat32, pcf, 1, c};
      } else if (v.weights == 1) {
        d.weight = {lk::DType::kFloat64, wc, 1, c};
        d.pos_weight = {lk::DType::kFloat64, pc, 1, c};
      } else if (v.weights == 2) {
        d.weight = {lk::DType::kFloat32, w, 1, n};
        d.pos_weight = {lk::DType::kFloat32, p, 1, n};
      }
      d.grad_logits = grad;
      double bytes_per = 12;  // x, y read; grad written
      if (v.reduction == lk::Reduction::kNone) {
        d.loss = loss;
        bytes_per += 4;
      } else {
        d.block_sums = sums;
      }
      if (v.weights == 2) bytes_per += 8;
      if (v.option == 2) bytes_per += 4;  // the count kernel reads the targets once more
      const double bytes = bytes_per * n;
      const int iters = static_cast<int>(std::clamp(4e9 / bytes, 10.0, 400.0));
      const bool fused = v.option != 1 && v.option != 4;
      // The loss options as the backend passes them: resolved from a loss spec.
      lk::BceArgs spec;
      if (v.option == 2) {  // no target is -100 here: the count stays numel
        spec.has_ignore_index = true;
        spec.ignore_index = -100.0;
        d.count = static_cast<double>(n);
      }
      if (v.option == 3) spec.label_smoothing = 0.1;
      d.element = lossd::kernels::internal::ResolveLoss(spec).element;
      lossd::kernels::cuda::DeviceGeneric g;  // the option kernel: focal loss
      if (!fused) {
        g.numel = n;
        g.logits = x;
        g.targets = v.option == 4 ? yh : y;
        g.weight = d.weight;
        g.pos_weight = d.pos_weight;
        g.reduction = v.reduction;
        spec.loss = lk::Loss::kFocal;
        g.opts = lossd::kernels::internal::ResolveLoss(spec).element;
        g.grad_extra = v.reduction == lk::Reduction::kMean ? static_cast<double>(n) : 1.0;
        g.loss = d.loss;
        g.block_sums = d.block_sums;
        g.grad_logits = grad;
      }
      const double kernel_ms = TimeMs(iters, [&] {
        if (v.option == 2) {
          CHECK_CUDA(lossd::kernels::cuda::LaunchCountIgnored(lk::DType::kFloat32, y, -100.0, n,
                                                              ignored, nullptr));
        }
        CHECK_CUDA(fused ? lossd::kernels::cuda::LaunchBce(d, nullptr)
                         : lossd::kernels::cuda::LaunchGeneric(g, nullptr));
      });
      const size_t half = static_cast<size_t>(bytes / 2);
      const double copy_ms = TimeMs(iters, [&] {
        CHECK_CUDA(cudaMemcpyAsync(dst, src, half, cudaMemcpyDeviceToDevice, nullptr));
      });
      CHECK_CUDA(cudaDeviceSynchronize());
      const double kgbps = bytes / kernel_ms / 1e6;
      const double cgbps = 2.0 * half / copy_ms / 1e6;
      const double gelem = n / kernel_ms / 1e6;
      std::printf("%-18s %11lld %8.0f %11.1f %10.1f %7.3f %9.2f\n", v.name,
                  static_cast<long long>(n), bytes_per, kgbps, cgbps, kgbps / cgbps, gelem);
      std::printf("RESULT %s %lld %.2f %.2f %.4f\n", v.name, static_cast<long long>(n), kgbps,
                  cgbps, gelem);
    }
  }
  for (void* q : {static_cast<void*>(x), static_cast<void*>(y), static_cast<void*>(yh),
                  static_cast<void*>(w), static_cast<void*>(p), static_cast<void*>(wc),
                  static_cast<void*>(pc),
                  static_cast<void*>(wcf), static_cast<void*>(pcf),
                  static_cast<void*>(loss), static_cast<void*>(grad), static_cast<void*>(src),
                  static_cast<void*>(dst), static_cast<void*>(sums),
                  static_cast<void*>(ignored)}) {
    CHECK_CUDA(cudaFree(q));
  }
  bool ok_host = true;
  if (only == nullptr || std::strcmp(only, "host") == 0) ok_host = BenchHostPaths(max_n);
  std::printf("\ngpu_bench: %s\n", ok && ok_host ? "PASS" : "FAIL");
  return ok && ok_host ? 0 : 1;
}
