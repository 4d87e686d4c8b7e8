"""Results of the soak: the tally of one phase, the RSS samples and the state of a run (filled
as the phases run, so that a partial run stays readable)."""

from __future__ import annotations

import argparse
from array import array
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .mix import Kind, Verifier
from .server import OwnServer


def percentile_ms(values: array, q: float) -> float | None:
    if len(values) == 0:
        return None
    return float(np.percentile(np.frombuffer(values, dtype=np.float64), q) * 1e3)


@dataclass
class Tally:
    """Results of one phase: counts by (kind, outcome), latencies of good OK calls."""

    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    good: dict[str, bool] = field(default_factory=dict)
    latency_s: dict[str, array] = field(default_factory=dict)
    examples: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def record(self, kind: Kind, code: str, latency_s: float | None, detail: str = "") -> None:
        key = (kind.name, code)
        self.counts[key] = self.counts.get(key, 0) + 1
        self.good[kind.name] = kind.good
        if code != kind.expected:
            examples = self.examples.setdefault(key, [])
            if len(examples) < 3 and detail not in examples:
                examples.append(detail)
        elif kind.good and latency_s is not None:
            self.latency_s.setdefault(kind.name, array("d")).append(latency_s)

    def total(self) -> int:
        return sum(self.counts.values())

    def unexpected(self) -> int:
        return sum(n for (name, code), n in self.counts.items()
                   if code != ("OK" if self.good[name] else "INVALID_ARGUMENT"))

    def by_class(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {"good": {}, "bad": {}}
        for (name, code), n in self.counts.items():
            group = out["good" if self.good[name] else "bad"]
            group[code] = group.get(code, 0) + n
        return out

    def latency(self) -> dict[str, dict[str, float | int | None]]:
        out: dict[str, dict[str, float | int | None]] = {}
        everything = array("d")
        for name in sorted(self.latency_s):
            values = self.latency_s[name]
            everything.extend(values)
            out[name] = {"n": len(values), "p50_ms": percentile_ms(values, 50),
                         "p99_ms": percentile_ms(values, 99)}
        out["all_good"] = {"n": len(everything), "p50_ms": percentile_ms(everything, 50),
                           "p99_ms": percentile_ms(everything, 99)}
        return out

    def to_json(self) -> dict[str, Any]:
        rows = [{"kind": name, "class": "good" if self.good[name] else "bad",
                 "expected": "OK" if self.good[name] else "INVALID_ARGUMENT",
                 "code": code, "count": n}
                for (name, code), n in sorted(self.counts.items())]
        unexpected = [{"kind": name, "code": code, "count": self.counts[(name, code)],
                       "examples": ex}
                      for (name, code), ex in sorted(self.examples.items())]
        return {"total": self.total(), "unexpected": self.unexpected(), "counts": rows,
                "by_class": self.by_class(), "unexpected_detail": unexpected,
                "latency": self.latency()}


@dataclass
class RssSample:
    """VmRSS and VmHWM of the server at t_s seconds after the start of phase 2 (the
    idle-before sample is taken just before it: t_s 0)."""

    t_s: float
    rss_kib: int
    hwm_kib: int
    label: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"t_s": round(self.t_s, 3), "label": self.label,
                "rss_mib": round(self.rss_kib / 1024, 2), "hwm_mib": round(self.hwm_kib / 1024, 2)}


@dataclass
class State:
    """Everything the report needs; filled as the phases run (a partial run stays readable)."""

    args: argparse.Namespace
    target: str = ""
    pid: int | None = None
    own_server: OwnServer | None = None
    kinds: list[Kind] = field(default_factory=list)
    capabilities: dict[str, Any] = field(default_factory=dict)
    precheck: dict[str, dict[str, str]] = field(default_factory=dict)
    precheck_ok: bool | None = None
    phase1: Tally | None = None
    phase1_qps: float | None = None
    phase1_window_s: float = 0.0
    phase1_kind_rates: dict[str, float] = field(default_factory=dict)
    rate: float | None = None
    phase2: Tally | None = None
    phase2_started: float | None = None   # time.monotonic() at the first send
    phase2_due: int = 0                   # sends due by the end of the window
    phase2_sent: int = 0
    phase2_window_s: float = 0.0
    phase2_lag_ms: dict[str, float | None] = field(default_factory=dict)
    phase2_max_in_flight: int = 0
    rss: list[RssSample] = field(default_factory=list)
    metrics_before: dict[str, Any] | None = None
    metrics_after: dict[str, Any] | None = None
    server_exited_during_run: str | None = None
    interrupted: bool = False
    verifier: Verifier | None = None
