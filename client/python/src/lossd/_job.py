"""The strategies of one loss evaluation, independent of the transport: whether a request
is sent whole or split into chunks, the messages of each call, and the reassembly of the
replies. Requests or replies above the message limit are always split; those above
``chunk_bytes`` too when that keeps the bits. The options are validated in
:mod:`lossd._options`, the inputs prepared in :mod:`lossd._inputs`, the chunks planned and
cut in :mod:`lossd._chunks`, and the messages encoded in :mod:`lossd._wire`.

The synchronous and the asyncio clients drive the same :class:`EvalJob` and
:class:`AccumulateJob`; only the RPC calls differ.

Strategies of :class:`EvalJob` (``job.mode``)
---------------------------------------------
``"unary"``
    The request and the reply fit (in the message limit, and in ``chunk_bytes`` when
    splitting would be exact): one ``Evaluate``.
``"stream"``
    ``reduction`` none or per_sample_mean: the tensors are split along their leading axes
    (whole rows of the last axis for per_sample_mean) into chunks under the limit, sent
    pipelined on one ``EvaluateStream`` and written into preallocated output arrays.
``"accumulate"``
    mean/sum without gradients: the chunks go to one ``Accumulate`` call, whose exact
    dataset-level reduction is rounded to the logits' dtype as the server rounds a one-shot
    reply: the same bits as one request.
``"both"``
    mean/sum with gradients: the gradients come from the chunks on the stream, the loss from
    an ``Accumulate`` over the same chunks (the same bits as one request). This sends the
    inputs twice but keeps the loss exact.

The client does no arithmetic on results. Every chunk carries ``EvaluateRequest.whole``
(the whole request's element count, and with normalize and ignore_index its kept count), so
the server divides each chunk's losses and gradients as it divides one request: the chunks
are the bits of the one-shot reply. The kept count comes from the server too
(``AccumulateResponse.num_kept``): with normalize and ignore_index, the ``Accumulate`` call
runs first and the stream after it. The one split that is not exact is a per_sample_mean of
a 1-D tensor (a single row, summed by the server in one pass), which is evaluated as the mean
and split only above the message limit.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import grpc
import numpy as np

from ._chunks import ChunkPlan, _Slicer, message_sizes, plan_chunks, prod
from ._errors import LossdError, error_for
from ._inputs import Inputs, Operand, prepare_inputs, unpack_batch
# make_options, REDUCTIONS and DEVICES are re-exported: `from lossd._job import ...` (as in
# bench/overhead.py) keeps working.
from ._options import DEVICES, REDUCTIONS, enum_name, make_options
from ._proto.lossd.v1 import lossd_pb2 as pb
from ._tensor import output_dtype, round_from_double
from ._types import AccumulateResult, LossResult, Timing
from ._wire import RequestOptions, encode_request, parse_response, parse_stream_response, to_array

__all__ = ["REDUCTIONS", "DEVICES", "Progress", "Inputs", "EvalJob", "AccumulateJob",
           "make_options", "prepare_inputs", "enum_name"]

#: ``progress(done_elements, total_elements)``; total is None when unknown (iterables).
Progress = Callable[[int, Optional[int]], None]

_STATUS_BY_VALUE: Dict[int, grpc.StatusCode] = {
    c.value[0]: c for c in grpc.StatusCode}  # type: ignore[index]


def _new_id() -> str:
    """A random request id: 32 hex digits (as uuid4().hex, at a fraction of its cost)."""
    return os.urandom(16).hex()


def _timing_of(parsed: Any) -> Timing:
    received, start, end, reply = parsed.instants
    return Timing(queue_ns=parsed.queue_ns, compute_ns=parsed.compute_ns,
                  total_ns=parsed.total_ns, received_unix_ns=received,
                  compute_start_unix_ns=start, compute_end_unix_ns=end, reply_unix_ns=reply)


def batch_error(index: int, bounds: Optional[Tuple[int, int]], code: int,
                message: str) -> LossdError:
    status = _STATUS_BY_VALUE.get(code, grpc.StatusCode.UNKNOWN)
    where = f"chunk {index}" + (f" (rows {bounds[0]}:{bounds[1]})" if bounds else "")
    return error_for(status, f"{where}: {message}")


# ---------------------------------------------------------------------------------------
# Evaluate


def _splits_exactly(options: RequestOptions, ndim: int) -> bool:
    """False for the one split whose bits differ from one request's (module docstring): a
    per_sample_mean of a 1-D tensor, evaluated as the mean when split."""
    red = options.reduction or pb.REDUCTION_MEAN
    return not (red == pb.REDUCTION_PER_SAMPLE_MEAN and ndim < 2)


class EvalJob:
    """One evaluation (see the module docstring for the strategies).

    Parameters
    ----------
    inputs : Inputs
    options : RequestOptions
    request_id : str or None
        None: a random UUID.
    limit : int
        Message size limit of the client (bytes): larger requests or replies are split.
    chunk_bytes : int or None
        Requests or replies larger than this are split too, into chunks of about this size
        (pipelined chunks are much faster than one large message with gRPC Python), unless
        splitting would change the result's bits (the module docstring). None: split
        only above ``limit``.
    """

    def __init__(self, inputs: Inputs, options: RequestOptions, request_id: Optional[str],
                 limit: int, chunk_bytes: Optional[int]) -> None:
        self.inputs = inputs
        self.options = options
        self.request_id = request_id if request_id is not None else _new_id()
        self.total = inputs.numel
        self.out_code = inputs.x.code
        self.mode = "unary"
        self.plan: Optional[ChunkPlan] = None
        self.stream_options = options
        self.accumulate_options = options
        shape = inputs.shape
        n_grads = int(options.grad_logits) + int(options.grad_targets)
        red = options.reduction or pb.REDUCTION_MEAN
        self.reduction = red
        # Room for the request id (chunks append "/<index>").
        limit -= len(self.request_id.encode("utf-8")) + 16
        loss_count = 1
        if red == pb.REDUCTION_NONE:
            loss_count = self.total
        elif red == pb.REDUCTION_PER_SAMPLE_MEAN:
            loss_count = prod(shape[:-1])
        req_bytes, resp_bytes = message_sizes(inputs, loss_count, n_grads)
        split_at = limit
        if chunk_bytes and _splits_exactly(options, len(shape)):
            split_at = min(limit, chunk_bytes)
        preferred_chunk = min(chunk_bytes or limit, limit)
        if req_bytes <= split_at and resp_bytes <= split_at:
            return
        if red == pb.REDUCTION_PER_SAMPLE_MEAN and len(shape) < 2:
            # One sample: the per-sample mean is the mean (the loss is the same up to the
            # order of the exact summation; gradients are identical).
            red = pb.REDUCTION_MEAN
        self.reduction = red
        per_sample = red == pb.REDUCTION_PER_SAMPLE_MEAN
        # Every chunk is divided by the server as the whole request (EvaluateRequest.whole);
        # the kept count of normalize with ignore_index comes from the Accumulate call.
        whole = dataclasses.replace(options, reduction=red, whole_elements=self.total)
        #: True when the Accumulate call must finish before the stream starts (its num_kept
        #: goes into every chunk).
        self.needs_kept = options.normalize and options.ignore_index is not None
        if red in (pb.REDUCTION_NONE, pb.REDUCTION_PER_SAMPLE_MEAN):
            self.mode = "stream"
            self.stream_options = whole
            # Only for the kept count (its loss is not used).
            self.accumulate_options = dataclasses.replace(
                options, reduction=pb.REDUCTION_SUM, grad_logits=False, grad_targets=False)
        else:
            self.accumulate_options = dataclasses.replace(options, reduction=red,
                                                          grad_logits=False, grad_targets=False)
            self.mode = "both" if n_grads else "accumulate"
            self.stream_options = whole
        if self.mode == "stream":
            self.plan = plan_chunks(inputs, loss_per_row="samples" if per_sample else "elements",
                                    grads=n_grads, limit=limit, preferred=preferred_chunk,
                                    min_rest=1 if per_sample else 0)
        else:
            self.plan = plan_chunks(inputs, loss_per_row="scalar", grads=n_grads, limit=limit,
                                    preferred=preferred_chunk)
        self._slicer = _Slicer(inputs, self.plan)
        self._outputs: Dict[str, np.ndarray] = {}
        out_dt = output_dtype(self.out_code)
        if self.mode == "stream":
            loss_shape = shape if red == pb.REDUCTION_NONE else shape[:-1]
            self._outputs["loss"] = np.empty(loss_shape, out_dt)
        if options.grad_logits:
            self._outputs["grad"] = np.empty(shape, out_dt)
        if options.grad_targets:
            self._outputs["grad_targets"] = np.empty(shape, out_dt)
        self._device: int = pb.DEVICE_CPU
        self._parts: List[Timing] = []
        self._acc: Optional[pb.AccumulateResponse] = None
        self._done = 0

    @property
    def uses_whole(self) -> bool:
        """True when the chunks carry ``EvaluateRequest.whole`` (the server must honour it:
        ``Capabilities.whole_requests``)."""
        return self.mode in ("stream", "both")

    @property
    def runs_accumulate(self) -> bool:
        """True when an ``Accumulate`` call is part of the job (before the stream when
        :attr:`needs_kept`, else beside it)."""
        return self.mode in ("accumulate", "both") or (self.mode == "stream" and self.needs_kept)

    # -- unary ----------------------------------------------------------------------------

    def unary_request(self) -> bytes:
        i = self.inputs
        return encode_request(self.request_id, i.x.wire(), i.y.wire(),
                              i.w.wire() if i.w else None, i.p.wire() if i.p else None,
                              self.options)

    def unary_result(self, raw: bytes) -> LossResult:
        parsed = parse_response(raw)
        timing = _timing_of(parsed)
        return LossResult(
            loss=to_array(raw, parsed.loss, "loss"),
            grad=to_array(raw, parsed.grad_logits, "grad_logits")
            if self.options.grad_logits else None,
            grad_targets=to_array(raw, parsed.grad_targets, "grad_targets")
            if self.options.grad_targets else None,
            device=enum_name(pb.Device, "DEVICE_", parsed.device),
            timing=timing,
            request_id=parsed.request_id,
            num_elements=parsed.num_elements,
            parts=(timing,),
        )

    # -- chunked --------------------------------------------------------------------------

    @property
    def chunks(self) -> int:
        return len(self.plan.bounds) if self.plan else 1

    def chunk_elements(self, index: int) -> int:
        assert self.plan is not None
        r0, r1 = self.plan.bounds[index]
        return (r1 - r0) * prod(self.plan.rest)

    def _chunk_requests(self, options: RequestOptions) -> Iterator[bytes]:
        assert self.plan is not None
        for index, (r0, r1) in enumerate(self.plan.bounds):
            x, y, w, p = self._slicer.chunk(r0, r1)
            yield encode_request(f"{self.request_id}/{index}", x, y, w, p, options)

    def stream_requests(self) -> Iterator[bytes]:
        """The chunk requests of the EvaluateStream call, generated lazily. With
        :attr:`needs_kept`, only after :meth:`accumulate_reply` has stored the kept count."""
        options = self.stream_options
        if self.needs_kept:
            if self._acc is None:
                raise RuntimeError("the Accumulate call must finish before the stream starts")
            options = dataclasses.replace(options, whole_kept=self._acc.num_kept)
        return self._chunk_requests(options)

    def accumulate_requests(self) -> Iterator[bytes]:
        """The chunk requests of the Accumulate call, generated lazily."""
        return self._chunk_requests(self.accumulate_options)

    def stream_reply(self, index: int, raw: bytes) -> int:
        """Stores chunk ``index``'s reply; returns the elements done so far.

        Raises
        ------
        LossdError
            The chunk's BatchError (message prefixed with the chunk and its rows), or
            InternalError for a malformed reply.
        """
        assert self.plan is not None
        _, parsed, error = parse_stream_response(raw)
        bounds = self.plan.bounds[index]
        if error is not None:
            raise batch_error(index, bounds, error[0], error[1])
        assert parsed is not None
        r0, r1 = bounds
        rows = r1 - r0
        merged = (self.plan.rows,) + self.plan.rest
        if self.mode == "stream":
            loss = to_array(raw, parsed.loss, "loss")
            target = self._outputs["loss"]
            if self.reduction == pb.REDUCTION_NONE:
                target.reshape(merged)[r0:r1] = loss.reshape((rows,) + self.plan.rest)
            else:
                m = (self.plan.rows,) + self.plan.rest[:-1]
                target.reshape(m)[r0:r1] = loss.reshape((rows,) + self.plan.rest[:-1])
        for key, field, tensor in (("grad", "grad_logits", parsed.grad_logits),
                                   ("grad_targets", "grad_targets", parsed.grad_targets)):
            if key in self._outputs:
                g = to_array(raw, tensor, field)
                self._outputs[key].reshape(merged)[r0:r1] = g.reshape((rows,) + self.plan.rest)
        self._device = parsed.device
        self._parts.append(_timing_of(parsed))
        self._done += rows * prod(self.plan.rest)
        return self._done

    def accumulate_reply(self, response: "pb.AccumulateResponse") -> None:
        self._acc = response

    def accumulated(self, index: int) -> int:
        """Elements sent to Accumulate after chunk ``index`` (progress without a stream)."""
        assert self.plan is not None
        r1 = self.plan.bounds[index][1]
        return r1 * prod(self.plan.rest)

    def result(self) -> LossResult:
        """The assembled result once every reply has been stored."""
        out = self._outputs
        device, timing, parts = self._device, Timing.span(self._parts), tuple(self._parts)
        if self.mode in ("accumulate", "both"):
            acc = self._acc
            assert acc is not None
            loss_value = round_from_double(acc.loss, self.out_code)
            device = acc.device if self.mode == "accumulate" else device
            if self.mode == "accumulate":
                timing = Timing(queue_ns=0, compute_ns=acc.timing.compute_ns,
                                total_ns=acc.timing.total_ns)
                parts = ()
        else:
            loss_value = out["loss"]
        return LossResult(loss=loss_value, grad=out.get("grad"), grad_targets=out.get(
            "grad_targets"), device=enum_name(pb.Device, "DEVICE_", device), timing=timing,
            request_id=self.request_id, num_elements=self.total, parts=parts)


# ---------------------------------------------------------------------------------------
# Accumulate over an iterable of batches


#: Converts a batch's (logits, targets, weight, pos_weight), e.g. from torch tensors, and
#: returns them with per-argument wire dtypes.
Converter = Callable[[Any, Any, Any, Any], Tuple[Any, Any, Any, Any, Dict[str, int]]]


class AccumulateJob:
    """A dataset-level SUM or MEAN over batches from an iterable, with bounded memory.

    Batches are converted and encoded one at a time as gRPC asks for the next message;
    a batch larger than the message limit is split into chunks (rows of its leading axes).
    """

    def __init__(self, options: RequestOptions, request_id: Optional[str], limit: int,
                 chunk_bytes: Optional[int], dtype: Any, pos_weight: Any,
                 convert: Optional[Converter] = None) -> None:
        if options.reduction not in (pb.REDUCTION_MEAN, pb.REDUCTION_SUM):
            raise ValueError("reduction: accumulate supports 'mean' and 'sum', got "
                             f"{enum_name(pb.Reduction, 'REDUCTION_', options.reduction)!r}")
        if options.grad_logits or options.grad_targets:
            raise ValueError("accumulate returns no gradients")
        self.options = options
        self.request_id = request_id if request_id is not None else _new_id()
        self.limit = limit
        self.chunk_bytes = chunk_bytes
        self.dtype = dtype
        self.pos_weight = pos_weight
        self.convert = convert
        self.sent_elements = 0

    def messages_for(self, index: int, batch: Any) -> Iterator[bytes]:
        """The encoded request(s) of batch ``index`` (several when it must be split)."""
        x, y, w, p = unpack_batch(batch, index)
        if p is None:
            p = self.pos_weight
        codes: Dict[str, int] = {}
        if self.convert is not None:
            x, y, w, p, codes = self.convert(x, y, w, p)
        try:
            inputs = prepare_inputs(x, y, w, p, self.dtype, codes)
        except ValueError as exc:
            raise ValueError(f"batch {index}: {exc}") from None
        job = EvalJob(inputs, self.options, f"{self.request_id}/{index}", self.limit,
                      self.chunk_bytes)
        if job.mode == "unary":
            yield job.unary_request()
        else:
            yield from job.accumulate_requests()
        self.sent_elements += inputs.numel

    def requests(self, batches: Iterable[Any],
                 progress: Optional[Progress] = None) -> Iterator[bytes]:
        """Encoded requests for every batch, generated lazily."""
        index = -1
        for index, batch in enumerate(batches):
            yield from self.messages_for(index, batch)
            if progress is not None:
                progress(self.sent_elements, None)
        if index < 0:
            yield self.empty_request()

    def empty_request(self) -> bytes:
        """An empty batch: without one, the server cannot know the requested reduction of
        a call that has no batches (SUM of nothing is 0, MEAN NaN)."""
        empty = Operand(np.zeros(0, np.float32), pb.DTYPE_FLOAT32)
        return encode_request(f"{self.request_id}/empty", empty.wire(), empty.wire(), None,
                              None, self.options)

    @staticmethod
    def result(response: "pb.AccumulateResponse") -> AccumulateResult:
        t = response.timing
        return AccumulateResult(
            loss=response.loss, num_elements=response.num_elements,
            num_batches=response.num_batches,
            reduction=enum_name(pb.Reduction, "REDUCTION_", response.reduction),
            device=enum_name(pb.Device, "DEVICE_", response.device),
            timing=Timing(queue_ns=t.queue_ns, compute_ns=t.compute_ns, total_ns=t.total_ns))
