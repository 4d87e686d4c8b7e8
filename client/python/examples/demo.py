#!/usr/bin/env python3
"""lossd demo: BCE with logits on a lossd server, checked against numpy.

The example of the "seed article": a batch of 4 samples with 7 classes, random logits in
[0, 1), binary targets, and per-class pos_weight and weight. For each reduction (none, mean,
sum) the server's loss and gradient dl/dx are printed beside the same values computed here in
float64 from the formula (torch's form, fine for these positive logits)

    loss  = w * [(1-y)*x + (1 + (p-1)*y) * log1p(exp(-x))]
    dl/dx = w * [(1-y)*s(x) - p*y*s(-x)]          s = sigmoid

with the largest absolute difference, and the device that ran it.

Usage::

    python client/python/examples/demo.py --target 127.0.0.1:50051
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import lossd


def numpy_bce(x, y, w, p, reduction):
    """float64 reference: (loss, dl/dx) of the reduced loss."""
    x, y, w, p = (np.asarray(a, np.float64) for a in (x, y, w, p))
    loss = w * ((1 - y) * x + (1 + (p - 1) * y) * np.log1p(np.exp(-x)))
    sig = 1.0 / (1.0 + np.exp(-x))
    grad = w * ((1 - y) * sig - p * y * (1 - sig))
    if reduction == "none":
        return loss, grad
    if reduction == "sum":
        return loss.sum(), grad
    return loss.mean(), grad / loss.size


def fmt(a) -> str:
    return np.array2string(np.asarray(a, np.float64), precision=6, suppress_small=False,
                           floatmode="fixed", max_line_width=100, separator="  ")


def section(title: str) -> None:
    print()
    print(title)
    print("-" * len(title))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:50051",
                        help="lossd server address (default: %(default)s)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where the server should run it (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per call")
    args = parser.parse_args(argv)

    np.random.seed(1107)
    logits = np.random.rand(4, 7).astype(np.float32)
    targets = np.random.randint(0, 2, size=(4, 7)).astype(np.float32)
    pos_weight = np.random.randint(2, 4, size=(7,)).astype(np.float32)
    weight = np.random.randint(2, 4, size=(7,)).astype(np.float32)

    np.set_printoptions(linewidth=100)
    print(f"lossd demo: BCE with logits, batch 4 x 7 classes, float32, server {args.target}")
    section("Inputs")
    print("logits =\n" + fmt(logits))
    print("targets =\n" + np.array2string(targets.astype(int)))
    print("pos_weight (per class) = " + np.array2string(pos_weight.astype(int)))
    print("weight     (per class) = " + np.array2string(weight.astype(int)))

    worst = 0.0
    try:
        with lossd.Client(args.target, timeout=args.timeout) as client:
            caps = client.capabilities()
            print(f"\nserver {caps.server_version}: devices {', '.join(caps.devices)}"
                  + (f" ({caps.cuda_device_name})" if caps.cuda_device_name else ""))
            for reduction in ("none", "mean", "sum"):
                r = client.bce_with_logits(logits, targets, weight=weight, pos_weight=pos_weight,
                                           reduction=reduction, grad=True, device=args.device)
                ref_loss, ref_grad = numpy_bce(logits, targets, weight, pos_weight, reduction)
                d_loss = float(np.max(np.abs(r.loss.astype(np.float64) - ref_loss)))
                d_grad = float(np.max(np.abs(r.grad.astype(np.float64) - ref_grad)))
                # Relative to the largest value: float32 keeps ~7 significant digits.
                worst = max(worst, d_loss / float(np.max(np.abs(ref_loss))),
                            d_grad / float(np.max(np.abs(ref_grad))))
                section(f"reduction={reduction}  (ran on {r.device}, "
                        f"{r.timing.compute_ns / 1e3:.1f} us compute, "
                        f"{r.timing.total_ns / 1e3:.1f} us in the server)")
                if reduction == "none":
                    print("loss (lossd) =\n" + fmt(r.loss))
                    print("loss (numpy) =\n" + fmt(ref_loss))
                else:
                    print(f"loss (lossd) = {float(r.loss):.9f}")
                    print(f"loss (numpy) = {float(ref_loss):.9f}")
                print(f"max |loss difference| = {d_loss:.3g}")
                print("dloss/dlogits (lossd) =\n" + fmt(r.grad))
                print("dloss/dlogits (numpy) =\n" + fmt(ref_grad))
                print(f"max |gradient difference| = {d_grad:.3g}")
    except lossd.LossdError as err:
        print(f"\nerror: {err}", file=sys.stderr)
        return 1

    tolerance = 1e-6  # float32 results: a few units in the last place
    verdict = "OK" if worst <= tolerance else "MISMATCH"
    print(f"\n{verdict}: largest difference from numpy float64, relative to the largest value, "
          f"is {worst:.2g} (float32 results; tolerance {tolerance:g})")
    return 0 if verdict == "OK" else 1


if __name__ == "__main__":
    sys.exit(main())
