// CPU backend: blocks of kReduceBlock elements are evaluated by the SIMD block kernels
// (simd_block.cc, simd_focal.cc), one block loop per loss (BceBlocks, FocalBlocks), in float
// (float32 and half inputs; in double on SIMD targets without FMA) or double (the resolved
// loss's rule: float64 inputs, label smoothing, the focal loss; resolved_loss.h), reading the
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

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "kernels/src/bce_math.h"
#include "kernels/src/correctly_rounded.h"
#include "kernels/src/divisors.h"
#include "kernels/src/resolved_loss.h"
#include "hwy/aligned_allocator.h"
#include "kernels/src/simd_block.h"
#include "lossd/kernels/backend.h"
#include "lossd/kernels/bce.h"
#include "lossd/kernels/dtype.h"
#include "lossd/kernels/exact_sum.h"
#include "lossd/kernels/operand.h"
#include "kernels/src/thread_pool.h"

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

// What every block of one call shares: the resolved loss, its divisors and, for the
// per-sample mean, where block results wait for the rows that cross block edges.
struct Plan {
  const internal::ResolvedLoss* loss = nullptr;
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

// Per-thread scratch of the block loops in compute type T, allocated once: small calls pay
// no allocation. Eight runs of kReduceBlock values: x, y, w, p, loss, dl/dx, dl/dy, smoothed y.
template <typename T>
T* BlockScratch() {
  thread_local hwy::AlignedFreeUniquePtr<T[]> storage = hwy::AllocateAligned<T>(8 * kReduceBlock);
  return storage.get();
}
double* TreeScratch() {
  thread_local std::vector<double> tree(kReduceBlock);
  return tree.data();
}

// The parts of a block loop that every loss shares: reading a block's inputs in compute type
// T, pointing its outputs (in place when the dtypes allow), and the post-steps after the
// loss's own element math (ignore_index, stores, loss_values, the reductions). A loss's block
// loop (BceBlocks, FocalBlocks) is Begin, its math, End for each block.
template <typename T>
class BlockIo {
 public:
  // span: the longest run read at once from a tiled operand (MakeTile).
  BlockIo(const BceArgs& args, const BceOutputs& out, const Plan& plan, int64_t span)
      : args_(args), out_(out), plan_(plan), scratch_(BlockScratch<T>()), tree_(TreeScratch()) {
    const internal::ElementOptions<double>& e = plan.loss->element;
    ignore_ = static_cast<T>(e.ignore_index);
    // Targets are compared with ignore_index exactly, as in double (CountIgnored, the
    // reference): an ignore_index that T cannot hold matches no target.
    has_ignore_ = e.has_ignore_index && static_cast<double>(ignore_) == e.ignore_index;
    direct_ = args.dtype == kDTypeOf<T>;
    // Outputs are written in place when they have the compute type and nothing is applied
    // after.
    direct_loss_ = direct_ && !plan.reduce && plan.loss_f64 == nullptr && plan.count == 1.0 &&
                   out.loss != nullptr && out.loss_values == nullptr;
    // Gradient division inside the SIMD kernel: the divisor as T plus what T cannot hold of it.
    div_hi_ = static_cast<T>(plan.grad_div);
    div_lo_ = static_cast<T>(plan.grad_div - static_cast<double>(div_hi_));
    w_tile_ = MakeTile<T>(args.weight, args.numel, span);
    p_tile_ = MakeTile<T>(args.pos_weight, args.numel, span);
  }

  bool has_ignore() const { return has_ignore_; }
  T ignore() const { return ignore_; }
  T div_hi() const { return div_hi_; }
  T div_lo() const { return div_lo_; }
  const T* w_tile() const { return w_tile_.get(); }
  const T* p_tile() const { return p_tile_.get(); }
  // Points k->y at the block's smoothed targets (y (1 - s) + s/2, written to scratch) when the
  // loss smooths them; the block kernels take them so (the scalar loops smooth per element).
  void Smooth(internal::BlockArgs<T>* k) const {
    if (!plan_.loss->smooth) return;
    const T s = static_cast<T>(plan_.loss->element.smoothing);
    T* const ysm = scratch_ + 7 * kReduceBlock;
    for (int64_t j = 0; j < k->n; ++j) ysm[j] = k->y[j] * (T(1) - s) + s * T(0.5);
    k->y = ysm;
  }
  // After a block kernel on smoothed targets: dl/dy times dy'/dy = 1 - s.
  void SmoothGradY(const internal::BlockArgs<T>& k) const {
    if (!plan_.loss->smooth || k.gy == nullptr) return;
    const T s = static_cast<T>(plan_.loss->element.smoothing);
    for (int64_t j = 0; j < k.n; ++j) k.gy[j] *= (T(1) - s);
  }

