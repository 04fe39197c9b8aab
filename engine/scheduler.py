"""Colocated scheduler: continuous batching with chunked prefill, decode first (Sarathi-Serve).

Each step spends a token budget: first one token for every decoding sequence (so decodes never
stall behind a long prompt), then prompt chunks of sequences already admitted, then new
sequences from the waiting queue in arrival order (round robin over tenants when several wait);
with prefix caching a new sequence starts after the longest cached run of its prompt's blocks
(engine/kv_cache.py). When the KV cache cannot grow a decoding
sequence, the most recently arrived running sequence is preempted: its blocks are freed and it
goes back to the front of the waiting queue to be recomputed (prompt + output so far).

The scheduler never touches tensors; it hands (sequence, n new tokens) pairs to the runner.
Sequences are told apart by request id (unique among the sequences a scheduler holds).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from engine.kv_cache import BlockManager
from engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass(frozen=True)
class ScheduledSeq:
    """One sequence's share of a forward: tokens token_ids[num_computed : num_computed + n]."""

    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this forward completes the sequence's known tokens (so its last row is sampled)."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_batched_tokens: int, max_num_seqs: int) -> None:
        self.blocks = blocks
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order; preemption takes from the end
        self.num_preemptions = 0
        # a prompt's last tokens computed even when its prefix cache holds them: decode-side KV
        # selection scores with their queries (engine/kv_select)
        self.uncached_tail = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.block_table)
        seq.block_hashes = []
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> list[ScheduledSeq]:
        """The next forward's batch; empty only when nothing is running or waiting can start.

        If no running sequence can move (each one stuck on memory), the latest one is preempted
        and the step is planned again, until a batch forms or nothing runs (each round preempts
        one sequence, so this ends)."""
        while True:
            batch = self._plan()
            if batch or not self.running:
                return batch
            self._preempt(self.running[-1])

    def _plan(self) -> list[ScheduledSeq]:
        """One planning pass over the token budget (module docstring); may preempt to decode."""
        budget = self.max_num_batched_tokens
        batch: list[ScheduledSeq] = []
        scheduled: set[str] = set()  # request ids

        # 1. decode tokens first
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING or seq.num_uncomputed != 1 or seq.request_id in scheduled:
                continue
            while not self.blocks.can_allocate(seq.block_table, seq.num_tokens):
                victim = next(s for s in reversed(self.running) if s.request_id not in scheduled)
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            self.blocks.allocate(seq.block_table, seq.num_tokens)
            batch.append(ScheduledSeq(seq, 1))
            scheduled.add(seq.request_id)
            budget -= 1

        # 2. continue prompts already admitted (chunked prefill)
        for seq in self.running:
            if budget == 0:
                break
            if seq.request_id in scheduled or seq.num_uncomputed <= 1 and seq.num_computed_tokens > 0:
                continue
            n = min(seq.num_uncomputed, budget)
            if not self.blocks.can_allocate(seq.block_table, seq.num_computed_tokens + n):
                continue
            self.blocks.allocate(seq.block_table, seq.num_computed_tokens + n)
            batch.append(ScheduledSeq(seq, n))
            scheduled.add(seq.request_id)
            budget -= n

        # 3. admit waiting sequences, fairly among tenants; a cached prefix is not computed again
        for seq in self._admission_order():
            if budget == 0 or len(self.running) >= self.max_num_seqs:
                break
            prefix, hashes = (
                ([], []) if seq.cache_key is None else self.blocks.match_prefix(seq.token_ids, seq.cache_key)
            )
            if self.uncached_tail:
                most = max(0, seq.num_prompt_tokens - self.uncached_tail) // self.blocks.block_size
                prefix, hashes = prefix[:most], hashes[:most]
            start = len(prefix) * self.blocks.block_size
            n = min(seq.num_tokens - start, budget)
            if not self.blocks.can_allocate(seq.block_table, start + n, prefix):
                break
            self.waiting.remove(seq)
            if seq.cache_key is not None:
                seq.num_computed_tokens = self.blocks.take_prefix(seq.block_table, prefix, seq.num_prompt_tokens)
                seq.block_hashes = hashes
                if not seq.num_preemptions:
                    seq.num_cached_tokens = start
            self.blocks.allocate(seq.block_table, start + n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.append(ScheduledSeq(seq, n))
            scheduled.add(seq.request_id)
            budget -= n
        return batch

    def _admission_order(self) -> list[Sequence]:
        """Waiting sequences in the order they are admitted: round robin over tenants, each
        tenant's in arrival order (a preempted sequence, at the front, keeps its place), tenants
        in the order of their first waiting sequence. One tenant's backlog never stands between
        another tenant's request and the next step."""
        queues: dict[str, list[Sequence]] = {}
        for seq in self.waiting:
            queues.setdefault(seq.tenant, []).append(seq)
        if len(queues) <= 1:
            return list(self.waiting)
        order: list[Sequence] = []
        for i in range(max(len(q) for q in queues.values())):
            order.extend(q[i] for q in queues.values() if i < len(q))
        return order

    def update(self, batch: list[ScheduledSeq], sampled: dict[str, int]) -> None:
        """Advance computed counts and append sampled tokens (keyed by request id)."""
        for entry in batch:
            seq = entry.seq
            seq.num_computed_tokens += entry.num_new_tokens
            if seq.cache_key is not None:  # its newly computed full blocks become reusable
                self.blocks.register(
                    seq.block_table, seq.block_hashes, seq.token_ids, seq.num_computed_tokens, seq.cache_key
                )
            token = sampled.get(seq.request_id)
            if token is not None:
                seq.token_ids.append(token)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End a sequence on any path and give its blocks back."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.block_table)
        seq.block_hashes = []
        seq.finish(reason)
