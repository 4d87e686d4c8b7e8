// CPU kernel benchmark: elements/s and GB/s of the fused BCE kernels beside a
// 2-read-2-write streaming loop measured in the same process, for 1 and 2 threads.
// Usage: cpu_bench [--n=10000000] [--reps=7] [--only=SUBSTRING (rows whose name has it)]
//                  [--simd_target=native|avx2|avx3] [--block]
// --block: only the SIMD block kernels on 2048 elements in cache (internal::BceBlock per
// operand shape, and internal::FocalBlock), one thread: the fastest of many timed loops, which a
// shared machine's load disturbs far less than the 10M-element figures (for comparing builds
// and targets).
// --simd_target (or the environment variable LOSSD_SIMD_TARGET) limits Highway's run-time
// dispatch: avx2 disables the AVX-512 targets, so one AVX-512 machine measures both paths.
// Speed is reported as ratios against the streaming loop (the memory ceiling of this machine),
// which runs alternately with each kernel so that both see the same machine state.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "lossd/kernels/backend.h"
#include "lossd/kernels/correctly_rounded.h"
#include "lossd/kernels/bce.h"
#include "lossd/kernels/dtype.h"
#include "lossd/kernels/operand.h"
#include "kernels/src/simd_block.h"

namespace {

using Clock = std::chrono::steady_clock;
using lossd::kernels::BceArgs;
using lossd::kernels::BceOutputs;
using lossd::kernels::DType;
using lossd::kernels::Reduction;

double Seconds(const std::function<void()>& fn) {
  const auto a = Clock::now();
  fn();
  return std::chrono::duration<double>(Clock::now() - a).count();
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct Paired {
  double kernel_s;  // median kernel time
  double ratio;     // median over rounds of stream time / kernel time
};

// Alternates the streaming loop and the kernel, round by round, so that both see the same
// machine state (shared machines drift by tens of percent between seconds).
Paired TimePaired(int reps, const std::function<void()>& stream,
                  const std::function<void()>& kernel, std::vector<double>* stream_times) {
  stream();  // warm-up: page faults, caches
  kernel();
  std::vector<double> tk, ratio;
  for (int r = 0; r < reps; ++r) {
    const double ts = Seconds(stream);
    const double t = Seconds(kernel);
    stream_times->push_back(ts);
    tk.push_back(t);
    ratio.push_back(ts / t);
  }
  return {Median(tk), Median(ratio)};
}

// out1 = a + b, out2 = a * b over [0, n) split across `threads` threads.
void Stream(int threads, const float* a, const float* b, float* o1, float* o2, int64_t n) {
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; ++t) {
    ts.emplace_back([=] {
      const int64_t lo = n * t / threads, hi = n * (t + 1) / threads;
      for (int64_t i = lo; i < hi; ++i) {
        o1[i] = a[i] + b[i];
        o2[i] = a[i] * b[i];
      }
    });
  }
  for (auto& th : ts) th.join();
}

// --block: internal::BceBlock alone on kBlock elements that stay in L1, per operand shape, and
// internal::FocalBlock.
void BlockBench(int reps) {
  using lossd::kernels::internal::BlockArgs;
  constexpr int64_t kBlock = 2048;
  std::mt19937 rng(2);
  std::uniform_real_distribution<float> ux(-8, 8), u01(0, 1), uw(0.5f, 3);
  std::vector<float> x(kBlock), y(kBlock), w(kBlock), p(kBlock), l(kBlock), gx(kBlock),
      gy(kBlock);
  for (int64_t i = 0; i < kBlock; ++i) {
    x[i] = ux(rng);
    y[i] = u01(rng) < 0.5f ? 0.0f : 1.0f;
    w[i] = uw(rng);
    p[i] = uw(rng);
  }
  struct Shape {
    const char* name;
    bool w, p, gx, gy, scale;
  };
  const Shape shapes[] = {
      {"block: loss+grad, weight pos_weight", true, true, true, false, false},
      {"block: loss+grad, no weights", false, false, true, false, false},
      {"block: loss only, weight pos_weight", true, true, false, false, false},
      {"block: mean+grad, weight pos_weight", true, true, true, false, true},
      {"block: loss+grad+grad_y, weight pos_weight", true, true, true, true, false},
  };
  // Melem/s of `calls` calls of block(): the fastest of 5 x reps timed loops.
  const auto rate = [&](int calls, const auto& block) {
    double best = 1e30;
    for (int r = 0; r < std::max(reps, 1) * 5; ++r) {
      best = std::min(best, Seconds([&] {
                        for (int c = 0; c < calls; ++c) block();
                      }));
    }
    return kBlock * calls / best / 1e6;
  };
  std::printf("%-44s %10s\n", "variant (in cache, 1 thread)", "Melem/s");
  for (const Shape& sh : shapes) {
    BlockArgs<float> a;
    a.x = x.data();
    a.y = y.data();
    a.w = sh.w ? w.data() : nullptr;
    a.p = sh.p ? p.data() : nullptr;
    a.n = kBlock;
    a.loss = l.data();
    a.gx = sh.gx ? gx.data() : nullptr;
    a.gy = sh.gy ? gy.data() : nullptr;
    a.grad_divisor = sh.scale ? 10000000.0f : 1.0f;
    std::printf("%-44s %10.1f\n", sh.name,
                rate(200, [&] { lossd::kernels::internal::BceBlock(a); }));
  }
  // internal::FocalBlock (double lanes, as the CPU backend calls it for float inputs): gamma 2
  // with the weight, hard and mixed targets (40% 0, 40% 1, 20% uniform in (0, 1)).
  std::vector<double> xd(kBlock), yd(kBlock), ymd(kBlock), wd(kBlock), ld(kBlock), gd(kBlock);
  for (int64_t i = 0; i < kBlock; ++i) {
    xd[i] = x[i];
    yd[i] = y[i];
    wd[i] = w[i];
    const float u = u01(rng);
    ymd[i] = u < 0.4f ? 0.0 : u < 0.8f ? 1.0 : u01(rng);
  }
  for (const bool mixed : {false, true}) {
    lossd::kernels::internal::FocalBlockArgs a;
    a.x = xd.data();
    a.y = mixed ? ymd.data() : yd.data();
    a.w = wd.data();
    a.n = kBlock;
    a.alpha = 0.25;
    a.gamma = 2.0;
    a.loss = ld.data();
    a.gx = gd.data();
    std::printf("%-44s %10.1f\n",
                mixed ? "block: focal loss+grad, weight, mixed y" : "block: focal loss+grad, weight",
                rate(50, [&] { lossd::kernels::internal::FocalBlock(a); }));
  }
}

}  // namespace

