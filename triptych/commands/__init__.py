"""`triptych admin ...` subcommands: operator calls over the SDK to the admin port (gRPC only, no
torch or Ray)."""

from __future__ import annotations

import argparse

from triptych import _channel
from triptych.client import DEFAULT_ADMIN_TARGET, Client


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """--target / TLS flags of the admin commands (the admin key comes from $TRIPTYCH_ADMIN_KEY)."""
    parser.add_argument(
        "--target",
        default=DEFAULT_ADMIN_TARGET,
        help=f"the server's admin port (server.admin_port; default {DEFAULT_ADMIN_TARGET})",
    )
    parser.add_argument("--tls", action="store_true", help="connect with TLS (implied by --ca)")
    parser.add_argument("--ca", metavar="PEM", default=None, help="CA certificate that signed the server's")


def admin_client(args: argparse.Namespace) -> Client:
    """A client for the admin port; its key is $TRIPTYCH_ADMIN_KEY (never a flag: argv is public)."""
    return Client(
        args.target,
        api_key=_channel.api_key(None, _channel.ADMIN_KEY_ENV) or "",
        tls=args.tls,
        root_certificates=args.ca,
    )
