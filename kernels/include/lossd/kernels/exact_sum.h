// Deterministic summation: exact sums of doubles (ExactSum, ExactSumOf) and the fixed-block
// reduction behind every SUM, MEAN and per-sample mean (TreeSumBlock, BlockSum), so that a
// reduced loss depends only on the element values. ExactSumOf and TreeSumBlock have no state
// and are thread-safe; an ExactSum or BlockSum object is not: one thread at a time per object.
#ifndef LOSSD_KERNELS_EXACT_SUM_H_
#define LOSSD_KERNELS_EXACT_SUM_H_

#include <cstdint>
#include <vector>

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
  // The exact sum rounded to double (NaN if any NaN or +inf and -inf were added).
  double Value() const;

 private:
  // Fixed point with its least significant bit at 2^-1126, in 32-bit digits held in int64
  // words (the headroom absorbs 2^30 additions between carry normalizations).
  static constexpr int kWords = 74;
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
class BlockSum {
 public:
  BlockSum();
  void Add(const double* values, int64_t n);
  int64_t count() const { return count_; }
  double Value() const;  // sum of everything added so far, rounded once

 private:
  ExactSum total_;                // completed blocks
  std::vector<double> partial_;   // values of the block in progress
  int64_t count_ = 0;
};

}  // namespace lossd::kernels

#endif  // LOSSD_KERNELS_EXACT_SUM_H_
