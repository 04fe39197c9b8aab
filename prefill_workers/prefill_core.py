"""Prefill side of disaggregated serving, without Ray (PrefillWorker only delegates to this).

    queue ──take_batch (token budget)──▶ one packed forward over several prompts
          └─ after each layer's K/V are written locally, they are sent to every prompt's decode
             worker (streaming) while the next layer computes; with streaming off, all layers
             are sent after the last one ──▶ first token sampled ──▶ finish() waits until every
             layer has landed ──▶ local blocks freed ──▶ PrefillResult

Prefill is idempotent: a task that fails here can be retried on another prefill worker.

Image prompts (LLaVA language side): the router first has `prepare_images(shards)` open one
payload-only transfer per encode shard on `receiver`, the encode workers send the features, then
the task arrives with those shards. run_batch collects the features (releasing the shards), merges
them into the prompt's embeddings, and the batch's forward runs on inputs_embeds (text prompts of
the same batch use their token embeddings). Shards of a task cancelled while queued are released.

Without an encode pool (`PrefillOptions.image_encoder_dir` set), the task carries the raw image
bytes instead (`images`); the core then holds the vision tower + projector itself
(encode_workers/inproc.py) and run_batch encodes the batch's images before the forward.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from encode_workers.inproc import InProcessEncoder
from encode_workers.transfer import EncodeShard, prepare_image_receive, receive_image_features, release_image_transfers
from engine import multimodal
from engine.config import EngineConfig
from engine.errors import BROKEN_AFTER, InvalidRequestError, WorkerBroken, is_device_failure
from engine.kv_cache import BlockManager, CacheKey, cache_key
from engine.llm_engine import LoadedModel, tp_runner
from engine.scheduler import ScheduledSeq
from engine.sampler import RowFailure, Sampler
from engine.sequence import SamplingParams, Sequence, TokenLogprob
from engine.tensor_parallel import TPGroup, follow
from engine.worker_api import TENANT_ACTIVE_S
from kv_transfer.layout import TransferDescriptor
from kv_transfer.registry import get_backend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefillOptions:
    engine: EngineConfig
    backend: str = "shm"
    streaming: bool = True
    finish_timeout_s: float = 30.0
    image_timeout_s: float = 30.0  # waiting in run_batch for image features already sent
    image_encoder_dir: str | None = None  # no encode pool: load the vision side from here, encode in-process


@dataclass(frozen=True)
class PrefillTask:
    """prompt_token_ids: with images, already expanded (tokens_per_image placeholders per image),
    as the decode worker holds them; image_shards: the transfers prepare_images() opened."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    descriptor: TransferDescriptor
    image_shards: tuple[EncodeShard, ...] = ()
    images: tuple[bytes, ...] = ()  # no encode pool: raw images, encoded by this worker
    enqueued_at: float = field(default_factory=time.monotonic)
    sampled_before: int = 0  # re-prefilled: output tokens already sampled (a seeded stream skips them)
    tenant: str = ""  # who sent it: batches share their token budget fairly among tenants
    cache_salt: str = ""  # prefix caching: only prompts with the same salt share cached blocks
    image_hashes: tuple[bytes, ...] = ()  # each image's content hash (keys its blocks; none: not cached)


@dataclass(frozen=True)
class PrefillResult:
    request_id: str
    first_token: int | None  # None when failed
    error: str | None = None
    queue_s: float = 0.0
    prefill_s: float = 0.0  # the forward (with streamed sends overlapping it)
    transfer_s: float = 0.0  # exposed transfer: from the forward's end until all landed
    batch_size: int = 1
    encode_s: float = 0.0  # in-process image encoding of the batch (no encode pool)
    cached_tokens: int = 0  # prompt tokens found in this worker's prefix cache (not computed)
    first_logprob: TokenLogprob | None = None  # the first token's, when the request asked for them


