"""Fixtures that run the real lossd binary for end-to-end tests.

The binary is ``$LOSSD_BINARY`` or ``<repo>/build/server/lossd``. It is started on a free
loopback port (``--port 0``) and the port is read from its "lossd listening on HOST:PORT"
line on stderr. A missing binary or a server that does not come up fails the tests loudly;
nothing is skipped.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import pytest

import lossd

REPO = Path(__file__).resolve().parents[2]
DEFAULT_BINARY = REPO / "build" / "server" / "lossd"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 40.0  # the server drains for up to --drain_timeout (30 s by default)
_LISTENING = re.compile(r"lossd listening on (\S+):(\d+)\s*$")


def lossd_binary() -> Path:
    """The server binary under test; fails the test session if it is missing."""
    path = Path(os.environ.get("LOSSD_BINARY", str(DEFAULT_BINARY)))
    if not path.is_file() or not os.access(path, os.X_OK):
        pytest.fail(
            f"lossd binary not found or not executable at {path}. Build it with "
            "`cmake -S . -B build && cmake --build build -j2`, or point LOSSD_BINARY at it.",
            pytrace=False)
    return path


class ServerProcess:
    """A running lossd process; its stderr is drained into ``lines`` by a thread."""

    def __init__(self, args: Sequence[str]) -> None:
        self.args = list(args)
        self.lines: List[str] = []
        self.target: Optional[str] = None
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, errors="replace")
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._lock:
                self.lines.append(line.rstrip("\n"))
            m = _LISTENING.search(line)
            if m and self.target is None:
                self.target = f"{m.group(1)}:{m.group(2)}"
                self._ready.set()
        self._ready.set()  # EOF: the process closed stderr (exited)

    def stderr_text(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> str:
        if not self._ready.wait(timeout) or self.target is None:
            rc = self.proc.poll()
            self.kill()
            pytest.fail(f"lossd did not print its listening line within {timeout} s "
                        f"(exit code {rc}); command: {' '.join(self.args)}\n"
                        f"stderr:\n{self.stderr_text()}", pytrace=False)
        assert self.target is not None
        return self.target

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, then wait; the server must exit by itself with status 0."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"lossd did not exit within {timeout} s of SIGTERM; stderr:\n"
                        f"{self.stderr_text()}", pytrace=False)
        self._close_pipe()
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._close_pipe()

    def _close_pipe(self) -> None:
        self._reader.join(5)
        if self.proc.stderr is not None and not self._reader.is_alive():
            self.proc.stderr.close()


def start_server(*extra: str, device: str = "cpu") -> ServerProcess:
    """Start lossd on a free loopback port and wait until it listens."""
    server = ServerProcess([str(lossd_binary()), "--port", "0", "--host", "127.0.0.1",
                            "--device", device, *extra])
    server.wait_ready()
    return server


@pytest.fixture(scope="session")
def lossd_server() -> Iterator[ServerProcess]:
    """One CPU-only lossd server for the whole session; checked to exit cleanly."""
    server = start_server()
    try:
        yield server
    finally:
        alive = server.proc.poll() is None
        rc = server.stop()
    assert alive, f"lossd died during the tests (exit code {rc}); stderr:\n{server.stderr_text()}"
    assert rc == 0, f"lossd exited with status {rc} on SIGTERM; stderr:\n{server.stderr_text()}"


@pytest.fixture(scope="session")
def lossd_target(lossd_server: ServerProcess) -> str:
    """Address "127.0.0.1:PORT" of the session server."""
    assert lossd_server.target is not None
    return lossd_server.target


@pytest.fixture(scope="session")
def client(lossd_target: str) -> Iterator[lossd.Client]:
    """A client of the session server."""
    with lossd.Client(lossd_target, timeout=60) as c:
        yield c


@pytest.fixture()
def server_factory() -> Iterator:
    """Starts extra servers (with other flags) for one test and stops them after it."""
    started: List[ServerProcess] = []

    def factory(*extra: str, device: str = "cpu") -> ServerProcess:
        s = start_server(*extra, device=device)
        started.append(s)
        return s

    yield factory
    for s in started:
        rc = s.stop()
        assert rc == 0, f"lossd exited with status {rc}; stderr:\n{s.stderr_text()}"


@pytest.fixture()
def replicas() -> Iterator:
    """``replicas(n, *flags, device="cpu")`` starts n lossd processes on their own loopback
    ports and returns a ``replicas.ReplicaSet``: ``.targets`` ("127.0.0.1:PORT" each),
    ``.kill(i)`` (SIGKILL), ``.terminate(i)`` (SIGTERM, exit status 0 required),
    ``.restart(i)`` (same port, returns once listening), ``[i]`` (the ServerProcess). Every
    process is stopped after the test; a replica that died unasked fails the test."""
    from replicas import ReplicaSet

    sets: List[ReplicaSet] = []

    def factory(n: int, *flags: str, device: str = "cpu") -> ReplicaSet:
        rs = ReplicaSet(n, flags, binary=lossd_binary(), process=ServerProcess, device=device)
        sets.append(rs)
        return rs

    try:
        yield factory
    finally:
        errors: List[BaseException] = []
        for rs in sets:
            try:
                rs.close()
            except BaseException as exc:  # pytest.fail raises an OutcomeException
                errors.append(exc)
        if errors:
            raise errors[0]


def pytest_report_header(config) -> str:
    return f"lossd binary: {os.environ.get('LOSSD_BINARY', str(DEFAULT_BINARY))}"
