// Deterministic summation: exact sums of doubles (ExactSum, ExactSumOf) and the fixed-block
// reduction behind every SUM, MEAN and per-sample mean (TreeSumBlock, BlockSum), so that a
// reduced loss depends only on the element values. ExactSumOf and TreeSumBlock have no state
// and are thread-safe; an ExactSum or BlockSum object is not: one thread at a time per object.
#ifndef LOSSD_KERNELS_EXACT_SUM_H_
#define LOSSD_KERNELS_EXACT_SUM_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace lossd::kernels {

// Reductions are deterministic: element values (as double) are grouped in fixed blocks of
// kReduceBlock consecutive flat indices; each block is summed by a fixed pairwise tree
// (v[j] += v[j + h] for h = kReduceBlock/2 ... 1, zero-padded), and the block sums are added
// exactly (an exact accumulator, rounded once). The result depends only on the element values,
// never on thread count, backend scheduling or work split.
inline constexpr int64_t kReduceBlock = 2048;

// Exact sum of doubles, independent of the order of Add calls. Not thread-safe.
class ExactSum {
 public:
  ExactSum();
  void Add(double v);
  void Merge(const ExactSum& other);
  // The exact sum rounded to double (NaN if any NaN or +inf and -inf were added; always the
  // same NaN, a positive quiet NaN, so that the bits never depend on the order of additions).
  double Value() const;

  // Fixed point with its least significant bit at 2^-1126, in 32-bit digits held in int64
  // words (the headroom absorbs 2^30 additions between carry normalizations): word k weighs
  // 2^(32 (k - 2) - 1126).
  static constexpr int kWords = 74;

  // The state in normalized form: words 0 and 1 are 0, words 2..kWords-2 in [0, 2^32), the
  // last word signed (|w| < 2^31); `special` the sum of the non-finite values added (0, +inf,
  // -inf, or NaN). Two sums with the same value export the same words.
  void ExportState(int64_t words[kWords], double* special) const;
  // Replaces this sum by an exported state; InvalidArgument (nothing changed) when a word is
  // outside its range or `special` is finite and not +0.
  absl::Status ImportState(const int64_t words[kWords], double special);

 private:
  int64_t words_[kWords];
  int64_t pending_;  // Add calls since the last carry normalization
  double special_;   // sum of non-finite values (inf/NaN), 0 when none
  void Normalize();
};

// The exact sum of n doubles rounded once: the bits ExactSum gives for them, faster where the
// values are finite, at most 8192, and within 2^60 of each other in magnitude (one 128-bit
// integer holds their sum exactly); else through ExactSum.
double ExactSumOf(const double* v, int64_t n);

// Sums one block of up to kReduceBlock values with the fixed pairwise tree. `values` is
// scratch of kReduceBlock doubles; entries [n, kReduceBlock) are treated as 0 and overwritten.
double TreeSumBlock(double* values, int64_t n);

// The reduction of kReduceBlock above over a stream of values that arrives in pieces of any
// size: the result is bitwise identical to reducing all values in one call, however the stream
// is split. Not thread-safe.
//
// A BlockSum may also reduce one slice of a longer stream: constructed with the flat index of
// its first value (`offset`), its blocks are aligned to the whole stream. The values before
// the first block boundary (the head) and after the last one (the tail) are kept as they are,
// so that slices which tile a range can be joined (Append) into exactly the state that one
// BlockSum over the range would have: the same Value() bits, however the range was cut and in
// whatever order the slices were computed. With offset 0 (the default) there is no head.
class BlockSum {
 public:
  BlockSum() : BlockSum(0) {}
  explicit BlockSum(int64_t offset);  // offset >= 0
  void Add(const double* values, int64_t n);
  int64_t offset() const { return offset_; }
  int64_t count() const { return count_; }
  // Sum of everything added so far, rounded once: the complete blocks, plus the head and the
  // tail each reduced by the block tree as a block of its own.
  double Value() const;

  // Joins the slice that directly follows this one (next.offset() == offset() + count()):
  // afterwards this is the state of one BlockSum over both. InvalidArgument (nothing
  // changed) when the slices are not adjacent.
  absl::Status Append(const BlockSum& next);

  // The state, little-endian and independent of the platform (appended to `out`):
  //   uint32 kReduceBlock, uint32 ExactSum::kWords, uint32 H (head values), uint32 T (tail
  //   values), int64 offset, int64 count, double special, int64 words[kWords] (see
  //   ExactSum::ExportState), double head[H], double tail[T].
  // 40 + 8 * (kWords + H + T) bytes; H and T are below kReduceBlock.
  void Serialize(std::string* out) const;
  static constexpr size_t kStateFixedBytes = 40 + 8 * ExactSum::kWords;
  // The inverse of Serialize for exactly `bytes` (no more, no less). InvalidArgument naming
  // the first inconsistency (block size, word count, lengths, counts that do not match the
  // offset, out-of-range words).
  static absl::StatusOr<BlockSum> Deserialize(std::string_view bytes);

 private:
  int64_t offset_ = 0;
  int64_t head_need_ = 0;         // values from offset_ to the first block boundary
  std::vector<double> head_;      // the first head_need_ values (fewer while arriving)
  ExactSum total_;                // completed blocks
  std::vector<double> partial_;   // values of the block in progress (after the head)
  int64_t count_ = 0;
};

}  // namespace lossd::kernels

#endif  // LOSSD_KERNELS_EXACT_SUM_H_
