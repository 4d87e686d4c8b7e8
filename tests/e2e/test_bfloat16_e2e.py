"""End-to-end: bfloat16 with and without ml_dtypes, against the real server.

With ml_dtypes (a test requirement), ``ml_dtypes.bfloat16`` arrays are accepted as inputs and
bfloat16 outputs come back as ``ml_dtypes.bfloat16`` arrays. Without it (simulated in a child
interpreter whose ``import ml_dtypes`` fails, so the client takes its import-time fallback),
``dtype="bfloat16"`` rounds float32 inputs in the client and outputs come back as float32
holding the bfloat16 values exactly. Both paths must give the same bits, and the values are
checked against the float64 reference (bce_reference) within bfloat16's rounding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import lossd
from lossd import _tensor

from bce_reference import bce_reference

ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes is not installed "
                                                    "(tests/requirements.txt)")
BF16 = np.dtype(ml_dtypes.bfloat16)


def make(seed: int = 3):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((64, 33)) * 3).astype(np.float32)
    y = rng.integers(0, 2, x.shape).astype(np.float32)
    w = rng.uniform(0.5, 2, (33,)).astype(np.float32)
    return x, y, w


def check_against_reference(got, x, y, w, reduction: str) -> None:
    """float64 reference of the bfloat16 inputs; the result is rounded to bfloat16 once
    (plus float32 arithmetic in the server): relative 2^-7."""
    ref = bce_reference(x.astype(BF16), y.astype(BF16), w.astype(BF16), reduction=reduction)
    np.testing.assert_allclose(np.asarray(got.loss, np.float64), ref.loss, rtol=2 ** -7,
                               atol=1e-30)
    np.testing.assert_allclose(np.asarray(got.grad, np.float64), ref.grad, rtol=2 ** -7,
                               atol=2 ** -7 * np.abs(ref.grad).max())


def test_ml_dtypes_is_used_when_installed() -> None:
    assert _tensor.BFLOAT16 == BF16


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_ml_dtypes_bfloat16_in_and_out(client, reduction) -> None:
    x, y, w = make()
    xb, yb, wb = x.astype(BF16), y.astype(BF16), w.astype(BF16)
    r = client.bce_with_logits(xb, yb, weight=wb, reduction=reduction, grad=True)
    assert r.loss.dtype == BF16 and r.grad.dtype == BF16 and r.grad.shape == x.shape
    check_against_reference(r, x, y, w, reduction)
    # float32 inputs sent as bfloat16 (rounded by the client) give the same bits.
    r2 = client.bce_with_logits(x, y, weight=w, reduction=reduction, grad=True,
                                dtype="bfloat16")
    assert r2.loss.dtype == BF16
    assert r2.loss.tobytes() == r.loss.tobytes() and r2.grad.tobytes() == r.grad.tobytes()


CHILD = textwrap.dedent("""
    import json, sys
    sys.modules["ml_dtypes"] = None  # `import ml_dtypes` raises ImportError
    import numpy as np
    import lossd
    from lossd import _tensor
    assert _tensor.BFLOAT16 is None
    d = np.load(sys.argv[2])
    out = {}
    with lossd.Client(sys.argv[1], timeout=60) as c:
        for reduction in ("none", "mean"):
            r = c.bce_with_logits(d["x"], d["y"], weight=d["w"], reduction=reduction,
                                  grad=True, dtype="bfloat16")
            out[reduction] = {"dtype": [str(r.loss.dtype), str(r.grad.dtype)],
                              "loss": np.asarray(r.loss).tobytes().hex(),
                              "grad": r.grad.tobytes().hex()}
        try:
            c.bce_with_logits(d["x"].view(np.uint16)[:, :33], d["y"][:, :33])
            out["u16"] = "accepted"
        except ValueError as exc:
            out["u16"] = str(exc)
    print(json.dumps(out))
""")


def test_without_ml_dtypes_the_builtin_conversion_gives_the_same_bits(client, lossd_target,
                                                                     tmp_path) -> None:
    x, y, w = make(5)
    np.savez(tmp_path / "in.npz", x=x, y=y, w=w)
    env = dict(os.environ)
    env.pop("LOSSD_TARGET", None)
    proc = subprocess.run([sys.executable, "-c", CHILD, lossd_target, str(tmp_path / "in.npz")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert "uint16 is not supported" in got["u16"], got["u16"]
    for reduction in ("none", "mean"):
        child = got[reduction]
        assert child["dtype"] == ["float32", "float32"]  # widened, exactly
        loss = np.frombuffer(bytes.fromhex(child["loss"]), np.float32)
        grad = np.frombuffer(bytes.fromhex(child["grad"]), np.float32).reshape(x.shape)
        # Every value is a bfloat16 (the low 16 bits of the float32 are zero)...
        assert not np.any(loss.view(np.uint32) & 0xFFFF)
        assert not np.any(grad.view(np.uint32) & 0xFFFF)
        # ...and the same bits as the ml_dtypes path in this process.
        here = client.bce_with_logits(x.astype(BF16), y.astype(BF16), weight=w.astype(BF16),
                                      reduction=reduction, grad=True)
        assert loss.astype(BF16).tobytes() == np.asarray(here.loss).reshape(-1).tobytes()
        assert grad.astype(BF16).tobytes() == here.grad.tobytes()
        check_against_reference(type("R", (), {"loss": loss.reshape(here.loss.shape),
                                               "grad": grad})(), x, y, w, reduction)
