"""The controller: turns a DeployConfig into running pools of Ray actors and a router.

    start_router(config)
      ─▶ _load_model      model converted/cached once (progress shown), tokenizer, LLaVA config
      ─▶ _start_ray       Ray started locally (custom resources per pool) or joined
      ─▶ _spawn_pools     worker actors created with their pool's resources by `spawn(role, id,
                          epoch)` (_spawner). A LLaVA checkpoint in disaggregated mode adds the
                          encode pool: vision tower on encode workers, language side on prefill /
                          decode workers; with 0 encode workers, or colocated, the prefill /
                          colocated workers load the vision tower too and encode images
                          themselves; with role_switching.encode_prefill, encode and prefill
                          workers load both halves so they can switch between the two roles
      ─▶ _await_ready     every worker ready (bounded); KV layouts of prefill and decode checked
                          compatible (handshake)
      ─▶ _build_router    the ClusterRouter; its shutdown() stops what was started (`Started`)
      ─▶ Supervisor       restarts dead workers with the same `spawn` and swaps them into the router
      ─▶ _role_policy     the automatic role policy, when role switching is on

A failure at any step after Ray started stops every actor started so far, and a local Ray.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import sys
import time
from typing import TYPE_CHECKING, Callable

from cluster.config import ConfigError, DeployConfig, PoolConfig
from engine.worker_api import Mode
from cluster.pools import Pools, WorkerHandle
from cluster.router import ClusterRouter
from cluster.router_api import ModelInfo
from engine.worker_api import Role
from cluster.supervisor import Supervisor
from decode_workers.decode_core import DecodeOptions
from engine.config import EngineConfig
from prefill_workers.prefill_core import PrefillOptions

if TYPE_CHECKING:
    from cluster.tp_group import TPSpec

READY_TIMEOUT_S = 600.0


def _progress(msg: str) -> None:
    print(f"[triptych] {msg}", file=sys.stderr, flush=True)


def engine_config(config: DeployConfig, pool: PoolConfig) -> EngineConfig:
    """The engine settings of one of the pool's workers. The pool's `sparse` is already the
    engine's SparsePrefillConfig; the dense method runs the engine's plain prefill (no config).
    The device is the pool's (`PoolConfig.engine_device`), resolved by the worker on its own node,
    which names the pool when it cannot honour it."""
    from engine.sparse.config import SparseMethod

    sparse = None if pool.sparse.method is SparseMethod.DENSE else pool.sparse
    e = config.engine
    return EngineConfig(
        model=config.model.path,
        dtype=config.model.engine_dtype,
        device=pool.engine_device(),
        pool=pool.role.value,
        block_size=e.block_size,
        num_kv_blocks=e.num_kv_blocks,
        max_num_batched_tokens=e.max_num_batched_tokens,
        max_num_seqs=e.max_num_seqs,
        max_model_len=config.model.max_model_len,
        sparse=sparse,
        tensor_parallel=pool.tensor_parallel,
        # decode workers cache what they hold too: a conversation's next turn reuses prompt + answer
        prefix_caching=e.prefix_caching and pool.role in (Role.COLOCATED, Role.PREFILL, Role.DECODE),
        kv_selection=pool.kv_selection if pool.kv_selection.on else None,
    )


def _ray_resources(config: DeployConfig) -> dict[str, float]:
    """Custom resources a local Ray must offer so every pool's workers can be placed."""
    total: dict[str, float] = {}
    for pool in _pools(config):
        if pool.workers == 0:  # e.g. no encode pool: offer nothing for it
            continue
        for name, amount in pool.resources.items():
            total[name] = total.get(name, 0.0) + amount * pool.workers
    return total


def _pools(config: DeployConfig) -> list[PoolConfig]:
    p = config.pools
    return [p.colocated] if config.mode is Mode.COLOCATED else [p.encode, p.prefill, p.decode]


