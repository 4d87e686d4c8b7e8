"""Closed-loop load from Python clients, one process per concurrent caller.

A ``LoadPool`` keeps worker processes (multiprocessing, spawn) alive across measurements: each
holds its clients (a ``lossd.Client``, or a grpcio channel with bytes in and out for the echo
and raw baselines) and the current request size's payload, and makes one untimed warm-up call
the first time it uses a client on a size. A measurement (``run``) starts its callers at one
instant, each calls back to back until the end instant (and at least ``min_calls`` times), and
reports every call's latency and when its last call ended.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from .payload import Payload
from .servers import CHANNEL_OPTIONS
from .stats import percentile

CALL_TIMEOUT_S = 600.0
RAW_METHOD = "/lossd.bench.v1.Raw/Call"  # a raw (ByteBuffer) unary callback method
ECHO_METHOD = "/lossd.bench.v1.Echo/Echo"
LOSSD_METHOD = "/lossd.v1.LossService/Evaluate"
REPLY_BYTES_KEY = "x-reply-bytes"


@dataclass(frozen=True)
class CallSpec:
    """What one caller calls.

    kind: "lossd" (lossd.Client.bce_with_logits, reduction none, grad), "echo", "raw" or
    "lossd-wire" (grpcio, the payload's request bytes; lossd-wire calls lossd's Evaluate with
    the very bytes echo gets, so lossd-wire against echo compares the servers alone). client_kwargs: extra lossd.Client keyword arguments
    as (name, value) pairs. reply_bytes: the raw reply's size.
    """

    kind: str
    target: str
    elements: int
    reply_bytes: int = 0
    client_kwargs: Tuple[Tuple[str, Any], ...] = ()

    def client_key(self) -> tuple:
        return (self.kind, self.target, self.client_kwargs)


@dataclass
class CellResult:
    """One measurement: ``concurrency`` callers for about ``seconds``."""

    spec: CallSpec
    concurrency: int
    calls: int = 0
    wall_s: float = 0.0
    latencies_s: List[float] = field(default_factory=list)
    errors: int = 0
    error: Optional[str] = None

    @property
    def calls_per_s(self) -> float:
        return self.calls / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def elements_per_s(self) -> float:
        return self.calls_per_s * self.spec.elements

    @property
    def p50_us(self) -> float:
        return percentile(self.latencies_s, 50) * 1e6 if self.latencies_s else float("nan")


# ---- worker side ----

def _make_client(spec: CallSpec) -> Tuple[Callable[[Payload, CallSpec], Any], Callable[[], None]]:
    """(call(payload, spec), close) for spec's kind and target."""
    if spec.kind == "lossd":
        import lossd

        kwargs = dict(spec.client_kwargs)
        client = lossd.Client(spec.target, **kwargs)
        placed: Dict[int, Tuple[Any, Any]] = {}

        def inputs(p: Payload) -> Tuple[Any, Any]:
            # Through shared memory the inputs are arrays placed in the client's region
            # (client.empty), filled once: what a co-located user does to send no byte twice.
            if kwargs.get("shared_memory") != "on":
                return p.x, p.y
            if p.elements not in placed:
                placed.clear()
                x, y = client.empty(p.x.shape, p.x.dtype), client.empty(p.y.shape, p.y.dtype)
                x[...] = p.x
                y[...] = p.y
                placed[p.elements] = (x, y)
            return placed[p.elements]

        def call_lossd(p: Payload, s: CallSpec) -> Any:
            x, y = inputs(p)
            return client.bce_with_logits(x, y, reduction="none", grad=True)

        return call_lossd, client.close
    import grpc

    channel = grpc.insecure_channel(spec.target, options=CHANNEL_OPTIONS)
    if spec.kind == "echo":
        echo = channel.unary_unary(ECHO_METHOD)

        def call_echo(p: Payload, s: CallSpec) -> Any:
            return echo(p.request, timeout=CALL_TIMEOUT_S)

        return call_echo, channel.close
    if spec.kind == "lossd-wire":
        evaluate = channel.unary_unary(LOSSD_METHOD)

        def call_wire(p: Payload, s: CallSpec) -> Any:
            return evaluate(p.request, timeout=CALL_TIMEOUT_S)

        return call_wire, channel.close
    if spec.kind == "raw":
        raw = channel.unary_unary(RAW_METHOD)

        def call_raw(p: Payload, s: CallSpec) -> Any:
            return raw(p.request, timeout=CALL_TIMEOUT_S,
                       metadata=((REPLY_BYTES_KEY, str(s.reply_bytes)),))

        return call_raw, channel.close
    raise ValueError(f"unknown call kind {spec.kind!r}")


