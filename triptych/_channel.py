"""How the SDK reaches a server: TLS credentials and the API key sent with every call.

The SDK reads one environment variable, here: TRIPTYCH_API_KEY, the API key used when a client
is given none (the admin CLI reads TRIPTYCH_ADMIN_KEY for the admin port the same way).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import grpc

API_KEY_ENV = "TRIPTYCH_API_KEY"
ADMIN_KEY_ENV = "TRIPTYCH_ADMIN_KEY"

# PEM data, or the path of a PEM file.
Pem = Union[bytes, str, Path]


def api_key(explicit: str | None, env: str = API_KEY_ENV) -> str | None:
    """The key to send: the one given, else the environment's, else none."""
    key = explicit if explicit is not None else os.environ.get(env)
    return key.strip() or None if key else None


# Calls that may run twice without harm: retried on UNAVAILABLE (a server restarting, a connection
# not up yet) with exponential backoff. Generate and SetWorkerRole are never retried.
IDEMPOTENT = (
    ("triptych.v1.Triptych", "GetModelInfo"),
    ("triptych.v1.Triptych", "GetClusterStatus"),
    ("triptych.v1.Triptych", "Abort"),
    ("triptych.v1.TriptychAdmin", "GetClusterStatus"),
)
MAX_ATTEMPTS = 5  # gRPC's own cap on a retry policy's attempts


def channel_options(options: Sequence[tuple[str, Any]], max_attempts: int) -> list[tuple[str, Any]]:
    """The caller's channel options plus a retry policy for the idempotent calls (max_attempts
    tries in all, backoff 0.1 s doubling to 2 s); a caller's own service config wins."""
    if not 1 <= max_attempts <= MAX_ATTEMPTS:
        raise ValueError(f"max_attempts must be in [1, {MAX_ATTEMPTS}], got {max_attempts!r}")
    out = list(options)
    if max_attempts == 1 or any(name == "grpc.service_config" for name, _ in out):
        return out
    policy = {
        "maxAttempts": max_attempts,
        "initialBackoff": "0.1s",
        "maxBackoff": "2s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    config = {"methodConfig": [{"name": [{"service": s, "method": m} for s, m in IDEMPOTENT], "retryPolicy": policy}]}
    return out + [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(config))]


def call_metadata(key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),) if key else ()


def _pem(value: Pem | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).expanduser().read_bytes()


def credentials(
    tls: bool, root_certificates: Pem | None, certificate_chain: Pem | None, private_key: Pem | None
) -> grpc.ChannelCredentials | None:
    """TLS channel credentials (None: plaintext). Any certificate argument implies TLS; no
    root_certificates means the system's trusted roots; certificate_chain + private_key are this
    client's certificate for servers that require one (mutual TLS)."""
    if not (tls or root_certificates or certificate_chain or private_key):
        return None
    if (certificate_chain is None) != (private_key is None):
        raise ValueError("a client certificate needs both certificate_chain and private_key")
    return grpc.ssl_channel_credentials(_pem(root_certificates), _pem(private_key), _pem(certificate_chain))
