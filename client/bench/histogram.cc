#include "client/bench/histogram.h"

#include <algorithm>
#include <bit>
#include <cmath>

namespace lossd::bench {

namespace {
constexpr int64_t kSub = int64_t{1} << Histogram::kSubBucketBits;
}  // namespace

// Values below kSub have buckets of width 1 (indices 0..kSub-1). A larger value with its
// highest set bit at position b (b >= kSubBucketBits) falls in group g = b - kSubBucketBits + 1,
// which covers [2^b, 2^(b+1)) with kSub / 2 buckets of width 2^g: a bucket's width is at most
// 2^g / 2^b = 2 / kSub of the values in it.
int Histogram::BucketIndex(int64_t value) {
  if (value < kSub) return static_cast<int>(std::max<int64_t>(value, 0));
  const int b = 63 - std::countl_zero(static_cast<uint64_t>(value));
  const int g = b - kSubBucketBits + 1;  // >= 1
  const int64_t within = (value >> g) - kSub / 2;  // in [0, kSub / 2)
  return static_cast<int>(kSub + (g - 1) * (kSub / 2) + within);
}

int64_t Histogram::BucketLow(int index) {
  if (index < kSub) return index;
  const int g = (index - static_cast<int>(kSub)) / static_cast<int>(kSub / 2) + 1;
  const int64_t within = (index - kSub) % (kSub / 2);
  return (kSub / 2 + within) << g;
}

int64_t Histogram::BucketHigh(int index) {
  if (index < kSub) return index;
  const int g = (index - static_cast<int>(kSub)) / static_cast<int>(kSub / 2) + 1;
  return BucketLow(index) + (int64_t{1} << g) - 1;
}

int Histogram::NumBuckets() { return BucketIndex(kMaxValue) + 1; }

Histogram::Histogram() : counts_(NumBuckets(), 0) {}

void Histogram::Record(int64_t value) {
  if (value < 0) value = 0;
  if (value > kMaxValue) {
    value = kMaxValue;
    ++saturated_;
  }
  ++counts_[BucketIndex(value)];
  if (count_ == 0 || value < min_) min_ = value;
  if (value > max_) max_ = value;
  ++count_;
  sum_ += static_cast<double>(value);
}

void Histogram::Merge(const Histogram& other) {
  if (other.count_ == 0) return;
  for (size_t i = 0; i < counts_.size(); ++i) counts_[i] += other.counts_[i];
  min_ = count_ == 0 ? other.min_ : std::min(min_, other.min_);
  max_ = std::max(max_, other.max_);
  count_ += other.count_;
  saturated_ += other.saturated_;
  sum_ += other.sum_;
}

void Histogram::Clear() { *this = Histogram(); }

int64_t Histogram::Quantile(double q) const {
  if (count_ == 0) return 0;
  q = std::clamp(q, 0.0, 1.0);
  // The rank (1-based) of the value at quantile q: at least one value.
  const int64_t rank = std::max<int64_t>(1, static_cast<int64_t>(std::ceil(q * count_)));
  int64_t seen = 0;
  for (size_t i = 0; i < counts_.size(); ++i) {
    seen += counts_[i];
    if (seen >= rank) {
      return std::clamp(BucketHigh(static_cast<int>(i)), min_, max_);
    }
  }
  return max_;
}

}  // namespace lossd::bench
