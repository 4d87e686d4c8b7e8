"""The GPU serving benchmark (docs/perf.md, "GPU serving"): run by tools/gpu/gpu_check.sh on a
machine with an NVIDIA GPU, after its tests. Timings are reported, never judged: each target is
printed with "met" or "NOT met" beside the figure, and the exit status says only whether every
step ran.

Steps, most important first (each bounded by a timeout; a failed step does not stop the next):
  1. the kernel's own rate on device-resident data (gpu_bench, --elements float32), the
     denominator of the large-request ratios;
  2. CUDA IPC end to end: lossd.torch on CUDA tensors through a local lossd (the logits, targets
     and pos_weight referenced in CUDA IPC regions, the gradient written by the server into a
     CUDA tensor), forward + backward, against the kernel's rate, against the same calls with
     cuda_ipc="off" (bytes over the socket), and against torch's own CUDA forward + backward;
     the IPC gradient must equal the host path's bit for bit;
  3. dynamic batching: 1k-element requests at c1, c16 and c64 (lossd-bench, closed loop) on
     CUDA unbatched (--batch_max_delay=0), CUDA batched (--batch_max_delay, default 100us) and
     the CPU path: calls/s, p50 and p99;
  4. large requests (--elements float32 with dl/dx, reduction none) through TCP and through
     POSIX shared memory (lossd-bench), against the kernel's rate.

Usage (gpu_check.sh passes --bin-dir with wrappers that start our binaries with the right
libraries): python3 tools/gpu/serving_bench.py --bin-dir DIR [--elements 64Mi] [--quick]
DIR holds lossd, lossd-bench and gpu_bench (executables or wrappers).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def parse_count(text: str) -> int:
    m = re.fullmatch(r"(\d+)(k|M|Ki|Mi)?", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (e.g. 1k, 64Mi)")
    scale = {None: 1, "k": 1000, "M": 1000**2, "Ki": 1024, "Mi": 1024**2}[m.group(2)]
    return int(m.group(1)) * scale


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


class Steps:
    """Runs steps in order; one failing (an exception or a timeout) does not stop the rest."""

    def __init__(self) -> None:
        self.failed: List[str] = []

    def run(self, name: str, fn: Any, *args: Any) -> Any:
        print(f"\n== {name}", flush=True)
        t0 = time.monotonic()
        try:
            result = fn(*args)
            print(f"({name}: {time.monotonic() - t0:.0f} s)", flush=True)
            return result
        except Exception as e:  # noqa: BLE001 - every failure is reported, the rest still runs
            print(f"{name}: FAILED: {type(e).__name__}: {e}", flush=True)
            self.failed.append(name)
            return None


def kernel_rate(bin_dir: str, n: int, variant: str) -> float:
    """Gelem/s of gpu_bench's `variant` at n elements (device-resident data, CUDA events)."""
    out = subprocess.run(
        [os.path.join(bin_dir, "gpu_bench"), "--skip-validation", "--only", variant,
         "--min-elements", str(n), "--max-elements", str(n)],
        capture_output=True, text=True, timeout=180, check=True).stdout
    rates = [float(line.split()[5]) for line in out.splitlines()
             if line.startswith("RESULT ") and line.split()[1] == variant]
    if not rates:
        raise RuntimeError(f"gpu_bench printed no RESULT row for {variant}:\n{out[-2000:]}")
    print(f"kernel {variant} at {n} elements: {rates[-1]:.2f} Gelem/s")
    return rates[-1]