def _actor_options(pool: PoolConfig, name: str) -> dict:
    return dict(
        num_cpus=pool.num_cpus,
        num_gpus=pool.num_gpus,
        resources=dict(pool.resources),
        max_concurrency=1000,
        name=name,
        max_restarts=0,
    )


async def start_router(
    config: DeployConfig,
    *,
    ray_address: str | None = None,
    progress: Callable[[str], None] = _progress,
    namespace: str | None = None,
) -> ClusterRouter:
    """Start everything `config` asks for and return the serving router (steps in the module doc).
    A failure part-way stops what was started."""
    model = await _load_model(config)
    started = Started(ray_started=_start_ray(config, ray_address, namespace, progress))
    router = None
    try:
        spawn = _spawner(config, str(model.directory), f"{int(time.time() * 1000) % 10**8:08d}", started.groups)
        _spawn_pools(config, spawn, model.llava, started.pools)
        layouts = await _await_ready(started.pools, progress)
        dtype = next((lay.dtype for lay in layouts.values() if lay is not None), config.model.engine_dtype)
        router = _build_router(config, model, started, dtype or "float32")
        router.start()
        check = None
        if started.pools.prefill and started.pools.decode:
            from kv_transfer.layout import check_compatible

            check = functools.partial(check_compatible, layouts[started.pools.decode[0].worker_id])
        router.supervisor = Supervisor(router, spawn, _kill, check_layout=check)  # status and tests read it
        router.supervisor.start()
        started.stoppable.append(router.supervisor)
        router.policy = _role_policy(config, router, progress)
        if router.policy is not None:
            started.stoppable.append(router.policy)
    except BaseException:
        if router is not None:
            await router.shutdown()  # its pollers too; its on_shutdown is started.stop
        else:
            await started.stop()
        raise
    return router


@dataclasses.dataclass
class LoadedCheckpoint:
    """The model as the router needs it: where it is, its tokenizer, its LLaVA config (None: text-only)."""

    source: object
    directory: object
    tokenizer: object
    llava: object | None


async def _load_model(config: DeployConfig) -> LoadedCheckpoint:
    from transformers import AutoTokenizer

    from engine import model_loader, multimodal

    source = model_loader.resolve(config.model.path)
    directory = await asyncio.get_running_loop().run_in_executor(None, model_loader.local_dir, source)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    llava = multimodal.load_llava_config(directory) if multimodal.is_llava_dir(directory) else None
    if config.role_switching.encode_prefill and llava is None:
        raise ConfigError(
            config.source,
            "role_switching.encode_prefill",
            f"model {source.name} has no vision tower: only a vision-language (LLaVA) model has "
            f"an encode role to switch to",
        )
    return LoadedCheckpoint(source, directory, tokenizer, llava)


def _start_ray(
    config: DeployConfig, ray_address: str | None, namespace: str | None, progress: Callable[[str], None]
) -> bool:
    """Join the configured Ray cluster, or start a local one; True when this process started it."""
    import ray

    if ray.is_initialized():
        return False
    address = ray_address or config.ray.address
    if address:
        progress(f"joining Ray cluster at {address} ...")
        join = functools.partial(ray.init, address=address, namespace=namespace, log_to_driver=config.ray.log_to_driver)
        try:
            join()
        except Exception as err:
            # A cluster made by `ray start --head` uses token authentication; one made otherwise
            # may not, so the token is only tried once a plain join failed.
            if not _token_auth_if_available():
                raise _join_error(address, err) from None
            ray.shutdown()
            try:
                join()
            except Exception as again:
                raise _join_error(address, again) from None
        return False
    progress(f"starting a local Ray ({config.ray.num_cpus} CPUs, resources {_ray_resources(config)}) ...")
    ray.init(
        address="local",
        num_cpus=config.ray.num_cpus,
        resources=_ray_resources(config),
        include_dashboard=False,
        namespace=namespace,
        log_to_driver=config.ray.log_to_driver,
    )
    return True


