"""Decode side of disaggregated serving, without Ray (DecodeWorker only delegates to this).

A request's life on a decode worker:

    reserve(rid, n) ──▶ RESERVED: blocks for the n prompt tokens held under a lease; the
        │               receiver's descriptor goes (via the router) to a prefill worker, which
        │               writes the prompt K/V straight into these blocks, layer by layer
        ├─ activate(rid, prompt, first_token) ──▶ RUNNING in the engine's continuous batch
        │                                         ──▶ FINISHED (blocks back to the pool)
        └─ cancel(rid) / lease lapses ──▶ blocks back to the pool — at once if the transfer is
                                          over, else after a short quarantine, so a copy still
                                          in flight can never land in reused blocks
    submit(rid, prompt) ──▶ a next turn prefilled here on its cached history (prefix caching,
                            conditional disaggregation), then RUNNING as any other

With prefix caching, full blocks stay cached when their last holder ends (engine/kv_cache.py), a
reservation takes the leading blocks of its prompt this worker holds from the cache (only the rest
is transferred: the descriptor's first_block), and one cached block may belong to several
reservations and sequences at once.

Invariant: every block is free, cached and unheld, or held (by reference count) by RESERVED or
QUARANTINED tables and engine sequences; the prefill worker writes only blocks no one else holds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

from engine.config import EngineConfig
from engine.kv_cache import cache_key
from engine.llm_engine import LLMEngine, LoadedModel, tp_runner
from engine.sequence import SamplingParams, StepOutput
from engine.tensor_parallel import TPGroup, follow
from kv_transfer.base import TransferError
from kv_transfer.layout import TransferDescriptor
from kv_transfer.registry import get_backend

log = logging.getLogger(__name__)
QUARANTINE_S = 1.0


@dataclass(frozen=True)
class DecodeOptions:
    engine: EngineConfig
    backend: str = "shm"
    lease_s: float = 300.0  # longest lease a reservation may ask for
    activate_timeout_s: float = 30.0  # how long activate() waits for the last KV layer to land
    # The prefill pool's tensor_parallel: each of a prefill worker's ranks sends its own KV heads.
    senders: int = 1


@dataclass
class _Reservation:
    block_table: list[int]
    expires_at: float


class DecodeCore:
    def __init__(self, options: DecodeOptions, loaded: LoadedModel, tp: TPGroup | None = None) -> None:
        """tp: this core is rank 0 of a tensor-parallel group whose other ranks run
        `decode_follower`: each rank's cache holds its KV heads, and the receiver's descriptors
        name every rank's cache, so prefill ranks write each rank's heads straight into it."""
        self.options = options
        cfg = options.engine
        self.layout = loaded.kv_layout(cfg.block_size)  # the model's: what ready() reports
        tp = tp or TPGroup.single(cfg.placement().device)
        self.receiver = get_backend(options.backend).Receiver(tp.local_layout(self.layout), senders=options.senders)
        try:
            kv = self.receiver.allocate_cache(cfg.num_kv_blocks)
            ranks = tp.gather(None)[1:]  # the followers' (layout, cache handle)
            if ranks:
                self.receiver.add_ranks(ranks)
            self.engine = LLMEngine(cfg, loaded, kv=kv, tp=tp)
        except BaseException:
            self.receiver.close()
            raise
        self._reserved: dict[str, _Reservation] = {}
        self._quarantine: list[tuple[float, list[int]]] = []

    # ------------------------------------------------------------ admission
    def reserve(
        self,
        request_id: str,
        num_prompt_tokens: int,
        lease_s: float | None = None,
        prompt_token_ids: list[int] | None = None,
        cache_salt: str = "",
        image_hashes: tuple[bytes, ...] = (),
    ) -> TransferDescriptor | None:
        """Hold blocks for a prompt and open its transfer; None when there is no room now.

        The lease (the request's remaining deadline) bounds how long the blocks wait for
        activate(): a router or prefill worker that vanishes cannot hold them forever. With
        prefix caching and the prompt's ids, the leading blocks this worker has cached (an
        earlier turn's prompt and answer) are taken from the cache and not transferred: the
        descriptor's `first_block` tells the prefill worker where to start sending. A prompt
        with images is looked up by its images' content hashes too (`image_hashes`)."""
        self._housekeeping()
        blocks = self.engine.blocks
        prefix: list[int] = []
        if prompt_token_ids is not None:
            if len(prompt_token_ids) != num_prompt_tokens:
                raise ValueError(f"{len(prompt_token_ids)} prompt ids for a prompt of {num_prompt_tokens} tokens")
            try:
                key = cache_key(cache_salt, prompt_token_ids, self.engine.loaded.image_token_id, image_hashes)
                prefix, _ = blocks.match_prefix(prompt_token_ids, key)
            except ValueError:  # its image tokens do not make its images: nothing is taken from the cache
                log.warning("the images of %s do not fit its prompt; no cached prefix", request_id)
        running = len(self.engine.scheduler.running) + len(self._reserved)
        if running >= self.options.engine.max_num_seqs or not blocks.can_allocate([], num_prompt_tokens + 1, prefix):
            return None
        table: list[int] = []
        if prefix:
            blocks.take_prefix(table, prefix, num_prompt_tokens)
        blocks.allocate(table, num_prompt_tokens)
        first, held = len(prefix), len(prefix) * blocks.block_size
        try:
            desc = self.receiver.prepare(request_id, table[first:], num_tokens=num_prompt_tokens - held)
        except Exception:
            blocks.free(table)
            raise
        if first:
            desc = replace(desc, meta=replace(desc.meta, first_block=first))
        lease = min(lease_s or self.options.lease_s, self.options.lease_s)
        self._reserved[request_id] = _Reservation(table, time.monotonic() + lease)
        return desc

    def activate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        first_token: int,
        sampling: SamplingParams,
        resume: tuple[int, int] | None = None,
        cache_salt: str | None = "",
        image_hashes: tuple[bytes, ...] = (),
    ) -> StepOutput:
        """Start decoding once the prompt's K/V have landed. Raises TransferError if they never do.
        resume: a re-prefilled request's earlier output (LLMEngine.add_request). With prefix
        caching its blocks (prompt, then output) stay cached under cache_salt and its images'
        content hashes for later turns (cache_salt None: not cached)."""
        res = self._reserved.pop(request_id, None)
        if res is None:
            raise KeyError(f"request {request_id!r} has no reservation on this decode worker (lease lapsed?)")
        try:
            self.receiver.wait(request_id, timeout=self.options.activate_timeout_s)
        except TransferError:
            self._drop(request_id, res.block_table)
            raise
        self.receiver.release(request_id)
        try:
            return self.engine.add_prefilled(
                request_id,
                prompt_token_ids,
                first_token,
                sampling,
                res.block_table,
                resume=resume,
                cache_salt=cache_salt,
                image_hashes=image_hashes,
            )
        except BaseException:  # refused before the engine took the blocks: they are still ours
            self.engine.blocks.free(res.block_table)
            raise

    def submit(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        images: list[bytes] | tuple[bytes, ...] = (),
        resume: tuple[int, int] | None = None,
        tenant: str = "",
        cache_salt: str = "",
    ) -> None:
        """Prefill a prompt here and decode it (conditional disaggregation): the router sends a
        request whose earlier turns this worker's prefix cache holds and whose new part is short;
        only that part is computed and nothing is transferred. As ColocatedCore.submit, but a
        prompt with images is refused (they are encoded elsewhere: the router sends such a prompt
        to a prefill worker)."""
        if images:
            raise ValueError("a decode worker prefills no prompt with images")
        self.engine.add_request(
            list(prompt_token_ids), sampling, request_id, resume=resume, tenant=tenant, cache_salt=cache_salt
        )

    def cancel(self, request_id: str) -> bool:
        res = self._reserved.pop(request_id, None)
        if res is not None:
            self._drop(request_id, res.block_table)
            return True
        return self.engine.abort(request_id)

    def _drop(self, request_id: str, table: list[int]) -> None:
        try:
            over = self.receiver.poll(request_id).status.terminal
        except KeyError:
            over = True
        self.receiver.release(request_id)
        if over:
            self.engine.blocks.free(table)
        else:
            self._quarantine.append((time.monotonic() + QUARANTINE_S, table))

    def _housekeeping(self) -> list[str]:
        """Reclaim lapsed leases and quarantined blocks; returns the request ids whose lease lapsed."""
        now = time.monotonic()
        keep = []
        for until, table in self._quarantine:
            if until <= now:
                self.engine.blocks.free(table)
            else:
                keep.append((until, table))
        self._quarantine = keep
        lapsed = [rid for rid, r in self._reserved.items() if r.expires_at <= now]
        for rid in lapsed:
            self._drop(rid, self._reserved.pop(rid).block_table)
        return lapsed

    # ------------------------------------------------------------ running
    def request_ids(self) -> list[str]:
        """Requests this worker holds: reserved or in the engine."""
        return [*self._reserved, *self.engine.request_ids()]

    def has_work(self) -> bool:
        return self.engine.has_unfinished()

    def step(self) -> list[StepOutput]:
        self._housekeeping()
        return self.engine.step()

    def idle(self) -> bool:
        """Nothing reserved, quarantined or running: every block is free."""
        self._housekeeping()
        return not self._reserved and not self._quarantine and not self.engine.has_unfinished()

    def close(self) -> None:
        self.engine.close()  # ends a tensor-parallel group's followers
        self.receiver.close()


def decode_follower(options: DecodeOptions, loaded: LoadedModel, tp: TPGroup) -> int:
    """Rank tp.rank > 0 of a tensor-parallel decode worker: makes its cache (its KV heads) where
    the prefill ranks can write it, hands its handle to rank 0's receiver, then runs rank 0's
    forwards until it stops (engine/tensor_parallel.py follow); returns the forwards run."""
    cfg = options.engine
    layout = tp.local_layout(loaded.kv_layout(cfg.block_size))
    cache = get_backend(options.backend).Receiver.rank_cache(layout, cfg.num_kv_blocks, tp.device)
    try:
        tp.gather((layout, cache.handle))
        return follow(tp_runner(loaded.placed_on(tp.device), cfg, tp, cache.kv), tp)
    finally:
        cache.close()
