"""End-to-end: Triton's system shared memory extension on lossd's KServe v2 / Open Inference
Protocol API (docs/interop.md, "System shared memory"), with Triton's own clients over both
protocols: tritonclient.utils.shared_memory creates the POSIX objects,
register_system_shared_memory registers them, inputs and requested outputs name them with
set_shared_memory. Results through shared memory are bitwise those of raw contents."""

from __future__ import annotations

import os

import numpy as np
import pytest

tritonclient_grpc = pytest.importorskip(
    "tritonclient.grpc", reason="tritonclient[grpc] is pinned in tests/requirements.txt")
tritonclient_http = pytest.importorskip(
    "tritonclient.http", reason="tritonclient[http] is pinned in tests/requirements.txt")
shm = pytest.importorskip("tritonclient.utils.shared_memory")
from tritonclient.utils import InferenceServerException  # noqa: E402

from conftest import ServerProcess  # noqa: E402
from helpers import http_address  # noqa: E402

RNG = np.random.default_rng(7)
X = RNG.standard_normal((6, 5)).astype(np.float32)
Y = RNG.integers(0, 2, size=(6, 5)).astype(np.float32)


def _client(server: ServerProcess, protocol: str):
    """A tritonclient of `protocol` ("grpc" or "http") for `server`."""
    if protocol == "grpc":
        return tritonclient_grpc.InferenceServerClient(url=server.target)
    return tritonclient_http.InferenceServerClient(url=http_address(server))


