"""A large request from the Python client is pipelined: the server's own instants (Timing's
received / compute / reply, reported per part in LossResult.parts) show that computing the
first part starts before the last part has arrived, and that the first part's reply leaves
before the last part is computed. Only the order of instants is asserted, never a duration."""

import numpy as np
import lossd

from bce_reference import bce_reference, violations


def test_a_16m_request_overlaps_receiving_computing_and_replying(lossd_target) -> None:
    n = 16 * 1024 * 1024
    rng = np.random.default_rng(5)
    x = rng.standard_normal((n // 1024, 1024), dtype=np.float32)
    y = (rng.random((n // 1024, 1024)) < 0.5).astype(np.float32)
    with lossd.Client(lossd_target, shared_memory="off", timeout=120) as client:
        r = client.bce_with_logits(x, y, reduction="none", grad=True)
    parts = r.parts
    assert len(parts) >= 8, f"expected a split request, got {len(parts)} part(s)"
    first, last = parts[0], parts[-1]
    for p in parts:
        assert 0 < p.received_unix_ns <= p.compute_start_unix_ns <= p.compute_end_unix_ns \
            <= p.reply_unix_ns, p
    assert first.compute_start_unix_ns < last.received_unix_ns, (first, last)
    assert first.reply_unix_ns < last.compute_end_unix_ns, (first, last)
    # The aggregated timing spans the parts.
    assert r.timing.compute_start_unix_ns == min(p.compute_start_unix_ns for p in parts)
    assert r.timing.reply_unix_ns == max(p.reply_unix_ns for p in parts)
    assert r.timing.compute_ns == sum(p.compute_ns for p in parts)
    # And the result is right: a sample of rows against the float64 reference.
    rows = rng.choice(x.shape[0], 16, replace=False)
    ref = bce_reference(x[rows], y[rows])
    assert violations(r.loss[rows], ref.loss, ref.loss_scale, "float32") is None
    assert violations(r.grad[rows], ref.grad, ref.grad_scale, "float32") is None


def test_a_single_request_has_one_part_with_ordered_instants(lossd_target) -> None:
    x = np.linspace(-3, 3, 1000, dtype=np.float32)
    y = (x > 0).astype(np.float32)
    with lossd.Client(lossd_target) as client:
        r = client.bce_with_logits(x, y, reduction="mean", grad=True)
    assert len(r.parts) == 1 and r.parts[0] == r.timing
    t = r.timing
    assert 0 < t.received_unix_ns <= t.compute_start_unix_ns <= t.compute_end_unix_ns \
        <= t.reply_unix_ns