class PrefillCore:
    def __init__(
        self,
        options: PrefillOptions,
        loaded: LoadedModel,
        image_encoder: InProcessEncoder | None = None,
        clock: Callable[[], float] = time.monotonic,
        tp: TPGroup | None = None,
    ) -> None:
        """image_encoder: a vision side already in memory (the worker actor's, kept across role
        switches); else it is loaded from options.image_encoder_dir when that is set. tp: this
        core is rank 0 of a tensor-parallel group whose other ranks run `prefill_follower`: every
        rank computes and sends its own KV heads (the decode side's receiver expects that many
        senders); rank 0 samples."""
        self.options = options
        cfg = options.engine
        device = cfg.placement().device  # DeviceError (naming the pool and node) without that GPU
        loaded.placed_on(device)
        self.layout = loaded.kv_layout(cfg.block_size)  # the model's: what ready() reports
        self.blocks = BlockManager(cfg.num_kv_blocks, cfg.block_size, cfg.prefix_caching)
        self.tp = tp or TPGroup.single(device)
        self.runner = tp_runner(loaded, cfg, self.tp)  # this rank's shard and KV heads
        self.sampler = Sampler(device, loaded.token_text)
        self.sender = get_backend(options.backend).Sender(self.runner.layout)
        self.queue: deque[PrefillTask] = deque()
        self._failed_streak = 0  # batches in a row in which every prompt failed
        self._batches = 0  # batches taken so far
        self._served: dict[str, int] = {}  # tenant -> the last batch it had a prompt in
        self._clock = clock
        # tenant -> (when its last prompt was taken, that prompt's tokens): a tenant between two
        # requests still sets the level for the others (see take_batch)
        self._recent: dict[str, tuple[float, int]] = {}
        self.loaded = loaded
        # Image payloads only (no KV blocks); only a vision-language model gets one.
        self.receiver = get_backend(options.backend).Receiver(self.layout) if loaded.image_spec else None
        self.open_image_shards: dict[str, EncodeShard] = {}  # transfer id → prepared, not yet received
        self.image_encoder = None  # vision tower + projector, only when there is no encode pool
        if options.image_encoder_dir is not None and loaded.image_spec is not None:
            self.image_encoder = image_encoder or InProcessEncoder.from_model_dir(
                options.image_encoder_dir, loaded.model.dtype
            )

    def prepare_images(self, shards: list[EncodeShard]) -> list[TransferDescriptor]:
        """Open the transfers the encode workers send a request's image features into."""
        if self.receiver is None:
            raise ValueError(f"model {self.loaded.name} takes no images")
        descs = prepare_image_receive(self.receiver, shards, self.loaded.image_spec)
        self.open_image_shards.update((s.transfer_id, s) for s in shards)
        return descs

    def release_images(self, shards) -> None:
        if self.receiver is not None:
            release_image_transfers(
                self.receiver, [s for s in shards if self.open_image_shards.pop(s.transfer_id, None)]
            )

    def _prompt_embeds(self, task: PrefillTask) -> tuple[list[int], object]:
        """(expanded ids, inputs_embeds [L, H]) of an image task; its shards are released either way."""
        try:
            feats = receive_image_features(self.receiver, list(task.image_shards), timeout=self.options.image_timeout_s)
        finally:
            for s in task.image_shards:
                self.open_image_shards.pop(s.transfer_id, None)
        return multimodal.prompt_with_images(
            self.loaded.model, self.loaded.image_token_id, list(task.prompt_token_ids), feats
        )

    def _encode_batch(self, tasks: list[PrefillTask], errors: dict[str, str]) -> tuple[dict[str, list], float]:
        """In-process encoding: {request id: features} for the tasks that carry raw images.

        One call for the whole batch (its images share vision forwards); if an image is bad,
        each task is encoded on its own so only the task with the bad image fails."""
        with_images = [t for t in tasks if t.images]
        if not with_images:
            return {}, 0.0
        start = time.monotonic()
        if self.image_encoder is None:
            for t in with_images:
                errors[t.request_id] = f"model {self.loaded.name} takes no images on this prefill worker"
            return {}, 0.0
        feats: dict[str, list] = {}
        try:
            flat, _ = self.image_encoder.encode([b for t in with_images for b in t.images])
            it = iter(flat)
            feats = {t.request_id: [next(it) for _ in t.images] for t in with_images}
        except Exception:
            for t in with_images:
                try:
                    feats[t.request_id] = self.image_encoder.encode(list(t.images))[0]
                except InvalidRequestError as exc:  # names the image at fault
                    errors[t.request_id] = str(exc)
                except Exception:
                    log.exception("encoding the images of %s failed", t.request_id)
                    errors[t.request_id] = "image encoding failed"
        return feats, time.monotonic() - start

    def take_batch(self) -> list[PrefillTask]:
        """Queued prompts for one forward: at least one, more while the token budget and KV allow.

        Fair among tenants: the tenant served longest ago first (then by its oldest prompt), one
        prompt per tenant per round; each takes its first prompt and then more only while its
        tokens stay within a level: the largest first prompt of the other active tenants, at most
        an equal share of the budget. Active: prompts queued, or one taken within TENANT_ACTIVE_S
        (its size then counts as its first prompt). A prefill's time grows with its tokens, so a
        tenant with a backlog cannot make the others' next batch long, nor the batch running when
        their next request arrives: it gets as many tokens per batch as the biggest other tenant,
        not the rest of the budget (latency for the others over batch size for the backlog). A
        tenant alone for TENANT_ACTIVE_S fills the budget."""
        if not self.queue:
            return []
        budget = self.options.engine.max_num_batched_tokens
        queues: dict[str, deque[PrefillTask]] = {}
        for task in self.queue:
            queues.setdefault(task.tenant, deque()).append(task)
        self._batches += 1
        self._served = {t: at for t, at in self._served.items() if t in queues}
        queues = dict(sorted(queues.items(), key=lambda kv: self._served.get(kv[0], 0)))  # stable: oldest next
        now = self._clock()
        self._recent = {t: r for t, r in self._recent.items() if now - r[0] < TENANT_ACTIVE_S}
        first = {t: n for t, (_, n) in self._recent.items()}
        first.update((t, len(q[0].prompt_token_ids)) for t, q in queues.items())
        level = budget if len(first) == 1 else min(budget // len(first), max(first.values()))
        taken_by: dict[str, int] = {t: 0 for t in queues}
        batch: list[PrefillTask] = []
        tokens = 0
        blocks_free = self.blocks.num_free_blocks
        while queues:
            for tenant in list(queues):
                task = queues[tenant][0]
                n = len(task.prompt_token_ids)
                need = self.blocks.blocks_for(n)
                over = batch and (tokens + n > budget or (taken_by[tenant] > 0 and taken_by[tenant] + n > level))
                if over or need > blocks_free:
                    del queues[tenant]  # this tenant is done for this batch
                    continue
                queues[tenant].popleft()
                if not queues[tenant]:
                    del queues[tenant]
                batch.append(task)
                taken_by[tenant] += n
                tokens += n
                blocks_free -= need
        for task in reversed(batch):  # a tenant's first prompt of the batch is what it last had
            self.queue.remove(task)
            self._served[task.tenant] = self._batches
            self._recent[task.tenant] = (now, len(task.prompt_token_ids))
        return batch

    def cancel_queued(self, request_id: str) -> PrefillTask | None:
        for task in self.queue:
            if task.request_id == request_id:
                self.queue.remove(task)
                self.release_images(task.image_shards)
                return task
        return None

    def run_batch(self, tasks: list[PrefillTask]) -> list[PrefillResult]:
        """Prefill a batch; one result per task. A task's failure is its own: its image, its KV
        transfer, its sampled row, and — if the batched forward raises — its forward run alone
        (every task of the batch is then run again on its own; only those that fail alone fail).
        Client-facing errors are short; causes are logged with the request id."""
        start = time.monotonic()
        seqs, live, errors, embeds = [], [], {}, {}
        features, encode_s = self._encode_batch(tasks, errors)
        for task in tasks:
            ids = list(task.prompt_token_ids)
            if task.request_id in features:
                try:
                    ids, embeds[task.request_id] = multimodal.prompt_with_images(
                        self.loaded.model, self.loaded.image_token_id, ids, features[task.request_id]
                    )
                except Exception:
                    log.exception("image features of %s do not fit its prompt", task.request_id)
                    errors[task.request_id] = "the image features do not fit the prompt"
            elif task.image_shards:
                try:
                    ids, embeds[task.request_id] = self._prompt_embeds(task)
                except Exception:  # its forward rows are then token embeddings, discarded
                    log.exception("image features of %s not received", task.request_id)
                    errors[task.request_id] = "the image features did not arrive from the encode pool"
            # Prefix caching: start after the cached run of the prompt's blocks (keyed by its images'
            # content too; a prompt with images but no hashes, or whose features failed, is not cached)
            key = self._cache_key(task, ids, task.request_id in embeds, errors)
            seq = Sequence(task.request_id, ids, task.sampling, cache_key=key)
            if key is not None:
                prefix, seq.block_hashes = self.blocks.match_prefix(ids, key)
                seq.num_computed_tokens = seq.num_cached_tokens = self.blocks.take_prefix(
                    seq.block_table, prefix, len(ids)
                )
            self.blocks.allocate(seq.block_table, seq.num_tokens)
            seqs.append(seq)
            if task.request_id in errors:
                continue
            try:
                self.sender.connect(task.descriptor)
                live.append(seq)
            except Exception:  # a receiver that went away fails its task only
                log.exception("KV transfer connect of %s failed", task.request_id)
                errors[task.request_id] = "the KV transfer to the decode worker could not start"
        sent: dict[str, set[int]] = {s.request_id: set() for s in seqs}
        first_block = {t.request_id: t.descriptor.meta.first_block for t in tasks}

        def drop(seq: Sequence, message: str) -> None:
            errors.setdefault(seq.request_id, message)
            if seq in live:
                self.sender.abort(seq.request_id)
                live.remove(seq)

        def sender_for(group: list[Sequence]):
            kv = self.runner.kv

            def send(layer: int) -> None:
                # A layer already sent (by a batched forward that failed later) is not sent twice.
                for seq in [s for s in group if s in live and layer not in sent[s.request_id]]:
                    # from the first block the decode worker does not hold (its prefix cache)
                    src = seq.block_table[first_block[seq.request_id] :]
                    try:
                        self.sender.send_layer(seq.request_id, layer, kv[layer], src_block_ids=src)
                        sent[seq.request_id].add(layer)
                    except Exception:
                        log.exception("KV transfer of layer %d of %s failed", layer, seq.request_id)
                        drop(seq, "the KV transfer to the decode worker failed")

            return send

        descriptors = {t.request_id: t.descriptor for t in tasks}

        def orders(group: list[Sequence]) -> tuple[tuple[int, TransferDescriptor], ...]:
            """What the followers send: their heads of each row still live (tensor parallelism)."""
            if self.tp.size == 1:
                return ()
            return tuple((i, descriptors[s.request_id]) for i, s in enumerate(group) if s in live)

        vocab = self.loaded.model.get_output_embeddings().weight.shape[0]
        candidates = [s.request_id for s in seqs if s.request_id not in errors]  # computed for their own sake
        compute_failed: set[str] = set()
        try:
            for t in tasks:
                self.sampler.advance(t.request_id, t.sampling, vocab, t.sampled_before)
            try:
                tokens = self._forward(seqs, embeds, sender_for(seqs), orders(seqs))
            except Exception as exc:
                if is_device_failure(exc):
                    raise WorkerBroken(f"the accelerator failed: {exc}") from exc
                if self.tp.size > 1:  # the ranks may be out of step now: the group is replaced whole
                    raise WorkerBroken(f"a forward of the tensor-parallel group failed: {exc}") from exc
                log.exception("prefill forward of a batch of %d failed; running its prompts one by one", len(seqs))
                tokens = {}
                for seq in [s for s in seqs if s.request_id not in errors]:
                    try:
                        tokens.update(self._forward([seq], embeds, sender_for([seq])))
                    except Exception as exc:
                        if is_device_failure(exc):
                            raise WorkerBroken(f"the accelerator failed: {exc}") from exc
                        log.exception("prefill forward of %s failed", seq.request_id)
                        drop(seq, "the prefill forward pass failed for this request")
                        compute_failed.add(seq.request_id)
            forward_end = time.monotonic()
            for seq in seqs:
                if isinstance(tokens.get(seq.request_id), RowFailure):
                    drop(seq, tokens[seq.request_id].message)
                    compute_failed.add(seq.request_id)
            everyone = len(candidates) >= 2 and compute_failed.issuperset(candidates)
            self._failed_streak = self._failed_streak + 1 if everyone else 0
            if self._failed_streak >= BROKEN_AFTER:
                raise WorkerBroken(f"every prompt failed on its own in {BROKEN_AFTER} batches in a row")
            for seq in list(live):
                try:
                    self.sender.finish(seq.request_id, timeout=self.options.finish_timeout_s)
                except Exception:
                    log.exception("KV transfer of %s did not complete", seq.request_id)
                    drop(seq, "the KV transfer to the decode worker did not complete")
            done = time.monotonic()
        except BaseException:
            for seq in live:
                self.sender.abort(seq.request_id)
            raise
        finally:
            cached = {seq.request_id: seq.num_cached_tokens for seq in seqs}
            logprobs = {seq.request_id: self.sampler.take_logprob(seq.request_id) for seq in seqs}
            for seq in seqs:
                self.blocks.free(seq.block_table)
                self.sampler.forget(seq.request_id)
        return [
            PrefillResult(
                t.request_id,
                None if t.request_id in errors else tokens[t.request_id],
                errors.get(t.request_id),
                queue_s=start - t.enqueued_at,
                prefill_s=forward_end - start - encode_s,
                transfer_s=done - forward_end,
                batch_size=len(tasks),
                encode_s=encode_s if t.images else 0.0,
                cached_tokens=cached.get(t.request_id, 0),
                first_logprob=None if t.request_id in errors else logprobs.get(t.request_id),
            )
            for t in tasks
        ]

    def _cache_key(self, task: PrefillTask, ids: list[int], with_features: bool, errors: dict) -> CacheKey | None:
        """The prompt's cache key (engine/kv_cache.py), or None when it is not cached: it has images
        whose features it lacks or whose content hashes it was not given."""
        if task.images or task.image_shards:
            if not (with_features and task.image_hashes) or task.request_id in errors:
                return None
        try:
            return cache_key(task.cache_salt, ids, self.loaded.image_token_id, task.image_hashes)
        except ValueError:
            log.exception("cannot key the images of %s; not cached", task.request_id)
            return None

    def _forward(self, seqs: list[Sequence], embeds: dict, send, orders=()) -> dict[str, int | RowFailure]:
        """One packed forward over `seqs` (K/V sent layer by layer through `send`, or after the
        last layer without streaming) and the first token of each: {request id: token}.
        orders: (row, descriptor) pairs the tensor-parallel followers send their heads for."""
        batch = [ScheduledSeq(s, s.num_tokens - s.num_computed_tokens) for s in seqs]
        inputs_embeds = None
        if any(s.request_id in embeds for s in seqs):
            inputs_embeds = multimodal.packed_inputs_embeds(batch, embeds, self.loaded.model.get_input_embeddings())
        result = self.runner.forward(
            batch,
            on_layer_done=send if self.options.streaming else None,
            sparse=self.options.engine.sparse,
            inputs_embeds=inputs_embeds,
            extra=orders,
        )
        if not self.options.streaming:
            for layer in range(self.layout.num_layers):
                send(layer)
        tokens = self.sampler.sample(result.logits, [s.request_id for s in seqs], [s.sampling for s in seqs])
        for s in seqs:  # their full blocks are computed: reusable by later prompts
            if s.cache_key is not None:
                self.blocks.register(s.block_table, s.block_hashes, s.token_ids, s.num_tokens, s.cache_key)
        return {s.request_id: t for s, t in zip(seqs, tokens)}

    def close(self) -> None:
        self.tp.stop()  # ends a tensor-parallel group's followers
        self.sender.close()
        if self.receiver is not None:
            self.release_images(list(self.open_image_shards.values()))
            self.receiver.close()


def prefill_follower(options: PrefillOptions, loaded: LoadedModel, tp: TPGroup) -> int:
    """Rank tp.rank > 0 of a tensor-parallel prefill worker: runs rank 0's forwards on its shard
    and sends its KV heads of each prompt rank 0 sends (the orders that come with the plan), layer
    by layer as they are computed, into the decode worker's caches; returns the forwards run. A
    transfer that fails here fails that request's transfer (the decode worker sees it), nothing else."""
    runner = tp_runner(loaded.placed_on(tp.device), options.engine, tp)
    sender = get_backend(options.backend).Sender(runner.layout)

    def work(plan, sparse, orders, embeds) -> None:
        live: dict[int, str] = {}
        first_block: dict[int, int] = {}
        for row, desc in orders:
            try:
                sender.connect(desc)
                live[row] = desc.meta.request_id
                first_block[row] = desc.meta.first_block
            except Exception:
                log.exception("rank %d: KV transfer connect of %s failed", tp.rank, desc.meta.request_id)

        def send(layer: int) -> None:
            for row, rid in list(live.items()):
                try:
                    src = plan[row].block_table[first_block[row] :]
                    sender.send_layer(rid, layer, runner.kv[layer], src_block_ids=src)
                except Exception:
                    log.exception("rank %d: KV transfer of layer %d of %s failed", tp.rank, layer, rid)
                    sender.abort(rid)
                    del live[row]

        try:
            runner.run_plan(plan, sparse, embeds, send if options.streaming else None)
            if not options.streaming:
                for layer in range(runner.layout.num_layers):
                    send(layer)
        except BaseException:
            for rid in live.values():
                sender.abort(rid)
            raise
        for rid in live.values():
            try:
                sender.finish(rid, timeout=options.finish_timeout_s)
            except Exception:
                log.exception("rank %d: KV transfer of %s did not complete", tp.rank, rid)

    try:
        return follow(runner, tp, work)
    finally:
        sender.close()
