"""End-to-end: torch integration (lossd.torch and torch tensors through the client).

torch is optional and not in tests/requirements.txt: `make test` runs this file with the
interpreter of its torch virtual environment (.venv-torch, torch pinned as in
tests/golden/requirements-golden.txt); elsewhere these tests skip without torch. Gradients
from loss.backward() through the remote loss are compared with torch's own
binary_cross_entropy_with_logits (float64: rtol 1e-10 plus atol 1e-14, since torch's float64
formula, (1 - y) x plus a log-sum-exp, is off by a few ulps of |x| (about 4e-15 at |x| = 16) on
tiny losses; float32: torch's default tolerances of torch.testing.assert_close), eager and under
torch.compile (fullgraph=True: no graph break). Inputs come from fixed seeds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (optional dependency; "
                                            "pip install torch to run these tests)")
import torch.nn.functional as F  # noqa: E402

import lossd  # noqa: E402
import lossd.torch as lt  # noqa: E402

REDUCTIONS = ["none", "mean", "sum"]


@pytest.fixture(autouse=True)
def _fixed_torch_seed():
    """Every test draws from the same global torch seed, so a run repeats the last one."""
    torch.manual_seed(0)


def close64(a, b) -> None:
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


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
    seed = 2 * REDUCTIONS.index(reduction) + int(soft)  # fixed: hash() of a str is per process
    x, y, w, p = inputs(torch.float64, soft=soft, seed=seed)
    x1, y1 = x.clone().requires_grad_(), y.clone().requires_grad_()
    x2, y2 = x.clone().requires_grad_(), y.clone().requires_grad_()
    ours = lt.bce_with_logits(x1, y1, w, p, reduction, client=client)
    ref = F.binary_cross_entropy_with_logits(x2, y2, w, reduction=reduction, pos_weight=p)
    assert ours.dtype == torch.float64 and ours.shape == ref.shape
    close64(ours.detach(), ref.detach())
    g = torch.Generator().manual_seed(100 + seed)  # a non-trivial grad_output
    upstream = torch.randn(ref.shape, generator=g, dtype=torch.float64)
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


NO_CUDA = "no CUDA device for torch (torch.cuda.is_available() is False)"


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_cuda_tensors_come_back_on_their_device(client, compiled) -> None:
    # CUDA tensors are copied to the host, sent, and the results copied back to the logits'
    # device: the same values as the same tensors on the CPU.
    x, y, w, p = inputs(torch.float32, seed=17)
    xc = x.cuda().requires_grad_()
    xh = x.clone().requires_grad_()

    def f(a, b, c, d):
        return lt.bce_with_logits(a, b, c, d, reduction="none", client=client)

    g = torch.compile(f, fullgraph=True, backend="aot_eager") if compiled else f
    loss = g(xc, y.cuda(), w.cuda(), p.cuda())
    ref = f(xh, y, w, p)
    assert loss.device == xc.device and loss.dtype == torch.float32
    assert torch.equal(loss.cpu(), ref.detach())
    upstream = torch.randn(loss.shape)
    loss.backward(upstream.cuda())
    ref.backward(upstream)
    assert xc.grad.device == xc.device
    assert torch.equal(xc.grad.cpu(), xh.grad)


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


# -- torch.compile, the custom ops, double backward ------------------------------------------

needs_custom_op = pytest.mark.skipif(not lt.USE_CUSTOM_OP,
                                     reason="torch < 2.4 has no torch.library.custom_op")


@pytest.fixture()
def fresh_dynamo():
    """Each compiled test starts from empty dynamo caches (no reuse across parametrizations)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class RecordingBackend:
    """A torch.compile backend that keeps the dynamo graphs and runs them with aot_eager or
    inductor (AOTAutograd traces the backward through the registered autograd formula)."""

    def __init__(self, backend: str) -> None:
        self.inner = torch._dynamo.lookup_backend(backend)
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return self.inner(gm, example_inputs)

    def lossd_nodes(self):
        return [n for g in self.graphs for n in g.graph.nodes
                if n.op == "call_function" and "lossd" in str(n.target)]


