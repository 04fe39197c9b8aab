"""The running gateway: `start(router, server_config)` opens the doors of a Gateway (the servicer,
cluster/gateway_service.py) and returns a RunningGateway with the bound ports;
`RunningGateway.stop()` stops serving. The doors: gRPC with health and reflection on grpc_port,
OpenAI HTTP (cluster/http_api.py) on http_port unless None, the admin service (cluster/admin.py)
on admin_host:admin_port unless None; port 0 picks a free port. Here too: the gRPC server
options (message size, streams, idle and age limits, keepalive), TLS credentials from
server.tls, and binding.

Invariants: `start` returns only once every door accepts connections, and leaves nothing
running when it fails (a port that cannot be bound, an unreadable TLS file: BindError naming
it); the gateway serves (`Gateway.serving`) only between a successful start and stop().
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cluster import limits as caps
from cluster.auth import KeyRing
from cluster.config import ServerConfig
from cluster.gateway_proto import SERVICE_NAME
from cluster.gateway_service import Gateway
from cluster.metrics import Metrics
from cluster.router_api import Router
from cluster.sessions import SessionStore


class BindError(RuntimeError):
    """A port could not be bound; the message names the address."""


@dataclass
class RunningGateway:
    gateway: Gateway
    host: str
    grpc_port: int
    http_port: int | None
    _grpc_server: grpc.aio.Server
    _health: health.aio.HealthServicer
    _http_runner: object | None = None
    admin_host: str = "127.0.0.1"
    admin_port: int | None = None
    _admin_server: grpc.aio.Server | None = None
    tls: bool = False
    _stopped: bool = False

    @staticmethod
    def _reach(host: str) -> str:
        """Where a client on this machine connects (a wildcard bind is reached on loopback)."""
        return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host

    @property
    def connect_host(self) -> str:
        return self._reach(self.host)

    @property
    def grpc_target(self) -> str:
        return f"{self.connect_host}:{self.grpc_port}"

    @property
    def admin_target(self) -> str | None:
        return None if self.admin_port is None else f"{self._reach(self.admin_host)}:{self.admin_port}"

    @property
    def http_url(self) -> str | None:
        scheme = "https" if self.tls else "http"
        return None if self.http_port is None else f"{scheme}://{self.connect_host}:{self.http_port}"

    async def stop(self, grace_s: float = 5.0) -> None:
        """Refuse new requests, give in-flight ones `grace_s` to finish, then cancel (abort) them.
        Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self.gateway.serving = False
        await self._health.enter_graceful_shutdown()
        runner, self._http_runner = self._http_runner, None
        # The doors drain at once, so stopping takes at most about grace_s.
        await asyncio.gather(
            self._grpc_server.stop(grace_s),
            runner.cleanup() if runner else asyncio.sleep(0),
            self._admin_server.stop(grace_s) if self._admin_server else asyncio.sleep(0),
        )
        self.gateway.close()


def grpc_options(server: ServerConfig, supports_images: bool = True) -> list[tuple[str, int]]:
    """Channel arguments of the gRPC servers: message size (for a model without images no larger
    than an acceptable request can be, so that no more is ever buffered), streams per connection,
    idle and age limits, and keepalive enforcement (a client pinging too often is disconnected)."""
    c = server.connections
    ms = lambda s: int(s * 1000)  # noqa: E731
    return [
        ("grpc.max_receive_message_length", caps.request_bytes(server.limits, supports_images)),
        ("grpc.max_send_message_length", server.limits.max_request_bytes),
        ("grpc.max_concurrent_streams", c.grpc_max_concurrent_streams),
        ("grpc.max_connection_idle_ms", ms(c.grpc_max_connection_idle_s)),
        ("grpc.max_connection_age_ms", ms(c.grpc_max_connection_age_s)),
        ("grpc.max_connection_age_grace_ms", ms(server.request_timeout_s)),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", ms(c.grpc_min_ping_interval_s)),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.keepalive_time_ms", 60_000),  # the server pings idle connections to find dead peers
        ("grpc.keepalive_timeout_ms", 20_000),
    ]


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise BindError(f"cannot read {what} {path}: {err.strerror or err}") from None