def _token_auth_if_available() -> bool:
    """Turn Ray's token authentication on for this process (and what it starts) when RAY_AUTH_MODE
    is unset and a token is at hand (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token,
    where `ray start` leaves it), as Ray's own CLI does; True when it did. An explicit RAY_AUTH_MODE
    is respected."""
    if "RAY_AUTH_MODE" in os.environ:
        return False
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token authentication
        return False
    return bool(maybe_enable_token_auth_if_token_available(warn_if_disabled=False))


def _join_error(address: str, err: BaseException) -> ConfigError:
    hint = (
        ""
        if os.environ.get("RAY_AUTH_MODE") == "token"
        else "; if it uses token authentication (`ray start --head` turns it on), set RAY_AUTH_MODE=token "
        "and its token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token: `ray get-auth-token` on the "
        "head node prints it)"
    )
    return ConfigError(address, "", f"could not join this Ray cluster ({err}){hint}")


def _spawn_pools(config: DeployConfig, spawn: Callable[[Role, str, int], object], llava, pools: Pools) -> None:
    """One handle per worker of the active pools, each actor created (not yet ready), added to
    `pools` as it is created (so a failure part-way stops the ones already made). The encode
    pool runs only for a vision-language model."""

    def add(pool: list[WorkerHandle], role: Role, workers: int) -> None:
        for i in range(workers):
            pool.append(WorkerHandle(f"{role.value}-{i}", role, spawn(role, f"{role.value}-{i}", 0)))

    p = config.pools
    if config.mode is Mode.COLOCATED:
        add(pools.decode, Role.COLOCATED, p.colocated.workers)
        return
    add(pools.prefill, Role.PREFILL, p.prefill.workers)
    add(pools.decode, Role.DECODE, p.decode.workers)
    if llava is not None:
        add(pools.encode, Role.ENCODE, p.encode.workers)


@dataclasses.dataclass
class Started:
    """What start_router has started, so that `stop()` (the router's shutdown, or a failed start)
    stops exactly that: the supervisor and role policy, every worker (the router swaps restarted
    and switched workers into the same lists), and a local Ray this process started."""

    ray_started: bool
    pools: Pools = dataclasses.field(default_factory=lambda: Pools([], [], []))
    stoppable: list = dataclasses.field(default_factory=list)  # objects with `async stop()`
    groups: dict = dataclasses.field(default_factory=dict)  # worker id -> its tensor-parallel placement group

    async def stop(self) -> None:
        import ray

        for s in self.stoppable:
            await s.stop()
        workers = self.pools.all()
        await asyncio.gather(
            *(asyncio.wait_for(h.actor.stop.remote(), 10) for h in workers if h.alive), return_exceptions=True
        )
        for h in workers:
            _kill(h.actor)
        if self.groups:
            from ray.util.placement_group import remove_placement_group

            for pg in self.groups.values():
                remove_placement_group(pg)
            self.groups.clear()
        if self.ray_started:
            ray.shutdown()


async def _await_ready(pools: Pools, progress: Callable[[str], None]) -> dict[str, object]:
    """Wait for every worker to be ready (bounded); the KV layout of each prefill / decode worker,
    checked compatible with the first decode worker's."""
    handles = pools.prefill + pools.decode + pools.encode
    progress(
        f"starting {len(pools.encode)} encode, {len(pools.prefill)} prefill and {len(pools.decode)} "
        f"{'colocated' if not pools.prefill else 'decode'} worker(s) ..."
    )
    t0 = time.monotonic()
    ready = await asyncio.wait_for(asyncio.gather(*(h.actor.ready.remote() for h in handles)), READY_TIMEOUT_S)
    layouts = {}
    for h, r in zip(handles, ready):
        h.node_id = r.info.node_id
        layouts[h.worker_id] = r.layout
    if pools.prefill and pools.decode:
        from kv_transfer.layout import check_compatible

        ref = layouts[pools.decode[0].worker_id]
        for h in pools.prefill + pools.decode:
            check_compatible(ref, layouts[h.worker_id])
    progress(f"workers ready in {time.monotonic() - t0:.1f}s")
    return layouts


