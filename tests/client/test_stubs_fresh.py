"""The committed protobuf/gRPC stubs must equal a fresh generation from the proto."""

from __future__ import annotations

import importlib.util
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "client" / "python" / "generate_stubs.py"
COMMITTED = REPO / "client" / "python" / "src" / "lossd" / "_proto"


def _load_generator():
    spec = importlib.util.spec_from_file_location("lossd_generate_stubs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_match_fresh_generation(tmp_path: Path) -> None:
    generator = _load_generator()
    written = generator.generate(tmp_path)
    assert written, "generate_stubs.py wrote nothing"
    stale = []
    for rel in written:
        fresh = (tmp_path / rel).read_bytes()
        committed_path = COMMITTED / rel
        if not committed_path.exists():
            stale.append(f"{rel}: missing from {COMMITTED}")
        elif committed_path.read_bytes() != fresh:
            stale.append(f"{rel}: differs")
    extra = sorted(
        str(p.relative_to(COMMITTED)) for p in COMMITTED.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.relative_to(COMMITTED) not in written)
    assert not stale and not extra, (
        "committed stubs are stale; run `python client/python/generate_stubs.py` with the "
        f"grpcio-tools from tests/requirements.txt. Problems: {stale}, unexpected files: {extra}")


def test_generator_uses_pinned_grpcio_tools() -> None:
    """The stubs are only reproducible with the grpcio-tools version pinned for them."""
    from importlib.metadata import version

    pins = {}
    for line in (REPO / "tests" / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, ver = line.split("==", 1)
            pins[name.strip().lower()] = ver.strip()
    assert "grpcio-tools" in pins, "tests/requirements.txt must pin grpcio-tools"
    assert version("grpcio-tools") == pins["grpcio-tools"]


def test_stubs_import_under_private_package() -> None:
    from lossd._proto.lossd.v1 import lossd_pb2, lossd_pb2_grpc

    assert lossd_pb2.EvaluateRequest.__module__ == "lossd._proto.lossd.v1.lossd_pb2"
    assert lossd_pb2.DESCRIPTOR.name == "lossd/v1/lossd.proto"
    assert lossd_pb2.DESCRIPTOR.package == "lossd.v1"
    assert hasattr(lossd_pb2_grpc, "LossServiceStub")
