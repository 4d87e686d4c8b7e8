#include "client/bench/report.h"

#include <algorithm>
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace lossd::bench {

std::string StatusCodeName(int code) {
  static const char* const kNames[kNumStatusCodes] = {
      "OK",           "CANCELLED",          "UNKNOWN",           "INVALID_ARGUMENT",
      "DEADLINE_EXCEEDED", "NOT_FOUND",     "ALREADY_EXISTS",    "PERMISSION_DENIED",
      "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",    "OUT_OF_RANGE",
      "UNIMPLEMENTED", "INTERNAL",          "UNAVAILABLE",       "DATA_LOSS",
      "UNAUTHENTICATED"};
  if (code < 0 || code >= kNumStatusCodes) return absl::StrCat("CODE_", code);
  return kNames[code];
}

void RunStats::Record(int code, int64_t latency_ns) {
  if (code < 0 || code >= kNumStatusCodes) code = 2;  // UNKNOWN
  ++codes[code];
  if (code == 0) latency.Record(latency_ns);
}

int64_t RunStats::errors() const {
  int64_t n = mismatches;
  for (int c = 1; c < kNumStatusCodes; ++c) n += codes[c];
  return n;
}

void RunStats::Merge(const RunStats& o) {
  for (int c = 0; c < kNumStatusCodes; ++c) codes[c] += o.codes[c];
  mismatches += o.mismatches;
  warmup_calls += o.warmup_calls;
  latency.Merge(o.latency);
  server_queue.Merge(o.server_queue);
  server_compute.Merge(o.server_compute);
  server_total.Merge(o.server_total);
  ok_bytes += o.ok_bytes;
  ok_elements += o.ok_elements;
  seconds += o.seconds;
  cpu_user_s += o.cpu_user_s;
  cpu_sys_s += o.cpu_sys_s;
  series.insert(series.end(), o.series.begin(), o.series.end());
}

RowSummary Summarize(const RowLabel& label, const RunStats& s) {
  RowSummary r;
  r.label = label;
  r.ok = s.ok();
  r.errors = s.errors();
  r.sent = s.sent();
  r.mismatches = s.mismatches;
  r.warmup_calls = s.warmup_calls;
  for (int c = 1; c < kNumStatusCodes; ++c) {
    if (s.codes[c] > 0) r.codes.emplace_back(StatusCodeName(c), s.codes[c]);
  }
  if (s.mismatches > 0) r.codes.emplace_back("MISMATCH", s.mismatches);
  r.seconds = s.seconds;
  if (s.seconds > 0) {
    r.qps = static_cast<double>(s.ok()) / s.seconds;
    r.mbps = static_cast<double>(s.ok_bytes) / s.seconds / 1e6;
    r.elements_per_s = static_cast<double>(s.ok_elements) / s.seconds;
  }
  auto us = [](int64_t ns) { return static_cast<double>(ns) / 1e3; };
  r.p50_us = us(s.latency.Quantile(0.5));
  r.p90_us = us(s.latency.Quantile(0.9));
  r.p95_us = us(s.latency.Quantile(0.95));
  r.p99_us = us(s.latency.Quantile(0.99));
  r.p999_us = us(s.latency.Quantile(0.999));
  r.max_us = us(s.latency.max());
  r.mean_us = s.latency.mean() / 1e3;
  r.server_queue_p50_us = us(s.server_queue.Quantile(0.5));
  r.server_compute_p50_us = us(s.server_compute.Quantile(0.5));
  r.server_total_p50_us = us(s.server_total.Quantile(0.5));
  r.server_total_p99_us = us(s.server_total.Quantile(0.99));
  r.client_cpu_s = s.cpu_user_s + s.cpu_sys_s;
  r.client_cpu_cores = s.seconds > 0 ? r.client_cpu_s / s.seconds : 0;
  // Histogram's buckets four at a time (its layout has 256 buckets of width 1, then 128 per
  // power of two: a group of four never straddles a power of two).
  for (int i = 0; i < Histogram::NumBuckets(); i += 4) {
    RowSummary::Bucket b;
    for (int j = i; j < std::min(i + 4, Histogram::NumBuckets()); ++j) {
      b.count += s.latency.bucket_count(j);
    }
    if (b.count == 0) continue;
    b.low_us = us(Histogram::BucketLow(i));
    b.high_us = us(Histogram::BucketHigh(std::min(i + 3, Histogram::NumBuckets() - 1)));
    r.latency_buckets.push_back(b);
  }
  double offset = 0;
  for (size_t k = 0; k < s.series.size(); ++k) {
    double end = offset;
    for (const IntervalSeries::Point& p : s.series[k].Points()) {
      r.intervals.push_back({static_cast<int>(k) + 1, offset + p.start_s, p});
      end = offset + p.start_s + p.seconds;
    }
    offset = end;
  }
  return r;
}

Ratio Compare(const RowSummary& server, const RowSummary& baseline) {
  Ratio r;
  r.server = server.label.server;
  r.baseline = baseline.label.server;
  if (baseline.ok == 0) return r;
  if (baseline.qps > 0) r.qps_ratio = server.qps / baseline.qps;
  if (baseline.p50_us > 0) r.p50_ratio = server.p50_us / baseline.p50_us;
  if (baseline.p99_us > 0) r.p99_ratio = server.p99_us / baseline.p99_us;
  if (server.ok > 0) r.p50_diff_us = server.p50_us - baseline.p50_us;
  return r;
}

namespace {

std::string PointText(const RowLabel& l) {
  if (l.load == "closed") return absl::StrFormat("c%g", l.concurrency);
  return absl::StrFormat("%g/s", l.rate);
}

std::string JsonString(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          out += absl::StrFormat("\\u%04x", c);
        } else {
          out += c;
        }
    }
  }
  return out + "\"";
}

