"""Local compute baselines, each a child process pinned like the servers and driven over a
line protocol (so that the benchmark interleaves them with its service measurements):

* ``kernel``: lossd_bench_kernel --serve (lossd's CPU backend alone, same shape and threads);
* ``torch``: torch_worker.py under a Python that imports torch
  (``binary_cross_entropy_with_logits``, reduction none, forward + backward, same threads).

Request line: "ELEMENTS SECONDS MIN_CALLS"; reply line: "<name> elements=N ... calls=K
seconds=S p50_us=P mean_us=M" (key=value pairs after the name).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Set

from .servers import pin


@dataclass(frozen=True)
class ComputeResult:
    elements: int
    calls: int
    seconds: float
    p50_us: float
    mean_us: float

    @property
    def elements_per_s(self) -> float:
        return self.elements / (self.mean_us * 1e-6) if self.mean_us > 0 else 0.0


def parse_reply(line: str) -> Dict[str, str]:
    """The key=value pairs of a reply line."""
    out: Dict[str, str] = {}
    for token in line.split()[1:]:
        if "=" in token:
            k, v = token.split("=", 1)
            out[k] = v
    return out


class ComputeProcess:
    def __init__(self, name: str, args: Sequence[str], cpus: Optional[Set[int]] = None,
                 env: Optional[Dict[str, str]] = None) -> None:
        self.name = name
        self.args = list(args)
        self.proc = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1,
                                     preexec_fn=pin(cpus), env=env)
        self.header: Dict[str, str] = {}

    def read_line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"{self.name} ended: {err.strip()[-2000:]}")
        return line.strip()

    def measure(self, elements: int, seconds: float, min_calls: int) -> ComputeResult:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{elements} {seconds} {min_calls}\n")
        self.proc.stdin.flush()
        line = self.read_line()
        if line.startswith("error"):
            raise RuntimeError(f"{self.name}: {line}")
        kv = parse_reply(line)
        return ComputeResult(int(kv["elements"]), int(kv["calls"]), float(kv["seconds"]),
                             float(kv["p50_us"]), float(kv["mean_us"]))

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(10)
            except (subprocess.TimeoutExpired, OSError):
                self.proc.kill()
                self.proc.wait()


def start_kernel(binary: str, threads: int, cpus: Optional[Set[int]]) -> ComputeProcess:
    p = ComputeProcess("kernel", [binary, f"--threads={threads}", "--serve"], cpus)
    p.header = parse_reply(p.read_line())  # "kernel simd_target=... threads=..."
    return p


def torch_pythons(explicit: Optional[str], repo_root: str) -> List[str]:
    """Interpreters to try for torch, in order: --torch-python, this one, the golden venv."""
    out: List[str] = []
    if explicit:
        out.append(explicit)
    out.append(sys.executable)
    golden = os.path.join(repo_root, ".venv-golden", "bin", "python")
    if os.path.exists(golden):
        out.append(golden)
    return out


def find_torch(explicit: Optional[str], repo_root: str) -> tuple:
    """(python, torch version) of the first interpreter that imports torch, or (None, why)."""
    tried = []
    for py in torch_pythons(explicit, repo_root):
        try:
            p = subprocess.run([py, "-c", "import torch; print(torch.__version__)"],
                               capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            tried.append(f"{py}: {e}")
            continue
        if p.returncode == 0:
            return py, p.stdout.strip()
        tried.append(py)
    return None, ("torch is not importable by " + ", ".join(tried) +
                  " (make golden-venv installs it; or pass --torch-python)")


def start_torch(python: str, threads: int, cpus: Optional[Set[int]]) -> ComputeProcess:
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    p = ComputeProcess("torch", [python, worker, f"--threads={threads}"], cpus, env=env)
    p.header = parse_reply(p.read_line())  # "torch version=... threads=..."
    return p
