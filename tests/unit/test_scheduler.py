"""The colocated scheduler on its own: fake sequences, no model, no tensors.

`Driver` stands in for LLMEngine.step: schedule, "run" the batch (every sampled row gets token
7), update, and finish a sequence once it has max_tokens outputs. After every schedule() it
checks what must always hold (token budget, max_num_seqs, decodes first, blocks that cover
what is computed and belong to one sequence each), and each test ends with a leak check.
"""

from __future__ import annotations

import pytest

from engine.kv_cache import BlockManager
from engine.scheduler import ScheduledSeq, Scheduler
from engine.sequence import FinishReason, SamplingParams, Sequence, SequenceStatus

TOKEN = 7


class Driver:
    def __init__(self, num_blocks: int, block_size: int, budget: int, max_num_seqs: int = 64) -> None:
        self.blocks = BlockManager(num_blocks, block_size)
        self.sched = Scheduler(self.blocks, budget, max_num_seqs)
        self.seqs: dict[str, Sequence] = {}

    def add(self, rid: str, prompt_len: int, max_tokens: int, tenant: str = "") -> Sequence:
        seq = Sequence(rid, list(range(10, 10 + prompt_len)), SamplingParams(max_tokens=max_tokens), tenant=tenant)
        self.seqs[rid] = seq
        self.sched.add(seq)
        return seq

    def step(self) -> list[ScheduledSeq]:
        batch = self.sched.schedule()
        self.check(batch)
        sampled = {e.seq.request_id: TOKEN for e in batch if e.samples}
        self.sched.update(batch, sampled)
        for e in batch:
            if e.seq.request_id in sampled and len(e.seq.output_token_ids) >= e.seq.sampling.max_tokens:
                self.sched.finish(e.seq, FinishReason.LENGTH)
        return batch

    def run(self, max_steps: int = 1000) -> list[list[tuple[str, int]]]:
        """Step until nothing is left; returns each step's (request id, new tokens)."""
        steps = []
        while self.sched.has_work():
            assert len(steps) < max_steps, "the scheduler made no progress"
            steps.append([(e.seq.request_id, e.num_new_tokens) for e in self.step()])
        return steps

    def check(self, batch: list[ScheduledSeq]) -> None:
        s, bs = self.sched, self.blocks.block_size
        assert sum(e.num_new_tokens for e in batch) <= s.max_num_batched_tokens
        assert len(s.running) <= s.max_num_seqs
        rids = [e.seq.request_id for e in batch]
        assert len(set(rids)) == len(rids), f"a sequence scheduled twice: {rids}"
        kinds = [e.num_new_tokens == 1 and e.seq.num_computed_tokens > 0 for e in batch]
        assert kinds == sorted(kinds, reverse=True), "a prompt chunk came before a decode token"
        for e in batch:
            assert e.seq.status is SequenceStatus.RUNNING and e.seq in s.running
            assert 0 < e.num_new_tokens <= e.seq.num_uncomputed
            assert len(e.seq.block_table) * bs >= e.seq.num_computed_tokens + e.num_new_tokens
        owned = [b for seq in s.running for b in seq.block_table]
        assert len(owned) == len(set(owned)) == self.blocks.num_used_blocks
        assert all(not seq.block_table and seq.num_computed_tokens == 0 for seq in s.waiting)

    def assert_empty(self) -> None:
        """Leak check: nothing waiting or running, every block free, every sequence complete."""
        assert not self.sched.has_work() and self.blocks.all_free()
        for seq in self.seqs.values():
            assert seq.finish_reason is FinishReason.LENGTH and not seq.block_table
            assert seq.output_token_ids == [TOKEN] * seq.sampling.max_tokens


def test_decode_tokens_come_first_and_a_long_prompt_waits_for_budget():
    d = Driver(num_blocks=64, block_size=4, budget=3)
    for rid in "abc":
        d.add(rid, prompt_len=1, max_tokens=4)
    assert d.step() == [ScheduledSeq(d.seqs[r], 1) for r in "abc"]  # three one-token prompts
    d.add("long", prompt_len=10, max_tokens=1)
    # the budget (3) goes to the three decode tokens; the waiting prompt gets nothing
    assert [(e.seq.request_id, e.num_new_tokens) for e in d.step()] == [("a", 1), ("b", 1), ("c", 1)]
    assert d.seqs["long"].status is SequenceStatus.WAITING
    d.sched.max_num_batched_tokens = 5
    # decodes first, then the rest of the budget as the prompt's first chunk
    assert [(e.seq.request_id, e.num_new_tokens) for e in d.step()] == [("a", 1), ("b", 1), ("c", 1), ("long", 2)]
    d.run()
    d.assert_empty()


def test_chunked_prefill_splits_a_prompt_by_the_budget_and_samples_once():
    d = Driver(num_blocks=64, block_size=4, budget=10)
    seq = d.add("p", prompt_len=25, max_tokens=3)
    chunks = []
    for _ in range(3):
        (entry,) = d.step()
        chunks.append((entry.num_new_tokens, len(seq.output_token_ids)))
    assert chunks == [(10, 0), (10, 0), (5, 1)]  # only the last chunk samples
    assert seq.num_computed_tokens == 25 and len(seq.block_table) == 7
    assert d.run() == [[("p", 1)], [("p", 1)]]
    d.assert_empty()


