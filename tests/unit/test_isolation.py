"""One request's failure is its own: a row that cannot be sampled, or whose forward fails, ends
that request with an error while the batch, the worker's loop and every other request go on
with exactly the tokens they get without it. Colocated (LLMEngine) and disaggregated (prefill
and decode WorkerActors, fake transport, no Ray); failures are injected into prefill batches and
into decode batches. A step loop that dies of a fault no request caused fails the worker's
requests at once and reports the worker failed (WorkerLoopDied) so that it is replaced.
"""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from cluster.worker_actor import WorkerActor
from engine.worker_api import Role
from decode_workers.decode_core import DecodeOptions
from engine.config import EngineConfig
from engine.errors import WorkerLoopDied
from engine.sampler import RowFailure, Sampler
from engine.sequence import FinishReason, SamplingParams
from prefill_workers.prefill_core import PrefillOptions, PrefillTask

N = 10
TEXTS = [
    "The three pools of a serving cluster are",
    "Once upon a time",
    "A cache block holds",
    "Tokens stream from the decode worker to",
]


def poisoned(**values) -> SamplingParams:
    """Valid params with values changed after validation: what a gap in the door's checks (or a
    value that goes bad mid-generation, like a tiny temperature overflowing) would let through."""
    p = SamplingParams(max_tokens=N, ignore_eos=True)
    for name, value in values.items():
        object.__setattr__(p, name, value)
    return p


def greedy() -> SamplingParams:
    return SamplingParams(max_tokens=N, ignore_eos=True)


def fail_forward_for(runner, rid: str, *, decode_rows: bool) -> None:
    """Make the runner's forward raise whenever request `rid` is in the batch: in its prompt
    rows (decode_rows=False) or once it decodes, after 3 generated tokens (decode_rows=True)."""
    forward = runner.forward

    def guarded(batch, *args, **kwargs):
        for e in batch:
            decoding = e.seq.num_computed_tokens > 0 and len(e.seq.output_token_ids) >= 3
            if e.seq.request_id == rid and decoding == decode_rows:
                raise RuntimeError("injected forward fault")
        return forward(batch, *args, **kwargs)

    runner.forward = guarded


# ------------------------------------------------------------------------------------ sampler
def test_sampler_fails_bad_rows_alone():
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    logits[1, 7] = float("nan")
    params = [
        greedy(),
        greedy(),
        poisoned(temperature=math.nan),
        SamplingParams(temperature=1.0, seed=3),
        poisoned(temperature=1.0, seed=2**70),
    ]
    out = Sampler().sample(logits, ["a", "b", "c", "d", "e"], params)
    assert out[0] == int(logits[0].argmax())
    assert isinstance(out[1], RowFailure) and "NaN" in out[1].message
    assert isinstance(out[2], RowFailure) and "left no token" in out[2].message
    assert isinstance(out[3], int)
    assert isinstance(out[4], RowFailure) and out[4].message == "sampling failed for this request"


def test_sampler_tiny_temperature_is_greedy_and_overflow_fails_its_row_only():
    # Logits / 1e-37 overflow float32 (the case that killed a decode loop): below the epsilon
    # a temperature is greedy; logits that overflow even a valid temperature fail their row.
    logits = torch.tensor([[50.0, 10.0, -3.0], [1.0, 2.0, 3.0], [3e38, -3e38, 1.0]])
    out = Sampler().sample(
        logits, ["x", "y", "z"], [poisoned(temperature=1e-37), greedy(), SamplingParams(temperature=0.5)]
    )
    assert out[:2] == [0, 2] and isinstance(out[2], RowFailure)


# ------------------------------------------------------------------------------------ colocated
def _run_engine(engine, requests: list[tuple[str, list[int], SamplingParams]]) -> dict:
    for rid, ids, sampling in requests:
        engine.add_request(ids, sampling, rid)
    tokens = {rid: [] for rid, _, _ in requests}
    ends = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            if out.finished:
                ends[out.request_id] = (out.finish_reason, out.error)
    return {rid: (tokens[rid], *ends[rid]) for rid in tokens}


