"""The service benchmark's own logic (tools/bench/lossd_bench): request bytes, the protobuf
reader, medians, per-repetition ratios and tables. No server, no timing."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools" / "bench"))

from lossd_bench import payload, stats  # noqa: E402

pb = pytest.importorskip("lossd._proto.lossd.v1.lossd_pb2")


@pytest.mark.parametrize("n", [16, 100, 1024, 4096 + 64])
def test_request_bytes_are_the_canonical_evaluate_request(n):
    x, y = payload.make_arrays(n)
    raw = payload.encode_request(x, y, request_id="bench")
    m = pb.EvaluateRequest.FromString(raw)
    assert m.request_id == "bench"
    assert list(m.logits.shape) == list(payload.shape_of(n))
    assert m.logits.dtype == pb.DTYPE_FLOAT32 and m.targets.dtype == pb.DTYPE_FLOAT32
    assert np.array_equal(np.frombuffer(m.logits.data, np.float32), x.reshape(-1))
    assert np.array_equal(np.frombuffer(m.targets.data, np.float32), y.reshape(-1))
    assert m.HasField("bce_with_logits") and not m.bce_with_logits.HasField("pos_weight")
    assert m.reduction == pb.REDUCTION_NONE
    assert m.gradients.logits and not m.gradients.targets
    assert m.SerializeToString(deterministic=True) == raw  # canonical field order


def test_fields_reads_a_capabilities_reply():
    caps = pb.Capabilities(server_version="9.9", max_elements=1 << 28).SerializeToString()
    caps += b"\x50\x01" + b"\x5a\x07/lossd-"  # shared_memory (10), shared_memory_prefix (11)
    f = payload.fields(caps)
    assert f[1] == [b"9.9"] and f[10] == [1] and f[11] == [b"/lossd-"] and f[7] == [1 << 28]
    assert payload.fields(b"") == {}
    with pytest.raises(ValueError):
        payload.fields(b"\x0a\x05ab")  # length past the end


def test_counts_and_percentiles():
    assert [stats.parse_count(s) for s in ("16", "1k", "1M", "16M")] == [16, 1024, 1 << 20, 1 << 24]
    assert [stats.format_count(n) for n in (16, 1024, 1 << 20, 1000)] == ["16", "1k", "1M", "1000"]
    assert stats.percentile([5, 1, 3, 2, 4], 50) == 3
    assert stats.percentile([1, 2, 3, 4], 50) == 2  # nearest rank
    assert stats.percentile([7], 99) == 7
    assert math.isnan(stats.percentile([], 50))
    assert stats.median([3, None, float("nan"), 1, 2]) == 2
    assert math.isnan(stats.median([None]))


def test_ratios_are_paired_by_repetition():
    assert stats.paired_ratios([2, 4, None, 9], [1, 2, 5, 0]) == [2, 2]
    assert stats.paired_differences([5, None, 7], [1, 2, 3]) == [4, 4]


def _series(eps, calls=None, p50=None):
    s = stats.Series.empty()
    for i, v in enumerate(eps):
        s.add(v, (calls or eps)[i], (p50 or eps)[i])
    return s


def test_ratio_falls_back_and_reads_local_modes_at_one_caller():
    n = 1 << 20
    results = {
        (n, 16, "lossd-uds"): _series([10.0, 30.0]),
        (n, 16, "raw"): _series([20.0, 20.0]),
        (n, 16, "lossd-shm"): _series([8.0, 8.0]),
        (n, 1, "kernel"): _series([16.0, 32.0]),  # measured once per size, one caller
    }
    assert stats.ratio(results, n, 16, "lossd-uds", ("raw-uds", "raw"), "elements_per_s") \
        == (1.0, "raw")  # median of 0.5 and 1.5
    assert stats.ratio(results, n, 16, "lossd-shm", ("kernel",), "elements_per_s") \
        == (0.375, "kernel")
    value, name = stats.ratio(results, n, 16, "lossd-shm", ("torch",), "elements_per_s")
    assert math.isnan(value) and name is None


def test_tables_show_missing_values_as_dashes():
    results = {
        (1024, 1, "echo"): _series([1e6, 1e6], [1000, 1000], [200.0, 210.0]),
        (1024, 1, "lossd-tcp"): _series([9e5, 9.5e5], [900, 950], [230.0, 250.0]),
        (1024, 1, "lossd-wire"): _series([8e5, 1e6], [800, 1000], [220.0, 200.0]),
    }
    r = stats.ratios_table(results, [1024], [1])
    header, row = r.splitlines()
    assert header.split()[:3] == ["elements", "conc", "tcp/raw"]
    cells = row.split()
    assert cells[:3] == ["1k", "c1", "-"]  # no raw measured
    assert cells[3] == "0.925"  # tcp/echo: median of 0.9 and 0.95
    assert cells[4] == "0.900"  # wire/echo: median of 0.8 and 1.0
    assert cells[-2:] == ["+5.0", "0.900"]  # wire p50 difference (+20, -10), calls/s ratio
    sweep = stats.sweep_table(results, [1024], [1, 4]).splitlines()
    assert len(sweep) == 2
    assert sweep[1].split() == ["1k", "c1", "1000", "205.0", "900", "0.900", "+5.0", "925",
                                "0.925"]
    rates = stats.rates_table(results, [1024], [1], ["raw", "echo", "lossd-tcp"]).splitlines()
    assert [line.split()[2] for line in rates[1:]] == ["echo", "lossd-tcp"]
