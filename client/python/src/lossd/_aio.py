"""The asyncio lossd client (``grpc.aio``)."""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Optional, \
    Sequence, Tuple, Union

import grpc
import numpy as np
from numpy.typing import ArrayLike

from ._client import _DOC_CLIENT_PARAMS, CudaJob, _ClientBase
from ._errors import DeadlineExceededError, InternalError, LossdError, from_rpc_error
from ._job import EvalJob, Progress
from ._progress import ProgressArg, progress_reporter
from ._proto.lossd.v1 import lossd_pb2 as pb
from ._shm import Control, ShmTransport
from ._tensor import DTypeLike
from ._torch_interop import TorchSpec
from ._types import AccumulateResult, Capabilities, DatasetResult, LossResult

__all__ = ["AsyncClient"]


class AsyncClient(_ClientBase):
    __doc__ = """An asyncio connection to a lossd server (``grpc.aio``).

    The same methods as :class:`lossd.Client`, as coroutines. Create it inside a running
    event loop and use it with ``async with`` (or ``await client.close()``).

    Parameters
    ----------""" + _DOC_CLIENT_PARAMS + """
    Examples
    --------
    >>> async with lossd.AsyncClient("127.0.0.1:50051") as client:     # doctest: +SKIP
    ...     r = await client.bce_with_logits(logits, targets, reduction="none", grad=True)
    """

    _grpc = grpc.aio
    #: The synchronous channel of the SharedMemory calls, opened on first use (_control).
    _sync_channel: Optional[grpc.Channel] = None

    async def close(self) -> None:
        """Close the channel (cancelling calls in progress), after unregistering and
        unlinking the shared memory, if any."""
        with self._shm_lock:
            self._shm_decided = True
            shm = self._shm
        if shm is not None:
            await asyncio.get_running_loop().run_in_executor(None, shm.close)
        await asyncio.get_running_loop().run_in_executor(None, self._cuda.close)
        if self._sync_channel is not None:
            self._sync_channel.close()
            self._sync_channel = None
        await self._channel.close(None)

    def _control(self) -> Any:
        """A synchronous channel for the SharedMemory calls (registration and the lease
        renewals of a daemon thread, which cannot use the event loop's channel)."""
        if self._sync_channel is None:
            self._sync_channel = self._spec.open(grpc)
        return self._sync_channel

    def _cuda_control(self) -> Control:
        """The SharedMemory calls of the CUDA IPC path, on the synchronous channel."""
        if self._cuda_control_obj is None:
            self._cuda_control_obj = Control(self._control(), self._metadata)
        return self._cuda_control_obj

    async def _ashm_probe(self) -> None:
        if not self._shm_decided:
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: self._shm_probe(self._control()))

    @property
    def shared_memory(self) -> Optional[bool]:
        """True when evaluations pass tensors through shared memory; None until the first
        evaluation (or :meth:`empty`) decided it."""
        return (self._shm is not None) if self._shm_decided else None

    async def empty(self, shape: Any, dtype: Any = np.float32) -> np.ndarray:
        """A new array, in shared memory when the client uses it; see
        :meth:`lossd.Client.empty`."""
        await self._ashm_probe()
        if self._shm is None:
            return np.empty(shape, dtype)
        return self._shm.empty(shape, dtype)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"lossd.AsyncClient({self._target!r})"

    async def bce_with_logits(
        self,
        logits: ArrayLike,
        targets: ArrayLike,
        *,
        weight: Optional[ArrayLike] = None,
        pos_weight: Optional[ArrayLike] = None,
        reduction: str = "mean",
        grad: bool = False,
        grad_targets: bool = False,
        ignore_index: Optional[int] = None,
        normalize: bool = False,
        label_smoothing: float = 0.0,
        device: str = "auto",
        reject_nan: bool = False,
        request_id: Optional[str] = None,
        timeout: Optional[float] = None,
        dtype: Optional[DTypeLike] = None,
        progress: ProgressArg = None,
    ) -> LossResult:
        """Binary cross-entropy with logits; see :meth:`lossd.Client.bce_with_logits`."""
        job, spec = self._job("bce", logits, targets, weight, pos_weight, dtype, request_id,
                              reduction=reduction, grad=grad, grad_targets=grad_targets,
                              device=device, reject_nan=reject_nan, ignore_index=ignore_index,
                              normalize=normalize, label_smoothing=label_smoothing)
        return await self._run_job(job, spec, timeout, progress)

    async def sigmoid_focal_loss(
        self,
        logits: ArrayLike,
        targets: ArrayLike,
        *,
        alpha: Optional[float] = 0.25,
        gamma: float = 2.0,
        weight: Optional[ArrayLike] = None,
        reduction: str = "none",
        grad: bool = False,
        device: str = "auto",
        reject_nan: bool = False,
        request_id: Optional[str] = None,
        timeout: Optional[float] = None,
        dtype: Optional[DTypeLike] = None,
        progress: ProgressArg = None,
    ) -> LossResult:
        """torchvision's sigmoid focal loss; see :meth:`lossd.Client.sigmoid_focal_loss`."""
        job, spec = self._job("focal", logits, targets, weight, None, dtype, request_id,
                              reduction=reduction, grad=grad, grad_targets=False,
                              device=device, reject_nan=reject_nan, alpha=alpha, gamma=gamma)
        return await self._run_job(job, spec, timeout, progress)

    async def accumulate(
        self,
        batches: Union[Iterable[Any], AsyncIterable[Any]],
        *,
        loss: str = "bce_with_logits",
        reduction: str = "mean",
        pos_weight: Optional[ArrayLike] = None,
        ignore_index: Optional[int] = None,
        normalize: bool = False,
        label_smoothing: float = 0.0,
        alpha: Optional[float] = 0.25,
        gamma: float = 2.0,
        device: str = "auto",
        reject_nan: bool = False,
        request_id: Optional[str] = None,
        timeout: Optional[float] = None,
        dtype: Optional[DTypeLike] = None,
        progress: ProgressArg = None,
    ) -> AccumulateResult:
        """Dataset-level SUM or MEAN over batches; see :meth:`lossd.Client.accumulate`.

        ``batches`` may also be an async iterable. A ``progress`` callable is called in the
        event loop.
        """
        job = self._accumulate_job(loss, reduction, device, reject_nan, ignore_index, normalize,
                                   label_smoothing, alpha, gamma, pos_weight, dtype, request_id)
        with progress_reporter(progress) as report:
            async def messages() -> Any:
                if hasattr(batches, "__aiter__"):
                    index = 0
                    async for batch in batches:  # type: ignore[union-attr]
                        for message in job.messages_for(index, batch):
                            yield message
                        index += 1
                        if report is not None:
                            report(job.sent_elements, None)
                    if index == 0:
                        yield job.empty_request()
                else:
                    for message in job.requests(batches, report):  # type: ignore[arg-type]
                        yield message

            return job.result(await self._run_accumulate(messages(), timeout))

    async def evaluate_dataset(
        self,
        data: Any,
        targets: Any = None,
        weight: Any = None,
        *,
        loss: str = "bce_with_logits",
        reduction: str = "mean",
        pos_weight: Optional[ArrayLike] = None,
        ignore_index: Optional[int] = None,
        normalize: bool = False,
        label_smoothing: float = 0.0,
        alpha: Optional[float] = 0.25,
        gamma: float = 2.0,
        device: str = "auto",
        reject_nan: bool = False,
        request_id: Optional[str] = None,
        timeout: Optional[float] = None,
        dtype: Optional[DTypeLike] = None,
        batch_rows: Optional[int] = None,
        replicas: Optional[Sequence[str]] = None,
        checkpoint_batches: int = 8,
        queue_depth: int = 1,
        progress: ProgressArg = None,
    ) -> DatasetResult:
        """The exact SUM or MEAN over a dataset spread over every replica; see
        :meth:`lossd.Client.evaluate_dataset` (the same arguments, plan and result).

        The run is the synchronous client's: one thread per replica, driven from a worker
        thread, so the event loop is never blocked. ``data`` may also be an async iterable of
        batches, read in the event loop. A ``progress`` callable is called in the event loop.
        Cancelling the coroutine cancels the calls in flight.
        """
        loop = asyncio.get_running_loop()
        if hasattr(data, "__aiter__"):
            data = _AsyncBatches(data, loop)
        with progress_reporter(progress) as bar:
            report: Optional[Progress] = bar
            if callable(progress) and not isinstance(progress, bool):
                report = _in_loop(loop, progress)
            run, batches, total = self._dataset_run(
                data, targets, weight, batch_rows, replicas, checkpoint_batches, queue_depth,
                timeout, report, loss, reduction, device, reject_nan, ignore_index, normalize,
                label_smoothing, alpha, gamma, pos_weight, dtype, request_id)
            future = loop.run_in_executor(None, run.run, batches, total)
            try:
                return await asyncio.shield(future)
            except asyncio.CancelledError:
                run.cancel()
                if isinstance(data, _AsyncBatches):
                    data.cancel()
                raise

    # -- transport ------------------------------------------------------------------------

    async def _run_job(self, job: Any, spec: Optional[TorchSpec], timeout: Optional[float],
                       progress: ProgressArg) -> LossResult:
        """Evaluates ``job``: CUDA IPC and shared memory are decided here, once _job
        validated the arguments."""
        if isinstance(job, CudaJob):
            result = await self._run_cuda(job, timeout)
            if result is not None:
                return self._cuda_done(result, progress)
            job, spec = self._cuda_fallback(job)
        await self._ashm_probe()
        with progress_reporter(progress, auto=False) as report:
            return self._finish(job, await self._run(self._shm_job(job), timeout, report),
                                spec)

    async def _run_cuda(self, job: CudaJob, timeout: Optional[float]) -> Optional[LossResult]:
        """The evaluation through CUDA IPC; None when it takes the host path. The call is
        prepared in the caller's thread, whose current CUDA stream is the one to wait for;
        only the first decision's capabilities call runs in the executor (a new block's
        registration is a short call to the local server, made in place)."""
        cuda = self._cuda
        if cuda.needs_capabilities(job.values[0]):
            await asyncio.get_running_loop().run_in_executor(None, cuda.fetch_capabilities)
        for attempt in (0, 1):
            call = cuda.call(job.values, job.request, job.request_id, job.dtype is not None)
            if call is None:
                return None
            try:
                raw = await self._evaluate(call.request, **self._call_kwargs(timeout))
            except grpc.RpcError as exc:
                self._cuda_retry(job, call, exc, attempt)
                continue
            except BaseException:  # asyncio.CancelledError: the request may be on its way
                self._cuda.abandon(call)
                raise
            return call.result(raw)
        raise AssertionError("unreachable")

    async def _run_shm(self, shm: ShmTransport, job: EvalJob, timeout: Optional[float],
                       progress: Optional[Progress]) -> LossResult:
        for attempt in (0, 1):
            call = shm.call(job)
            try:
                raw = await self._evaluate(call.request, **self._call_kwargs(timeout))
            except BaseException as exc:
                if not self._shm_retry(call, exc, attempt, job):
                    raise
                await asyncio.get_running_loop().run_in_executor(None, shm.arena.renew)
                continue
            return self._evaluated(job, call.result(raw), progress)
        raise AssertionError("unreachable")

    async def _run(self, job: EvalJob, timeout: Optional[float],
                   progress: Optional[Progress]) -> LossResult:
        shm = self._shm
        if shm is not None and job.mode == "unary":
            return await self._run_shm(shm, job, timeout, progress)
        if job.mode == "unary":
            try:
                raw = await self._evaluate(job.unary_request(), **self._call_kwargs(timeout))
            except grpc.RpcError as exc:
                raise self._evaluate_error(exc, job) from None
            return self._evaluated(job, job.unary_result(raw), progress)
        if job.uses_whole:
            if self._server_capabilities is None:
                self._server_capabilities = await self.capabilities(timeout=timeout)
            self._require_whole_requests(self._server_capabilities, job)
        if job.mode == "accumulate":
            job.accumulate_reply(await self._run_accumulate(
                _aiter(self._accumulate_mode_requests(job, progress)), timeout))
            return job.result()
        if job.runs_accumulate and job.needs_kept:
            # The kept count goes into every chunk: the Accumulate call comes first.
            job.accumulate_reply(await self._run_accumulate(
                _aiter(job.accumulate_requests()), timeout))
        stream = self._run_stream(job.stream_requests(), job.chunks,
                                  self._reply_handler(job, progress), timeout)
        if job.runs_accumulate and not job.needs_kept:
            acc = asyncio.ensure_future(self._run_accumulate(
                _aiter(job.accumulate_requests()), timeout))
            try:
                await stream
                job.accumulate_reply(await acc)
            finally:
                await _settle(acc)
        else:
            await stream
        return job.result()

    async def _run_stream(self, requests: Iterator[bytes], expected: int,
                          on_reply: Callable[[int, bytes], None],
                          timeout: Optional[float]) -> None:
        """Sends ``requests`` on one EvaluateStream with at most ``stream_window`` chunks in
        flight, calling ``on_reply(index, raw)`` for each reply in order."""
        kwargs = self._call_kwargs(timeout)
        started = time.monotonic()
        call = self._stream(**kwargs)
        window = asyncio.Semaphore(self._window)

        async def writer() -> None:
            for message in requests:
                await window.acquire()
                await call.write(message)
            await call.done_writing()

        writing = asyncio.ensure_future(writer())
        try:
            for index in range(expected):
                raw = await _unless_writer_fails(asyncio.ensure_future(call.read()), writing)
                if raw is grpc.aio.EOF:  # type: ignore[attr-defined]
                    code = await call.code()
                    if code != grpc.StatusCode.OK:
                        raise from_rpc_error(_AioStatus(code, await call.details()))
                    raise InternalError(grpc.StatusCode.INTERNAL,
                                        f"client: {index} stream replies for {expected} chunks")
                window.release()
                on_reply(index, raw)
            await writing
        except grpc.RpcError as exc:
            raise _converted(exc, started, kwargs["timeout"]) from None
        finally:
            call.cancel()
            await _settle(writing)

    async def _run_accumulate(self, requests: Any,
                              timeout: Optional[float]) -> "pb.AccumulateResponse":
        kwargs = self._call_kwargs(timeout)
        started = time.monotonic()
        call = self._accumulate(**kwargs)

        async def writer() -> None:
            async for message in requests:
                await call.write(message)
            await call.done_writing()

        async def reply() -> Any:
            return await call

        writing = asyncio.ensure_future(writer())
        try:
            response = await _unless_writer_fails(asyncio.ensure_future(reply()), writing)
            await writing
            return response
        except grpc.RpcError as exc:
            raise _converted(exc, started, kwargs["timeout"]) from None
        finally:
            if not call.done():
                call.cancel()
            await _settle(writing)

    # -- service information --------------------------------------------------------------

    async def capabilities(self, *, timeout: Optional[float] = None) -> Capabilities:
        """What the server supports and its limits; see :meth:`lossd.Client.capabilities`."""
        try:
            c = await self._get_capabilities(pb.GetCapabilitiesRequest(),
                                             **self._call_kwargs(timeout))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return self._capabilities(c)

    async def health(self, service: str = "", *, timeout: Optional[float] = None) -> str:
        """``grpc.health.v1.Health/Check``; see :meth:`lossd.Client.health`."""
        try:
            reply = await self._health(self._health_request(service),
                                       **self._call_kwargs(timeout))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return self._health_status(reply)