@pytest.mark.parametrize("fault", ["sampling", "forward-prefill", "forward-decode", "sampling-mid-decode"])
def test_colocated_failing_row(tiny, make_engine, fault):
    prompts = [tiny.tokenizer(t)["input_ids"] * 3 for t in TEXTS]
    # A small token budget mixes prompt chunks and decode rows in the same batches.
    kwargs = dict(block_size=8, num_kv_blocks=128, max_num_batched_tokens=48, max_num_seqs=8)
    clean = _run_engine(make_engine(tiny, **kwargs), [(f"r{i}", p, greedy()) for i, p in enumerate(prompts)])
    engine = make_engine(tiny, **kwargs)
    bad = ("bad", prompts[1], poisoned(temperature=math.nan) if fault == "sampling" else greedy())
    if fault.startswith("forward"):
        fail_forward_for(engine.runner, "bad", decode_rows=fault == "forward-decode")
    if fault == "sampling-mid-decode":  # goes bad after its third token
        step = engine.step

        def poisoning_step():
            seq = engine._seqs.get("bad")
            if seq is not None and len(seq.output_token_ids) == 3:
                seq.sampling = poisoned(temperature=math.nan)
            return step()

        engine.step = poisoning_step
    got = _run_engine(
        engine,
        [(f"r{i}", p, greedy()) for i, p in enumerate(prompts[:2])]
        + [bad]
        + [(f"r{i}", p, greedy()) for i, p in enumerate(prompts) if i >= 2],
    )
    tokens, reason, error = got.pop("bad")
    assert reason is FinishReason.ERROR and error, (reason, error)
    assert "Traceback" not in error and "injected" not in error  # no internal text for the client
    if fault in ("forward-decode", "sampling-mid-decode"):
        assert len(tokens) >= 3  # it failed mid-generation
    assert got == clean


# ------------------------------------------------------------------------------------ disaggregated
def _workers(tiny) -> tuple[WorkerActor, WorkerActor]:
    cfg = EngineConfig(block_size=8, num_kv_blocks=128, max_num_batched_tokens=512, max_num_seqs=8)
    opts = {Role.PREFILL: PrefillOptions(cfg, backend="fake"), Role.DECODE: DecodeOptions(cfg, backend="fake")}
    return (
        WorkerActor("p", None, opts, 1, Role.PREFILL, loaded=tiny),
        WorkerActor("d", None, opts, 1, Role.DECODE, loaded=tiny),
    )


async def _serve(prefill: WorkerActor, decode: WorkerActor, requests, on_token=None) -> dict:
    """Every request through reserve → one prefill batch → activate → decode polls."""
    ends: dict[str, tuple] = {}
    tokens = {rid: [] for rid, _, _ in requests}

    def take(out):
        tokens[out.request_id] += out.new_token_ids
        if out.finished:
            ends[out.request_id] = (out.finish_reason, out.error)

    async def start(rid, ids, sampling):
        desc = await decode.reserve(rid, len(ids), 30.0, epoch=0)
        result = await prefill.prefill(PrefillTask(rid, tuple(ids), sampling, desc), epoch=0)
        if result.first_token is None:
            await decode.cancel(rid)
            ends[rid] = ("prefill", result.error)
            return
        take(await decode.activate(rid, ids, result.first_token, sampling, epoch=0))

    # Queued before the prefill loop runs: the prompts form one prefill batch.
    await asyncio.gather(*(start(*r) for r in requests))
    while len(ends) < len(requests):
        for step in await decode.poll(1.0, epoch=0):
            for out in step:
                take(out)
                if on_token is not None:
                    on_token(out)
    return {rid: (tokens[rid], *ends[rid]) for rid in tokens}