  // Block b's inputs as T (k.y: the raw targets) and its output runs, with the gradient
  // divisor; returns the raw targets.
  const T* Begin(int64_t b, internal::BlockArgs<T>* k) const {
    constexpr int64_t B = kReduceBlock;
    T* const xs = scratch_;
    T* const ys = xs + B;
    T* const ws = ys + B;
    T* const ps = ws + B;
    T* const ls = ps + B;
    T* const gxs = ls + B;
    T* const gys = gxs + B;
    const int64_t i0 = b * B;
    const int64_t n = std::min(B, args_.numel - i0);
    k->grad_divisor = div_hi_;
    k->grad_divisor_lo = div_lo_;
    k->n = n;
    k->x = DenseRun(args_.dtype, args_.logits, i0, n, xs);
    const T* y_raw = DenseRun(args_.targets_dtype, args_.targets, i0, n, ys);
    k->y = y_raw;
    k->w = OperandRun(args_.weight, w_tile_.get(), args_.numel, i0, n, ws);
    k->p = OperandRun(args_.pos_weight, p_tile_.get(), args_.numel, i0, n, ps);
    k->loss = direct_loss_ ? static_cast<T*>(out_.loss) + i0 : ls;
    k->gx = out_.grad_logits ? (direct_ ? static_cast<T*>(out_.grad_logits) + i0 : gxs)
                             : nullptr;
    k->gy = out_.grad_targets ? (direct_ ? static_cast<T*>(out_.grad_targets) + i0 : gys)
                              : nullptr;
    return y_raw;
  }

  // The post-steps of block b, whose element results are in k's output runs: ignored
  // elements zeroed, gradients stored, loss values kept, the block's loss reduced or stored.
  void End(int64_t b, const internal::BlockArgs<T>& k, const T* y_raw, ExactSum* sum) const {
    const int64_t i0 = b * kReduceBlock;
    const int64_t n = k.n;
    if (has_ignore_) {
      for (int64_t j = 0; j < n; ++j) {
        if (y_raw[j] != ignore_) continue;
        k.loss[j] = T(0);
        if (k.gx) k.gx[j] = T(0);
        if (k.gy) k.gy[j] = T(0);
      }
    }
    if (!direct_) {
      if (out_.grad_logits) StoreRun(args_.dtype, out_.grad_logits, i0, n, k.gx);
      if (out_.grad_targets) StoreRun(args_.dtype, out_.grad_targets, i0, n, k.gy);
    }
    if (out_.loss_values != nullptr) {
      for (int64_t j = 0; j < n; ++j) out_.loss_values[i0 + j] = static_cast<double>(k.loss[j]);
    }
    if (plan_.reduce) {
      sum->Add(internal::BlockTreeSum(k.loss, n, tree_));
    } else if (plan_.loss_f64 != nullptr) {
      RowSums(i0, n, k.loss);
    } else if (out_.loss != nullptr && !direct_loss_) {
      if (plan_.count != 1.0) {
        for (int64_t j = 0; j < n; ++j) tree_[j] = static_cast<double>(k.loss[j]) / plan_.count;
        StoreRun(args_.dtype, out_.loss, i0, n, tree_);
      } else {
        StoreRun(args_.dtype, out_.loss, i0, n, k.loss);
      }
    }
  }

