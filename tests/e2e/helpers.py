"""Shared helpers of the end-to-end tests (dtypes, inputs, checks against the reference, the
server's addresses and metrics, datasets, the Open Inference Protocol cases, certificates)."""

from __future__ import annotations

import re
import subprocess
import time
import urllib.request
import zlib
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import grpc
import numpy as np
import pytest

import lossd
from lossd._proto.lossd.v1 import lossd_pb2 as pb
from lossd._proto.lossd.v1 import lossd_pb2_grpc as pb_grpc

from bce_reference import loss_reference, violations

try:
    import ml_dtypes

    BF16: Optional[np.dtype] = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes is pinned in tests/requirements.txt
    BF16 = None

DTYPES = [np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16)]
if BF16 is not None:
    DTYPES.append(BF16)
DTYPE_IDS = [str(d) for d in DTYPES]
REDUCTIONS = ["none", "mean", "sum", "per_sample_mean"]


def seed_of(*parts) -> int:
    """A random seed named by ``parts`` (a test's parameters)."""
    return zlib.crc32("/".join(map(str, parts)).encode())


def kind_of(dtype: np.dtype) -> str:
    if dtype == np.float32:
        return "float32"
    if dtype == np.float64:
        return "float64"
    return "half"


def cast(values, dtype: np.dtype) -> np.ndarray:
    if BF16 is not None and dtype == BF16:
        return np.asarray(values, np.float64).astype(np.float32).astype(dtype)
    return np.asarray(values, np.float64).astype(dtype)


def f64(v) -> Optional[np.ndarray]:
    if v is None:
        return None
    a = np.asarray(v)
    if a.dtype.kind not in "fbiu":  # bfloat16
        a = a.astype(np.float32)
    return a.astype(np.float64)


def make_inputs(rng, shape, dtype, soft=False):
    half = kind_of(dtype) == "half"
    x = cast(rng.uniform(-6 if half else -12, 6 if half else 12, shape), dtype)
    y = rng.uniform(0, 1, shape) if soft else rng.integers(0, 2, shape)
    return x, cast(y, dtype)


def with_nan_target(shape, at) -> Tuple[np.ndarray, np.ndarray]:
    """float32 logits 0 and targets 1 of ``shape``, but for a NaN target at index ``at``."""
    y = np.ones(shape, np.float32)
    y[at] = np.nan
    return np.zeros(shape, np.float32), y


def loss_shape(shape, reduction):
    if reduction == "none":
        return tuple(shape)
    if reduction == "per_sample_mean":
        return tuple(shape[:-1])
    return ()


def check_result(r, x, y, w=None, p=None, reduction="none", *, grad=True, grad_targets=True,
                 **options):
    """Compares a LossResult with loss_reference (inputs as the client sent them)."""
    ref = loss_reference(f64(x), f64(y), f64(w), f64(p), reduction, **options)
    dtype = np.asarray(x).dtype
    kind = kind_of(dtype)
    assert r.loss.dtype == dtype, (r.loss.dtype, dtype)
    assert r.loss.shape == loss_shape(np.shape(x), reduction)
    reduced = reduction in ("mean", "sum")
    msg = violations(r.loss, ref.loss, ref.loss_scale, kind, reduced=reduced)
    assert msg is None, f"loss ({reduction}, {options}): {msg}"
    if grad:
        assert r.grad is not None and r.grad.shape == np.shape(x) and r.grad.dtype == dtype
        msg = violations(r.grad, ref.grad, ref.grad_scale, kind)
        assert msg is None, f"dl/dx ({reduction}, {options}): {msg}"
    else:
        assert r.grad is None
    if grad_targets:
        assert r.grad_targets is not None and r.grad_targets.shape == np.shape(x)
        msg = violations(r.grad_targets, ref.grad_targets, ref.grad_targets_scale, kind)
        assert msg is None, f"dl/dy ({reduction}, {options}): {msg}"
    return ref


# ---- Prometheus metrics of a running server ----

_METRICS = re.compile(r"lossd metrics on (\S+):(\d+)\s*$")
_HTTP = re.compile(r"lossd http on (\S+):(\d+)\s*$")


def _logged_address(server, pattern: re.Pattern, what: str) -> str:
    """HOST:PORT from the server's "<what> HOST:PORT" log line."""
    for line in server.lines:
        m = pattern.search(line)
        if m:
            return f"{m.group(1)}:{m.group(2)}"
    raise AssertionError(f"no '{what}' line in:\n{server.stderr_text()}")


