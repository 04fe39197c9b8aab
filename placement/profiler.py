"""`triptych profile --config FILE -o profile.json`: measure the real engine for the planner.

Measures, on this machine and with the deployment's engine settings:
  prefill  one packed forward over batches of prompts (time vs. the prompt lengths),
  decode   one step over B sequences of context C (time vs. B and total context),
  transfer one KV hand-off of N bytes through the deployment's transport (shm/gloo in-process,
           receiver and sender in this process: the copy cost without Ray's scheduling),
and writes a `placement.profile` file that `triptych plan --model profile.json` fits.
The profiled TP degree is the pool's `tensor_parallel`, run as real ranks (processes of one
gloo / NCCL group, engine/tensor_parallel.py), each with `--threads` torch threads (default: its
share of the pool's num_cpus); the profile records that degree. `--co-run K` keeps K-1 other
processes doing prefill and decode forwards (N threads each) while prefill and decode are timed,
so on a CPU node the samples see the other cores busy, as they are when a plan is deployed.
Encode is left empty for text-only models (the planner then uses its roofline prior).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="deploy YAML whose model and engine settings to measure")
    parser.add_argument("-o", "--output", default="profile.json", help="where to write the profile (JSON)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per rank (default: the profiled pool's num_cpus / tensor_parallel)",
    )
    parser.add_argument("--quick", action="store_true", help="fewer, shorter samples (about a minute on 2 cores)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per sample; the median is kept")
    parser.add_argument(
        "--co-run",
        type=int,
        default=1,
        help="processes doing the same kind of work meanwhile, this one included (default 1: alone). "
        "On a CPU node the cores of a deployment share caches and memory bandwidth (and, on a "
        "shared machine, the CPU): profile 1-thread workers of a 2-core node with --co-run 2 so "
        "the samples see the other core busy, as it is when the plan is deployed",
    )


def _progress(msg: str) -> None:
    print(f"[profile] {msg}", file=sys.stderr, flush=True)


class EngineProbe:
    """Times raw forwards of the engine's runner on sequences with made-up (but valid) tokens."""

    def __init__(self, loaded, engine_config, tp=None) -> None:
        """tp: the tensor-parallel group this probe drives (rank 0; the model is sharded here)."""
        from engine.kv_cache import BlockManager
        from engine.llm_engine import tp_runner
        from engine.tensor_parallel import TPGroup

        self.engine_config = engine_config
        self.blocks = BlockManager(engine_config.num_kv_blocks, engine_config.block_size)
        self.vocab = loaded.model.config.vocab_size
        self.runner = tp_runner(loaded, engine_config, tp or TPGroup.single(loaded.device))

    def _seq(self, i: int, n: int, computed: int):
        from engine.sequence import SamplingParams, Sequence

        ids = [(7919 * (i + 1) + 31 * k) % (self.vocab - 3) + 3 for k in range(n)]
        seq = Sequence(f"p{i}", ids, SamplingParams(max_tokens=1), num_computed_tokens=computed)
        self.blocks.allocate(seq.block_table, n)
        return seq

    def time_forward(self, prompt_lens: list[int], computed: list[int], reps: int) -> float:
        from engine.scheduler import ScheduledSeq

        seqs = [self._seq(i, n, c) for i, (n, c) in enumerate(zip(prompt_lens, computed))]
        try:
            batch = [ScheduledSeq(s, s.num_tokens - s.num_computed_tokens) for s in seqs]
            times = []
            for _ in range(reps + 1):
                t = time.perf_counter()
                self.runner.forward(batch, sparse=self.engine_config.sparse)
                times.append(time.perf_counter() - t)
            return statistics.median(times[1:])
        finally:
            for s in seqs:
                self.blocks.free(s.block_table)


