#include "client/bench/spec.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace lossd::bench {

namespace {

// Splits "12.5Mi" into the number and its multiplier; false for an unknown suffix.
bool SplitSuffix(absl::string_view text, absl::string_view* number, double* multiplier) {
  struct Suffix {
    const char* text;
    double value;
  };
  static constexpr Suffix kSuffixes[] = {{"Ki", 1024.0}, {"Mi", 1048576.0},
                                         {"Gi", 1073741824.0}, {"k", 1e3}, {"K", 1e3},
                                         {"M", 1e6}, {"G", 1e9}};
  for (const Suffix& s : kSuffixes) {
    if (absl::EndsWith(text, s.text)) {
      *number = text.substr(0, text.size() - std::strlen(s.text));
      *multiplier = s.value;
      return true;
    }
  }
  *number = text;
  *multiplier = 1;
  return true;
}

// *text without surrounding white space, split into its number and the suffix's multiplier.
std::pair<absl::string_view, double> Split(absl::string_view* text) {
  *text = absl::StripAsciiWhitespace(*text);
  absl::string_view number;
  double multiplier = 1;
  SplitSuffix(*text, &number, &multiplier);
  return {number, multiplier};
}

}  // namespace

absl::StatusOr<double> ParseAmount(absl::string_view text) {
  const auto [number, multiplier] = Split(&text);
  double v = 0;
  if (number.empty() || !absl::SimpleAtod(number, &v) || !std::isfinite(v) || v <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("\"", text, "\" is not a positive number (suffixes k, M, G, Ki, Mi, Gi)"));
  }
  return v * multiplier;
}

absl::StatusOr<int64_t> ParseCount(absl::string_view text) {
  const auto [number, multiplier] = Split(&text);
  int64_t v = 0;
  if (number.empty() || !absl::SimpleAtoi(number, &v) || v < 0 ||
      static_cast<double>(v) * multiplier > 9.0e18) {
    return absl::InvalidArgumentError(absl::StrCat(
        "\"", text, "\" is not a whole number >= 0 (suffixes k, M, G, Ki, Mi, Gi)"));
  }
  return static_cast<int64_t>(std::llround(static_cast<double>(v) * multiplier));
}

absl::StatusOr<std::vector<double>> ParseRange(absl::string_view text, int max_points) {
  std::vector<double> points;
  auto too_many = [&] {
    return absl::InvalidArgumentError(
        absl::StrCat("range \"", text, "\" has more than ", max_points, " points"));
  };
  if (text.find(':') == absl::string_view::npos) {
    for (absl::string_view part : absl::StrSplit(text, ',')) {
      auto v = ParseAmount(part);
      if (!v.ok()) return v.status();
      points.push_back(*v);
      if (static_cast<int>(points.size()) > max_points) return too_many();
    }
    return points;
  }
  std::vector<absl::string_view> parts = absl::StrSplit(text, ':');
  if (parts.size() < 2 || parts.size() > 3) {
    return absl::InvalidArgumentError(
        absl::StrCat("range \"", text, "\": expected LO:HI, LO:HI:xFACTOR or LO:HI:+STEP"));
  }
  auto lo = ParseAmount(parts[0]);
  if (!lo.ok()) return lo.status();
  auto hi = ParseAmount(parts[1]);
  if (!hi.ok()) return hi.status();
  if (*hi < *lo) {
    return absl::InvalidArgumentError(
        absl::StrCat("range \"", text, "\": the end is below the start"));
  }
  bool multiply = true;
  double step = 2;
  if (parts.size() == 3) {
    absl::string_view s = parts[2];
    if (absl::ConsumePrefix(&s, "x") || absl::ConsumePrefix(&s, "*")) {
      multiply = true;
    } else if (absl::ConsumePrefix(&s, "+")) {
      multiply = false;
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("range \"", text, "\": the step must be xFACTOR or +STEP"));
    }
    auto v = ParseAmount(s);
    if (!v.ok()) return v.status();
    step = *v;
    if (multiply && step <= 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("range \"", text, "\": a factor must be > 1"));
    }
  }
  // Points are computed from the index (no accumulated rounding); the end is included when a
  // point lands on it to within a relative 1e-9.
  const double slack = *hi * 1e-9;
  for (int i = 0;; ++i) {
    const double v = multiply ? *lo * std::pow(step, i) : *lo + step * i;
    if (v > *hi + slack) break;
    points.push_back(std::min(v, *hi));
    if (static_cast<int>(points.size()) > max_points) return too_many();
  }
  return points;
}

absl::StatusOr<std::vector<MixEntry>> ParseMix(absl::string_view text) {
  std::vector<MixEntry> entries;
  for (absl::string_view item : absl::StrSplit(text, ',')) {
    item = absl::StripAsciiWhitespace(item);
    std::vector<absl::string_view> f = absl::StrSplit(item, ':');
    MixEntry e;
    absl::string_view elements;
    if (f.size() == 1) {
      elements = f[0];
    } else if (f.size() == 2 || f.size() == 3) {
      if (!absl::SimpleAtod(f[0], &e.weight) || !std::isfinite(e.weight) || e.weight <= 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            "mix item \"", item, "\": the weight \"", f[0], "\" is not a number > 0"));
      }
      elements = f[1];
      if (f.size() == 3) e.variant = std::string(f[2]);
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("mix item \"", item, "\": expected WEIGHT:ELEMENTS[:VARIANT]"));
    }
    auto n = ParseCount(elements);
    if (!n.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("mix item \"", item, "\": ", n.status().message()));
    }
    if (*n < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("mix item \"", item, "\": at least 1 element"));
    }
    e.elements = *n;
    if (e.variant != "ok" && e.variant != "badshape") {
      return absl::InvalidArgumentError(absl::StrCat(
          "mix item \"", item, "\": unknown variant \"", e.variant, "\" (ok or badshape)"));
    }
    if (e.variant == "badshape" && e.elements < 2) {
      return absl::InvalidArgumentError(
          absl::StrCat("mix item \"", item, "\": badshape needs at least 2 elements"));
    }
    entries.push_back(e);
  }
  if (entries.empty()) return absl::InvalidArgumentError("empty mix");
  return entries;
}

MixPicker::MixPicker(const std::vector<MixEntry>& entries) {
  double total = 0;
  for (const MixEntry& e : entries) total += e.weight;
  double run = 0;
  for (const MixEntry& e : entries) {
    run += e.weight;
    cumulative_.push_back(run / total);
  }
  if (!cumulative_.empty()) cumulative_.back() = 1.0;
}

int MixPicker::Pick(double u) const {
  const auto it = std::upper_bound(cumulative_.begin(), cumulative_.end(), u);
  if (it == cumulative_.end()) return static_cast<int>(cumulative_.size()) - 1;
  return static_cast<int>(it - cumulative_.begin());
}

std::string StopReason(const StopRule& rule, int64_t p99_ns, int64_t sent, int64_t errors) {
  if (sent > 0 && errors > 0 &&
      static_cast<double>(errors) > rule.max_error_fraction * static_cast<double>(sent)) {
    return absl::StrCat(errors, " of ", sent, " calls failed (more than ",
                        rule.max_error_fraction * 100, "%)");
  }
  if (rule.max_p99_ns > 0 && p99_ns > rule.max_p99_ns) {
    return absl::StrCat("p99 ", p99_ns / 1000, " us is above the bound of ",
                        rule.max_p99_ns / 1000, " us");
  }
  return "";
}

}  // namespace lossd::bench