int main(int argc, char** argv) {
  int64_t n = 10'000'000;
  int reps = 7;
  const char* only = "";
  bool block = false;
  const char* simd_target = std::getenv("LOSSD_SIMD_TARGET");
  if (simd_target == nullptr || *simd_target == '\0') simd_target = "native";
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--simd_target=", 14) == 0) simd_target = argv[i] + 14;
    if (std::strcmp(argv[i], "--block") == 0) block = true;
    if (std::strncmp(argv[i], "--n=", 4) == 0) n = std::atoll(argv[i] + 4);
    if (std::strncmp(argv[i], "--reps=", 7) == 0) reps = std::atoi(argv[i] + 7);
    if (std::strncmp(argv[i], "--only=", 7) == 0) only = argv[i] + 7;
  }
  if (!lossd::kernels::internal::LimitSimdTargets(simd_target)) {
    std::fprintf(stderr, "cpu_bench: --simd_target=%s: unknown or not supported by this CPU\n",
                 simd_target);
    return 2;
  }
  if (block) {
    std::printf("lossd cpu_bench --block: SIMD target %s (--simd_target=%s)\n",
                lossd::kernels::internal::BceBlockTargetName(), simd_target);
    BlockBench(reps);
    return 0;
  }
  const int64_t C = 64;
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> ux(-8, 8), u01(0, 1), uw(0.5f, 3);
  std::vector<float> x(n), y(n), ym(n), w(C), p(C), wf(n), pf(n), o1(n), o2(n), o3(n);
  for (int64_t i = 0; i < n; ++i) {
    x[i] = ux(rng);
    y[i] = u01(rng) < 0.5f ? 0.0f : 1.0f;
    wf[i] = uw(rng);
    pf[i] = uw(rng);
  }
  for (int64_t c = 0; c < C; ++c) {
    w[c] = uw(rng);
    p[c] = uw(rng);
  }
  // Targets of the mixed focal row (as in gpu_bench): 40% 0, 40% 1, 20% uniform in (0, 1).
  for (int64_t i = 0; i < n; ++i) {
    const float u = u01(rng);
    ym[i] = u < 0.4f ? 0.0f : u < 0.8f ? 1.0f : u01(rng);
  }
  const int hw = static_cast<int>(std::thread::hardware_concurrency());
  std::printf(
      "lossd cpu_bench: n=%lld float32, SIMD target %s (--simd_target=%s), %d hardware "
      "threads\n",
      static_cast<long long>(n), lossd::kernels::internal::BceBlockTargetName(), simd_target, hw);
  std::printf("%-44s %7s %10s %9s %9s\n", "variant", "threads", "Melem/s", "GB/s", "vs stream");

  for (int threads : {1, 2}) {
    const auto stream = [&] { Stream(threads, x.data(), y.data(), o1.data(), o2.data(), n); };
    std::vector<double> stream_times;
    auto cpu = lossd::kernels::MakeCpuBackend({threads});
    struct Variant {
      const char* name;
      bool weights, full, grad, reduce, grad_y;
      int reads, writes;  // float32 streams
      bool focal = false;  // sigmoid focal loss, alpha 0.25, gamma 2, targets 0 or 1; no pos_weight
      bool mixed = false;  // targets ym instead: hard and soft labels
      bool per_sample = false;  // Keras's per-sample mean over the last axis (C) instead of MEAN
    };
    const Variant variants[] = {
        {"loss+grad, weight[C] pos_weight[C] (main)", true, false, true, false, false, 2, 2},
        {"loss+grad, no weights", false, false, true, false, false, 2, 2},
        {"loss only, weight[C] pos_weight[C]", true, false, false, false, false, 2, 1},
        {"mean+grad, weight[C] pos_weight[C]", true, false, true, true, false, 2, 1},
        {"loss+grad, full-shape weight and pos_weight", true, true, true, false, false, 4, 2},
        {"loss+grad+grad_y, weight[C] pos_weight[C]", true, false, true, false, true, 2, 3},
        {"focal loss+grad, weight[C], gamma 2", true, false, true, false, false, 2, 2, true},
        {"focal loss+grad, weight[C], gamma 2, mixed y", true, false, true, false, false, 2, 2,
         true, true},
        {"per-sample mean+grad, weight/pos_weight[C]", true, false, true, true, false, 2, 1,
         false, false, true},
    };
    for (const Variant& v : variants) {
      if (std::strstr(v.name, only) == nullptr) continue;
      BceArgs a;
      a.numel = n;
      a.logits = x.data();
      a.targets = v.mixed ? ym.data() : y.data();
      if (v.weights) {
        if (v.full) {
          a.weight = *lossd::kernels::MakeOperand("weight", DType::kFloat32, wf.data(), {n}, {n});
          a.pos_weight =
              *lossd::kernels::MakeOperand("pos_weight", DType::kFloat32, pf.data(), {n}, {n});
        } else {
          a.weight =
              *lossd::kernels::MakeOperand("weight", DType::kFloat32, w.data(), {C}, {n / C, C});
          if (!v.focal) {
            a.pos_weight = *lossd::kernels::MakeOperand("pos_weight", DType::kFloat32, p.data(),
                                                        {C}, {n / C, C});
          }
        }
      }
      if (v.focal) a.loss = lossd::kernels::Loss::kFocal;
      a.reduction = v.per_sample ? Reduction::kPerSampleMean
                    : v.reduce     ? Reduction::kMean
                                   : Reduction::kNone;
      a.last_dim = C;
      float scalar;
      // Per-sample mean writes n / C row means into o1 (not counted in the bytes).
      BceOutputs out{v.reduce && !v.per_sample ? &scalar : o1.data(),
                     v.grad ? o2.data() : nullptr, v.grad_y ? o3.data() : nullptr};
      const Paired r = TimePaired(
          reps, stream, [&] { (void)cpu->Bce(a, out); }, &stream_times);
      const double t = r.kernel_s;
      const double gbs = 4.0 * (v.reads + v.writes) * n / t / 1e9;
      std::printf("%-44s %7d %10.1f %9.2f %9.2f\n", v.name, threads, n / t / 1e6, gbs, r.ratio);
    }
    if (stream_times.empty()) continue;  // --only matched no variant
    const double ts = Median(stream_times);
    std::printf("%-44s %7d %10.1f %9.2f %9s\n", "stream 2-read-2-write (a+b, a*b)", threads,
                n / ts / 1e6, 16.0 * n / ts / 1e9, "1.00");
  }
  std::printf(
      "(vs stream: median over rounds of the streaming loop's time over the kernel's time, the "
      "two\n"
      " run alternately with the same threads; the stream row is the median of all its rounds)\n");

  // The correctly rounded mode (docs/kernels.md section 8) against the default on the main
  // variant (loss + dl/dx, weight[C], pos_weight[C]; hard labels) and on mixed labels, on the
  // first n_cr elements, both timed alternately in this run; "x" is the median over rounds of
  // the correctly rounded time over the default's.
  if (std::strstr("correctly rounded", only) != nullptr || *only == '\0') {
    const int64_t n_cr = std::min<int64_t>(n, 1'000'000);
    for (int threads : {1, 2}) {
      auto cpu = lossd::kernels::MakeCpuBackend({threads});
      for (bool soft : {false, true}) {
        BceArgs a;
        a.numel = n_cr;
        a.logits = x.data();
        a.targets = soft ? ym.data() : y.data();
        a.weight = *lossd::kernels::MakeOperand("weight", DType::kFloat32, w.data(), {C},
                                                {n_cr / C, C});
        a.pos_weight = *lossd::kernels::MakeOperand("pos_weight", DType::kFloat32, p.data(), {C},
                                                    {n_cr / C, C});
        a.reduction = Reduction::kNone;
        BceOutputs out{o1.data(), o2.data(), nullptr};
        BceArgs cr = a;
        std::vector<double> default_times;
        cr.precision = lossd::kernels::Precision::kCorrectlyRounded;
        const lossd::kernels::CorrectlyRoundedStats before =
            lossd::kernels::GetCorrectlyRoundedStats();
        const Paired r = TimePaired(
            std::max(3, reps / 2), [&] { (void)cpu->Bce(a, out); },
            [&] { (void)cpu->Bce(cr, out); }, &default_times);
        const lossd::kernels::CorrectlyRoundedStats after =
            lossd::kernels::GetCorrectlyRoundedStats();
        const double outputs = static_cast<double>(after.fast_outputs - before.fast_outputs +
                                                   after.fallback_outputs -
                                                   before.fallback_outputs);
        std::printf(
            "correctly rounded, main variant%s, n=%lld, %d threads: %.1f Melem/s, %.1fx the "
            "default's time; MPFR fallback %.2e of outputs\n",
            soft ? " (mixed y)" : "", static_cast<long long>(n_cr), threads,
            n_cr / r.kernel_s / 1e6, 1.0 / r.ratio,
            static_cast<double>(after.fallback_outputs - before.fallback_outputs) /
                std::max(outputs, 1.0));
      }
    }
  }
  return 0;
}
