"""lossd-cli as a Unix tool (a closed stdout ends it quietly, --version, help for every
option) and the lazy parts of ``import lossd``. No lossd binary needed: ``capabilities`` talks
to an in-process fake server."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent import futures

import grpc
import pytest

import lossd
from lossd._cli import build_parser
from lossd._proto.lossd.v1 import lossd_pb2 as pb
from lossd._proto.lossd.v1 import lossd_pb2_grpc as pb_grpc


class _Caps(pb_grpc.LossServiceServicer):
    def GetCapabilities(self, request, context):
        return pb.Capabilities(server_version="test", losses=["bce_with_logits"] * 500,
                               partial_state_versions=[1])


@pytest.fixture(scope="module")
def target():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_LossServiceServicer_to_server(_Caps(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


def _run_with_closed_stdout(*args: str) -> subprocess.CompletedProcess:
    """Runs ``python -m lossd ARGS`` with a stdout pipe whose reader is already gone (as
    ``| head -2`` is once it has its lines)."""
    r, w = os.pipe()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "lossd", *args], stdout=w,
                                stderr=subprocess.PIPE, text=True)
    finally:
        os.close(w)
        os.close(r)
    _, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", err)


@pytest.mark.parametrize("args", [("capabilities",), ("eval", "--help"), ("--version",)])
def test_closed_stdout_ends_quietly(target, args) -> None:
    res = _run_with_closed_stdout(*args, *(("--target", target) if args[0] == "capabilities"
                                           else ()))
    assert "Traceback" not in res.stderr and "BrokenPipeError" not in res.stderr, res.stderr
    # argparse itself ignores a failed write of --help and --version (then exits 0).
    assert res.returncode == (141 if args[0] == "capabilities" else 0), res.stderr


def test_capabilities_through_a_pipe(target) -> None:
    out = subprocess.run([sys.executable, "-m", "lossd", "capabilities", "--target", target],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert '"partial_state_versions": [\n    1\n  ]' in out.stdout


def test_version() -> None:
    out = subprocess.run([sys.executable, "-m", "lossd", "--version"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0
    assert out.stdout.strip() == f"lossd-cli {lossd.__version__}"


def test_every_option_has_help() -> None:
    parser = build_parser()
    subparsers = [a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0]))]
    parsers = [parser] + [p for s in subparsers for p in s.choices.values()]
    missing = [f"{p.prog} {'/'.join(a.option_strings)}" for p in parsers for a in p._actions
               if a.option_strings and not a.help]
    assert missing == []


def test_import_loads_the_asyncio_client_lazily() -> None:
    code = ("import sys, lossd; assert 'lossd._aio' not in sys.modules; "
            "assert 'lossd._dataset' not in sys.modules; "
            "c = lossd.AsyncClient; assert 'lossd._aio' in sys.modules; "
            "assert c.__name__ == 'AsyncClient' and 'AsyncClient' in dir(lossd)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
