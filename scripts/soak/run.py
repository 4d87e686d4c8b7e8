"""The phases of the soak: precheck, phase 1 (closed loop, maximum QPS), the idle pauses and
phase 2 (open loop at a fraction of that rate), with RSS samples and a server watchdog."""

from __future__ import annotations

import asyncio
import time
from array import array
from pathlib import Path

import grpc
import grpc.aio
import numpy as np

from .common import (EVALUATE, GET_CAPABILITIES, IDLE_AFTER, IDLE_BEFORE, MAX_MESSAGE_BYTES,
                     SEND_GRACE_S, SKIPPED, UNFINISHED, WRONG_RESULT, SetupError, log, pb)
from .mix import Kind, Mix, Verifier
from .results import RssSample, State, Tally, percentile_ms
from .server import read_rss_kib, scrape_metrics


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

    async def idle(self, label: str, t0: float | None) -> None:
        """--idle-seconds without any call in flight, then an RSS sample labelled `label`.

        The server returns freed memory to the OS only once it has been quiet for a while
        (malloc_trim after 1 s without calls, when calls held >= 64 MiB since the last trim),
        so RSS read here shows what the server keeps, whatever the load before was. Skipped
        when the server's RSS cannot be read (--target without --pid) or the server exited.
        t0: the start of phase 2 (None before it: the sample's time is then 0)."""
        if self.s.pid is None or self.s.server_exited_during_run:
            return
        seconds = self.a.idle_seconds
        when = "before" if label == IDLE_BEFORE else "after"
        log(f"idle {when} phase 2: {seconds:g} s without calls")
        deadline = time.monotonic() + seconds
        while (now := time.monotonic()) < deadline:
            if not self.server_alive():
                self.s.server_exited_during_run = self._exit_description()
                log(f"the server exited: {self.s.server_exited_during_run.splitlines()[0]}")
                self.stop.set()
                return
            await asyncio.sleep(min(0.5, deadline - now))
        self.sample_rss(time.monotonic() if t0 is None else t0, label)
        if self.s.rss and self.s.rss[-1].label == label:
            log(f"idle {when} phase 2: rss={self.s.rss[-1].rss_kib / 1024:.1f} MiB")

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
            await self.idle(IDLE_BEFORE, None)
            if self.stop.is_set():
                return
            await self.phase2()
            if self.s.phase2_started is not None:
                await self.idle(IDLE_AFTER, self.s.phase2_started)
        finally:
            await self.close()