def _fails(call, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as e:
        call(*args, **kwargs)
    return e.value


@pytest.fixture()
def regions():
    """``regions(name, byte_size)`` creates a shared-memory object under lossd's default prefix
    with tritonclient's utility; every one is destroyed after the test."""
    made = []

    def make(name: str, byte_size: int):
        key = f"/lossd-triton-{os.getpid()}-{name}"
        handle = shm.create_shared_memory_region(name, key, byte_size)
        made.append(handle)
        return key, handle

    yield make
    for handle in made:
        shm.destroy_shared_memory_region(handle)


def _raw(module, client, outputs, **params):
    inputs = []
    for name, a in (("LOGITS", X), ("TARGETS", Y)):
        inp = module.InferInput(name, list(a.shape), "FP32")
        inp.set_data_from_numpy(a)
        inputs.append(inp)
    r = client.infer("bce_with_logits", inputs,
                     outputs=[module.InferRequestedOutput(o) for o in outputs], **params)
    return {o: r.as_numpy(o) for o in outputs}


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_inputs_and_outputs_through_system_shared_memory(server_factory, regions,
                                                         protocol) -> None:
    server = server_factory("--http_port", "0")
    module = tritonclient_grpc if protocol == "grpc" else tritonclient_http
    client = _client(server, protocol)
    try:
        nbytes = X.nbytes
        in_key, in_handle = regions("in", 2 * nbytes + 64)
        out_key, out_handle = regions("out", 2 * nbytes + 128)
        shm.set_shared_memory_region(in_handle, [X])
        shm.set_shared_memory_region(in_handle, [Y], offset=nbytes)
        client.register_system_shared_memory("in", in_key, 2 * nbytes + 64)
        client.register_system_shared_memory("out", out_key, 2 * nbytes, offset=128)

        status = client.get_system_shared_memory_status()
        if protocol == "grpc":
            got = {n: (r.name, r.key, r.offset, r.byte_size) for n, r in status.regions.items()}
        else:
            got = {r["name"]: (r["name"], r["key"], r["offset"], r["byte_size"]) for r in status}
        assert got == {"in": ("in", in_key, 0, 2 * nbytes + 64),
                       "out": ("out", out_key, 128, 2 * nbytes)}

        for reduction in ("none", "mean"):
            params = {"parameters": {"reduction": reduction, "label_smoothing": 0.1}}
            want = _raw(module, client, ["LOSS", "GRAD_LOGITS"], **params)
            inputs = [module.InferInput("LOGITS", list(X.shape), "FP32"),
                      module.InferInput("TARGETS", list(Y.shape), "FP32")]
            inputs[0].set_shared_memory("in", nbytes)
            inputs[1].set_shared_memory("in", nbytes, offset=nbytes)
            loss_bytes = want["LOSS"].nbytes
            outputs = [module.InferRequestedOutput("LOSS"),
                       module.InferRequestedOutput("GRAD_LOGITS")]
            outputs[0].set_shared_memory("out", loss_bytes)
            outputs[1].set_shared_memory("out", nbytes, offset=nbytes)
            r = client.infer("bce_with_logits", inputs, outputs=outputs, **params)
            # Output metadata still comes back; the bytes are in the region, not the reply.
            meta = r.get_output("LOSS")
            if protocol == "grpc":
                shape, datatype = list(meta.shape), meta.datatype
                assert all(len(c) == 0 for c in r.get_response().raw_output_contents)
            else:
                shape, datatype = meta["shape"], meta["datatype"]
                assert "data" not in meta
            assert datatype == "FP32" and shape == list(want["LOSS"].shape)
            # The region "out" starts at offset 128 of its object.
            # (a scalar is read as one element: the utility's size of shape [] is a float)
            loss = shm.get_contents_as_numpy(out_handle, np.float32,
                                             list(want["LOSS"].shape) or [1], offset=128)
            grad = shm.get_contents_as_numpy(out_handle, np.float32, list(X.shape),
                                             offset=128 + nbytes)
            assert loss.tobytes() == want["LOSS"].tobytes()
            assert grad.tobytes() == want["GRAD_LOGITS"].tobytes()

        # One input from shared memory, the other raw (its raw_input_contents is the only one).
        inputs = [module.InferInput("LOGITS", list(X.shape), "FP32"),
                  module.InferInput("TARGETS", list(Y.shape), "FP32")]
        inputs[0].set_data_from_numpy(X)
        inputs[1].set_shared_memory("in", nbytes, offset=nbytes)
        r = client.infer("bce_with_logits", inputs, outputs=[module.InferRequestedOutput("LOSS")])
        assert r.as_numpy("LOSS").tobytes() == _raw(module, client, ["LOSS"])["LOSS"].tobytes()

        client.unregister_system_shared_memory("out")
        status = client.get_system_shared_memory_status()
        names = list(status.regions) if protocol == "grpc" else [r["name"] for r in status]
        assert names == ["in"]
        e = _fails(client.get_system_shared_memory_status, "out")
        assert "'out' is not registered" in str(e)
        client.unregister_system_shared_memory("never-registered")  # no error, as Triton
        client.unregister_system_shared_memory()
        status = client.get_system_shared_memory_status()
        assert len(status.regions if protocol == "grpc" else status) == 0
    finally:
        client.close()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_shared_memory_errors_are_clear(server_factory, regions, protocol) -> None:
    server = server_factory("--http_port", "0")
    module = tritonclient_grpc if protocol == "grpc" else tritonclient_http
    client = _client(server, protocol)
    try:
        nbytes = X.nbytes
        key, handle = regions("small", nbytes + 16)
        shm.set_shared_memory_region(handle, [X])
        client.register_system_shared_memory("small", key, nbytes + 16)
        e = _fails(client.register_system_shared_memory, "small", key, nbytes)
        assert "already registered" in str(e)
        e = _fails(client.register_system_shared_memory, "other", "/elsewhere-x", 8)
        assert "prefix" in str(e)
        e = _fails(client.register_system_shared_memory, "big", key, nbytes + 17)
        assert "exceeds the size" in str(e)
        e = _fails(client.register_system_shared_memory, "none", "/lossd-triton-missing", 8)
        assert "cannot open" in str(e)

        def infer(region, byte_size, offset=0, output=False):
            inputs = [module.InferInput("LOGITS", list(X.shape), "FP32"),
                      module.InferInput("TARGETS", list(Y.shape), "FP32")]
            inputs[1].set_data_from_numpy(Y)
            outputs = [module.InferRequestedOutput("GRAD_LOGITS")]
            if output:
                inputs[0].set_data_from_numpy(X)
                outputs[0].set_shared_memory(region, byte_size, offset=offset)
            else:
                inputs[0].set_shared_memory(region, byte_size, offset=offset)
            return client.infer("bce_with_logits", inputs, outputs=outputs)

        e = _fails(infer, "nope", nbytes)
        assert "input 'LOGITS': shared_memory_region 'nope' is not registered" in str(e)
        e = _fails(infer, "small", nbytes - 4)
        assert f"input 'LOGITS': shared_memory_byte_size {nbytes - 4} is not the tensor's " \
            f"{nbytes} bytes" in str(e)
        e = _fails(infer, "small", nbytes, offset=32)
        assert f"input 'LOGITS': shared_memory_offset 32 + shared_memory_byte_size {nbytes} " \
            f"lies outside region 'small' of {nbytes + 16} bytes" in str(e)
        e = _fails(infer, "small", nbytes - 4, output=True)
        assert f"output 'GRAD_LOGITS': shared_memory_byte_size {nbytes - 4} is less than the " \
            f"output's {nbytes} bytes" in str(e)
        e = _fails(infer, "small", nbytes, offset=20, output=True)
        assert "output 'GRAD_LOGITS': shared_memory_offset 20" in str(e)
        # An output may not overwrite an input in the same region.
        inputs = [module.InferInput("LOGITS", list(X.shape), "FP32"),
                  module.InferInput("TARGETS", list(Y.shape), "FP32")]
        inputs[0].set_shared_memory("small", nbytes)
        inputs[1].set_data_from_numpy(Y)
        out = module.InferRequestedOutput("GRAD_LOGITS")
        out.set_shared_memory("small", nbytes)
        e = _fails(client.infer, "bce_with_logits", inputs, outputs=[out])
        assert "overlaps" in str(e)
        client.unregister_system_shared_memory("small")
        e = _fails(infer, "small", nbytes)
        assert "'small' is not registered" in str(e)
    finally:
        client.close()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_shared_memory_disabled(server_factory, regions, protocol) -> None:
    server = server_factory("--http_port", "0", "--shared_memory_prefix=")
    module = tritonclient_grpc if protocol == "grpc" else tritonclient_http
    client = _client(server, protocol)
    try:
        key, _ = regions("off", 64)
        for call, args in ((client.register_system_shared_memory, ("off", key, 64)),
                           (client.get_system_shared_memory_status, ()),
                           (client.unregister_system_shared_memory, ())):
            e = _fails(call, *args)
            assert "system shared memory is disabled on this server " \
                "(--shared_memory_prefix is empty)" in str(e)
            if protocol == "grpc":
                assert e.status() == "StatusCode.FAILED_PRECONDITION"
        inputs = [module.InferInput("LOGITS", [2], "FP32"),
                  module.InferInput("TARGETS", [2], "FP32")]
        inputs[0].set_shared_memory("off", 8)
        inputs[1].set_data_from_numpy(np.zeros(2, np.float32))
        e = _fails(client.infer, "bce_with_logits", inputs)
        assert "input 'LOGITS' names shared_memory_region 'off' but system shared memory is " \
            "disabled" in str(e)
    finally:
        client.close()
