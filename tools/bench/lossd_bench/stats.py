"""Medians, ratios and tables of the service benchmark (pure functions, no I/O).

Every ratio is taken per repetition between measurements of the same repetition (the modes
run interleaved, so both sides of a ratio saw about the same machine state), and the tables
print the median of those per-repetition ratios. Rates and latencies are medians over
repetitions.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

NAN = float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by the nearest-rank method; NaN for no values."""
    if not values:
        return NAN
    s = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(s)))
    return s[min(rank, len(s)) - 1]


def median(values: Iterable[Optional[float]]) -> float:
    """Median of the finite values; NaN when there is none."""
    v = [x for x in values if x is not None and not math.isnan(x)]  # type: List[float]
    return statistics.median(v) if v else NAN


def paired_ratios(num: Sequence[Optional[float]], den: Sequence[Optional[float]]) -> List[float]:
    """num[i] / den[i] for each repetition i where both are finite and den[i] > 0."""
    out = []
    for a, b in zip(num, den):
        if a is None or b is None or math.isnan(a) or math.isnan(b) or b <= 0:
            continue
        out.append(a / b)
    return out


def paired_differences(a: Sequence[Optional[float]], b: Sequence[Optional[float]]) -> List[float]:
    out = []
    for x, y in zip(a, b):
        if x is None or y is None or math.isnan(x) or math.isnan(y):
            continue
        out.append(x - y)
    return out


def parse_count(text: str) -> int:
    """'16', '1k' (1024), '1M' (2^20), '16M', '1G' (2^30), or a plain integer."""
    t = text.strip()
    scale = {"k": 1 << 10, "K": 1 << 10, "m": 1 << 20, "M": 1 << 20, "g": 1 << 30, "G": 1 << 30}
    if t and t[-1] in scale:
        return int(float(t[:-1]) * scale[t[-1]])
    return int(t)


def format_count(n: int) -> str:
    """Inverse of parse_count for exact multiples: 1024 -> '1k', 16777216 -> '16M'."""
    for suffix, unit in (("G", 1 << 30), ("M", 1 << 20), ("k", 1 << 10)):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def fmt(value: Optional[float], spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


@dataclass
class Series:
    """One mode at one size and concurrency: a value per repetition (None: not measured)."""

    elements_per_s: List[Optional[float]]
    calls_per_s: List[Optional[float]]
    p50_us: List[Optional[float]]

    @classmethod
    def empty(cls) -> "Series":
        return cls([], [], [])

    def add(self, elements_per_s: Optional[float], calls_per_s: Optional[float],
            p50_us: Optional[float]) -> None:
        self.elements_per_s.append(elements_per_s)
        self.calls_per_s.append(calls_per_s)
        self.p50_us.append(p50_us)

    def measured(self) -> int:
        return sum(1 for v in self.elements_per_s if v is not None and not math.isnan(v))


Key = Tuple[int, int, str]  # (elements, concurrency, mode)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned first column(s) of text, right-aligned numbers, two spaces apart."""
    widths = [len(h) for h in headers]
    for r in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, r)]
    def line(cells: Sequence[str]) -> str:
        out = []
        for i, (c, w) in enumerate(zip(cells, widths)):
            out.append(c.ljust(w) if i < 1 else c.rjust(w))
        return "  ".join(out).rstrip()
    return "\n".join([line(headers)] + [line(r) for r in rows])


def rates_table(results: Dict[Key, Series], sizes: Sequence[int], concs: Sequence[int],
                modes: Sequence[str]) -> str:
    rows = []
    for n in sizes:
        for c in concs:
            for m in modes:
                s = results.get((n, c, m))
                if s is None or s.measured() == 0:
                    continue
                rows.append([f"{format_count(n)} c{c} {m}",
                             fmt(median(s.elements_per_s) / 1e6, ".2f"),
                             fmt(median(s.calls_per_s), ".1f"),
                             fmt(median(s.p50_us), ".1f"),
                             str(s.measured())])
    return table(["elements conc mode", "Melem/s", "calls/s", "p50 us", "reps"], rows)


