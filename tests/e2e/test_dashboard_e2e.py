"""End-to-end: every PromQL expression of the Grafana dashboard (deploy/grafana/dashboards/
lossd.json) parses and returns data in a REAL Prometheus server scraping a real lossd.

lossd runs with its metrics on a free loopback port; Prometheus (the Debian package's
/usr/bin/prometheus, installed by `make deps` through APT_PACKAGES, or $PROMETHEUS_BINARY) runs on
another free loopback port with its own temporary storage and a generated config that scrapes
lossd every second. Two rounds of traffic (good and bad Evaluate calls, a large Evaluate that goes
through the queue, a stream, an accumulate, capabilities) are each waited for until Prometheus
has scraped them, so every counter has grown between two scrapes. Then each expression, with the
Grafana variables replaced ($__rate_interval -> 15s, $instance -> the variable's "All" value),
goes through /api/v1/query: status success, a non-empty result and at least one finite value.
The instance variable's label_values() query is checked through /api/v1/label/.../values.

A system prometheus service that the package may have started (port 9090) is not used.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np
import pytest

import lossd

from helpers import bad_evaluates_capabilities_accumulate, evaluate_stream_of_three, \
    metrics_address, settled_counts

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "lossd.json"
PROMETHEUS = os.environ.get("PROMETHEUS_BINARY", "/usr/bin/prometheus")
RATE_WINDOW = "15s"  # replaces $__rate_interval: 15 scrapes at 1 s, longer than the test's traffic
START_TIMEOUT_S = 20.0
SCRAPE_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0

# Metrics the deployment issue asks the dashboard to show (each must appear in some expression).
REQUIRED_METRICS = [
    "lossd_requests_total", "lossd_request_seconds_bucket", "lossd_queue_seconds_bucket",
    "lossd_compute_seconds_bucket", "lossd_queued_requests", "lossd_in_flight_calls",
    "lossd_tensor_bytes_total", "lossd_elements_total", "lossd_request_bytes_bucket",
    "process_resident_memory_bytes", "process_cpu_seconds_total", "lossd_draining",
    "lossd_build_info",
]


# ---- the dashboard ----

def dashboard() -> dict:
    with open(DASHBOARD, encoding="utf-8") as f:
        return json.load(f)


def panel_targets(dash: dict) -> List[Tuple[str, str]]:
    """(panel title, expr) of every query target, rows' nested panels included."""
    out: List[Tuple[str, str]] = []

    def walk(panels: list) -> None:
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((p.get("title", "?"), t["expr"]))
            walk(p.get("panels", []))

    walk(dash.get("panels", []))
    return out


def substitute(expr: str, variables: dict) -> str:
    """Grafana's variable interpolation for the forms the dashboard uses ($x, ${x})."""
    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in variables:
            raise AssertionError(f"unknown Grafana variable ${name} in: {expr}")
        return variables[name]
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", repl, expr)


def grafana_variables(dash: dict) -> dict:
    variables = {"__rate_interval": RATE_WINDOW, "__interval": "1s", "__range": "1m"}
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            assert v.get("includeAll") and v.get("allValue"), v["name"]
            variables[v["name"]] = v["allValue"]  # the default selection: All
    return variables


def label_values_queries(dash: dict) -> List[Tuple[str, str, str]]:
    """(variable, metric, label) of each query variable label_values(metric, label)."""
    out = []
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        q = v.get("query")
        text = q.get("query", "") if isinstance(q, dict) else str(q)
        m = re.fullmatch(r"\s*label_values\(\s*([^,\s]+)\s*,\s*(\w+)\s*\)\s*", text)
        assert m, f"variable {v['name']}: unsupported query {text!r}"
        out.append((v["name"], m.group(1), m.group(2)))
    return out