@pytest.mark.parametrize("fault", ["prefill-sampling", "prefill-forward", "decode-forward", "decode-sampling"])
def test_disaggregated_failing_row(tiny, fault):
    prompts = [tiny.tokenizer(t)["input_ids"] * 3 for t in TEXTS]

    async def scenario():
        prefill, decode = _workers(tiny)
        clean = await _serve(prefill, decode, [(f"r{i}", p, greedy()) for i, p in enumerate(prompts)])
        sampling = poisoned(temperature=math.nan) if fault == "prefill-sampling" else greedy()
        if fault == "prefill-forward":
            fail_forward_for(prefill.impl.core.runner, "bad", decode_rows=False)
        if fault == "decode-forward":
            fail_forward_for(decode.impl.core.engine.runner, "bad", decode_rows=True)
        on_token = None
        if fault == "decode-sampling":  # its row goes bad mid-generation, inside a decode batch

            def on_token(out):
                seq = decode.impl.core.engine._seqs.get("bad")
                if seq is not None and len(seq.output_token_ids) >= 3:
                    seq.sampling = poisoned(temperature=math.nan)

        got = await _serve(
            prefill,
            decode,
            [(f"r{i}", p, greedy()) for i, p in enumerate(prompts[:2])]
            + [("bad", prompts[0], sampling)]
            + [(f"r{i}", p, greedy()) for i, p in enumerate(prompts) if i >= 2],
            on_token,
        )
        assert await prefill.idle() and await decode.idle()  # nothing held
        assert decode.impl.failed is None and prefill.impl.failed is None
        await prefill.stop()
        await decode.stop()
        return clean, got

    clean, got = asyncio.run(scenario())
    tokens, reason, error = got.pop("bad")
    want = "prefill" if fault.startswith("prefill") else FinishReason.ERROR
    assert reason == want and error and "injected" not in error, (reason, error)
    assert got == clean


def test_dead_decode_loop_reports_the_worker_failed(tiny):
    """Its requests are then a dead worker's (the router fails them or prefills them again)."""
    prompts = [tiny.tokenizer(t)["input_ids"] for t in TEXTS[:2]]

    async def scenario():
        prefill, decode = _workers(tiny)
        core = decode.impl.core
        step = core.step
        calls = []

        def broken_step():  # dies on the second step that has both requests running
            calls.extend([1] if len(core.engine.request_ids()) == 2 else [])
            if len(calls) == 2:
                raise RuntimeError("injected scheduler bug")
            return step()

        core.step = broken_step
        with pytest.raises(WorkerLoopDied, match="step loop of decode worker d died"):
            await _serve(
                prefill,
                decode,
                [(f"r{i}", p, SamplingParams(max_tokens=50, ignore_eos=True)) for i, p in enumerate(prompts)],
            )
        with pytest.raises(WorkerLoopDied):
            await decode.ready()
        with pytest.raises(WorkerLoopDied):
            await decode.reserve("late", 4, 10.0, epoch=0)
        await prefill.stop()
        await decode.stop()

    asyncio.run(scenario())


def test_dead_prefill_loop_hands_its_tasks_back(tiny):
    async def scenario():
        prefill, decode = _workers(tiny)
        core = prefill.impl.core

        def broken_take():
            raise RuntimeError("injected queue bug")

        core.take_batch = broken_take
        desc = await decode.reserve("r", 5, 30.0, epoch=0)
        with pytest.raises(WorkerLoopDied, match="batch loop of prefill worker p died"):
            await prefill.prefill(PrefillTask("r", (1, 2, 3, 4, 5), greedy(), desc), epoch=0)
        with pytest.raises(WorkerLoopDied):
            await prefill.ready()
        assert await decode.cancel("r")
        await prefill.stop()
        await decode.stop()

    asyncio.run(scenario())


