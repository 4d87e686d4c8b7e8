#!/usr/bin/env python3
"""Soak test for a lossd server: memory (RSS) and status codes under a long, steady load.

An operator's check before a release, not a CI test. It runs two phases against one server:

1. **Find the maximum QPS.** A closed loop (``--concurrency`` calls in flight, 16 by default)
   sends a fixed mix of Evaluate requests for ``--phase1-duration`` seconds (20 by default;
   the first ``--warmup`` seconds are not measured) and measures the calls completed per
   second: the server's maximum rate for this mix at that concurrency.
2. **Soak.** An open loop sends the same mix at ``--rate-fraction`` (0.8) of that rate for
   ``--duration`` seconds (600 by default), at fixed times whatever the replies do. Every
   result is counted by kind and gRPC status code, the server's RSS (VmRSS of
   /proc/PID/status) is sampled at the start, in the middle, at the end and every
   ``--rss-interval`` seconds, and the latency of the good calls is recorded.

The mix (float32, BCE with logits, reduction mean, dl/dlogits requested):

* 90 % good requests: 90 % of them 1k elements (shape [16,64]), 10 % 1M elements
  (shape [16384,64]); each must get OK. Every ``--verify-every``-th reply of a kind is
  decoded and compared with the first reply of that kind (same bits: the server is
  deterministic), and its shapes are checked.
* 10 % bad requests (``--bad-fraction``): targets shape [16,63] for logits [16,64]; logits data
  4 bytes short; a weight of shape [63] that does not broadcast to [16,64]; and (1 in 10 of the
  bad ones) a 1M-element request whose targets have shape [16384,63]. Each must get
  INVALID_ARGUMENT.

Any other outcome (another code, a wrong reply, a send that could not be made because
``--max-in-flight`` calls were pending, a server that exited) is an unexpected error.

Verdict: RSS is flat when ``end <= middle * (1 + --rss-growth) + --rss-slack-mib`` (defaults
0.10 and 16 MiB; MiB = 2^20 bytes), i.e. the second half of the soak may grow by at most 10 %
plus 16 MiB (the first half absorbs allocator and buffer warm-up). The exit status is 0 when
RSS is flat (or cannot be measured: ``--target`` without ``--pid``) and there was no
unexpected error, 1 when either check failed or the run was interrupted, and 2 when the soak
could not start (bad arguments, a refused target, a server that does not start).

By default the script starts its own server (``--binary``, else $LOSSD_BINARY, else
build/server/lossd of this repository) on 127.0.0.1 with port 0 and stops it at exit (SIGTERM,
then SIGKILL), also on Ctrl-C or an error. With ``--target HOST:PORT`` it uses a running server
instead; only loopback addresses (127.0.0.0/8, ::1, localhost) are accepted, and the server's
RSS is only read when ``--pid`` names its process.

Usage::

    .venv/bin/python scripts/soak.py                        # own server, 20 s + 10 min
    .venv/bin/python scripts/soak.py --duration 60 --phase1-duration 10   # a quick try
    .venv/bin/python scripts/soak.py --device cpu --server-arg=--workers=4 --json soak.json
    .venv/bin/python scripts/soak.py --target 127.0.0.1:50051 --pid "$(pidof lossd)"
    .venv/bin/python scripts/soak.py --qps 900              # skip phase 1, soak at 0.8 * 900/s

See docs/soak.md for what the report says.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ipaddress
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
try:
    from lossd._proto.lossd.v1 import lossd_pb2 as pb
except ImportError:  # not installed: use the package's sources in this repository
    sys.path.insert(0, str(REPO_ROOT / "client" / "python" / "src"))
    from lossd._proto.lossd.v1 import lossd_pb2 as pb

EVALUATE = "/lossd.v1.LossService/Evaluate"
GET_CAPABILITIES = "/lossd.v1.LossService/GetCapabilities"
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
SMALL_SHAPE = (16, 64)      # 1,024 elements
LARGE_SHAPE = (16384, 64)   # 1,048,576 elements
SERVER_DRAIN_S = 5.0        # --drain_timeout of a server started here
SERVER_STOP_GRACE_S = 20.0  # extra wait after the drain before SIGKILL
SEND_GRACE_S = 0.5          # phase 2: sends due before the end may go out this late
MIB = 1024 * 1024

# Outcomes that are not gRPC status codes.
WRONG_RESULT = "WRONG_RESULT"            # OK, but the reply's shapes or bits are wrong
SKIPPED = "SKIPPED_MAX_IN_FLIGHT"        # open loop: not sent, --max-in-flight calls pending
UNFINISHED = "UNFINISHED"                # still pending after the final wait


class SetupError(Exception):
    """The soak cannot start (exit status 2)."""


# --------------------------------------------------------------------------------------------
# Requests


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


# --------------------------------------------------------------------------------------------
# Results


def percentile_ms(values: array, q: float) -> float | None:
    if len(values) == 0:
        return None
    return float(np.percentile(np.frombuffer(values, dtype=np.float64), q) * 1e3)


@dataclass
class Tally:
    """Results of one phase: counts by (kind, outcome), latencies of good OK calls."""

    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    good: dict[str, bool] = field(default_factory=dict)
    latency_s: dict[str, array] = field(default_factory=dict)
    examples: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def record(self, kind: Kind, code: str, latency_s: float | None, detail: str = "") -> None:
        key = (kind.name, code)
        self.counts[key] = self.counts.get(key, 0) + 1
        self.good[kind.name] = kind.good
        if code != kind.expected:
            examples = self.examples.setdefault(key, [])
            if len(examples) < 3 and detail not in examples:
                examples.append(detail)
        elif kind.good and latency_s is not None:
            self.latency_s.setdefault(kind.name, array("d")).append(latency_s)

    def total(self) -> int:
        return sum(self.counts.values())

    def unexpected(self) -> int:
        return sum(n for (name, code), n in self.counts.items()
                   if code != ("OK" if self.good[name] else "INVALID_ARGUMENT"))

    def by_class(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {"good": {}, "bad": {}}
        for (name, code), n in self.counts.items():
            group = out["good" if self.good[name] else "bad"]
            group[code] = group.get(code, 0) + n
        return out

    def latency(self) -> dict[str, dict[str, float | int | None]]:
        out: dict[str, dict[str, float | int | None]] = {}
        everything = array("d")
        for name in sorted(self.latency_s):
            values = self.latency_s[name]
            everything.extend(values)
            out[name] = {"n": len(values), "p50_ms": percentile_ms(values, 50),
                         "p99_ms": percentile_ms(values, 99)}
        out["all_good"] = {"n": len(everything), "p50_ms": percentile_ms(everything, 50),
                           "p99_ms": percentile_ms(everything, 99)}
        return out

    def to_json(self) -> dict[str, Any]:
        rows = [{"kind": name, "class": "good" if self.good[name] else "bad",
                 "expected": "OK" if self.good[name] else "INVALID_ARGUMENT",
                 "code": code, "count": n}
                for (name, code), n in sorted(self.counts.items())]
        unexpected = [{"kind": name, "code": code, "count": self.counts[(name, code)],
                       "examples": ex}
                      for (name, code), ex in sorted(self.examples.items())]
        return {"total": self.total(), "unexpected": self.unexpected(), "counts": rows,
                "by_class": self.by_class(), "unexpected_detail": unexpected,
                "latency": self.latency()}


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


# --------------------------------------------------------------------------------------------
# Server process, RSS, metrics


def read_rss_kib(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) in KiB from /proc/PID/status, or None."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    if "VmRSS" not in values:
        return None
    return values["VmRSS"], values.get("VmHWM", values["VmRSS"])


def _die_with_parent() -> None:
    """In the child: SIGKILL when this script dies (PR_SET_PDEATHSIG), whatever happens."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except Exception:  # noqa: BLE001 - best effort
        pass