def metrics_address(server) -> str:
    return _logged_address(server, _METRICS, "lossd metrics on")


def http_address(server) -> str:
    """The address of the server's HTTP/REST API (--http_port)."""
    return _logged_address(server, _HTTP, "lossd http on")


def scrape(address: str) -> dict:
    """{(sample name, frozenset(labels)): value} of every sample."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        assert reply.status == 200
        text = reply.read().decode("utf-8")
    prometheus_parser = pytest.importorskip(
        "prometheus_client.parser", reason="prometheus_client is pinned in tests/requirements.txt")
    samples = {}
    for family in prometheus_parser.text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def settled_counts(address: str) -> dict:
    """The samples of scrape(address), once no call is in flight (or after 5 s)."""
    deadline = time.monotonic() + 5
    while True:
        s = scrape(address)
        if value(s, "lossd_in_flight_calls") == 0 or time.monotonic() > deadline:
            return s
        time.sleep(0.05)


# ---- known traffic ----

def float32_tensor(a: np.ndarray) -> pb.Tensor:
    return pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=a.shape, data=a.astype("<f4").tobytes())


def bad_evaluates_capabilities_accumulate(client: lossd.Client, x: np.ndarray,
                                          y: np.ndarray) -> None:
    """Two Evaluate calls that fail with INVALID_ARGUMENT (targets of another shape), one
    GetCapabilities and one Accumulate of two batches (x[:600] and x[600:], SUM)."""
    for _ in range(2):
        with pytest.raises(lossd.InvalidArgumentError):
            client.bce_with_logits(x, y[:10])
    client.capabilities()
    acc = client.accumulate([(x[:600], y[:600]), (x[600:], y[600:])], reduction="sum")
    assert acc.num_batches == 2


def evaluate_stream_of_three(target: str, x: np.ndarray, y: np.ndarray) -> None:
    """One EvaluateStream of three identical float32 SUM requests of (x, y)."""
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.LossServiceStub(channel)
        batch = pb.EvaluateRequest(logits=float32_tensor(x), targets=float32_tensor(y),
                                   bce_with_logits=pb.BceWithLogits(),
                                   reduction=pb.REDUCTION_SUM)
        replies = list(stub.EvaluateStream(iter([batch] * 3), timeout=30))
        assert len(replies) == 3 and all(r.HasField("response") for r in replies)


# ---- datasets of batches of random sizes ----

Dataset = Tuple[np.ndarray, np.ndarray, List[int]]


def random_dataset(seed: int, elements: int, max_batch: int) -> Dataset:
    """float32 logits and targets (hard labels in the first half, soft ones in the second)
    and the batch boundaries ``cuts`` (batch sizes uniform in [1, max_batch])."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(elements, dtype=np.float32) * np.float32(4.0)
    y = rng.random(elements, dtype=np.float32)
    y[: elements // 2] = np.round(y[: elements // 2])  # hard and soft labels
    cuts = [0]
    while cuts[-1] < elements:
        cuts.append(min(elements, cuts[-1] + int(rng.integers(1, max_batch + 1))))
    return x, y, cuts


def dataset_batches(data: Dataset, on_batch=None) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """The (logits, targets) batches of a random_dataset; ``on_batch(k)`` before batch k."""
    x, y, cuts = data
    for k in range(len(cuts) - 1):
        if on_batch is not None:
            on_batch(k)
        yield x[cuts[k]:cuts[k + 1]], y[cuts[k]:cuts[k + 1]]


# ---- KServe v2 / Open Inference Protocol (test_oip_*_e2e.py) ----

IGNORE = -100
OIP_BCE_CASES: Dict[str, Dict[str, Any]] = {
    "plain": {},
    "weights": {"weight": True, "pos_weight": True},
    "ignore_normalize": {"ignore_index": IGNORE, "normalize": True},
    "smooth": {"label_smoothing": 0.1, "weight": True},
}


def oip_bce_case(case: str, dtype: np.dtype, seed: int):
    """The inputs of OIP_BCE_CASES[case]: (x, y, weight or None, pos_weight or None, the
    other options)."""
    options = dict(OIP_BCE_CASES[case])
    rng = np.random.default_rng(seed)
    x, y = make_inputs(rng, (5, 7), dtype, soft="label_smoothing" in options)
    if "ignore_index" in options:
        y = y.copy()
        y[rng.uniform(size=y.shape) < 0.3] = cast(IGNORE, dtype)
    w = cast(rng.uniform(0, 3, (7,)), dtype) if options.pop("weight", False) else None
    p = cast(rng.uniform(0, 3, (5, 1)), dtype) if options.pop("pos_weight", False) else None
    return x, y, w, p, options


def oip_datatype(dtype: np.dtype) -> str:
    if BF16 is not None and dtype == BF16:
        return "BF16"
    return {np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64",
            np.dtype(np.float16): "FP16"}[np.dtype(dtype)]


def oip_bad_requests(make_input, make_output, not_found: str, invalid: str):
    """The bad requests that both OIP front ends refuse with the same message.

    ``make_input(name, array)`` and ``make_output(name)`` build the protocol client's inputs
    and requested outputs, ``not_found`` and ``invalid`` are its statuses of NOT_FOUND and
    INVALID_ARGUMENT. Returns (x, y, ok, cases): float32 logits 0 and targets 1 of shape
    [2, 3], ``ok`` their LOGITS and TARGETS inputs, and the cases as (model, inputs, infer()
    keyword arguments, status, message)."""
    x = np.zeros((2, 3), np.float32)
    y = np.ones((2, 3), np.float32)
    ok = [make_input("LOGITS", x), make_input("TARGETS", y)]
    return x, y, ok, [
        ("cross_entropy", ok, {}, not_found, "unknown model 'cross_entropy'"),
        ("bce_with_logits", ok, {"model_version": "3"}, not_found,
         "model 'bce_with_logits' has no version '3'"),
        ("bce_with_logits", ok[:1], {}, invalid, "missing input 'TARGETS'"),
        ("bce_with_logits", [ok[0], make_input("TARGETS", np.ones((3, 2), np.float32))], {},
         invalid, "targets shape [3,2] != logits shape [2,3]"),
        ("bce_with_logits", ok, {"parameters": {"reduction": "avg"}}, invalid,
         "parameter 'reduction' 'avg' is not one of none, mean, sum, per_sample_mean"),
        ("bce_with_logits", ok, {"parameters": {"normalize": "yes"}}, invalid,
         "parameter 'normalize' must be a bool; got string 'yes'"),
        ("sigmoid_focal_loss", ok, {"parameters": {"gamma": -1.0}}, invalid,
         "sigmoid_focal_loss.gamma -1 is outside [0, 10000]"),
        ("sigmoid_focal_loss", ok, {"outputs": [make_output("GRAD_TARGETS")]}, invalid,
         "unknown output 'GRAD_TARGETS' for model 'sigmoid_focal_loss'; its outputs are LOSS, "
         "GRAD_LOGITS"),
        ("bce_with_logits", [make_input("LOGITS", np.array([np.nan, 1], np.float32)),
                             make_input("TARGETS", np.ones(2, np.float32))],
         {"parameters": {"reject_nan": True}}, invalid, "logits contains NaN"),
    ]


def assert_counted_once(server, *calls: Tuple[str, str, str]) -> None:
    """Each (method, code, device) of ``calls`` is counted once by lossd_requests_total."""
    samples = scrape(metrics_address(server))
    for method, code, device in calls:
        assert value(samples, "lossd_requests_total", method=method, code=code,
                     device=device) == 1, (method, code, device)


def assert_models_ready(triton) -> None:
    """A tritonclient (gRPC or HTTP) sees the server and both models ready, and no others."""
    assert triton.is_server_live()
    assert triton.is_server_ready()
    assert triton.is_model_ready("bce_with_logits")
    assert triton.is_model_ready("sigmoid_focal_loss", model_version="1")
    assert not triton.is_model_ready("sigmoid_focal_loss", model_version="2")
    assert not triton.is_model_ready("cross_entropy")


# ---- TLS ----

def make_certificates(d: Path, ca_name: str) -> Path:
    """In ``d``: a throwaway CA (CN ``ca_name``), a server certificate for
    localhost/127.0.0.1 and a client certificate (ca.crt, server.crt/key, client.crt/key)."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", *ec, "-days", "2", "-subj", f"/CN={ca_name}", "-keyout", "ca.key",
        "-out", "ca.crt")
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name, cn, ext in (("server", "localhost", True), ("client", "client", False)):
        run("req", *ec, "-subj", f"/CN={cn}", "-keyout", f"{name}.key", "-out", f"{name}.csr")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-out", f"{name}.crt",
            *(["-extfile", "san.ext"] if ext else []))
    return d
