#include "client/bench/timeseries.h"

#include <algorithm>
#include <cmath>

#include "client/bench/histogram.h"

namespace lossd::bench {

namespace {
// Four neighbouring buckets of Histogram's layout (256 buckets of width 1 below 256, then 128
// per power of two) make one coarse bucket: 64 per power of two, each within 2/64 of its values.
constexpr int kGroup = 4;
}  // namespace

IntervalSeries::IntervalSeries(int64_t width_ns, int max_intervals)
    : width_ns_(std::max<int64_t>(width_ns, 1)), max_intervals_(std::max(max_intervals, 2)) {}

int IntervalSeries::CoarseIndex(int64_t ns) {
  return Histogram::BucketIndex(std::clamp<int64_t>(ns, 0, Histogram::kMaxValue)) / kGroup;
}

int IntervalSeries::NumCoarse() { return (Histogram::NumBuckets() + kGroup - 1) / kGroup; }

int64_t IntervalSeries::CoarseHigh(int index) {
  return Histogram::BucketHigh(std::min(index * kGroup + kGroup - 1, Histogram::NumBuckets() - 1));
}

void IntervalSeries::Record(int64_t at_ns, int code, int64_t latency_ns) {
  int64_t k = std::max<int64_t>(at_ns, 0) / width_ns_;
  while (k >= max_intervals_) {
    Coarsen();
    k = std::max<int64_t>(at_ns, 0) / width_ns_;
  }
  if (k >= static_cast<int64_t>(intervals_.size())) intervals_.resize(k + 1);
  Interval& in = intervals_[k];
  if (code != 0) {
    ++in.errors;
    return;
  }
  ++in.ok;
  if (in.counts.empty()) in.counts.assign(NumCoarse(), 0);
  ++in.counts[CoarseIndex(latency_ns)];
  in.max_ns = std::max(in.max_ns, std::max<int64_t>(latency_ns, 0));
}

void IntervalSeries::Add(Interval* into, const Interval& from) {
  into->ok += from.ok;
  into->errors += from.errors;
  into->max_ns = std::max(into->max_ns, from.max_ns);
  if (from.counts.empty()) return;
  if (into->counts.empty()) into->counts.assign(from.counts.size(), 0);
  for (size_t i = 0; i < from.counts.size(); ++i) into->counts[i] += from.counts[i];
}

void IntervalSeries::Coarsen() {
  std::vector<Interval> merged((intervals_.size() + 1) / 2);
  for (size_t i = 0; i < intervals_.size(); ++i) Add(&merged[i / 2], intervals_[i]);
  intervals_ = std::move(merged);
  width_ns_ *= 2;
}

void IntervalSeries::Merge(const IntervalSeries& other) {
  IntervalSeries from = other;
  while (width_ns_ < from.width_ns_) Coarsen();
  while (from.width_ns_ < width_ns_) from.Coarsen();
  if (from.intervals_.size() > intervals_.size()) intervals_.resize(from.intervals_.size());
  for (size_t i = 0; i < from.intervals_.size(); ++i) Add(&intervals_[i], from.intervals_[i]);
  while (static_cast<int>(intervals_.size()) > max_intervals_) Coarsen();
  seconds_ = std::max(seconds_, from.seconds_);
}

int64_t IntervalSeries::Quantile(const Interval& in, double q) {
  if (in.ok == 0 || in.counts.empty()) return 0;
  const int64_t rank =
      std::max<int64_t>(1, static_cast<int64_t>(std::ceil(std::clamp(q, 0.0, 1.0) * in.ok)));
  int64_t seen = 0;
  for (size_t i = 0; i < in.counts.size(); ++i) {
    seen += in.counts[i];
    if (seen >= rank) return std::min(CoarseHigh(static_cast<int>(i)), in.max_ns);
  }
  return in.max_ns;
}

std::vector<IntervalSeries::Point> IntervalSeries::Points() const {
  std::vector<Interval> in = intervals_;
  const double width_s = static_cast<double>(width_ns_) / 1e9;
  const double end_s = seconds_ > 0 ? seconds_ : width_s * static_cast<double>(in.size());
  std::vector<double> lengths;
  for (size_t i = 0; i < in.size(); ++i) {
    const double start = width_s * static_cast<double>(i);
    double len = i + 1 == in.size() ? std::min(width_s, end_s - start) : width_s;
    if (len <= 0) len = width_s;  // a run length that does not cover its last call: full width
    lengths.push_back(len);
  }
  if (in.size() >= 2 && lengths.back() < width_s / 2) {
    Add(&in[in.size() - 2], in.back());
    lengths[in.size() - 2] += lengths.back();
    in.pop_back();
    lengths.pop_back();
  }
  std::vector<Point> out;
  for (size_t i = 0; i < in.size(); ++i) {
    Point p;
    p.start_s = width_s * static_cast<double>(i);
    p.seconds = lengths[i];
    p.ok = in[i].ok;
    p.errors = in[i].errors;
    p.qps = p.seconds > 0 ? static_cast<double>(p.ok) / p.seconds : 0;
    p.p50_us = static_cast<double>(Quantile(in[i], 0.5)) / 1e3;
    p.p99_us = static_cast<double>(Quantile(in[i], 0.99)) / 1e3;
    p.max_us = static_cast<double>(in[i].max_ns) / 1e3;
    out.push_back(p);
  }
  return out;
}

}  // namespace lossd::bench
