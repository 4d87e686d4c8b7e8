"""Exact evaluation of a dataset sharded across replicas (:meth:`lossd.Client.evaluate_dataset`).

The batches are numbered in the order they are read, and every ``checkpoint_batches``
consecutive batches form a *segment*: the contiguous range of flat elements
``[offset, offset + n)`` of the dataset. Each segment is one ``Accumulate`` call with
``accumulate_slice.element_offset = offset`` on one replica, which replies with the exact
partial state of its slice (``AccumulateResponse.partial_state``). When every segment has a
state, one ``MergePartials`` call joins them on a replica: the server checks that the slices
tile ``[0, N)`` exactly (a gap or an overlap is INVALID_ARGUMENT, so nothing is ever counted
twice), adds them exactly and rounds and divides once. The client does no arithmetic.

Scheduling
----------
One thread per replica sends that replica's segments, one call at a time; the caller's
thread reads the batches, encodes them and hands each segment to the live replica with the
fewest segments queued or in flight among those whose queue has room (on a tie, the next
one after the replica chosen last, round robin), waiting while every queue holds
``queue_depth`` segments. Counting the segment in flight and the round robin spread the
work over every replica also when the batches are read more slowly than one replica
evaluates them. The encoded messages of a segment are kept until its state arrives, so at
most ``replicas x (queue_depth + 1)`` segments are held in memory.

Failures
--------
A call that fails with a code that says the replica (not the data) is at fault --
UNAVAILABLE, CANCELLED, UNKNOWN, INTERNAL, ABORTED, RESOURCE_EXHAUSTED -- marks that replica
dead for the rest of the run; its segment in flight and the ones queued for it are sent again
to the live replicas (first, before new segments). The states already received from it are
kept: a failure costs at most the ``checkpoint_batches`` batches of the segment in flight
(plus those queued). Any other error (INVALID_ARGUMENT for a bad batch, UNAUTHENTICATED, a
passed deadline, ...) ends the run and is raised. When no replica is left, the last failure
is raised.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import socket
import threading
import time
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Sequence

import grpc
import numpy as np

from ._errors import LossdError, error_for
from ._options import enum_name
from ._proto.lossd.v1 import lossd_pb2 as pb
from ._types import DatasetResult, Timing

__all__ = ["resolve_replicas", "dataset_batches", "ShardedRun", "REPLICA_FAULTS"]

#: Status codes that blame the replica rather than the request: the segment is re-sent.
REPLICA_FAULTS = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL, grpc.StatusCode.ABORTED, grpc.StatusCode.RESOURCE_EXHAUSTED,
})

#: Default rows of a batch cut from an array: about this many elements.
DEFAULT_BATCH_ELEMENTS = 1 << 20


def _split_host_port(address: str) -> tuple:
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        return host, rest.lstrip(":")
    host, sep, port = address.rpartition(":")
    if not sep:
        return address, ""
    return host, port


def resolve_replicas(target: Any) -> List[str]:
    """The replica addresses of a target: a list of targets as given; ``dns:[//authority/]
    host:port`` resolved to its addresses (each ``ip:port``, sorted, duplicates dropped); a
    ``host:port,host:port`` string split at the commas; any other string as one replica."""
    if not isinstance(target, str):
        replicas = [str(t) for t in target]
    elif target.startswith("dns:"):
        name = target[4:]
        if name.startswith("//"):
            name = name[2:].split("/", 1)[1] if "/" in name[2:] else ""
        host, port = _split_host_port(name)
        if not host or not port:
            raise ValueError(f"target {target!r}: expected dns:[//authority/]host:port")
        try:
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except (OSError, ValueError) as exc:
            raise ValueError(f"target {target!r}: cannot resolve {host!r}: {exc}") from None
        replicas = []
        for family, _, _, _, addr in infos:
            ip = addr[0]
            text = f"[{ip}]:{addr[1]}" if family == socket.AF_INET6 else f"{ip}:{addr[1]}"
            if text not in replicas:
                replicas.append(text)
        replicas.sort()
    elif "," in target and "://" not in target and not target.startswith(("unix:", "ipv")):
        replicas = [t.strip() for t in target.split(",") if t.strip()]
    else:
        replicas = [target]
    if not replicas:
        raise ValueError(f"target {target!r}: no replica address")
    return replicas


def _load(x: Any, what: str) -> Any:
    """A ``.npy`` path becomes a read-only memory map; anything else is returned as is."""
    if isinstance(x, (str, os.PathLike)):
        path = os.fspath(x)
        if not path.endswith(".npy"):
            raise ValueError(f"{what}: a path must name a .npy file, got {path!r}")
        return np.load(path, mmap_mode="r")
    return x


def dataset_batches(data: Any, targets: Any, weight: Any, batch_rows: Optional[int]
                    ) -> tuple:
    """``(batches, total_elements or None)``: the batches of ``data``.

    ``data`` is an array (or a ``.npy`` path, memory-mapped) of logits with ``targets`` of
    the same shape (array or path) and an optional ``weight``, cut along the first axis into
    batches of ``batch_rows`` rows; or an iterable of batches (``targets`` and ``weight``
    must then be None)."""
    data = _load(data, "data")
    if isinstance(data, np.ndarray) or (hasattr(data, "shape") and hasattr(data, "dtype")
                                        and not isinstance(data, (list, tuple))):
        logits = data
        targets = _load(targets, "targets")
        weight = _load(weight, "weight")
        if targets is None:
            raise ValueError("targets: required when data is an array")
        if tuple(targets.shape) != tuple(logits.shape):
            raise ValueError(f"targets shape {list(targets.shape)} != logits shape "
                             f"{list(logits.shape)}")
        if len(logits.shape) == 0:
            raise ValueError("data: a scalar cannot be cut into batches; pass a 1-D array")
        rows = int(logits.shape[0])
        row_elements = int(np.prod(logits.shape[1:], dtype=np.int64))
        if batch_rows is None:
            batch_rows = max(1, DEFAULT_BATCH_ELEMENTS // max(1, row_elements))
        if batch_rows < 1:
            raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
        # A weight with the logits' first dimension (not a broadcast 1) is cut with them.
        cut_weight = (weight is not None and len(weight.shape) == len(logits.shape)
                      and int(weight.shape[0]) == rows and rows != 1)

        def gen() -> Iterator[tuple]:
            for r0 in range(0, rows, batch_rows):
                r1 = min(rows, r0 + batch_rows)
                w = weight[r0:r1] if cut_weight else weight
                yield (logits[r0:r1], targets[r0:r1]) if w is None else \
                    (logits[r0:r1], targets[r0:r1], w)
            if rows == 0:
                yield (logits, targets) if weight is None else (logits, targets, weight)

        return gen(), rows * row_elements
    if targets is not None or weight is not None:
        raise ValueError("targets and weight go with an array of logits, not with an "
                         "iterable of batches (put them in each batch)")
    if batch_rows is not None:
        raise ValueError("batch_rows applies to an array of logits, not to an iterable")
    return iter(data), None


@dataclasses.dataclass
class _Segment:
    index: int
    offset: int  # flat index of its first element in the dataset
    elements: int
    batches: int
    messages: List[bytes]
    attempts: int = 0


class ShardedRun:
    """One evaluation over replica clients (see the module's docstring).

    ``clients[i]`` is a :class:`lossd.Client` for ``targets[i]``; ``job`` the
    :class:`~lossd._job.AccumulateJob` that encodes batches.
    """

    def __init__(self, clients: Sequence[Any], targets: Sequence[str], job: Any, *,
                 checkpoint_batches: int, queue_depth: int, timeout: Optional[float],
                 progress: Optional[Callable[[int, Optional[int]], None]]) -> None:
        if checkpoint_batches < 1:
            raise ValueError(f"checkpoint_batches must be >= 1, got {checkpoint_batches}")
        if queue_depth < 1:
            raise ValueError(f"queue_depth must be >= 1, got {queue_depth}")
        self.clients = list(clients)
        self.targets = list(targets)
        self.job = job
        self.k = checkpoint_batches
        self.depth = queue_depth
        self.timeout = timeout
        self.progress = progress
        n = len(self.clients)
        self._cv = threading.Condition()
        self._queues: List[Deque[_Segment]] = [collections.deque() for _ in range(n)]
        self._retry: Deque[_Segment] = collections.deque()
        self._alive = [True] * n
        self._busy = [False] * n  # a segment in flight
        self._last = n - 1  # the replica chosen last: ties go round robin from it
        self._calls: List[Any] = [None] * n
        self._closed = False
        self._outstanding = 0
        self._error: Optional[BaseException] = None
        self._states: Dict[int, "pb.AccumulateResponse"] = {}
        self._done_elements = 0
        self._total: Optional[int] = None
        self._failures: Dict[str, str] = {}
        self._resent_segments = 0
        self._resent_batches = 0
        self._compute_ns = 0
        self._merge_calls = 0

    # -- producer side (the caller's thread) ---------------------------------------------

    def run(self, batches: Iterable[Any], total: Optional[int]) -> DatasetResult:
        """Evaluates the batches; closes the replica clients when it returns or raises."""
        try:
            return self._run(batches, total)
        finally:
            for c in self.clients:
                c.close()

    def cancel(self) -> None:
        """Ends a run from another thread: calls in flight are cancelled and ``run`` raises
        ``lossd.LossdError`` (CANCELLED) soon after."""
        self._abort(error_for(grpc.StatusCode.CANCELLED, "evaluate_dataset was cancelled"))

    def _run(self, batches: Iterable[Any], total: Optional[int]) -> DatasetResult:
        start = time.monotonic_ns()
        self._total = total
        threads = [threading.Thread(target=self._worker, args=(i,), daemon=True,
                                    name=f"lossd-shard-{i}") for i in range(len(self.clients))]
        for t in threads:
            t.start()
        try:
            segments = self._produce(batches)
        except BaseException as exc:
            self._abort(exc)
            raise
        finally:
            with self._cv:
                self._closed = True
                self._cv.notify_all()
            for t in threads:
                t.join()
        if self._error is not None:
            raise self._error
        merge_start = time.monotonic_ns()
        reply = self._merge([self._states[i].partial_state for i in range(segments)])
        end = time.monotonic_ns()
        t = reply.timing
        return DatasetResult(
            loss=reply.loss, num_elements=reply.num_elements, num_batches=reply.num_batches,
            reduction=enum_name(pb.Reduction, "REDUCTION_", reply.reduction),
            device=enum_name(pb.Device, "DEVICE_", reply.device),
            timing=Timing(queue_ns=0, compute_ns=self._compute_ns + t.compute_ns,
                          total_ns=end - start),
            num_kept=reply.num_kept, replicas=tuple(self.targets), checkpoints=segments,
            failed_replicas=tuple(self._failures), resent_batches=self._resent_batches,
            failures=tuple(self._failures.values()), merge_ns=end - merge_start,
            merge_calls=self._merge_calls)

    def _produce(self, batches: Iterable[Any]) -> int:
        """Encodes the batches into segments and queues them; returns the segment count."""
        index = offset = 0
        messages: List[bytes] = []
        count = elements = 0
        batch_index = -1
        for batch_index, batch in enumerate(batches):
            before = self.job.sent_elements
            messages.extend(self.job.messages_for(batch_index, batch))
            elements += self.job.sent_elements - before
            count += 1
            if count == self.k:
                self._put(_Segment(index, offset, elements, count, messages))
                index, offset = index + 1, offset + elements
                messages, count, elements = [], 0, 0
        if batch_index < 0:  # no batches: one empty batch states the reduction
            messages, count = [self.job.empty_request()], 0
        if messages:
            self._put(_Segment(index, offset, elements, count, messages))
            index += 1
        return index

    def _put(self, seg: _Segment) -> None:
        slice_field = pb.EvaluateRequest()
        slice_field.accumulate_slice.element_offset = seg.offset
        slice_field.accumulate_slice.SetInParent()
        # Serialized fields concatenate: the first message gains accumulate_slice.
        seg.messages[0] = seg.messages[0] + slice_field.SerializeToString()
        with self._cv:
            while True:
                if self._error is not None:
                    raise self._error
                live = [i for i, a in enumerate(self._alive) if a]
                if not live:  # pragma: no cover - _fail sets _error first
                    raise error_for(grpc.StatusCode.UNAVAILABLE, "no replica is left")
                room = [j for j in live if len(self._queues[j]) < self.depth]
                if room:
                    n = len(self._queues)
                    i = min(room, key=lambda j: (len(self._queues[j]) + self._busy[j],
                                                 (j - self._last - 1) % n))
                    self._last = i
                    self._queues[i].append(seg)
                    self._outstanding += 1
                    self._cv.notify_all()
                    return
                self._cv.wait()

    # -- replica threads -----------------------------------------------------------------

    def _take(self, i: int) -> Optional[_Segment]:
        with self._cv:
            self._busy[i] = False  # the previous segment (if any) is done
            while True:
                if self._error is not None or not self._alive[i]:
                    return None
                if self._retry:
                    self._busy[i] = True
                    return self._retry.popleft()
                if self._queues[i]:
                    seg = self._queues[i].popleft()
                    self._busy[i] = True
                    self._cv.notify_all()  # room in the queue for the producer
                    return seg
                if self._closed and self._outstanding == 0:
                    return None
                self._cv.wait()

    def _worker(self, i: int) -> None:
        client = self.clients[i]
        while True:
            seg = self._take(i)
            if seg is None:
                return
            seg.attempts += 1
            try:
                future, source = client._start_accumulate(iter(seg.messages), self.timeout)
                with self._cv:
                    self._calls[i] = future
                    if self._error is not None:
                        future.cancel()
                try:
                    reply = client._finish_accumulate(future, source)
                finally:
                    with self._cv:
                        self._calls[i] = None
            except LossdError as exc:
                if exc.code in REPLICA_FAULTS and self._error is None:
                    self._fail(i, seg, exc)
                else:
                    self._abort(exc)
                return
            except BaseException as exc:  # pragma: no cover - unexpected
                self._abort(exc)
                return
            if not reply.partial_state:
                self._abort(error_for(grpc.StatusCode.FAILED_PRECONDITION,
                                      f"{self.targets[i]} returns no partial_state: the "
                                      "server is too old for evaluate_dataset"))
                return
            if reply.num_elements != seg.elements:
                self._abort(error_for(grpc.StatusCode.INTERNAL,
                                      f"{self.targets[i]} counted {reply.num_elements} "
                                      f"elements for a segment of {seg.elements}"))
                return
            self._complete(seg, reply)

    def _complete(self, seg: _Segment, reply: "pb.AccumulateResponse") -> None:
        with self._cv:
            if seg.index not in self._states:
                self._states[seg.index] = reply
                self._done_elements += seg.elements
                self._compute_ns += reply.timing.compute_ns
            self._outstanding -= 1
            done = self._done_elements
            self._cv.notify_all()
        if self.progress is not None:
            self.progress(done, self._total)

    def _fail(self, i: int, seg: _Segment, exc: LossdError) -> None:
        with self._cv:
            self._alive[i] = False
            self._failures[self.targets[i]] = str(exc)
            moved = [seg] + list(self._queues[i])
            self._queues[i].clear()
            for s in moved:
                self._resent_segments += 1
                self._resent_batches += s.batches
            self._retry.extend(moved)
            if not any(self._alive):
                self._error = error_for(exc.code, f"every replica failed; last: {exc}")
            elif seg.attempts >= len(self.clients):
                self._error = error_for(exc.code, f"segment {seg.index} failed "
                                        f"{seg.attempts} times; last: {exc}")
            self._cv.notify_all()

    def _abort(self, exc: BaseException) -> None:
        with self._cv:
            if self._error is None:
                self._error = exc
            for call in self._calls:
                if call is not None:
                    call.cancel()
            self._cv.notify_all()

    # -- the merge -----------------------------------------------------------------------

    def _merge(self, states: List[bytes]) -> "pb.AccumulateResponse":
        """MergePartials on the first live replica that answers; states that would not fit
        one message are merged in groups first (each group a contiguous range)."""
        budget = max(1, self.clients[0]._limit // 2)
        while True:
            groups: List[List[bytes]] = [[]]
            size = 0
            for s in states:
                if groups[-1] and size + len(s) + 16 > budget:
                    groups.append([])
                    size = 0
                groups[-1].append(s)
                size += len(s) + 16
            if len(groups) == 1:
                return self._merge_call(states)
            states = [self._merge_call(g).partial_state for g in groups]

    def _merge_call(self, states: List[bytes]) -> "pb.AccumulateResponse":
        request = pb.MergePartialsRequest(request_id=f"{self.job.request_id}/merge",
                                          partial_states=states)
        last: Optional[LossdError] = None
        for i, client in enumerate(self.clients):
            if not self._alive[i]:
                continue
            self._merge_calls += 1
            try:
                return client._merge_partials(request, self.timeout)
            except LossdError as exc:
                if exc.code not in REPLICA_FAULTS:
                    raise
                self._alive[i] = False
                self._failures[self.targets[i]] = str(exc)
                last = exc
        if last is None:
            raise error_for(grpc.StatusCode.UNAVAILABLE, "no replica left for MergePartials")
        raise error_for(last.code, f"MergePartials failed on every replica; last: {last}")
