"""End-to-end: lossd on a Unix-domain socket beside TCP (--unix_socket).

The same Evaluate over the socket and over TCP gives the same bits; the server records each
connection's uid and pid (SO_PEERCRED); the socket file gets --unix_socket_mode, replaces a
stale socket and is removed when the server exits.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Tuple

import numpy as np
import pytest

import lossd
from conftest import ServerProcess, start_server


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # Short paths: a Unix socket path holds at most 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="lossd-uds-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def uds_server(socket_dir: Path) -> Iterator[Tuple[ServerProcess, str]]:
    path = str(socket_dir / "lossd.sock")
    server = start_server("--unix_socket", path)
    try:
        yield server, path
    finally:
        assert server.stop() == 0, server.stderr_text()


def _inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-12, 12, (37, 129)).astype(np.float32)
    y = rng.uniform(0, 1, (37, 129)).astype(np.float32)
    w = rng.uniform(0, 2, (129,)).astype(np.float32)
    return x, y, w


def test_evaluate_over_the_unix_socket_equals_tcp(uds_server) -> None:
    server, path = uds_server
    x, y, w = _inputs()
    results = []
    for target in (f"unix:{path}", server.target):
        with lossd.Client(target, shared_memory="off") as client:
            results.append(client.bce_with_logits(x, y, weight=w, reduction="none", grad=True,
                                                  grad_targets=True))
            assert client.health() == "SERVING"
    a, b = results
    for name in ("loss", "grad", "grad_targets"):
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes(), name
    with lossd.Client(f"unix:{path}", shared_memory="off") as client:
        mean = client.bce_with_logits(x, y, reduction="mean")
        acc = client.accumulate([(x[:20], y[:20]), (x[20:], y[20:])], reduction="mean")
    assert mean.loss.dtype == np.float32
    assert np.float32(acc.loss) == mean.loss


def test_the_server_records_the_peers_uid_and_pid(socket_dir: Path) -> None:
    path = socket_dir / "peer.sock"
    server = start_server("--unix_socket", str(path))
    try:
        with lossd.Client(f"unix:{path}", shared_memory="off") as client:
            assert client.health() == "SERVING"
    finally:
        assert server.stop() == 0  # all of its stderr has been read once it exited
    line = f"from uid {os.getuid()} pid {os.getpid()}"
    assert line in server.stderr_text(), server.stderr_text()


def test_socket_file_mode_and_removal_at_exit(socket_dir: Path) -> None:
    path = socket_dir / "mode.sock"
    server = start_server("--unix_socket", str(path), "--unix_socket_mode", "0600")
    try:
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert f"lossd unix socket at {path}" in server.stderr_text()
    finally:
        assert server.stop() == 0
    assert not path.exists(), "the socket file must be removed at exit"


def test_a_stale_socket_is_replaced_and_other_files_are_kept(socket_dir: Path) -> None:
    path = socket_dir / "stale.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    server = start_server("--unix_socket", str(path))
    try:
        with lossd.Client(f"unix:{path}", shared_memory="off") as client:
            assert client.health() == "SERVING"
    finally:
        assert server.stop() == 0
    path.write_text("not a socket")
    proc = subprocess.run([server.args[0], "--port", "0", "--host", "127.0.0.1", "--device",
                           "cpu", "--unix_socket", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0
    assert "is not a socket" in proc.stderr, proc.stderr
    assert path.read_text() == "not a socket"


def test_bad_socket_mode_is_refused(socket_dir: Path) -> None:
    proc = subprocess.run([str(Path(os.environ.get("LOSSD_BINARY", "build/server/lossd"))),
                           "--port", "0", "--unix_socket", str(socket_dir / "x.sock"),
                           "--unix_socket_mode", "rw"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert "--unix_socket_mode" in proc.stderr


def test_the_cli_takes_unix_targets(uds_server, tmp_path: Path) -> None:
    _, path = uds_server
    x, y, _ = _inputs(1)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    health = subprocess.run([sys.executable, "-m", "lossd", "health", "--target", f"unix:{path}"],
                            capture_output=True, text=True, timeout=60)
    assert health.returncode == 0, health.stderr
    assert "SERVING" in health.stdout
    with lossd.Client(f"unix:{path}", shared_memory="off") as client:
        expected = client.bce_with_logits(x, y, reduction="sum")
    out = tmp_path / "out.npz"
    run = subprocess.run([sys.executable, "-m", "lossd", "eval", "--target", f"unix:{path}",
                          "--logits", str(tmp_path / "x.npy"), "--targets",
                          str(tmp_path / "y.npy"), "--reduction", "sum", "--out", str(out)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    with np.load(out) as data:
        assert data["loss"].tobytes() == expected.loss.tobytes()
