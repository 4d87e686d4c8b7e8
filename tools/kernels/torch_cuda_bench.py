#!/usr/bin/env python3
"""torch CUDA baseline for tools/gpu/gpu_bench (docs/design.md sections 6 and 9).

Times ``torch.nn.functional.binary_cross_entropy_with_logits`` forward + backward (gradient
wrt the logits) on CUDA for the problems gpu_bench times: float32 logits [N/64, 64], targets
with 40% zeros, 40% ones and 20% soft labels, and

* ``none/noweight``: reduction 'none', no weight; backward of a ones tensor;
* ``none/wC``: reduction 'none', weight [64] and pos_weight [64];
* ``none/wfull``: reduction 'none', full-shape weight and pos_weight;
* ``mean/wC``: reduction 'mean', weight [64] and pos_weight [64];
* ``focal/none``: torchvision's sigmoid_focal_loss formula (alpha 0.25, gamma 2, reduction
  'none') written out in torch operations, as torchvision does;
* ``focal/none/hard``: the same on hard labels only (half zeros, half ones), the usual
  detection targets;
* ``ignnorm/mean/wC``: paddle's ignore_index (-100) + normalize emulated with a mask:
  sum(mask * loss) / count(mask) / numel, weight and pos_weight [64];
* ``smooth/mean/wC``: Keras's label smoothing 0.1 (targets y (1 - 0.1) + 0.05) then reduction
  'mean', weight and pos_weight [64].

Prints a table and one machine-readable line per row: ``TORCH <variant> <numel> <gelem/s>``,
which tools/gpu/gpu_check.sh joins with gpu_bench's RESULT lines. Needs torch with CUDA.
"""

import argparse
import sys

import torch
import torch.nn.functional as F

VARIANTS = (
    ("none/noweight", "none", None),
    ("none/wC", "none", "C"),
    ("none/wfull", "none", "full"),
    ("mean/wC", "mean", "C"),
    ("focal/none", "focal", None),
    ("focal/none/hard", "focalhard", None),
    ("ignnorm/mean/wC", "ignnorm", "C"),
    ("smooth/mean/wC", "smooth", "C"),
)
MIN_ELEMENTS = {"focal/none": 1 << 24, "focal/none/hard": 1 << 24, "ignnorm/mean/wC": 1 << 24,
                "smooth/mean/wC": 1 << 24}
C = 64


def time_ms(step, iters):
    """Average milliseconds of step() over iters calls, after 3 warm-up calls."""
    for _ in range(3):
        step()
    start = torch.cuda.Event(enable_timing=True)
    stop = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        step()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) / iters


def bench(n, reduction, weights, gen):
    rows = n // C
    x = torch.empty(rows, C, device="cuda").uniform_(-20.0, 20.0, generator=gen)
    x.requires_grad_(True)
    u = torch.rand(rows, C, device="cuda", generator=gen)
    if reduction == "focalhard":
        y = (u >= 0.5).to(torch.float32)
    else:
        y = torch.where(u < 0.4, 0.0, torch.where(u < 0.8, 1.0, (u - 0.8) * 5.0))
    del u
    kwargs = {}
    if weights == "C":
        kwargs["weight"] = 0.5 + 1e-3 * torch.arange(C, device="cuda", dtype=torch.float32)
        kwargs["pos_weight"] = 2.0 + 1e-3 * torch.arange(C, device="cuda", dtype=torch.float32)
    elif weights == "full":
        kwargs["weight"] = torch.full((rows, C), 0.5, device="cuda")
        kwargs["pos_weight"] = torch.full((rows, C), 2.0, device="cuda")
    focal = reduction in ("focal", "focalhard")
    grad_out = torch.ones(rows, C, device="cuda") if reduction == "none" or focal else None

    def step():
        x.grad = None
        if focal:
            p = torch.sigmoid(x)
            ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
            p_t = p * y + (1 - p) * (1 - y)
            loss = ce * ((1 - p_t) ** 2)
            loss = (0.25 * y + 0.75 * (1 - y)) * loss
        elif reduction == "ignnorm":
            mask = (y != -100.0).to(x.dtype)
            per = F.binary_cross_entropy_with_logits(x, y, reduction="none", **kwargs)
            loss = (per * mask).sum() / mask.sum().clamp(min=1.0) / x.numel()
        elif reduction == "smooth":
            loss = F.binary_cross_entropy_with_logits(x, y * 0.9 + 0.05, reduction="mean",
                                                      **kwargs)
        else:
            loss = F.binary_cross_entropy_with_logits(x, y, reduction=reduction, **kwargs)
        loss.backward(grad_out)

    bytes_per = 16 if reduction == "none" or focal else 12
    if weights == "full":
        bytes_per += 8
    iters = int(min(200, max(5, 2e9 / (bytes_per * n))))
    return time_ms(step, iters)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-elements", type=int, default=1 << 28)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("torch_cuda_bench: torch sees no CUDA device", file=sys.stderr)
        return 1
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) on "
          f"{torch.cuda.get_device_name(0)}")
    gen = torch.Generator(device="cuda")
    gen.manual_seed(7)
    print(f"{'variant':<14} {'elements':>11} {'ms':>9} {'Gelem/s':>9}")
    for name, reduction, weights in VARIANTS:
        n = MIN_ELEMENTS.get(name, 1 << 20)
        while n <= args.max_elements:
            try:
                ms = bench(n, reduction, weights, gen)
            except torch.cuda.OutOfMemoryError:
                print(f"{name:<14} {n:>11} out of memory")
                torch.cuda.empty_cache()
                break
            gelem = n / ms / 1e6
            print(f"{name:<14} {n:>11} {ms:>9.3f} {gelem:>9.3f}")
            print(f"TORCH {name} {n} {gelem:.4f}")
            torch.cuda.empty_cache()
            n *= 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
