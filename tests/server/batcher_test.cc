// Dynamic batching of small CUDA requests (server/batcher.h; docs/design.md section 1,
// "Dynamic batching of small CUDA requests"), on the host: a fake backend stands for the CUDA
// one, records every BceBatch call and computes with the real CPU backend, staging each batch
// the way a segmented launch would (inputs packed into one buffer, segments computed out of
// order, outputs copied back). Covered: gathering by delay, closing by the element cap,
// batch keys, per-request errors, cancelled and expired calls, determinism (the same request
// alone and in 100 batches gives the same bits), and the Executor routing CUDA work through it.
#include "server/batcher.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "lossd/kernels/backend.h"
#include "server/executor.h"
#include "server/metrics.h"
#include "server/request.h"
#include "tests/server/test_server_util.h"

namespace lossd::server {
namespace {

using kernels::BceArgs;
using kernels::BceItem;
using kernels::BceOutputs;

// Stands for the CUDA backend: "cuda", computes with the CPU backend, records each call.
class FakeCudaBackend final : public kernels::Backend {
 public:
  FakeCudaBackend() : cpu_(kernels::MakeCpuBackend({1})) {}
  std::string Name() const override { return "cuda"; }

  absl::Status Bce(const BceArgs& args, const BceOutputs& out) override {
    {
      absl::MutexLock lock(&mu_);
      ++lone_calls_;
    }
    return cpu_->Bce(args, out);
  }

  // Like a one-launch segmented override: every item's inputs are packed into one staging
  // buffer (64-byte aligned segments), the segments are computed in reverse order from the
  // copies into packed outputs, which are then copied back to each item. Items whose numel is
  // fail_numel fail with INTERNAL.
  std::vector<absl::Status> BceBatch(const std::vector<BceItem>& items) override {
    {
      absl::MutexLock lock(&mu_);
      std::vector<BatchKey> keys;
      for (const BceItem& item : items) keys.push_back(BatchKeyOf(*item.args, *item.out));
      batches_.push_back(keys);
    }
    auto align = [](size_t n) { return (n + 63) & ~size_t{63}; };
    struct Seg {
      size_t x, y, loss, gl, gt;
    };
    std::vector<Seg> segs(items.size());
    size_t total = 0;
    for (size_t i = 0; i < items.size(); ++i) {
      const BceArgs& a = *items[i].args;
      const size_t n = static_cast<size_t>(a.numel), isz = kernels::ItemSize(a.dtype);
      segs[i].x = total;
      total += align(n * isz);
      segs[i].y = total;
      total += align(n * kernels::ItemSize(a.targets_dtype));
      segs[i].loss = total;
      total += align(static_cast<size_t>(kernels::LossCount(a)) * isz);
      segs[i].gl = total;
      total += align(n * isz);
      segs[i].gt = total;
      total += align(n * isz);
    }
    std::vector<unsigned char> storage(total + 64);
    unsigned char* base = storage.data() + (64 - reinterpret_cast<uintptr_t>(storage.data()) % 64);
    for (size_t i = 0; i < items.size(); ++i) {  // "copy in"
      const BceArgs& a = *items[i].args;
      std::memcpy(base + segs[i].x, a.logits, a.numel * kernels::ItemSize(a.dtype));
      std::memcpy(base + segs[i].y, a.targets, a.numel * kernels::ItemSize(a.targets_dtype));
    }
    std::vector<absl::Status> statuses(items.size());
    for (size_t j = items.size(); j-- > 0;) {  // the segments, out of order
      const BceArgs& a = *items[j].args;
      const BceOutputs& o = *items[j].out;
      if (a.numel == fail_numel) {
        statuses[j] = absl::InternalError("injected device failure");
        continue;
      }
      BceArgs staged = a;
      staged.logits = base + segs[j].x;
      staged.targets = base + segs[j].y;
      BceOutputs so = o;
      if (o.loss != nullptr) so.loss = base + segs[j].loss;
      if (o.grad_logits != nullptr) so.grad_logits = base + segs[j].gl;
      if (o.grad_targets != nullptr) so.grad_targets = base + segs[j].gt;
      statuses[j] = cpu_->Bce(staged, so);
      if (!statuses[j].ok()) continue;
      const size_t isz = kernels::ItemSize(a.dtype);  // "copy out"
      if (o.loss != nullptr) std::memcpy(o.loss, so.loss, kernels::LossCount(a) * isz);
      if (o.grad_logits != nullptr) std::memcpy(o.grad_logits, so.grad_logits, a.numel * isz);
      if (o.grad_targets != nullptr) std::memcpy(o.grad_targets, so.grad_targets, a.numel * isz);
    }
    return statuses;
  }

