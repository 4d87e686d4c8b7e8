#!/usr/bin/env python3
"""Smoke test of a running lossd container (`make image-check`, tests/deploy/image_check.sh).

Through the project's client (lossd.Client): the health service answers SERVING, the
capabilities list the CPU, and BCE with logits (weight, pos_weight; reductions none and mean,
with the gradient) matches a float64 numpy reference within 1e-6 (relative, absolute near 0).
Over plain HTTP: /metrics serves lossd_ series. Exit 0 when all hold, else 1 with the failures.

    .venv/bin/python tests/deploy/smoke_image.py --addr 127.0.0.1:50051 --metrics-port 9090
"""
import argparse
import sys
import time
import urllib.request

import numpy as np

import lossd

TOL = 1e-6


def softplus(t):
    return np.logaddexp(0.0, t)


def sigmoid(t):
    return 0.5 * (1.0 + np.tanh(0.5 * t))


def reference(x, y, w, p):
    """float64 loss per element and its derivative in x (torch's definition)."""
    x, y, w, p = (np.asarray(a, np.float64) for a in (x, y, w, p))
    loss = w * ((1.0 - y) * softplus(x) + p * y * softplus(-x))
    grad = w * ((1.0 - y) * sigmoid(x) - p * y * sigmoid(-x))
    return loss, grad


def close(name, got, want, failures):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    if got.shape != want.shape:
        failures.append(f"{name}: shape {got.shape} != {want.shape}")
        return
    err = np.abs(got - want) / np.maximum(1.0, np.abs(want))
    worst = float(err.max()) if err.size else 0.0
    print(f"  {name}: max error {worst:.3g} (limit {TOL:g})")
    if not worst <= TOL:
        failures.append(f"{name}: max error {worst:.3g} > {TOL:g}")


def wait_serving(client, deadline_s):
    end = time.monotonic() + deadline_s
    last = None
    while time.monotonic() < end:
        try:
            last = client.health(timeout=2.0)
            if last == "SERVING":
                return last
        except lossd.LossdError as e:  # not listening yet
            last = f"{e.code}: {e}"
        time.sleep(0.5)
    return last


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--addr", required=True, help="host:port of the container's gRPC port")
    ap.add_argument("--metrics-port", type=int, default=0, help="0: do not check /metrics")
    ap.add_argument("--wait", type=float, default=30.0, help="seconds to wait for SERVING")
    args = ap.parse_args()
    failures = []

    with lossd.Client(args.addr, timeout=10.0) as client:
        status = wait_serving(client, args.wait)
        print(f"health: {status}")
        if status != "SERVING":
            failures.append(f"health: {status}, not SERVING")
            print("FAILED:", *failures, sep="\n  ")
            return 1

        caps = client.capabilities()
        print(f"server {caps.server_version}, devices {list(caps.devices)}")
        if "cpu" not in caps.devices:
            failures.append(f"capabilities: devices {caps.devices} lack cpu")

        rng = np.random.default_rng(20261207)
        x = rng.uniform(-8.0, 8.0, size=(64, 33)).astype(np.float32)
        x[0, :4] = [-17.0, 17.0, 0.0, -0.0]
        y = rng.integers(0, 2, size=(64, 33)).astype(np.float32)
        y[1] = rng.uniform(0.0, 1.0, size=33).astype(np.float32)  # soft targets too
        w = rng.uniform(0.5, 2.0, size=33).astype(np.float32)
        p = rng.uniform(0.5, 3.0, size=33).astype(np.float32)
        loss_ref, grad_ref = reference(x, y, np.broadcast_to(w, x.shape),
                                       np.broadcast_to(p, x.shape))

        r = client.bce_with_logits(x, y, weight=w, pos_weight=p, reduction="none", grad=True)
        print(f"bce none (device {r.device}):")
        close("loss", r.loss, loss_ref, failures)
        close("dloss/dlogits", r.grad, grad_ref, failures)

        r = client.bce_with_logits(x, y, weight=w, pos_weight=p, reduction="mean", grad=True)
        print("bce mean:")
        close("loss", r.loss, loss_ref.mean(), failures)
        close("dloss/dlogits", r.grad, grad_ref / x.size, failures)

    if args.metrics_port:
        host = args.addr.rsplit(":", 1)[0]
        url = f"http://{host}:{args.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        series = [ln for ln in text.splitlines() if ln.startswith("lossd_requests_total")]
        print(f"metrics: {len(series)} lossd_requests_total series at {url}")
        if not series:
            failures.append(f"metrics: no lossd_requests_total at {url}")

    if failures:
        print("FAILED:", *failures, sep="\n  ")
        return 1
    print("smoke test: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
