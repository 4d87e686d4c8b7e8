"""The command line: options, starting (or finding) the server, running the soak, the report
and the exit status."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import REPO_ROOT, SetupError, log
from .mix import build_kinds
from .report import build_result, format_report
from .results import RssSample, State
from .run import Soak
from .server import OwnServer, loopback_target, read_rss_kib


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_binary = os.environ.get("LOSSD_BINARY") or str(REPO_ROOT / "build/server/lossd")
    p = argparse.ArgumentParser(
        description="Soak test for a lossd server: finds the closed-loop maximum QPS of a "
                    "request mix, holds an open-loop load at a fraction of it, and checks that "
                    "the server's RSS, read while idle before and after that load, stays flat "
                    "and every call gets the expected status code.",
        epilog="Exit status: 0 pass, 1 fail (idle RSS grew, unexpected results, interrupted), "
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
    g.add_argument("--idle-seconds", type=float, default=5.0,
                   help="pause without calls before phase 2 and after its calls finished, "
                        "each ended by an RSS sample (idle-before, idle-after); the server "
                        "returns freed memory to the OS after 1 s without calls")
    g.add_argument("--rss-growth", type=float, default=0.10,
                   help="RSS is flat when idle-after <= idle-before * (1 + this) + "
                        "--rss-slack-mib")
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
    if args.idle_seconds < 0:
        problems.append("--idle-seconds must be >= 0")
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
