"""A set of lossd replicas on loopback ports, for scale-out and restart tests.

Used through the ``replicas`` fixture of conftest.py::

    def test_something(replicas):
        rs = replicas(3, "--drain_timeout", "5s")
        with lossd.Client(rs.targets) as client:
            ...
            rs.kill(0)                 # SIGKILL
            rs.terminate(1)            # SIGTERM, then wait for exit status 0
            rs.restart(1)              # again on the same port, listening once it returns

Each replica is a ``ServerProcess`` of conftest.py (stderr collected in ``.lines``). The first
start uses ``--port 0`` and remembers the port the server printed; ``restart`` passes that port
with ``--port`` and retries while the port is still busy (the server refuses to share a port).
The fixture stops every process after the test, whatever happened.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence

import pytest

HOST = "127.0.0.1"  # loopback only
START_TIMEOUT_S = 30.0  # one start: until the "lossd listening" line
RESTART_BIND_RETRY_S = 10.0  # restart: how long a busy port is retried
TERMINATE_TIMEOUT_S = 40.0  # SIGTERM: the drain (--drain_timeout) plus stopping
KILL_TIMEOUT_S = 10.0


class ReplicaSet:
    """``n`` lossd processes started with the same flags on their own loopback ports.

    Parameters
    ----------
    n : int
        Number of replicas.
    flags : sequence of str
        Extra server flags for every replica (not --host/--port/--device).
    binary : Path
        The server binary.
    process : callable
        ``process(args) -> ServerProcess`` (conftest's class); it starts the process.
    device : str
        ``--device`` of every replica.
    """

    def __init__(self, n: int, flags: Sequence[str], *, binary: Path,
                 process: Callable[[List[str]], Any], device: str = "cpu") -> None:
        if n < 1:
            raise ValueError(f"replicas: n must be >= 1, got {n}")
        for f in flags:
            if f.split("=", 1)[0] in ("--host", "--port", "--device"):
                raise ValueError(f"replicas: {f} is chosen by the harness")
        self.flags = list(flags)
        self._binary = binary
        self._process = process
        self._device = device
        self.servers: list = []  # the current ServerProcess of each replica
        self.ports: List[int] = []
        self.history: list = []  # every ServerProcess ever started, for cleanup and logs
        self._expected_dead: set = set()  # replicas the test stopped on purpose
        try:
            for _ in range(n):
                server = self._start(0, START_TIMEOUT_S, retry_busy=False)
                self.servers.append(server)
                self.ports.append(int(server.target.rsplit(":", 1)[1]))
        except BaseException:
            self.close(check=False)
            raise

    # ---- addresses ----

    @property
    def targets(self) -> List[str]:
        """["127.0.0.1:PORT", ...], one per replica, stable across restarts."""
        return [f"{HOST}:{p}" for p in self.ports]

    def target(self, i: int) -> str:
        return f"{HOST}:{self.ports[i]}"

    def __len__(self) -> int:
        return len(self.servers)

    def __getitem__(self, i: int):
        """The current ServerProcess of replica i."""
        return self.servers[i]

    def alive(self, i: int) -> bool:
        return self.servers[i].proc.poll() is None

    def stderr_text(self, i: int) -> str:
        return self.servers[i].stderr_text()

    # ---- lifecycle ----

    def kill(self, i: int) -> int:
        """SIGKILL replica i and wait until it is gone; returns its exit status (-9)."""
        s = self.servers[i]
        self._expected_dead.add(i)
        if s.proc.poll() is None:
            s.proc.send_signal(signal.SIGKILL)
        try:
            rc = s.proc.wait(KILL_TIMEOUT_S)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
            pytest.fail(f"replica {i} (pid {s.proc.pid}) survived SIGKILL for "
                        f"{KILL_TIMEOUT_S} s", pytrace=False)
        s.kill()  # closes the stderr pipe
        return rc

    def terminate(self, i: int, timeout: float = TERMINATE_TIMEOUT_S) -> int:
        """SIGTERM replica i (it drains) and wait up to ``timeout`` s for it to exit, which
        must be with status 0. Returns the status."""
        s = self.servers[i]
        self._expected_dead.add(i)
        rc = s.stop(timeout)  # SIGTERM; fails the test if it does not exit within timeout
        if rc != 0:
            pytest.fail(f"replica {i} ({self.target(i)}) exited with status {rc} on SIGTERM; "
                        f"stderr:\n{s.stderr_text()}", pytrace=False)
        return rc

    def restart(self, i: int, timeout: float = START_TIMEOUT_S + RESTART_BIND_RETRY_S):
        """Start replica i again on its port and wait until it listens. The previous process
        must have exited (kill or terminate it first). A port that is still busy is retried
        for up to RESTART_BIND_RETRY_S s. Returns the new ServerProcess."""
        old = self.servers[i]
        if old.proc.poll() is None:
            raise AssertionError(f"replica {i} (pid {old.proc.pid}) is still running: "
                                 "kill() or terminate() it before restart()")
        server = self._start(self.ports[i], timeout, retry_busy=True)
        self.servers[i] = server
        self._expected_dead.discard(i)
        return server

    def _start(self, port: int, timeout: float, *, retry_busy: bool):
        args = [str(self._binary), "--host", HOST, "--port", str(port),
                "--device", self._device, *self.flags]
        deadline = time.monotonic() + timeout
        bind_deadline = time.monotonic() + RESTART_BIND_RETRY_S
        attempts = 0
        while True:
            attempts += 1
            server = self._process(args)
            self.history.append(server)
            # Wait for the listening line or the process's exit, whichever comes first.
            while server.target is None and server.proc.poll() is None:
                if time.monotonic() > deadline:
                    server.kill()
                    pytest.fail(f"lossd did not listen on port {port} within {timeout} s "
                                f"({attempts} attempts); command: {' '.join(args)}\n"
                                f"stderr:\n{server.stderr_text()}", pytrace=False)
                time.sleep(0.02)
            if server.target is not None:
                if port and server.target != f"{HOST}:{port}":
                    server.kill()
                    pytest.fail(f"lossd listens on {server.target}, not port {port}",
                                pytrace=False)
                return server
            server.kill()  # exited: closes the pipe, keeps the lines
            busy = "cannot listen on" in server.stderr_text()
            if not (retry_busy and busy and time.monotonic() < bind_deadline):
                pytest.fail(f"lossd exited with status {server.proc.returncode} before "
                            f"listening ({attempts} attempts); command: {' '.join(args)}\n"
                            f"stderr:\n{server.stderr_text()}", pytrace=False)
            time.sleep(0.2)

    def close(self, check: bool = True, timeout: float = TERMINATE_TIMEOUT_S) -> None:
        """Stops every process still running: SIGTERM to all at once, then SIGKILL to those
        still there after ``timeout`` s. With ``check``, fails if a replica that the test did
        not stop had died, or if one did not exit with status 0 on SIGTERM."""
        problems: List[str] = []
        running = [s for s in self.history if s.proc.poll() is None]
        current = {id(s): i for i, s in enumerate(self.servers)}
        for i, s in enumerate(self.servers):
            if s.proc.poll() is not None and i not in self._expected_dead:
                problems.append(f"replica {i} ({self.target(i)}) died during the test with "
                                f"status {s.proc.returncode}; stderr:\n{s.stderr_text()}")
        for s in running:
            s.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for s in running:
            try:
                rc: Optional[int] = s.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                rc = None
            s.kill()
            if rc != 0 and id(s) in current:
                i = current[id(s)]
                what = "did not exit" if rc is None else f"exited with status {rc}"
                problems.append(f"replica {i} ({self.target(i)}) {what} on SIGTERM at the "
                                f"end of the test; stderr:\n{s.stderr_text()}")
        for s in self.history:
            s.kill()  # every pipe closed
        if check and problems:
            pytest.fail("\n\n".join(problems), pytrace=False)
