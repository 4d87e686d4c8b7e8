"""The shared-memory pieces of the client that need no server: target classification, the
arena's block allocator, and the validation and logging of the shared_memory option."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

import lossd
from lossd._shm import ALIGN, Segment, local_target


@pytest.mark.parametrize("target", [
    "unix:/tmp/lossd.sock", "unix:///run/lossd.sock", "unix-abstract:lossd",
    "127.0.0.1:50051", "127.3.4.5:1", "localhost:50051", "[::1]:50051",
    "ipv4:127.0.0.1:1,127.0.0.2:2", "ipv6:[::1]:5", "dns:///localhost:50051",
    "dns:localhost:50051"])
def test_local_targets(target: str) -> None:
    assert local_target(target)[0], target


@pytest.mark.parametrize("target", [
    "10.0.0.1:50051", "lossd.example:443", "[2001:db8::1]:50051",
    "ipv4:127.0.0.1:1,10.0.0.2:2", "dns:///lossd.example:50051", "192.168.1.1:5"])
def test_remote_targets(target: str) -> None:
    assert not local_target(target)[0], target


def test_the_allocator_fits_aligns_and_coalesces() -> None:
    name = f"/lossd-unit-{os.getpid()}"
    segment = Segment(name, 4096)
    try:
        os.unlink("/dev/shm" + name)
        a = segment.allocate(100)
        b = segment.allocate(1)
        c = segment.allocate(ALIGN)
        assert (a, b, c) == (0, 128, 192)
        assert segment.allocate(4096) is None
        segment.release(b, 1)
        assert segment.allocate(64) == 128  # first fit reuses the hole
        segment.release(128, 64)
        segment.release(a, 100)
        segment.release(c, ALIGN)
        assert segment.free == [[0, 4096]] and segment.used == 0
        assert segment.allocate(4096) == 0
    finally:
        segment.close()


def test_bad_shared_memory_values_are_refused() -> None:
    with pytest.raises(ValueError, match="shared_memory"):
        lossd.Client("127.0.0.1:1", shared_memory="yes")


def test_auto_mode_on_a_remote_target_logs_bytes_without_calling(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="lossd"):
        with lossd.Client("10.255.255.1:9", shared_memory="auto") as client:
            assert not client.shared_memory  # decided without any call to the server
            arr = client.empty((2, 3), np.float64)
            assert arr.shape == (2, 3) and arr.dtype == np.float64
    lines = [r.getMessage() for r in caplog.records if "shared memory" in r.getMessage()]
    assert lines == ["lossd: shared memory off for 10.255.255.1:9: not a Unix socket or a "
                     "loopback address (tensors travel as bytes)"]


def test_off_mode_never_probes() -> None:
    with lossd.Client("127.0.0.1:9", shared_memory="off") as client:
        assert not client.shared_memory