@pytest.fixture(params=["custom_op", "autograd_function"])
def mode(request, monkeypatch):
    """Both implementations: the torch.library custom ops (torch >= 2.4) and the
    autograd.Function used on older torch."""
    if request.param == "custom_op" and not lt.USE_CUSTOM_OP:
        pytest.skip("torch < 2.4 has no torch.library.custom_op")
    monkeypatch.setattr(lt, "USE_CUSTOM_OP", request.param == "custom_op")
    return request.param


@pytest.mark.parametrize("reduction", ["none", "mean", "per_sample_mean"])
def test_both_implementations_match_torch(client, mode, reduction) -> None:
    x, y, w, p = inputs(torch.float64, shape=(5, 6), seed=23, soft=True)
    x1, y1 = x.clone().requires_grad_(), y.clone().requires_grad_()
    x2, y2 = x.clone().requires_grad_(), y.clone().requires_grad_()
    ours = lt.bce_with_logits(x1, y1, w, p, reduction, client=client)
    red = "none" if reduction == "per_sample_mean" else reduction
    ref = F.binary_cross_entropy_with_logits(x2, y2, w, reduction=red, pos_weight=p)
    if reduction == "per_sample_mean":
        ref = ref.mean(-1)
    close64(ours.detach(), ref.detach())
    upstream = torch.randn(ref.shape, dtype=torch.float64)
    ours.backward(upstream)
    ref.backward(upstream)
    close64(x1.grad, x2.grad)
    close64(y1.grad, y2.grad)


def test_no_grad_and_detached_inputs_ask_for_no_gradient(client, mode) -> None:
    x, y, _, _ = inputs(torch.float64, seed=29)
    with torch.no_grad():
        loss = lt.bce_with_logits(x.clone().requires_grad_(), y, client=client)
    assert not loss.requires_grad
    close64(loss, F.binary_cross_entropy_with_logits(x, y))


def test_double_backward_raises_a_clear_error(client, mode) -> None:
    x, y, w, p = inputs(torch.float64, seed=31)
    x1 = x.clone().requires_grad_()
    loss = lt.bce_with_logits(x1, y, w, p, "sum", client=client)
    # create_graph=True itself works and gives the first derivative...
    (g,) = torch.autograd.grad(loss, x1, create_graph=True)
    x2 = x.clone().requires_grad_()
    ref = F.binary_cross_entropy_with_logits(x2, y, w, pos_weight=p, reduction="sum")
    (g_ref,) = torch.autograd.grad(ref, x2)
    close64(g.detach(), g_ref)
    # ...but differentiating it again raises, naming the limitation.
    assert g.requires_grad
    with pytest.raises(RuntimeError, match="higher-order gradients are not supported by lossd"):
        g.sum().backward()
    focal = lt.sigmoid_focal_loss(x1, y, reduction="mean", client=client)
    (gf,) = torch.autograd.grad(focal, x1, create_graph=True)
    with pytest.raises(RuntimeError, match="higher-order gradients are not supported"):
        torch.autograd.grad(gf.sum(), x1)


@needs_custom_op
def test_custom_ops_are_registered_with_fake_and_autograd(client) -> None:
    x, y, w, p = inputs(torch.float64, shape=(3, 4), seed=37)
    key = lt._client_key(client)
    for reduction in ("none", "mean", "sum", "per_sample_mean"):
        for want in (False, True):
            args = (x, y, w, p, key, reduction, want, want, None, False, 0.0, "auto", 60.0)
            torch.library.opcheck(torch.ops.lossd.bce_with_logits.default, args,
                                  test_utils=("test_schema", "test_autograd_registration",
                                              "test_faketensor"))
    args = (x, y, None, 0.25, key, "sum", True, 2.0, "auto", 60.0)
    torch.library.opcheck(torch.ops.lossd.sigmoid_focal_loss.default, args,
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


@needs_custom_op
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_training_step_matches_eager(client, fresh_dynamo, backend) -> None:
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 4)).double()
    twin = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 4)).double()
    twin.load_state_dict(model.state_dict())
    pos_weight = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    criterion = lt.BCEWithLogitsLoss(pos_weight=pos_weight, client=client)

    def loss_of(net, x, y):
        return criterion(net(x), y)

    recorder = RecordingBackend(backend)
    compiled = torch.compile(loss_of, fullgraph=True, backend=recorder)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    opt_twin = torch.optim.SGD(twin.parameters(), lr=0.5)
    for step in range(3):
        x = torch.randn(16, 6, dtype=torch.float64)
        y = torch.randint(0, 2, (16, 4)).double()
        loss = compiled(model, x, y)
        loss.backward()
        eager = loss_of(twin, x, y)
        eager.backward()
        ref = F.binary_cross_entropy_with_logits(twin(x), y, pos_weight=pos_weight)
        close64(loss.detach(), ref.detach())
        assert torch.equal(loss.detach(), eager.detach())  # the same server call: same bits
        for a, b in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-15)
        opt.step()
        opt_twin.step()
        opt.zero_grad()
        opt_twin.zero_grad()
    assert len(recorder.graphs) == 1  # one graph, compiled once, reused
    assert len(recorder.lossd_nodes()) == 1  # the loss is one node of it


