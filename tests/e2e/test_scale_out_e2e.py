"""End-to-end scale-out: one lossd.Client balancing (round_robin) over three replicas while
four threads send small Evaluate calls. Killing a replica (SIGKILL) costs under 1% of the
calls (gRPC retries UNAVAILABLE elsewhere); a rolling restart (SIGTERM: the replica drains,
exits 0, and comes back on the same port) must cost none: calls refused while it drains get
UNAVAILABLE, and the few that reach it in the instant gRPC's server stops are dropped
(CANCELLED); the client's default RetryPolicy retries both on another replica.

Timings (recovery, drain, restart) are printed, never asserted: run with ``-s`` to see them.
"""

from __future__ import annotations

import datetime
import threading
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import pytest

import lossd

from helpers import metrics_address, scrape, value

ELEMENTS = 1000
THREADS = 4
MAX_CALLS_PER_THREAD = 50_000  # bounds the load even if the clock misbehaves
CALL_TIMEOUT_S = 20.0  # deadline of each call, retries included
REL_TOL = 1e-6
FLAGS = ("--drain_timeout", "5s", "--metrics_port", "0", "--metrics_host", "127.0.0.1")


def _batches(count: int = 8) -> List[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Inputs and their float64 reference loss (reduction none)."""
    rng = np.random.default_rng(20240607)
    out = []
    for _ in range(count):
        x = rng.uniform(-8, 8, ELEMENTS).astype(np.float32)
        y = rng.integers(0, 2, ELEMENTS).astype(np.float32)
        xd, yd = x.astype(np.float64), y.astype(np.float64)
        ref = np.maximum(xd, 0) - xd * yd + np.log1p(np.exp(-np.abs(xd)))
        out.append((x, y, ref))
    return out


class Load:
    """THREADS threads calling Evaluate in a loop until stop(); every call is recorded as
    (start, end, outcome) with outcome "ok", "wrong" (result off the reference) or the
    status code name of the error."""

    def __init__(self, client: lossd.Client) -> None:
        self.client = client
        self.batches = _batches()
        self.records: List[Tuple[float, float, str]] = []
        self.failures: List[Tuple[float, str]] = []  # (wall-clock end, outcome) of failed calls
        self.errors: Dict[str, str] = {}  # outcome -> one example message
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(k,), daemon=True)
                         for k in range(THREADS)]

    def _run(self, k: int) -> None:
        local: List[Tuple[float, float, str]] = []
        failures: List[Tuple[float, str]] = []
        try:
            for n in range(MAX_CALLS_PER_THREAD):
                if self._stop.is_set():
                    break
                x, y, ref = self.batches[(n + k) % len(self.batches)]
                t0 = time.monotonic()
                try:
                    r = self.client.bce_with_logits(x, y, reduction="none",
                                                    timeout=CALL_TIMEOUT_S)
                    loss = np.asarray(r.loss, np.float64)
                    ok = loss.shape == ref.shape and bool(
                        np.all(np.abs(loss - ref) <= REL_TOL * np.abs(ref)))
                    outcome = "ok" if ok else "wrong"
                    detail = "" if ok else f"max rel err {np.max(np.abs(loss - ref) / np.abs(ref))}"
                except lossd.LossdError as exc:
                    outcome, detail = exc.code.name, str(exc)
                except Exception as exc:  # anything else is a failed call too
                    outcome, detail = type(exc).__name__, repr(exc)
                local.append((t0, time.monotonic(), outcome))
                if outcome != "ok":
                    failures.append((time.time(), outcome))
                    with self._lock:
                        self.errors.setdefault(outcome, detail)
        finally:
            with self._lock:
                self.records.extend(local)
                self.failures.extend(failures)

    def start(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(CALL_TIMEOUT_S + 10)
        alive = [t.name for t in self._threads if t.is_alive()]
        assert not alive, f"load threads still running after stop: {alive}"

    def summary(self) -> Tuple[int, int, int]:
        total = len(self.records)
        wrong = sum(1 for r in self.records if r[2] == "wrong")
        failed = sum(1 for r in self.records if r[2] != "ok")
        return total, failed, wrong


def _evaluate_counts(rs) -> List[Optional[Dict[str, float]]]:
    """Per replica: its Evaluate calls by status code, from its metrics (None if it is down)."""
    out: List[Optional[Dict[str, float]]] = []
    for i in range(len(rs)):
        if not rs.alive(i):
            out.append(None)
            continue
        samples = scrape(metrics_address(rs[i]))
        codes = {dict(labels)["code"]: v for (name, labels), v in samples.items()
                 if name == "lossd_requests_total" and dict(labels).get("method") == "Evaluate"}
        out.append(codes)
    return out


def _ok_count(rs, i: int) -> float:
    return value(scrape(metrics_address(rs[i])), "lossd_requests_total", method="Evaluate",
                 code="OK", device="cpu")


def _wait_until(predicate, timeout: float, what: str, interval: float = 0.05) -> float:
    """Polls predicate() until true; returns the seconds waited; fails after ``timeout``."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"timed out after {timeout} s waiting for {what}", pytrace=False)
        time.sleep(interval)
    return time.monotonic() - t0


def _warm_up(client: lossd.Client, rs) -> None:
    """Calls until every replica has answered some (round_robin uses ready connections only,
    and connects to all of them at first)."""
    x, y, _ = _batches(1)[0]

    def all_served() -> bool:
        for _ in range(3 * len(rs)):
            client.bce_with_logits(x, y, reduction="none")
        return all(_ok_count(rs, i) > 0 for i in range(len(rs)))

    _wait_until(all_served, 30, "every replica to answer calls", interval=0.1)


def _log_time(line: str) -> Optional[float]:
    """Wall-clock seconds of a server log line ("2026-12-07T11:59:44.859987Z INFO ...")."""
    try:
        stamp = datetime.datetime.strptime(line.split(" ", 1)[0], "%Y-%m-%dT%H:%M:%S.%fZ")
    except ValueError:
        return None
    return stamp.replace(tzinfo=datetime.timezone.utc).timestamp()


def _percentile(values: List[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _fmt_counts(counts) -> str:
    return ", ".join("down" if c is None else
                     "/".join(f"{k}={int(v)}" for k, v in sorted(c.items())) for c in counts)


def test_kill_one_of_three_replicas(replicas) -> None:
    rs = replicas(3, *FLAGS)
    with lossd.Client(rs.targets, timeout=CALL_TIMEOUT_S) as client:
        _warm_up(client, rs)
        load = Load(client).start()
        try:
            time.sleep(2.0)
            before = _evaluate_counts(rs)
            t_kill = time.monotonic()
            rs.kill(1)
            time.sleep(4.0)
            after = _evaluate_counts(rs)
            # The killed replica comes back on its port, and the client uses it again.
            t_back = time.monotonic()
            rs.restart(1)
            t_listen = time.monotonic()
            _wait_until(lambda: _ok_count(rs, 1) >= 20, 30,
                        "the client to send calls to restarted replica 1")
            t_rejoined = time.monotonic()
            time.sleep(0.5)
            final = _evaluate_counts(rs)
        finally:
            load.stop()

    total, failed, wrong = load.summary()
    recs = sorted(load.records)
    pre = [t1 - t0 for t0, t1, o in recs if t1 < t_kill and o == "ok"]
    post = [(t0, t1, o) for t0, t1, o in recs if t_kill <= t1 < t_back]
    restart_failed = sum(1 for _, t1, o in recs if t1 >= t_back and o != "ok")
    failures = [t1 - t_kill for t0, t1, o in post if o != "ok"]
    # Recovery: from the kill to the start of the first whole second (in 0.1 s steps) in which
    # no call ended in failure.
    recovery = 0.0
    if failures:
        recovery = next((s / 10 for s in range(0, 100)
                         if not any(s / 10 <= f < s / 10 + 1 for f in failures)), float("nan"))
    # Latency recovery: until the end of the last call after the kill that was much slower
    # than before it (such calls were retried or waited for a reconnect).
    slow_limit = max(5 * _percentile(pre, 99), 0.05)
    slow = [t1 - t_kill for t0, t1, o in post if t1 - t0 > slow_limit]
    post_ok = sum(1 for _, _, o in post if o == "ok")
    rate = 100 * failed / max(total, 1)
    print(f"\n[scale-out kill] calls {total}, failed {failed} ({rate:.3f}%), wrong {wrong}, "
          f"outcomes {sorted(set(o for *_, o in recs))}, errors {load.errors}")
    print(f"[scale-out kill] failures after kill {len(failures)}, last at "
          f"{max(failures) if failures else 0:.3f} s; recovery (first failure-free second) "
          f"{recovery:.1f} s; latency p50/p99 before {_percentile(pre, 50) * 1e3:.2f}/"
          f"{_percentile(pre, 99) * 1e3:.2f} ms, max after "
          f"{max((t1 - t0 for t0, t1, _ in post), default=0) * 1e3:.1f} ms, calls slower than "
          f"{slow_limit * 1e3:.1f} ms after the kill: {len(slow)}, last ending "
          f"{max(slow) if slow else 0:.3f} s after the kill")
    print(f"[scale-out kill] Evaluate per replica before kill: {_fmt_counts(before)}; "
          f"4 s after it: {_fmt_counts(after)}")
    print(f"[scale-out kill] restart of the killed replica: listening after "
          f"{t_listen - t_back:.2f} s, receiving calls {t_rejoined - t_listen:.2f} s later, "
          f"{restart_failed} failed calls from the restart on; at the end: "
          f"{_fmt_counts(final)}")

    assert wrong == 0, f"{wrong} results off the float64 reference: {load.errors}"
    assert total >= 100, f"only {total} calls in 6 s"
    assert post_ok > 0, "no call succeeded after the kill"
    assert failed < 0.01 * total, (
        f"{failed} of {total} calls failed after killing one of three replicas: {load.errors}")


def test_rolling_restart_of_three_replicas(replicas) -> None:
    rs = replicas(3, *FLAGS)
    steps: List[str] = []
    stops: List[float] = []  # wall-clock times of the replicas' "drained: ... stopping" lines
    with lossd.Client(rs.targets, timeout=CALL_TIMEOUT_S) as client:
        _warm_up(client, rs)
        load = Load(client).start()
        try:
            time.sleep(1.0)
            for i in range(len(rs)):
                t0 = time.monotonic()
                rs.terminate(i, timeout=30)  # drains for up to 5 s, must exit 0
                t_exit = time.monotonic()
                old_lines = list(rs[i].lines)
                stops.extend(t for t in (_log_time(line) for line in old_lines
                                         if "drained:" in line) if t is not None)
                rs.restart(i)
                t_listen = time.monotonic()
                with lossd.Client(rs.target(i), timeout=5, retry=None) as probe:
                    _wait_until(lambda: probe.health() == "SERVING", 15,
                                f"replica {i} to be SERVING")
                t_serving = time.monotonic()
                # The balancing client reconnects with its own backoff: wait until it sends
                # calls to the new process before draining the next replica.
                _wait_until(lambda: _ok_count(rs, i) >= 20, 30,
                            f"the client to send calls to restarted replica {i}")
                t_used = time.monotonic()
                drain = [line.split(" ", 2)[-1] for line in old_lines
                         if "draining:" in line or "drained:" in line]
                steps.append(f"replica {i}: exit after {t_exit - t0:.2f} s, listening "
                             f"{t_listen - t_exit:.2f} s later, SERVING +{t_serving - t_listen:.2f}"
                             f" s, receiving calls +{t_used - t_serving:.2f} s; {drain}")
            time.sleep(1.0)
            counts = _evaluate_counts(rs)
        finally:
            load.stop()

    total, failed, wrong = load.summary()
    print(f"\n[rolling restart] calls {total}, failed {failed}, wrong {wrong}, "
          f"errors {load.errors}")
    for s in steps:
        print(f"[rolling restart] {s}")
    print(f"[rolling restart] Evaluate per replica since its restart: {_fmt_counts(counts)}")
    assert wrong == 0, f"{wrong} results off the float64 reference: {load.errors}"
    assert total >= 100, f"only {total} calls"
    if failed:
        near = [min((t - s for s in stops if t >= s), default=None) for t, _ in load.failures]
        shown = [(o, None if d is None else round(d, 4)) for (_, o), d in zip(load.failures, near)]
        print(f"[rolling restart] failed calls, seconds after the last 'drained: ... stopping': "
              f"{shown}")
    assert failed == 0, f"{failed} of {total} calls failed during a rolling restart: {load.errors}"
