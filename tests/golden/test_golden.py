"""Conformance: lossd against golden data recorded from torch, torchvision and paddle.

The data (tests/golden/data/*.npz) is produced by tests/golden/generate.py from the real
libraries; this test imports none of them, only numpy and the lossd client's generated stubs.
Each case is sent to a running lossd (started like the e2e tests, from $LOSSD_BINARY or
build/server/lossd; or an already running server at $LOSSD_TARGET) and every output element
is checked:

* flag 0 (most elements): lossd within the library's own tolerance of the library's value.
  The tolerances are torch.testing.assert_close's defaults per dtype, copied from
  ``_DTYPE_PRECISIONS`` in torch/testing/_comparison.py (torch 2.15.0): float16 rtol 1e-3
  atol 1e-5, bfloat16 rtol 1.6e-2 atol 1e-5, float32 rtol 1.3e-6 atol 1e-5, float64 rtol 1e-7
  atol 1e-7; NaN equals NaN and infinities must match exactly. torch's loss tests
  (test/test_nn.py, common_nn.py) compare BCE-with-logits with these defaults; the same
  numbers are used for paddle and torchvision cases.
* flag 1/2 (elements where lossd deliberately differs: the library cancels in its dtype, or
  gives NaN at infinite logits, see docs/golden.md): lossd within its own accuracy bound
  (``<out>_bound``, docs/design.md section 4) of the exact value (``<out>_exact``), and at least as
  close to it as the library's result.

Environment: LOSSD_TARGET (use this server instead of starting one), LOSSD_GOLDEN_DEVICE
(auto, cpu or cuda; default cpu).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import grpc
import numpy as np
import pytest

from lossd._proto.lossd.v1 import lossd_pb2 as pb
from lossd._proto.lossd.v1 import lossd_pb2_grpc as pb_grpc

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DATA = HERE / "data"

# torch.testing.assert_close defaults (see the module docstring): (rtol, atol).
TOLERANCES = {
    "float16": (1e-3, 1e-5),
    "bfloat16": (1.6e-2, 1e-5),
    "float32": (1.3e-6, 1e-5),
    "float64": (1e-7, 1e-7),
}
WIRE = {"float32": (pb.DTYPE_FLOAT32, "<f4"), "float64": (pb.DTYPE_FLOAT64, "<f8"),
        "float16": (pb.DTYPE_FLOAT16, "<f2"), "bfloat16": (pb.DTYPE_BFLOAT16, "<u2")}
REDUCTIONS = {"none": pb.REDUCTION_NONE, "mean": pb.REDUCTION_MEAN, "sum": pb.REDUCTION_SUM,
              "per_sample_mean": pb.REDUCTION_PER_SAMPLE_MEAN}
DEVICES = {"auto": pb.DEVICE_AUTO, "cpu": pb.DEVICE_CPU, "cuda": pb.DEVICE_CUDA}
OUTPUTS = {"loss": "loss", "grad_x": "grad_logits", "grad_y": "grad_targets"}
MAX_REPORTED = 8


# ------------------------------------------------------------------------------------------
# Data


def _files() -> List[Path]:
    return sorted(DATA.glob("*.npz"))


def _cases() -> List[Tuple[str, str]]:
    out = []
    for path in _files():
        with np.load(path, allow_pickle=False) as z:
            out += [(path.name, name) for name in json.loads(str(z["__cases__"]))]
    return out


CASES = _cases()
_LOADED: Dict[str, Dict[str, np.ndarray]] = {}


def _data(file: str) -> Dict[str, np.ndarray]:
    if file not in _LOADED:
        with np.load(DATA / file, allow_pickle=False) as z:
            _LOADED[file] = {k: z[k] for k in z.files}
    return _LOADED[file]


def test_golden_data_present() -> None:
    """The committed data covers every library group (the generator wrote them all)."""
    names = {p.stem for p in _files()}
    assert {"torch_bce", "torch_extreme", "torch_half", "torch_keras", "torchvision_focal",
            "paddle_bce", "paddle_op"} <= names, names
    for path in _files():
        meta = json.loads(str(_data(path.name)["__meta__"]))
        assert meta["versions"]["torch"] and meta["versions"]["paddlepaddle"], meta


# ------------------------------------------------------------------------------------------
# Server


def _e2e_helpers():
    """The e2e fixtures' module (tests/conftest.py or tests/e2e/conftest.py), loaded by path."""
    for path in (REPO / "tests" / "conftest.py", REPO / "tests" / "e2e" / "conftest.py"):
        if path.is_file():
            spec = importlib.util.spec_from_file_location("lossd_golden_e2e_helpers", path)
            module = importlib.util.module_from_spec(spec)
            assert spec.loader is not None
            spec.loader.exec_module(module)
            if hasattr(module, "start_server"):
                return module
    pytest.fail("no start_server() helper in tests/conftest.py or tests/e2e/conftest.py",
                pytrace=False)