async def _aiter(items: Iterable[Any]) -> AsyncIterator[Any]:
    """``items`` as an async iterable (each item taken when the consumer asks for it)."""
    for item in items:
        yield item


async def _unless_writer_fails(task: "asyncio.Future[Any]", writing: "asyncio.Future[None]"
                               ) -> Any:
    """Awaits ``task``, unless the request writer fails first with an exception of its own
    (a bad batch, say): that exception is raised instead (the server would otherwise wait
    for the rest of the requests until the deadline)."""
    try:
        if not writing.done():
            await asyncio.wait({task, writing}, return_when=asyncio.FIRST_COMPLETED)
        if writing.done() and not writing.cancelled():
            exc = writing.exception()
            if exc is not None and not isinstance(exc, grpc.RpcError):
                raise exc
        return await task
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def _converted(exc: grpc.RpcError, started: float, timeout: Optional[float]) -> LossdError:
    """The LossdError of a failed streaming call.

    When a call's deadline expires while a message is being sent, grpc.aio replaces the
    DEADLINE_EXCEEDED status by INTERNAL "Internal error from Core"; that case is reported
    as the deadline it is.
    """
    err = from_rpc_error(exc)
    if err.code == grpc.StatusCode.INTERNAL and timeout is not None and \
            time.monotonic() - started >= timeout:
        return DeadlineExceededError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
    return err