def grpc_credentials(server: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS (and mutual TLS with client_ca_file) for the gRPC servers; None: plaintext."""
    tls = server.tls
    if not tls.enabled:
        return None
    ca = _read(tls.client_ca_file, "server.tls.client_ca_file") if tls.client_ca_file else None
    return grpc.ssl_server_credentials(
        [(_read(tls.key_file, "server.tls.key_file"), _read(tls.cert_file, "server.tls.cert_file"))],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


def bind_grpc(grpc_server: grpc.aio.Server, address: str, creds: grpc.ServerCredentials | None) -> int:
    try:
        port = grpc_server.add_secure_port(address, creds) if creds else grpc_server.add_insecure_port(address)
    except RuntimeError as err:
        raise BindError(f"cannot bind gRPC to {address}: {err}") from None
    if port == 0:
        raise BindError(f"cannot bind gRPC to {address} (address in use?)")
    return port


MMAP_THRESHOLD_BYTES = 1 << 20


def keep_large_allocations_returnable() -> bool:
    """Have glibc serve every allocation of 1 MiB or more with its own mmap, returned to the OS on
    free. By default glibc raises that threshold after freeing a large block (up to 32 MiB), so
    the buffers of a few oversized requests (refused, then freed) stay in the heap for good: the
    gateway grew 38% after the oversized attacks of tests/attacks.py, 6% with this. A setting of
    the whole process, so `triptych serve` (whose process hosts the gateway and the router, not
    the workers) makes it. A no-op (False) where the C library has no mallopt."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, MMAP_THRESHOLD_BYTES))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


async def start(
    router: Router,
    server: ServerConfig,
    *,
    sessions: SessionStore | None = None,
    metrics: Metrics | None = None,
    keys: KeyRing | None = None,
    http_grace_s: float = 5.0,
) -> RunningGateway:
    """Bind gRPC on server.grpc_port, HTTP on http_port (unless None) and the admin service on
    admin_host:admin_port (unless None); 0: a free port. Returns once all accept connections.
    `keys`: the API keys (default: loaded from server.auth). `http_grace_s`: how long stop() lets
    in-flight HTTP requests finish (gRPC's is stop()'s grace_s)."""
    from cluster import admin

    keys = keys if keys is not None else KeyRing.load(server.auth)
    gateway = Gateway(
        router,
        sessions=sessions if sessions is not None else SessionStore(server.sessions),
        metrics=metrics,
        keys=keys,
        limits=server.limits,
        max_queued_requests=server.max_queued_requests,
    )
    creds = grpc_credentials(server)
    supports_images = router.model_info().supports_images
    # Calls beyond this are refused by gRPC before their messages are buffered: with the message
    # cap, this bounds the memory that callers (authenticated or not yet) can make the server hold.
    grpc_server = grpc.aio.server(
        options=grpc_options(server, supports_images), maximum_concurrent_rpcs=2 * server.max_queued_requests + 64
    )
    gateway.add_to_server(grpc_server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflection.enable_server_reflection((SERVICE_NAME, health_name, reflection.SERVICE_NAME), grpc_server)
    grpc_port = bind_grpc(grpc_server, f"{server.host}:{server.grpc_port}", creds)
    await grpc_server.start()
    running = RunningGateway(
        gateway,
        server.host,
        grpc_port,
        None,
        grpc_server,
        health_servicer,
        admin_host=server.admin_host,
        tls=server.tls.enabled,
    )
    try:
        if server.admin_port is not None:
            running._admin_server, running.admin_port = await admin.serve(
                router, gateway, keys, server, creds, health_servicer
            )
        if server.http_port is not None:
            from cluster import http_api  # aiohttp only when the HTTP door is on

            try:
                running._http_runner, running.http_port = await http_api.serve(
                    gateway, server, shutdown_timeout_s=http_grace_s
                )
            except OSError as err:
                raise BindError(
                    f"cannot bind HTTP to {server.host}:{server.http_port}: {err.strerror or err}"
                ) from None
    except BaseException:
        await grpc_server.stop(None)
        if running._admin_server is not None:
            await running._admin_server.stop(None)
        gateway.close()
        raise
    gateway.serving = True
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return running


__all__ = [
    "BindError",
    "Gateway",
    "RunningGateway",
    "bind_grpc",
    "grpc_credentials",
    "grpc_options",
    "keep_large_allocations_returnable",
    "start",
]
