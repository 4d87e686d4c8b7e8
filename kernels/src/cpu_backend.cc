// CPU backend: blocks of kReduceBlock elements are converted to double, evaluated with the
// shared per-element math and written straight into the caller's buffers. Blocks are spread
// over a worker pool; reductions use the fixed block tree plus exact summation, so results are
// bitwise identical for any thread count.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "bce_math.h"
#include "lossd/kernels/kernels.h"
#include "thread_pool.h"

namespace lossd::kernels {

namespace {

// Converts elements [i0, i0+n) of a dense tensor into doubles.
void LoadRun(DType dtype, const void* data, int64_t i0, int64_t n, double* out) {
  switch (dtype) {
    case DType::kFloat32: {
      const float* p = static_cast<const float*>(data) + i0;
      for (int64_t k = 0; k < n; ++k) out[k] = p[k];
      return;
    }
    case DType::kFloat64:
      std::memcpy(out, static_cast<const double*>(data) + i0, n * sizeof(double));
      return;
    case DType::kFloat16: {
      const uint16_t* p = static_cast<const uint16_t*>(data) + i0;
      for (int64_t k = 0; k < n; ++k) out[k] = HalfToFloat(p[k]);
      return;
    }
    case DType::kBFloat16: {
      const uint16_t* p = static_cast<const uint16_t*>(data) + i0;
      for (int64_t k = 0; k < n; ++k) out[k] = BFloat16ToFloat(p[k]);
      return;
    }
  }
}

// Materializes elements [i0, i0+n) of a broadcast operand as doubles.
void LoadOperand(const Operand& op, int64_t i0, int64_t n, double* out) {
  if (op.data == nullptr) {
    std::fill(out, out + n, 1.0);
    return;
  }
  int64_t r = i0 % op.inner;
  int64_t off = (i0 / op.inner) % op.period;
  int64_t k = 0;
  while (k < n) {
    if (op.inner == 1) {
      const int64_t run = std::min(n - k, op.period - off);
      LoadRun(op.dtype, op.data, off, run, out + k);
      k += run;
      off = 0;
    } else {
      const int64_t run = std::min(n - k, op.inner - r);
      const double v = LoadAsDouble(op.dtype, op.data, off);
      std::fill(out + k, out + k + run, v);
      k += run;
      r = 0;
      if (++off == op.period) off = 0;
    }
  }
}

// Rounds n doubles once into elements [i0, i0+n) of a dense tensor.
void StoreRun(DType dtype, void* data, int64_t i0, int64_t n, const double* in) {
  switch (dtype) {
    case DType::kFloat32: {
      float* p = static_cast<float*>(data) + i0;
      for (int64_t k = 0; k < n; ++k) p[k] = static_cast<float>(in[k]);
      return;
    }
    case DType::kFloat64:
      std::memcpy(static_cast<double*>(data) + i0, in, n * sizeof(double));
      return;
    case DType::kFloat16: {
      uint16_t* p = static_cast<uint16_t*>(data) + i0;
      for (int64_t k = 0; k < n; ++k) p[k] = FloatToHalf(static_cast<float>(in[k]));
      return;
    }
    case DType::kBFloat16: {
      uint16_t* p = static_cast<uint16_t*>(data) + i0;
      for (int64_t k = 0; k < n; ++k) p[k] = FloatToBFloat16(static_cast<float>(in[k]));
      return;
    }
  }
}

// Evaluates blocks [b0, b1) and adds their block sums to `sum`.
void RunBlocks(const BceArgs& args, const BceOutputs& out, int64_t b0, int64_t b1,
               ExactSum* sum) {
  constexpr int64_t B = kReduceBlock;
  std::vector<double> buf(7 * B);
  double* x = buf.data();
  double* y = x + B;
  double* w = y + B;
  double* p = w + B;
  double* l = p + B;
  double* gx = l + B;
  double* gy = gx + B;
  const bool reduce = args.reduction != Reduction::kNone;
  const bool mean = args.reduction == Reduction::kMean;
  const double n_total = static_cast<double>(args.numel);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t i0 = b * B;
    const int64_t n = std::min(B, args.numel - i0);
    LoadRun(args.dtype, args.logits, i0, n, x);
    LoadRun(args.targets_dtype, args.targets, i0, n, y);
    LoadOperand(args.weight, i0, n, w);
    LoadOperand(args.pos_weight, i0, n, p);
    for (int64_t k = 0; k < n; ++k) {
      internal::BceElement<double>(x[k], y[k], w[k], p[k], &l[k], &gx[k], &gy[k]);
    }
    if (mean) {
      for (int64_t k = 0; k < n; ++k) {
        gx[k] /= n_total;
        gy[k] /= n_total;
      }
    }
    if (out.grad_logits) StoreRun(args.dtype, out.grad_logits, i0, n, gx);
    if (out.grad_targets) StoreRun(args.dtype, out.grad_targets, i0, n, gy);
    if (reduce) {
      sum->Add(TreeSumBlock(l, n));
    } else if (out.loss) {
      StoreRun(args.dtype, out.loss, i0, n, l);
    }
  }
}

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(int threads) : pool_(threads) {}

  std::string Name() const override { return "cpu"; }

  absl::Status Bce(const BceArgs& args, const BceOutputs& out) override {
    const int64_t blocks = (args.numel + kReduceBlock - 1) / kReduceBlock;
    // About 32 blocks (64k elements) per task keeps scheduling cost negligible.
    constexpr int64_t kBlocksPerTask = 32;
    const int64_t tasks = (blocks + kBlocksPerTask - 1) / kBlocksPerTask;
    std::vector<ExactSum> sums(std::max<int64_t>(tasks, 1));
    pool_.ParallelFor(tasks, [&](int64_t t) {
      RunBlocks(args, out, t * kBlocksPerTask, std::min(blocks, (t + 1) * kBlocksPerTask),
                &sums[t]);
    });
    if (args.reduction != Reduction::kNone && out.loss) {
      ExactSum total;
      for (const ExactSum& s : sums) total.Merge(s);
      double v = total.Value();
      if (args.reduction == Reduction::kMean) v /= static_cast<double>(args.numel);
      StoreRun(args.dtype, out.loss, 0, 1, &v);
    }
    return absl::OkStatus();
  }

 private:
  internal::ThreadPool pool_;
};

}  // namespace

std::unique_ptr<Backend> MakeCpuBackend(const CpuOptions& options) {
  int threads = options.threads;
  if (threads <= 0) threads = std::max(1u, std::thread::hardware_concurrency());
  return std::make_unique<CpuBackend>(threads);
}

}  // namespace lossd::kernels
