"""torch tensors in and out of the numpy-based client, without importing torch.

torch is an optional dependency: a value is a tensor only if torch was already imported by
the caller (``sys.modules``), so the client never imports it itself. Tensors make a CPU
round trip through numpy (no copy for CPU tensors); bfloat16 travels as bfloat16 (bit
views with ``ml_dtypes``, else exactly through float32). Outputs are converted back to the
logits' dtype and device.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np

from ._proto.lossd.v1 import lossd_pb2 as pb
from ._tensor import BFLOAT16

__all__ = ["is_tensor", "TorchSpec", "from_torch", "to_torch", "convert_inputs"]


def _torch() -> Any:
    return sys.modules.get("torch")


def is_tensor(value: Any) -> bool:
    """True for a ``torch.Tensor`` (only possible once the caller imported torch)."""
    torch = _torch()
    return torch is not None and isinstance(value, torch.Tensor)


@dataclass(frozen=True)
class TorchSpec:
    """dtype and device that torch outputs get (those of the logits)."""

    dtype: Any
    device: Any


def from_torch(value: Any) -> Tuple[np.ndarray, Optional[int]]:
    """A numpy array with the tensor's values and, for bfloat16, the wire dtype to use.

    The tensor is detached and moved to the CPU; a CPU tensor's memory is shared (no copy)
    except for bfloat16 without ``ml_dtypes`` (widened to float32, exactly).
    """
    torch = _torch()
    t = value.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype == torch.bfloat16:
        if BFLOAT16 is not None:
            return t.view(torch.int16).numpy().view(BFLOAT16), pb.DTYPE_BFLOAT16
        return t.float().numpy(), pb.DTYPE_BFLOAT16
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    return t.numpy(), None


def to_torch(array: Any, spec: TorchSpec) -> Any:
    """The torch tensor of an output array, with the logits' dtype and device."""
    if array is None:
        return None
    torch = _torch()
    arr = np.asarray(array)
    if not arr.flags.writeable or not arr.flags.aligned:
        arr = arr.copy()  # torch wants writable memory; the reply's bytes are immutable
    if BFLOAT16 is not None and arr.dtype == BFLOAT16:
        t = torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(arr)
    return t.to(device=spec.device, dtype=spec.dtype)


def convert_inputs(logits: Any, targets: Any, weight: Any, pos_weight: Any
                   ) -> Tuple[Any, Any, Any, Any, Dict[str, int], Optional[TorchSpec]]:
    """Replaces torch tensors among the inputs by numpy arrays.

    Returns
    -------
    (logits, targets, weight, pos_weight, wire_codes, spec)
        ``wire_codes`` maps argument names to the wire dtype of bfloat16 tensors; ``spec``
        is set when the logits are a tensor (outputs then become tensors).
    """
    codes: Dict[str, int] = {}
    spec: Optional[TorchSpec] = None
    out = []
    for name, value in (("logits", logits), ("targets", targets), ("weight", weight),
                        ("pos_weight", pos_weight)):
        if value is not None and is_tensor(value):
            if name == "logits":
                spec = TorchSpec(value.dtype, value.device)
            value, code = from_torch(value)
            if code is not None:
                codes[name] = code
        out.append(value)
    return out[0], out[1], out[2], out[3], codes, spec