def test_prompt_chunks_share_each_step_with_decodes():
    d = Driver(num_blocks=64, block_size=4, budget=8)
    d.add("dec", prompt_len=2, max_tokens=20)
    d.step()
    d.add("pre", prompt_len=20, max_tokens=1)
    steps = d.run()
    assert steps[:3] == [[("dec", 1), ("pre", 7)], [("dec", 1), ("pre", 7)], [("dec", 1), ("pre", 6)]]
    assert all(step == [("dec", 1)] for step in steps[3:])
    d.assert_empty()


def test_max_num_seqs_bounds_the_running_batch():
    d = Driver(num_blocks=64, block_size=4, budget=100, max_num_seqs=2)
    for rid in "abcd":
        d.add(rid, prompt_len=3, max_tokens=2)
    steps = d.run()
    assert steps == [[("a", 3), ("b", 3)], [("a", 1), ("b", 1)], [("c", 3), ("d", 3)], [("c", 1), ("d", 1)]]
    d.assert_empty()


def test_preemption_frees_the_latest_sequence_which_recomputes_prompt_and_output():
    # 4 blocks of 4 tokens: three 4-token prompts fit (3 blocks); their first decode needs a
    # second block each, so there is room for only one more.
    d = Driver(num_blocks=4, block_size=4, budget=64)
    a, b, c = (d.add(r, prompt_len=4, max_tokens=10) for r in "abc")
    d.step()
    assert d.blocks.num_free_blocks == 1
    batch = d.step()
    # a takes the free block; for b the most recently admitted other sequence, c, is preempted
    assert [(e.seq.request_id, e.num_new_tokens) for e in batch] == [("a", 1), ("b", 1)]
    assert d.sched.num_preemptions == 1 and c.num_preemptions == 1
    assert c.status is SequenceStatus.WAITING and d.sched.waiting[0] is c
    assert c.block_table == [] and c.num_computed_tokens == 0
    assert c.token_ids == list(range(10, 14)) + [TOKEN]  # its output so far is kept
    steps = d.run()
    # c comes back as one prefill of prompt + the output it had when preempted
    first_c = next(e for step in steps for e in step if e[0] == "c")
    assert first_c == ("c", 5)
    assert b.num_preemptions >= 1 and a.num_preemptions == 0  # the first admitted never yields
    d.assert_empty()


def test_schedule_preempts_until_something_can_run():
    """A running prompt that cannot grow (nothing else to preempt for it) is freed and restarted,
    within one schedule() call: the batch is never empty while a sequence could run."""
    d = Driver(num_blocks=4, block_size=4, budget=8)
    seq = d.add("big", prompt_len=20, max_tokens=1)  # 20 tokens > 16 slots: can never finish
    assert [e.num_new_tokens for e in d.step()] == [8]
    assert [e.num_new_tokens for e in d.step()] == [8]  # 16 tokens: all 4 blocks
    batch = d.sched.schedule()  # 4 more need a 5th block
    assert batch == [ScheduledSeq(seq, 8)] and seq.num_computed_tokens == 0
    assert d.sched.num_preemptions == 1 and len(seq.block_table) == 2
    d.sched.finish(seq, FinishReason.ABORT)
    assert d.blocks.all_free() and not d.sched.has_work()


def test_waiting_prompts_are_admitted_round_robin_over_tenants():
    d = Driver(num_blocks=64, block_size=4, budget=100, max_num_seqs=3)
    for i in range(4):
        d.add(f"m{i}", prompt_len=2, max_tokens=1, tenant="mallory")
    d.add("a0", prompt_len=2, max_tokens=1, tenant="alice")
    d.add("a1", prompt_len=2, max_tokens=1, tenant="alice")
    assert [e.seq.request_id for e in d.step()] == ["m0", "a0", "m1"]
    d.run()
    d.assert_empty()


def test_finish_of_a_waiting_or_running_sequence_gives_its_blocks_back():
    d = Driver(num_blocks=8, block_size=4, budget=4)
    run = d.add("run", prompt_len=10, max_tokens=5)
    wait = d.add("wait", prompt_len=3, max_tokens=5)
    d.step()
    assert run.block_table and wait.status is SequenceStatus.WAITING
    d.sched.finish(run, FinishReason.ABORT)
    d.sched.finish(wait, FinishReason.ABORT)
    assert d.blocks.all_free() and not d.sched.has_work()


@pytest.mark.parametrize("seed", range(5))
def test_random_workload_keeps_every_invariant(seed):
    """Mixed prompt lengths, a cache small enough to preempt often, a small budget."""
    import random

    rng = random.Random(seed)
    d = Driver(num_blocks=12, block_size=4, budget=rng.choice([5, 8, 13]), max_num_seqs=rng.choice([2, 4, 8]))
    for i in range(12):
        d.add(f"r{i}", prompt_len=rng.randrange(1, 30), max_tokens=rng.randrange(1, 12))
        if rng.random() < 0.5:
            d.step()
    d.run(max_steps=5000)
    d.assert_empty()