// Numbers as JSON accepts them (no inf or NaN).
std::string Num(double v) {
  if (!(v == v) || v > 1e300 || v < -1e300) return "null";
  return absl::StrFormat("%.6g", v);
}

}  // namespace

std::string TableHeader() {
  return absl::StrFormat("%-14s %-8s %7s %9s %9s %9s %9s %9s %9s %9s %8s %8s %8s %6s",
                         "server", "point", "seconds", "ok", "errors", "calls/s", "MB/s",
                         "p50 us", "p90 us", "p99 us", "p99.9 us", "max us", "srv us",
                         "cpu");
}

std::string TableRow(const RowSummary& r) {
  return absl::StrFormat(
      "%-14s %-8s %7.2f %9d %9d %9.0f %9.1f %9.1f %9.1f %9.1f %8.0f %8.0f %8.1f %5.0f%%",
      r.label.server.substr(0, 14), PointText(r.label), r.seconds, r.ok, r.errors, r.qps,
      r.mbps, r.p50_us, r.p90_us, r.p99_us, r.p999_us, r.max_us, r.server_total_p50_us,
      100 * r.client_cpu_cores);
}

std::string RowJson(const RowSummary& r) {
  std::vector<std::string> codes;
  for (const auto& [name, n] : r.codes) codes.push_back(absl::StrCat(JsonString(name), ": ", n));
  std::vector<std::string> buckets, intervals;
  for (const auto& b : r.latency_buckets) {
    // Bucket bounds to the nanosecond (%.6g would merge neighbours above 100 ms).
    buckets.push_back(absl::StrFormat("[%.10g, %.10g, %d]", b.low_us, b.high_us, b.count));
  }
  for (const auto& i : r.intervals) {
    const IntervalSeries::Point& p = i.point;
    intervals.push_back(absl::StrCat(
        "{\"round\": ", i.round, ", \"t_s\": ", Num(i.t_s), ", \"seconds\": ", Num(p.seconds),
        ", \"ok\": ", p.ok, ", \"errors\": ", p.errors, ", \"qps\": ", Num(p.qps),
        ", \"p50_us\": ", Num(p.p50_us), ", \"p99_us\": ", Num(p.p99_us),
        ", \"max_us\": ", Num(p.max_us), "}"));
  }
  return absl::StrCat(
      "{\"server\": ", JsonString(r.label.server), ", \"load\": ", JsonString(r.label.load),
      ", \"concurrency\": ", Num(r.label.concurrency), ", \"rate\": ", Num(r.label.rate),
      ", \"rounds\": ", r.label.rounds, ", \"seconds\": ", Num(r.seconds), ", \"sent\": ", r.sent,
      ", \"ok\": ", r.ok, ", \"errors\": ", r.errors, ", \"mismatches\": ", r.mismatches,
      ", \"warmup_calls\": ", r.warmup_calls, ", \"error_codes\": {", absl::StrJoin(codes, ", "),
      "}, \"qps\": ", Num(r.qps), ", \"mb_per_s\": ", Num(r.mbps),
      ", \"elements_per_s\": ", Num(r.elements_per_s), ", \"latency_us\": {\"p50\": ",
      Num(r.p50_us), ", \"p90\": ", Num(r.p90_us), ", \"p95\": ", Num(r.p95_us),
      ", \"p99\": ", Num(r.p99_us), ", \"p999\": ", Num(r.p999_us), ", \"max\": ",
      Num(r.max_us), ", \"mean\": ", Num(r.mean_us), "}, \"server_us\": {\"queue_p50\": ",
      Num(r.server_queue_p50_us), ", \"compute_p50\": ", Num(r.server_compute_p50_us),
      ", \"total_p50\": ", Num(r.server_total_p50_us), ", \"total_p99\": ",
      Num(r.server_total_p99_us), "}, \"client_cpu\": {\"seconds\": ", Num(r.client_cpu_s),
      ", \"cores\": ", Num(r.client_cpu_cores), "}, \"latency_histogram_us\": [",
      absl::StrJoin(buckets, ", "), "], \"intervals\": [", absl::StrJoin(intervals, ", "), "]}");
}

