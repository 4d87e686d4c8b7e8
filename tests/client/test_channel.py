"""Channel construction (lossd._channel): targets, TLS arguments, service config."""

from __future__ import annotations

import json

import pytest

import lossd
from lossd._channel import channel_spec


def spec(target, **kw):
    return channel_spec(target, max_message_bytes=1 << 20, **kw)


def test_targets() -> None:
    assert spec("127.0.0.1:1").target == "127.0.0.1:1"
    assert spec(["10.0.0.1:1", "10.0.0.2:2"]).target == "ipv4:10.0.0.1:1,10.0.0.2:2"
    assert spec(["[::1]:5", "[::2]:6"]).target == "ipv6:[::1]:5,[::2]:6"
    assert spec(["localhost:7", "127.0.0.2:8"]).target.startswith("ipv")
    assert spec(["only:9"]).target == "only:9"
    assert spec("dns:///svc.ns:50051").target == "dns:///svc.ns:50051"
    with pytest.raises(ValueError, match="host:port"):
        spec(["127.0.0.1", "127.0.0.2:1"])
    with pytest.raises(ValueError, match="empty"):
        spec([])


def test_service_config() -> None:
    options = dict(spec("x:1").options)
    config = json.loads(options["grpc.service_config"])
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    (method,) = config["methodConfig"]
    assert {"service": "lossd.v1.LossService"} in method["name"]
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE", "CANCELLED"]
    assert method["retryPolicy"]["maxAttempts"] == 5
    assert options["grpc.enable_retries"] == 1
    assert options["grpc.max_receive_message_length"] == 1 << 20
    options = dict(spec("x:1", retry=None, load_balancing="pick_first",
                        channel_args=[("grpc.enable_retries", 0), ("a", 1)]).options)
    config = json.loads(options["grpc.service_config"])
    assert "retryPolicy" not in config["methodConfig"][0]
    assert config["loadBalancingConfig"] == [{"pick_first": {}}]
    assert options["a"] == 1


def test_tls_arguments(tmp_path) -> None:
    assert spec("x:1").credentials is None
    assert spec("x:1", tls=True).credentials is not None
    pem = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    f = tmp_path / "ca.pem"
    f.write_bytes(pem)
    s = spec("x:1", root_certificates=str(f), server_name="lossd.local")
    assert s.credentials is not None
    assert dict(s.options)["grpc.ssl_target_name_override"] == "lossd.local"
    assert spec("x:1", root_certificates=pem.decode()).credentials is not None
    with pytest.raises(ValueError, match="cannot read"):
        spec("x:1", root_certificates=str(tmp_path / "missing.pem"))
    with pytest.raises(ValueError, match="go together"):
        spec("x:1", private_key=pem)
    with pytest.raises(ValueError, match="contradicts"):
        spec("x:1", root_certificates=pem, tls=False)


def test_client_argument_checks() -> None:
    with pytest.raises(ValueError, match="max_message_bytes"):
        lossd.Client("x:1", max_message_bytes=0)
    with pytest.raises(ValueError, match="timeout"):
        lossd.Client("x:1", timeout=0)
    with pytest.raises(ValueError, match="stream_window"):
        lossd.Client("x:1", stream_window=0)
    with lossd.Client("x:1", token="t") as c:
        assert c._metadata == (("authorization", "Bearer t"),)
        assert c._deadline(None) == 30.0 and c._deadline(float("inf")) is None
