#!/usr/bin/env python3
"""Memory of a lossd server under large requests: peak and kept RSS (docs/hardening.md).

Starts the given lossd binary on loopback for each scenario and prints VmHWM (peak) and VmRSS:

* ``six``: six concurrent 192 MiB requests (24M float32 logits + targets, dl/dx requested);
* ``big``: one 800 MiB request (100M elements, loss per element), RSS right after and 3 s later;
* ``overlimit``: a 256 MiB message against a 1 MiB ``--max_message_bytes``.

Usage: scripts/memory_check.py BINARY SCENARIO [extra lossd flags...]
e.g.   scripts/memory_check.py build/server/lossd six --max_inflight_bytes=2576980377
Run with the test virtual environment (grpcio, numpy): .venv/bin/python scripts/memory_check.py
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "client" / "python" / "src"))
from lossd._proto.lossd.v1 import lossd_pb2 as pb  # noqa: E402

EVALUATE = "/lossd.v1.LossService/Evaluate"
OPTIONS = [("grpc.max_send_message_length", 2**31 - 1),
           ("grpc.max_receive_message_length", 2**31 - 1)]


def request(n: int, grad: bool) -> bytes:
    x = np.random.default_rng(1).standard_normal(n).astype("<f4")
    y = (x > 0).astype("<f4")
    return pb.EvaluateRequest(
        logits=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[n], data=x.tobytes()),
        targets=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[n], data=y.tobytes()),
        bce_with_logits=pb.BceWithLogits(), reduction=pb.REDUCTION_NONE,
        gradients=pb.GradientRequest(logits=grad)).SerializeToString()


def main() -> int:
    if len(sys.argv) < 3 or sys.argv[2] not in ("six", "big", "overlimit"):
        print(__doc__)
        return 2
    binary, scenario, extra = sys.argv[1], sys.argv[2], sys.argv[3:]
    limit = ["--max_message_bytes=1048576"] if scenario == "overlimit" else \
        ["--max_message_bytes=2000000000", "--max_elements=500000000"]
    proc = subprocess.Popen([binary, "--port=0", "--host=127.0.0.1", "--device=cpu", *limit,
                             *extra], stderr=subprocess.PIPE, text=True)
    port = None
    assert proc.stderr is not None
    for line in proc.stderr:
        m = re.search(r"listening on \S+:(\d+)", line)
        if m:
            port = m.group(1)
            break
    if port is None:
        print("lossd did not start")
        return 1
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()

    def vm(key: str) -> int:
        with open(f"/proc/{proc.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) // 1024
        return -1

    target = f"127.0.0.1:{port}"
    try:
        print(f"{scenario}: start RSS {vm('VmRSS')} MiB")
        if scenario == "six":
            payload = request(24 << 20, grad=True)
            codes = []

            def call() -> None:
                with grpc.insecure_channel(target, options=OPTIONS) as ch:
                    try:
                        ch.unary_unary(EVALUATE)(payload, timeout=600)
                        codes.append("OK")
                    except grpc.RpcError as e:
                        codes.append(e.code().name)

            threads = [threading.Thread(target=call) for _ in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            print(f"six: codes {sorted(codes)}; peak RSS {vm('VmHWM')} MiB")
        elif scenario == "big":
            payload = request(100 << 20, grad=False)
            with grpc.insecure_channel(target, options=OPTIONS) as ch:
                ch.unary_unary(EVALUATE)(payload, timeout=600)
            print(f"big: peak RSS {vm('VmHWM')} MiB, right after {vm('VmRSS')} MiB")
            time.sleep(3)
            print(f"big: RSS 3 s later {vm('VmRSS')} MiB")
        else:
            payload = b"\x0a\x80\x80\x80\x80\x01" + b"\0" * (256 << 20)
            with grpc.insecure_channel(target, options=OPTIONS) as ch:
                try:
                    ch.unary_unary(EVALUATE)(payload, timeout=60)
                    print("overlimit: answered OK (unexpected)")
                except grpc.RpcError as e:
                    print(f"overlimit: {e.code().name} {e.details()[:80]!r}")
            print(f"overlimit: peak RSS {vm('VmHWM')} MiB, right after {vm('VmRSS')} MiB")
            time.sleep(3)
            print(f"overlimit: RSS 3 s later {vm('VmRSS')} MiB")
    finally:
        proc.terminate()
        proc.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