def _transfer_samples(layout, backend_name: str, sizes_blocks: list[int], reps: int):
    import torch

    from kv_transfer.registry import get_backend
    from placement.profile import TransferSample

    backend = get_backend(backend_name)
    n_max = max(sizes_blocks)
    src = torch.randn(layout.cache_shape(n_max)).to(layout.torch_dtype)
    out = []
    with backend.Receiver(layout) as rx, backend.Sender(layout) as tx:
        rx.allocate_cache(n_max)
        for n in sizes_blocks:
            times = []
            for rep in range(reps + 1):
                rid = f"t{n}-{rep}"
                t = time.perf_counter()
                desc = rx.prepare(rid, list(range(n)))
                tx.connect(desc)
                for layer in range(layout.num_layers):
                    tx.send_layer(rid, layer, src[layer], src_block_ids=list(range(n)))
                tx.finish(rid, timeout=60)
                rx.wait(rid, timeout=60)
                times.append(time.perf_counter() - t)
                rx.release(rid)
            out.append(TransferSample(n * layout.bytes_per_block(), statistics.median(times[1:])))
    return out


def run(args: argparse.Namespace) -> int:
    from cluster.config import ConfigError, load_config
    from placement.errors import PlanningError

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"triptych profile: {exc}", file=sys.stderr)
        return 2
    try:
        profile = measure(config, threads=args.threads, quick=args.quick, reps=args.reps, co_run=args.co_run)
    except PlanningError as exc:
        print(f"triptych profile: {exc}", file=sys.stderr)
        return 2
    from placement.profile import save_profile

    save_profile(profile, args.output)
    _progress(
        f"wrote {args.output}: {len(profile.prefill)} prefill, {len(profile.decode)} decode, "
        f"{len(profile.transfer)} transfer samples"
    )
    return 0


def _co_runner(model_path, engine_cfg, threads: int, ready, stop) -> None:
    """A neighbour process: alternates a prefill forward and a decode step until `stop` is set."""
    import dataclasses

    import torch

    from engine.llm_engine import LoadedModel

    import os

    parent = os.getppid()
    torch.set_num_threads(threads)
    cfg = dataclasses.replace(engine_cfg, num_kv_blocks=min(engine_cfg.num_kv_blocks, 512))
    probe = EngineProbe(LoadedModel.load(model_path, cfg.dtype), cfg)
    probe.time_forward([256], [0], 1)
    ready.set()
    while not stop.is_set() and os.getppid() == parent:  # also ends if the profiler was killed
        probe.time_forward([256], [0], 1)
        for _ in range(4):
            probe.time_forward([129] * 16, [128] * 16, 1)


class CoRun:
    """Context manager: `n` neighbour processes (see `_co_runner`) busy while the samples are timed."""

    def __init__(self, n: int, model_path, engine_cfg, threads: int) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.stop = ctx.Event()
        self.ready = [ctx.Event() for _ in range(n)]
        self.procs = [
            ctx.Process(target=_co_runner, args=(model_path, engine_cfg, threads, r, self.stop), daemon=True)
            for r in self.ready
        ]

    def __enter__(self) -> "CoRun":
        for p in self.procs:
            p.start()
        for p, r in zip(self.procs, self.ready):
            while not r.wait(1.0):
                if not p.is_alive():
                    self.__exit__(None, None, None)
                    raise RuntimeError(f"co-run process exited with code {p.exitcode} before it was ready")
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for p in self.procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()


def measure(config, *, threads: int | None = None, quick: bool = False, reps: int = 3, co_run: int = 1):
    from cluster.controller import engine_config
    from engine.tensor_parallel import run_local_group
    from engine.worker_api import Mode
    from placement.errors import PlanningError

    if co_run < 1:
        raise PlanningError(f"--co-run must be >= 1, got {co_run}")
    pool = config.pools.colocated if config.mode is Mode.COLOCATED else config.pools.prefill
    size = pool.tensor_parallel
    threads = threads or max(1, int(pool.num_cpus / size))
    job = (config.model.path, engine_config(config, pool), config.transport.backend.value, threads, quick, reps, co_run)
    if size == 1:
        return _measure(None, *job)
    if co_run > 1:
        raise PlanningError("--co-run applies to TP 1 profiles; a TP group already keeps its cores busy")
    _progress(f"profiling TP {size}: {size} ranks of {threads} thread(s) in one gloo group ...")
    return run_local_group(_measure, size, *job, threads=threads)


