"""Service path benchmark: lossd against its baselines, measured interleaved in one run.

For each request size (float32 BCE with logits, REDUCTION_NONE with dl/dx, see payload.py)
and concurrency (one client process per concurrent caller), in repetitions whose mode order
rotates, it measures:

  raw        lossd_bench_server --service=raw: the request as one unparsed message, a reply of
             lossd's reply size from a reused buffer (the transport's limit)
  echo       lossd_bench_server --service=echo: protobuf parse + a reply of lossd's size, no
             compute
  lossd-wire lossd's Evaluate over TCP from grpcio with the very request bytes echo gets: the
             server against echo with identical client work
  lossd-tcp  lossd.Client(127.0.0.1:PORT) (shared_memory="off" where the client has it)
  raw-uds    the raw server on a Unix socket (baseline of lossd-uds)
  lossd-uds  lossd.Client(unix:PATH), lossd --unix_socket PATH
  lossd-shm  lossd.Client(127.0.0.1:PORT, shared_memory="on"), the inputs placed in the
             client's region (client.empty, filled once before timing): no tensor byte is
             copied by the client or crosses the socket
  kernel     lossd_bench_kernel: lossd's CPU backend alone, same shape and threads, calls back
             to back (one caller)
  torch      torch CPU forward + backward, same threads (one caller), when torch is importable

Modes that the lossd binary or the installed client do not support are skipped with the
reason. Then a small-request sweep: echo against lossd-wire (and lossd-tcp, the Python
client's whole path) at several concurrencies.

Prints elements/s, calls/s and median latency per mode, then ratios (per repetition, median):
lossd-tcp/raw, lossd-tcp/echo, lossd-wire/echo, lossd-uds/raw(-uds), lossd-shm/kernel,
lossd-shm/torch, and for small requests lossd-wire p50 minus echo p50 and their calls/s ratio. A benchmark, not a test.

    PYTHONPATH=tools/bench .venv/bin/python -m lossd_bench [--build-dir build-c] [options]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Set

from . import compute, servers
from .load import CallSpec, LoadPool
from .payload import Payload, shape_of
from .stats import (Key, Series, format_count, parse_count, rates_table, ratios_table,
                    sweep_table)

SERVICE_MODES = ["raw", "echo", "lossd-wire", "lossd-tcp", "raw-uds", "lossd-uds", "lossd-shm"]
LOCAL_MODES = ["kernel", "torch"]
ALL_MODES = SERVICE_MODES + LOCAL_MODES
REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


def parse_cpus(text: Optional[str]) -> Optional[Set[int]]:
    """'0-1', '0,2', 'all' or None (every CPU this process may use)."""
    if not text or text == "all":
        return None
    out: Set[int] = set()
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            out.update(range(int(lo), int(hi) + 1))
        else:
            out.add(int(part))
    return out


def cpu_model() -> str:
    try:
        p = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10)
        for line in p.stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "unknown CPU"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="lossd_bench", description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build-dir", default="build",
                    help="CMake build directory with server/lossd and tools/bench/ (default build)")
    ap.add_argument("--lossd-binary", help="lossd to measure (default BUILD_DIR/server/lossd); "
                    "an older build gives a before/after comparison")
    ap.add_argument("--bench-bin-dir", help="directory of lossd_bench_server and "
                    "lossd_bench_kernel (default BUILD_DIR/tools/bench)")
    ap.add_argument("--sizes", default="1k,1M,16M",
                    help="elements per request, e.g. 1k,1M,16M (k = 1024, M = 2^20)")
    ap.add_argument("--concurrency", default="1,16", help="concurrent callers (default 1,16)")
    ap.add_argument("--modes", default=",".join(ALL_MODES),
                    help=f"modes to measure (default all: {','.join(ALL_MODES)}); raw-uds is "
                    "measured only with lossd-uds")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions (median)")
    ap.add_argument("--seconds", type=float, default=1.0,
                    help="measuring time of one mode in one repetition")
    ap.add_argument("--min-calls", type=int, default=1,
                    help="least timed calls per caller in one measurement")
    ap.add_argument("--sweep-sizes", default="16,1k", help="small-request sweep sizes ('' skips)")
    ap.add_argument("--sweep-concurrency", default="1,4,16,64")
    ap.add_argument("--sweep-reps", type=int, default=3)
    ap.add_argument("--sweep-seconds", type=float, default=1.0)
    ap.add_argument("--server-cpus", default="all",
                    help="CPUs of every server and of the local compute baselines, e.g. 1 or "
                    "0-1 (default all)")
    ap.add_argument("--client-cpus", default="all", help="CPUs of the client processes")
    ap.add_argument("--threads", type=int, default=0,
                    help="lossd --cpu_threads, kernel and torch threads (default: number of "
                    "server CPUs)")
    ap.add_argument("--workers", type=int, default=0,
                    help="lossd --workers (default: same as --threads)")
    ap.add_argument("--lossd-arg", action="append", default=[],
                    help="extra lossd flag (repeatable), e.g. --lossd-arg=--inline_elements=0")
    ap.add_argument("--chunk-bytes", default="default",
                    help="lossd.Client chunk_bytes: 'default' (the client's), 'none', or bytes")
    ap.add_argument("--shm-transport", choices=["tcp", "unix"], default="tcp",
                    help="control channel of lossd-shm (default tcp)")
    ap.add_argument("--torch-python", help="Python with torch (default: this one, else "
                    ".venv-golden/bin/python)")
    ap.add_argument("--json", help="write every measurement to this JSON file")
    return ap


class Run:
    """State of one benchmark run: servers, clients, results."""

    def __init__(self, args: argparse.Namespace, argv: Sequence[str] = ()) -> None:
        self.args = args
        self.argv = list(argv)
        self.started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        self.server_cpus = parse_cpus(args.server_cpus)
        self.client_cpus = parse_cpus(args.client_cpus)
        ncpu = len(self.server_cpus or os.sched_getaffinity(0))
        self.threads = args.threads or ncpu
        self.workers = args.workers or self.threads
        bdir = args.build_dir
        self.lossd_binary = args.lossd_binary or os.path.join(bdir, "server", "lossd")
        self.bin_dir = args.bench_bin_dir or os.path.join(bdir, "tools", "bench")
        self.sizes = [parse_count(s) for s in args.sizes.split(",") if s.strip()]
        self.concs = [int(c) for c in args.concurrency.split(",") if c.strip()]
        self.sweep_sizes = [parse_count(s) for s in args.sweep_sizes.split(",") if s.strip()]
        self.sweep_concs = [int(c) for c in args.sweep_concurrency.split(",") if c.strip()]
        wanted = [m.strip() for m in args.modes.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in ALL_MODES]
        if unknown:
            raise SystemExit(f"unknown modes {unknown}; known: {ALL_MODES}")
        self.wanted = wanted
        self.skips: Dict[str, str] = {}
        self.modes: List[str] = []
        self.tmp = tempfile.mkdtemp(prefix="lossd-bench-")
        self.lossd: Optional[servers.LossdServer] = None
        self.baselines: Dict[str, servers.ServerProcess] = {}
        self.local: Dict[str, compute.ComputeProcess] = {}
        self.reply_bytes: Dict[int, int] = {}
        self.results: Dict[Key, Series] = {}
        self.sweep: Dict[Key, Series] = {}
        self.errors: List[str] = []
        self.records: List[dict] = []
        self.pool = LoadPool(self.client_cpus)
        # A client with shared memory uses it by default ("auto") where the server offers it:
        # lossd-tcp and lossd-uds then ask for shared_memory="off".
        self.client_has_shm = servers.client_supports_shared_memory() is None

    # ---- setup ----

    def client_kwargs(self) -> tuple:
        cb = self.args.chunk_bytes
        if cb == "default":
            return ()
        return (("chunk_bytes", None if cb == "none" else int(cb)),)

    def start(self) -> None:
        a = self.args
        if not os.path.exists(self.lossd_binary):
            raise SystemExit(f"error: {self.lossd_binary} not found (build it, or pass "
                             "--build-dir / --lossd-binary)")
        bench_server = os.path.join(self.bin_dir, "lossd_bench_server")
        kernel_bin = os.path.join(self.bin_dir, "lossd_bench_kernel")
        want_uds = "lossd-uds" in self.wanted
        self.lossd = servers.start_lossd(
            self.lossd_binary, threads=self.threads, workers=self.workers,
            cpus=self.server_cpus, unix_socket=os.path.join(self.tmp, "lossd.sock")
            if want_uds else None, extra=a.lossd_arg)
        if want_uds and self.lossd.unix_target is None:
            self.skips["lossd-uds"] = self.lossd.unix_skip or "?"
        self._detect_shm()
        # lossd's reply size for each request size, from one unary Evaluate.
        for n in sorted(set(self.sizes + self.sweep_sizes)):
            p = Payload(n)
            self.reply_bytes[n] = servers.evaluate_reply_bytes(self.lossd.target, p.request)
            del p
        need_raw = any(m in self.wanted for m in ("raw", "raw-uds", "lossd-uds"))
        if not os.path.exists(bench_server):
            for m in ("raw", "echo", "raw-uds"):
                self.skips[m] = f"{bench_server} not found (build target lossd_bench_server)"
        else:
            if "echo" in self.wanted:
                self.baselines["echo"] = servers.start_baseline(
                    bench_server, "echo", cpus=self.server_cpus)
            if need_raw:
                uds = os.path.join(self.tmp, "raw.sock") if (
                    "lossd-uds" in self.wanted and "lossd-uds" not in self.skips) else None
                self.baselines["raw"] = servers.start_baseline(
                    bench_server, "raw", cpus=self.server_cpus, unix_socket=uds,
                    reserve_bytes=max(self.reply_bytes.values(), default=0))
                if uds is None:
                    self.skips["raw-uds"] = "measured only as the baseline of lossd-uds"
        if "kernel" in self.wanted:
            if os.path.exists(kernel_bin):
                self.local["kernel"] = compute.start_kernel(kernel_bin, self.threads,
                                                            self.server_cpus)
            else:
                self.skips["kernel"] = f"{kernel_bin} not found (build target lossd_bench_kernel)"
        if "torch" in self.wanted:
            py, info = compute.find_torch(a.torch_python, REPO_ROOT)
            if py is None:
                self.skips["torch"] = info
            else:
                self.local["torch"] = compute.start_torch(py, self.threads, self.server_cpus)
        self.modes = [m for m in ALL_MODES if m in self.wanted and m not in self.skips]
        if "raw-uds" in self.modes and "lossd-uds" not in self.modes:
            self.modes.remove("raw-uds")
        for m in ALL_MODES:
            if m in self.wanted and m not in self.modes and m not in self.skips:
                self.skips[m] = "not measured"

    def _detect_shm(self) -> None:
        if "lossd-shm" not in self.wanted:
            return
        why = servers.client_supports_shared_memory()
        if why:
            self.skips["lossd-shm"] = why
            return
        assert self.lossd is not None
        try:
            caps = servers.capabilities(self.lossd.target)
        except Exception as e:  # an old server without the method, or no answer
            self.skips["lossd-shm"] = f"GetCapabilities failed: {e}"
            return
        if not caps.shared_memory:
            flags = [f"--{f}" for f in ("shared_memory_prefix", "shared_memory", "shm")
                     if servers.help_has_flag(self.lossd.help_text, f)]
            self.skips["lossd-shm"] = (
                "GetCapabilities reports shared_memory=false" +
                (f" (its --help lists {flags[0]}; --lossd-arg passes flags)" if flags else
                 " (and its --help lists no shared-memory flag)"))

    def spec(self, mode: str, n: int) -> CallSpec:
        assert self.lossd is not None
        kw = self.client_kwargs()
        no_shm = (("shared_memory", "off"),) if self.client_has_shm else ()
        if mode == "lossd-tcp":
            return CallSpec("lossd", self.lossd.target, n, client_kwargs=kw + no_shm)
        if mode == "lossd-uds":
            assert self.lossd.unix_target
            return CallSpec("lossd", self.lossd.unix_target, n, client_kwargs=kw + no_shm)
        if mode == "lossd-shm":
            target = self.lossd.target
            if self.args.shm_transport == "unix" and self.lossd.unix_target:
                target = self.lossd.unix_target
            return CallSpec("lossd", target, n, client_kwargs=kw + (("shared_memory", "on"),))
        if mode == "lossd-wire":
            return CallSpec("lossd-wire", self.lossd.target, n, reply_bytes=self.reply_bytes[n])
        if mode == "echo":
            return CallSpec("echo", self.baselines["echo"].address or "", n,
                            reply_bytes=self.reply_bytes[n])
        if mode == "raw":
            return CallSpec("raw", self.baselines["raw"].address or "", n,
                            reply_bytes=self.reply_bytes[n])
        if mode == "raw-uds":
            return CallSpec("raw", f"unix:{os.path.join(self.tmp, 'raw.sock')}", n,
                            reply_bytes=self.reply_bytes[n])
        raise ValueError(mode)

    # ---- measuring ----

    def measure(self, store: Dict[Key, Series], mode: str, n: int, c: int, seconds: float,
                rep: int) -> None:
        key = (n, c, mode)
        series = store.setdefault(key, Series.empty())
        rec: Dict[str, Any]
        if mode in LOCAL_MODES:
            r = self.local[mode].measure(n, seconds, 3)
            series.add(r.elements_per_s, r.elements_per_s / n, r.p50_us)
            rec = dict(mode=mode, elements=n, concurrency=c, rep=rep, calls=r.calls,
                       wall_s=r.seconds, elements_per_s=r.elements_per_s,
                       calls_per_s=r.elements_per_s / n, p50_us=r.p50_us, errors=0)
        else:
            cell = self.pool.run(self.spec(mode, n), c, seconds, self.args.min_calls)
            if cell.error or cell.calls == 0:
                series.add(None, None, None)
                self.errors.append(f"{format_count(n)} c{c} {mode} rep {rep}: "
                                   f"{cell.error or 'no call completed'}")
            else:
                series.add(cell.elements_per_s, cell.calls_per_s, cell.p50_us)
            rec = dict(mode=mode, elements=n, concurrency=c, rep=rep, calls=cell.calls,
                       wall_s=cell.wall_s, elements_per_s=cell.elements_per_s,
                       calls_per_s=cell.calls_per_s, p50_us=cell.p50_us, errors=cell.errors,
                       error=cell.error)
        self.records.append(rec)
        print(f"  {format_count(n):>4} c{c:<3} {mode:<10} rep {rep}: "
              f"{rec['elements_per_s'] / 1e6:10.2f} Melem/s  {rec['calls_per_s']:9.1f} calls/s  "
              f"p50 {rec['p50_us']:10.1f} us  ({rec['calls']} calls)", file=sys.stderr,
              flush=True)

    def main_table(self) -> None:
        service = [m for m in self.modes if m in SERVICE_MODES]
        local = [m for m in self.modes if m in LOCAL_MODES]
        for n in self.sizes:
            for rep in range(self.args.reps):
                k = rep % max(1, len(service))
                order = service[k:] + service[:k]
                for c in self.concs:
                    for m in order:
                        self.measure(self.results, m, n, c, self.args.seconds, rep)
                for m in local:
                    self.measure(self.results, m, n, 1, self.args.seconds, rep)

    def sweep_run(self) -> None:
        modes = [m for m in ("echo", "lossd-wire", "lossd-tcp") if m in self.modes]
        if "echo" not in modes or len(modes) < 2:
            return
        for n in self.sweep_sizes:
            for rep in range(self.args.sweep_reps):
                k = rep % len(modes)
                order = modes[k:] + modes[:k]
                for c in self.sweep_concs:
                    for m in order:
                        self.measure(self.sweep, m, n, c, self.args.sweep_seconds, rep)

    # ---- report ----

    def describe(self) -> List[str]:
        import grpc

        try:
            import lossd
            client = f"lossd client {lossd.__version__} ({os.path.dirname(lossd.__file__)})"
        except ImportError:
            client = "lossd client not importable"
        kernel = self.local.get("kernel")
        simd = kernel.header.get("simd_target", "?") if kernel else "? (no kernel driver)"
        torch_p = self.local.get("torch")
        torch_v = f"torch {torch_p.header.get('version')}" if torch_p else "torch: -"
        a = self.args
        cpus = lambda s: ",".join(map(str, sorted(s))) if s else "all"  # noqa: E731
        command = [os.path.basename(sys.executable), "-m", "lossd_bench"] + self.argv
        lines = [
            "lossd service path benchmark",
            f"date: {self.started} (start)",
            f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs, SIMD target {simd}",
            f"command: {shlex.join(command)}",
            f"lossd: {self.lossd_binary} ({servers.lossd_version(self.lossd_binary)}), "
            f"--workers={self.workers} --cpu_threads={self.threads} --device=cpu "
            f"{' '.join(a.lossd_arg)}".rstrip(),
            f"servers (lossd, echo, raw) and kernel/torch pinned to CPUs {cpus(self.server_cpus)}"
            f"; client processes to CPUs {cpus(self.client_cpus)}; kernel and torch threads "
            f"{self.threads}",
            f"clients: {client}, grpcio {grpc.__version__}, chunk_bytes {a.chunk_bytes}; "
            f"{torch_v}",
            f"request: float32 BCE with logits, shape [n/64, 64], REDUCTION_NONE + grad_logits; "
            f"lossd reply bytes: " + ", ".join(
                f"{format_count(n)}: {b}" for n, b in sorted(self.reply_bytes.items())),
            f"{a.reps} interleaved repetition{'s' if a.reps != 1 else ''} of {a.seconds:g} s "
            f"per mode (medians); kernel "
            f"and torch: one caller, calls back to back",
        ]
        return lines

    def report(self) -> str:
        out = self.describe()
        out.append("")
        out.append(rates_table(self.results, self.sizes, self.concs, self.modes))
        out.append("")
        out.append("ratios (median over repetitions of the per-repetition ratio; kernel and "
                   "torch measured with one caller; uds/raw against raw-uds):")
        out.append(ratios_table(self.results, self.sizes, self.concs))
        if self.sweep:
            out.append("")
            r = self.args.sweep_reps
            out.append(f"small requests, lossd-wire (same bytes, same client) and lossd-tcp "
                       f"(the Python client) against echo ({r} repetition"
                       f"{'s' if r != 1 else ''} of {self.args.sweep_seconds:g} s):")
            out.append(sweep_table(self.sweep, self.sweep_sizes, self.sweep_concs))
        if any(m in self.wanted for m in self.skips):
            out.append("")
            for m in ALL_MODES:
                if m in self.skips and m in self.wanted:
                    out.append(f"skipped {m}: {self.skips[m]}")
        for e in self.errors[:20]:
            out.append(f"error: {e}")
        return "\n".join(out)

    def close(self) -> None:
        self.pool.close()
        for local in self.local.values():
            local.close()
        for server in self.baselines.values():
            server.stop()
        if self.lossd:
            self.lossd.stop()
        for name in ("lossd.sock", "raw.sock"):
            path = os.path.join(self.tmp, name)
            if os.path.exists(path):
                os.unlink(path)
        try:
            os.rmdir(self.tmp)
        except OSError:
            pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    run = Run(args, argv)
    t0 = time.monotonic()
    try:
        run.start()
        print("\n".join(run.describe()), file=sys.stderr, flush=True)
        run.main_table()
        run.sweep_run()
        report = run.report()
    finally:
        run.close()
    print(report)
    print(f"(whole run {time.monotonic() - t0:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": run.describe(), "skips": run.skips, "records": run.records,
                       "shapes": {str(n): list(shape_of(n)) for n in run.sizes}}, f, indent=1)
    return 1 if run.errors else 0
