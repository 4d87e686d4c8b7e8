"""End-to-end: torch integration (lossd.torch and torch tensors through the client).

torch is optional and not in tests/requirements.txt: these tests skip without it. Gradients
from loss.backward() through the remote loss are compared with torch's own
binary_cross_entropy_with_logits (float64: rtol 1e-10; float32: torch's default tolerances of
torch.testing.assert_close).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (optional dependency; "
                                            "pip install torch to run these tests)")
import torch.nn.functional as F  # noqa: E402

import lossd  # noqa: E402
import lossd.torch as lt  # noqa: E402

REDUCTIONS = ["none", "mean", "sum"]


def close64(a, b) -> None:
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-300)


def inputs(dtype, shape=(6, 7), seed=0, soft=False):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 4).to(dtype)
    if soft:
        y = torch.rand(shape, generator=g, dtype=torch.float64).to(dtype)
    else:
        y = torch.randint(0, 2, shape, generator=g).to(dtype)
    w = torch.rand(shape[-1:], generator=g, dtype=torch.float64).to(dtype) * 2
    p = torch.rand(shape[-1:], generator=g, dtype=torch.float64).to(dtype) * 3
    return x, y, w, p


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_backward_matches_torch_float64(client, reduction, soft) -> None:
    x, y, w, p = inputs(torch.float64, soft=soft, seed=hash((reduction, soft)) % 1000)
    x1, y1 = x.clone().requires_grad_(), y.clone().requires_grad_()
    x2, y2 = x.clone().requires_grad_(), y.clone().requires_grad_()
    ours = lt.bce_with_logits(x1, y1, w, p, reduction, client=client)
    ref = F.binary_cross_entropy_with_logits(x2, y2, w, reduction=reduction, pos_weight=p)
    assert ours.dtype == torch.float64 and ours.shape == ref.shape
    close64(ours.detach(), ref.detach())
    upstream = torch.randn(ref.shape, dtype=torch.float64)  # a non-trivial grad_output
    ours.backward(upstream)
    ref.backward(upstream)
    close64(x1.grad, x2.grad)
    close64(y1.grad, y2.grad)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_backward_matches_torch_float32(client, reduction) -> None:
    x, y, w, p = inputs(torch.float32, shape=(32, 10), seed=3)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = lt.bce_with_logits(x1, y, w, p, reduction, client=client)
    ref = F.binary_cross_entropy_with_logits(x2, y, w, reduction=reduction, pos_weight=p)
    torch.testing.assert_close(ours, ref)
    (ours.sum() * 3).backward()
    (ref.sum() * 3).backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    assert y.grad is None


def test_module_in_a_training_step(client) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3).double()
    twin = torch.nn.Linear(5, 3).double()
    twin.load_state_dict(model.state_dict())
    pos_weight = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    weight = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    ours = lt.BCEWithLogitsLoss(weight=weight, pos_weight=pos_weight, client=client)
    ref = torch.nn.BCEWithLogitsLoss(weight=weight, pos_weight=pos_weight)
    assert set(ours.state_dict()) == {"weight", "pos_weight"}  # buffers, as in torch
    x = torch.randn(16, 5, dtype=torch.float64)
    y = torch.randint(0, 2, (16, 3)).double()
    loss_ours = ours(model(x), y)
    loss_ref = ref(twin(x), y)
    close64(loss_ours.detach(), loss_ref.detach())
    loss_ours.backward()
    loss_ref.backward()
    for a, b in zip(model.parameters(), twin.parameters()):
        close64(a.grad, b.grad)
    assert "reduction='mean'" in repr(ours)


def test_per_sample_mean_and_options(client) -> None:
    x, y, w, _ = inputs(torch.float64, shape=(4, 6), seed=5)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = lt.bce_with_logits(x1, y, w, reduction="per_sample_mean", client=client,
                              label_smoothing=0.2)
    ys = y * 0.8 + 0.1
    ref = F.binary_cross_entropy_with_logits(x2, ys, w, reduction="none").mean(-1)
    close64(ours.detach(), ref.detach())
    g = torch.randn(4, dtype=torch.float64)
    ours.backward(g)
    ref.backward(g)
    close64(x1.grad, x2.grad)


def test_sigmoid_focal_loss_matches_torchvision_formula(client) -> None:
    x, y, _, _ = inputs(torch.float64, shape=(5, 8), seed=7)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = lt.sigmoid_focal_loss(x1, y, alpha=0.25, gamma=2.0, reduction="mean", client=client)
    try:
        from torchvision.ops import sigmoid_focal_loss as tv_focal
        ref = tv_focal(x2, y, alpha=0.25, gamma=2.0, reduction="mean")
    except ImportError:  # torchvision's definition, written out
        p = torch.sigmoid(x2)
        ce = F.binary_cross_entropy_with_logits(x2, y, reduction="none")
        p_t = p * y + (1 - p) * (1 - y)
        ref = ((0.25 * y + 0.75 * (1 - y)) * ce * (1 - p_t) ** 2).mean()
    close64(ours.detach(), ref.detach())
    ours.backward()
    ref.backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=str)
def test_tensors_through_the_client_keep_dtype(client, dtype) -> None:
    x, y, w, p = inputs(dtype, seed=11)
    r = client.bce_with_logits(x, y, weight=w, pos_weight=p, reduction="none", grad=True)
    assert isinstance(r.loss, torch.Tensor) and r.loss.dtype == dtype
    assert r.grad.dtype == dtype and r.grad.shape == x.shape and r.loss.device == x.device
    ref = F.binary_cross_entropy_with_logits(x.double(), y.double(), w.double(),
                                             pos_weight=p.double(), reduction="none")
    tol = {torch.float32: 1e-5, torch.float64: 1e-12}.get(dtype, 2e-2)
    torch.testing.assert_close(r.loss.double(), ref, rtol=tol, atol=tol)
    mean = client.bce_with_logits(x, y, reduction="mean")
    assert mean.loss.shape == () and mean.loss.dtype == dtype


def test_numpy_logits_with_torch_targets_give_numpy(client) -> None:
    r = client.bce_with_logits(np.zeros(3, np.float32), torch.ones(3), reduction="none")
    assert isinstance(r.loss, np.ndarray)


def test_split_requests_with_tensors(client, lossd_target) -> None:
    x, y, _, _ = inputs(torch.float32, shape=(300, 200), seed=13)
    with lossd.Client(lossd_target, max_message_bytes=64 * 1024) as small:
        x1 = x.clone().requires_grad_()
        loss = lt.bce_with_logits(x1, y, reduction="mean", client=small)
        loss.backward()
    x2 = x.clone().requires_grad_()
    ref = lt.bce_with_logits(x2, y, reduction="mean", client=client)
    ref.backward()
    assert torch.equal(loss, ref) and torch.equal(x1.grad, x2.grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device for torch")
def test_cuda_tensors_come_back_on_their_device(client) -> None:
    x, y, w, p = (t.cuda() for t in inputs(torch.float32, seed=17))
    x.requires_grad_()
    loss = lt.bce_with_logits(x, y, w, p, client=client)
    assert loss.device == x.device
    loss.backward()
    assert x.grad.device == x.device


def test_errors_and_default_client(client, lossd_target, monkeypatch) -> None:
    x, y, w, _ = inputs(torch.float64, seed=19)
    with pytest.raises(ValueError, match="weight requires grad"):
        lt.bce_with_logits(x, y, w.clone().requires_grad_(), client=client)
    with pytest.raises(lossd.InvalidArgumentError):
        lt.bce_with_logits(x, y[:, :3], client=client)
    with pytest.raises(ValueError, match="size_average"):
        lt.binary_cross_entropy_with_logits(x, y, size_average=True, client=client)
    lt.set_default_client(None)
    monkeypatch.delenv("LOSSD_TARGET", raising=False)
    with pytest.raises(ValueError, match="LOSSD_TARGET"):
        lt.get_default_client()
    monkeypatch.setenv("LOSSD_TARGET", lossd_target)
    try:
        loss = lt.binary_cross_entropy_with_logits(x, y)
        close64(loss, F.binary_cross_entropy_with_logits(x, y))
        assert lossd.torch is lt
    finally:
        default = lt.get_default_client()
        lt.set_default_client(None)
        default.close()
