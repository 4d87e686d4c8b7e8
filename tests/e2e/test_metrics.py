"""End-to-end: the Prometheus metrics of a real server after known traffic, parsed with
prometheus_client's own text parser; and client-side round_robin over two servers, observed
through their metrics."""

from __future__ import annotations

import math
import time

import numpy as np

import lossd

from helpers import bad_evaluates_capabilities_accumulate, evaluate_stream_of_three, \
    metrics_address, scrape, settled_counts, value


def test_metrics_after_known_traffic(server_factory) -> None:
    server = server_factory("--metrics_port", "0", "--metrics_host", "127.0.0.1")
    address = metrics_address(server)
    n, m = 1000, 300
    rng = np.random.default_rng(0)
    x = rng.standard_normal(n).astype(np.float32)
    y = (x > 0).astype(np.float32)
    with lossd.Client(server.target) as c:
        for _ in range(5):
            c.bce_with_logits(x, y, reduction="none")
        bad_evaluates_capabilities_accumulate(c, x, y)
    evaluate_stream_of_three(server.target, x[:m], y[:m])

    s = settled_counts(address)
    total = "lossd_requests_total"
    assert value(s, total, method="Evaluate", code="OK", device="cpu") == 5
    assert value(s, total, method="Evaluate", code="INVALID_ARGUMENT", device="none") == 2
    assert value(s, total, method="EvaluateStream", code="OK", device="cpu") == 3
    assert value(s, total, method="Accumulate", code="OK", device="cpu") == 1
    assert value(s, total, method="GetCapabilities", code="OK", device="none") == 1
    assert value(s, "lossd_elements_total", device="cpu") == 5 * n + 3 * m + n
    assert value(s, "lossd_tensor_bytes_total", direction="received") == \
        5 * 8 * n + 3 * 8 * m + 8 * n
    assert value(s, "lossd_tensor_bytes_total", direction="sent") == 5 * 4 * n + 3 * 4
    assert value(s, "lossd_in_flight_calls") == 0
    assert value(s, "lossd_queued_requests") == 0
    assert value(s, "lossd_draining") == 0
    assert value(s, "lossd_compute_chunks_total") >= 5 + 3 + 2

    # Histograms: count per method, cumulative buckets ending at +Inf == count.
    for method, count in (("Evaluate", 7), ("EvaluateStream", 3), ("Accumulate", 1)):
        hist = "lossd_request_seconds"
        assert value(s, hist + "_count", method=method) == count, method
        buckets = sorted(((float(dict(labels)["le"]), v) for (name, labels), v in s.items()
                          if name == hist + "_bucket" and dict(labels)["method"] == method))
        assert buckets[-1][0] == math.inf and buckets[-1][1] == count
        assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:])), buckets
        assert value(s, hist + "_sum", method=method) > 0
    assert value(s, "lossd_compute_seconds_count", method="Evaluate", device="cpu") == 5
    assert value(s, "lossd_queue_seconds_count", method="EvaluateStream") == 3


def test_round_robin_over_two_servers(server_factory) -> None:
    servers = [server_factory("--metrics_port", "0", "--metrics_host", "127.0.0.1")
               for _ in range(2)]
    with lossd.Client([s.target for s in servers]) as c:
        for _ in range(20):
            c.bce_with_logits(np.zeros(4), np.ones(4))
    counts = [value(scrape(metrics_address(s)), "lossd_requests_total", method="Evaluate",
                    code="OK", device="cpu") for s in servers]
    assert sum(counts) == 20
    assert min(counts) >= 5, counts  # round_robin alternates between ready servers


def test_build_process_and_size_metrics(server_factory) -> None:
    """lossd_build_info, the standard process_* metrics and the request-size histogram."""
    server = server_factory("--metrics_port", "0", "--metrics_host", "127.0.0.1")
    x = np.zeros(1000, np.float32)
    with lossd.Client(server.target) as c:
        for _ in range(3):
            c.bce_with_logits(x, x, reduction="sum")
    s = scrape(metrics_address(server))
    info = [(labels, v) for (name, labels), v in s.items() if name == "lossd_build_info"]
    assert len(info) == 1 and info[0][1] == 1
    labels = dict(info[0][0])
    assert labels["version"] == "0.1.0" and labels["cuda"] in ("compiled", "none")
    assert labels["simd_target"]  # e.g. AVX2, AVX3, NEON
    rss = value(s, "process_resident_memory_bytes")
    assert 1 << 20 < rss < 1 << 36
    assert value(s, "process_cpu_seconds_total") > 0
    assert value(s, "process_open_fds") > 3
    assert value(s, "process_max_fds") >= value(s, "process_open_fds")
    assert abs(value(s, "process_start_time_seconds") - time.time()) < 3600
    assert value(s, "lossd_request_bytes_count", method="Evaluate") == 3
    assert value(s, "lossd_request_bytes_sum", method="Evaluate") == 3 * 8000
    assert value(s, "lossd_request_bytes_bucket", method="Evaluate", le="16384") == 3
    assert value(s, "lossd_request_bytes_bucket", method="Evaluate", le="4096") == 0
    # Latency buckets start at 1 us.
    les = sorted(float(dict(labels)["le"]) for (name, labels), _ in s.items()
                 if name == "lossd_request_seconds_bucket")
    assert les[0] == 1e-6

