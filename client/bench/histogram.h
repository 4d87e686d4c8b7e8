// A log-linear latency histogram with bounded memory (the layout of HdrHistogram): values are
// grouped by their power of two, and each power of two is split into 2^kSubBucketBits equal
// sub-buckets, so every recorded value is known to within 2/2^kSubBucketBits of itself
// (0.8%) from 1 ns to about 18 minutes, in 34 KiB. Not thread-safe: each load-generating thread
// records into its own histogram and the report merges them (Merge).
#ifndef LOSSD_CLIENT_BENCH_HISTOGRAM_H_
#define LOSSD_CLIENT_BENCH_HISTOGRAM_H_

#include <cstdint>
#include <vector>

namespace lossd::bench {

class Histogram {
 public:
  static constexpr int kSubBucketBits = 8;
  static constexpr int kMaxBits = 40;  // values from 0 to 2^40 - 1 (ns: 18.3 minutes)
  static constexpr int64_t kMaxValue = (int64_t{1} << kMaxBits) - 1;

  Histogram();

  // Records one value (negative ones as 0, larger than kMaxValue as kMaxValue, counted in
  // saturated()).
  void Record(int64_t value);
  void Merge(const Histogram& other);
  void Clear();

  int64_t count() const { return count_; }
  int64_t min() const { return count_ == 0 ? 0 : min_; }  // exact
  int64_t max() const { return max_; }                    // exact
  double mean() const { return count_ == 0 ? 0.0 : sum_ / static_cast<double>(count_); }
  int64_t saturated() const { return saturated_; }

  // The smallest recorded-bucket bound v such that at least q of the values are <= v (q in
  // [0, 1]; the upper edge of the bucket holding that rank, capped at max()). 0 when empty.
  int64_t Quantile(double q) const;

  // Bucket layout, exposed for tests and for exporting the histogram.
  static int BucketIndex(int64_t value);
  static int64_t BucketLow(int index);   // smallest value of the bucket
  static int64_t BucketHigh(int index);  // largest value of the bucket
  static int NumBuckets();
  int64_t bucket_count(int index) const { return counts_[index]; }

 private:
  std::vector<int64_t> counts_;
  int64_t count_ = 0;
  int64_t min_ = 0;
  int64_t max_ = 0;
  int64_t saturated_ = 0;
  double sum_ = 0;
};

}  // namespace lossd::bench

#endif  // LOSSD_CLIENT_BENCH_HISTOGRAM_H_
