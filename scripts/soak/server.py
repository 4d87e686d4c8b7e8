"""The server: starting and stopping a lossd of our own, reading a process's RSS, scraping the
server's Prometheus counters, and checking that a --target is a loopback address."""

from __future__ import annotations

import ctypes
import ipaddress
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from .common import SERVER_DRAIN_S, SERVER_STOP_GRACE_S, SetupError, log


def read_rss_kib(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) in KiB from /proc/PID/status, or None."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    if "VmRSS" not in values:
        return None
    return values["VmRSS"], values.get("VmHWM", values["VmRSS"])


def _die_with_parent() -> None:
    """In the child: SIGKILL when this script dies (PR_SET_PDEATHSIG), whatever happens."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except Exception:  # noqa: BLE001 - best effort
        pass


class OwnServer:
    """A lossd started by this script on 127.0.0.1:0; always stopped by stop()."""

    def __init__(self, binary: Path, device: str, extra_args: list[str], log_path: Path):
        self.binary = binary
        self.args = [str(binary), "--host=127.0.0.1", "--port=0", f"--device={device}",
                     "--metrics_host=127.0.0.1", "--metrics_port=0",
                     f"--drain_timeout={SERVER_DRAIN_S:g}s", *extra_args]
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.metrics_port = 0
        self.exit_code: int | None = None

    def start(self, timeout_s: float = 30.0) -> None:
        if not self.binary.is_file() or not os.access(self.binary, os.X_OK):
            raise SetupError(f"no lossd executable at {self.binary} (give --binary or set "
                             "LOSSD_BINARY)")
        with open(self.log_path, "wb") as log_file:
            # Own session: a Ctrl-C in the terminal reaches this script only, which then stops
            # the server itself.
            self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=log_file,
                                         stderr=log_file, start_new_session=True,
                                         preexec_fn=_die_with_parent)
        listening = re.compile(r"^lossd listening on (\S+):(\d+)\s*$", re.M)
        metrics = re.compile(r"^lossd metrics on (\S+):(\d+)\s*$", re.M)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            if m := listening.search(text):
                self.port = int(m.group(2))
                if mm := metrics.search(text):
                    self.metrics_port = int(mm.group(2))
                return
            if self.proc.poll() is not None:
                raise SetupError(f"lossd exited with status {self.proc.returncode} during "
                                 f"startup:\n{self.log_tail()}")
            time.sleep(0.05)
        raise SetupError(f"lossd did not print its port within {timeout_s:g} s:\n"
                         f"{self.log_tail()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM (the server drains), then SIGKILL if it is still running after the drain
        timeout and SERVER_STOP_GRACE_S more."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            log(f"stopping the server (SIGTERM to pid {self.proc.pid})")
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=SERVER_DRAIN_S + SERVER_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            finally:
                if self.proc.poll() is None:  # interrupted while waiting
                    self.proc.kill()
                    self.proc.wait()
        self.exit_code = self.proc.returncode


def scrape_metrics(port: int) -> dict[str, Any] | None:
    """Evaluate calls by code and the in-flight/queue gauges from the server's /metrics."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode("utf-8", "replace")
    except OSError:
        return None
    calls: dict[str, int] = {}
    gauges: dict[str, float] = {}
    sample = re.compile(r"^(lossd_[a-z_]+)(?:\{([^}]*)\})?\s+(\S+)$")
    for line in text.splitlines():
        m = sample.match(line)
        if not m:
            continue
        name, labels_text, value = m.groups()
        labels = dict(re.findall(r'(\w+)="([^"]*)"', labels_text or ""))
        if name == "lossd_requests_total" and labels.get("method") == "Evaluate":
            code = labels.get("code", "?")
            calls[code] = calls.get(code, 0) + int(float(value))
        elif name in ("lossd_in_flight_calls", "lossd_queued_requests"):
            gauges[name] = float(value)
    return {"evaluate_calls": calls, **gauges}


def loopback_target(text: str) -> str:
    """HOST:PORT with a loopback host, as a gRPC target; anything else raises SetupError."""
    if "://" in text or "/" in text or text.count(":") == 0:
        raise SetupError(f"--target must be HOST:PORT, got {text!r}")
    host, _, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise SetupError(f"--target {text!r}: bad port {port_text!r}") from None
    if not 0 < port < 65536:
        raise SetupError(f"--target {text!r}: port out of range")
    if host.lower() == "localhost":
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as e:
            raise SetupError(f"--target {text!r}: cannot resolve localhost: {e}") from None
        addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
        if not addresses or not all(a.is_loopback for a in addresses):
            raise SetupError(f"--target {text!r}: localhost resolves to a non-loopback "
                             f"address ({', '.join(map(str, addresses))}); refused")
        address = addresses[0]
    else:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise SetupError(f"--target {text!r}: only loopback addresses (127.0.0.0/8, ::1, "
                             "localhost) may be targeted") from None
        mapped = getattr(address, "ipv4_mapped", None)
        if not (address.is_loopback or (mapped is not None and mapped.is_loopback)):
            raise SetupError(f"--target {text!r}: {address} is not a loopback address; "
                             "refused")
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"