std::string RatioJson(const Ratio& r) {
  return absl::StrCat("{\"server\": ", JsonString(r.server), ", \"baseline\": ",
                      JsonString(r.baseline), ", \"qps_ratio\": ", Num(r.qps_ratio),
                      ", \"p50_ratio\": ", Num(r.p50_ratio), ", \"p99_ratio\": ",
                      Num(r.p99_ratio), ", \"p50_diff_us\": ", Num(r.p50_diff_us), "}");
}

std::string CsvHeader() {
  return "server,load,concurrency,rate,rounds,seconds,sent,ok,errors,mismatches,warmup_calls,"
         "qps,mb_per_s,p50_us,p90_us,p95_us,p99_us,p999_us,max_us,mean_us,server_queue_p50_us,"
         "server_compute_p50_us,server_total_p50_us,client_cpu_s,client_cpu_cores";
}

std::string CsvRow(const RowSummary& r) {
  std::string server = r.label.server;
  for (char& c : server) {
    if (c == ',' || c == '"' || c == '\n') c = ' ';
  }
  return absl::StrFormat(
      "%s,%s,%g,%g,%d,%.6g,%d,%d,%d,%d,%d,%.6g,%.6g,%.6g,%.6g,%.6g,%.6g,%.6g,%.6g,%.6g,%.6g,"
      "%.6g,%.6g,%.6g,%.6g",
      server, r.label.load, r.label.concurrency, r.label.rate, r.label.rounds, r.seconds, r.sent,
      r.ok, r.errors, r.mismatches, r.warmup_calls, r.qps, r.mbps, r.p50_us, r.p90_us, r.p95_us,
      r.p99_us, r.p999_us, r.max_us, r.mean_us, r.server_queue_p50_us, r.server_compute_p50_us,
      r.server_total_p50_us, r.client_cpu_s, r.client_cpu_cores);
}

}  // namespace lossd::bench
