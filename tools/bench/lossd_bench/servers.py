"""Server processes of the benchmark: lossd and the baseline servers (lossd_bench_server),
started on loopback with free ports, pinned to a CPU set, and what each lossd build supports.

Every server prints "<name> listening on HOST:PORT" (and the baseline server also
"<name> listening on unix:PATH") on stderr once it serves; ``ServerProcess`` waits for that
line and keeps draining stderr so that the server never blocks on a full pipe.
"""

from __future__ import annotations

import inspect
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Set

import grpc

from .payload import fields

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # lossd's and the lossd client's default
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
_LISTENING = re.compile(r"(\S+) listening on (\S+):(\d+)\s*$")


def pin(cpus: Optional[Set[int]]) -> Optional[Callable[[], None]]:
    """A preexec_fn that pins the child to ``cpus`` (None: inherit)."""
    if not cpus:
        return None
    frozen = set(cpus)
    return lambda: os.sched_setaffinity(0, frozen)


class ServerProcess:
    """A server child process; ``wait_ready`` returns its TCP address (HOST:PORT)."""

    def __init__(self, name: str, args: Sequence[str], cpus: Optional[Set[int]] = None) -> None:
        self.name = name
        self.args = list(args)
        self.lines: List[str] = []
        self._ready = threading.Event()
        self.address: Optional[str] = None
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, preexec_fn=pin(cpus))
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            m = _LISTENING.search(line)
            if m and m.group(2) != "unix" and self.address is None:
                self.address = f"{m.group(2)}:{m.group(3)}"
                self._ready.set()
        self._ready.set()  # the process ended

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> str:
        self._ready.wait(timeout)
        if self.address is None:
            self.stop()
            tail = "\n".join(self.lines[-20:])
            raise RuntimeError(f"{self.name} ({' '.join(self.args)}) did not start:\n{tail}")
        return self.address

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(2)


# ---- what a lossd build and the installed client support ----

def lossd_help(binary: str) -> str:
    """The text of ``lossd --help`` (absl prints it on stdout and exits 1)."""
    try:
        p = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"<cannot run {binary} --help: {e}>"
    return p.stdout + p.stderr


def lossd_version(binary: str) -> str:
    try:
        p = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"<cannot run {binary} --version: {e}>"
    return (p.stdout + p.stderr).strip().splitlines()[0] if (p.stdout + p.stderr).strip() else "?"


def help_has_flag(help_text: str, flag: str) -> bool:
    return re.search(rf"--{re.escape(flag)}\b", help_text) is not None


def client_supports_shared_memory() -> Optional[str]:
    """None when ``lossd.Client`` takes ``shared_memory=``; else why not."""
    try:
        import lossd
    except ImportError as e:
        return f"the lossd client is not importable ({e})"
    try:
        params = inspect.signature(lossd.Client).parameters
    except (TypeError, ValueError) as e:
        return f"cannot inspect lossd.Client ({e})"
    if "shared_memory" not in params:
        return "lossd.Client has no shared_memory parameter (client without shared memory)"
    return None


@dataclass
class Capabilities:
    shared_memory: bool = False
    shared_memory_prefix: str = ""
    server_version: str = ""


def capabilities(target: str, timeout: float = 10.0) -> Capabilities:
    """lossd.v1.LossService/GetCapabilities read with payload.fields (no generated classes)."""
    with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as ch:
        call = ch.unary_unary("/lossd.v1.LossService/GetCapabilities")
        raw = call(b"", timeout=timeout)
    f = fields(raw)
    c = Capabilities()
    c.server_version = bytes(f.get(1, [b""])[-1]).decode("utf-8", "replace")
    c.shared_memory = bool(f.get(10, [0])[-1])
    c.shared_memory_prefix = bytes(f.get(11, [b""])[-1]).decode("utf-8", "replace")
    return c


def evaluate_reply_bytes(target: str, request: bytes, timeout: float = 120.0) -> int:
    """Size of lossd's reply to one unary Evaluate of ``request`` (serialized bytes)."""
    with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as ch:
        call = ch.unary_unary("/lossd.v1.LossService/Evaluate")
        return len(call(request, timeout=timeout))


@dataclass
class LossdServer:
    """A running lossd: its TCP target, its Unix socket target (when listening on one) and
    what it supports."""

    process: ServerProcess
    target: str
    unix_target: Optional[str] = None
    unix_skip: Optional[str] = None
    help_text: str = ""
    notes: List[str] = field(default_factory=list)

    def stop(self) -> None:
        self.process.stop()


def start_lossd(binary: str, *, threads: int, workers: int, cpus: Optional[Set[int]],
                unix_socket: Optional[str], extra: Sequence[str] = ()) -> LossdServer:
    """Starts lossd on 127.0.0.1 (CPU device) and, when its --help lists --unix_socket and
    ``unix_socket`` is given, on that socket too; if that start fails, starts it without the
    socket (``unix_skip`` says why)."""
    help_text = lossd_help(binary)
    base = [binary, "--host", "127.0.0.1", "--port", "0", "--device", "cpu",
            f"--workers={workers}", f"--cpu_threads={threads}", *extra]
    unix_skip: Optional[str] = None
    if unix_socket is None:
        unix_skip = "not requested"
    elif not help_has_flag(help_text, "unix_socket"):
        unix_skip = f"{os.path.basename(binary)} --help lists no --unix_socket"
    else:
        if os.path.exists(unix_socket):
            os.unlink(unix_socket)
        proc = ServerProcess("lossd", [*base, f"--unix_socket={unix_socket}"], cpus)
        try:
            target = proc.wait_ready()
            deadline = time.monotonic() + 5
            while not os.path.exists(unix_socket) and time.monotonic() < deadline:
                time.sleep(0.02)
            if os.path.exists(unix_socket):
                return LossdServer(proc, target, f"unix:{unix_socket}", None, help_text)
            proc.stop()
            unix_skip = f"lossd started but {unix_socket} did not appear"
        except RuntimeError as e:
            unix_skip = f"lossd --unix_socket did not start: {str(e).splitlines()[-1]}"
    proc = ServerProcess("lossd", base, cpus)
    return LossdServer(proc, proc.wait_ready(), None, unix_skip, help_text)


def start_baseline(binary: str, service: str, *, cpus: Optional[Set[int]],
                   unix_socket: Optional[str] = None, reserve_bytes: int = 0) -> ServerProcess:
    args = [binary, f"--service={service}", "--host=127.0.0.1", "--port=0",
            f"--reserve_bytes={reserve_bytes}"]
    if unix_socket:
        if os.path.exists(unix_socket):
            os.unlink(unix_socket)
        args.append(f"--unix_socket={unix_socket}")
    p = ServerProcess(service, args, cpus)
    p.wait_ready()
    return p
