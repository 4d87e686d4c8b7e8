#!/usr/bin/env python3
"""Cross-check of lossd-bench against an independent client: a Python grpcio client sending the
same request bytes to the same lossd on the same schedule (docs/perf.md, "Is lossd-bench the
bottleneck?").

Both clients load one lossd (started here, CPU, loopback) in open loop at a low fixed rate, so
calls do not queue behind each other and the latency is the server's and the transport's, not
the client's: lossd-bench with --rps=R --arrivals=fixed --channels=1 and the tensors of .npy
files written here (--logits_npy/--targets_npy: no pos_weight; --reduction, --grad,
--precision), the
Python client with grpcio's blocking unary call on one channel, sending the serialized
EvaluateRequest that lossd-bench sends (the same fields and values; the script checks that the
request and reply sizes per call agree) without parsing the reply. Latency counts from each
call's scheduled time in both (at this rate that is its send time; the Python client also
reports send-to-receive). They alternate, the order reversed every other round; each prints
calls/s and p50/p90/p99, and the script prints the per-round and median ratios.

    cross_check.py --build-dir build [--elements 1Mi --rate 20 --seconds 5 --rounds 4
                   --reduction none --grad logits --precision default]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "client" / "python" / "src"))


def count(text: str) -> int:
    m = re.fullmatch(r"(\d+)\s*(k|Ki|M|Mi)?", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text}: expected a count like 1Mi or 65536")
    scale = {None: 1, "k": 1000, "Ki": 1024, "M": 10**6, "Mi": 1 << 20}[m.group(2)]
    return int(m.group(1)) * scale


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """The value at rank ceil(q * n) (lossd-bench's histogram uses the same rank)."""
    if not sorted_values:
        return 0.0
    rank = max(1, int(np.ceil(q * len(sorted_values))))
    return sorted_values[rank - 1]


def start_lossd(binary: Path, extra: Sequence[str] = ()) -> subprocess.Popen:
    p = subprocess.Popen([str(binary), "--host=127.0.0.1", "--port=0", "--device=cpu",
                          "--drain_timeout=2s", *extra], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    assert p.stderr is not None
    for line in p.stderr:
        m = re.search(r"listening on (\S+:\d+)\s*$", line)
        if m:
            p.target = m.group(1)  # type: ignore[attr-defined]
            # Keep draining stderr so the server never blocks on a full pipe.
            threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
            return p
    raise SystemExit(f"{binary} did not start")


REDUCTIONS = {"none": 1, "mean": 2, "sum": 3}  # lossd.v1.Reduction


def request_bytes(x: np.ndarray, y: np.ndarray, reduction: str, grad: bool,
                  precision: str = "default") -> bytes:
    """The EvaluateRequest lossd-bench sends for --logits_npy/--targets_npy of these arrays
    (client/loadtest/requests.cc, Assemble): same fields, values and order."""
    from lossd._proto.lossd.v1 import lossd_pb2 as pb

    def tensor(a: np.ndarray) -> "pb.Tensor":
        return pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=list(a.shape),
                         data=a.astype("<f4").tobytes())

    req = pb.EvaluateRequest(request_id="bench-file", logits=tensor(x), targets=tensor(y),
                             reduction=REDUCTIONS[reduction])
    req.bce_with_logits.SetInParent()
    req.gradients.SetInParent()  # lossd-bench always sets it, empty without gradients
    req.gradients.logits = grad
    req.precision = pb.PRECISION_CORRECTLY_ROUNDED if precision == "correctly_rounded" else 0
    return req.SerializeToString()


def python_client(target: str, body: bytes, rate: float, warmup_s: float,
                  seconds: float) -> dict:
    """Open loop at `rate` calls/s, evenly spaced, one blocking call at a time on one channel;
    latency from each call's scheduled time (and, for reference, from its send)."""
    import grpc

    opts = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    warm = int(round(warmup_s * rate))
    n = int(round(seconds * rate))
    lat, sent_to_recv, errors = [], [], 0
    reply_bytes = 0
    with grpc.insecure_channel(target, options=opts) as channel:
        evaluate = channel.unary_unary("/lossd.v1.LossService/Evaluate")  # bytes in and out
        grpc.channel_ready_future(channel).result(timeout=10)
        t0 = time.perf_counter() + 0.05
        last_done = t0
        for i in range(warm + n):
            at = t0 + i / rate
            while True:
                now = time.perf_counter()
                if now >= at:
                    break
                time.sleep(min(at - now, 0.05))
            sent = time.perf_counter()
            try:
                reply = evaluate(body, timeout=60)
            except grpc.RpcError:
                errors += i >= warm
                continue
            done = time.perf_counter()
            if i >= warm:
                lat.append(done - at)
                sent_to_recv.append(done - sent)
                reply_bytes = len(reply)
                last_done = done
    window = last_done - (t0 + warm / rate)
    lat.sort()
    sent_to_recv.sort()
    return {"calls": len(lat), "errors": errors, "qps": len(lat) / window if window > 0 else 0,
            "p50_us": 1e6 * quantile(lat, 0.5), "p90_us": 1e6 * quantile(lat, 0.9),
            "p99_us": 1e6 * quantile(lat, 0.99),
            "send_to_receive_p50_us": 1e6 * quantile(sent_to_recv, 0.5),
            "bytes_per_call": len(body) + reply_bytes}


def lossd_bench(bench: Path, target: str, x_path: Path, y_path: Path, rate: float,
                warmup_s: float, seconds: float, reduction: str, grad: bool,
                precision: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "r.json"
        cmd = [str(bench), f"--target={target}", f"--logits_npy={x_path}",
               f"--targets_npy={y_path}", f"--reduction={reduction}",
               f"--grad={'logits' if grad else 'none'}", f"--precision={precision}",
               f"--rps={rate:g}", "--arrivals=fixed", "--channels=1",
               f"--warmup={warmup_s:g}s", f"--duration={seconds:g}s", "--rounds=1",
               "--progress=false", f"--json={out}"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if p.returncode != 0:
            raise SystemExit(f"lossd-bench failed ({p.returncode}): {p.stderr[-2000:]}")
        [row] = json.loads(out.read_text())["rows"]
    lat = row["latency_us"]
    return {"calls": row["ok"], "errors": row["errors"], "qps": row["qps"], "p50_us": lat["p50"],
            "p90_us": lat["p90"], "p99_us": lat["p99"],
            "server_total_p50_us": row["server_us"]["total_p50"],
            "bytes_per_call": row["mb_per_s"] * 1e6 / row["qps"] if row["qps"] else 0}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build-dir", type=Path, default=REPO / "build")
    ap.add_argument("--lossd-binary", type=Path, help="default: BUILD/server/lossd")
    ap.add_argument("--lossd-bench", type=Path, help="default: BUILD/client/loadtest/lossd-bench")
    ap.add_argument("--elements", type=count, default=1 << 20, help="float32 elements per call")
    ap.add_argument("--cols", type=int, default=64, help="last dimension")
    ap.add_argument("--reduction", choices=sorted(REDUCTIONS), default="none")
    ap.add_argument("--grad", choices=["logits", "none"], default="logits",
                    help="dl/dx in the reply, or no gradient")
    ap.add_argument("--precision", choices=["default", "correctly_rounded"], default="default",
                    help="correctly_rounded: the server's exact mode, much more server time "
                    "per element (so the clients' own per-byte costs matter less)")
    ap.add_argument("--rate", type=float, default=20, help="calls/s of both clients")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds before each measurement")
    ap.add_argument("--seconds", type=float, default=5.0, help="measured seconds per client")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--lossd-args", default="",
                    help="extra lossd flags separated by spaces, e.g. \"--cpu_threads=1\" (one "
                    "kernel thread: its time does not wait for a second, busy core)")
    ap.add_argument("--json", type=Path, help="write every measurement and the ratios here")
    args = ap.parse_args(argv)
    lossd = args.lossd_binary or args.build_dir / "server" / "lossd"
    bench = args.lossd_bench or args.build_dir / "client" / "loadtest" / "lossd-bench"
    for path in (lossd, bench):
        if not path.is_file():
            raise SystemExit(f"{path} not found (build the targets lossd and lossd_bench)")
    if args.elements % args.cols:
        raise SystemExit("--cols must divide --elements")

    rng = np.random.default_rng(1)
    shape = (args.elements // args.cols, args.cols)
    x = rng.uniform(-8, 8, shape).astype(np.float32)
    y = (rng.integers(0, 4, shape) / 3).astype(np.float32)
    grad = args.grad == "logits"
    body = request_bytes(x, y, args.reduction, grad, args.precision)
    server = start_lossd(lossd, args.lossd_args.split())
    rounds: List[dict] = []
    try:
        with tempfile.TemporaryDirectory() as d:
            x_path, y_path = Path(d) / "x.npy", Path(d) / "y.npy"
            np.save(x_path, x)
            np.save(y_path, y)
            print(f"cross-check: {args.elements} float32 elements [{shape[0]},{shape[1]}], "
                  f"reduction {args.reduction}, {'dl/dx' if grad else 'no gradient'}, "
                  f"precision {args.precision}, open loop {args.rate:g} calls/s fixed, "
                  f"one channel, {args.warmup:g} s warm-up + {args.seconds:g} s per client, "
                  f"{args.rounds} round(s); request {len(body)} bytes")
            print(f"{'round':>5} {'client':<12} {'calls':>6} {'err':>4} {'calls/s':>8} "
                  f"{'p50 us':>9} {'p90 us':>9} {'p99 us':>9}  load avg")
            for r in range(args.rounds):
                order = ["lossd-bench", "python"] if r % 2 == 0 else ["python", "lossd-bench"]
                got = {}
                for who in order:
                    load = os.getloadavg()[0]
                    if who == "python":
                        got[who] = python_client(server.target, body, args.rate, args.warmup,
                                                 args.seconds)
                    else:
                        got[who] = lossd_bench(bench, server.target, x_path, y_path, args.rate,
                                               args.warmup, args.seconds, args.reduction, grad,
                                               args.precision)
                    g = got[who]
                    g["load_average"] = load
                    print(f"{r + 1:>5} {who:<12} {g['calls']:>6} {g['errors']:>4} "
                          f"{g['qps']:>8.2f} {g['p50_us']:>9.1f} {g['p90_us']:>9.1f} "
                          f"{g['p99_us']:>9.1f}  {load:.1f}", flush=True)
                lb, py = got["lossd-bench"], got["python"]
                got["p50_ratio"] = lb["p50_us"] / py["p50_us"] if py["p50_us"] else 0
                got["qps_ratio"] = lb["qps"] / py["qps"] if py["qps"] else 0
                rounds.append(got)
    finally:
        server.terminate()
        server.wait(30)
    lb_bytes = statistics.median(r["lossd-bench"]["bytes_per_call"] for r in rounds)
    py_bytes = statistics.median(r["python"]["bytes_per_call"] for r in rounds)
    p50 = statistics.median(r["p50_ratio"] for r in rounds)
    qps = statistics.median(r["qps_ratio"] for r in rounds)
    print(f"bytes per call (request + reply): lossd-bench {lb_bytes:.0f}, python {py_bytes:.0f}")
    print("p50 lossd-bench/python by round: " +
          ", ".join(f"{r['p50_ratio']:.3f}" for r in rounds) + f"; median {p50:.3f}")
    print("calls/s lossd-bench/python by round: " +
          ", ".join(f"{r['qps_ratio']:.3f}" for r in rounds) + f"; median {qps:.3f}")
    print(f"python send-to-receive p50 (median of rounds): "
          f"{statistics.median(r['python']['send_to_receive_p50_us'] for r in rounds):.1f} us; "
          f"lossd server total p50 (lossd-bench's replies): "
          f"{statistics.median(r['lossd-bench']['server_total_p50_us'] for r in rounds):.1f} us")
    within = abs(p50 - 1) <= 0.10 and abs(qps - 1) <= 0.10
    print(f"within 10%: {'yes' if within else 'no'}")
    if args.json:
        args.json.write_text(json.dumps({"elements": args.elements, "rate": args.rate,
                                         "reduction": args.reduction, "grad": args.grad,
                                         "precision": args.precision,
                                         "lossd_args": args.lossd_args,
                                         "seconds": args.seconds, "rounds": rounds,
                                         "request_bytes": len(body),
                                         "bytes_per_call": {"lossd-bench": lb_bytes,
                                                            "python": py_bytes},
                                         "median_p50_ratio": p50, "median_qps_ratio": qps,
                                         "within_10_percent": within}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