  std::vector<std::vector<BatchKey>> batches() const {
    absl::MutexLock lock(&mu_);
    return batches_;
  }
  std::vector<size_t> batch_sizes() const {
    std::vector<size_t> sizes;
    for (const auto& b : batches()) sizes.push_back(b.size());
    std::sort(sizes.begin(), sizes.end());
    return sizes;
  }
  int64_t lone_calls() const {
    absl::MutexLock lock(&mu_);
    return lone_calls_;
  }

  int64_t fail_numel = -1;

 private:
  std::unique_ptr<kernels::Backend> cpu_;
  mutable absl::Mutex mu_;
  std::vector<std::vector<BatchKey>> batches_;
  int64_t lone_calls_ = 0;
};

// One request's inputs and output buffers: float32 rows x cols, weight and pos_weight [cols].
struct Problem {
  Problem(int64_t rows, int64_t cols, uint64_t seed,
          kernels::Reduction reduction = kernels::Reduction::kMean) {
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<float> ux(-6, 6), u(0, 1);
    const int64_t n = rows * cols;
    x.resize(n);
    y.resize(n);
    w.resize(cols);
    p.resize(cols);
    for (int64_t i = 0; i < n; ++i) {
      x[i] = ux(rng);
      y[i] = u(rng) < 0.3f ? 0.0f : u(rng) < 0.5f ? 1.0f : u(rng);
    }
    for (int64_t c = 0; c < cols; ++c) {
      w[c] = 0.5f + u(rng);
      p[c] = 0.5f + 2 * u(rng);
    }
    args.numel = n;
    args.logits = x.data();
    args.targets = y.data();
    args.weight = kernels::Operand{kernels::DType::kFloat32, w.data(), 1, cols, nullptr};
    args.pos_weight = kernels::Operand{kernels::DType::kFloat32, p.data(), 1, cols, nullptr};
    args.reduction = reduction;
    args.last_dim = cols;
    loss.assign(kernels::LossCount(args), -1.0f);
    grad_logits.assign(n, -1.0f);
    grad_targets.assign(n, -1.0f);
    out.loss = loss.data();
    out.grad_logits = grad_logits.data();
    out.grad_targets = grad_targets.data();
  }
  std::vector<float> x, y, w, p, loss, grad_logits, grad_targets;
  BceArgs args;
  BceOutputs out;
};

bool SameBits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

void ExpectSameResults(const Problem& expected, const Problem& got) {
  EXPECT_TRUE(SameBits(expected.loss, got.loss));
  EXPECT_TRUE(SameBits(expected.grad_logits, got.grad_logits));
  EXPECT_TRUE(SameBits(expected.grad_targets, got.grad_targets));
}

// A copy of `problem` with its own buffers, its outputs not computed yet.
Problem Fresh(const Problem& problem) {
  Problem fresh = problem;
  fresh.args.logits = fresh.x.data();
  fresh.args.targets = fresh.y.data();
  fresh.args.weight.data = fresh.w.data();
  fresh.args.pos_weight.data = fresh.p.data();
  for (std::vector<float>* v : {&fresh.loss, &fresh.grad_logits, &fresh.grad_targets}) {
    std::fill(v->begin(), v->end(), -1.0f);
  }
  fresh.out.loss = fresh.loss.data();
  fresh.out.grad_logits = problem.out.grad_logits ? fresh.grad_logits.data() : nullptr;
  fresh.out.grad_targets = problem.out.grad_targets ? fresh.grad_targets.data() : nullptr;
  return fresh;
}

// The results of `problem` computed alone on the CPU backend.
Problem Alone(const Problem& problem) {
  Problem alone = Fresh(problem);
  static std::unique_ptr<kernels::Backend> cpu = kernels::MakeCpuBackend({1});
  EXPECT_TRUE(cpu->Bce(alone.args, alone.out).ok());
  return alone;
}

// Runs each problem through `batcher` on its own thread, all started together; returns the
// statuses in order.
std::vector<absl::Status> RunConcurrently(Batcher& batcher, std::vector<Problem*> problems,
                                          std::vector<const CallControl*> calls = {}) {
  static const CallControl kLive;
  std::vector<absl::Status> statuses(problems.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < problems.size(); ++i) {
    const CallControl* call = i < calls.size() ? calls[i] : &kLive;
    threads.emplace_back([&, i, call] {
      statuses[i] = batcher.Run(problems[i]->args, problems[i]->out, *call);
    });
  }
  for (std::thread& t : threads) t.join();
  return statuses;
}

TEST(BatcherTest, GathersConcurrentRequestsWithinTheDelay) {
  FakeCudaBackend backend;
  Metrics metrics;
  Batcher batcher({absl::Milliseconds(500), 1 << 20}, &backend, &metrics);
  std::vector<Problem> problems;
  for (int i = 0; i < 8; ++i) problems.emplace_back(1 + i, 5, 100 + i);
  std::vector<Problem*> ptrs;
  for (Problem& p : problems) ptrs.push_back(&p);
  const absl::Time start = absl::Now();
  for (const absl::Status& s : RunConcurrently(batcher, ptrs)) EXPECT_TRUE(s.ok()) << s;
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(500));  // the batch waited its delay
  EXPECT_EQ(backend.batch_sizes(), std::vector<size_t>({8}));
  EXPECT_EQ(batcher.batches_run(), 1);
  EXPECT_EQ(batcher.items_run(), 8);
  EXPECT_EQ(backend.lone_calls(), 0);
  for (const Problem& p : problems) ExpectSameResults(Alone(p), p);
}

TEST(BatcherTest, ClosesWhenTheElementCapIsReached) {
  FakeCudaBackend backend;
  // Six requests of 20 elements, at most 60 per batch: two full batches of three, run at once
  // (the 30 s delay never passes).
  Batcher batcher({absl::Seconds(30), 60}, &backend, nullptr);
  std::vector<Problem> problems;
  for (int i = 0; i < 6; ++i) problems.emplace_back(4, 5, 200 + i);
  std::vector<Problem*> ptrs;
  for (Problem& p : problems) ptrs.push_back(&p);
  const absl::Time start = absl::Now();
  for (const absl::Status& s : RunConcurrently(batcher, ptrs)) EXPECT_TRUE(s.ok()) << s;
  EXPECT_LT(absl::Now() - start, absl::Seconds(20));
  EXPECT_EQ(backend.batch_sizes(), std::vector<size_t>({3, 3}));
  for (const Problem& p : problems) ExpectSameResults(Alone(p), p);
}

TEST(BatcherTest, ARequestThatDoesNotFitClosesTheOpenBatch) {
  FakeCudaBackend backend;
  Batcher batcher({absl::Milliseconds(50), 100}, &backend, nullptr);
  Problem a(6, 10, 1), b(6, 10, 2);  // 60 + 60 > 100
  const CallControl call;
  std::thread first([&] { EXPECT_TRUE(batcher.Run(a.args, a.out, call).ok()); });
  absl::SleepFor(absl::Milliseconds(10));
  EXPECT_TRUE(batcher.Run(b.args, b.out, call).ok());
  first.join();
  EXPECT_EQ(backend.batch_sizes(), std::vector<size_t>({1, 1}));
  // Larger than the cap: computed alone, at once, through Bce.
  Problem big(11, 10, 3);
  EXPECT_FALSE(batcher.Batches(big.args.numel));
  EXPECT_TRUE(batcher.Run(big.args, big.out, call).ok());
  EXPECT_EQ(backend.lone_calls(), 1);
  ExpectSameResults(Alone(big), big);
}

TEST(BatcherTest, DifferentKeysNeverShareABatch) {
  FakeCudaBackend backend;
  Batcher batcher({absl::Milliseconds(500), 1 << 20}, &backend, nullptr);
  std::vector<Problem> problems;
  for (int i = 0; i < 12; ++i) problems.emplace_back(2, 4, 300 + i);
  // Four keys: MEAN, SUM, MEAN with ignore_index, MEAN without grad_targets.
  for (int i = 0; i < 12; ++i) {
    Problem& p = problems[i];
    switch (i % 4) {
      case 1:
        p.args.reduction = kernels::Reduction::kSum;
        break;
      case 2:
        p.args.has_ignore_index = true;
        p.args.ignore_index = 1.0;
        break;
      case 3:
        p.out.grad_targets = nullptr;
        break;
    }
  }
  std::vector<Problem*> ptrs;
  for (Problem& p : problems) ptrs.push_back(&p);
  for (const absl::Status& s : RunConcurrently(batcher, ptrs)) EXPECT_TRUE(s.ok()) << s;
  const auto batches = backend.batches();
  std::set<BatchKey> keys;
  for (const auto& batch : batches) {
    ASSERT_FALSE(batch.empty());
    for (const BatchKey& k : batch) EXPECT_EQ(k, batch.front());
    EXPECT_TRUE(keys.insert(batch.front()).second) << "two batches of one key";
  }
  EXPECT_EQ(keys.size(), 4u);
  EXPECT_EQ(backend.batch_sizes(), std::vector<size_t>({3, 3, 3, 3}));

  // Every semantic option is in the key.
  Problem base(2, 4, 1);
  const BatchKey k0 = BatchKeyOf(base.args, base.out);
  auto differs = [&](auto change) {
    Problem p(2, 4, 1);
    change(p);
    return !(BatchKeyOf(p.args, p.out) == k0);
  };
  EXPECT_FALSE(differs([](Problem& p) { p.args.numel = 4; }));  // sizes and data are not
  EXPECT_TRUE(differs([](Problem& p) { p.args.loss = kernels::Loss::kFocal; }));
  EXPECT_TRUE(differs([](Problem& p) { p.args.dtype = kernels::DType::kFloat64; }));
  EXPECT_TRUE(differs([](Problem& p) { p.args.targets_dtype = kernels::DType::kFloat16; }));
  EXPECT_TRUE(differs([](Problem& p) { p.args.weight.data = nullptr; }));
  EXPECT_TRUE(differs([](Problem& p) { p.args.weight.period = 1; }));
  EXPECT_TRUE(differs([](Problem& p) { p.args.pos_weight.inner = 2; }));
  EXPECT_TRUE(differs([](Problem& p) { p.args.last_dim = 2; }));
  EXPECT_TRUE(differs([](Problem& p) { p.args.normalize = true; }));
  EXPECT_TRUE(differs([](Problem& p) { p.args.label_smoothing = 0.1; }));
  EXPECT_TRUE(differs([](Problem& p) { p.args.focal_alpha = 0.5; }));
  EXPECT_TRUE(differs([](Problem& p) { p.args.focal_gamma = 1.0; }));
  EXPECT_TRUE(differs([](Problem& p) { p.args.whole_numel = 100; }));
  EXPECT_TRUE(differs([](Problem& p) { p.args.whole_kept = 7; }));
  EXPECT_TRUE(differs(
      [](Problem& p) { p.args.precision = kernels::Precision::kCorrectlyRounded; }));
  EXPECT_TRUE(differs([](Problem& p) { p.out.grad_logits = nullptr; }));
  EXPECT_TRUE(differs([](Problem& p) { p.out.loss_values = reinterpret_cast<double*>(8); }));
  EXPECT_TRUE(differs([](Problem& p) { p.out.kept = reinterpret_cast<int64_t*>(8); }));
}

TEST(BatcherTest, OneRequestsErrorStaysItsOwn) {
  FakeCudaBackend backend;
  backend.fail_numel = 14;
  Batcher batcher({absl::Milliseconds(500), 1 << 20}, &backend, nullptr);
  Problem a(1, 7, 1), b(2, 7, 2), c(3, 7, 3);  // same key, 7, 14 and 21 elements
  const std::vector<absl::Status> s = RunConcurrently(batcher, {&a, &b, &c});
  EXPECT_EQ(backend.batch_sizes(), std::vector<size_t>({3}));
  EXPECT_TRUE(s[0].ok()) << s[0];
  EXPECT_EQ(s[1].code(), absl::StatusCode::kInternal) << s[1];
  EXPECT_TRUE(s[2].ok()) << s[2];
  ExpectSameResults(Alone(a), a);
  ExpectSameResults(Alone(c), c);
}

TEST(BatcherTest, CancelledAndExpiredCallsAreLeftOut) {
  FakeCudaBackend backend;
  Batcher batcher({absl::Milliseconds(400), 1 << 20}, &backend, nullptr);
  Problem a(2, 5, 1), b(2, 5, 2), c(2, 5, 3);
  CallControl cancelled;
  const CallControl expiring(nullptr,
                             CallControl::Clock::now() + std::chrono::milliseconds(100));
  const CallControl live;
  std::vector<absl::Status> s;
  std::thread run([&] {
    s = RunConcurrently(batcher, {&a, &b, &c}, {&cancelled, &expiring, &live});
  });
  absl::SleepFor(absl::Milliseconds(50));  // all three wait in the open batch
  cancelled.Cancel();
  run.join();
  ASSERT_EQ(s.size(), 3u);
  EXPECT_EQ(s[0].code(), absl::StatusCode::kCancelled) << s[0];
  EXPECT_EQ(s[1].code(), absl::StatusCode::kDeadlineExceeded) << s[1];
  EXPECT_TRUE(s[2].ok()) << s[2];
  EXPECT_EQ(backend.batch_sizes(), std::vector<size_t>({1}));  // only the live one ran
  EXPECT_EQ(batcher.items_run(), 1);
  ExpectSameResults(Alone(c), c);
  EXPECT_EQ(a.loss[0], -1.0f);  // never computed
}

TEST(BatcherTest, ResultsDoNotDependOnTheBatch) {
  for (const kernels::Reduction reduction :
       {kernels::Reduction::kMean, kernels::Reduction::kNone,
        kernels::Reduction::kPerSampleMean}) {
    SCOPED_TRACE(static_cast<int>(reduction));
    const Problem subject(7, 9, 42, reduction);
    const Problem alone = Alone(subject);
    FakeCudaBackend backend;
    std::mt19937_64 rng(7);
    for (int round = 0; round < 100; ++round) {
      // The subject and 1 to 7 random others of its key, in a batch exactly their size: it
      // runs when the last one joins, in whatever order the threads arrived.
      std::vector<Problem> problems;
      problems.push_back(Fresh(subject));
      const int others = 1 + static_cast<int>(rng() % 7);
      for (int i = 0; i < others; ++i) {
        problems.emplace_back(1 + static_cast<int64_t>(rng() % 50), 9, rng(), reduction);
      }
      std::shuffle(problems.begin(), problems.end(), rng);
      int64_t elements = 0;
      std::vector<Problem*> ptrs;
      for (Problem& p : problems) {
        elements += p.args.numel;
        ptrs.push_back(&p);
      }
      Batcher batcher({absl::Seconds(30), elements}, &backend, nullptr);
      for (const absl::Status& s : RunConcurrently(batcher, ptrs)) ASSERT_TRUE(s.ok()) << s;
      ASSERT_EQ(batcher.batches_run(), 1);
      int seen = 0;
      for (const Problem& p : problems) {
        if (p.args.numel == subject.args.numel && p.x == subject.x) {
          ExpectSameResults(alone, p);
          ++seen;
        }
      }
      ASSERT_EQ(seen, 1);
    }
    const std::vector<size_t> sizes = backend.batch_sizes();
    ASSERT_EQ(sizes.size(), 100u);
    EXPECT_GE(sizes.front(), 2u);
  }
}

// The Executor sends CUDA computations through its batcher, and only those.
TEST(BatcherExecutorTest, CudaRequestsGoThroughTheBatcher) {
  using namespace testing;  // tests/server/test_server_util.h
  Metrics metrics;
  ExecutorOptions options;
  options.batch_max_delay = absl::Microseconds(100);
  options.batch_max_elements = 1000;
  auto fake = std::make_unique<FakeCudaBackend>();
  FakeCudaBackend* cuda = fake.get();
  Executor executor(options, kernels::MakeCpuBackend({1}), std::move(fake), &metrics);
  ASSERT_NE(executor.batcher(), nullptr);

  const v1::EvaluateRequest request = RandomRequest<float>(4, 8, 1, v1::REDUCTION_MEAN);
  auto plan = PlanEvaluate(request, Limits());
  ASSERT_TRUE(plan.ok()) << plan.status();
  CallControl call;
  v1::EvaluateResponse on_cuda;
  ASSERT_TRUE(executor.Compute(call, *plan, absl::GetCurrentTimeNanos(), &on_cuda).ok());
  EXPECT_EQ(on_cuda.device(), v1::DEVICE_CUDA);
  EXPECT_EQ(cuda->batch_sizes(), std::vector<size_t>({1}));
  EXPECT_EQ(executor.batcher()->items_run(), 1);

  // Asked for the CPU: no batch. The bits are the same.
  v1::EvaluateRequest cpu_request = request;
  cpu_request.set_device(v1::DEVICE_CPU);
  auto cpu_plan = PlanEvaluate(cpu_request, Limits());
  ASSERT_TRUE(cpu_plan.ok());
  v1::EvaluateResponse on_cpu;
  ASSERT_TRUE(executor.Compute(call, *cpu_plan, absl::GetCurrentTimeNanos(), &on_cpu).ok());
  EXPECT_EQ(on_cpu.device(), v1::DEVICE_CPU);
  EXPECT_EQ(executor.batcher()->items_run(), 1);
  EXPECT_EQ(on_cuda.loss().data(), on_cpu.loss().data());

  // Larger than batch_max_elements: the CUDA backend's Bce, alone.
  // The plan views the request's tensors: the request must outlive it.
  const v1::EvaluateRequest big_request = RandomRequest<float>(200, 8, 2, v1::REDUCTION_MEAN);
  auto big = PlanEvaluate(big_request, Limits());
  ASSERT_TRUE(big.ok());
  v1::EvaluateResponse big_response;
  ASSERT_TRUE(executor.Compute(call, *big, absl::GetCurrentTimeNanos(), &big_response).ok());
  EXPECT_EQ(big_response.device(), v1::DEVICE_CUDA);
  EXPECT_EQ(cuda->lone_calls(), 1);
  EXPECT_EQ(executor.batcher()->items_run(), 1);

  // A cancelled call is refused before it reaches the batcher.
  CallControl cancelled;
  cancelled.Cancel();
  v1::EvaluateResponse none;
  EXPECT_EQ(executor.Compute(cancelled, *plan, absl::GetCurrentTimeNanos(), &none).code(),
            absl::StatusCode::kCancelled);
}

TEST(BatcherExecutorTest, OffByDefault) {
  Metrics metrics;
  Executor executor(ExecutorOptions(), kernels::MakeCpuBackend({1}),
                    std::make_unique<FakeCudaBackend>(), &metrics);
  EXPECT_EQ(executor.batcher(), nullptr);
  ExecutorOptions on;
  on.batch_max_delay = absl::Microseconds(100);
  Executor cpu_only(on, kernels::MakeCpuBackend({1}), nullptr, &metrics);
  EXPECT_EQ(cpu_only.batcher(), nullptr);  // nothing to batch for
}

}  // namespace
}  // namespace lossd::server
