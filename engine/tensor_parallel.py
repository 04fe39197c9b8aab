"""Tensor parallelism: one engine over the ranks of a torch.distributed group.

Sharding. The model's own tensor-parallel plan (transformers' `config.base_model_tp_plan`: for a
Llama, q/k/v/gate/up column-wise, o/down row-wise) says which linear layers split how; this module
applies it to plain tensors: a column-wise layer keeps this rank's rows of the weight (its heads,
its part of the MLP intermediate), a row-wise layer keeps its columns and all-reduces its output
(one `dist.all_reduce` per row-wise layer, two per decoder layer). Attention then sees plain
tensors holding this rank's heads (transformers reshapes projections with `-1` heads), so the
paged cache, the attention function and the Triton kernel run unchanged on num_heads / t query
heads and num_kv_heads / t KV heads; embeddings, norms and lm_head stay whole on every rank.

Why not PyTorch's tensor-parallel API (`parallelize_module` with ColwiseParallel /
RowwiseParallel, local outputs): it was built first and is token-identical, but every linear
layer then dispatches through DTensor, which on this CPU made the layers' time 4-5x that of the
same matmuls on plain tensors (cProfile of a 4-layer decode step at TP 2: 136 ms in linear layers
vs 34 ms), more than the whole TP 1 step. The plan, not hand-picked layer names, keeps the
model-agnostic part of that API.

A rank's KV cache holds KV heads [rank * n / t, (rank + 1) * n / t) of every layer
(`KVLayout.kv_head_start` records where its range starts; the transfer hash covers it). So t must
divide both head counts (`check_degree`; the planner enumerates only such t).

Steps run SPMD with one driver. Rank 0 is the engine: it schedules, owns the block tables and
samples. Each forward it broadcasts the batch's plan (per sequence: the new token ids, the first
position, the block table; the sparse setting; the image embeddings if any) to the group; every
rank builds the same packed inputs from the plan (ModelRunner.build_plan) and runs the same
forward over its own heads and cache, meeting the others at each all-reduce; rank 0 alone applies
lm_head to the replicated hidden states and samples. Followers run `follow()` until the driver
sends STOP (or the group breaks, which ends them with an error).
"""

from __future__ import annotations

import datetime
import logging
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.errors import EngineError
from engine.kv_layout import KVLayout
from engine.worker_api import Role, free_port

log = logging.getLogger(__name__)

STOP = "stop"  # what the driver broadcasts instead of a plan to end the followers
STEP_TIMEOUT_S = 600.0  # a collective that waits longer than this fails (a dead rank)

STYLES = {"colwise", "rowwise"}  # the plan entries this module applies
MAX_TENSOR_PARALLEL = 64  # a group's ranks are packed on one node: no node has more devices

# The pools whose workers may be tensor-parallel groups (every pool with a language model). KV
# between prefill and decode workers of different TP moves over the same-node transports, which
# write each rank's heads in place (kv_transfer/shm.py).
TP_ROLES = frozenset({Role.COLOCATED, Role.PREFILL, Role.DECODE})


def check_degree(config, tp: int, model_name: str = "the model") -> None:
    """EngineError unless `tp` >= 1 divides the model's attention and KV heads."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if not isinstance(tp, int) or not 1 <= tp <= MAX_TENSOR_PARALLEL:
        raise EngineError(f"tensor_parallel must be an integer in [1, {MAX_TENSOR_PARALLEL}], got {tp!r}")
    if heads % tp or kv_heads % tp:
        raise EngineError(
            f"tensor_parallel {tp} does not divide the {heads} attention heads and {kv_heads} KV heads of "
            f"{model_name} (a rank holds whole heads): use a degree dividing both"
        )


def backend_for(device: torch.device) -> str:
    """NCCL between GPUs, gloo on the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


