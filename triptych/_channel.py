"""How the SDK reaches a server: TLS credentials and the API key sent with every call.

The SDK reads one environment variable, here: TRIPTYCH_API_KEY, the API key used when a client
is given none (the admin CLI reads TRIPTYCH_ADMIN_KEY for the admin port the same way).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import grpc

API_KEY_ENV = "TRIPTYCH_API_KEY"
ADMIN_KEY_ENV = "TRIPTYCH_ADMIN_KEY"

# PEM data, or the path of a PEM file.
Pem = Union[bytes, str, Path]


def api_key(explicit: str | None, env: str = API_KEY_ENV) -> str | None:
    """The key to send: the one given, else the environment's, else none."""
    key = explicit if explicit is not None else os.environ.get(env)
    return key.strip() or None if key else None


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
