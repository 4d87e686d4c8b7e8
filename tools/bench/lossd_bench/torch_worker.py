"""torch CPU on the service benchmark's request (see payload.py): logits [n/64, 64] uniform in
[-4, 4), 0/1 targets, ``binary_cross_entropy_with_logits(reduction="none")`` then
``loss.backward(ones)``: the loss and dl/dx, forward + backward, with torch.set_num_threads.

Run by compute.py under an interpreter that has torch (the harness's own may not); it speaks
compute.py's line protocol: first line "torch version=V threads=T", then one reply line per
"ELEMENTS SECONDS MIN_CALLS" line on stdin. Standalone: no import of the lossd_bench package.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F


def shape_of(elements: int):
    return (elements // 64, 64) if elements >= 64 and elements % 64 == 0 else (elements,)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch version={torch.__version__} threads={torch.get_num_threads()}", flush=True)
    cache: dict = {}
    for line in sys.stdin:
        try:
            n_s, sec_s, min_s = line.split()
            n, seconds, min_calls = int(n_s), float(sec_s), int(min_s)
        except ValueError:
            print(f"error: expected ELEMENTS SECONDS MIN_CALLS, got {line.strip()!r}", flush=True)
            continue
        if n not in cache:
            cache.clear()
            g = torch.Generator().manual_seed(1)
            x = (torch.rand(shape_of(n), generator=g) * 8 - 4).requires_grad_(True)
            y = (torch.arange(n) % 2).to(torch.float32).reshape(shape_of(n))
            cache[n] = (x, y, torch.ones(shape_of(n)))
        x, y, ones = cache[n]

        def step() -> None:
            x.grad = None
            loss = F.binary_cross_entropy_with_logits(x, y, reduction="none")
            loss.backward(ones)

        step()  # warm-up
        us: list = []
        start = time.perf_counter()
        elapsed = 0.0
        while elapsed < seconds or len(us) < min_calls:
            t0 = time.perf_counter()
            step()
            t1 = time.perf_counter()
            us.append((t1 - t0) * 1e6)
            elapsed = t1 - start
        s = sorted(us)
        print(f"torch elements={n} threads={args.threads} calls={len(us)} seconds={elapsed:.6f} "
              f"p50_us={s[len(s) // 2]:.3f} mean_us={sum(us) / len(us):.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
