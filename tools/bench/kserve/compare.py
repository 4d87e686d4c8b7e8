#!/usr/bin/env python3
"""lossd against a KServe Python model server that serves torch's
binary_cross_entropy_with_logits over the same Open Inference Protocol (gRPC), both loaded by
lossd-bench --protocol=oip (ModelInfer, raw tensor contents, loss and dl/dx), alternately, at
each size and concurrency. Prints each measurement and lossd/KServe ratios of calls/s and p50.
`make bench-kserve` runs it (docs/perf.md, "lossd against a KServe model server").

    compare.py --build-dir build --kserve-python .venv-kserve/bin/python
"""

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: List[str], pattern: str, env: Dict[str, str]) -> Tuple[subprocess.Popen, int]:
    """Starts `cmd` with its output in a log file (a pipe nobody drains would stall it) and
    waits for the line that names its port."""
    log = tempfile.NamedTemporaryFile(mode="w+", suffix=".log", delete=False)
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        m = re.search(pattern, Path(log.name).read_text(errors="replace"))
        if m:
            return p, int(m.group(1))
        time.sleep(0.1)
    p.kill()
    raise SystemExit(f"{cmd[0]} did not start (no line matching {pattern!r}; log {log.name})")


def measure(bench: Path, port: int, elements: str, concurrency: str, seconds: float) -> List[dict]:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [str(bench), f"--target=127.0.0.1:{port}", "--protocol=oip", f"--elements={elements}",
               f"--concurrency={concurrency}", f"--duration={seconds}s", "--rounds=1",
               "--progress=false", "--stop_errors=1", f"--json={f.name}"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"lossd-bench failed ({r.returncode}): {r.stderr[-2000:]}")
        return json.load(open(f.name))["rows"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build-dir", default="build")
    ap.add_argument("--kserve-python", default=".venv-kserve/bin/python")
    ap.add_argument("--sizes", default="1Ki,1Mi", help="lossd-bench --elements values")
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the two servers")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="lossd --workers and --cpu_threads")
    ap.add_argument("--kserve-threads", type=int, default=1,
                    help="torch intra-op threads in the KServe model (1 is its fastest here: "
                         "calls run concurrently on KServe's gRPC threads)")
    a = ap.parse_args()
    build = Path(a.build_dir)
    bench = build / "client/loadtest/lossd-bench"
    env = dict(os.environ, KSERVE_TORCH_THREADS=str(a.kserve_threads))
    lossd, lossd_port = start([str(build / "server/lossd"), "--host=127.0.0.1", "--port=0",
                               "--device=cpu", f"--workers={a.threads}",
                               f"--cpu_threads={a.threads}"],
                              r"lossd listening on [^ ]*:(\d+)", env)
    kport = free_port()
    limit = str(256 << 20)  # as lossd's default --max_message_bytes (KServe's is 8 MiB)
    kserve, _ = start([a.kserve_python, str(HERE / "bce_model_server.py"), f"--grpc_port={kport}",
                       f"--grpc_max_send_message_length={limit}",
                       f"--grpc_max_receive_message_length={limit}"],
                      r"kserve listening on [^ ]*:(\d+)", env)
    print(f"lossd-bench --protocol=oip, {a.rounds} alternating round(s) of {a.seconds} s per "
          f"server and point; lossd --workers={a.threads} --cpu_threads={a.threads}; KServe "
          f"torch threads {a.kserve_threads}; {os.cpu_count()} CPUs; "
          f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}")
    results: Dict[Tuple[str, str, int], List[dict]] = {}
    try:
        for size in a.sizes.split(","):
            for rnd in range(a.rounds):
                order = [("lossd", lossd_port), ("kserve", kport)]
                if rnd % 2:
                    order.reverse()
                for name, port in order:
                    for row in measure(bench, port, size, a.concurrency, a.seconds):
                        results.setdefault((size, name, int(row["concurrency"])), []).append(row)
    finally:
        for p in (lossd, kserve):
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
    print(f"{'elements':>9} {'conc':>4} {'server':>7} {'calls/s':>9} {'p50 us':>10} "
          f"{'p99 us':>10} {'errors':>6}")
    points = sorted({(s, c) for (s, _, c) in results}, key=lambda k: (a.sizes.split(",").index(k[0]), k[1]))
    for s, c in points:
        for name in ("lossd", "kserve"):
            rows = results[(s, name, c)]
            print(f"{s:>9} {c:>4} {name:>7} {statistics.median(r['qps'] for r in rows):9.1f} "
                  f"{statistics.median(r['latency_us']['p50'] for r in rows):10.1f} "
                  f"{statistics.median(r['latency_us']['p99'] for r in rows):10.1f} "
                  f"{sum(r['errors'] for r in rows):6d}")
    print("\nratios (lossd / KServe, medians over rounds): calls/s, and KServe p50 / lossd p50")
    for s, c in points:
        if any(r["ok"] == 0 for r in results[(s, "kserve", c)] + results[(s, "lossd", c)]):
            print(f"{s:>9} c{c:<3} no successful calls in a measurement: no ratio")
            continue
        lq = statistics.median(r["qps"] for r in results[(s, "lossd", c)])
        kq = statistics.median(r["qps"] for r in results[(s, "kserve", c)])
        lp = statistics.median(r["latency_us"]["p50"] for r in results[(s, "lossd", c)])
        kp = statistics.median(r["latency_us"]["p50"] for r in results[(s, "kserve", c)])
        print(f"{s:>9} c{c:<3} calls/s {lq / kq:6.1f}x   p50 {kp / lp:6.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
