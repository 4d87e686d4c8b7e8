"""precision = PRECISION_CORRECTLY_ROUNDED through a real server (docs/kernels.md section 8).

Requests are built with the generated message classes and sent over gRPC to the lossd server
the tests share (CPU). Every float32 output must equal the exact value of the torch formulas computed with
Python's decimal module at 200 significant digits (its exp and ln are correctly rounded; no
dependency beyond the standard library), rounded to float32 by the test's own integer
arithmetic (ties to even, subnormals, overflow); an exact zero is +0.
"""

from __future__ import annotations

import decimal
import math
import struct
from decimal import Decimal
from fractions import Fraction
from typing import List, Sequence, Tuple

import grpc
import numpy as np
import pytest

from lossd._proto.lossd.v1 import lossd_pb2 as pb
from lossd._proto.lossd.v1 import lossd_pb2_grpc as pb_grpc

CTX = decimal.Context(prec=200, Emin=decimal.MIN_EMIN, Emax=decimal.MAX_EMAX)
F32_MAX = float(np.finfo(np.float32).max)


def round_f32(v: Fraction) -> float:
    """The float32 nearest to v (ties to even), as a Python float."""
    if v == 0:
        return 0.0
    neg = v < 0
    a = -v if neg else v
    e = a.numerator.bit_length() - a.denominator.bit_length()
    while Fraction(2) ** e > a:
        e -= 1
    while Fraction(2) ** (e + 1) <= a:
        e += 1
    qexp = max(e - 23, -149)  # ulp exponent: 24 bits, smallest subnormal 2^-149
    scaled = a / (Fraction(2) ** qexp)
    n = scaled.numerator // scaled.denominator
    rem = scaled - n
    if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and n % 2 == 1):
        n += 1
    r = float(n) * 2.0 ** qexp
    if r > F32_MAX:
        r = math.inf
    return -r if neg else r


def reference(x: float, y: float, w: float, p: float, s: float, k: int, div: int) -> Fraction:
    """Output k (0 loss, 1 dl/dx, 2 dl/dy) of one element over div, to 200 digits."""
    with decimal.localcontext(CTX):
        X, Y, W, P, S = (Decimal(v) for v in (x, y, w, p, s))
        ys = Y * (1 - S) + S / 2

        def sp(z):
            return (z if z > 0 else 0) + (1 + (-abs(z)).exp()).ln()

        def sig(z):
            e = (-abs(z)).exp()
            return 1 / (1 + e) if z >= 0 else e / (1 + e)

        if k == 0:
            v = W * ((1 - ys) * sp(X) + P * ys * sp(-X))
        elif k == 1:
            v = W * ((1 - ys) * sig(X) - P * ys * sig(-X))
        else:
            v = (1 - S) * W * (P * sp(-X) - sp(X))
        return Fraction(v) / div


def f32(values: Sequence[float]) -> List[float]:
    return [float(v) for v in np.asarray(values, dtype=np.float32)]


def tensor(values: Sequence[float], shape: Sequence[int]) -> pb.Tensor:
    return pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=list(shape),
                     data=np.asarray(values, dtype=np.float32).tobytes())


def floats(t: pb.Tensor) -> List[float]:
    return [float(v) for v in np.frombuffer(t.data, dtype=np.float32)]


def same_bits(a: float, b: float) -> bool:
    return struct.pack("<f", a) == struct.pack("<f", b)


def cases() -> Tuple[List[float], List[float], List[float], List[float]]:
    rng = np.random.default_rng(20)
    xs = [0.0, 1e-30, -1e-30, 1e-7, -3.5, 17.0, -17.0, 88.9, -103.5, 150.0, -600.0, 1e4,
          -1e6, 1e6]
    xs += list(rng.uniform(-30, 30, 40)) + list(rng.uniform(-120, 120, 20))
    n = len(xs)
    ys = list(rng.choice([0.0, 1.0, 0.5, 0.25, 0.9], n))
    ys = [y if i % 3 else float(rng.uniform(0, 1)) for i, y in enumerate(ys)]
    ws = list(rng.uniform(0, 1e3, n))
    ps = list(rng.uniform(0, 5, n))
    return f32(xs), f32(ys), f32(ws), f32(ps)


@pytest.fixture(scope="module")
def stub(lossd_target: str):
    with grpc.insecure_channel(lossd_target) as ch:
        yield pb_grpc.LossServiceStub(ch)


def request(xs, ys, ws, ps, reduction, smoothing=0.0, device=pb.DEVICE_AUTO, precision=1):
    n = len(xs)
    req = pb.EvaluateRequest(request_id="cr", logits=tensor(xs, [n]), targets=tensor(ys, [n]),
                             weight=tensor(ws, [n]), reduction=reduction, device=device,
                             precision=precision)
    req.bce_with_logits.pos_weight.CopyFrom(tensor(ps, [n]))
    req.bce_with_logits.label_smoothing = smoothing
    req.gradients.logits = True
    req.gradients.targets = True
    return req


@pytest.mark.parametrize("reduction,smoothing", [(pb.REDUCTION_NONE, 0.0),
                                                 (pb.REDUCTION_MEAN, 0.0),
                                                 (pb.REDUCTION_NONE, 0.2)])
def test_every_output_is_the_exact_value_rounded(stub, reduction, smoothing):
    xs, ys, ws, ps = cases()
    n = len(xs)
    reply = stub.Evaluate(request(xs, ys, ws, ps, reduction, smoothing), timeout=60)
    assert reply.device == pb.DEVICE_CPU
    gdiv = n if reduction == pb.REDUCTION_MEAN else 1
    got = {1: floats(reply.grad_logits), 2: floats(reply.grad_targets)}
    bad = []
    for k in (1, 2):
        for i in range(n):
            want = round_f32(reference(xs[i], ys[i], ws[i], ps[i], smoothing, k, gdiv))
            if not same_bits(got[k][i], want):
                bad.append((k, i, xs[i], ys[i], got[k][i], want))
    loss = floats(reply.loss)
    if reduction == pb.REDUCTION_NONE:
        for i in range(n):
            want = round_f32(reference(xs[i], ys[i], ws[i], ps[i], smoothing, 0, 1))
            if not same_bits(loss[i], want):
                bad.append((0, i, xs[i], ys[i], loss[i], want))
    else:
        total = sum(reference(xs[i], ys[i], ws[i], ps[i], smoothing, 0, 1) for i in range(n))
        want = round_f32(total / n)
        if not same_bits(loss[0], want):
            bad.append((0, 0, None, None, loss[0], want))
    assert not bad, bad[:10]


def test_unknown_precision_is_invalid_argument(stub):
    xs, ys, ws, ps = cases()
    with pytest.raises(grpc.RpcError) as err:
        stub.Evaluate(request(xs, ys, ws, ps, pb.REDUCTION_NONE, precision=7), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "precision 7" in err.value.details()


def test_focal_loss_is_refused(stub):
    req = pb.EvaluateRequest(logits=tensor([0.5], [1]), targets=tensor([1.0], [1]),
                             precision=pb.PRECISION_CORRECTLY_ROUNDED)
    req.sigmoid_focal_loss.SetInParent()
    with pytest.raises(grpc.RpcError) as err:
        stub.Evaluate(req, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "precision" in err.value.details()
