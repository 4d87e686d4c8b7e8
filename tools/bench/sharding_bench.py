#!/usr/bin/env python3
"""Throughput of ``Client.evaluate_dataset`` over 1, 2 and 3 local lossd replicas.

Starts three lossd processes on loopback (``--device cpu``), writes one dataset of float32
logits and targets as ``.npy`` files (memory-mapped by the client), and evaluates it with
``evaluate_dataset`` over the first 1, 2 and 3 replicas, alternating (1, 2, 3, 1, 2, 3, ...)
for ``--rounds`` rounds after one unmeasured warm-up run of each. For each run it records:

* elements/s: the dataset's elements over the client's wall time of the call;
* client CPU per element: ``time.process_time()`` of this process (every thread: reading
  and encoding the batches, gRPC's own threads) over the elements. When it approaches the
  wall time per element, the client is the bottleneck;
* server CPU per element: user + system time of the replicas used (from /proc), summed;
* cores busy: (client + server CPU) / wall. It cannot exceed the machine's cores: on a
  machine with fewer cores than replicas + client, more replicas cannot go faster;
* merge: ``DatasetResult.merge_ns``, the client's wall time of the final merge (grouping the
  states and the ``MergePartials`` round trip), as a share of the call's wall time.

Every run must give the same loss bits (checked). Prints one line per run, then the median
of each configuration and its speed relative to one replica. Figures on a shared machine are
noisy: compare medians of alternated runs, and rerun.

Example::

    .venv/bin/python tools/bench/sharding_bench.py --lossd-binary build/server/lossd
    make bench-sharding SHARDING_ARGS="--elements 134217728 --rounds 5"
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

import lossd

REPO = Path(__file__).resolve().parents[2]
_LISTENING = re.compile(r"lossd listening on (\S+):(\d+)\s*$")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class Replica:
    """One lossd process on a free loopback port."""

    def __init__(self, binary: str, flags: Sequence[str], start_timeout: float = 30.0):
        self.proc = subprocess.Popen(
            [binary, "--host", "127.0.0.1", "--port", "0", "--device", "cpu", *flags],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, errors="replace")
        self.lines: List[str] = []
        self.target: Optional[str] = None
        self._ready = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()
        if not self._ready.wait(start_timeout) or self.target is None:
            self.stop()
            raise RuntimeError(f"lossd did not start: {' '.join(self.proc.args)}\n"
                               + "\n".join(self.lines[-20:]))

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            m = _LISTENING.search(line)
            if m and self.target is None:
                self.target = f"{m.group(1)}:{m.group(2)}"
                self._ready.set()
        self._ready.set()

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process so far."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {model}"


def _write_dataset(directory: Path, elements: int, row: int, seed: int) -> tuple:
    rows = elements // row
    x_path, y_path = directory / "logits.npy", directory / "targets.npy"
    x = np.lib.format.open_memmap(x_path, mode="w+", dtype=np.float32, shape=(rows, row))
    y = np.lib.format.open_memmap(y_path, mode="w+", dtype=np.float32, shape=(rows, row))
    rng = np.random.default_rng(seed)
    step = max(1, (1 << 22) // row)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        x[r0:r1] = rng.standard_normal((r1 - r0, row), dtype=np.float32) * np.float32(4)
        y[r0:r1] = np.round(rng.random((r1 - r0, row), dtype=np.float32))
    x.flush()
    y.flush()
    del x, y
    return x_path, y_path, rows * row


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lossd-binary", default=os.environ.get(
        "LOSSD_BINARY", str(REPO / "build" / "server" / "lossd")))
    p.add_argument("--elements", type=int, default=1 << 26,
                   help="dataset size (rounded down to whole rows of 1024); default 2^26")
    p.add_argument("--batch-rows", type=int, default=1024,
                   help="rows of 1024 elements per batch (default 1024: 2^20 elements)")
    p.add_argument("--checkpoint-batches", type=int, default=4,
                   help="batches per segment (default 4: 16 segments of 2^22 elements "
                        "for the default dataset, to share among 3 replicas)")
    p.add_argument("--queue-depth", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--replicas", default="1,2,3",
                   help="replica counts to alternate (default 1,2,3)")
    p.add_argument("--server-flag", action="append", default=[],
                   help="extra lossd flag for every replica (repeatable), e.g. "
                        "--server-flag=--cpu_threads=1")
    p.add_argument("--reduction", default="mean", choices=("mean", "sum"))
    p.add_argument("--data-dir", help="where the .npy files go (default: a temporary "
                                      "directory, removed at the end)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)

    counts = [int(c) for c in args.replicas.split(",")]
    if not counts or min(counts) < 1:
        p.error("--replicas: positive counts, e.g. 1,2,3")
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{_machine()}")
    print(f"# command: {' '.join([os.path.relpath(sys.argv[0])] + list(sys.argv[1:]))}")
    print(f"# lossd {args.lossd_binary}, client lossd {lossd.__version__}, "
          f"python {platform.python_version()}, flags {args.server_flag or 'default'}")
    print("# load average at the start: %.2f %.2f %.2f" % os.getloadavg())

    tmp = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="lossd-shard-"))
    tmp.mkdir(parents=True, exist_ok=True)
    replicas: List[Replica] = []
    try:
        x_path, y_path, n = _write_dataset(tmp, args.elements, 1024, args.seed)
        print(f"# dataset: {n} float32 elements ({2 * 4 * n / 2**20:.0f} MiB of logits and "
              f"targets, memory-mapped .npy), batches of {args.batch_rows * 1024} elements, "
              f"checkpoint_batches {args.checkpoint_batches}, queue_depth {args.queue_depth}"
              f", reduction {args.reduction}")
        for _ in range(max(counts)):
            replicas.append(Replica(args.lossd_binary, args.server_flag))
        targets = [r.target for r in replicas]
        assert all(targets)

        loss_bits: set = set()
        runs: Dict[int, List[dict]] = {c: [] for c in counts}

        def run(c: int) -> dict:
            used = replicas[:c]
            with lossd.Client([str(t) for t in targets[:c]], timeout=3600) as client:
                s0 = sum(r.cpu_seconds() for r in used)
                c0 = time.process_time()
                t0 = time.perf_counter()
                res = client.evaluate_dataset(
                    str(x_path), str(y_path), batch_rows=args.batch_rows,
                    reduction=args.reduction, checkpoint_batches=args.checkpoint_batches,
                    queue_depth=args.queue_depth, progress=False)
                wall = time.perf_counter() - t0
                cpu = time.process_time() - c0
                server = sum(r.cpu_seconds() for r in used) - s0
            assert res.num_elements == n and not res.failed_replicas
            loss_bits.add(np.float64(res.loss).view(np.uint64).item())
            return {"wall": wall, "eps": n / wall, "client_ns": cpu / n * 1e9,
                    "server_ns": server / n * 1e9, "cores": (cpu + server) / wall,
                    "merge_ms": res.merge_ns / 1e6,
                    "merge_pct": 100.0 * res.merge_ns / res.timing.total_ns,
                    "segments": res.checkpoints, "merge_calls": res.merge_calls}

        for c in counts:  # warm-up: connections, page cache, server pools
            run(c)
        print(f"{'round':>5} {'replicas':>8} {'wall s':>7} {'M elem/s':>9} "
              f"{'client ns/el':>12} {'server ns/el':>12} {'cores':>5} {'merge ms':>8} "
              f"{'merge %':>8}")
        for k in range(args.rounds):
            for c in counts:
                r = run(c)
                runs[c].append(r)
                print(f"{k + 1:>5} {c:>8} {r['wall']:>7.3f} {r['eps'] / 1e6:>9.1f} "
                      f"{r['client_ns']:>12.2f} {r['server_ns']:>12.2f} {r['cores']:>5.2f} "
                      f"{r['merge_ms']:>8.2f} {r['merge_pct']:>8.3f}", flush=True)
        if len(loss_bits) != 1:
            print(f"ERROR: the runs gave {len(loss_bits)} different losses", file=sys.stderr)
            return 1

        def med(c: int, key: str) -> float:
            return statistics.median(r[key] for r in runs[c])

        base = med(counts[0], "eps")
        print(f"\nmedians of {args.rounds} alternated rounds "
              f"({runs[counts[0]][0]['segments']} segments, "
              f"{runs[counts[0]][0]['merge_calls']} MergePartials call):")
        print(f"{'replicas':>8} {'M elem/s':>9} {'vs ' + str(counts[0]):>6} "
              f"{'client ns/el':>12} {'server ns/el':>12} {'cores':>5} {'merge ms':>8} "
              f"{'merge %':>8} {'max merge %':>11}")
        for c in counts:
            print(f"{c:>8} {med(c, 'eps') / 1e6:>9.1f} {med(c, 'eps') / base:>6.2f} "
                  f"{med(c, 'client_ns'):>12.2f} {med(c, 'server_ns'):>12.2f} "
                  f"{med(c, 'cores'):>5.2f} {med(c, 'merge_ms'):>8.2f} "
                  f"{med(c, 'merge_pct'):>8.3f} {max(r['merge_pct'] for r in runs[c]):>11.3f}")
        print("every run gave the same loss bits; load average at the end: "
              "%.2f %.2f %.2f" % os.getloadavg())
        return 0
    finally:
        for r in replicas:
            r.stop()
        if not args.data_dir:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
