"""End-to-end: the command-line client (python -m lossd, as a subprocess) on .npy/.npz files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import lossd


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("LOSSD_TARGET", None)
    return subprocess.run([sys.executable, "-m", "lossd", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 250)).astype(np.float32)
    y = rng.integers(0, 2, x.shape).astype(np.float32)
    w = rng.uniform(0, 2, (400, 1)).astype(np.float32)
    p = rng.uniform(0, 3, (250,)).astype(np.float32)
    for name, a in (("x", x), ("y", y), ("w", w), ("p", p)):
        np.save(d / f"{name}.npy", a)
    np.savez(d / "all.npz", logits=x, targets=y, weight=w, pos_weight=p)
    np.savez(d / "bad.npz", logits=x, labels=y)
    return d, x, y, w, p


def test_eval_npy_to_npz_with_progress(lossd_target, client, files) -> None:
    d, x, y, w, p = files
    out = d / "out.npz"
    r = cli("eval", "--target", lossd_target, "--logits", str(d / "x.npy"), "--targets",
            str(d / "y.npy"), "--weight", str(d / "w.npy"), "--pos-weight", str(d / "p.npy"),
            "--reduction", "none", "--grad", "--grad-targets", "--out", str(out),
            "--max-message-bytes", "200000", "--progress")
    assert r.returncode == 0, r.stderr
    assert "results written to" in r.stdout and "loss: shape [400, 250] float32" in r.stdout
    assert "elements (100.0%)" in r.stderr  # progress of the split request
    expected = client.bce_with_logits(x, y, weight=w, pos_weight=p, reduction="none", grad=True,
                                      grad_targets=True)
    with np.load(out) as got:
        assert sorted(got.files) == ["grad", "grad_targets", "loss"]
        for name in got.files:
            assert got[name].tobytes() == getattr(expected, name).tobytes(), name


def test_eval_npz_json_summary(lossd_target, client, files) -> None:
    d, x, y, w, p = files
    r = cli("eval", "--target", lossd_target, "--npz", str(d / "all.npz"), "--json",
            "--label-smoothing", "0.1", "--request-id", "cli-1")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    expected = client.bce_with_logits(x, y, weight=w, pos_weight=p, label_smoothing=0.1)
    assert summary["loss"] == float(expected.loss)
    assert summary["num_elements"] == x.size and summary["device"] == "cpu"
    assert summary["request_id"] == "cli-1" and summary["loss_shape"] == []
    assert r.stderr == ""  # one request: no progress output


def test_eval_focal_and_npz_key(lossd_target, client, files) -> None:
    d, x, y, _, _ = files
    r = cli("eval", "--target", lossd_target, "--logits", f"{d / 'all.npz'}:logits",
            "--targets", str(d / "y.npy"), "--loss", "focal", "--gamma", "1.5",
            "--reduction", "sum", "--json")
    assert r.returncode == 0, r.stderr
    expected = client.sigmoid_focal_loss(x, y, gamma=1.5, reduction="sum")
    assert json.loads(r.stdout)["loss"] == float(expected.loss)


def test_health_and_capabilities(lossd_target) -> None:
    r = cli("health", "--target", lossd_target)
    assert r.returncode == 0 and r.stdout.strip() == "SERVING"
    r = cli("health", "--target", lossd_target, "--service", "lossd.v1.LossService")
    assert r.returncode == 0 and r.stdout.strip() == "SERVING"
    r = cli("capabilities", "--target", lossd_target)
    assert r.returncode == 0, r.stderr
    caps = json.loads(r.stdout)
    assert "sigmoid_focal_loss" in caps["losses"] and caps["devices"] == ["cpu"]


def test_exit_codes(lossd_target, files) -> None:
    d, *_ = files
    # 1: the server refused (its message is printed).
    r = cli("eval", "--target", lossd_target, "--logits", str(d / "x.npy"), "--targets",
            str(d / "p.npy"))
    assert r.returncode == 1
    assert "INVALID_ARGUMENT" in r.stderr and "[250]" in r.stderr
    r = cli("eval", "--target", lossd_target, "--npz", str(d / "all.npz"), "--device", "cuda")
    assert r.returncode == 1 and "FAILED_PRECONDITION" in r.stderr
    r = cli("health", "--target", lossd_target, "--service", "nope")
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr
    # 2: usage and input errors.
    assert cli().returncode == 2
    assert cli("eval", "--bogus").returncode == 2
    r = cli("eval", "--target", lossd_target, "--logits", str(d / "missing.npy"), "--targets",
            str(d / "y.npy"))
    assert r.returncode == 2 and "cannot read" in r.stderr
    r = cli("eval", "--target", lossd_target, "--npz", str(d / "bad.npz"))
    assert r.returncode == 2 and "labels" in r.stderr
    r = cli("eval", "--target", lossd_target, "--logits", str(d / "x.npy"))
    assert r.returncode == 2 and "missing targets" in r.stderr
    r = cli("eval", "--target", lossd_target, "--npz", str(d / "all.npz"),
            "--label-smoothing", "2")
    assert r.returncode == 2 and "label_smoothing" in r.stderr


def test_console_script_is_installed() -> None:
    script = os.path.join(os.path.dirname(sys.executable), "lossd-cli")
    if not os.path.exists(script):
        pytest.skip("lossd-cli is not on this interpreter's bin directory")
    r = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "eval" in r.stdout
    assert lossd.__version__