@needs_custom_op
@pytest.mark.parametrize("reduction", ["none", "sum", "per_sample_mean"])
def test_compiled_options_targets_grad_and_focal(client, fresh_dynamo, reduction) -> None:
    x, y, w, _ = inputs(torch.float64, shape=(4, 5), seed=41, soft=True)

    def f(a, b):
        bce = lt.bce_with_logits(a, b, w, reduction=reduction, client=client,
                                 label_smoothing=0.1)
        focal = lt.sigmoid_focal_loss(a, b.detach(), alpha=0.3, gamma=1.5,
                                      reduction=reduction, client=client)
        return bce, focal

    recorder = RecordingBackend("aot_eager")
    compiled = torch.compile(f, fullgraph=True, backend=recorder)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ys = [y.clone().requires_grad_() for _ in range(2)]
    got = compiled(xs[0], ys[0])
    want = f(xs[1], ys[1])
    upstream = torch.randn(got[0].shape, dtype=torch.float64)
    for a, b in zip(got, want):
        assert a.shape == b.shape and torch.equal(a.detach(), b.detach())
    (got[0] * upstream + got[1] * 2 * upstream).sum().backward()
    (want[0] * upstream + want[1] * 2 * upstream).sum().backward()
    assert torch.equal(xs[0].grad, xs[1].grad)
    assert torch.equal(ys[0].grad, ys[1].grad)
    assert len(recorder.lossd_nodes()) == 2
    # The float64 reference of the BCE part (Keras label smoothing).
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    ref = F.binary_cross_entropy_with_logits(xr, yr * 0.9 + 0.05, w, reduction="none")
    ref = {"none": ref, "sum": ref.sum(), "per_sample_mean": ref.mean(-1)}[reduction]
    close64(got[0].detach(), ref.detach())


@needs_custom_op
def test_compiled_with_the_default_client(client, lossd_target, fresh_dynamo,
                                          monkeypatch) -> None:
    # Without client=, the default client is looked up when the op runs, not while tracing.
    lt.set_default_client(None)
    monkeypatch.setenv("LOSSD_TARGET", lossd_target)
    x, y, _, _ = inputs(torch.float64, seed=43)
    try:
        f = torch.compile(lambda a, b: lt.bce_with_logits(a, b, timeout=math.inf),
                          fullgraph=True, backend="aot_eager")
        close64(f(x, y), F.binary_cross_entropy_with_logits(x, y))
        # Another batch size: a recompile with a dynamic shape (the fake kernel's shapes).
        for rows in (3, 5):
            close64(f(x[:rows], y[:rows]),
                    F.binary_cross_entropy_with_logits(x[:rows], y[:rows]))
            r = torch.compile(lambda a, b: lt.bce_with_logits(a, b, reduction="none"),
                              fullgraph=True, backend="aot_eager")(x[:rows], y[:rows])
            close64(r, F.binary_cross_entropy_with_logits(x[:rows], y[:rows], reduction="none"))
    finally:
        default = lt.get_default_client()
        lt.set_default_client(None)
        default.close()


# -- CUDA IPC: CUDA tensors passed by reference to a local server on the same GPU ----------


def _bits(t):
    """The tensor's bit patterns (bitwise comparison, NaNs and signed zeros included)."""
    t = t.detach().contiguous()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[
        t.element_size()]).cpu()


