"""End-to-end check of a lossd server with a GPU (run by gpu_check.sh on the GPU machine).

Starts nothing: expects LOSSD_TARGET (host:port) of a server started with --device=auto.
Evaluates the same requests on device CUDA and device CPU through the Python client and
prints the largest differences: per element in float32 ulp, reductions relative.
"""
import os
import sys
import time

import numpy as np

import lossd


def ulp_diff(a: np.ndarray, b: np.ndarray) -> int:
    ai = a.astype(np.float32).view(np.int32).astype(np.int64)
    bi = b.astype(np.float32).view(np.int32).astype(np.int64)
    ai = np.where(ai < 0, -(2**31) - ai, ai)
    bi = np.where(bi < 0, -(2**31) - bi, bi)
    return int(np.max(np.abs(ai - bi))) if a.size else 0


def loss_vs_cpu(name: str, g, h) -> bool:
    """Prints and checks the largest relative loss difference of a CUDA result ``g`` from
    the CPU result ``h`` of the same request (at most 1e-5, and ``g`` ran on CUDA)."""
    rel = float(np.max(np.abs(np.asarray(g.loss, np.float64) - np.asarray(h.loss, np.float64))
                       / (np.abs(np.asarray(h.loss, np.float64)) + 1e-30)))
    good = rel <= 1e-5 and g.device == "cuda"
    print(f"{name}: device {g.device}, max rel loss diff vs cpu {rel:.2e} -> "
          f"{'PASS' if good else 'FAIL'}")
    return good


def main() -> int:
    target = os.environ["LOSSD_TARGET"]
    rng = np.random.default_rng(7)
    ok = True
    with lossd.Client(target, timeout=120) as c:
        caps = c.capabilities()
        print("capabilities:", caps)
        for n_rows in (1000, 250_000):
            x = (rng.standard_normal((n_rows, 64)) * 8).astype(np.float32)
            y = rng.integers(0, 2, size=(n_rows, 64)).astype(np.float32)
            w = rng.uniform(0.5, 3, 64).astype(np.float32)
            p = rng.uniform(0.5, 3, 64).astype(np.float32)
            for red in ("none", "mean", "sum"):
                g = c.bce_with_logits(x, y, weight=w, pos_weight=p, reduction=red, grad=True,
                                      device="cuda")
                h = c.bce_with_logits(x, y, weight=w, pos_weight=p, reduction=red, grad=True,
                                      device="cpu")
                if red == "none":
                    # Each device within 4 ulp of a float64 evaluation of the stable formula,
                    # and of each other (docs/design.md section 4).
                    xd, yd = x.astype(np.float64), y.astype(np.float64)
                    wd, pd = w.astype(np.float64), p.astype(np.float64)
                    lg = np.log1p(np.exp(-np.abs(xd)))
                    ref = wd * ((1 - yd) * (np.maximum(xd, 0) + lg)
                                + pd * yd * (np.maximum(-xd, 0) + lg))
                    ref32 = ref.astype(np.float32)
                    dg = ulp_diff(np.asarray(g.loss), ref32)
                    dh = ulp_diff(np.asarray(h.loss), ref32)
                    dgh = ulp_diff(np.asarray(g.loss), np.asarray(h.loss))
                    good = dg <= 4 and dh <= 4 and dgh <= 4
                    what = (f"loss vs float64: cuda {dg} ulp, cpu {dh} ulp; "
                            f"cuda vs cpu {dgh} ulp")
                else:
                    rel = abs(float(g.loss) - float(h.loss)) / abs(float(h.loss))
                    good = rel <= 1e-6
                    what = f"loss rel diff {rel:.2e}"
                gd = np.max(np.abs(np.asarray(g.grad, np.float64) - np.asarray(h.grad, np.float64)))
                print(f"{n_rows * 64:>9} elements {red:>4}: device {g.device} vs {h.device}: "
                      f"{what}, grad max abs diff {gd:.2e} -> {'PASS' if good else 'FAIL'}")
                ok &= good and g.device == "cuda" and h.device == "cpu"
        # The options served by the generic CUDA path, CUDA vs CPU.
        x = (rng.standard_normal((500, 13)) * 6).astype(np.float32)
        y = rng.integers(0, 2, size=(500, 13)).astype(np.float32)
        y[::7] = -100
        cases = [
            ("bce ignore+normalize", dict(ignore_index=-100, normalize=True)),
            ("bce label_smoothing", dict(label_smoothing=0.1)),
        ]
        for name, opts in cases:
            for red in ("none", "mean", "per_sample_mean"):
                yy = y if "ignore_index" in opts else np.where(y < 0, 0, y).astype(np.float32)
                g = c.bce_with_logits(x, yy, reduction=red, grad=True, device="cuda", **opts)
                h = c.bce_with_logits(x, yy, reduction=red, grad=True, device="cpu", **opts)
                ok &= loss_vs_cpu(f"{name} {red}", g, h)
        for gamma in (0.5, 2.0):
            yy = np.where(y < 0, 0, y).astype(np.float32)
            g = c.sigmoid_focal_loss(x, yy, gamma=gamma, reduction="none", grad=True, device="cuda")
            h = c.sigmoid_focal_loss(x, yy, gamma=gamma, reduction="none", grad=True, device="cpu")
            ok &= loss_vs_cpu(f"focal gamma={gamma}", g, h)
        # Round-trip latency of a small request on each device.
        x = rng.standard_normal((16, 64)).astype(np.float32)
        y = (x > 0).astype(np.float32)
        for dev in ("cuda", "cpu"):
            ts = []
            for _ in range(200):
                t0 = time.perf_counter()
                c.bce_with_logits(x, y, reduction="none", grad=True, device=dev)
                ts.append(time.perf_counter() - t0)
            ts.sort()
            print(f"1024 elements on {dev}: p50 {ts[100] * 1e6:.0f} us, p99 {ts[198] * 1e6:.0f} us")
    print("server check:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
