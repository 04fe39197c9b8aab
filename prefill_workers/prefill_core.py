"""Prefill side of disaggregated serving, without Ray (the actor only delegates to this).

    queue ──take_batch (token budget)──▶ one packed forward over several prompts
          └─ after each layer's K/V are written locally, they are sent to every prompt's decode
             worker (streaming) while the next layer computes; with streaming off, all layers
             are sent after the last one ──▶ first token sampled ──▶ finish() waits until every
             layer has landed ──▶ local blocks freed ──▶ PrefillResult

Prefill is idempotent: a task that fails here can be retried on another prefill worker.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from engine.config import EngineConfig
from engine.kv_cache import BlockManager, KVSpec
from engine.llm_engine import LoadedModel
from engine.model_runner import ModelRunner, ScheduledSeq
from engine.sampler import Sampler
from engine.sequence import SamplingParams, Sequence
from kv_transfer.layout import TransferDescriptor
from kv_transfer.registry import get_backend
from decode_workers.decode_core import kv_layout


@dataclass(frozen=True)
class PrefillOptions:
    engine: EngineConfig
    backend: str = "shm"
    streaming: bool = True
    finish_timeout_s: float = 30.0


@dataclass(frozen=True)
class PrefillTask:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    descriptor: TransferDescriptor
    enqueued_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class PrefillResult:
    request_id: str
    first_token: int | None          # None when failed
    error: str | None = None
    queue_s: float = 0.0
    prefill_s: float = 0.0           # the forward (with streamed sends overlapping it)
    transfer_s: float = 0.0          # exposed transfer: from the forward's end until all landed
    batch_size: int = 1


class PrefillCore:
    def __init__(self, options: PrefillOptions, loaded: LoadedModel) -> None:
        self.options = options
        cfg = options.engine
        self.layout = kv_layout(loaded, cfg)
        spec = KVSpec.from_model_config(loaded.model.config, cfg.block_size, cfg.num_kv_blocks, loaded.model.dtype)
        self.blocks = BlockManager(cfg.num_kv_blocks, cfg.block_size)
        self.runner = ModelRunner(loaded.model, spec)
        self.sampler = Sampler()
        self.sender = get_backend(options.backend).Sender(self.layout)
        self.queue: deque[PrefillTask] = deque()

    def take_batch(self) -> list[PrefillTask]:
        """Queued prompts for one forward: at least one, more while the token budget and KV allow."""
        batch: list[PrefillTask] = []
        tokens = 0
        blocks_free = self.blocks.num_free_blocks
        while self.queue:
            task = self.queue[0]
            n = len(task.prompt_token_ids)
            need = self.blocks.blocks_for(n)
            if batch and (tokens + n > self.options.engine.max_num_batched_tokens or need > blocks_free):
                break
            if not batch and need > blocks_free:
                break
            batch.append(self.queue.popleft())
            tokens += n
            blocks_free -= need
        return batch

    def cancel_queued(self, request_id: str) -> PrefillTask | None:
        for task in self.queue:
            if task.request_id == request_id:
                self.queue.remove(task)
                return task
        return None

    def run_batch(self, tasks: list[PrefillTask]) -> list[PrefillResult]:
        start = time.monotonic()
        seqs, live, errors = [], [], {}
        for task in tasks:
            seq = Sequence(task.request_id, list(task.prompt_token_ids), task.sampling)
            self.blocks.allocate(seq.block_table, seq.num_tokens)
            seqs.append(seq)
            try:
                self.sender.connect(task.descriptor)
                live.append(seq)
            except Exception as exc:  # a receiver that went away fails its task only
                errors[task.request_id] = f"KV transfer connect failed: {exc}"
        kv = self.runner.kv

        def send(layer: int) -> None:
            for seq in list(live):
                try:
                    self.sender.send_layer(seq.request_id, layer, kv[layer], src_block_ids=seq.block_table)
                except Exception as exc:
                    errors[seq.request_id] = f"KV transfer of layer {layer} failed: {exc}"
                    self.sender.abort(seq.request_id)
                    live.remove(seq)

        try:
            batch = [ScheduledSeq(s, s.num_tokens) for s in seqs]
            result = self.runner.forward(batch, on_layer_done=send if self.options.streaming else None,
                                         sparse=self.options.engine.sparse)
            if not self.options.streaming:
                for layer in range(self.layout.num_layers):
                    send(layer)
            forward_end = time.monotonic()
            tokens = self.sampler.sample(result.logits, [s.request_id for s in seqs], [s.sampling for s in seqs])
            for seq in list(live):
                try:
                    self.sender.finish(seq.request_id, timeout=self.options.finish_timeout_s)
                except Exception as exc:
                    errors[seq.request_id] = f"KV transfer did not complete: {exc}"
                    self.sender.abort(seq.request_id)
            done = time.monotonic()
        except BaseException:
            for seq in live:
                self.sender.abort(seq.request_id)
            raise
        finally:
            for seq in seqs:
                self.blocks.free(seq.block_table)
                self.sampler.forget(seq.request_id)
        return [
            PrefillResult(t.request_id, None if t.request_id in errors else tok, errors.get(t.request_id),
                          queue_s=start - t.enqueued_at, prefill_s=forward_end - start,
                          transfer_s=done - forward_end, batch_size=len(tasks))
            for t, tok in zip(tasks, tokens)
        ]

    def close(self) -> None:
        self.sender.close()