@pytest.fixture()
def gpu_server(server_factory):
    """A server started with --device auto on this GPU that offers CUDA IPC."""
    if not torch.cuda.is_available():
        pytest.skip(NO_CUDA)
    server = server_factory(device="auto")
    with lossd.Client(server.target, cuda_ipc="off") as c:
        caps = c.capabilities()
    if not caps.cuda_ipc:
        pytest.skip(f"the server does not offer CUDA IPC (a build without CUDA?): "
                    f"{caps.devices}, {caps.cuda_device_name!r}")
    return server.target


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=["f32", "f64", "f16", "bf16"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum", "per_sample_mean"])
def test_cuda_ipc_results_are_the_host_paths_bits(gpu_server, dtype, reduction) -> None:
    x, y, w, p = (t.cuda() for t in inputs(dtype, shape=(37, 129), seed=23, soft=True))
    with lossd.Client(gpu_server, cuda_ipc="on") as ipc, \
            lossd.Client(gpu_server, cuda_ipc="off") as host:
        got = ipc.bce_with_logits(x, y, weight=w, pos_weight=p, reduction=reduction, grad=True,
                                  grad_targets=True, device="cuda")
        assert ipc.cuda_ipc_decision.path == "cuda_ipc", ipc.cuda_ipc_decision
        assert len(ipc._cuda.regions) >= 1
        want = host.bce_with_logits(x, y, weight=w, pos_weight=p, reduction=reduction,
                                    grad=True, grad_targets=True, device="cuda")
        assert host.cuda_ipc_decision.path == "host"
    assert got.device == "cuda"
    for name in ("loss", "grad", "grad_targets"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.device == x.device and a.dtype == dtype and a.shape == b.shape, name
        assert torch.equal(_bits(a), _bits(b)), name


def test_cuda_ipc_autograd_is_the_default_and_reuses_registrations(gpu_server, caplog) -> None:
    import logging

    x, y, w, p = (t.cuda() for t in inputs(torch.float32, shape=(64, 33), seed=29, soft=True))
    with caplog.at_level(logging.INFO, logger="lossd"):
        with lossd.Client(gpu_server) as ipc, lossd.Client(gpu_server, cuda_ipc="off") as host:
            def step(client):
                xg = x.clone().requires_grad_()
                yg = y.clone().requires_grad_()
                loss = lt.bce_with_logits(xg, yg, w, p, "none", client=client, device="cuda")
                loss.backward(torch.ones_like(loss) * 0.5)
                return loss.detach(), xg.grad, yg.grad

            first = step(ipc)
            assert ipc.cuda_ipc_decision.path == "cuda_ipc", ipc.cuda_ipc_decision
            regions = ipc._cuda.regions
            registered, count = regions.registrations, len(regions)
            del first
            again = step(ipc)  # the same blocks: no new registration
            assert regions.registrations == registered and len(regions) == count
            want = step(host)
            for a, b, name in zip(again, want, ("loss", "dx", "dy")):
                assert a.device == x.device, name
                assert torch.equal(_bits(a), _bits(b)), name
            # A transposed (non-contiguous) input is made dense on the device first.
            xt = x.t().contiguous().t()
            r = ipc.bce_with_logits(xt, y, reduction="none", grad=True, device="cuda")
            ref = host.bce_with_logits(x, y, reduction="none", grad=True, device="cuda")
            assert torch.equal(_bits(r.grad), _bits(ref.grad))
            assert ipc.cuda_ipc_decision.path == "cuda_ipc"
    lines = [r.getMessage() for r in caplog.records if "CUDA IPC on" in r.getMessage()]
    assert len(lines) == 1 and "(cuda:" in lines[0], lines


def test_cuda_ipc_with_the_async_client(gpu_server) -> None:
    import asyncio

    x, y, _, _ = (t.cuda() for t in inputs(torch.float32, shape=(8, 16), seed=31, soft=True))

    async def run():
        async with lossd.AsyncClient(gpu_server) as client:
            r = await client.bce_with_logits(x, y, reduction="none", grad=True, device="cuda")
            return r, client.cuda_ipc_decision

    got, decision = asyncio.run(run())
    assert decision.path == "cuda_ipc", decision
    with lossd.Client(gpu_server, cuda_ipc="off") as host:
        want = host.bce_with_logits(x, y, reduction="none", grad=True, device="cuda")
    assert got.grad.device == x.device
    assert torch.equal(_bits(got.loss), _bits(want.loss))
    assert torch.equal(_bits(got.grad), _bits(want.grad))
