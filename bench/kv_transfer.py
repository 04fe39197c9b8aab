"""KV transfer throughput between two Ray actors on this machine, next to an in-process memcpy.

    .venv/bin/python -m bench.kv_transfer [--sizes 1 4 16 64 256] [--backends shm gloo] [--reps 3]

A request of S MiB is streamed as 8 layers of S/8 MiB each (send_layer per layer, then finish);
the time runs from the sender's connect() to the moment the receiver's wait() sees DONE. The
memcpy column is torch copy_ of S MiB inside the sender actor (same thread settings). GPU
backends (cuda_ipc, nccl) need CUDA and are skipped here; `ttft_streaming_table` is the hook
for the TTFT streaming-on/off comparison once the engine exists.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import ray
import torch

from engine.kv_layout import KVLayout
from kv_transfer.registry import get_backend

LAYOUT = KVLayout("bench", torch.float16, num_layers=8, num_kv_heads=8, head_dim=128, block_size=16)
MIB = 1 << 20


def blocks_for(mib: int) -> int:
    return max(1, mib * MIB // LAYOUT.bytes_per_block())


@ray.remote(num_cpus=1, max_concurrency=2)
class ReceiverActor:
    def __init__(self, backend: str, num_blocks: int) -> None:
        opts = {"host": "127.0.0.1"} if backend == "gloo" else {}
        self.rx = get_backend(backend).Receiver(LAYOUT, **opts)
        self.rx.allocate_cache(num_blocks)

    def prepare(self, rid: str, n: int):
        return self.rx.prepare(rid, list(range(1, n + 1)))  # dst ids offset from src ids

    def wait_done(self, rid: str) -> float:
        self.rx.wait(rid, timeout=300)
        done = time.monotonic()
        self.rx.release(rid)
        return done

    def close(self) -> None:
        self.rx.close()


@ray.remote(num_cpus=1)
class SenderActor:
    def __init__(self, backend: str, num_blocks: int) -> None:
        opts = {"host": "127.0.0.1"} if backend == "gloo" else {}
        self.tx = get_backend(backend).Sender(LAYOUT, **opts)
        self.src = torch.randn(LAYOUT.cache_shape(num_blocks), dtype=torch.float32).to(LAYOUT.torch_dtype)

    def send(self, desc) -> float:
        rid, n = desc.meta.request_id, len(desc.meta.dst_block_ids)
        start = time.monotonic()
        self.tx.connect(desc)
        for layer in range(LAYOUT.num_layers):
            self.tx.send_layer(rid, layer, self.src[layer], src_block_ids=range(n))
        self.tx.finish(rid, timeout=300)
        return start

    def memcpy_mib_s(self, mib: int, reps: int) -> float:
        src = torch.ones(mib * MIB // 2, dtype=torch.float16)
        dst = torch.empty_like(src)
        dst.copy_(src)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
        return mib / statistics.median(times)

    def close(self) -> None:
        self.tx.close()


def bench_backend(backend: str, sizes: list[int], reps: int) -> dict[int, float]:
    num_blocks = blocks_for(max(sizes)) + 1
    rx = ReceiverActor.remote(backend, num_blocks)
    tx = SenderActor.remote(backend, num_blocks)
    out = {}
    for mib in sizes:
        times = []
        for i in range(reps + 1):  # first round warms mappings / links
            desc = ray.get(rx.prepare.remote(f"{mib}-{i}", blocks_for(mib)))
            done_ref = rx.wait_done.remote(desc.meta.request_id)
            start = ray.get(tx.send.remote(desc))
            if i:
                times.append(ray.get(done_ref) - start)
            else:
                ray.get(done_ref)
        out[mib] = blocks_for(mib) * LAYOUT.bytes_per_block() / MIB / statistics.median(times)
    ray.get([rx.close.remote(), tx.close.remote()])
    return out


def ttft_streaming_table(
    run_prefill: Callable[[bool], float],
    prompt_lens: list[int],
    run_for_len: Callable[[int, bool], float] | None = None,
    reps: int = 3,
) -> str:
    """Hook for the engine: TTFT with layer-wise streaming on vs off.

    run_for_len(prompt_len, streaming) -> TTFT seconds for one disaggregated request (main()
    wires it to a prefill + decode worker pair); run_prefill(streaming) is used when every
    prompt length is the same request. Returns the printed table.
    """
    run = run_for_len or (lambda _n, streaming: run_prefill(streaming))
    lines = [f"{'prompt':>8} {'TTFT off (ms)':>14} {'TTFT on (ms)':>13} {'speedup':>8}"]
    for n in prompt_lens:
        off = statistics.median(run(n, False) for _ in range(reps))
        on = statistics.median(run(n, True) for _ in range(reps))
        lines.append(f"{n:>8} {off * 1e3:>14.1f} {on * 1e3:>13.1f} {off / on:>8.2f}")
    table = "\n".join(lines)
    print(table)
    return table


def cluster_ttft(prompt_lens: list[int], reps: int) -> str:
    """TTFT of one prompt through a real prefill + decode pair (shm), streaming on vs off."""
    import asyncio

    from bench.common import prompt_ids, text_token_ids
    from cluster.config import parse_config
    from cluster.controller import start_router
    from cluster.router_api import FinalEvent, GenerateInput
    from engine.sequence import SamplingParams

    async def measure(streaming: bool) -> dict[int, list[float]]:
        config = parse_config(
            {
                "version": 1,
                "ray": {"num_cpus": 2},
                "transport": {"streaming": streaming},
                "engine": {"max_num_batched_tokens": 8192},
            },
            f"bench.kv_transfer:streaming={streaming}",
        )
        router = await start_router(config)
        try:
            corpus = text_token_ids(router.tokenizer)
            out: dict[int, list[float]] = {}
            for n in prompt_lens:
                ids = prompt_ids(corpus, [n], seed=n)[0]
                for rep in range(reps + 1):  # the first run warms up and is not counted
                    inp = GenerateInput(
                        f"ttft-{streaming}-{n}-{rep}",
                        SamplingParams(max_tokens=2, ignore_eos=True),
                        token_ids=tuple(ids),
                    )
                    async for ev in router.generate(inp):
                        if isinstance(ev, FinalEvent) and rep:
                            out.setdefault(n, []).append(ev.timings.ttft_s)
            return out
        finally:
            await router.shutdown()

    results = {flag: asyncio.run(measure(flag)) for flag in (False, True)}
    return ttft_streaming_table(None, prompt_lens, run_for_len=lambda n, flag: results[flag][n].pop(), reps=reps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--ttft",
        type=int,
        nargs="*",
        default=None,
        metavar="PROMPT_LEN",
        help="instead of bandwidth: TTFT of prompts of these lengths (default 4096), streaming on vs off",
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    p.add_argument("--backends", nargs="+", default=["shm", "gloo", "cuda_ipc", "nccl"])
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    if args.ttft is not None:
        cluster_ttft(args.ttft or [4096], args.reps)
        return
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        probe = SenderActor.remote("shm", 1)
        memcpy = {mib: ray.get(probe.memcpy_mib_s.remote(mib, args.reps)) for mib in args.sizes}
        ray.kill(probe)
        results, notes = {}, []
        for backend in args.backends:
            if get_backend_safe(backend) is None or (backend in ("cuda_ipc", "nccl") and not torch.cuda.is_available()):
                notes.append(f"{backend}: skipped (needs CUDA{' and cupy' if backend == 'nccl' else ''})")
                continue
            results[backend] = bench_backend(backend, args.sizes, args.reps)
    finally:
        ray.shutdown()
    header = f"{'MiB':>5} {'memcpy MiB/s':>13}" + "".join(f" {b + ' MiB/s':>12} {'% memcpy':>9}" for b in results)
    print(header)
    for mib in args.sizes:
        row = f"{mib:>5} {memcpy[mib]:>13.0f}"
        for b, r in results.items():
            row += f" {r[mib]:>12.0f} {100 * r[mib] / memcpy[mib]:>8.0f}%"
        print(row)
    for note in notes:
        print(note)


def get_backend_safe(name: str):
    try:
        return get_backend(name)
    except ImportError:
        return None


if __name__ == "__main__":
    main()
