"""`triptych admin status`: the cluster's pools, workers, role switches and restarts."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import sys
import time

from triptych.commands import add_connection_arguments, admin_client
from triptych.errors import TriptychError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_connection_arguments(parser)
    parser.add_argument(
        "--json", action="store_true", help="print the whole status as one JSON object (for scripts) instead of a table"
    )


def _plain(value: object) -> object:
    if isinstance(value, enum.Enum):
        return value.value
    raise TypeError(f"{type(value).__name__} is not JSON")


def run(args: argparse.Namespace) -> int:
    try:
        with admin_client(args) as client:
            status = client.admin_status(timeout=30)
    except TriptychError as exc:
        print(f"triptych admin status: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(dataclasses.asdict(status), default=_plain, indent=2))
        return 0
    print(f"mode: {status.mode.value if status.mode else '?'}")
    print(
        f"{'worker':<14} {'role':<10} {'alive':<6} {'epoch':>5} {'queue':>6} {'running':>8} {'kv used':>12} "
        f"{'kv cached':>9} restarts"
    )
    for pool in status.pools:
        for w in pool.workers:
            kv = f"{w.kv_blocks_used}/{w.kv_blocks_total}" if w.kv_blocks_total else "-"
            role = w.role.value if w.role else "?"
            print(
                f"{w.worker_id:<14} {role:<10} {str(w.alive).lower():<6} {w.epoch:>5} {w.queue_length:>6} "
                f"{w.running:>8} {kv:>12} {w.kv_blocks_cached:>9} {status.restarts.get(w.worker_id, 0)}"
            )
    print(f"role switches: {status.role_switch_count}")
    for s in status.role_switches:
        at = time.strftime("%H:%M:%S", time.localtime(s.at_unix_s))
        print(
            f"  {at} {s.worker_id}: {s.move} (epoch {s.epoch}, "
            f"drain {s.drain_s:.1f}s, switch {s.switch_s:.2f}s) {s.reason}"
        )
    return 0
