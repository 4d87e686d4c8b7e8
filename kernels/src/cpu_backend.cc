// CPU backend: blocks of kReduceBlock elements are evaluated by the SIMD block kernels
// (simd_block.cc) in float (float32 and half inputs) or double (float64 inputs), reading the
// caller's buffers in place and writing straight into the output buffers when the dtypes allow. Blocks are spread
// over a worker pool; reductions use the fixed block tree plus exact summation, so results are
// bitwise identical for any thread count.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "hwy/aligned_allocator.h"
#include "simd_block.h"
#include "lossd/kernels/kernels.h"
#include "thread_pool.h"

namespace lossd::kernels {

namespace {

template <typename T>
constexpr DType kDTypeOf = sizeof(T) == 4 ? DType::kFloat32 : DType::kFloat64;

// Converts elements [i0, i0+n) of a dense tensor into T.
template <typename T>
void LoadRun(DType dtype, const void* data, int64_t i0, int64_t n, T* out) {
  switch (dtype) {
    case DType::kFloat32: {
      const float* p = static_cast<const float*>(data) + i0;
      for (int64_t k = 0; k < n; ++k) out[k] = static_cast<T>(p[k]);
      return;
    }
    case DType::kFloat64: {
      const double* p = static_cast<const double*>(data) + i0;
      for (int64_t k = 0; k < n; ++k) out[k] = static_cast<T>(p[k]);
      return;
    }
    case DType::kFloat16: {
      const uint16_t* p = static_cast<const uint16_t*>(data) + i0;
      for (int64_t k = 0; k < n; ++k) out[k] = static_cast<T>(HalfToFloat(p[k]));
      return;
    }
    case DType::kBFloat16: {
      const uint16_t* p = static_cast<const uint16_t*>(data) + i0;
      for (int64_t k = 0; k < n; ++k) out[k] = static_cast<T>(BFloat16ToFloat(p[k]));
      return;
    }
  }
}

// Returns a pointer to elements [i0, i0+n) of a dense tensor as T: the tensor itself when it
// already holds T, else `scratch` filled by conversion.
template <typename T>
const T* DenseRun(DType dtype, const void* data, int64_t i0, int64_t n, T* scratch) {
  if (dtype == kDTypeOf<T>) return static_cast<const T*>(data) + i0;
  LoadRun(dtype, data, i0, n, scratch);
  return scratch;
}

// Largest period of a trailing broadcast ([C]) that is served from a precomputed tile.
constexpr int64_t kMaxTilePeriod = 8192;

// For an operand with inner 1 and a short period P, kReduceBlock + P values
// tile[k] = op[k % P], so that any block's values start at tile + i0 % P without copying.
template <typename T>
hwy::AlignedFreeUniquePtr<T[]> MakeTile(const Operand& op, int64_t numel) {
  if (op.data == nullptr || op.inner != 1 || op.period == numel || op.period > kMaxTilePeriod) {
    return nullptr;
  }
  const int64_t len = kReduceBlock + op.period;
  auto tile = hwy::AllocateAligned<T>(len);
  LoadRun(op.dtype, op.data, 0, op.period, tile.get());
  for (int64_t k = op.period; k < len; ++k) tile[k] = tile[k - op.period];
  return tile;
}

// Elements [i0, i0+n) of a broadcast operand as T (null when the operand is absent).
template <typename T>
const T* OperandRun(const Operand& op, const T* tile, int64_t numel, int64_t i0, int64_t n,
                    T* scratch) {
  if (op.data == nullptr) return nullptr;
  if (tile != nullptr) return tile + i0 % op.period;
  if (op.inner == 1 && op.period == numel) return DenseRun(op.dtype, op.data, i0, n, scratch);
  int64_t r = i0 % op.inner;
  int64_t off = (i0 / op.inner) % op.period;
  int64_t k = 0;
  while (k < n) {
    if (op.inner == 1) {
      const int64_t run = std::min(n - k, op.period - off);
      LoadRun(op.dtype, op.data, off, run, scratch + k);
      k += run;
      off = 0;
    } else {
      const int64_t run = std::min(n - k, op.inner - r);
      T v;
      LoadRun(op.dtype, op.data, off, 1, &v);
      std::fill(scratch + k, scratch + k + run, v);
      k += run;
      r = 0;
      if (++off == op.period) off = 0;
    }
  }
  return scratch;
}

// Rounds n values of T once into elements [i0, i0+n) of a dense tensor.
template <typename T>
void StoreRun(DType dtype, void* data, int64_t i0, int64_t n, const T* in) {
  switch (dtype) {
    case DType::kFloat32: {
      float* p = static_cast<float*>(data) + i0;
      for (int64_t k = 0; k < n; ++k) p[k] = static_cast<float>(in[k]);
      return;
    }
    case DType::kFloat64: {
      double* p = static_cast<double*>(data) + i0;
      for (int64_t k = 0; k < n; ++k) p[k] = static_cast<double>(in[k]);
      return;
    }
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

// Evaluates blocks [b0, b1) in compute type T and adds their block sums to `sum`.
template <typename T>
void RunBlocks(const BceArgs& args, const BceOutputs& out, int64_t b0, int64_t b1,
               ExactSum* sum) {
  constexpr int64_t B = kReduceBlock;
  auto storage = hwy::AllocateAligned<T>(7 * B);
  T* const xs = storage.get();
  T* const ys = xs + B;
  T* const ws = ys + B;
  T* const ps = ws + B;
  T* const ls = ps + B;
  T* const gxs = ls + B;
  T* const gys = gxs + B;
  std::vector<double> tree(B);
  const bool reduce = args.reduction != Reduction::kNone;
  const bool direct = args.dtype == kDTypeOf<T>;  // outputs can be written in place
  // MEAN divides gradients by numel: inside the kernel when exact in T, else afterwards.
  const bool mean = args.reduction == Reduction::kMean;
  const bool exact_div = static_cast<int64_t>(static_cast<T>(args.numel)) == args.numel;
  const auto w_tile = MakeTile<T>(args.weight, args.numel);
  const auto p_tile = MakeTile<T>(args.pos_weight, args.numel);
  internal::BlockArgs<T> k;
  k.grad_divisor = mean && exact_div ? static_cast<T>(args.numel) : T(1);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t i0 = b * B;
    const int64_t n = std::min(B, args.numel - i0);
    k.n = n;
    k.x = DenseRun(args.dtype, args.logits, i0, n, xs);
    k.y = DenseRun(args.targets_dtype, args.targets, i0, n, ys);
    k.w = OperandRun(args.weight, w_tile.get(), args.numel, i0, n, ws);
    k.p = OperandRun(args.pos_weight, p_tile.get(), args.numel, i0, n, ps);
    k.loss = (!reduce && direct && out.loss) ? static_cast<T*>(out.loss) + i0 : ls;
    k.gx = out.grad_logits ? (direct ? static_cast<T*>(out.grad_logits) + i0 : gxs) : nullptr;
    k.gy = out.grad_targets ? (direct ? static_cast<T*>(out.grad_targets) + i0 : gys) : nullptr;
    internal::BceBlock(k);
    if (mean && !exact_div) {
      for (T* g : {k.gx, k.gy}) {
        if (g == nullptr) continue;
        for (int64_t j = 0; j < n; ++j) {
          g[j] = static_cast<T>(static_cast<double>(g[j]) / static_cast<double>(args.numel));
        }
      }
    }
    if (!direct) {
      if (out.grad_logits) StoreRun(args.dtype, out.grad_logits, i0, n, gxs);
      if (out.grad_targets) StoreRun(args.dtype, out.grad_targets, i0, n, gys);
    }
    if (reduce) {
      for (int64_t j = 0; j < n; ++j) tree[j] = static_cast<double>(k.loss[j]);
      sum->Add(TreeSumBlock(tree.data(), n));
    } else if (out.loss && !direct) {
      StoreRun(args.dtype, out.loss, i0, n, ls);
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
    auto is64 = [](DType t, const void* p) { return p != nullptr && t == DType::kFloat64; };
    const bool wide = args.dtype == DType::kFloat64 || is64(args.targets_dtype, args.targets) ||
                      is64(args.weight.dtype, args.weight.data) ||
                      is64(args.pos_weight.dtype, args.pos_weight.data);
    pool_.ParallelFor(tasks, [&](int64_t t) {
      const int64_t b0 = t * kBlocksPerTask;
      const int64_t b1 = std::min(blocks, (t + 1) * kBlocksPerTask);
      // Compute in double when any input is float64, else in float (float32 and half types).
      if (wide) {
        RunBlocks<double>(args, out, b0, b1, &sums[t]);
      } else {
        RunBlocks<float>(args, out, b0, b1, &sums[t]);
      }
    });
    if (args.reduction != Reduction::kNone && out.loss) {
      ExactSum total;
      for (const ExactSum& s : sums) total.Merge(s);
      double v = total.Value();
      if (args.reduction == Reduction::kMean) v /= static_cast<double>(args.numel);
      StoreFromDouble(args.dtype, out.loss, 0, v);
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