class OwnServer:
    """A lossd started by this script on 127.0.0.1:0; always stopped by stop()."""

    def __init__(self, binary: Path, device: str, extra_args: list[str], log_path: Path):
        self.binary = binary
        self.args = [str(binary), "--host=127.0.0.1", "--port=0", f"--device={device}",
                     "--metrics_host=127.0.0.1", "--metrics_port=0",
                     f"--drain_timeout={SERVER_DRAIN_S:g}s", *extra_args]
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.metrics_port = 0
        self.exit_code: int | None = None

    def start(self, timeout_s: float = 30.0) -> None:
        if not self.binary.is_file() or not os.access(self.binary, os.X_OK):
            raise SetupError(f"no lossd executable at {self.binary} (give --binary or set "
                             "LOSSD_BINARY)")
        with open(self.log_path, "wb") as log:
            # Own session: a Ctrl-C in the terminal reaches this script only, which then stops
            # the server itself.
            self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, start_new_session=True,
                                         preexec_fn=_die_with_parent)
        listening = re.compile(r"^lossd listening on (\S+):(\d+)\s*$", re.M)
        metrics = re.compile(r"^lossd metrics on (\S+):(\d+)\s*$", re.M)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            if m := listening.search(text):
                self.port = int(m.group(2))
                if mm := metrics.search(text):
                    self.metrics_port = int(mm.group(2))
                return
            if self.proc.poll() is not None:
                raise SetupError(f"lossd exited with status {self.proc.returncode} during "
                                 f"startup:\n{self.log_tail()}")
            time.sleep(0.05)
        raise SetupError(f"lossd did not print its port within {timeout_s:g} s:\n"
                         f"{self.log_tail()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM (the server drains), then SIGKILL if it is still running after the drain
        timeout and SERVER_STOP_GRACE_S more."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            log(f"stopping the server (SIGTERM to pid {self.proc.pid})")
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=SERVER_DRAIN_S + SERVER_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            finally:
                if self.proc.poll() is None:  # interrupted while waiting
                    self.proc.kill()
                    self.proc.wait()
        self.exit_code = self.proc.returncode


def scrape_metrics(port: int) -> dict[str, Any] | None:
    """Evaluate calls by code and the in-flight/queue gauges from the server's /metrics."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode("utf-8", "replace")
    except OSError:
        return None
    calls: dict[str, int] = {}
    gauges: dict[str, float] = {}
    sample = re.compile(r"^(lossd_[a-z_]+)(?:\{([^}]*)\})?\s+(\S+)$")
    for line in text.splitlines():
        m = sample.match(line)
        if not m:
            continue
        name, labels_text, value = m.groups()
        labels = dict(re.findall(r'(\w+)="([^"]*)"', labels_text or ""))
        if name == "lossd_requests_total" and labels.get("method") == "Evaluate":
            code = labels.get("code", "?")
            calls[code] = calls.get(code, 0) + int(float(value))
        elif name in ("lossd_in_flight_calls", "lossd_queued_requests"):
            gauges[name] = float(value)
    return {"evaluate_calls": calls, **gauges}


def loopback_target(text: str) -> str:
    """HOST:PORT with a loopback host, as a gRPC target; anything else raises SetupError."""
    if "://" in text or "/" in text or text.count(":") == 0:
        raise SetupError(f"--target must be HOST:PORT, got {text!r}")
    host, _, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise SetupError(f"--target {text!r}: bad port {port_text!r}") from None
    if not 0 < port < 65536:
        raise SetupError(f"--target {text!r}: port out of range")
    if host.lower() == "localhost":
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as e:
            raise SetupError(f"--target {text!r}: cannot resolve localhost: {e}") from None
        addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
        if not addresses or not all(a.is_loopback for a in addresses):
            raise SetupError(f"--target {text!r}: localhost resolves to a non-loopback "
                             f"address ({', '.join(map(str, addresses))}); refused")
        address = addresses[0]
    else:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise SetupError(f"--target {text!r}: only loopback addresses (127.0.0.0/8, ::1, "
                             "localhost) may be targeted") from None
        mapped = getattr(address, "ipv4_mapped", None)
        if not (address.is_loopback or (mapped is not None and mapped.is_loopback)):
            raise SetupError(f"--target {text!r}: {address} is not a loopback address; "
                             "refused")
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


# --------------------------------------------------------------------------------------------
# The soak


@dataclass
class RssSample:
    t_s: float
    rss_kib: int
    hwm_kib: int
    label: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"t_s": round(self.t_s, 3), "label": self.label,
                "rss_mib": round(self.rss_kib / 1024, 2), "hwm_mib": round(self.hwm_kib / 1024, 2)}


@dataclass
class State:
    """Everything the report needs; filled as the phases run (a partial run stays readable)."""

    args: argparse.Namespace
    target: str = ""
    pid: int | None = None
    own_server: OwnServer | None = None
    kinds: list[Kind] = field(default_factory=list)
    capabilities: dict[str, Any] = field(default_factory=dict)
    precheck: dict[str, dict[str, str]] = field(default_factory=dict)
    precheck_ok: bool | None = None
    phase1: Tally | None = None
    phase1_qps: float | None = None
    phase1_window_s: float = 0.0
    phase1_kind_rates: dict[str, float] = field(default_factory=dict)
    rate: float | None = None
    phase2: Tally | None = None
    phase2_started: float | None = None   # time.monotonic() at the first send
    phase2_due: int = 0                   # sends due by the end of the window
    phase2_sent: int = 0
    phase2_window_s: float = 0.0
    phase2_lag_ms: dict[str, float | None] = field(default_factory=dict)
    phase2_max_in_flight: int = 0
    rss: list[RssSample] = field(default_factory=list)
    metrics_before: dict[str, Any] | None = None
    metrics_after: dict[str, Any] | None = None
    server_exited_during_run: str | None = None
    interrupted: bool = False
    verifier: Verifier | None = None


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Soak:
    def __init__(self, state: State):
        self.s = state
        self.a = state.args
        self.stop = asyncio.Event()
        options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.use_local_subchannel_pool", 1)]  # one connection per channel
        self.channels = [grpc.aio.insecure_channel(state.target, options=options)
                         for _ in range(self.a.channels)]
        # No serializers: requests go out as the bytes built once, replies stay bytes.
        self.evaluate = [c.unary_unary(EVALUATE) for c in self.channels]
        self._round_robin = 0
        self.mix = Mix(state.kinds, np.random.default_rng(self.a.seed + 1))
        state.verifier = self.verifier = Verifier(self.a.verify_every)

    async def close(self) -> None:
        for c in self.channels:
            await c.close()

    def server_alive(self) -> bool:
        if self.s.own_server is not None:
            return self.s.own_server.alive()
        if self.s.pid is not None:
            return Path(f"/proc/{self.s.pid}").exists()
        return True

    async def call(self, kind: Kind, tally: Tally) -> tuple[str, float, str]:
        """One Evaluate; records its outcome in tally. Returns (outcome, end time, the
        server's message or what is wrong with the reply)."""
        stub = self.evaluate[self._round_robin % len(self.evaluate)]
        self._round_robin += 1
        detail = ""
        start = time.perf_counter()
        try:
            reply = await stub(kind.payload, timeout=self.a.call_timeout)
            code = "OK"
        except grpc.aio.AioRpcError as e:
            code, detail, reply = e.code().name, e.details() or "", b""
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - counted, never fatal
            code, detail, reply = f"CLIENT_{type(e).__name__}", str(e), b""
        end = time.perf_counter()
        if code == "OK" and kind.good and self.verifier.due(kind):
            if (problem := self.verifier.check(kind, reply)) is not None:
                code, detail = WRONG_RESULT, problem
        if code == "OK" and not kind.good:
            detail = "a bad request was accepted"
        tally.record(kind, code, end - start, detail)
        return code, end, detail

    async def capabilities(self) -> None:
        stub = self.channels[0].unary_unary(
            GET_CAPABILITIES, request_serializer=pb.GetCapabilitiesRequest.SerializeToString,
            response_deserializer=pb.Capabilities.FromString)
        try:
            c = await stub(pb.GetCapabilitiesRequest(), timeout=10, wait_for_ready=True)
        except grpc.aio.AioRpcError as e:
            raise SetupError(f"GetCapabilities on {self.s.target} failed: {e.code().name}: "
                             f"{e.details()}") from None
        self.s.capabilities = {
            "server_version": c.server_version,
            "devices": [pb.Device.Name(d) for d in c.devices],
            "max_message_bytes": c.max_message_bytes, "max_elements": c.max_elements,
            "cuda_device_name": c.cuda_device_name}

    async def precheck(self) -> bool:
        """Each kind once: good ones OK with the right reply, bad ones INVALID_ARGUMENT."""
        ok = True
        for kind in self.s.kinds:
            tally = Tally()
            self.verifier.check_next(kind)  # the first reply is always checked
            code, _, detail = await self.call(kind, tally)
            self.s.precheck[kind.name] = {"expected": kind.expected, "code": code,
                                          "detail": detail}
            ok = ok and code == kind.expected
        self.s.precheck_ok = ok
        return ok

    async def phase1(self) -> None:
        a = self.a
        tally = self.s.phase1 = Tally()
        measured: dict[str, int] = {}
        start = time.perf_counter()
        t_measure = start + a.warmup
        t_end = start + a.phase1_duration
        log(f"phase 1: closed loop, {a.concurrency} calls in flight, {a.phase1_duration:g} s "
            f"({a.warmup:g} s warm-up)")

        async def worker() -> None:
            while time.perf_counter() < t_end and not self.stop.is_set():
                kind = self.mix.next()
                _, end, _ = await self.call(kind, tally)
                if t_measure <= end <= t_end:
                    measured[kind.name] = measured.get(kind.name, 0) + 1

        workers = [asyncio.create_task(worker()) for _ in range(a.concurrency)]
        watchdog = asyncio.create_task(self._watch_server(t_end))
        try:
            await asyncio.gather(*workers)
        finally:
            watchdog.cancel()
        window = t_end - t_measure
        self.s.phase1_window_s = window
        self.s.phase1_kind_rates = {k: n / window for k, n in sorted(measured.items())}
        self.s.phase1_qps = sum(measured.values()) / window
        log(f"phase 1: {self.s.phase1_qps:.1f} calls/s, {tally.unexpected()} unexpected")

    async def _watch_server(self, until: float) -> None:
        """Stops the phase early when the server process is gone."""
        while time.perf_counter() < until and not self.stop.is_set():
            if not self.server_alive():
                self.s.server_exited_during_run = self._exit_description()
                log(f"the server exited: {self.s.server_exited_during_run.splitlines()[0]}")
                self.stop.set()
                return
            await asyncio.sleep(0.5)

    def _exit_description(self) -> str:
        server = self.s.own_server
        if server is not None and server.proc is not None and server.proc.poll() is not None:
            rc = server.proc.returncode
            how = f"exit status {rc}" if rc >= 0 else f"killed by signal {-rc}"
            return f"{how}; last lines of its log:\n{server.log_tail(8)}"
        return f"process {self.s.pid} is gone"

    def sample_rss(self, t0: float, label: str = "") -> None:
        if self.s.pid is None:
            return
        if (values := read_rss_kib(self.s.pid)) is not None:
            self.s.rss.append(RssSample(time.monotonic() - t0, values[0], values[1], label))

    async def phase2(self) -> None:
        a, s = self.a, self.s
        assert s.rate is not None
        rate = s.rate
        tally = s.phase2 = Tally()
        due_total = int(rate * a.duration)
        s.phase2_due = due_total
        pending: dict[asyncio.Task[tuple[str, float, str]], Kind] = {}
        lags = array("d")
        log(f"phase 2: open loop at {rate:.1f} calls/s for {a.duration:g} s "
            f"({due_total} calls)")
        if s.own_server is not None and s.own_server.metrics_port:
            s.metrics_before = scrape_metrics(s.own_server.metrics_port)

        t0 = time.monotonic()
        s.phase2_started = t0
        t_end = t0 + a.duration
        self.sample_rss(t0, "start")
        sampler = asyncio.create_task(self._rss_sampler(t0, tally, pending))
        sent = 0
        i = 0
        cancelled = False
        try:
            while i < due_total and not self.stop.is_set():
                now = time.monotonic()
                if now >= t_end + SEND_GRACE_S:
                    break
                due_now = min(due_total, int((now - t0) * rate) + 1)
                while i < due_now:
                    kind = self.mix.next()
                    if len(pending) >= a.max_in_flight:
                        tally.record(kind, SKIPPED, None,
                                     f"{a.max_in_flight} calls were already in flight")
                    else:
                        lags.append(now - (t0 + i / rate))
                        task = asyncio.create_task(self.call(kind, tally))
                        pending[task] = kind
                        task.add_done_callback(lambda t: pending.pop(t, None))
                        sent += 1
                        s.phase2_max_in_flight = max(s.phase2_max_in_flight, len(pending))
                    i += 1
                await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            now = time.monotonic()
            s.phase2_window_s = a.duration if i >= due_total or now >= t_end else now - t0
            s.phase2_sent = sent
            if lags:
                s.phase2_lag_ms = {"p50": percentile_ms(lags, 50), "p99": percentile_ms(lags, 99),
                                   "max": float(max(lags) * 1e3)}
            # Bounded wait for the calls still in flight (each has a deadline anyway).
            if pending:
                _, still = await asyncio.wait(set(pending),
                                              timeout=2.0 if cancelled else a.call_timeout + 5)
                for task in still:
                    if (kind := pending.get(task)) is not None:
                        tally.record(kind, UNFINISHED, None, "no reply after the final wait")
                    task.cancel()
            self.stop.set()
            sampler.cancel()
        self.sample_rss(t0, "end")
        if s.own_server is not None and s.own_server.metrics_port and s.own_server.alive():
            s.metrics_after = scrape_metrics(s.own_server.metrics_port)
        log(f"phase 2: sent {sent} of {due_total}, {tally.unexpected()} unexpected")

    async def _rss_sampler(self, t0: float, tally: Tally,
                           pending: dict[asyncio.Task[tuple[str, float, str]], Kind]) -> None:
        """RSS every --rss-interval s and at the middle; progress lines; server watchdog."""
        a = self.a
        middle = a.duration / 2
        times = sorted({middle, *(k * a.rss_interval for k in
                                  range(1, int(a.duration / a.rss_interval) + 1)
                                  if k * a.rss_interval < a.duration)})
        for t in times:
            while time.monotonic() < t0 + t:
                if not self.server_alive():
                    self.s.server_exited_during_run = self._exit_description()
                    log("the server exited: "
                        f"{self.s.server_exited_during_run.splitlines()[0]}")
                    self.stop.set()
                    return
                await asyncio.sleep(min(0.5, max(0.0, t0 + t - time.monotonic())))
            self.sample_rss(t0, "middle" if t == middle else "")
            rss = self.s.rss[-1].rss_kib / 1024 if self.s.rss else float("nan")
            log(f"phase 2: t={t:.0f}s calls={tally.total()} unexpected={tally.unexpected()} "
                f"in_flight={len(pending)} rss={rss:.1f} MiB")

    async def run(self) -> None:
        try:
            await self.capabilities()
            log(f"server {self.s.target}: version {self.s.capabilities['server_version']}, "
                f"devices {', '.join(self.s.capabilities['devices'])}")
            if not await self.precheck():
                log("precheck failed; no soak")
                return
            if self.a.qps is None:
                await self.phase1()
                if self.stop.is_set() or not self.s.phase1_qps:
                    return
                self.s.rate = self.s.phase1_qps * self.a.rate_fraction
            else:
                self.s.rate = self.a.qps * self.a.rate_fraction
            await self.phase2()
        finally:
            await self.close()


# --------------------------------------------------------------------------------------------
# Report


def rss_trend_mib_per_min(state: State) -> float | None:
    """Least-squares slope of RSS over the second half of the soak (information only)."""
    half = state.args.duration / 2
    points = [(r.t_s, r.rss_kib / 1024) for r in state.rss if r.t_s >= half - 1e-6]
    if len(points) < 5:
        return None
    t, m = np.array(points).T
    if np.ptp(t) <= 0:
        return None
    return float(np.polyfit(t, m, 1)[0] * 60)


def rss_verdict(state: State) -> dict[str, Any]:
    a = state.args
    rule = (f"end <= middle * {1 + a.rss_growth:.2f} + {a.rss_slack_mib:g} MiB")
    by_label = {r.label: r for r in state.rss if r.label}
    if state.pid is None:
        return {"status": "SKIPPED", "rule": rule,
                "reason": "the server's process is unknown (--target without --pid)"}
    missing = [label for label in ("middle", "end") if label not in by_label]
    if missing:
        return {"status": "INCOMPLETE", "rule": rule,
                "reason": f"no {' and no '.join(missing)} sample: the soak stopped early"}
    middle = by_label["middle"].rss_kib / 1024
    end = by_label["end"].rss_kib / 1024
    limit = middle * (1 + a.rss_growth) + a.rss_slack_mib
    return {"status": "PASS" if end <= limit else "FAIL", "rule": rule,
            "middle_mib": round(middle, 2), "end_mib": round(end, 2),
            "limit_mib": round(limit, 2)}


def build_result(state: State) -> dict[str, Any]:
    a = state.args
    rss = rss_verdict(state)
    unexpected = 0
    reasons: list[str] = []
    if state.precheck_ok is False:
        reasons.append("precheck failed")
    for tally in (state.phase1, state.phase2):
        if tally is not None:
            unexpected += tally.unexpected()
    if unexpected:
        reasons.append(f"{unexpected} unexpected results")
    if state.server_exited_during_run:
        reasons.append("the server exited during the run")
    if state.interrupted:
        reasons.append("interrupted")
    if state.phase2 is None and not reasons:
        reasons.append("the soak (phase 2) did not run")
    errors_ok = not reasons
    by_label = {r.label: r.to_json() for r in state.rss if r.label}
    phase2: dict[str, Any] | None = None
    if state.phase2 is not None:
        window = state.phase2_window_s or a.duration
        phase2 = {
            "target_rate": state.rate, "duration_s": a.duration, "window_s": window,
            "due": state.phase2_due, "sent": state.phase2_sent,
            "achieved_rate": state.phase2_sent / window if window > 0 else None,
            "send_lag_ms": state.phase2_lag_ms, "max_in_flight": state.phase2_max_in_flight,
            **state.phase2.to_json()}
    server = state.own_server
    result = {
        "target": state.target,
        "server": {
            "started_here": server is not None,
            "command": server.args if server else None,
            "log": str(server.log_path) if server else None,
            "pid": state.pid, "exit_status": server.exit_code if server else None,
            "exited_during_run": state.server_exited_during_run,
            **state.capabilities},
        "config": {k: v for k, v in vars(a).items() if k not in ("json",)},
        "mix": [{"kind": k.name, "class": "good" if k.good else "bad", "request": k.description,
                 "share": round(k.weight, 4), "expected": k.expected,
                 "request_bytes": len(k.payload)} for k in state.kinds],
        "precheck": state.precheck,
        "phase1": None if state.phase1 is None else {
            "concurrency": a.concurrency, "duration_s": a.phase1_duration,
            "measured_window_s": state.phase1_window_s, "max_qps": state.phase1_qps,
            "rate_by_kind": state.phase1_kind_rates, **state.phase1.to_json()},
        "phase2": phase2,
        "rss": {"samples": [r.to_json() for r in state.rss], "start": by_label.get("start"),
                "middle": by_label.get("middle"), "end": by_label.get("end"),
                "second_half_trend_mib_per_min": rss_trend_mib_per_min(state)},
        "metrics": {"before_phase2": state.metrics_before, "after_phase2": state.metrics_after},
        "replies_verified": state.verifier.checked if state.verifier else 0,
        "verdict": {
            "rss": rss,
            "errors": {"status": "PASS" if errors_ok else "FAIL", "unexpected": unexpected,
                       "reasons": reasons},
        },
    }
    passed = errors_ok and rss["status"] in ("PASS", "SKIPPED")
    result["verdict"]["result"] = "PASS" if passed else "FAIL"
    result["exit_status"] = 0 if passed else 1
    return result


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def _tally_lines(tally_json: dict[str, Any]) -> list[str]:
    lines = [f"    {'kind':<16} {'class':<5} {'expected':<17} {'code':<22} {'count':>9}"]
    for row in tally_json["counts"]:
        mark = "" if row["code"] == row["expected"] else "   <-- unexpected"
        lines.append(f"    {row['kind']:<16} {row['class']:<5} {row['expected']:<17} "
                     f"{row['code']:<22} {row['count']:>9}{mark}")
    for u in tally_json["unexpected_detail"]:
        for example in u["examples"]:
            lines.append(f"    ! {u['kind']} {u['code']}: {example}")
    return lines


def _metrics_line(result: dict[str, Any]) -> str | None:
    before, after = result["metrics"]["before_phase2"], result["metrics"]["after_phase2"]
    if not before or not after or result["phase2"] is None:
        return None
    server: dict[str, int] = {}
    for code in set(before["evaluate_calls"]) | set(after["evaluate_calls"]):
        n = after["evaluate_calls"].get(code, 0) - before["evaluate_calls"].get(code, 0)
        if n:
            server[code] = n
    client: dict[str, int] = {}
    for row in result["phase2"]["counts"]:
        if row["code"] not in (SKIPPED, UNFINISHED, WRONG_RESULT):
            client[row["code"]] = client.get(row["code"], 0) + row["count"]
        elif row["code"] == WRONG_RESULT:
            client["OK"] = client.get("OK", 0) + row["count"]
    same = "the client's counts match" if server == client else \
        f"the client counted {_codes(client)}"
    def gauge(name: str) -> str:
        value = after.get(name)
        return "?" if value is None else f"{value:g}"
    gauges = (f"in flight {gauge('lossd_in_flight_calls')}, queued "
              f"{gauge('lossd_queued_requests')} after phase 2")
    return f"  server metrics  : phase 2 Evaluate calls {_codes(server)} ({same}); {gauges}"


def _codes(counts: dict[str, int]) -> str:
    return ", ".join(f"{code} {n}" for code, n in sorted(counts.items())) or "none"


def format_report(result: dict[str, Any]) -> str:
    cfg = result["config"]
    srv = result["server"]
    out = ["", "lossd soak report", "================="]
    where = f"started here (pid {srv['pid']})" if srv["started_here"] else \
        (f"pid {srv['pid']}" if srv["pid"] is not None else "pid unknown")
    out.append(f"  server          : {result['target']}, {where}, version "
               f"{srv.get('server_version', '?')}, devices {', '.join(srv.get('devices', []))}")
    mix = ", ".join(f"{m['kind']} {100 * m['share']:.1f}%" for m in result["mix"])
    out.append(f"  mix             : {mix} (float32, BCE with logits, mean, dl/dlogits)")
    if result["precheck"]:
        out.append("  precheck        :")
        for name, p in result["precheck"].items():
            status = "ok" if p["code"] == p["expected"] else "FAILED"
            detail = f" ({p['detail']})" if p["detail"] else ""
            out.append(f"    {name:<16} {p['code']:<17} {status}{detail}")
    p1 = result["phase1"]
    if p1 is not None:
        measured = f"measured over the last {p1['measured_window_s']:g} s" \
            if p1["max_qps"] is not None else "stopped early, no QPS"
        out.append(f"Phase 1: closed loop, concurrency {p1['concurrency']}, "
                   f"{p1['duration_s']:g} s ({measured})")
        if p1["max_qps"] is not None:
            by_kind = ", ".join(f"{k} {v:.1f}/s" for k, v in p1["rate_by_kind"].items())
            out.append(f"  max QPS         : {p1['max_qps']:.1f} calls/s ({by_kind})")
        lat = p1["latency"]["all_good"]
        out.append(f"  latency (good)  : p50 {_fmt_ms(lat['p50_ms'])}, p99 {_fmt_ms(lat['p99_ms'])}")
        out.append(f"  results         : {p1['total']} calls, {p1['unexpected']} unexpected")
        out.extend(_tally_lines(p1))
    elif cfg["qps"] is not None:
        out.append(f"Phase 1: skipped (--qps {cfg['qps']:g})")
    p2 = result["phase2"]
    if p2 is not None:
        achieved = p2["achieved_rate"] or 0.0
        out.append(f"Phase 2: open loop at {100 * cfg['rate_fraction']:.0f}% for "
                   f"{p2['duration_s']:g} s")
        out.append(f"  target rate     : {p2['target_rate']:.1f} calls/s ({p2['due']} calls due)")
        share = 100 * achieved / p2["target_rate"] if p2["target_rate"] else 0.0
        out.append(f"  achieved rate   : {achieved:.1f} calls/s sent ({share:.1f}% of target; "
                   f"{p2['sent']} sent over {p2['window_s']:.1f} s, at most "
                   f"{p2['max_in_flight']} in flight)")
        if share < 95.0:
            out.append("  note            : under 95% of the target rate was sent: this client "
                       "could not keep the schedule (CPU-bound?) or the run stopped early")
        lag = p2["send_lag_ms"] or {}
        out.append(f"  send lag        : p50 {_fmt_ms(lag.get('p50'))}, p99 "
                   f"{_fmt_ms(lag.get('p99'))}, max {_fmt_ms(lag.get('max'))} behind schedule")
        for name, lat in p2["latency"].items():
            out.append(f"  latency {name:<8}: p50 {_fmt_ms(lat['p50_ms'])}, p99 "
                       f"{_fmt_ms(lat['p99_ms'])} ({lat['n']} OK calls)")
        by_class = p2["by_class"]
        out.append(f"  good requests   : {_codes(by_class['good'])}")
        out.append(f"  bad requests    : {_codes(by_class['bad'])}")
        out.append(f"  results         : {p2['total']} calls, {p2['unexpected']} unexpected")
        out.extend(_tally_lines(p2))
        if (line := _metrics_line(result)) is not None:
            out.append(line)
    out.append(f"  replies verified: {result['replies_verified']} (shapes, finite loss, same bits "
               f"as the first reply)")
    rss = result["rss"]
    if rss["samples"]:
        def mib(sample: dict[str, Any] | None) -> str:
            return "-" if sample is None else f"{sample['rss_mib']:.1f}"
        peak = max(s["hwm_mib"] for s in rss["samples"])
        out.append(f"  RSS (MiB)       : start {mib(rss['start'])}, middle {mib(rss['middle'])}, "
                   f"end {mib(rss['end'])}; peak (VmHWM) {peak:.1f}")
        series = " ".join(f"{s['rss_mib']:.1f}@{s['t_s']:.0f}s" for s in rss["samples"])
        out.append(f"  RSS samples     : {series}")
        if (trend := rss["second_half_trend_mib_per_min"]) is not None:
            out.append(f"  RSS trend       : {trend:+.2f} MiB/min over the second half "
                       "(least squares; information only)")
    else:
        out.append("  RSS             : not measured")
    v = result["verdict"]
    out.append("Verdict")
    r = v["rss"]
    if r["status"] == "SKIPPED" or "end_mib" not in r:
        out.append(f"  RSS flat        : {r['status']} ({r.get('reason', '')}; rule {r['rule']})")
    else:
        out.append(f"  RSS flat        : {r['status']} (end {r['end_mib']:.1f} MiB "
                   f"{'<=' if r['status'] == 'PASS' else '>'} middle {r['middle_mib']:.1f} * "
                   f"{1 + cfg['rss_growth']:.2f} + {cfg['rss_slack_mib']:g} = "
                   f"{r['limit_mib']:.1f} MiB)")
    e = v["errors"]
    reasons = "; ".join(e["reasons"]) if e["reasons"] else "no unexpected result"
    out.append(f"  errors          : {e['status']} ({reasons})")
    if srv["exited_during_run"]:
        out.append(f"  server exited   : {srv['exited_during_run']}")
    out.append(f"  result          : {v['result']} (exit status {result['exit_status']})")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_binary = os.environ.get("LOSSD_BINARY") or str(REPO_ROOT / "build/server/lossd")
    p = argparse.ArgumentParser(
        description="Soak test for a lossd server: finds the closed-loop maximum QPS of a "
                    "request mix, holds an open-loop load at a fraction of it, and checks that "
                    "the server's RSS stays flat and every call gets the expected status code.",
        epilog="Exit status: 0 pass, 1 fail (RSS grew, unexpected results, interrupted), "
               "2 could not start. See docs/soak.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("server")
    g.add_argument("--binary", default=default_binary,
                   help="lossd executable to start ($LOSSD_BINARY, else build/server/lossd "
                        "of this repository)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="--device of the server started here")
    g.add_argument("--server-arg", action="append", default=[], metavar="FLAG",
                   help="extra flag for the server started here, e.g. --server-arg=--workers=4 "
                        "(repeatable)")
    g.add_argument("--server-log", default=None, metavar="PATH",
                   help="write the started server's stderr here; without it, a temporary "
                        "file kept only when the soak fails")
    g.add_argument("--target", default=None, metavar="HOST:PORT",
                   help="use this running server instead of starting one (loopback only)")
    g.add_argument("--pid", type=int, default=None,
                   help="process id of the --target server, to read its RSS")
    g = p.add_argument_group("load")
    g.add_argument("--concurrency", type=int, default=16, help="phase 1: calls in flight")
    g.add_argument("--phase1-duration", type=float, default=20.0,
                   help="phase 1 seconds, warm-up included")
    g.add_argument("--warmup", type=float, default=2.0,
                   help="phase 1: first seconds not counted in the QPS")
    g.add_argument("--qps", type=float, default=None,
                   help="skip phase 1 and take this as the maximum QPS")
    g.add_argument("--rate-fraction", type=float, default=0.8,
                   help="phase 2 rate as a fraction of the maximum QPS")
    g.add_argument("--duration", type=float, default=600.0, help="phase 2 seconds")
    g.add_argument("--bad-fraction", type=float, default=0.10,
                   help="share of deliberately bad requests (INVALID_ARGUMENT expected)")
    g.add_argument("--large-fraction", type=float, default=0.10,
                   help="share of 1M-element requests among the good and among the bad ones")
    g.add_argument("--channels", type=int, default=1,
                   help="gRPC connections the calls are spread over")
    g.add_argument("--call-timeout", type=float, default=30.0, help="deadline of each call, s")
    g.add_argument("--max-in-flight", type=int, default=1024,
                   help="phase 2: sends beyond this many pending calls are skipped and count "
                        "as unexpected")
    g.add_argument("--verify-every", type=int, default=100,
                   help="decode and check every N-th good reply of each kind (0: only the "
                        "precheck's)")
    g.add_argument("--seed", type=int, default=0, help="seed of the data and the mix order")
    g = p.add_argument_group("memory and report")
    g.add_argument("--rss-interval", type=float, default=10.0,
                   help="phase 2: seconds between RSS samples (and progress lines)")
    g.add_argument("--rss-growth", type=float, default=0.10,
                   help="RSS is flat when end <= middle * (1 + this) + --rss-slack-mib")
    g.add_argument("--rss-slack-mib", type=float, default=16.0,
                   help="absolute RSS allowance, MiB")
    g.add_argument("--json", default=None, metavar="PATH", help="also write the result as JSON")
    args = p.parse_args(argv)
    problems = []
    if args.concurrency < 1:
        problems.append("--concurrency must be >= 1")
    if not 0 <= args.warmup < args.phase1_duration:
        problems.append("--warmup must be >= 0 and below --phase1-duration")
    if args.duration <= 0 or args.rss_interval <= 0:
        problems.append("--duration and --rss-interval must be > 0")
    if not 0 < args.rate_fraction <= 10:
        problems.append("--rate-fraction must be in (0, 10]")
    if args.qps is not None and args.qps <= 0:
        problems.append("--qps must be > 0")
    if not 0 <= args.bad_fraction <= 1 or not 0 <= args.large_fraction <= 1:
        problems.append("--bad-fraction and --large-fraction must be in [0, 1]")
    if args.channels < 1 or args.max_in_flight < 1 or args.call_timeout <= 0:
        problems.append("--channels, --max-in-flight and --call-timeout must be positive")
    if args.pid is not None and args.target is None:
        problems.append("--pid goes with --target (a server started here is measured anyway)")
    if problems:
        p.error("; ".join(problems))
    return args


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    state = State(args=args)
    temp_log: Path | None = None
    try:
        if args.target is not None:
            state.target = loopback_target(args.target)
            if args.pid is not None:
                if read_rss_kib(args.pid) is None:
                    raise SetupError(f"cannot read /proc/{args.pid}/status")
                state.pid = args.pid
                comm = Path(f"/proc/{args.pid}/comm").read_text().strip()
                if comm != "lossd":
                    log(f"warning: process {args.pid} is {comm!r}, not lossd")
        else:
            if args.server_log:
                log_path = Path(args.server_log)
            else:
                fd, name = tempfile.mkstemp(prefix="lossd-soak-", suffix=".log")
                os.close(fd)
                log_path = temp_log = Path(name)
            state.own_server = OwnServer(Path(args.binary), args.device, args.server_arg,
                                         log_path)
            state.own_server.start()
            state.pid = state.own_server.pid
            state.target = f"127.0.0.1:{state.own_server.port}"
            log(f"started {args.binary} (pid {state.pid}) on {state.target}, "
                f"log {log_path}")
        state.kinds = build_kinds(np.random.default_rng(args.seed), args.bad_fraction,
                                  args.large_fraction)
        state.kinds = [k for k in state.kinds if k.weight > 0]

        async def run() -> None:
            # SIGTERM cancels the run like Ctrl-C does (asyncio.run handles SIGINT).
            task = asyncio.current_task()
            assert task is not None
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
            await Soak(state).run()

        asyncio.run(run())
    except SetupError as e:
        print(f"soak: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, asyncio.CancelledError):
        state.interrupted = True
        log("interrupted")
        if state.phase2_started is not None and not any(r.label == "end" for r in state.rss):
            if state.pid is not None and (v := read_rss_kib(state.pid)) is not None:
                state.rss.append(RssSample(time.monotonic() - state.phase2_started,
                                           v[0], v[1], "end"))
    finally:
        # asyncio.run left SIGTERM at its default action; stop the server on it again.
        signal.signal(signal.SIGTERM, _raise_interrupt)
        if state.own_server is not None:
            state.own_server.stop()
            log(f"stopped the server (exit status {state.own_server.exit_code})")
    result = build_result(state)
    print(format_report(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    if temp_log is not None:
        if result["exit_status"] == 0:
            temp_log.unlink(missing_ok=True)
        else:
            print(f"server log kept: {temp_log}", file=sys.stderr)
    return int(result["exit_status"])


if __name__ == "__main__":
    sys.exit(main())
