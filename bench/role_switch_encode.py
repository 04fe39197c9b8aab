"""Encode <-> prefill role switching under an image-heavy load, with the role policy on and off.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.role_switch_encode [--seconds 60] [--load 1.5]
                                                                  [--vision-layers 8]

Model: bench/encode.py's LLaVA checkpoint (a vision tower with CLIP ViT-L/14-336 shapes, seeded
random weights, `--vision-layers` of its 24 layers; a tiny 2-layer Llama text side), so image
encoding is nearly all of the work. Deployment on a fresh local Ray: 1 encode, 2 prefill and 1
decode worker, one CPU/thread each, `role_switching.encode_prefill: true` in both modes (every
encode and prefill worker holds both halves of the model, so the modes differ only in the
policy). Load: one request with one fresh 640x480 JPEG (no cache hit) every 1 / rate seconds for
`--seconds`, where rate = `--load` x what one encode worker encodes per second (measured by the
first mode's warm-up request; the other mode runs at the same rate): one encode worker cannot
keep up, two can. SLO: TTFT <= `--ttft-slo` s.

Printed per mode: TTFT attainment and p50 / p90 per third of the run (by arrival), the role
switches (when, which worker, from -> to), and the whole run's numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from dataclasses import dataclass

from bench.common import print_table
from bench.encode import IMAGE_TOKEN_ID, TEXT_TOKENS, checkpoint, images_for


@dataclass
class Sample:
    sent_at: float  # seconds from the start of the load
    ttft_s: float
    ok: bool  # finished without an error


def deploy_config(model_dir, switching: bool, ttft_slo_s: float):
    from cluster.config import parse_config

    max_len = TEXT_TOKENS + 576 + 64
    return parse_config(
        {
            "version": 1,
            "model": {"path": str(model_dir), "max_model_len": max_len},
            "ray": {"num_cpus": 4},
            "engine": {
                "block_size": 16,
                "num_kv_blocks": 4 * (-(-max_len // 16)) + 8,
                "max_num_batched_tokens": max_len,
                "max_num_seqs": 4,
            },
            "pools": {
                "encode": {"workers": 1, "num_cpus": 1},
                "prefill": {"workers": 2, "num_cpus": 1},
                "decode": {"workers": 1, "num_cpus": 1},
            },
            "slo": {"ttft_ms": ttft_slo_s * 1000, "tpot_ms": 1000},
            "server": {"request_timeout_s": 900, "max_queued_requests": 1024},
            "role_switching": {
                "enabled": switching,
                "encode_prefill": True,
                "interval_s": 1.0,
                "sustain": 3,
                "cooldown_s": 60,
                "min_samples": 4,
                "encode_queue_high": 2,
            },
        },
        f"bench-role-switch-encode-{'on' if switching else 'off'}",
    )


async def run_mode(model_dir, switching: bool, args) -> tuple[list[Sample], list, float]:
    from cluster.controller import start_router
    from cluster.router_api import FinalEvent, GenerateInput
    from engine.sequence import SamplingParams

    router = await start_router(deploy_config(model_dir, switching, args.ttft_slo), progress=lambda m: None)
    try:
        prompt = tuple(range(100, 100 + TEXT_TOKENS)) + (IMAGE_TOKEN_ID,)

        async def one(rid: str, image: bytes) -> FinalEvent:
            req = GenerateInput(rid, SamplingParams(max_tokens=4), token_ids=prompt, images=(image,))
            final = None
            async for ev in router.generate(req):
                if isinstance(ev, FinalEvent):
                    final = ev
            return final

        warm = [await one(f"warm-{i}", img) for i, img in enumerate(images_for(2, seed=7))]
        encode_s = warm[-1].timings.encode_s
        if args.rate is None:  # the first mode measures; the others reuse its rate
            args.rate = args.load / encode_s
        rate = args.rate
        router.recent.clear()
        if router.policy is not None:
            router.policy.since = time.monotonic()
        n = max(1, int(args.seconds * rate))
        images = images_for(n, seed=8 + switching)
        print(
            f"  policy {'on' if switching else 'off'}: one image encodes in {encode_s:.2f}s; "
            f"{n} requests at {rate:.2f}/s",
            flush=True,
        )
        t0 = time.monotonic()

        async def timed(i: int) -> Sample:
            await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
            sent = time.monotonic() - t0
            final = await one(f"r{i}", images[i])
            return Sample(
                sent,
                final.timings.ttft_s if final and not final.error else float("inf"),
                bool(final) and not final.error,
            )

        samples = await asyncio.gather(*(timed(i) for i in range(n)))
        switches = [(s.at_unix_s, s.worker_id, s.from_role.value, s.to_role.value) for s in router.switches]
        start_unix = time.time() - (time.monotonic() - t0)
        return samples, [(at - start_unix, w, a, b) for at, w, a, b in switches], rate
    finally:
        await router.shutdown()


def summary(label: str, samples: list[Sample], slo: float) -> list[str]:
    ok = [s for s in samples if s.ok]
    ttft = sorted(s.ttft_s for s in ok) or [float("nan")]
    met = sum(1 for s in ok if s.ttft_s <= slo)
    return [
        label,
        str(len(samples)),
        f"{100 * met / max(1, len(samples)):.0f}%",
        f"{statistics.median(ttft):.2f}",
        f"{ttft[int(0.9 * (len(ttft) - 1))]:.2f}",
        str(len(samples) - len(ok)),
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="how long requests are sent")
    ap.add_argument("--load", type=float, default=1.5, help="offered images/s over one encode worker's rate")
    ap.add_argument("--rate", type=float, default=None, help="requests/s (default: from --load)")
    ap.add_argument("--ttft-slo", type=float, default=8.0)
    ap.add_argument("--vision-layers", type=int, default=8)
    ap.add_argument("--modes", default="off,on")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir = checkpoint(args.vision_layers)
    load0 = os.getloadavg()[0]
    rows, notes = [], []
    for mode in args.modes.split(","):
        samples, switches, rate = asyncio.run(run_mode(model_dir, mode == "on", args))
        thirds = [
            [s for s in samples if k * args.seconds / 3 <= s.sent_at < (k + 1) * args.seconds / 3] for k in range(3)
        ]
        for k, part in enumerate(thirds):
            rows.append(summary(f"policy {mode}, third {k + 1}", part, args.ttft_slo))
        rows.append(summary(f"policy {mode}, all", samples, args.ttft_slo))
        notes.append(
            f"policy {mode}: {rate:.2f} req/s; switches: "
            + (", ".join(f"{w} {a}->{b} at {t:.1f}s" for t, w, a, b in switches) or "none")
        )
    print(
        f"\nvision: ViT-L/14-336 shapes, {args.vision_layers} layers; 1 encode + 2 prefill + 1 decode "
        f"worker, 1 thread each; {os.cpu_count()} cores; load average {load0:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end; TTFT SLO {args.ttft_slo}s; thirds by arrival time"
    )
    print_table(["run", "requests", "TTFT met", "TTFT p50 s", "TTFT p90 s", "errors"], rows)
    for note in notes:
        print(note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
