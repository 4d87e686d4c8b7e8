#!/usr/bin/env python3
"""Regenerate the committed gRPC/protobuf stubs of the ``lossd`` Python client.

Runs ``grpc_tools.protoc`` (from the pinned ``grpcio-tools`` in tests/requirements.txt, with
its bundled well-known protos -- never the system ``protoc``) on
``proto/lossd/v1/lossd.proto`` and writes ``lossd_pb2.py``, ``lossd_pb2.pyi`` and
``lossd_pb2_grpc.py`` into ``client/python/src/lossd/_proto/lossd/v1/`` together with the
package ``__init__.py`` files. protoc emits ``from lossd.v1 import lossd_pb2`` in the gRPC
module; that import is rewritten to a relative one so the stubs live privately under
``lossd._proto`` and do not claim the top-level ``lossd.v1`` name, and the module name that
the message classes report (``__module__``, used by pickle) becomes
``lossd._proto.lossd.v1.lossd_pb2``.

The generated files are committed so that ``pip install ./client/python`` needs no
grpcio-tools. tests/client/test_stubs_fresh.py regenerates them into a temporary directory
and fails when the committed copies differ.

Usage::

    python client/python/generate_stubs.py            # rewrite the committed stubs
    python client/python/generate_stubs.py --out DIR  # write the _proto tree under DIR instead
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
PROTO_ROOT = REPO_ROOT / "proto"
PROTO_FILE = "lossd/v1/lossd.proto"
DEFAULT_OUT = HERE / "src" / "lossd" / "_proto"

_INIT_TEXT = '"""Generated protobuf/gRPC stubs (see client/python/generate_stubs.py)."""\n'
_GRPC_IMPORT = re.compile(r"^from lossd\.v1 import (\w+) as (\w+)$", re.MULTILINE)
_MODULE_NAME = re.compile(r"'lossd\.v1\.lossd_pb2'")
_PACKAGE = "lossd._proto.lossd.v1"


def generate(out_dir: Path) -> list[Path]:
    """Generate the stubs into ``out_dir`` (the ``_proto`` package directory).

    Parameters
    ----------
    out_dir : Path
        Directory that becomes the ``lossd._proto`` package. Created if missing.

    Returns
    -------
    list of Path
        The files written, relative to ``out_dir``, sorted.

    Raises
    ------
    RuntimeError
        If protoc fails or its output is not what this script expects.
    """
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError as exc:  # pragma: no cover - environment problem
        raise RuntimeError(
            "grpcio-tools is required: pip install -r tests/requirements.txt") from exc

    bundled = Path(grpc_tools.__file__).resolve().parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{bundled}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            PROTO_FILE,
        ]
        rc = protoc.main(args)
        if rc != 0:
            raise RuntimeError(f"grpc_tools.protoc failed with exit code {rc}: {args}")
        src = Path(tmp) / "lossd" / "v1"
        produced = {p.name: p.read_text(encoding="utf-8") for p in src.iterdir() if p.is_file()}

    expected = {"lossd_pb2.py", "lossd_pb2.pyi", "lossd_pb2_grpc.py"}
    if set(produced) != expected:
        raise RuntimeError(f"protoc produced {sorted(produced)}, expected {sorted(expected)}")

    grpc_text, n = _GRPC_IMPORT.subn(r"from . import \1 as \2", produced["lossd_pb2_grpc.py"])
    if n != 1:
        raise RuntimeError(f"expected one 'from lossd.v1 import' line in the gRPC stub, got {n}")
    produced["lossd_pb2_grpc.py"] = grpc_text

    # The message classes' __module__ (used by pickle and repr) must be the real module path.
    pb2_text, n = _MODULE_NAME.subn(f"'{_PACKAGE}.lossd_pb2'", produced["lossd_pb2.py"])
    if n != 1:
        raise RuntimeError(f"expected one 'lossd.v1.lossd_pb2' module name in the stub, got {n}")
    produced["lossd_pb2.py"] = pb2_text

    files = {
        Path("__init__.py"): _INIT_TEXT,
        Path("lossd") / "__init__.py": _INIT_TEXT,
        Path("lossd") / "v1" / "__init__.py": _INIT_TEXT,
    }
    for name, text in produced.items():
        files[Path("lossd") / "v1" / name] = text

    for rel, text in files.items():
        dest = out_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Write bytes so line endings are identical on every platform.
        dest.write_bytes(text.encode("utf-8"))
    return sorted(files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"the _proto package directory to write (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    written = generate(args.out)
    for rel in written:
        print(os.path.join(str(args.out), str(rel)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