def _build_router(config: DeployConfig, model: LoadedCheckpoint, started: Started, dtype: str) -> ClusterRouter:
    """dtype: what the workers run in (their KV layouts'), reported by GetModelInfo."""
    from engine import multimodal

    mc, tokenizer, llava = config.model, model.tokenizer, model.llava
    eos = () if tokenizer.eos_token_id is None else (int(tokenizer.eos_token_id),)
    info = ModelInfo(
        name=model.source.name,
        max_model_len=mc.max_model_len,
        vocab_size=len(tokenizer),
        eos_token_ids=eos,
        dtype=dtype,
        supports_images=llava is not None,
    )
    pools = started.pools
    return ClusterRouter(
        mode=config.mode,
        tokenizer=tokenizer,
        model_info=info,
        kv_capacity_tokens=config.engine.num_kv_blocks * config.engine.block_size,
        prefill=pools.prefill,
        decode=pools.decode,
        encode=pools.encode,
        image_token_id=llava.image_token_id if llava is not None else None,
        tokens_per_image=multimodal.num_image_tokens(llava) if llava is not None else 0,
        max_inflight=2 * config.server.max_queued_requests,
        default_timeout_s=config.server.request_timeout_s,
        on_shutdown=started.stop,
        reprefill_on_decode_failure=config.server.reprefill_on_decode_failure,
        max_image_pixels=config.server.limits.max_image_pixels,
        seqs_per_worker=config.engine.max_num_seqs,
        prefix_caching_block_size=(
            config.engine.block_size if config.engine.prefix_caching and config.server.cache_aware_routing else 0
        ),
        max_local_prefill_tokens=config.server.max_local_prefill_tokens,
    )


def _role_policy(config: DeployConfig, router: ClusterRouter, progress: Callable[[str], None]):
    """The automatic role policy, started, when role switching is on (disaggregated only)."""
    rs = config.role_switching
    if not (rs.enabled and config.mode is Mode.DISAGGREGATED):
        return None
    from cluster.role_policy import RolePolicy, RolePolicyOptions

    policy = RolePolicy(
        router,
        RolePolicyOptions(
            ttft_slo_s=config.slo.ttft_ms / 1000,
            tpot_slo_s=config.slo.tpot_ms / 1000,
            target=config.slo.attainment,
            interval_s=rs.interval_s,
            sustain=rs.sustain,
            cooldown_s=rs.cooldown_s,
            window_s=rs.window_s,
            min_samples=rs.min_samples,
            queue_high=rs.queue_high,
            kv_high=rs.kv_high,
            drain_timeout_s=rs.drain_timeout_s,
            encode_prefill=rs.encode_prefill,
            encode_queue_high=rs.encode_queue_high,
        ),
    )
    policy.start()
    progress(
        "role switching on: workers move between prefill and decode"
        + (" and between encode and prefill" if rs.encode_prefill else "")
        + " as the load shifts"
    )
    return policy


def _kill(actor) -> None:
    import ray

    try:
        ray.kill(actor)
    except Exception:
        pass