# The ratio columns: (header, numerator mode, denominator modes in order of preference, metric).
RATIOS = [
    ("tcp/raw", "lossd-tcp", ("raw",), "elements_per_s"),
    ("tcp/echo", "lossd-tcp", ("echo",), "elements_per_s"),
    ("wire/echo", "lossd-wire", ("echo",), "elements_per_s"),
    ("uds/raw", "lossd-uds", ("raw-uds", "raw"), "elements_per_s"),
    ("shm/kernel", "lossd-shm", ("kernel",), "elements_per_s"),
    ("shm/torch", "lossd-shm", ("torch",), "elements_per_s"),
]
SMALL_ELEMENTS = 65536  # p50 difference and QPS ratio columns only up to this size


def _series_metric(s: Optional[Series], metric: str) -> List[Optional[float]]:
    return [] if s is None else getattr(s, metric)


def ratio(results: Dict[Key, Series], n: int, c: int, num: str, dens: Sequence[str],
          metric: str, local_conc: int = 1) -> Tuple[float, Optional[str]]:
    """Median per-repetition ratio of num over the first measured denominator, and its name.
    Local compute modes (kernel, torch) are measured once per size (at local_conc)."""
    a = _series_metric(results.get((n, c, num)), metric)
    for d in dens:
        s = results.get((n, c, d)) or results.get((n, local_conc, d))
        r = paired_ratios(a, _series_metric(s, metric))
        if r:
            return median(r), d
    return NAN, None


def ratios_table(results: Dict[Key, Series], sizes: Sequence[int], concs: Sequence[int]) -> str:
    rows = []
    for n in sizes:
        for c in concs:
            row = [f"{format_count(n)} c{c}"]
            for _, num, dens, metric in RATIOS:
                value, _ = ratio(results, n, c, num, dens, metric)
                row.append(fmt(value, ".3f"))
            if n <= SMALL_ELEMENTS:
                lt, le = results.get((n, c, "lossd-wire")), results.get((n, c, "echo"))
                d = paired_differences(_series_metric(lt, "p50_us"), _series_metric(le, "p50_us"))
                row.append(fmt(median(d), "+.1f"))
                q = paired_ratios(_series_metric(lt, "calls_per_s"),
                                  _series_metric(le, "calls_per_s"))
                row.append(fmt(median(q), ".3f"))
            else:
                row += ["-", "-"]
            rows.append(row)
    headers = ["elements conc"] + [h for h, *_ in RATIOS] + ["p50 wire-echo us",
                                                            "QPS wire/echo"]
    return table(headers, rows)


def sweep_table(results: Dict[Key, Series], sizes: Sequence[int], concs: Sequence[int]) -> str:
    """Per size and concurrency: echo's calls/s and p50, lossd-wire's (the same request bytes
    from the same client: the servers compared) with its ratio and p50 difference to echo, and
    lossd-tcp's calls/s (the Python client's whole path) with its ratio to echo."""
    rows = []
    for n in sizes:
        for c in concs:
            le = results.get((n, c, "echo"))
            lw = results.get((n, c, "lossd-wire"))
            lt = results.get((n, c, "lossd-tcp"))
            if le is None:
                continue
            echo_q = _series_metric(le, "calls_per_s")
            echo_p = _series_metric(le, "p50_us")
            qw = paired_ratios(_series_metric(lw, "calls_per_s"), echo_q)
            dw = paired_differences(_series_metric(lw, "p50_us"), echo_p)
            qt = paired_ratios(_series_metric(lt, "calls_per_s"), echo_q)
            rows.append([f"{format_count(n)} c{c}",
                         fmt(median(echo_q), ".0f"),
                         fmt(median(echo_p), ".1f"),
                         fmt(median(_series_metric(lw, "calls_per_s")), ".0f"),
                         fmt(median(qw), ".3f"),
                         fmt(median(dw), "+.1f"),
                         fmt(median(_series_metric(lt, "calls_per_s")), ".0f"),
                         fmt(median(qt), ".3f")])
    return table(["elements conc", "echo calls/s", "echo p50 us", "wire calls/s", "wire/echo",
                  "wire-echo p50 us", "client calls/s", "client/echo"], rows)
