"""`triptych admin set-role WORKER ROLE`: move a worker between the prefill and decode pools,
or between the encode and prefill pools (a vision-language deployment with
`role_switching.encode_prefill: true`).

The server stops giving the worker new requests, waits for its requests to end (up to
--drain-timeout), switches it without reloading its weights and puts it in the other pool.
"""

from __future__ import annotations

import argparse
import sys

from triptych.commands import add_connection_arguments, admin_client
from triptych.errors import TriptychError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("worker", help="worker id, as `triptych admin status` lists it (e.g. decode-1)")
    parser.add_argument("role", choices=("encode", "prefill", "decode"), help="the pool to move it to")
    add_connection_arguments(parser)
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="how long the worker may take to finish its requests (default 60)",
    )
    parser.add_argument("--reason", default="manual", help="recorded in the switch history")


def run(args: argparse.Namespace) -> int:
    if args.drain_timeout <= 0:
        print("triptych admin set-role: --drain-timeout must be > 0", file=sys.stderr)
        return 2
    try:
        with admin_client(args) as client:
            s = client.set_worker_role(
                args.worker,
                args.role,
                drain_timeout_s=args.drain_timeout,
                reason=args.reason,
                timeout=args.drain_timeout + 150,
            )
    except TriptychError as exc:
        print(f"triptych admin set-role: {exc}", file=sys.stderr)
        return 1
    print(f"{s.worker_id}: {s.move} (epoch {s.epoch}; drained in {s.drain_s:.1f}s, switched in {s.switch_s:.2f}s)")
    return 0