@dataclass
class TPGroup:
    """This process's place in a tensor-parallel group (one per engine)."""

    rank: int
    size: int
    device: torch.device
    group: dist.ProcessGroup | None = None
    allreduce_s: float = 0.0  # time spent in the row-wise layers' all-reduces (profile=True)
    profile: bool = False
    stopped: bool = False  # the driver sent STOP: no more forwards

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    @classmethod
    def single(cls, device: torch.device) -> TPGroup:
        """No parallelism: one rank, no group (the engine's default)."""
        return cls(0, 1, device)

    @classmethod
    def join(
        cls,
        rank: int,
        size: int,
        device: torch.device,
        init_method: str,
        timeout_s: float = STEP_TIMEOUT_S,
    ) -> TPGroup:
        """Join the group of `size` ranks at `init_method` (tcp://host:port) as `rank`: the default
        process group of this process, NCCL on CUDA and gloo on the CPU."""
        if size < 1 or not 0 <= rank < size:
            raise EngineError(f"rank {rank} is not in a tensor-parallel group of {size}")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            backend_for(device),
            init_method=init_method,
            rank=rank,
            world_size=size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        return cls(rank, size, device, dist.group.WORLD)

    def leave(self) -> None:
        if self.group is not None and dist.is_initialized():
            dist.destroy_process_group()
        self.group = None

    # ---------------------------------------------------------------- sharding
    def shard(self, model) -> None:
        """Shard `model` (a transformers causal LM whose weights are whole on every rank) in
        place with its config's TP plan; nothing to do for one rank."""
        if self.size == 1:
            return
        import fnmatch

        done_for = getattr(model, "_triptych_tp", None)  # (rank, size) it was sharded for
        if done_for == (self.rank, self.size):
            return  # another engine of this process sharded it already
        if done_for is not None:
            raise EngineError(f"the model is already sharded for rank {done_for[0]} of {done_for[1]}")

        check_degree(model.config, self.size, getattr(model.config, "name_or_path", "") or "the model")
        plan = getattr(model.config, "base_model_tp_plan", None) or {}
        unknown = sorted({style for style in plan.values() if style not in STYLES})
        if not plan or unknown:
            raise EngineError(
                f"{type(model).__name__} declares no tensor-parallel plan this engine can apply "
                f"({'styles ' + ', '.join(unknown) if unknown else 'none'}); serve it with tensor_parallel 1"
            )
        done = 0
        for name, module in model.model.named_modules():
            style = next((st for pattern, st in plan.items() if fnmatch.fnmatchcase(name, pattern)), None)
            if style is None:
                continue
            if not isinstance(module, torch.nn.Linear):
                raise EngineError(
                    f"the TP plan names {name}, a {type(module).__name__}; only linear layers are sharded"
                )
            self._shard_linear(module, style)
            done += 1
        if not done:
            raise EngineError(f"the TP plan of {type(model).__name__} matches none of its layers")
        model._triptych_tp = (self.rank, self.size)

    def _shard_linear(self, lin: torch.nn.Linear, style: str) -> None:
        """colwise: this rank's rows of the weight (its heads / its part of the MLP intermediate),
        output stays local. rowwise: this rank's columns; the partial outputs are all-reduced
        (the bias, if any, is added once: rank 0 keeps it)."""
        dim = 0 if style == "colwise" else 1
        weight = lin.weight.detach().chunk(self.size, dim)[self.rank].contiguous()
        lin.weight = torch.nn.Parameter(weight, requires_grad=False)
        if lin.bias is not None and (style == "colwise" or self.rank != 0):
            bias = lin.bias.detach().chunk(self.size, 0)[self.rank] if style == "colwise" else lin.bias.detach() * 0
            lin.bias = torch.nn.Parameter(bias.contiguous(), requires_grad=False)
        if style == "colwise":
            lin.out_features = weight.shape[0]
            return
        lin.in_features = weight.shape[1]
        lin.register_forward_hook(self._all_reduce)

    def _all_reduce(self, module, inputs, output: torch.Tensor) -> torch.Tensor:
        if not self.profile:
            dist.all_reduce(output, group=self.group)
            return output
        start = time.perf_counter()
        dist.all_reduce(output, group=self.group)
        self.allreduce_s += time.perf_counter() - start
        return output

    def local_layout(self, layout: KVLayout) -> KVLayout:
        """The part of a whole-model cache layout this rank holds: its KV heads."""
        if layout.num_kv_heads % self.size:
            raise EngineError(f"{layout.num_kv_heads} KV heads do not split over {self.size} ranks")
        n = layout.num_kv_heads // self.size
        start = layout.kv_head_start + self.rank * n
        return layout.with_heads(range(start, start + n))

    # ---------------------------------------------------------------- steps
    def broadcast_plan(self, plan: object, embeds: torch.Tensor | None = None) -> None:
        """Driver: send one forward's plan to the followers."""
        if self.size == 1:
            return
        if self.stopped:
            raise EngineError("the tensor-parallel group was stopped: this engine runs no more forwards")
        shape = None if embeds is None else (tuple(embeds.shape), str(embeds.dtype).removeprefix("torch."))
        dist.broadcast_object_list([(plan, shape)], src=0, group=self.group)
        if embeds is not None:
            dist.broadcast(embeds.contiguous(), src=0, group=self.group)

    def stop(self) -> None:
        """Driver: end the followers' loops (`follow` returns). Idempotent; nothing for one rank."""
        if self.size > 1 and not self.stopped:
            try:
                self.broadcast_plan(STOP)
            except Exception as exc:  # noqa: BLE001 - a broken group has no loops left to end
                log.warning("stopping the tensor-parallel group: %s", exc)
            self.stopped = True

    def gather(self, obj: object) -> list[object]:
        """Every rank's `obj` in rank order; every rank calls it at the same point."""
        if self.size == 1:
            return [obj]
        out: list[object] = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def receive_plan(self) -> tuple[object, torch.Tensor | None]:
        """Follower: the next plan (STOP at the end) and the image embeddings that come with it."""
        box: list[object] = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        plan, shape = box[0]  # type: ignore[misc]
        if shape is None:
            return plan, None
        embeds = torch.empty(shape[0], dtype=getattr(torch, shape[1]), device=self.device)
        dist.broadcast(embeds, src=0, group=self.group)
        return plan, embeds


