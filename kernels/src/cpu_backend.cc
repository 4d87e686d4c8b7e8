// CPU backend: blocks of kReduceBlock elements are evaluated by the SIMD block kernels
// (simd_block.cc) in float (float32 and half inputs; in double on SIMD targets without FMA) or
// double (float64 inputs), reading the
// caller's buffers in place and writing straight into the output buffers when the dtypes allow.
// Blocks are spread over a worker pool; reductions use the fixed block tree plus exact
// summation, so results are bitwise identical for any thread count.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "bce_math.h"
#include "correctly_rounded.h"
#include "divisors.h"
#include "hwy/aligned_allocator.h"
#include "simd_block.h"
#include "lossd/kernels/backend.h"
#include "lossd/kernels/bce.h"
#include "lossd/kernels/dtype.h"
#include "lossd/kernels/exact_sum.h"
#include "lossd/kernels/operand.h"
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

// The SIMD kernel reads tiled operands in pieces of kTilePiece elements, so that a tile stays
// small enough to remain in the L1 cache beside the streamed inputs and outputs.
constexpr int64_t kTilePiece = 256;

// For an operand with inner 1 and a short period P, span + P values tile[k] = op[k % P], so
// that the values of any run of up to `span` elements start at tile + i0 % P without copying.
template <typename T>
hwy::AlignedFreeUniquePtr<T[]> MakeTile(const Operand& op, int64_t numel, int64_t span) {
  if (op.data == nullptr || op.inner != 1 || op.period == numel || op.period > kMaxTilePeriod) {
    return nullptr;
  }
  const int64_t len = std::min(span, numel) + op.period;
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

// What every block of one call shares.
struct Plan {
  bool reduce = false;       // kSum / kMean: block sums go to an ExactSum
  double count = 1.0;        // normalize: non-ignored elements (else 1)
  double grad_div = 1.0;     // divisor of the gradients (mean, per-sample, normalize)
  // kPerSampleMean: the exact sum of each row that lies within one reduction block, and the
  // losses (as double) of the elements of the rows that cross a block's edge, summed after all
  // blocks. Rows are row_len consecutive elements.
  double* row_sums = nullptr;
  double* loss_f64 = nullptr;
  int64_t row_len = 0;
};

// Evaluates blocks [b0, b1) in compute type T and adds their block sums to `sum`.
template <typename T>
void RunBlocks(const BceArgs& args, const BceOutputs& out, const Plan& plan, int64_t b0,
               int64_t b1, ExactSum* sum) {
  constexpr int64_t B = kReduceBlock;
  // Per-thread scratch, allocated once: small calls pay no allocation.
  thread_local hwy::AlignedFreeUniquePtr<T[]> storage = hwy::AllocateAligned<T>(8 * B);
  thread_local std::vector<double> tree(B);
  T* const xs = storage.get();
  T* const ys = xs + B;
  T* const ws = ys + B;
  T* const ps = ws + B;
  T* const ls = ps + B;
  T* const gxs = ls + B;
  T* const gys = gxs + B;
  T* const ysm = gys + B;  // smoothed targets
  const bool focal = args.loss == Loss::kFocal;
  const bool smooth = args.label_smoothing != 0.0;
  const T s = static_cast<T>(args.label_smoothing);
  const T ignore = static_cast<T>(args.ignore_index);
  // Targets are compared with ignore_index exactly, as in double (CountIgnored, the reference):
  // an ignore_index that T cannot hold matches no target.
  const bool has_ignore =
      args.has_ignore_index && static_cast<double>(ignore) == args.ignore_index;
  // Outputs are written in place when they have the compute type and nothing is applied after.
  const bool direct = args.dtype == kDTypeOf<T>;
  const bool direct_loss = direct && !plan.reduce && plan.loss_f64 == nullptr &&
                           plan.count == 1.0 && out.loss != nullptr &&
                           out.loss_values == nullptr;
  // Gradient division inside the SIMD kernel: the divisor as T plus what T cannot hold of it.
  const T div_hi = static_cast<T>(plan.grad_div);
  const T div_lo = static_cast<T>(plan.grad_div - static_cast<double>(div_hi));
  internal::ElementOptions<T> eo;
  eo.focal = focal;
  eo.has_ignore_index = has_ignore;
  eo.ignore_index = ignore;
  eo.label_smoothing = s;
  eo.alpha = static_cast<T>(args.focal_alpha);
  eo.gamma = static_cast<T>(args.focal_gamma);

  // Focal loss with gamma 0, 1 or 2 and non-float64 logits: the SIMD block (double lanes with
  // Highway's exp and log1p; float results within one ulp of FocalElement's rounding). Float64
  // logits and other gammas: the scalar FocalElement, the reference's own math.
  const bool focal_simd =
      focal && args.dtype != DType::kFloat64 &&
      (args.focal_gamma == 0.0 || args.focal_gamma == 1.0 || args.focal_gamma == 2.0);
  const int64_t span = focal ? B : kTilePiece;  // the focal loop reads whole blocks
  const auto w_tile = MakeTile<T>(args.weight, args.numel, span);
  const auto p_tile = MakeTile<T>(args.pos_weight, args.numel, span);
  internal::BlockArgs<T> k;
  k.grad_divisor = div_hi;
  k.grad_divisor_lo = div_lo;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t i0 = b * B;
    const int64_t n = std::min(B, args.numel - i0);
    k.n = n;
    k.x = DenseRun(args.dtype, args.logits, i0, n, xs);
    const T* y_raw = DenseRun(args.targets_dtype, args.targets, i0, n, ys);
    k.w = OperandRun(args.weight, w_tile.get(), args.numel, i0, n, ws);
    k.p = OperandRun(args.pos_weight, p_tile.get(), args.numel, i0, n, ps);
    k.loss = direct_loss ? static_cast<T*>(out.loss) + i0 : ls;
    k.gx = out.grad_logits ? (direct ? static_cast<T*>(out.grad_logits) + i0 : gxs) : nullptr;
    k.gy = out.grad_targets ? (direct ? static_cast<T*>(out.grad_targets) + i0 : gys) : nullptr;
    // Smoothed targets for the block kernels (the scalar focal loop smooths in LossElement).
    k.y = y_raw;
    if (smooth && (!focal || focal_simd)) {
      for (int64_t j = 0; j < n; ++j) ysm[j] = y_raw[j] * (T(1) - s) + s * T(0.5);
      k.y = ysm;
    }
    if (focal_simd) {
      if constexpr (std::is_same_v<T, double>) {  // focal loss always computes in double
        internal::FocalBlockArgs fa;
        fa.x = k.x;
        fa.y = k.y;
        fa.w = k.w;
        fa.n = n;
        fa.alpha = eo.alpha;
        fa.gamma = eo.gamma;
        fa.loss = k.loss;
        fa.gx = k.gx;
        fa.grad_divisor = div_hi + div_lo;  // T is double here: div_lo is 0
        internal::FocalBlock(fa);
        // dl/dy is not offered for the focal loss (NaN, as the reference).
        if (k.gy) std::fill(k.gy, k.gy + n, std::numeric_limits<T>::quiet_NaN());
      }
    } else if (focal) {
      // Focal loss: the shared scalar math per element (internal::FocalElement).
      for (int64_t j = 0; j < n; ++j) {
        T l, gx, gy;
        internal::LossElement<T>(eo, k.x[j], y_raw[j], k.w ? k.w[j] : T(1), T(1), &l, &gx, &gy);
        k.loss[j] = l;
        if (k.gx) k.gx[j] = gx / (div_hi + div_lo);  // T is double here: div_lo is 0
        if (k.gy) k.gy[j] = gy;  // NaN: the focal loss offers no dl/dy (as the reference)
      }
    } else {
      if (w_tile == nullptr && p_tile == nullptr) {
        internal::BceBlock(k);
      } else {
        for (int64_t off = 0; off < n; off += kTilePiece) {
          internal::BlockArgs<T> piece = k;
          piece.n = std::min(kTilePiece, n - off);
          piece.x += off;
          piece.y += off;
          piece.loss += off;
          if (piece.gx) piece.gx += off;
          if (piece.gy) piece.gy += off;
          const auto operand = [&](const Operand& op, const T* tile, const T* run) -> const T* {
            if (run == nullptr) return nullptr;
            return tile != nullptr ? tile + (i0 + off) % op.period : run + off;
          };
          piece.w = operand(args.weight, w_tile.get(), k.w);
          piece.p = operand(args.pos_weight, p_tile.get(), k.p);
          internal::BceBlock(piece);
        }
      }
      if (smooth && k.gy) {
        for (int64_t j = 0; j < n; ++j) k.gy[j] *= (T(1) - s);
      }
    }
    if (has_ignore) {
      for (int64_t j = 0; j < n; ++j) {
        if (y_raw[j] != ignore) continue;
        k.loss[j] = T(0);
        if (k.gx) k.gx[j] = T(0);
        if (k.gy) k.gy[j] = T(0);
      }
    }
    if (!direct) {
      if (out.grad_logits) StoreRun(args.dtype, out.grad_logits, i0, n, gxs);
      if (out.grad_targets) StoreRun(args.dtype, out.grad_targets, i0, n, gys);
    }
    if (out.loss_values != nullptr) {
      for (int64_t j = 0; j < n; ++j) out.loss_values[i0 + j] = static_cast<double>(k.loss[j]);
    }
    if (plan.reduce) {
      sum->Add(internal::BlockTreeSum(k.loss, n, tree.data()));
    } else if (plan.loss_f64 != nullptr) {
      // Per-sample mean: rows within this block summed here; the elements of a row begun before
      // it (head) or running past it (tail) kept for the pass after all blocks.
      const int64_t len = plan.row_len;
      const int64_t head = std::min(n, (len - i0 % len) % len);
      int64_t j = 0;
      for (; j < head; ++j) plan.loss_f64[i0 + j] = static_cast<double>(k.loss[j]);
      for (; j + len <= n; j += len) {
        const double* row;
        if constexpr (std::is_same_v<T, double>) {
          row = k.loss + j;
        } else {
          for (int64_t m = 0; m < len; ++m) tree[m] = static_cast<double>(k.loss[j + m]);
          row = tree.data();
        }
        plan.row_sums[(i0 + j) / len] = ExactSumOf(row, len);
      }
      for (; j < n; ++j) plan.loss_f64[i0 + j] = static_cast<double>(k.loss[j]);
    } else if (out.loss != nullptr && !direct_loss) {
      if (plan.count != 1.0) {
        for (int64_t j = 0; j < n; ++j) tree[j] = static_cast<double>(k.loss[j]) / plan.count;
        StoreRun(args.dtype, out.loss, i0, n, tree.data());
      } else {
        StoreRun(args.dtype, out.loss, i0, n, ls);
      }
    }
  }
}

