"""Channel construction shared by :class:`lossd.Client` and :class:`lossd.AsyncClient`:
targets (one address, a list of addresses, ``dns:///``), TLS and mutual TLS, bearer
tokens, message limits, client-side load balancing and retries (a gRPC service config)."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import grpc

__all__ = ["RetryPolicy", "ChannelSpec", "channel_spec", "DEFAULT_MAX_MESSAGE_BYTES",
           "Target", "PemSource"]

#: Default send/receive message size limit of a client (256 MiB, the server's default).
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024

#: A target: one gRPC target string, or several "host:port" addresses.
Target = Union[str, Sequence[str]]
#: PEM data as bytes, or a path (str or os.PathLike) to a PEM file.
PemSource = Union[bytes, str, "os.PathLike[str]"]

SERVICE = "lossd.v1.LossService"
HEALTH_SERVICE = "grpc.health.v1.Health"


@dataclass(frozen=True)
class RetryPolicy:
    """Automatic retries of failed calls, by gRPC itself (a ``retryPolicy`` in the channel's
    service config).

    Every lossd call is idempotent, so retrying is safe. gRPC retries a call only while no
    reply has been received and, for streams, while the messages sent so far still fit in
    its retry buffer; the call's deadline bounds all attempts together.

    Parameters
    ----------
    max_attempts : int
        Attempts including the first (gRPC caps it at 5). Default 5.
    initial_backoff, max_backoff : float
        Seconds; the n-th retry waits a random time in [0, min(initial * multiplier^(n-1),
        max)]. Defaults 0.1 and 2.0.
    backoff_multiplier : float
        Default 2.
    status_codes : sequence of str
        Codes that are retried. Default ``("UNAVAILABLE", "CANCELLED")``: an unreachable or
        draining server answers UNAVAILABLE; a call that reaches a server in the instant it
        stops is dropped by gRPC's server, which the client sees as CANCELLED. (A call the
        client cancels itself is never retried.)
    """

    max_attempts: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    backoff_multiplier: float = 2.0
    status_codes: Tuple[str, ...] = ("UNAVAILABLE", "CANCELLED")

    def to_json(self) -> Dict[str, Any]:
        if not 2 <= self.max_attempts:
            raise ValueError(f"RetryPolicy.max_attempts must be >= 2, got {self.max_attempts}")
        return {
            "maxAttempts": int(self.max_attempts),
            "initialBackoff": f"{self.initial_backoff:.6f}s",
            "maxBackoff": f"{self.max_backoff:.6f}s",
            "backoffMultiplier": float(self.backoff_multiplier),
            "retryableStatusCodes": [c.upper() for c in self.status_codes],
        }


@dataclass
class ChannelSpec:
    """Everything needed to open a channel (sync or asyncio)."""

    target: str
    options: List[Tuple[str, Any]]
    credentials: Optional[grpc.ChannelCredentials]
    metadata: Optional[Tuple[Tuple[str, str], ...]]
    description: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)

    def open(self, module: Any) -> Any:
        """A channel to the target, from ``module``: ``grpc`` or ``grpc.aio``."""
        if self.credentials is None:
            return module.insecure_channel(self.target, options=self.options)
        return module.secure_channel(self.target, self.credentials, options=self.options)


def _read_pem(value: Optional[PemSource], argument: str) -> Optional[bytes]:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    if isinstance(value, str) and value.lstrip().startswith("-----BEGIN"):
        return value.encode("ascii")
    try:
        with open(os.fspath(value), "rb") as f:
            return f.read()
    except OSError as exc:
        raise ValueError(f"{argument}: cannot read {value!r}: {exc.strerror}") from None


def _split_host_port(address: str) -> Tuple[str, str]:
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        if not rest.startswith(":"):
            raise ValueError(f"target: {address!r} is not [IPv6]:port")
        return host, rest[1:]
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"target: {address!r} is not host:port")
    return host, port


def _list_target(addresses: Sequence[str]) -> Tuple[str, Optional[str]]:
    """A gRPC target for several addresses: ``ipv4:`` or ``ipv6:`` with comma-separated
    IP literals. Host names are resolved once, here (use ``dns:///name:port`` to have gRPC
    re-resolve). Returns (target, authority for TLS host name checks)."""
    if not addresses:
        raise ValueError("target: an empty list of addresses")
    v4: List[str] = []
    v6: List[str] = []
    authority: Optional[str] = None
    for address in addresses:
        host, port = _split_host_port(address)
        try:
            ips = [ipaddress.ip_address(host)]
        except ValueError:
            authority = authority or host
            try:
                infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            except OSError as exc:
                raise ValueError(f"target: cannot resolve {host!r}: {exc}") from None
            ips = sorted({ipaddress.ip_address(info[4][0]) for info in infos}, key=str)
        for ip in ips:
            (v4 if ip.version == 4 else v6).append(
                f"{ip}:{port}" if ip.version == 4 else f"[{ip}]:{port}")
    # gRPC's ipv4:/ipv6: schemes take one family each: IPv4 wins when both appear.
    chosen = v4 or v6
    scheme = "ipv4:" if chosen is v4 else "ipv6:"
    return scheme + ",".join(chosen), authority


def channel_spec(target: Target, *, max_message_bytes: int,
                 root_certificates: Optional[PemSource] = None,
                 private_key: Optional[PemSource] = None,
                 certificate_chain: Optional[PemSource] = None,
                 tls: Optional[bool] = None, server_name: Optional[str] = None,
                 token: Optional[str] = None, retry: Optional[RetryPolicy] = RetryPolicy(),
                 load_balancing: str = "round_robin",
                 channel_args: Optional[Sequence[Tuple[str, Any]]] = None) -> ChannelSpec:
    """Builds the target, options, credentials and call metadata of a client channel.

    See :class:`lossd.Client` for the parameters.
    """
    if max_message_bytes <= 0:
        raise ValueError(f"max_message_bytes must be positive, got {max_message_bytes}")
    authority: Optional[str] = None
    if isinstance(target, str):
        grpc_target = target
    else:
        addresses = list(target)
        if len(addresses) == 1:
            grpc_target = addresses[0]
        else:
            grpc_target, authority = _list_target(addresses)
    method_names = [{"service": SERVICE}, {"service": HEALTH_SERVICE}]
    method_config: Dict[str, Any] = {"name": method_names}
    if retry is not None:
        method_config["retryPolicy"] = retry.to_json()
    config: Dict[str, Any] = {"methodConfig": [method_config]}
    if load_balancing:
        config["loadBalancingConfig"] = [{load_balancing: {}}]
    options: Dict[str, Any] = {
        "grpc.max_send_message_length": int(max_message_bytes),
        "grpc.max_receive_message_length": int(max_message_bytes),
        "grpc.enable_retries": 1 if retry is not None else 0,
        "grpc.service_config": json.dumps(config),
        # The retry buffer holds the messages of a call that may still be retried (until its
        # first reply); with gRPC's 256 KiB default any tensor of note would commit the call
        # at once. 16 MiB covers a whole request up to several chunk_bytes.
        "grpc.per_rpc_retry_buffer_size": min(int(max_message_bytes), 16 * 1024 * 1024),
        "grpc.retry_buffer_size": 64 * 1024 * 1024,
    }
    root = _read_pem(root_certificates, "root_certificates")
    key = _read_pem(private_key, "private_key")
    chain = _read_pem(certificate_chain, "certificate_chain")
    if (key is None) != (chain is None):
        raise ValueError("private_key and certificate_chain go together (mutual TLS)")
    use_tls = tls if tls is not None else any(v is not None for v in (root, key, chain))
    if not use_tls and any(v is not None for v in (root, key, chain)):
        raise ValueError("tls=False contradicts the certificates given")
    credentials = grpc.ssl_channel_credentials(root, key, chain) if use_tls else None
    if use_tls:
        name = server_name or authority
        if name:
            options["grpc.ssl_target_name_override"] = name
            options["grpc.default_authority"] = name
    elif server_name:
        options["grpc.default_authority"] = server_name
    for k, v in channel_args or ():
        options[k] = v
    metadata = None
    if token is not None:
        if not token or any(c in token for c in "\r\n"):
            raise ValueError("token: must be a non-empty single-line string")
        metadata = (("authorization", f"Bearer {token}"),)
    description = f"{grpc_target} ({'tls' if use_tls else 'insecure'}" \
                  f"{', token' if token else ''})"
    return ChannelSpec(grpc_target, list(options.items()), credentials, metadata, description)
