"""`triptych serve --config FILE [--address RAY_ADDRESS] [--grpc-port N] [--http-port N]`.

    load + validate the YAML ──▶ start_router (Ray local or joined, worker actors)
        ──▶ gateway.start (gRPC + HTTP) ──▶ serve until SIGINT / SIGTERM
        ──▶ gateway stop (in-flight requests get a grace period) ──▶ router.shutdown()

`start_serving` is the in-process entry (tests, `triptych demo`): it returns the router and
the running gateway, and the caller stops both.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

from cluster import gateway, logs
from cluster.auth import AuthError
from cluster.config import ConfigError, DeployConfig, is_loopback, load_config
from cluster.router_api import Router

Progress = Callable[..., Any]
log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE", help="deploy YAML (e.g. deploy/local.yaml)")
    parser.add_argument(
        "--address",
        metavar="RAY_ADDRESS",
        default=None,
        help="join this Ray cluster ('auto' or HOST:PORT) instead of the config's ray.address",
    )
    parser.add_argument("--host", default=None, help="bind address (overrides server.host)")
    parser.add_argument(
        "--grpc-port",
        type=int,
        default=None,
        metavar="N",
        help="gRPC port (overrides server.grpc_port; 0: a free port)",
    )
    parser.add_argument(
        "--http-port",
        type=int,
        default=None,
        metavar="N",
        help="OpenAI-compatible HTTP port (overrides server.http_port; 0: a free port)",
    )
    parser.add_argument(
        "--admin-port",
        type=int,
        default=None,
        metavar="N",
        help="admin port (overrides server.admin_port; 0: a free port)",
    )
    parser.add_argument("--log-level", choices=logs.LEVELS, default="info", help="least severe level logged")
    parser.add_argument(
        "--log-format", choices=logs.FORMATS, default="text", help="text lines, or one JSON object per line"
    )
    parser.add_argument(
        "--access-log", action="store_true", default=None, help="log every HTTP request (sets server.access_log)"
    )
    parser.add_argument(
        "--worker-logs",
        action="store_true",
        default=None,
        help="forward the Ray workers' output to this process's (sets ray.log_to_driver)",
    )


def config_from_args(args: argparse.Namespace) -> DeployConfig:
    """Load the YAML with the command-line overrides applied (validated like the file)."""
    overrides = {
        key: value
        for key, value in (
            ("ray.address", args.address),
            ("server.host", args.host),
            ("server.grpc_port", args.grpc_port),
            ("server.http_port", args.http_port),
            ("server.admin_port", getattr(args, "admin_port", None)),
            ("server.access_log", getattr(args, "access_log", None)),
            ("ray.log_to_driver", getattr(args, "worker_logs", None)),
        )
        if value is not None
    }
    return load_config(args.config, overrides)


async def start_serving(
    config: DeployConfig, address: str | None = None, progress: Progress = print
) -> tuple[Router, gateway.RunningGateway]:
    """Start the cluster and the gateway on it. API keys and TLS files are read first, so a bad
    one fails before anything starts. On failure nothing is left running."""
    from cluster.auth import KeyRing
    from cluster.controller import start_router  # Ray and torch load only here

    keys = KeyRing.load(config.server.auth)
    gateway.grpc_credentials(config.server)
    router = await start_router(config, ray_address=address, progress=progress)
    try:
        running = await gateway.start(router, config.server, keys=keys)
    except BaseException:
        await router.shutdown()
        raise
    return router, running


async def stop_serving(router: Router, running: gateway.RunningGateway, progress: Progress = print) -> None:
    progress("stopping the gateway ...")
    try:
        await running.stop()
    finally:
        progress("shutting down the cluster ...")
        await router.shutdown()


def describe(config: DeployConfig, router: Router, running: gateway.RunningGateway) -> str:
    info = router.model_info()
    pools = ", ".join(f"{p.role.value} x{p.workers}" for p in config.active_pools())
    auth = config.server.auth
    keys = "API keys required" if (auth.api_keys_file or auth.api_keys_env) else "no API keys"
    tls = "TLS" + (" + client certificates" if config.server.tls.client_ca_file else "") if running.tls else "no TLS"
    lines = [
        f"Triptych serving {info.name} ({config.mode.value}: {pools}; {keys}, {tls})",
        f"  gRPC    {running.host}:{running.grpc_port}   (triptych.v1.Triptych, grpc.health.v1, reflection)",
    ]
    if running.http_url:
        scheme = "https" if running.tls else "http"
        lines.append(
            f"  HTTP    {scheme}://{running.host}:{running.http_port}/v1   (OpenAI-compatible; /health, /metrics)"
        )
    if running.admin_port is not None:
        lines.append(
            f"  admin   {running.admin_host}:{running.admin_port}   (triptych.v1.TriptychAdmin: "
            f"`triptych admin ... --target {running.admin_target}`)"
        )
    return "\n".join(lines)


def exposure_warnings(config: DeployConfig) -> list[str]:
    """What an operator must hear before serving on a network: doors open to anyone on it."""
    srv = config.server
    out = []
    if is_loopback(srv.host):
        return out
    if not (srv.auth.api_keys_file or srv.auth.api_keys_env):
        out.append(
            f"server.host is {srv.host!r} (not loopback) and no API keys are set: ANYONE who can reach "
            f"ports {srv.grpc_port}/{srv.http_port} can use this cluster. Set server.auth.api_keys_file "
            f"(docs/SECURITY.md)."
        )
    if not srv.tls.enabled:
        out.append(
            f"server.host is {srv.host!r} (not loopback) without TLS: prompts, replies and API keys cross "
            f"the network in clear text. Set server.tls.cert_file and key_file (docs/SECURITY.md)."
        )
    return out


async def _serve(config: DeployConfig, address: str | None) -> int:
    gateway.keep_large_allocations_returnable()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # Startup can take a while (Ray, model loading); a signal during it cancels the startup.
    starting = asyncio.ensure_future(start_serving(config, address))
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        print("triptych serve: interrupted during startup", file=sys.stderr)
        return 130
    stopping.cancel()
    try:
        router, running = starting.result()
    except (gateway.BindError, AuthError) as err:
        print(f"triptych serve: {err}", file=sys.stderr)
        return 1
    except Exception as err:
        print(f"triptych serve: could not start the cluster: {err}", file=sys.stderr)
        return 1
    # Starting Ray installed its own SIGTERM handler (it dumps a stack and exits at once, ending
    # every request mid-way): take the signals back for a graceful stop.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(describe(config, router, running), flush=True)
    for warning in exposure_warnings(config):
        log.warning(warning)
        print(f"\n*** WARNING: {warning}\n", file=sys.stderr, flush=True)
    print("Press Ctrl-C to stop.", flush=True)
    await stop.wait()
    await stop_serving(router, running)
    print("stopped.", flush=True)
    return 0


def run(args: argparse.Namespace) -> int:
    logs.configure(args.log_level, args.log_format)
    try:
        config = config_from_args(args)
    except ConfigError as err:
        print(f"triptych serve: {err}", file=sys.stderr)
        return 2
    return asyncio.run(_serve(config, args.address))