def _spawner(
    config: DeployConfig, model_path: str, tag: str, groups: dict[str, object]
) -> Callable[[Role, str, int], object]:
    """`spawn(role, worker_id, epoch)`: a new worker actor for that id (its pool's options and
    resources), not yet ready. The controller starts every worker with it; the supervisor
    starts replacements with it (epoch > 0; each gets a fresh actor name). A worker of a pool with
    tensor_parallel > 1 is rank 0 of a group in a placement group of its own, kept in `groups`
    (worker id -> the group of its latest incarnation)."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from cluster.worker_actor import WorkerActor
    from decode_workers.colocated_core import ColocatedOptions
    from encode_workers.worker import EncodeOptions

    backend = config.transport.backend.value
    p = config.pools
    # the vision encoder runs on the CPU (docs/API.md): float32 unless a dtype is set
    encode_opts = EncodeOptions(model_path, dtype=config.model.engine_dtype or "float32", backend=backend)
    if config.mode is Mode.COLOCATED:
        opts = {Role.COLOCATED: ColocatedOptions(engine_config(config, p.colocated))}
    else:
        opts = {
            Role.PREFILL: PrefillOptions(
                engine_config(config, p.prefill), backend=backend, streaming=config.transport.streaming
            ),
            Role.DECODE: DecodeOptions(
                engine_config(config, p.decode), backend=backend, senders=p.prefill.tensor_parallel
            ),
        }
    # With encode_prefill, encode- and prefill-pool workers hold the vision tower and the language
    # model, so each can take the other's role; decode-pool workers keep only the language model.
    both = config.role_switching.encode_prefill and config.mode is Mode.DISAGGREGATED
    vl_opts = {**opts, Role.ENCODE: encode_opts} if both else opts
    if config.mode is Mode.COLOCATED or p.encode.workers == 0:
        from engine import multimodal

        if multimodal.is_llava_dir(model_path):  # no encode pool: these workers encode images themselves
            role = Role.COLOCATED if config.mode is Mode.COLOCATED else Role.PREFILL
            opts[role] = dataclasses.replace(opts[role], image_encoder_dir=model_path)

    pools = {Role.COLOCATED: p.colocated, Role.PREFILL: p.prefill, Role.DECODE: p.decode, Role.ENCODE: p.encode}
    home: dict[str, Role] = {}  # worker id -> the pool it was started in

    def spawn(role: Role, worker_id: str, epoch: int):
        # A worker keeps its home pool's Ray resources and threads for life, whatever role it has
        # switched to since: a restart must fit where the original was placed.
        pool = pools[home.setdefault(worker_id, role)]
        name = f"{worker_id}-{tag}" + (f"-r{epoch}" if epoch else "")
        threads = max(1, int(pool.num_cpus))
        # Prefill and decode workers can take either role (role switching); colocated ones only
        # theirs; encode ones only theirs (vision tower alone) unless encode_prefill.
        if home[worker_id] is Role.ENCODE and not both:
            worker_opts = {Role.ENCODE: encode_opts}
        else:
            worker_opts = vl_opts if home[worker_id] in (Role.ENCODE, Role.PREFILL) else opts
        if pool.tensor_parallel == 1:
            return (
                ray.remote(WorkerActor)
                .options(**_actor_options(pool, name))
                .remote(worker_id, model_path, worker_opts, threads, role, epoch)
            )
        worker_opts = {role: worker_opts[role]}  # a tensor-parallel group keeps its role
        spec = _tp_group(pool, name, groups.pop(worker_id, None))
        groups[worker_id] = spec.placement_group
        return (
            ray.remote(WorkerActor)
            .options(
                **spec.rank_resources,
                max_concurrency=1000,
                name=name,
                max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    spec.placement_group, placement_group_bundle_index=0
                ),
            )
            .remote(worker_id, model_path, worker_opts, spec.threads, role, epoch, tp=spec)
        )

    return spawn


def _tp_group(pool: PoolConfig, name: str, previous) -> TPSpec:
    """A tensor-parallel worker's placement group (cluster/tp_group.py): tensor_parallel bundles
    on one node, each a rank's share of the pool's reservation. The previous incarnation's group
    (a restart) is removed first: its actors are dead or being killed."""
    from ray.util.placement_group import placement_group, remove_placement_group

    from cluster.tp_group import TPSpec, rank_share

    if previous is not None:
        remove_placement_group(previous)
    size = pool.tensor_parallel
    share = rank_share(pool.num_cpus, pool.num_gpus, dict(pool.resources), size)
    pg = placement_group([share] * size, strategy="STRICT_PACK", name=f"{name}-tp")
    extra = {k: v for k, v in share.items() if k not in ("CPU", "GPU")}
    options = {"num_cpus": share.get("CPU", 0.0), "num_gpus": share.get("GPU", 0.0), "resources": extra}
    return TPSpec(size, pg, options, threads=max(1, int(share.get("CPU", 1.0))))
