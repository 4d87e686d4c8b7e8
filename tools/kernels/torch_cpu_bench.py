#!/usr/bin/env python3
"""torch CPU vs lossd CPU: fused BCE-with-logits forward + backward, as a ratio.

docs/design.md section 6 asks for >= 15x torch CPU (forward + backward, same thread count) on 10M
float32 elements with weight [C] and pos_weight [C]. This script times torch's
``binary_cross_entropy_with_logits`` on logits [N, C=64] with weight [C] and pos_weight [C]:

* "none": the per-element loss, then ``loss.backward(ones)`` (lossd: "loss+grad" row)
* "mean": the mean, then ``loss.backward()`` (lossd: "mean+grad" row)
* "focal": torchvision's sigmoid focal loss formula (alpha 0.25, gamma 2) in torch ops times
  weight [C], then ``loss.backward(ones)`` (lossd: "focal loss+grad, weight[C], gamma 2" row;
  torch has no fused focal loss, and docs/design.md sets no target for it)

with ``torch.set_num_threads(t)`` for each thread count, the median of --repeats runs after one
warm-up, then runs lossd's ``cpu_bench --n=N`` (which measures the same work with its own
thread pool, 1 and 2 threads). That is one round; --rounds rounds run back to back (torch, lossd,
torch, lossd, ...) so that both see the same machine state, and the table gives each round's
ratio and the median ratio.

Run with the golden virtual environment (torch is never a `make test` dependency):

    .venv-golden/bin/python tools/kernels/torch_cpu_bench.py [--cpu-bench build/tools/kernels/cpu_bench]

A benchmark, never a test: the machines are shared and noisy, so compare ratios from one run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

# cpu_bench row names for each torch mode.
LOSSD_ROWS = {
    "none": "loss+grad, weight[C] pos_weight[C] (main)",
    "mean": "mean+grad, weight[C] pos_weight[C]",
    # torchvision's sigmoid_focal_loss formula (alpha 0.25, gamma 2) times weight [C], no
    # reduction, on the same data; torch has no fused focal loss.
    "focal": "focal loss+grad, weight[C], gamma 2",
}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def time_torch(n: int, c: int, mode: str, threads: int, repeats: int) -> float:
    """Median seconds of one forward + backward of torch's BCE with logits."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    rows = n // c
    # The distributions of cpu_bench's data: x in U(-8, 8), hard labels with probability 1/2,
    # w and p in U(0.5, 3).
    x = (torch.rand(rows, c, generator=g) * 16 - 8).requires_grad_(True)
    y = torch.randint(0, 2, (rows, c), generator=g).to(torch.float32)
    w = torch.rand(c, generator=g) * 2.5 + 0.5
    p = torch.rand(c, generator=g) * 2.5 + 0.5
    ones = torch.ones(rows, c)
    times: List[float] = []
    for i in range(repeats + 1):  # the first run is a warm-up
        x.grad = None
        t0 = time.perf_counter()
        if mode == "focal":
            prob = torch.sigmoid(x)
            ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
            p_t = prob * y + (1 - prob) * (1 - y)
            loss = (0.25 * y + 0.75 * (1 - y)) * (ce * (1 - p_t) ** 2) * w
        else:
            loss = F.binary_cross_entropy_with_logits(x, y, weight=w, pos_weight=p, reduction=mode)
        if mode in ("none", "focal"):
            loss.backward(ones)
        else:
            loss.backward()
        t1 = time.perf_counter()
        assert x.grad is not None and x.grad.shape == x.shape
        del loss
        if i:
            times.append(t1 - t0)
    return statistics.median(times)


def run_lossd(path: str, n: int) -> Tuple[Dict[Tuple[str, int], float], str]:
    """Runs cpu_bench; returns {(row name, threads): Melem/s} (median over repeated tables)."""
    proc = subprocess.run([path, f"--n={n}"], capture_output=True, text=True, check=True)
    found: Dict[Tuple[str, int], List[float]] = {}
    row = re.compile(r"^(?P<name>.+?)\s+(?P<threads>\d+)\s+(?P<melem>[\d.]+)\s+[\d.]+\s+[\d.]+\s*$")
    for line in proc.stdout.splitlines():
        m = row.match(line)
        if m:
            key = (m.group("name").strip(), int(m.group("threads")))
            found.setdefault(key, []).append(float(m.group("melem")))
    return {k: statistics.median(v) for k, v in found.items()}, proc.stdout


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10_000_000, help="elements (default 10M)")
    ap.add_argument("--c", type=int, default=64, help="classes: last dimension (default 64)")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per point (median)")
    ap.add_argument("--rounds", type=int, default=3, help="torch + lossd rounds (default 3)")
    ap.add_argument("--cpu-bench", default="build/tools/kernels/cpu_bench",
                    help="lossd's cpu_bench binary (default build/tools/kernels/cpu_bench)")
    ap.add_argument("--no-lossd", action="store_true", help="time torch only")
    ap.add_argument("--show-lossd", action="store_true", help="also print cpu_bench's output")
    args = ap.parse_args(argv)
    n = args.n - args.n % args.c
    threads = [int(t) for t in args.threads.split(",")]

    print(f"torch {torch.__version__} CPU vs lossd cpu_bench: n={n} float32, logits [{n // args.c}, "
          f"{args.c}], weight [{args.c}], pos_weight [{args.c}], forward + backward")
    print(f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs; "
          f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    if not args.no_lossd and not os.path.exists(args.cpu_bench):
        print(f"error: {args.cpu_bench} not found (build it, or pass --cpu-bench or "
              f"--no-lossd)", file=sys.stderr)
        return 2
    torch_rates: List[Dict[Tuple[str, int], float]] = []
    lossd_rates: List[Dict[Tuple[str, int], float]] = []
    for _ in range(args.rounds):
        rate: Dict[Tuple[str, int], float] = {}
        for mode in LOSSD_ROWS:
            for t in threads:
                rate[(mode, t)] = n / time_torch(n, args.c, mode, t, args.repeats) / 1e6
        torch_rates.append(rate)
        if not args.no_lossd:
            lossd, raw = run_lossd(args.cpu_bench, n)
            lossd_rates.append(lossd)
            if args.show_lossd:
                print(raw)
    print(f"{'reduction':<10}{'threads':>8}{'torch Melem/s':>15}{'lossd Melem/s':>15}"
          f"{'ratio (median)':>16}  ratio per round")
    for mode, row in LOSSD_ROWS.items():
        for t in threads:
            tr = statistics.median(r[(mode, t)] for r in torch_rates)
            if lossd_rates:
                lr = statistics.median(r[(row, t)] for r in lossd_rates)
                ratios = [lo[(row, t)] / to[(mode, t)] for lo, to in zip(lossd_rates, torch_rates)]
                per = ", ".join(f"{q:.1f}x" for q in ratios)
                print(f"{mode:<10}{t:>8}{tr:15.1f}{lr:15.1f}{statistics.median(ratios):15.1f}x  {per}")
            else:
                print(f"{mode:<10}{t:>8}{tr:15.1f}")
    print("(lossd rows: 'none' = cpu_bench \"%s\", 'mean' = \"%s\"; target >= 15x; "
          "'focal' = \"%s\", torch's focal formula in torch ops)"
          % (LOSSD_ROWS["none"], LOSSD_ROWS["mean"], LOSSD_ROWS["focal"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
