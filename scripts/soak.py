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

Before phase 2 and after its calls have finished, the script pauses for ``--idle-seconds``
(5 by default) with no call in flight and then reads the server's RSS: the ``idle-before`` and
``idle-after`` samples. The server returns freed memory to the OS once it has been quiet for
1 s (after calls that held 64 MiB or more together); under load it keeps what the peak of
concurrent large calls needed, so RSS under load follows the load level, and only idle RSS
tells a leak. (With ``--qps`` there is no phase 1: idle-before then follows only the precheck,
and the server's warm-up counts as growth.)

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

Verdict: RSS is flat when ``idle-after <= idle-before * (1 + --rss-growth) + --rss-slack-mib``
(defaults 0.10 and 16 MiB; MiB = 2^20 bytes), i.e. the idle server may keep at most 10 % plus
16 MiB more after the soak than before it (phase 1 absorbs allocator and buffer warm-up). The
samples under load (start, middle, end), the second-half trend and the former rule ``end <=
middle * 1.10 + 16 MiB`` are reported as information. The exit status is 0 when RSS is flat
(or cannot be measured: ``--target`` without ``--pid``) and there was no unexpected error, 1
when either check failed (an idle sample missing because the soak stopped early counts as
failed) or the run was interrupted, and 2 when the soak could not start (bad arguments, a
refused target, a server that does not start).

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

The code is the package scripts/soak/ next to this file; this file is its entry point.
See docs/soak.md for what the report says.
"""

import sys
from pathlib import Path

# The package scripts/soak/ (a directory wins over this file for "import soak").
sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
