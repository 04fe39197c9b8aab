"""An ordinary client in its own process, as the victim of the free-loop tests: it streams
"steady" requests (FakeRouter: 200 tokens 25 ms apart) back to back and prints the gaps between
chunks, in seconds, as one JSON list.

    python -m tests.helpers.victim TARGET [--streams N]

Without --streams it streams until its stdin closes. Its own process keeps the measurement free of
the test process's threads (a client sharing the server's interpreter would time its own waits for
the GIL as the gateway's)."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import triptych


def stream(target: str, stop: threading.Event, streams: int | None) -> list[float]:
    gaps: list[float] = []
    with triptych.Client(target, timeout=60) as c:
        done = 0
        while not stop.is_set() and (streams is None or done < streams):
            last = None
            for chunk in c.generate("keep going steady", max_tokens=200):
                now = time.perf_counter()
                if last is not None and not chunk.is_final:
                    gaps.append(now - last)
                last = now
            done += 1
    return gaps


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("target", help="gRPC HOST:PORT")
    p.add_argument("--streams", type=int, default=None, help="stop after N streams (default: when stdin closes)")
    args = p.parse_args(argv)
    stop = threading.Event()
    if args.streams is None:
        threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    print(json.dumps(stream(args.target, stop, args.streams)))


if __name__ == "__main__":
    main()
