"""API keys and the principals they name.

    KeyRing.load(server.auth) ─▶ serving keys (HTTP `Authorization: Bearer K`, gRPC metadata
                                 `authorization: Bearer K`) and admin keys (admin port only)
    keyring.serving(header) ─▶ the Principal, or None (refused: UNAUTHENTICATED / 401)
    keyring.admin(header)   ─▶ the Principal, or None (refused: UNAUTHENTICATED)

A principal is who a request belongs to: sessions, request ids, in-flight limits and sessions
quotas are per principal. With no serving keys configured every client is ANONYMOUS (one
principal). A key file holds one entry per line, `name:key` or a bare `key` (named
`key-<first 8 hex of its SHA-256>`); `#` starts a comment. An environment variable holds the same
entries separated by commas. Keys are never logged or echoed; errors name the file and line.

Checking a key costs the same whatever it is: the presented key's SHA-256 is compared with every
configured key's digest (hmac.compare_digest, no early exit).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from cluster.config import AuthConfig

MIN_KEY_CHARS = 16


@dataclass(frozen=True)
class Principal:
    name: str

    def __str__(self) -> str:
        return self.name


ANONYMOUS = Principal("anonymous")


class AuthError(ValueError):
    """Keys that cannot be loaded; the message names the source, never a key."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def _entries(text: str, where: str, sep: str) -> list[tuple[str, str]]:
    out = []
    for i, raw in enumerate(text.split(sep), 1):
        line = raw.split("#", 1)[0].strip() if sep == "\n" else raw.strip()
        if not line:
            continue
        name, _, key = line.rpartition(":")
        key = key.strip()
        name = name.strip() or f"key-{_digest(key).hex()[:8]}"
        at = f"{where} line {i}" if sep == "\n" else f"{where} entry {i}"
        if len(key) < MIN_KEY_CHARS:
            raise AuthError(f"{at}: the key is shorter than {MIN_KEY_CHARS} characters")
        if any(c.isspace() for c in key):
            raise AuthError(f"{at}: the key contains whitespace")
        out.append((name, key))
    return out


def load_keys(file: str | None, env: str | None, what: str) -> list[tuple[str, str]]:
    """(name, key) pairs from a key file and/or an environment variable."""
    keys: list[tuple[str, str]] = []
    if file is not None:
        try:
            text = Path(file).expanduser().read_text()
        except OSError as err:
            raise AuthError(f"{what} key file {file}: cannot read it ({err.strerror or err})") from None
        keys += _entries(text, f"{what} key file {file}", "\n")
        if not keys:
            raise AuthError(f"{what} key file {file} holds no key")
    if env is not None:
        value = os.environ.get(env)
        if not value:
            raise AuthError(f"{what} keys: environment variable {env} is not set or empty")
        keys += _entries(value, f"{what} keys in ${env}", ",")
    return keys


class KeyRing:
    def __init__(self, serving: list[tuple[str, str]] = (), admin: list[tuple[str, str]] = ()) -> None:
        self._serving = [(_digest(k), Principal(n)) for n, k in serving]
        self._admin = [(_digest(k), Principal(n)) for n, k in admin]

    @classmethod
    def load(cls, auth: AuthConfig) -> KeyRing:
        """Both key sets; AuthError if a name or a key appears twice (two keys of one name would be
        one client: its sessions and request ids shared)."""
        serving = load_keys(auth.api_keys_file, auth.api_keys_env, "serving")
        admin = load_keys(auth.admin_keys_file, auth.admin_keys_env, "admin")
        for what, keys in (("serving", serving), ("admin", admin)):
            names = [n for n, _ in keys]
            if len(set(names)) != len(names):
                twice = sorted({n for n in names if names.count(n) > 1})
                raise AuthError(f"{what} keys: the name {twice[0]!r} is given to more than one key")
        if len({k for _, k in serving + admin}) != len(serving) + len(admin):
            raise AuthError("a key appears twice (serving keys and admin keys must all differ)")
        return cls(serving, admin)

    @property
    def serving_enabled(self) -> bool:
        return bool(self._serving)

    @property
    def admin_enabled(self) -> bool:
        return bool(self._admin)

    def serving(self, authorization: str | None) -> Principal | None:
        """The principal of a serving request's `authorization` value; ANONYMOUS when no serving
        keys are configured; None when keys are configured and this is not one of them."""
        if not self._serving:
            return ANONYMOUS
        return _match(self._serving, authorization)

    def admin(self, authorization: str | None) -> Principal | None:
        """Like serving(), for the admin service and its keys."""
        if not self._admin:
            return Principal("admin")
        return _match(self._admin, authorization)


def _match(keys: list[tuple[bytes, Principal]], authorization: str | None) -> Principal | None:
    scheme, _, token = (authorization or "").strip().partition(" ")
    digest = _digest(token.strip() if scheme.lower() == "bearer" else "")
    found = None
    for key_digest, principal in keys:  # every key is compared: the time says nothing
        if hmac.compare_digest(digest, key_digest):
            found = principal
    return found
