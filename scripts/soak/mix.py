"""The requests of the soak: each kind serialized once, the fixed mix order, and the check of
good replies (shapes, a finite loss, the same bits as the first reply of that kind)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .common import LARGE_SHAPE, SMALL_SHAPE, pb


@dataclass(frozen=True)
class Kind:
    """One request of the mix, serialized once."""

    name: str
    good: bool
    description: str
    payload: bytes
    shape: tuple[int, ...]
    weight: float  # probability in the mix

    @property
    def expected(self) -> str:
        return "OK" if self.good else "INVALID_ARGUMENT"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _tensor(shape: tuple[int, ...], data: bytes) -> pb.Tensor:
    return pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=list(shape), data=data)


def _request(name: str, logits: pb.Tensor, targets: pb.Tensor,
             weight: pb.Tensor | None = None) -> bytes:
    request = pb.EvaluateRequest(
        request_id=f"soak:{name}", logits=logits, targets=targets,
        bce_with_logits=pb.BceWithLogits(), reduction=pb.REDUCTION_MEAN,
        gradients=pb.GradientRequest(logits=True))
    if weight is not None:
        request.weight.CopyFrom(weight)
    return request.SerializeToString()


def build_kinds(rng: np.random.Generator, bad_fraction: float,
                large_fraction: float) -> list[Kind]:
    """The mix: good 1k and 1M requests, and bad ones that must get INVALID_ARGUMENT."""

    def data(shape: tuple[int, ...], targets: bool = False) -> bytes:
        n = math.prod(shape)
        if targets:
            return (rng.random(n) < 0.5).astype(np.float32).tobytes()
        return rng.standard_normal(n, dtype=np.float32).tobytes()

    s, l = SMALL_SHAPE, LARGE_SHAPE
    s_bad = (s[0], s[1] - 1)
    l_bad = (l[0], l[1] - 1)
    good, bad = 1.0 - bad_fraction, bad_fraction
    return [
        Kind("small", True, f"1k float32 {list(s)}",
             _request("small", _tensor(s, data(s)), _tensor(s, data(s, True))), s,
             good * (1.0 - large_fraction)),
        Kind("large", True, f"1M float32 {list(l)}",
             _request("large", _tensor(l, data(l)), _tensor(l, data(l, True))), l,
             good * large_fraction),
        Kind("bad-shape", False, f"targets {list(s_bad)} != logits {list(s)}",
             _request("bad-shape", _tensor(s, data(s)), _tensor(s_bad, data(s_bad, True))), s,
             bad * (1.0 - large_fraction) / 3),
        Kind("bad-length", False, f"logits {list(s)} with 4 bytes missing",
             _request("bad-length", _tensor(s, data(s)[:-4]), _tensor(s, data(s, True))), s,
             bad * (1.0 - large_fraction) / 3),
        Kind("bad-weight", False, f"weight [{s[1] - 1}] vs logits {list(s)}",
             _request("bad-weight", _tensor(s, data(s)), _tensor(s, data(s, True)),
                      _tensor((s[1] - 1,), data((s[1] - 1,)))), s,
             bad * (1.0 - large_fraction) / 3),
        Kind("bad-shape-large", False, f"targets {list(l_bad)} != logits {list(l)}",
             _request("bad-shape-large", _tensor(l, data(l)), _tensor(l_bad, data(l_bad, True))),
             l, bad * large_fraction),
    ]


class Mix:
    """A fixed pseudo-random sequence of kinds, cycled (no random draw per call)."""

    def __init__(self, kinds: list[Kind], rng: np.random.Generator, length: int = 1 << 16):
        p = np.array([k.weight for k in kinds], dtype=np.float64)
        chosen = rng.choice(len(kinds), size=length, p=p / p.sum())
        self._sequence = [kinds[int(i)] for i in chosen]
        self._next = 0

    def next(self) -> Kind:
        kind = self._sequence[self._next % len(self._sequence)]
        self._next += 1
        return kind


class Verifier:
    """Checks good replies: shapes, a finite loss, and the same bits as the first reply of the
    same kind on the same device (lossd is deterministic)."""

    def __init__(self, every: int):
        self.every = every
        self._seen: dict[str, int] = {}
        self._reference: dict[tuple[str, int], tuple[bytes, bytes]] = {}
        self._force: set[str] = set()
        self.checked = 0

    def check_next(self, kind: Kind) -> None:
        """The next OK reply of this kind is checked (whatever --verify-every says)."""
        self._seen.pop(kind.name, None)
        if self.every <= 0:
            self._force.add(kind.name)

    def due(self, kind: Kind) -> bool:
        if kind.name in self._force:
            self._force.discard(kind.name)
            return True
        n = self._seen.get(kind.name, 0)
        self._seen[kind.name] = n + 1
        return self.every > 0 and n % self.every == 0

    def check(self, kind: Kind, reply: bytes) -> str | None:
        """None when the reply is right, else what is wrong."""
        self.checked += 1
        try:
            r = pb.EvaluateResponse.FromString(reply)
        except Exception as e:  # noqa: BLE001 - any decode failure is a wrong result
            return f"undecodable reply: {e}"
        if r.num_elements != kind.numel:
            return f"num_elements {r.num_elements} != {kind.numel}"
        if list(r.loss.shape) != [] or len(r.loss.data) != 4:
            return f"loss shape {list(r.loss.shape)} with {len(r.loss.data)} bytes, expected []"
        if list(r.grad_logits.shape) != list(kind.shape) or \
                len(r.grad_logits.data) != 4 * kind.numel:
            return (f"grad_logits shape {list(r.grad_logits.shape)} with "
                    f"{len(r.grad_logits.data)} bytes, expected {list(kind.shape)}")
        loss = float(np.frombuffer(r.loss.data, dtype=np.float32)[0])
        if not math.isfinite(loss):
            return f"loss {loss} is not finite"
        key = (kind.name, int(r.device))
        reference = self._reference.get(key)
        bits = (bytes(r.loss.data), bytes(r.grad_logits.data))
        if reference is None:
            self._reference[key] = bits
        elif bits != reference:
            return ("loss or dl/dlogits differs from the first reply of this request on device "
                    f"{pb.Device.Name(r.device)} (loss {loss!r})")
        return None