class Server:
    """A lossd on a Unix socket and a loopback port, stopped with SIGTERM on exit."""

    def __init__(self, bin_dir: str, extra: List[str]) -> None:
        self.dir = tempfile.mkdtemp(prefix="lossd-serving-")
        self.socket = os.path.join(self.dir, "lossd.sock")
        self.log = open(os.path.join(self.dir, "server.log"), "w+")
        self.proc = subprocess.Popen(
            [os.path.join(bin_dir, "lossd"), "--host=127.0.0.1", "--port=0", "--device=auto",
             f"--unix_socket={self.socket}", *extra], stdout=self.log, stderr=subprocess.STDOUT)
        self.port = 0
        for _ in range(300):
            self.log.seek(0)
            m = re.search(r"lossd listening on .*:(\d+)$", self.log.read(), re.M)
            if m and os.path.exists(self.socket):
                self.port = int(m.group(1))
                break
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        if not self.port:
            self.log.seek(0)
            raise RuntimeError(f"lossd did not start:\n{self.log.read()[-2000:]}")
        self.log.seek(0)
        config = [l for l in self.log.read().splitlines() if "config:" in l]
        if config:
            print(config[0])

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def cuda_ipc(bin_dir: str, n: int, kernel_mean: Optional[float], reps: int) -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, os.path.join(ROOT, "client", "python", "src"))
    import lossd
    import lossd.torch

    dev = torch.device("cuda", 0)
    cols = 64
    g = torch.Generator(device=dev).manual_seed(7)
    x = torch.randn((n // cols, cols), device=dev, generator=g) * 4
    y = (torch.rand((n // cols, cols), device=dev, generator=g) < 0.5).float()
    pw = torch.rand((cols,), device=dev, generator=g) + 0.5

    def timed(fn: Any) -> Tuple[float, Any]:
        fn()  # warm-up: registrations, allocations, the server's buffers
        torch.cuda.synchronize()
        best = float("inf")
        result = None
        for _ in range(reps):
            t0 = time.perf_counter()
            result = fn()
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return best, result

    def lossd_fb(client: Any) -> Any:
        def run() -> Any:
            xi = x.detach().requires_grad_(True)
            loss = lossd.torch.bce_with_logits(xi, y, pos_weight=pw, reduction="mean",
                                               client=client)
            loss.backward()
            return loss.detach(), xi.grad
        return run

    def torch_fb() -> Any:
        xi = x.detach().requires_grad_(True)
        loss = F.binary_cross_entropy_with_logits(xi, y, pos_weight=pw, reduction="mean")
        loss.backward()
        return loss.detach(), xi.grad

    rows = []
    with Server(bin_dir, ["--max_message_bytes=1073741824"]) as server:
        target = f"unix:{server.socket}"
        with lossd.Client(target, timeout=600, cuda_ipc="on") as c_ipc, \
                lossd.Client(target, timeout=600, cuda_ipc="off") as c_host:
            t_ipc, (l_ipc, g_ipc) = timed(lossd_fb(c_ipc))
            print(f"CUDA IPC decision: {c_ipc.cuda_ipc_decision}")
            t_host, (l_host, g_host) = timed(lossd_fb(c_host))
    t_torch, (l_torch, g_torch) = timed(torch_fb)
    same = bool(torch.equal(g_ipc, g_host)) and bool(torch.equal(l_ipc, l_host))
    gi = g_ipc.float().cpu().numpy().view(np.int32).astype(np.int64)
    gh = g_host.float().cpu().numpy().view(np.int32).astype(np.int64)
    print(f"IPC vs host path: loss and dl/dx bitwise equal: {same} "
          f"(max dl/dx difference {int(np.max(np.abs(gi - gh)))} ulp); "
          f"grad device {g_ipc.device}; loss lossd {float(l_ipc):.9g} torch {float(l_torch):.9g}")
    for name, t in (("lossd CUDA IPC", t_ipc), ("lossd bytes (cuda_ipc=off)", t_host),
                    ("torch CUDA", t_torch)):
        rate = n / t / 1e9
        of_kernel = f"{rate / kernel_mean:6.3f}" if kernel_mean else "     -"
        rows.append((name, t, rate, of_kernel))
    print(f"{'path (mean, forward + backward)':<30} {'ms':>9} {'Gelem/s':>9} {'of kernel':>10}")
    for name, t, rate, of_kernel in rows:
        print(f"{name:<30} {1e3 * t:9.2f} {rate:9.3f} {of_kernel:>10}")
    if kernel_mean:
        r = n / t_ipc / 1e9 / kernel_mean
        print(f"target: CUDA IPC end to end >= 0.5 of the kernel rate: {r:.3f} -> {verdict(r >= 0.5)}")
    print(f"CUDA IPC over bytes: {t_host / t_ipc:.1f}x; over torch CUDA: {t_torch / t_ipc:.2f}x")
    if not same:
        raise RuntimeError("the CUDA IPC path's results differ from the host path's")


def bench(bin_dir: str, args: List[str], timeout: float) -> List[Dict[str, Any]]:
    """Runs lossd-bench with `args` (it starts its own lossd) and returns its JSON rows."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [os.path.join(bin_dir, "lossd-bench"), f"--lossd_binary={os.path.join(bin_dir, 'lossd')}",
               "--baselines=none", "--rounds=1", "--progress=false", f"--json={f.name}", *args]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"lossd-bench failed (rc {p.returncode}): {' '.join(cmd)}\n"
                               f"{p.stdout[-1500:]}{p.stderr[-1500:]}")
        return json.load(open(f.name))["rows"]


def batching(bin_dir: str, delay: str, duration: str) -> None:
    common = ["--elements=1k", "--concurrency=1,16,64", f"--duration={duration}", "--warmup=1s",
              "--grad=logits", "--reduction=none"]
    configs = [
        ("cuda unbatched", ["--device=cuda", "--lossd_args=--batch_max_delay=0"]),
        (f"cuda batched {delay}", ["--device=cuda", f"--lossd_args=--batch_max_delay={delay}"]),
        ("cpu", ["--device=cpu"]),
    ]
    res: Dict[Tuple[str, int], Dict[str, Any]] = {}
    for name, extra in configs:
        for row in bench(bin_dir, common + extra, timeout=120):
            res[(name, int(row["concurrency"]))] = row
    print(f"{'1k elements':<22} {'conc':>4} {'calls/s':>10} {'p50 us':>9} {'p99 us':>9} {'errors':>7}")
    for name, _ in configs:
        for c in (1, 16, 64):
            r = res.get((name, c))
            if r is None:
                print(f"{name:<22} {c:>4} {'-':>10}")
                continue
            lat = r["latency_us"]
            print(f"{name:<22} {c:>4} {r['qps']:10.0f} {lat['p50']:9.1f} {lat['p99']:9.1f} "
                  f"{r['errors']:>7}")
    failed = {k: r["error_codes"] for k, r in res.items() if r["errors"] or not r["ok"]}
    if failed:
        raise RuntimeError(f"calls failed (configuration, concurrency: codes): {failed}")
    b, u, cpu = (res.get((f"cuda batched {delay}", 64)), res.get(("cuda unbatched", 64)),
                 res.get(("cpu", 64)))
    if b and u and cpu:
        print(f"target: batched >= 3x unbatched CUDA calls/s at c64: {b['qps'] / u['qps']:.2f}x -> "
              f"{verdict(b['qps'] >= 3 * u['qps'])}")
        print(f"target: batched >= the CPU path's calls/s at c64: {b['qps'] / cpu['qps']:.2f}x -> "
              f"{verdict(b['qps'] >= cpu['qps'])}")
    b1, u1 = res.get((f"cuda batched {delay}", 1)), res.get(("cuda unbatched", 1))
    if b1 and u1:
        r = b1["latency_us"]["p99"] / u1["latency_us"]["p99"]
        print(f"target: batched p99 at c1 <= 1.2x unbatched: {r:.2f}x -> {verdict(r <= 1.2)}")


def large(bin_dir: str, n: int, kernel_none: Optional[float], duration: str) -> None:
    common = [f"--elements={n}", "--concurrency=1", f"--duration={duration}", "--warmup=2s",
              "--grad=logits", "--reduction=none", "--device=cuda", "--cols=64",
              "--lossd_args=--max_message_bytes=1073741824"]
    print(f"{'path (' + str(n) + ' float32, none, dl/dx)':<34} {'calls/s':>8} {'p50 ms':>8} "
          f"{'Gelem/s':>8} {'of kernel':>10} {'srv compute ms':>15}")
    for name, extra in (("TCP loopback", []), ("POSIX shared memory", ["--shared_memory"])):
        rows = bench(bin_dir, common + extra, timeout=300)
        r = rows[0]
        if r["errors"] or not r["ok"]:
            raise RuntimeError(f"{name}: calls failed: {r['error_codes']}")
        rate = r["elements_per_s"] / 1e9
        of_kernel = f"{rate / kernel_none:10.3f}" if kernel_none else f"{'-':>10}"
        comp = r.get("server_us", {}).get("compute_p50", 0) / 1e3
        print(f"{name:<34} {r['qps']:8.2f} {r['latency_us']['p50'] / 1e3:8.1f} {rate:8.3f} "
              f"{of_kernel} {comp:15.1f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin-dir", required=True)
    ap.add_argument("--elements", type=parse_count, default=parse_count("64Mi"))
    ap.add_argument("--batch-delay", default="100us")
    ap.add_argument("--quick", action="store_true", help="shorter runs (a smoke test)")
    a = ap.parse_args()
    reps = 3 if a.quick else 5
    duration = "2s" if a.quick else "4s"
    steps = Steps()
    k_mean = steps.run("kernel rate (gpu_bench mean/wC/f32)", kernel_rate, a.bin_dir, a.elements,
                       "mean/wC/f32")
    steps.run("CUDA IPC end to end (lossd.torch)", cuda_ipc, a.bin_dir, a.elements, k_mean, reps)
    steps.run("dynamic batching, 1k elements", batching, a.bin_dir, a.batch_delay, duration)
    k_none = steps.run("kernel rate (gpu_bench none/wC/f32)", kernel_rate, a.bin_dir, a.elements,
                       "none/wC/f32")
    steps.run("large requests through TCP and shared memory", large, a.bin_dir, a.elements, k_none,
              duration)
    print(f"\nserving bench: {'every step ran' if not steps.failed else 'FAILED: ' + ', '.join(steps.failed)}")
    return 1 if steps.failed else 0


if __name__ == "__main__":
    sys.exit(main())
