#!/usr/bin/env python3
"""Writes the seed corpus of evaluate_fuzzer: small valid lossd.v1.EvaluateRequest messages.

Usage (from the repository root, with the test venv that has protobuf and numpy):
    .venv/bin/python tests/fuzz/make_corpus.py [--out tests/fuzz/corpus]

Each seed covers one feature the fuzzer should start from: BCE with weight and pos_weight
broadcast as [C], [N,1] and an expanded pattern, every reduction (PER_SAMPLE_MEAN included),
the focal loss, ignore_index/normalize, label smoothing, the float16/bfloat16/float64 dtypes,
scalar and empty tensors. The output is deterministic (fixed random seed); every file is far
below 4 KiB. Existing *.pb files in the output folder are replaced.
"""

import argparse
import importlib.util
import pathlib

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
PB2 = ROOT / "client/python/src/lossd/_proto/lossd/v1/lossd_pb2.py"


def load_pb2():
    # Loaded from its file so that the lossd client package (and gRPC) need not be importable.
    spec = importlib.util.spec_from_file_location("lossd_pb2", PB2)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pb = load_pb2()
rng = np.random.default_rng(20261207)

DTYPES = {
    "float32": (pb.DTYPE_FLOAT32, np.float32),
    "float64": (pb.DTYPE_FLOAT64, np.float64),
    "float16": (pb.DTYPE_FLOAT16, np.float16),
}


def tensor(t, array, dtype="float32"):
    """Fills the Tensor message t with array (shape and little-endian bytes) in dtype."""
    array = np.asarray(array, dtype=np.float64)
    t.shape[:] = list(array.shape)
    if dtype == "bfloat16":
        t.dtype = pb.DTYPE_BFLOAT16
        bits = array.astype("<f4").view("<u4")
        t.data = (bits >> 16).astype("<u2").tobytes()  # truncation is fine for seeds
    else:
        code, np_type = DTYPES[dtype]
        t.dtype = code
        t.data = array.astype(np.dtype(np_type).newbyteorder("<")).tobytes()


def logits(*shape):
    return rng.normal(0.0, 3.0, size=shape)


def targets(*shape):
    return rng.integers(0, 2, size=shape).astype(np.float64)


def request(shape, dtype="float32", reduction=pb.REDUCTION_MEAN, loss="bce"):
    r = pb.EvaluateRequest()
    tensor(r.logits, logits(*shape), dtype)
    tensor(r.targets, targets(*shape), dtype)
    r.reduction = reduction
    if loss == "bce":
        r.bce_with_logits.SetInParent()
    else:
        r.sigmoid_focal_loss.SetInParent()
    return r


def seeds():
    out = {}

    r = request((4, 7))
    tensor(r.weight, rng.uniform(0.5, 2.0, size=(7,)))
    tensor(r.bce_with_logits.pos_weight, rng.uniform(0.5, 3.0, size=(7,)))
    r.gradients.logits = True
    out["bce_mean_weight_c_pos_weight_c"] = r

    r = request((4, 7), reduction=pb.REDUCTION_NONE)
    tensor(r.weight, rng.uniform(0.5, 2.0, size=(4, 1)))
    r.gradients.logits = True
    r.gradients.targets = True
    out["bce_none_weight_n1_grads"] = r

    r = request((3, 5), reduction=pb.REDUCTION_SUM)
    tensor(r.bce_with_logits.pos_weight, rng.uniform(0.5, 3.0, size=(5,)))
    out["bce_sum_pos_weight_c"] = r

    r = request((4, 7), reduction=pb.REDUCTION_PER_SAMPLE_MEAN)
    tensor(r.weight, rng.uniform(0.5, 2.0, size=(7,)))
    r.gradients.logits = True
    out["bce_per_sample_mean_weight_c"] = r

    r = request((3, 0), reduction=pb.REDUCTION_PER_SAMPLE_MEAN)
    out["bce_per_sample_mean_empty_rows"] = r

    r = request((8,), reduction=pb.REDUCTION_UNSPECIFIED)
    out["bce_unspecified_reduction"] = r

    r = request((), reduction=pb.REDUCTION_PER_SAMPLE_MEAN)
    out["bce_scalar_per_sample_mean"] = r

    r = request((2, 3, 4), reduction=pb.REDUCTION_NONE)
    tensor(r.weight, rng.uniform(0.5, 2.0, size=(2, 1, 4)))  # expanded by MakeOperand
    out["bce_none_weight_expanded"] = r

    r = request((4, 7), loss="focal")
    r.sigmoid_focal_loss.alpha = 0.25
    r.sigmoid_focal_loss.gamma = 2.0
    tensor(r.weight, rng.uniform(0.5, 2.0, size=(4, 7)))
    r.gradients.logits = True
    out["focal_mean_weight_full"] = r

    r = request((3, 6), reduction=pb.REDUCTION_NONE, loss="focal")
    r.sigmoid_focal_loss.alpha = -1.0
    r.sigmoid_focal_loss.gamma = 1.5
    r.gradients.logits = True
    out["focal_none_no_alpha_gamma_1_5"] = r

    r = request((4, 5))
    y = targets(4, 5)
    y[0, 1] = y[2, 3] = y[3, 0] = -100.0
    tensor(r.targets, y)
    r.bce_with_logits.ignore_index = -100
    r.bce_with_logits.normalize = True
    r.gradients.logits = True
    out["bce_ignore_index_normalize"] = r

    r = request((4, 5), reduction=pb.REDUCTION_NONE)
    r.bce_with_logits.label_smoothing = 0.1
    r.gradients.targets = True
    out["bce_label_smoothing"] = r

    r = request((2, 3, 4), dtype="float16", reduction=pb.REDUCTION_SUM)
    tensor(r.weight, rng.uniform(0.5, 2.0, size=(3, 1)), "float16")
    tensor(r.bce_with_logits.pos_weight, rng.uniform(0.5, 3.0, size=(4,)), "float16")
    r.gradients.logits = True
    out["bce_float16_sum"] = r

    r = request((5, 6), dtype="bfloat16", reduction=pb.REDUCTION_PER_SAMPLE_MEAN)
    tensor(r.bce_with_logits.pos_weight, rng.uniform(0.5, 3.0, size=(6,)), "bfloat16")
    out["bce_bfloat16_per_sample_mean"] = r

    r = request((3, 4), dtype="float64", reduction=pb.REDUCTION_NONE)
    tensor(r.targets, targets(3, 4), "float32")  # targets may have their own dtype
    r.reject_nan = True
    r.device = pb.DEVICE_CPU
    r.gradients.logits = True
    out["bce_float64_mixed_targets_reject_nan"] = r

    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "corpus"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("*.pb"):
        old.unlink()
    for name, r in seeds().items():
        data = r.SerializeToString()
        assert len(data) < 4096, (name, len(data))
        (args.out / f"{name}.pb").write_bytes(data)
        print(f"{name}.pb: {len(data)} bytes")


if __name__ == "__main__":
    main()
