"""End-to-end: REGION_KIND_CUDA_IPC registrations (docs/shared-memory.md, "CUDA IPC regions")
against the real lossd binary over its Unix socket.

A server that cannot compute on a GPU (--device=cpu, a build without CUDA, no GPU, or
--cuda_ipc=false) refuses CUDA IPC regions with FAILED_PRECONDITION saying why, and reports
Capabilities.cuda_ipc false; nothing is registered. Registrations that reach the GPU need one:
the device checks of docs/shared-memory.md cover them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Iterator, Tuple

import grpc
import pytest

from lossd._proto.lossd.v1 import lossd_pb2 as pb
from lossd._proto.lossd.v1 import lossd_pb2_grpc as pb_grpc

from conftest import ServerProcess, start_server

UUID = "GPU-12345678-9abc-def0-1234-56789abcdef0"

if "cuda_ipc" not in pb.Capabilities.DESCRIPTOR.fields_by_name:
    # tests/client/test_stubs_fresh.py fails in that state; these tests need the new fields.
    pytest.skip("the committed stubs predate Capabilities.cuda_ipc; regenerate them with "
                "client/python/generate_stubs.py", allow_module_level=True)


@pytest.fixture()
def unix_server() -> Iterator:
    """``unix_server(*flags, device=...)`` starts lossd on a Unix socket and returns
    (server, "unix:PATH"); every server is stopped, and must exit cleanly, after the test."""
    started = []

    def factory(*flags: str, device: str = "cpu") -> Tuple[ServerProcess, str]:
        directory = tempfile.mkdtemp(prefix="lossd-ipc-")
        path = os.path.join(directory, "lossd.sock")
        server = start_server("--unix_socket", path, *flags, device=device)
        started.append((server, directory))
        return server, f"unix:{path}"

    yield factory
    for server, directory in started:
        alive = server.proc.poll() is None
        rc = server.stop()
        shutil.rmtree(directory, ignore_errors=True)
        assert alive and rc == 0, f"lossd died or failed to stop ({rc}):\n{server.stderr_text()}"


def _capabilities(channel: grpc.Channel) -> pb.Capabilities:
    return pb_grpc.LossServiceStub(channel).GetCapabilities(pb.GetCapabilitiesRequest(),
                                                            timeout=10)


def _register(channel: grpc.Channel, handle: bytes = b"\x01" * 64,
              uuid: str = UUID) -> grpc.RpcError:
    stub = pb_grpc.SharedMemoryStub(channel)
    request = pb.RegisterRegionRequest(name="gpu", kind=pb.REGION_KIND_CUDA_IPC,
                                       cuda_ipc_handle=handle, cuda_device_uuid=uuid,
                                       offset=0, byte_size=4096)
    with pytest.raises(grpc.RpcError) as info:
        stub.RegisterRegion(request, timeout=10)
    return info.value


def _listed(channel: grpc.Channel) -> int:
    stub = pb_grpc.SharedMemoryStub(channel)
    return len(stub.ListRegions(pb.ListRegionsRequest(), timeout=10).regions)


@pytest.mark.parametrize("flags,device,reason", [
    ((), "cpu", "--device=cpu"),
    (("--cuda_ipc=false",), "cpu", "--cuda_ipc=false"),
    (("--cuda_ipc=false",), "auto", "--cuda_ipc=false"),
])
def test_refused_with_the_reason(unix_server, flags, device, reason) -> None:
    _, target = unix_server(*flags, device=device)
    with grpc.insecure_channel(target) as channel:
        caps = _capabilities(channel)
        assert caps.shared_memory
        assert not caps.cuda_ipc
        err = _register(channel)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
        assert "REGION_KIND_CUDA_IPC is not available" in err.details(), err.details()
        assert reason in err.details(), err.details()
        # The same answer whatever the handle: nothing is opened on such a server.
        err = _register(channel, handle=b"short", uuid="")
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
        assert _listed(channel) == 0


def test_auto_without_a_gpu(unix_server) -> None:
    """--device=auto on a host without a usable GPU: no CUDA backend, so no CUDA IPC."""
    _, target = unix_server(device="auto")
    with grpc.insecure_channel(target) as channel:
        caps = _capabilities(channel)
        if pb.DEVICE_CUDA in caps.devices:
            pytest.skip("this host has a GPU: CUDA IPC registrations are served")
        assert not caps.cuda_ipc
        assert caps.cuda_device_uuid == ""
        err = _register(channel)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
        assert "REGION_KIND_CUDA_IPC is not available: this server" in err.details(), \
            err.details()
        assert _listed(channel) == 0