async def _settle(task: "asyncio.Future[Any]") -> None:
    """Cancels a helper task if it still runs and consumes its outcome."""
    if not task.done():
        task.cancel()
    await asyncio.gather(task, return_exceptions=True)


class _AioStatus(grpc.RpcError):
    """A finished call's status as an error (for a stream that ended early)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def _in_loop(loop: asyncio.AbstractEventLoop, callback: Progress) -> Progress:
    """``callback`` called in the event loop, from any thread."""
    def call(done: int, total: Optional[int]) -> None:
        loop.call_soon_threadsafe(callback, done, total)
    return call


class _AsyncBatches:
    """An async iterable of batches read from a worker thread: each item is awaited in the
    event loop (the loop keeps running while evaluate_dataset waits for the run)."""

    def __init__(self, source: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._iterator = source.__aiter__()
        self._loop = loop
        self._cancelled = False

    def cancel(self) -> None:
        self._cancelled = True

    def __iter__(self) -> Iterator[Any]:
        while not self._cancelled:
            future = asyncio.run_coroutine_threadsafe(self._next(), self._loop)
            done, item = future.result()
            if done:
                return
            yield item

    async def _next(self) -> Tuple[bool, Any]:
        try:
            return False, await self._iterator.__anext__()
        except StopAsyncIteration:
            return True, None