// Elements whose raw target equals ignore_index (compared in double, as the reference does),
// counted for `normalize`: chunks in parallel, runs of kReduceBlock converted to double.
int64_t CountIgnored(const BceArgs& args, internal::ThreadPool& pool) {
  const int64_t chunks = (args.numel + kChunkElements - 1) / kChunkElements;
  std::vector<int64_t> counts(chunks, 0);
  pool.ParallelFor(chunks, [&](int64_t t) {
    double run[kReduceBlock];
    const int64_t end = std::min(args.numel, (t + 1) * kChunkElements);
    int64_t c = 0;
    for (int64_t i0 = t * kChunkElements; i0 < end; i0 += kReduceBlock) {
      const int64_t n = std::min(kReduceBlock, end - i0);
      const double* y = DenseRun(args.targets_dtype, args.targets, i0, n, run);
      for (int64_t k = 0; k < n; ++k) c += y[k] == args.ignore_index;
    }
    counts[t] = c;
  });
  int64_t total = 0;
  for (int64_t c : counts) total += c;
  return total;
}

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(int threads) : pool_(threads) {}

  std::string Name() const override { return "cpu"; }

  absl::Status Bce(const BceArgs& args, const BceOutputs& out) override {
    // Per-sample means of empty rows: NaN, nothing to compute (divisors.h).
    if (internal::EmptyRows(args)) return internal::EmptyRowMeans(args, out);
    if (args.precision == Precision::kCorrectlyRounded) {
      // docs/kernels.md section 8
      absl::Status s = internal::CorrectlyRoundedBce(args, out, pool_);
      if (s.ok() && out.kept != nullptr) {
        *out.kept = args.numel - (args.has_ignore_index ? CountIgnored(args, pool_) : 0);
      }
      return s;
    }
    const int64_t blocks = (args.numel + kReduceBlock - 1) / kReduceBlock;
    // One task per chunk (32 blocks, 64k elements) keeps scheduling cost negligible.
    constexpr int64_t kBlocksPerTask = kChunkElements / kReduceBlock;
    const int64_t tasks = (blocks + kBlocksPerTask - 1) / kBlocksPerTask;
    std::vector<ExactSum> sums(std::max<int64_t>(tasks, 1));
    auto is64 = [](DType t, const void* p) { return p != nullptr && t == DType::kFloat64; };
    const bool wide = args.dtype == DType::kFloat64 || is64(args.targets_dtype, args.targets) ||
                      is64(args.weight.dtype, args.weight.data) ||
                      is64(args.pos_weight.dtype, args.pos_weight.data) ||
                      // Smoothed targets and the focal factors are rounded intermediates that
                      // float cannot keep within 4 ulp of the result: these use double.
                      args.label_smoothing != 0.0 || args.loss == Loss::kFocal ||
                      // SIMD targets without FMA cannot keep the float formulas within 4 ulp.
                      !internal::FloatBlockIsExact();
    Plan plan;
    plan.reduce = args.reduction == Reduction::kSum || args.reduction == Reduction::kMean;
    // One count of the ignored targets serves the normalize divisor and BceOutputs::kept.
    const bool count_ignored =
        internal::CountsIgnored(args) || (out.kept != nullptr && args.has_ignore_index);
    const int64_t ignored = count_ignored ? CountIgnored(args, pool_) : 0;
    const internal::Divisors div = internal::ResolveDivisors(args, ignored);
    plan.count = div.count;
    plan.grad_div = div.grad_div;
    // Per-sample mean: per_element is written only where rows cross block edges (none when
    // last_dim divides kReduceBlock), so it is left uninitialized and mostly never touched.
    std::unique_ptr<double[]> per_element;
    std::vector<double> row_sums;
    if (args.reduction == Reduction::kPerSampleMean) {
      per_element.reset(new double[args.numel]);
      row_sums.resize(LossCount(args));
      plan.loss_f64 = per_element.get();
      plan.row_sums = row_sums.data();
      plan.row_len = args.last_dim;
    }
    std::atomic<bool> stopped{false};
    pool_.ParallelFor(tasks, [&](int64_t t) {
      if (stopped.load(std::memory_order_relaxed)) return;
      if (args.should_stop && args.should_stop()) {
        stopped.store(true, std::memory_order_relaxed);
        return;
      }
      const int64_t b0 = t * kBlocksPerTask;
      const int64_t b1 = std::min(blocks, (t + 1) * kBlocksPerTask);
      // Compute in double when `wide`, else in float (float32 and half types).
      if (wide) {
        RunBlocks<double>(args, out, plan, b0, b1, &sums[t]);
      } else {
        RunBlocks<float>(args, out, plan, b0, b1, &sums[t]);
      }
      if (args.chunks_done) args.chunks_done->fetch_add(1, std::memory_order_relaxed);
    });
    if (stopped.load()) return absl::CancelledError("stopped before completion");
    if (out.kept != nullptr) *out.kept = args.numel - ignored;
    if (out.loss == nullptr) return absl::OkStatus();
    if (plan.reduce) {
      ExactSum total;
      for (const ExactSum& s : sums) total.Merge(s);
      double v = total.Value() / plan.count;
      if (args.reduction == Reduction::kMean) v /= div.mean_n;
      StoreFromDouble(args.dtype, out.loss, 0, v);
    } else if (args.reduction == Reduction::kPerSampleMean) {
      const int64_t rows = LossCount(args);
      const int64_t len = args.last_dim;
      constexpr int64_t kRowsPerTask = 4096;
      pool_.ParallelFor((rows + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t t) {
        for (int64_t r = t * kRowsPerTask; r < std::min(rows, (t + 1) * kRowsPerTask); ++r) {
          const int64_t start = r * len;
          const double sum = start / kReduceBlock == (start + len - 1) / kReduceBlock
                                 ? row_sums[r]
                                 : ExactSumOf(per_element.get() + start, len);
          StoreFromDouble(args.dtype, out.loss, r,
                          sum / static_cast<double>(len) / plan.count);
        }
      });
    }
    return absl::OkStatus();
  }

 private:
  internal::ThreadPool pool_;
};

}  // namespace

std::string CpuSimdTarget() { return internal::BceBlockTargetName(); }

std::unique_ptr<Backend> MakeCpuBackend(const CpuOptions& options) {
  int threads = options.threads;
  if (threads <= 0) threads = std::max(1u, std::thread::hardware_concurrency());
  return std::make_unique<CpuBackend>(threads);
}

}  // namespace lossd::kernels