def _check_warmup(spec: CallSpec, reply: Any) -> None:
    if spec.kind == "lossd":
        if getattr(reply, "grad", None) is None or reply.loss.size != spec.elements:
            raise RuntimeError("lossd reply without the loss and dl/dx asked for")
    elif spec.kind == "lossd-wire" and abs(len(reply) - spec.reply_bytes) > 64:
        # The timing fields are varints: a reply's size varies by a few bytes between calls.
        raise RuntimeError(f"lossd reply has {len(reply)} bytes, expected about "
                           f"{spec.reply_bytes}")
    elif spec.kind == "raw" and len(reply) != spec.reply_bytes:
        raise RuntimeError(f"raw reply has {len(reply)} bytes, asked for {spec.reply_bytes}")


def _worker_main(conn: Any, cpus: Optional[Set[int]]) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)
    payload: Optional[Payload] = None
    clients: Dict[tuple, Tuple[Callable, Callable]] = {}
    warmed: Set[tuple] = set()
    spec: Optional[CallSpec] = None
    call: Optional[Callable] = None
    while True:
        msg = conn.recv()
        op = msg[0]
        if op == "stop":
            for _, close in clients.values():
                close()
            conn.send(("stopped",))
            return
        if op == "prepare":
            spec = msg[1]
            try:
                if payload is None or payload.elements != spec.elements:
                    payload = None
                    gc.collect()
                    payload = Payload(spec.elements)
                key = spec.client_key()
                if key not in clients:
                    clients[key] = _make_client(spec)
                call = clients[key][0]
                if (key, spec.elements, spec.reply_bytes) not in warmed:
                    _check_warmup(spec, call(payload, spec))
                    warmed.add((key, spec.elements, spec.reply_bytes))
                conn.send(("ready", None))
            except Exception as e:  # reported, the measurement is skipped
                call = None
                conn.send(("ready", f"{type(e).__name__}: {str(e)[:500]}"))
        elif op == "go":
            t_start, t_end, min_calls = msg[1], msg[2], msg[3]
            lat: List[float] = []
            errors, error, last_end = 0, None, t_start
            delay = t_start - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            while call is not None and payload is not None:
                if time.monotonic() >= t_end and len(lat) >= min_calls:
                    break
                t0 = time.monotonic()
                try:
                    call(payload, spec)
                except Exception as e:
                    errors += 1
                    error = f"{type(e).__name__}: {str(e)[:500]}"
                    if errors >= 3:
                        break
                    continue
                last_end = time.monotonic()
                lat.append(last_end - t0)
            conn.send(("done", lat, last_end, errors, error))


# ---- coordinator side ----

class LoadPool:
    """Worker processes pinned to ``cpus`` (None: all), started as needed and reused."""

    def __init__(self, cpus: Optional[Set[int]] = None) -> None:
        self._ctx = mp.get_context("spawn")
        self._cpus = set(cpus) if cpus else None
        self._workers: List[Tuple[Any, Any]] = []  # (process, connection)

    def ensure(self, n: int) -> None:
        while len(self._workers) < n:
            parent, child = self._ctx.Pipe()
            proc = self._ctx.Process(target=_worker_main, args=(child, self._cpus), daemon=True)
            proc.start()
            child.close()
            self._workers.append((proc, parent))

    def run(self, spec: CallSpec, concurrency: int, seconds: float,
            min_calls: int = 1) -> CellResult:
        self.ensure(concurrency)
        conns = [c for _, c in self._workers[:concurrency]]
        for c in conns:
            c.send(("prepare", spec))
        result = CellResult(spec, concurrency)
        errors = [r[1] for r in (c.recv() for c in conns) if r[1]]
        if errors:
            result.error = errors[0]
            result.errors = len(errors)
            return result
        t_start = time.monotonic() + 0.05
        t_end = t_start + seconds
        for c in conns:
            c.send(("go", t_start, t_end, min_calls))
        last = t_start
        for c in conns:
            _, lat, last_end, errs, err = c.recv()
            result.latencies_s.extend(lat)
            result.calls += len(lat)
            result.errors += errs
            result.error = result.error or err
            last = max(last, last_end)
        result.wall_s = last - t_start
        return result

    def close(self) -> None:
        for proc, conn in self._workers:
            try:
                conn.send(("stop",))
                if conn.poll(10):
                    conn.recv()
            except (OSError, EOFError, BrokenPipeError):
                pass
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        self._workers.clear()