 private:
  // Per-sample mean: rows within this block summed here; the elements of a row begun before
  // it (head) or running past it (tail) kept for the pass after all blocks.
  void RowSums(int64_t i0, int64_t n, const T* loss) const {
    const int64_t len = plan_.row_len;
    const int64_t head = std::min(n, (len - i0 % len) % len);
    int64_t j = 0;
    for (; j < head; ++j) plan_.loss_f64[i0 + j] = static_cast<double>(loss[j]);
    for (; j + len <= n; j += len) {
      const double* row;
      if constexpr (std::is_same_v<T, double>) {
        row = loss + j;
      } else {
        for (int64_t m = 0; m < len; ++m) tree_[m] = static_cast<double>(loss[j + m]);
        row = tree_;
      }
      plan_.row_sums[(i0 + j) / len] = ExactSumOf(row, len);
    }
    for (; j < n; ++j) plan_.loss_f64[i0 + j] = static_cast<double>(loss[j]);
  }

  const BceArgs& args_;
  const BceOutputs& out_;
  const Plan& plan_;
  T* const scratch_;
  double* const tree_;
  T ignore_;
  bool has_ignore_;
  bool direct_;
  bool direct_loss_;
  T div_hi_, div_lo_;
  hwy::AlignedFreeUniquePtr<T[]> w_tile_, p_tile_;
};

// BCE with logits over blocks [b0, b1) in compute type T (the SIMD block kernel, BceBlock),
// their block sums added to `sum`. Label smoothing: the kernel gets the smoothed targets, and
// dl/dy of the raw target is scaled by 1 - s after it.
template <typename T>
void BceBlocks(const BceArgs& args, const BceOutputs& out, const Plan& plan, int64_t b0,
               int64_t b1, ExactSum* sum) {
  const BlockIo<T> io(args, out, plan, kTilePiece);
  internal::BlockArgs<T> k;
  for (int64_t b = b0; b < b1; ++b) {
    const T* y_raw = io.Begin(b, &k);
    const int64_t n = k.n;
    io.Smooth(&k);
    if (io.w_tile() == nullptr && io.p_tile() == nullptr) {
      internal::BceBlock(k);
    } else {
      const int64_t i0 = b * kReduceBlock;
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
        piece.w = operand(args.weight, io.w_tile(), k.w);
        piece.p = operand(args.pos_weight, io.p_tile(), k.p);
        internal::BceBlock(piece);
      }
    }
    io.SmoothGradY(k);
    io.End(b, k, y_raw, sum);
  }
}

