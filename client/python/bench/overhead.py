#!/usr/bin/env python3
"""Client-side overhead of the lossd Python client per call, next to the round-trip time.

For 1k, 100k and 10M float32 elements (reduction "none" with dl/dx: the largest replies),
measures

* encode:     the client's own request building (validation + ``EvalJob`` +
              ``unary_request()``: the serialized bytes),
* decode:     ``unary_result()`` on the reply bytes (parse + zero-copy numpy views),
* round trip: ``Client.bce_with_logits`` end to end (median), sent as one message
              (``chunk_bytes=None``),
* server:     the server's own ``timing.total_ns`` of that call (median),
* split rtt:  the same with the default client, which pipelines requests above 2 MiB as
              chunks on one stream,

and, for comparison, the same encode/decode through the generated protobuf classes (array ->
bytes -> message -> serialized, and parse -> bytes -> array), which the client avoids.

Usage::

    python client/python/bench/overhead.py                     # starts build*/server/lossd
    python client/python/bench/overhead.py --target HOST:PORT  # against a running server

Timings are medians of repeated runs on a shared, noisy machine: read them as ratios.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np

import lossd
from lossd._job import EvalJob, make_options, prepare_inputs
from lossd._proto.lossd.v1 import lossd_pb2 as pb

REPO = Path(__file__).resolve().parents[3]
SIZES = [(1_000, 300), (100_000, 60), (10_000_000, 5)]


def median_time(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def start_server() -> Tuple[subprocess.Popen, str]:
    candidates = sorted(glob.glob(str(REPO / "build*" / "server" / "lossd")))
    binary = os.environ.get("LOSSD_BINARY") or (candidates[0] if candidates else None)
    if not binary or not os.access(binary, os.X_OK):
        sys.exit("no lossd binary: build the server or pass --target / set LOSSD_BINARY")
    proc = subprocess.Popen([binary, "--port", "0", "--host", "127.0.0.1", "--device", "cpu"],
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    deadline = time.monotonic() + 30
    for line in proc.stderr:
        m = re.search(r"lossd listening on (\S+):(\d+)", line)
        if m:
            return proc, f"{m.group(1)}:{m.group(2)}"
        if time.monotonic() > deadline:
            break
    proc.kill()
    sys.exit("lossd did not start")


def pb_encode(x: np.ndarray, y: np.ndarray) -> bytes:
    """What a client built on the generated classes does."""
    req = pb.EvaluateRequest(
        request_id="bench",
        logits=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=x.shape, data=x.tobytes()),
        targets=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=y.shape, data=y.tobytes()),
        bce_with_logits=pb.BceWithLogits(), reduction=pb.REDUCTION_NONE,
        gradients=pb.GradientRequest(logits=True))
    return req.SerializeToString()


def pb_decode(raw: bytes) -> Tuple[np.ndarray, np.ndarray]:
    r = pb.EvaluateResponse.FromString(raw)
    return (np.frombuffer(r.loss.data, np.float32).reshape(tuple(r.loss.shape)),
            np.frombuffer(r.grad_logits.data, np.float32).reshape(tuple(r.grad_logits.shape)))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", help="a running server (default: start one)")
    args = parser.parse_args(argv)
    proc = None
    target = args.target
    if target is None:
        proc, target = start_server()
    try:
        with lossd.Client(target, timeout=120, chunk_bytes=None) as client, \
                lossd.Client(target, timeout=120) as default:
            client.capabilities()  # connect
            default.capabilities()
            rows = []
            for n, reps in SIZES:
                rng = np.random.default_rng(0)
                x = rng.standard_normal(n).astype(np.float32)
                y = (rng.uniform(size=n) > 0.5).astype(np.float32)
                options = make_options(loss="bce", reduction="none", grad=True,
                                       grad_targets=False, device="auto", reject_nan=False)

                def make_job() -> EvalJob:
                    return EvalJob(prepare_inputs(x, y, None, None), options, "bench",
                                   lossd.DEFAULT_MAX_MESSAGE_BYTES, None)

                job = make_job()
                assert job.mode == "unary"
                request = job.unary_request()
                raw = client._evaluate(request, timeout=120)  # the reply bytes, undecoded
                encode = median_time(lambda: make_job().unary_request(), reps)
                decode = median_time(lambda: job.unary_result(raw), reps)
                results = []

                def call() -> None:
                    results.append(client.bce_with_logits(x, y, reduction="none", grad=True))

                for _ in range(min(reps, 3)):  # warm up
                    call()
                results.clear()
                rtt = median_time(call, reps)
                server = statistics.median(r.timing.total_ns for r in results) * 1e-9

                def split_call() -> None:
                    default.bce_with_logits(x, y, reduction="none", grad=True)

                split_call()
                split_rtt = median_time(split_call, reps)
                pb_enc = median_time(lambda: pb_encode(x, y), reps)
                pb_dec = median_time(lambda: pb_decode(raw), reps)
                rows.append((n, encode, decode, rtt, server, split_rtt, pb_enc, pb_dec))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)

    def us(s: float) -> str:
        return f"{s * 1e6:10.1f}"

    print(f"lossd client overhead per call (float32, reduction none, grad=True; medians), "
          f"target {target}")
    print(f"{'elements':>10} {'encode us':>10} {'decode us':>10} {'client us':>10} "
          f"{'rtt us':>10} {'client %':>8} {'server us':>10} {'split rtt':>10} "
          f"{'pb enc us':>10} {'pb dec us':>10}")
    for n, enc, dec, rtt, server, split_rtt, pb_enc, pb_dec in rows:
        print(f"{n:>10} {us(enc)} {us(dec)} {us(enc + dec)} {us(rtt)} "
              f"{100 * (enc + dec) / rtt:7.1f}% {us(server)} {us(split_rtt)} {us(pb_enc)} "
              f"{us(pb_dec)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
