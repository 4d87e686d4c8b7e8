// lossd_bench_kernel: the CPU backend alone on the service benchmark's request shape: BCE with
// logits, float32 logits [n/64, 64] (or [n] when 64 does not divide n), targets 0/1, no
// weights, REDUCTION_NONE with dl/dx. Each call writes the loss and dl/dx into buffers
// allocated once, as a training step's loss evaluation would.
//
//   lossd_bench_kernel --threads=2 --elements=1048576 --seconds=1
//       one measurement, one line on stdout (below)
//   lossd_bench_kernel --threads=2 --serve
//       prints "kernel simd_target=TARGET threads=T", then reads "ELEMENTS SECONDS MIN_CALLS"
//       lines on stdin and answers each with one line; keeps the buffers of each size between
//       measurements (the benchmark interleaves these with its service measurements)
//
// Output line: "kernel elements=N threads=T calls=K seconds=S p50_us=P mean_us=M"; calls run
// back to back after one untimed warm-up call, until SECONDS have passed and at least MIN_CALLS
// calls were made.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "lossd/kernels/backend.h"
#include "lossd/kernels/bce.h"

ABSL_FLAG(int, threads, 1, "Threads of the CPU backend (the server's --cpu_threads).");
ABSL_FLAG(int64_t, elements, 1 << 20, "Elements per call (one-shot mode).");
ABSL_FLAG(double, seconds, 1.0, "Least measuring time (one-shot mode).");
ABSL_FLAG(int, min_calls, 3, "Least timed calls (one-shot mode).");
ABSL_FLAG(bool, serve, false, "Read ELEMENTS SECONDS MIN_CALLS lines on stdin.");

namespace {

using Clock = std::chrono::steady_clock;

struct Buffers {
  std::vector<float> x, y, loss, grad;
  int64_t cols = 1;
};

Buffers MakeBuffers(int64_t n) {
  Buffers b;
  b.cols = (n >= 64 && n % 64 == 0) ? 64 : 1;
  b.x.resize(n);
  b.y.resize(n);
  b.loss.resize(n);
  b.grad.resize(n);
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> u(-4, 4);
  for (int64_t i = 0; i < n; ++i) {
    b.x[i] = u(rng);
    b.y[i] = static_cast<float>(i % 2);
  }
  return b;
}

bool Measure(lossd::kernels::Backend& cpu, Buffers& b, int64_t n, double seconds, int min_calls,
             int threads) {
  lossd::kernels::BceArgs a;
  a.numel = n;
  a.logits = b.x.data();
  a.targets = b.y.data();
  a.reduction = lossd::kernels::Reduction::kNone;
  a.last_dim = b.cols;
  const lossd::kernels::BceOutputs out{b.loss.data(), b.grad.data(), nullptr};
  if (auto s = cpu.Bce(a, out); !s.ok()) {  // warm-up
    std::fprintf(stderr, "lossd_bench_kernel: %s\n", s.ToString().c_str());
    return false;
  }
  std::vector<double> us;
  const auto start = Clock::now();
  double elapsed = 0;
  while (elapsed < seconds || static_cast<int>(us.size()) < min_calls) {
    const auto t0 = Clock::now();
    (void)cpu.Bce(a, out);
    const auto t1 = Clock::now();
    us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
    elapsed = std::chrono::duration<double>(t1 - start).count();
  }
  double sum = 0;
  for (double v : us) sum += v;
  std::vector<double> sorted = us;
  std::nth_element(sorted.begin(), sorted.begin() + sorted.size() / 2, sorted.end());
  std::printf("kernel elements=%lld threads=%d calls=%zu seconds=%.6f p50_us=%.3f mean_us=%.3f\n",
              static_cast<long long>(n), threads, us.size(), elapsed, sorted[sorted.size() / 2],
              sum / us.size());
  std::fflush(stdout);
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("The lossd CPU backend alone on the service benchmark's shape.");
  absl::ParseCommandLine(argc, argv);
  const int threads = absl::GetFlag(FLAGS_threads);
  auto cpu = lossd::kernels::MakeCpuBackend({threads});
  if (!absl::GetFlag(FLAGS_serve)) {
    const int64_t n = absl::GetFlag(FLAGS_elements);
    Buffers b = MakeBuffers(n);
    return Measure(*cpu, b, n, absl::GetFlag(FLAGS_seconds), absl::GetFlag(FLAGS_min_calls),
                   threads)
               ? 0
               : 1;
  }
  std::printf("kernel simd_target=%s threads=%d\n", lossd::kernels::CpuSimdTarget().c_str(),
              threads);
  std::fflush(stdout);
  std::map<int64_t, Buffers> cache;
  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream in(line);
    int64_t n = 0;
    double seconds = 0;
    int min_calls = 1;
    if (!(in >> n >> seconds >> min_calls) || n <= 0) {
      std::printf("error: expected ELEMENTS SECONDS MIN_CALLS, got \"%s\"\n", line.c_str());
      std::fflush(stdout);
      continue;
    }
    auto it = cache.find(n);
    if (it == cache.end()) it = cache.emplace(n, MakeBuffers(n)).first;
    if (!Measure(*cpu, it->second, n, seconds, min_calls, threads)) return 1;
  }
  return 0;
}
