"""Result types returned by :class:`lossd.Client` and :class:`lossd.AsyncClient`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

__all__ = ["Timing", "LossResult", "BceResult", "AccumulateResult", "DatasetResult",
           "Capabilities"]


@dataclass(frozen=True)
class Timing:
    """Server-side timings of one request, in nanoseconds.

    Attributes
    ----------
    queue_ns : int
        From decode to the start of compute.
    compute_ns : int
        Kernel time.
    total_ns : int
        From the start of the handler to the reply.
    received_unix_ns, compute_start_unix_ns, compute_end_unix_ns, reply_unix_ns : int
        Wall-clock instants (ns since the epoch, the server's clock): the request's last
        byte received, compute start and end, the reply handed to the transport. 0 from a
        server that does not report them. For a split request, the durations above are
        summed over the parts and the instants span them (the last part received, the first
        compute start, the last compute end and reply); ``LossResult.parts`` has each part's.
    """

    queue_ns: int = 0
    compute_ns: int = 0
    total_ns: int = 0
    received_unix_ns: int = 0
    compute_start_unix_ns: int = 0
    compute_end_unix_ns: int = 0
    reply_unix_ns: int = 0

    @staticmethod
    def span(parts: "Sequence[Timing]") -> "Timing":
        """The timing of a request split into ``parts`` (see above)."""
        starts = [p.compute_start_unix_ns for p in parts if p.compute_start_unix_ns]
        return Timing(queue_ns=sum(p.queue_ns for p in parts),
                      compute_ns=sum(p.compute_ns for p in parts),
                      total_ns=sum(p.total_ns for p in parts),
                      received_unix_ns=max((p.received_unix_ns for p in parts), default=0),
                      compute_start_unix_ns=min(starts, default=0),
                      compute_end_unix_ns=max((p.compute_end_unix_ns for p in parts),
                                              default=0),
                      reply_unix_ns=max((p.reply_unix_ns for p in parts), default=0))


@dataclass(frozen=True)
class LossResult:
    """The result of :meth:`lossd.Client.bce_with_logits` and
    :meth:`lossd.Client.sigmoid_focal_loss`.

    Arrays have the logits' dtype (bfloat16 without ``ml_dtypes``: float32). When the
    request fit in one message they are read-only views of the reply's bytes (no copy; call
    ``.copy()`` to modify one, and note that they may be unaligned); results assembled from
    chunks are ordinary writable arrays. When the logits were a ``torch.Tensor`` every array
    is a ``torch.Tensor`` with the logits' dtype and device.

    Attributes
    ----------
    loss : numpy.ndarray or torch.Tensor
        Per-element loss with the logits' shape for ``reduction="none"``; the logits' shape
        without its last axis for ``"per_sample_mean"``; a 0-d array for ``"mean"`` and
        ``"sum"``.
    grad : numpy.ndarray or torch.Tensor or None
        Gradient of the (reduced) loss with respect to the logits, logits' shape; None
        unless ``grad=True`` was asked.
    grad_targets : numpy.ndarray or torch.Tensor or None
        Gradient of the (reduced) loss with respect to the targets; None unless
        ``grad_targets=True`` was asked.
    device : str
        Where the server ran it: "cpu" or "cuda".
    timing : Timing
        Server-side timings (summed over the chunks of a split request).
    parts : tuple of Timing
        The server's timings of each request the evaluation was sent as, in order: one for
        a single request, one per chunk of a split one (they show receiving, computing and
        replying overlap); empty for results reduced by ``Accumulate``.
    request_id : str
        The request id (echoed by the server).
    num_elements : int
        Number of elements of the logits.
    """

    loss: Any
    grad: Optional[Any]
    grad_targets: Optional[Any]
    device: str
    timing: Timing
    request_id: str
    num_elements: int
    parts: Tuple[Timing, ...] = ()


#: The former name of :class:`LossResult`.
BceResult = LossResult


@dataclass(frozen=True)
class AccumulateResult:
    """The dataset-level reduction of :meth:`lossd.Client.accumulate`.

    Attributes
    ----------
    loss : float
        SUM or MEAN over every element of every batch: the exact sum rounded once to
        float64 (then divided by the element count for MEAN, and by the count of elements
        not ignored with ``normalize``). The same bits for any split into batches.
    num_elements : int
    num_batches : int
        Messages the server received (an oversized batch is sent as several).
    reduction : str
        "mean" or "sum".
    device : str
        Where the last batch ran.
    timing : Timing
        ``compute_ns`` summed over batches; ``total_ns`` of the whole call.
    """

    loss: float
    num_elements: int
    num_batches: int
    reduction: str
    device: str
    timing: Timing


@dataclass(frozen=True)
class DatasetResult(AccumulateResult):
    """The dataset-level reduction of :meth:`lossd.Client.evaluate_dataset`: the fields of
    :class:`AccumulateResult` (``loss`` has the same bits as one ``accumulate`` over the same
    batches; ``num_batches`` counts the messages of every segment, ``device`` is "cpu": where
    the merge ran; ``timing.compute_ns`` sums the segments' and the merge's, ``total_ns`` is
    the client's wall time), and how the work was spread.

    Attributes
    ----------
    num_kept : int
        Elements not ignored (``ignore_index`` with ``normalize``), else ``num_elements``.
    replicas : tuple of str
        The replica addresses the batches were spread over.
    checkpoints : int
        Segments (``checkpoint_batches`` batches each, the last one fewer), each one
        ``Accumulate`` call whose partial state was kept.
    failed_replicas : tuple of str
        Replicas that failed during the run (their segments were sent elsewhere).
    resent_batches : int
        Batches sent again because the replica they were sent to failed.
    failures : tuple of str
        The error of each failed replica, in the order of ``failed_replicas``.
    merge_ns : int
        The client's wall time of the final merge, in nanoseconds: from the moment every
        segment's state is in to the merged reply (grouping the states and every
        ``MergePartials`` round trip). ``merge_ns / timing.total_ns`` is the merge's share
        of the run.
    merge_calls : int
        ``MergePartials`` calls made (1 unless the states did not fit one message and were
        merged in groups first; a call to a replica that failed is counted too).
    """

    num_kept: int = 0
    replicas: Tuple[str, ...] = ()
    checkpoints: int = 0
    failed_replicas: Tuple[str, ...] = ()
    resent_batches: int = 0
    failures: Tuple[str, ...] = ()
    merge_ns: int = 0
    merge_calls: int = 0


@dataclass(frozen=True)
class Capabilities:
    """What a server supports and its limits (:meth:`lossd.Client.capabilities`).

    Attributes
    ----------
    server_version : str
    losses : tuple of str
        E.g. ``("bce_with_logits", "sigmoid_focal_loss")``.
    dtypes : tuple of str
        Subset of "float32", "float64", "float16", "bfloat16".
    devices : tuple of str
        Devices usable now: "cpu" (always) and "cuda" with a usable GPU.
    reductions : tuple of str
        Subset of "none", "mean", "sum", "per_sample_mean".
    max_message_bytes : int
        The server's message size limit.
    max_elements : int
        The largest number of elements per request.
    cuda_device_name : str
        Empty without a GPU.
    whole_requests : bool
        The server divides the chunks of a split request as the whole request
        (``EvaluateRequest.whole``); the client splits large requests only on such servers.
    partial_state_versions : tuple of int
        Formats of ``partial_state`` the server reads (``MergePartials``).
    cuda_ipc : bool
        The server takes CUDA IPC regions: a client on the same GPU passes its CUDA tensors
        by reference (the ``cuda_ipc`` argument of the clients).
    cuda_device_uuid : str
        UUID of the server's GPU (``"GPU-..."``, as nvidia-smi -L prints it); empty without
        one.
    """

    server_version: str
    losses: Tuple[str, ...]
    dtypes: Tuple[str, ...]
    devices: Tuple[str, ...]
    reductions: Tuple[str, ...]
    max_message_bytes: int
    max_elements: int
    cuda_device_name: str
    whole_requests: bool = False
    partial_state_versions: Tuple[int, ...] = ()
    cuda_ipc: bool = False
    cuda_device_uuid: str = ""

    def to_dict(self) -> Dict[str, Any]:
        """The fields as a plain dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}
