"""A worker of `tensor_parallel: N` on Ray: N rank actors packed on one node, one worker to the router.

    spawn (controller) ──▶ placement group of N bundles, STRICT_PACK (one node), each bundle one
                           rank's share of the pool's num_cpus / num_gpus / resources
      └▶ rank 0: the WorkerActor, in bundle 0; in its constructor it loads the model, picks a
         rendezvous port on its node, starts ranks 1..N-1 as TPRankActors in bundles 1..N-1 (each
         loads the model and joins), joins the group itself (engine/tensor_parallel.py: gloo on
         the CPU, NCCL on GPUs) and builds its inner worker on an engine that drives the group.

To the router the group is one worker: rank 0's handle (one reserve / submit / poll, one status).
One death: the follower actors are owned by rank 0, so Ray kills them when rank 0 dies; a dead
follower breaks rank 0's next collective (the engine raises WorkerBroken, the step loop dies) and
is seen at once by rank 0's ready() / status() (its run() call ended), so the worker reports itself
dead and the supervisor replaces the whole group (the controller removes the old placement group
before it spawns the new one). A follower that fails to start fails rank 0's constructor at once
with its reason (`join_watching`). Colocated, prefill and decode workers can be groups; a group
keeps its role (role switching is for workers of one rank).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from decode_workers.decode_core import decode_follower
from engine.errors import WorkerLoopDied
from engine.llm_engine import LoadedModel, follower
from engine.tensor_parallel import TPGroup
from engine.worker_api import Role, free_port, setup_threads
from prefill_workers.prefill_core import prefill_follower

GROUP_READY_TIMEOUT_S = 300.0  # rank 0 waits this long for the other ranks to join


@dataclass(frozen=True)
class TPSpec:
    """How rank 0 (a WorkerActor) starts its group: `size` ranks, rank r in bundle r of
    `placement_group`, each reserving `rank_resources` (Ray actor options) with `threads` threads."""

    size: int
    placement_group: object  # ray.util.placement_group.PlacementGroup
    rank_resources: dict
    threads: int


def rank_share(num_cpus: float, num_gpus: float, resources: dict[str, float], size: int) -> dict[str, float]:
    """One rank's bundle: the worker's reservation split evenly over its `size` ranks."""
    bundle = {"CPU": num_cpus / size, **{k: v / size for k, v in resources.items()}}
    if num_gpus:
        bundle["GPU"] = num_gpus / size
    return {k: v for k, v in bundle.items() if v > 0}


def rendezvous_address() -> str:
    """tcp://<this node's IP>:<a free port> for the group's rendezvous (rank 0 hosts it)."""
    import ray

    ip = ray.util.get_node_ip_address()
    return f"tcp://{ip}:{free_port(ip)}"


class TPRankActor:
    """Rank r > 0 of a worker's group: the model's shard and this rank's KV heads; it runs the
    forwards rank 0 broadcasts inside `run()` until rank 0 stops (the role's follower: a colocated
    rank computes, a prefill rank also sends its KV heads, a decode rank's cache receives them)."""

    def __init__(self, worker_id: str, rank: int, size: int, model: str | None, role: Role, options, threads: int):
        setup_threads(threads)
        self.worker_id, self.rank, self.size = worker_id, rank, size
        self.role, self.options = role, options
        engine = options.engine
        self.loaded = LoadedModel.load(model, engine.dtype, engine.placement().device)

    def run(self, address: str) -> int:
        """Join the group at `address`, then follow rank 0's forwards; returns how many ran when
        rank 0 stops the group. Raises when the group breaks (rank 0 died)."""
        tp = TPGroup.join(self.rank, self.size, self.loaded.device, address, timeout_s=GROUP_READY_TIMEOUT_S)
        try:
            if self.role is Role.PREFILL:
                return prefill_follower(self.options, self.loaded, tp)
            if self.role is Role.DECODE:
                return decode_follower(self.options, self.loaded, tp)
            return follower(self.options.engine, self.loaded, tp)
        finally:
            tp.leave()


def join_watching(join: Callable[[], TPGroup], ended: Callable[[], str | None], poll_s: float = 0.5) -> TPGroup:
    """Rank 0's `join()` (it blocks until every rank has joined) while watching the followers:
    when one ends first (it could not load the model, its node has no GPU, ...) raise at once with
    its reason instead of waiting out the rendezvous timeout. The abandoned join runs on in a
    daemon thread; the actor whose constructor raised is gone with it."""
    box: dict[str, object] = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["group"] = join()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc
        done.set()

    threading.Thread(target=run, name="tp-join", daemon=True).start()
    while not done.wait(poll_s):
        why = ended()
        if why is not None:
            raise RuntimeError(f"the tensor-parallel group could not form: {why}")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["group"]  # type: ignore[return-value]


class RankGroup:
    """Rank 0's view of its followers: started, joined, and watched."""

    def __init__(self, worker_id: str, spec: TPSpec, model: str | None, role: Role, options, device) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.worker_id = worker_id
        base = ray.get_runtime_context().get_actor_name() or worker_id  # unique per incarnation
        address = rendezvous_address()
        self.actors, self.runs = [], []
        for rank in range(1, spec.size):
            strategy = PlacementGroupSchedulingStrategy(spec.placement_group, placement_group_bundle_index=rank)
            actor = (
                ray.remote(TPRankActor)
                .options(**spec.rank_resources, scheduling_strategy=strategy, max_restarts=0, name=f"{base}-rank{rank}")
                .remote(worker_id, rank, spec.size, model, role, options, spec.threads)
            )
            self.actors.append(actor)
            self.runs.append(actor.run.remote(address))
        self.tp = join_watching(
            lambda: TPGroup.join(0, spec.size, device, address, timeout_s=GROUP_READY_TIMEOUT_S), self.ended
        )

    def ended(self) -> str | None:
        """Why a follower's run() ended (it failed to start, died, or the group broke); None while
        every follower runs."""
        import ray

        done, _ = ray.wait(self.runs, num_returns=len(self.runs), timeout=0)
        for ref in done:
            rank = self.runs.index(ref) + 1
            try:
                ray.get(ref)
                return f"rank {rank} of tensor-parallel worker {self.worker_id} stopped"
            except Exception as exc:  # noqa: BLE001 - any end of a follower is the group's death
                cause = getattr(exc, "cause", None) or exc
                return f"rank {rank} of tensor-parallel worker {self.worker_id} died ({type(cause).__name__}: {cause})"
        return None

    def check(self) -> None:
        """WorkerLoopDied (the worker is dead: the supervisor replaces it) when a follower's run()
        ended (it died, or the group broke)."""
        why = self.ended()
        if why is not None:
            raise WorkerLoopDied(why)

    def stop(self) -> None:
        """Stop the followers (after the engine sent STOP) and leave the group."""
        import ray

        ray.wait(self.runs, num_returns=len(self.runs), timeout=10)
        for actor in self.actors:
            ray.kill(actor)
        self.tp.leave()