# ------------------------------------------------------------------------------------ fairness
def test_prefill_batches_share_their_token_budget_among_tenants(tiny):
    from engine.worker_api import TENANT_ACTIVE_S
    from prefill_workers.prefill_core import PrefillCore

    now = [0.0]
    cfg = EngineConfig(block_size=8, num_kv_blocks=512, max_num_batched_tokens=256, max_num_seqs=8)
    core = PrefillCore(PrefillOptions(cfg, backend="fake"), tiny, clock=lambda: now[0])
    task = lambda rid, tenant, n=30: PrefillTask(rid, tuple(range(3, 3 + n)), greedy(), None, tenant=tenant)  # noqa: E731
    core.queue.extend(task(f"flood-{i}", "mallory") for i in range(30))
    core.queue.append(task("alice-0", "alice", 70))
    # alice queued last but is in the first batch; mallory gets as many tokens as alice (70: 2 prompts).
    assert [t.request_id for t in core.take_batch()] == ["flood-0", "alice-0", "flood-1"]
    core.queue.append(task("alice-1", "alice", 300))
    # A long prompt: the level is capped at an equal share of the budget (128 tokens: 4 prompts).
    assert [t.request_id for t in core.take_batch()] == ["flood-2", "flood-3", "flood-4", "flood-5"]
    assert [t.request_id for t in core.take_batch()] == ["alice-1"]  # alone, it fills the batch
    # alice is between two requests: her next one must not wait behind a full-budget batch of
    # mallory's, which still gets an equal share (128 tokens: 4 prompts).
    now[0] += TENANT_ACTIVE_S / 2
    assert [t.request_id for t in core.take_batch()] == [f"flood-{i}" for i in range(6, 10)]
    core.queue.append(task("alice-2", "alice", 40))
    assert [t.request_id for t in core.take_batch()] == ["alice-2", "flood-10"]  # alice first, level 40
    now[0] += TENANT_ACTIVE_S / 2
    # the level is alice's last prompt (40 tokens: 1 of mallory's) while she is active
    assert [t.request_id for t in core.take_batch()] == ["flood-11"]
    # alice quiet for TENANT_ACTIVE_S: one tenant alone fills the budget (8 prompts of 30 tokens)
    now[0] += TENANT_ACTIVE_S
    assert [t.request_id for t in core.take_batch()] == [f"flood-{i}" for i in range(12, 20)]
    core.close()


def test_a_worker_where_every_sequence_keeps_failing_is_broken(tiny, make_engine):
    """Not one request's fault: after BROKEN_AFTER batches in a row in which every sequence failed on
    its own (NaN weights, a dead device), the step raises WorkerBroken so the worker is replaced;
    one failing batch, or one healthy sequence among them, does not."""
    from engine.errors import BROKEN_AFTER, WorkerBroken

    engine = make_engine(tiny, block_size=8, num_kv_blocks=128, max_num_batched_tokens=256, max_num_seqs=8)
    ids = tiny.tokenizer(TEXTS[0])["input_ids"]
    forward = engine.runner.forward

    def broken(batch, *args, **kwargs):
        if any(e.seq.request_id.startswith("x") for e in batch):
            raise RuntimeError("injected device fault")
        return forward(batch, *args, **kwargs)

    engine.runner.forward = broken
    for round_ in range(BROKEN_AFTER - 1):  # each batch: every sequence fails alone, but a streak of 2
        for i in range(2):
            engine.add_request(ids, greedy(), f"x{round_}-{i}")
        outs = engine.step()
        assert all(o.finish_reason is FinishReason.ERROR for o in outs)
    engine.add_request(ids, greedy(), "healthy")  # one sequence that works breaks the streak
    engine.add_request(ids, greedy(), "x-last")
    engine.step()
    assert engine.request_ids() == ["healthy"]
    engine.abort("healthy")
    with pytest.raises(WorkerBroken, match=f"every sequence failed on its own in {BROKEN_AFTER} batches"):
        for round_ in range(BROKEN_AFTER):
            for i in range(2):
                engine.add_request(ids, greedy(), f"x-again-{round_}-{i}")
            engine.step()
    assert round_ == BROKEN_AFTER - 1
    engine.runner.forward = forward
    for rid in engine.request_ids():
        engine.abort(rid)