// torchvision's sigmoid focal loss over blocks [b0, b1), always in double (ResolvedLoss::wide),
// their block sums added to `sum`. Gamma 0, 1 or 2 with non-float64 logits: the SIMD block
// (double lanes with Highway's exp and log1p; float results within one ulp of FocalElement's
// rounding). Float64 logits and other gammas: the scalar FocalElement, the reference's own
// math. dl/dy is not offered (NaN, as the reference).
void FocalBlocks(const BceArgs& args, const BceOutputs& out, const Plan& plan, int64_t b0,
                 int64_t b1, ExactSum* sum) {
  using T = double;
  const internal::ResolvedLoss& r = *plan.loss;
  const BlockIo<T> io(args, out, plan, kReduceBlock);  // the focal loop reads whole blocks
  const bool focal_simd =
      args.dtype != DType::kFloat64 &&
      (r.element.gamma == 0.0 || r.element.gamma == 1.0 || r.element.gamma == 2.0);
  // The scalar loop's options: ignore_index as the block loop compares it.
  internal::ElementOptions<T> eo = r.element;
  eo.has_ignore_index = io.has_ignore();
  internal::BlockArgs<T> k;
  for (int64_t b = b0; b < b1; ++b) {
    const T* y_raw = io.Begin(b, &k);
    const int64_t n = k.n;
    if (focal_simd) {
      io.Smooth(&k);
      internal::FocalBlockArgs fa;
      fa.x = k.x;
      fa.y = k.y;
      fa.w = k.w;
      fa.n = n;
      fa.alpha = eo.alpha;
      fa.gamma = eo.gamma;
      fa.loss = k.loss;
      fa.gx = k.gx;
      fa.grad_divisor = io.div_hi() + io.div_lo();  // T is double here: div_lo is 0
      internal::FocalBlock(fa);
      if (k.gy) std::fill(k.gy, k.gy + n, std::numeric_limits<T>::quiet_NaN());
    } else {
      // The shared scalar math per element (internal::FocalElement).
      for (int64_t j = 0; j < n; ++j) {
        T l, gx, gy;
        internal::LossElement<T>(eo, k.x[j], y_raw[j], k.w ? k.w[j] : T(1), T(1), &l, &gx, &gy);
        k.loss[j] = l;
        if (k.gx) k.gx[j] = gx / (io.div_hi() + io.div_lo());  // div_lo is 0
        if (k.gy) k.gy[j] = gy;  // NaN: the focal loss offers no dl/dy (as the reference)
      }
    }
    io.End(b, k, y_raw, sum);
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
    if (args.on_device != 0 || out.on_device != 0) {
      return absl::FailedPreconditionError(absl::StrCat(
          "the CPU backend cannot read or write CUDA device memory (inputs on device: mask ",
          args.on_device, ", outputs: mask ", out.on_device, "); use the CUDA backend"));
    }
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
    // The loss spec read once (resolved_loss.h). Compute in double when it says so, and on
    // SIMD targets without FMA, which cannot keep the float formulas within 4 ulp.
    const internal::ResolvedLoss loss = internal::ResolveLoss(args);
    const bool wide = loss.wide || !internal::FloatBlockIsExact();
    Plan plan;
    plan.loss = &loss;
    plan.reduce = args.reduction == Reduction::kSum || args.reduction == Reduction::kMean;
    // One count of the ignored targets serves the normalize divisor and BceOutputs::kept.
    const bool count_ignored = loss.divisors.CountsIgnored() ||
                               (out.kept != nullptr && loss.element.has_ignore_index);
    const int64_t ignored = count_ignored ? CountIgnored(args, pool_) : 0;
    const internal::Divisors div = loss.divisors.For(ignored);
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
    const absl::Status run =
        pool_.ParallelForChunks(tasks, args.should_stop, args.chunks_done, [&](int64_t t) {
      const int64_t b0 = t * kBlocksPerTask;
      const int64_t b1 = std::min(blocks, (t + 1) * kBlocksPerTask);
      // One block loop per loss; BCE in double when `wide`, else in float (float32 and half
      // types); the focal loss always in double.
      if (loss.loss == Loss::kFocal) {
        FocalBlocks(args, out, plan, b0, b1, &sums[t]);
      } else if (wide) {
        BceBlocks<double>(args, out, plan, b0, b1, &sums[t]);
      } else {
        BceBlocks<float>(args, out, plan, b0, b1, &sums[t]);
      }
    });
    if (!run.ok()) return run;
    if (out.kept != nullptr) *out.kept = args.numel - ignored;
    if (out.loss == nullptr) return absl::OkStatus();
    if (plan.reduce) {
      StoreReducedLoss(args, sums, div, out.loss);
    } else if (args.reduction == Reduction::kPerSampleMean) {
      StoreRowMeans(args, plan, out.loss);
    }
    return absl::OkStatus();
  }

 private:
  // SUM / MEAN: the tasks' exact sums merged, divided by the normalize count (and the whole's
  // numel for MEAN), rounded once to the dtype.
  static void StoreReducedLoss(const BceArgs& args, const std::vector<ExactSum>& sums,
                               const internal::Divisors& div, void* loss) {
    ExactSum total;
    for (const ExactSum& s : sums) total.Merge(s);
    double v = total.Value() / div.count;
    if (args.reduction == Reduction::kMean) v /= div.mean_n;
    StoreFromDouble(args.dtype, loss, 0, v);
  }

  // PER_SAMPLE_MEAN after all blocks: each row's exact sum (from the block loops when the row
  // lies within one block, else from its elements' values), over last_dim and the normalize
  // count.
  void StoreRowMeans(const BceArgs& args, const Plan& plan, void* loss) {
    const int64_t rows = LossCount(args);
    const int64_t len = args.last_dim;
    constexpr int64_t kRowsPerTask = 4096;
    pool_.ParallelFor((rows + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t t) {
      for (int64_t r = t * kRowsPerTask; r < std::min(rows, (t + 1) * kRowsPerTask); ++r) {
        const int64_t start = r * len;
        const double sum = start / kReduceBlock == (start + len - 1) / kReduceBlock
                               ? plan.row_sums[r]
                               : ExactSumOf(plan.loss_f64 + start, len);
        StoreFromDouble(args.dtype, loss, r, sum / static_cast<double>(len) / plan.count);
      }
    });
  }

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
