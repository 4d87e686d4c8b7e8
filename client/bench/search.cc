#include "client/bench/search.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace lossd::bench {

namespace {

std::string Us(int64_t ns) { return absl::StrFormat("%.1f us", static_cast<double>(ns) / 1e3); }

std::string Quoted(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    if (static_cast<unsigned char>(c) >= 0x20) out += c;
  }
  return out + "\"";
}

std::string Num(double v) {
  if (!std::isfinite(v)) return "null";
  return absl::StrFormat("%.6g", v);
}

}  // namespace

absl::Status ValidateSearchOptions(const SearchOptions& o) {
  if (o.slo_p99_ns <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("the p99 objective must be > 0, not ",
                                                   o.slo_p99_ns, " ns"));
  }
  if (!(o.max_error_fraction > 0 && o.max_error_fraction <= 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("the error fraction must be in (0, 1], not ", o.max_error_fraction));
  }
  if (!(o.min_achieved_fraction > 0 && o.min_achieved_fraction <= 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("the achieved fraction must be in (0, 1], not ", o.min_achieved_fraction));
  }
  if (!(o.min_rps > 0) || !(o.start_rps >= o.min_rps) || !(o.max_rps >= o.start_rps) ||
      !std::isfinite(o.max_rps)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the rates must satisfy 0 < min <= start <= max, not min ", o.min_rps, ", start ",
        o.start_rps, ", max ", o.max_rps));
  }
  if (!(o.precision > 0 && o.precision < 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("the precision must be in (0, 1), not ", o.precision));
  }
  if (o.max_points < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("at least one point must be allowed, not ", o.max_points));
  }
  return absl::OkStatus();
}

std::string SearchVerdict(const SearchOptions& o, double offered_rps, const SearchMeasurement& m) {
  if (m.sent == 0 || m.sent == m.errors) return "no successful call";
  if (static_cast<double>(m.errors) >= o.max_error_fraction * static_cast<double>(m.sent)) {
    return absl::StrFormat("errors %d of %d (>= %g%%)", m.errors, m.sent,
                           100 * o.max_error_fraction);
  }
  if (m.p99_ns > o.slo_p99_ns) return absl::StrCat("p99 ", Us(m.p99_ns), " > ", Us(o.slo_p99_ns));
  if (m.achieved_rps < o.min_achieved_fraction * offered_rps) {
    return absl::StrFormat("achieved %.0f/s < %g of %g/s", m.achieved_rps,
                           o.min_achieved_fraction, offered_rps);
  }
  return "";
}

SearchResult FindMaxRate(const SearchOptions& o,
                         const std::function<SearchMeasurement(double rps)>& measure) {
  SearchResult r;
  double held = 0;    // highest rate that held
  double failed = 0;  // lowest rate above `held` that failed (0: none yet)
  // Returns false when the search must end (interrupted or out of points).
  auto try_rate = [&](double rps) -> bool {
    SearchPoint p;
    p.offered_rps = rps;
    p.m = measure(rps);
    if (p.m.interrupted) {
      p.why = "interrupted";
      r.points.push_back(p);
      r.end = "interrupted";
      return false;
    }
    p.why = SearchVerdict(o, rps, p.m);
    p.holds = p.why.empty();
    r.points.push_back(p);
    if (p.holds && rps > held) {
      held = rps;
      r.best_index = static_cast<int>(r.points.size()) - 1;
      if (failed != 0 && failed <= held) failed = 0;  // noise: a failed rate below one that held
    }
    if (!p.holds && rps > held && (failed == 0 || rps < failed)) failed = rps;
    if (static_cast<int>(r.points.size()) >= o.max_points) {
      r.end = absl::StrCat("the limit of ", o.max_points, " points was reached");
      return false;
    }
    return true;
  };

  // Up from the start rate, doubling.
  double rps = o.start_rps;
  bool go = try_rate(rps);
  if (go && held == 0) {
    // The start fails: halve until a rate holds or the rate gets below min_rps.
    while (go && held == 0) {
      rps /= 2;
      if (rps < o.min_rps) {
        r.end = absl::StrCat("no rate down to ", Num(o.min_rps), "/s holds");
        go = false;
        break;
      }
      go = try_rate(rps);
    }
  } else {
    while (go && failed == 0) {
      if (held >= o.max_rps) {
        r.end = absl::StrCat("the highest rate allowed (", Num(o.max_rps), "/s) holds");
        go = false;
        break;
      }
      rps = std::min(held * 2, o.max_rps);
      go = try_rate(rps);
    }
  }
  // Bisection between the highest rate that held and the lowest that failed.
  while (go && held > 0 && failed > 0) {
    if (failed - held <= o.precision * held) {
      r.end = absl::StrCat("bracketed within ", Num(100 * o.precision), "%");
      break;
    }
    go = try_rate((held + failed) / 2);
  }
  r.best_rps = held;
  r.failed_rps = failed;
  return r;
}

std::string SearchJson(const SearchOptions& o, const SearchResult& r, const std::string& server) {
  std::vector<std::string> points;
  for (const SearchPoint& p : r.points) {
    points.push_back(absl::StrCat(
        "{\"offered_rps\": ", Num(p.offered_rps), ", \"achieved_rps\": ", Num(p.m.achieved_rps),
        ", \"p99_us\": ", Num(static_cast<double>(p.m.p99_ns) / 1e3), ", \"sent\": ", p.m.sent,
        ", \"errors\": ", p.m.errors, ", \"holds\": ", p.holds ? "true" : "false",
        ", \"why\": ", Quoted(p.why), "}"));
  }
  return absl::StrCat(
      "{\"server\": ", Quoted(server), ", \"slo_p99_us\": ",
      Num(static_cast<double>(o.slo_p99_ns) / 1e3), ", \"max_error_fraction\": ",
      Num(o.max_error_fraction), ", \"min_achieved_fraction\": ", Num(o.min_achieved_fraction),
      ", \"best_rps\": ", Num(r.best_rps), ", \"failed_rps\": ", Num(r.failed_rps),
      ", \"end\": ", Quoted(r.end), ", \"points\": [", absl::StrJoin(points, ", "), "]}");
}

}  // namespace lossd::bench