# ---- Prometheus ----

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """A Prometheus server on a free loopback port with its own storage under ``root``."""

    def __init__(self, root: Path, lossd_metrics: str) -> None:
        self.root = root
        self.config = root / "prometheus.yml"
        self.config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  scrape_timeout: 1s\n"
            "  evaluation_interval: 1s\n"
            "scrape_configs:\n"
            "  - job_name: lossd\n"
            "    static_configs:\n"
            f"      - targets: ['{lossd_metrics}']\n", encoding="utf-8")
        self.instance = lossd_metrics
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = root / "prometheus.log"
        self.port = 0

    def start(self) -> None:
        # The port is free when chosen; should another process take it before Prometheus binds
        # it, Prometheus exits at once and the next port is tried.
        for _ in range(3):
            self.port = free_port()
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [PROMETHEUS, f"--config.file={self.config}",
                     f"--storage.tsdb.path={self.root / 'data'}",
                     f"--web.listen-address=127.0.0.1:{self.port}",
                     "--storage.tsdb.retention.time=1h", "--log.level=warn"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    cwd=self.root, start_new_session=True)
            deadline = time.monotonic() + START_TIMEOUT_S
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    with urllib.request.urlopen(self.url("/-/ready"), timeout=2) as r:
                        if r.status == 200:
                            return
                except (urllib.error.URLError, OSError):
                    pass
                time.sleep(0.1)
            if self.proc.poll() is None:
                self.stop()
                pytest.fail(f"Prometheus not ready within {START_TIMEOUT_S} s:\n{self.log()}",
                            pytrace=False)
        pytest.fail(f"Prometheus exited at startup three times:\n{self.log()}", pytrace=False)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_S."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT_S)
        self.proc = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except OSError:
            return "(no log)"

    def url(self, path: str, **params) -> str:
        query = "?" + urllib.parse.urlencode(params) if params else ""
        return f"http://127.0.0.1:{self.port}{path}{query}"

    def api(self, path: str, **params) -> dict:
        """GET an /api/v1 endpoint; the decoded body (errors come back as status 'error')."""
        try:
            with urllib.request.urlopen(self.url(path, **params), timeout=10) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:  # 400/422: bad query, with a JSON body
            with e:
                return json.load(e)

    def query(self, expr: str, at: Optional[float] = None) -> dict:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self.api("/api/v1/query", **params)

    def scalar(self, expr: str) -> Optional[float]:
        """The single value of an instant query, None when it has no result."""
        body = self.query(expr)
        assert body.get("status") == "success", (expr, body)
        result = body["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, what: str, ok: Callable[[], bool], timeout: float = SCRAPE_TIMEOUT_S):
        deadline = time.monotonic() + timeout
        while not ok():
            if time.monotonic() > deadline:
                pytest.fail(f"Prometheus: {what} not within {timeout} s; targets: "
                            f"{self.api('/api/v1/targets')}\nlog:\n{self.log()}", pytrace=False)
            time.sleep(0.2)


@pytest.fixture()
def prometheus_root() -> Iterator[Path]:
    if not os.access(PROMETHEUS, os.X_OK):
        pytest.fail(f"Prometheus not found at {PROMETHEUS}: `apt-get install prometheus` "
                    "(make deps installs it) or set PROMETHEUS_BINARY", pytrace=False)
    root = Path(tempfile.mkdtemp(prefix="lossd-prom-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---- traffic ----

def drive(target: str, rng: np.random.Generator) -> None:
    """Good and bad Evaluate calls, one larger than --inline_elements (computed by a worker,
    through the queue), a stream, an accumulate and capabilities."""
    x = rng.standard_normal(1000).astype(np.float32)
    y = (x > 0).astype(np.float32)
    big = rng.standard_normal(40000).astype(np.float32)
    with lossd.Client(target, timeout=30) as c:
        for _ in range(5):
            c.bce_with_logits(x, y, reduction="mean", grad=True)
        c.bce_with_logits(big, (big > 0).astype(np.float32), reduction="none")
        bad_evaluates_capabilities_accumulate(c, x, y)
    evaluate_stream_of_three(target, x[:300], y[:300])


def settled_request_count(address: str) -> float:
    """sum(lossd_requests_total) read from lossd directly, once no call is in flight."""
    s = settled_counts(address)
    return sum(v for (name, _), v in s.items() if name == "lossd_requests_total")


# ---- the test ----

def test_dashboard_queries_return_data(server_factory, prometheus_root: Path) -> None:
    started = time.monotonic()
    dash = dashboard()
    targets = panel_targets(dash)
    assert targets, f"no query targets in {DASHBOARD}"
    joined = "\n".join(expr for _, expr in targets)
    missing = [m for m in REQUIRED_METRICS if not re.search(rf"\b{m}\b", joined)]
    assert not missing, f"the dashboard shows none of: {missing}"
    variables = grafana_variables(dash)

    server = server_factory("--metrics_port", "0", "--metrics_host", "127.0.0.1")
    address = metrics_address(server)
    prom = Prometheus(prometheus_root, address)
    try:
        prom.start()
        prom.wait_for("a successful scrape of lossd",
                      lambda: prom.scalar(f'up{{job="lossd", instance="{address}"}}') == 1)

        # Two rounds, each scraped: every counter series then has two samples with an increase
        # between them inside the rate window.
        rng = np.random.default_rng(0)
        for _ in range(2):
            drive(server.target, rng)
            expected = settled_request_count(address)
            prom.wait_for(f"sum(lossd_requests_total) == {expected}",
                          lambda: prom.scalar("sum(lossd_requests_total)") == expected)
        prom.wait_for("at least 3 scrapes",
                      lambda: (prom.scalar('count_over_time(up{job="lossd"}[1m])') or 0) >= 3)

        # The instance variable lists lossd.
        for name, metric, label in label_values_queries(dash):
            body = prom.api(f"/api/v1/label/{label}/values", **{"match[]": metric})
            assert body.get("status") == "success", (name, body)
            assert address in body["data"], (name, metric, label, body)

        at = time.time()
        failures = []
        for title, raw in targets:
            expr = substitute(raw, variables)
            body = prom.query(expr, at=at)
            if body.get("status") != "success":
                failures.append(f"{title}: {expr}\n  -> {body.get('errorType')}: "
                                f"{body.get('error')}")
                continue
            result = body["data"]["result"]
            values = [float(r["value"][1]) for r in result] if isinstance(result, list) else []
            if not result:
                failures.append(f"{title}: {expr}\n  -> empty result")
            elif not any(math.isfinite(v) for v in values):
                failures.append(f"{title}: {expr}\n  -> no finite value: {result}")
        assert not failures, (f"{len(failures)} of {len(targets)} dashboard queries failed:\n"
                              + "\n".join(failures))
    finally:
        prom.stop()
    assert time.monotonic() - started < 60