def _measure(tp, model_path, ecfg, backend: str, threads: int, quick: bool, reps: int, co_run: int):
    """Profile as rank 0 of `tp` (None: one rank); a follower rank runs rank 0's forwards."""
    import contextlib

    import torch

    from engine.llm_engine import LoadedModel, follower

    torch.set_num_threads(threads)
    if tp is not None and not tp.is_driver:
        follower(ecfg, LoadedModel.load(model_path, ecfg.dtype), tp)
        return None
    _progress(f"loading the model ({model_path or 'embedded SmolLM2-135M-Instruct'}) ...")
    loaded = LoadedModel.load(model_path, ecfg.dtype)
    model, layout = _model_shape(loaded, ecfg)  # before the probe shards it
    probe = EngineProbe(loaded, ecfg, tp)
    neighbours = contextlib.nullcontext()
    if co_run > 1:
        _progress(f"starting {co_run - 1} co-running process(es) with {threads} thread(s) each ...")
        neighbours = CoRun(co_run - 1, model_path, ecfg, threads)
    try:
        with neighbours:
            prefill, decode = _forward_samples(probe, ecfg, quick, reps)
    finally:
        if tp is not None:
            tp.stop()
    return _finish_profile(backend, model, layout, prefill, decode, reps, co_run, tp.size if tp else 1, threads, quick)


def _forward_samples(probe: EngineProbe, ecfg, quick: bool, reps: int):
    from placement.profile import DecodeSample, PrefillSample

    prefill_batches = (
        [[64], [256], [512], [128, 128], [256, 256], [64] * 8, [1024]]
        if quick
        else [
            [32],
            [128],
            [256],
            [512],
            [1024],
            [2048],
            [128, 128],
            [256, 256, 256, 256],
            [512, 512],
            [64] * 8,
            [1024, 1024],
            [3072],
        ]
    )
    prefill = []
    for i, lens in enumerate(prefill_batches):
        _progress(f"prefill {i + 1}/{len(prefill_batches)}: prompts {lens}")
        prefill.append(PrefillSample(tuple(lens), probe.time_forward(lens, [0] * len(lens), reps)))

    batches = [1, 4, 16] if quick else [1, 4, 8, 16, 32, 64]
    contexts = [128, 512] if quick else [128, 512, 1024, 2048]
    decode = []
    for b in batches:
        for c in contexts:
            if b * (c + 1) > ecfg.num_kv_blocks * ecfg.block_size:
                continue
            _progress(f"decode: batch {b}, context {c}")
            t = probe.time_forward([c + 1] * b, [c] * b, reps)
            decode.append(DecodeSample(b, b * c, t))
    return prefill, decode


def _model_shape(loaded, ecfg):
    """The model's geometry for the planner, and its whole (unsharded) KV layout."""
    from placement.profile import ModelShape

    layout = loaded.kv_layout(ecfg.block_size)
    cfg = loaded.model.config
    shape = ModelShape(
        loaded.name,
        layout.num_layers,
        cfg.hidden_size,
        cfg.num_attention_heads,
        layout.num_kv_heads,
        layout.head_dim,
        cfg.intermediate_size,
        cfg.vocab_size,
        sum(p.numel() for p in loaded.model.parameters()),
        layout.itemsize,
        layout.bytes_per_token,
    )
    return shape, layout


def _finish_profile(
    backend: str, model, layout, prefill, decode, reps: int, co_run: int, tp: int, threads: int, quick: bool
):
    from placement.profile import HardwareInfo, Profile

    sizes = [4, 16, 64] if quick else [4, 16, 64, 256]
    _progress(f"transfer over {backend}: {sizes} blocks")
    transfer = _transfer_samples(layout, backend, sizes, reps)
    # The profiled TP degree is the number of real ranks; on a CPU cluster each is a device of
    # `threads` cores (the planner's CPU clusters count one core per device: profile 1 thread).
    busy = f", {co_run - 1} co-running process(es)" if co_run > 1 else ""
    hardware = HardwareInfo(f"CPU, TP {tp} x {threads} thread(s){busy}", "cpu", tp, tp, 1)
    return Profile(model, hardware, tuple(prefill), tuple(decode), (), tuple(transfer))