@pytest.fixture(scope="module")
def stub() -> Iterator[pb_grpc.LossServiceStub]:
    target = os.environ.get("LOSSD_TARGET")
    server = None
    if not target:
        server = _e2e_helpers().start_server()
        target = server.target
    channel = grpc.insecure_channel(target, options=[
        ("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)])
    try:
        yield pb_grpc.LossServiceStub(channel)
    finally:
        channel.close()
        if server is not None:
            alive = server.proc.poll() is None
            rc = server.stop()
            assert alive and rc == 0, f"lossd exited ({rc}); stderr:\n{server.stderr_text()}"


# ------------------------------------------------------------------------------------------
# Requests


def encode(values: np.ndarray, dtype: str) -> pb.Tensor:
    """A lossd.v1.Tensor of `values` (stored exactly in `dtype`; bfloat16 held as float32)."""
    code, wire = WIRE[dtype]
    a = np.asarray(values)
    if dtype == "bfloat16":
        bits = np.ascontiguousarray(a, "<f4").view("<u4")
        assert not np.any(bits & 0xFFFF), "bfloat16 data must be exact in float32 storage"
        data = (bits >> 16).astype("<u2").tobytes()
    else:
        data = np.ascontiguousarray(a, wire).tobytes()
    return pb.Tensor(dtype=code, shape=list(a.shape), data=data)


def decode(t: pb.Tensor) -> np.ndarray:
    """A response tensor as float64 (every supported dtype widens exactly)."""
    shape = tuple(t.shape)
    if t.dtype == pb.DTYPE_BFLOAT16:
        bits = np.frombuffer(t.data, "<u2").astype("<u4") << 16
        return bits.view("<f4").astype(np.float64).reshape(shape)
    wire = {pb.DTYPE_FLOAT32: "<f4", pb.DTYPE_FLOAT64: "<f8", pb.DTYPE_FLOAT16: "<f2"}[t.dtype]
    return np.frombuffer(t.data, wire).astype(np.float64).reshape(shape)


def build_request(case: str, d: Dict[str, np.ndarray], opts: dict) -> pb.EvaluateRequest:
    dtype = opts["dtype"]
    req = pb.EvaluateRequest(
        request_id=f"golden-{case}",
        logits=encode(d[f"{case}/x"], dtype),
        targets=encode(d[f"{case}/y"], dtype),
        reduction=REDUCTIONS[opts["reduction"]],
        gradients=pb.GradientRequest(logits=opts["grad_logits"], targets=opts["grad_targets"]),
        device=DEVICES[os.environ.get("LOSSD_GOLDEN_DEVICE", "cpu")],
    )
    if opts["weight"]:
        req.weight.CopyFrom(encode(d[f"{case}/w"], dtype))
    if opts["loss"] == "sigmoid_focal_loss":
        req.sigmoid_focal_loss.alpha = opts["alpha"]
        req.sigmoid_focal_loss.gamma = opts["gamma"]
    else:
        bce = req.bce_with_logits
        bce.SetInParent()
        if opts["pos_weight"]:
            bce.pos_weight.CopyFrom(encode(d[f"{case}/p"], dtype))
        if opts["ignore_index"] is not None:
            bce.ignore_index = int(opts["ignore_index"])
        bce.normalize = bool(opts["normalize"])
        bce.label_smoothing = float(opts["label_smoothing"])
    return req


# ------------------------------------------------------------------------------------------
# Checks


def _close(got: np.ndarray, want: np.ndarray, rtol: float, atol: float) -> np.ndarray:
    """assert_close's element test: |got - want| <= atol + rtol*|want|, NaN == NaN, inf exact."""
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(want) & np.isfinite(got)
        ok = np.abs(got - want) <= atol + rtol * np.abs(want)
    same = (got == want) | (np.isnan(got) & np.isnan(want))
    return np.where(finite, ok, same)


def _err(got: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """|got - exact|; 0 where both are the same infinity; inf where got is NaN or off."""
    with np.errstate(invalid="ignore"):
        e = np.abs(got - exact)
    e = np.where(got == exact, 0.0, e)
    return np.where(np.isnan(e), np.inf, e)


def _first(mask: np.ndarray) -> List[tuple]:
    """Indices (tuples, also for 0-d arrays) of the first few True elements."""
    return [i for i in np.ndindex(mask.shape) if mask[i]][:MAX_REPORTED]


def _describe(case: str, d: Dict[str, np.ndarray], out: str, idx, got, want, extra="") -> str:
    x, y = d[f"{case}/x"], d[f"{case}/y"]
    where = ""
    if out != "loss" or x.shape == got.shape:
        where = f" x={x[idx]!r} y={y[idx]!r}"
    return f"{out}{list(idx)}:{where} lossd={got[idx]!r} expected={want[idx]!r}{extra}"


def check_output(case: str, d: Dict[str, np.ndarray], opts: dict, out: str,
                 got: np.ndarray) -> Tuple[List[str], int, int]:
    lib = d[f"{case}/{out}"]
    assert got.shape == lib.shape, f"{case}/{out}: shape {got.shape} != expected {lib.shape}"
    flag = d.get(f"{case}/{out}_flag", np.zeros(lib.shape, np.int8))
    rtol, atol = TOLERANCES[opts["dtype"]]
    problems: List[str] = []
    plain = flag == 0
    bad = plain & ~_close(got, lib, rtol, atol)
    for idx in _first(bad):
        problems.append(_describe(case, d, out, idx, got, lib,
                                  f" (library; rtol {rtol} atol {atol})"))
    flagged = flag != 0
    if flagged.any():
        exact, bound = d[f"{case}/{out}_exact"], d[f"{case}/{out}_bound"]
        err, lib_err = _err(got, exact), _err(lib, exact)
        bad_f = flagged & ~((err <= bound) & (err <= lib_err))
        for idx in _first(bad_f):
            problems.append(_describe(
                case, d, out, idx, got, exact,
                f" (exact, flag {flag[idx]}; |err| {err[idx]:.3g} > bound {bound[idx]:.3g} or "
                f"library's |err| {lib_err[idx]:.3g})"))
        bad = bad | bad_f
    return problems, int(bad.sum()), int(flagged.sum())


@pytest.mark.parametrize("file,case", CASES, ids=[f"{f[:-4]}:{c}" for f, c in CASES])
def test_golden_case(stub: pb_grpc.LossServiceStub, file: str, case: str) -> None:
    d = _data(file)
    opts = json.loads(str(d[f"{case}/options"]))
    reply = stub.Evaluate(build_request(case, d, opts), timeout=60)
    problems: List[str] = []
    for out, field in OUTPUTS.items():
        if f"{case}/{out}" not in d:
            continue
        assert reply.HasField(field), f"{case}: the reply has no {field}"
        got = decode(getattr(reply, field))
        code, _ = WIRE[opts["dtype"]]
        assert getattr(reply, field).dtype == code, f"{case}/{out}: dtype"
        p, nbad, _ = check_output(case, d, opts, out, got)
        if nbad:
            problems.append(f"{out}: {nbad} element(s) off")
            problems += ["  " + s for s in p]
    assert not problems, (f"{file}:{case} ({opts['api']}; options {opts}):\n"
                          + "\n".join(problems))