def follow(runner, tp: TPGroup, work=None) -> int:
    """A follower rank's loop: run every forward the driver broadcasts on `runner` (this rank's
    shard and cache) until STOP; returns the number of forwards run. work(plan, sparse, extra,
    embeds), when given, runs each forward instead (a prefill rank sends its KV heads as it goes);
    `extra` is what the driver's forward passed for its followers."""
    steps = 0
    while True:
        message, embeds = tp.receive_plan()
        if message == STOP:
            return steps
        plan, sparse, extra = message  # type: ignore[misc]
        if work is None:
            runner.run_plan(plan, sparse, embeds)
        else:
            work(plan, sparse, extra, embeds)
        steps += 1


# ---------------------------------------------------------------- a group on this machine
LOCAL_TIMEOUT_S = 300.0


def _local_rank(fn, rank: int, size: int, port: int, device: str, threads: int, args: tuple, out) -> None:
    import os
    import traceback

    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    dev = torch.device(f"cuda:{rank}" if device == "cuda" else "cpu")
    tp = None
    try:
        tp = TPGroup.join(rank, size, dev, f"tcp://127.0.0.1:{port}", timeout_s=LOCAL_TIMEOUT_S)
        out.put((rank, "ok", fn(tp, *args)))
    except BaseException:
        out.put((rank, "error", traceback.format_exc()))
    finally:
        if tp is not None:
            tp.leave()


def run_local_group(fn, size: int, *args, device: str = "cpu", threads: int = 1, timeout_s: float = LOCAL_TIMEOUT_S):
    """Run fn(tp, *args) on every rank of a new group of `size` processes on this machine (spawned;
    gloo over loopback with `threads` torch threads each, or NCCL with rank r on cuda:r) and return
    rank 0's result. `fn` must be importable (a module-level function). An error on any rank is
    raised with its traceback; a rank that ends its process without answering (a simulated death)
    is only waited for until it exits. The profiler, bench.tp and the tests run groups with it;
    a deployment's groups are Ray actors (cluster/tp_group.py)."""
    import multiprocessing as mp
    import queue

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_local_rank, args=(fn, r, size, port, device, threads, args, out), daemon=True)
        for r in range(size)
    ]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while 0 not in results or any(r not in results and procs[r].is_alive() for r in range(1, size)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the tensor-parallel group did not finish within {timeout_s:.0f}s")
            try:
                rank, status, value = out.get(timeout=0.5)
            except queue.Empty:
                if not procs[0].is_alive() and 0 not in results:
                    raise RuntimeError(f"rank 0 exited with code {procs[0].exitcode} without an answer") from None
                continue
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    while True:  # what ranks that exited meanwhile still said
        try:
            rank, status, value = out.get(timeout=0.1)
        except queue.Empty:
            return results[0]
        if status == "error":
            raise RuntimeError(f"rank {rank} failed:\n{value}")
