"""A request cancelled (or out of time) while its decode KV reservation is in flight frees that
reservation at once, not when its lease lapses. Fake decode actor whose calls run one at a time
in arrival order, as DecodeWorker's single executor thread runs them."""

from __future__ import annotations

import asyncio

import pytest

from cluster.pools import WorkerHandle
from cluster.router import ClusterRouter
from cluster.router_api import GenerateInput, ModelInfo
from engine.worker_api import Role
from engine.sequence import SamplingParams


class _Method:
    def __init__(self, fn) -> None:
        self.fn = fn

    def remote(self, *args, **kwargs):
        # Like a Ray actor call: queued at once, runs whether or not anyone awaits the result.
        return asyncio.ensure_future(self.fn(*args, **kwargs))


class FakeDecode:
    def __init__(self, reserve_s: float) -> None:
        self.reserve_s = reserve_s
        self.reserved: set[str] = set()
        self.cancels: list[str] = []
        self._lock = asyncio.Lock()  # one call at a time, in arrival order
        self.reserve, self.cancel, self.poll = _Method(self._reserve), _Method(self._cancel), _Method(self._poll)

    async def _reserve(self, request_id, num_tokens, lease_s, epoch=None):
        async with self._lock:
            await asyncio.sleep(self.reserve_s)
            self.reserved.add(request_id)
            return ("descriptor", request_id)

    async def _cancel(self, request_id):
        async with self._lock:
            self.cancels.append(request_id)
            found = request_id in self.reserved
            self.reserved.discard(request_id)
            return found

    async def _poll(self, timeout_s, epoch=None):
        await asyncio.sleep(timeout_s)
        return []


class _Vocab:
    """Token-id prompts only need the vocabulary size."""

    def __len__(self) -> int:
        return 100


def _router(decode: FakeDecode, timeout_s: float = 30.0) -> ClusterRouter:
    info = ModelInfo("fake", 64, 10, (), "float32", False)
    return ClusterRouter(
        mode="disaggregated",
        tokenizer=_Vocab(),
        model_info=info,
        kv_capacity_tokens=64,
        prefill=[WorkerHandle("prefill-0", Role.PREFILL, object())],
        decode=[WorkerHandle("decode-0", Role.DECODE, decode)],
        max_inflight=4,
        default_timeout_s=timeout_s,
    )


async def _consume(router, request):
    return [event async for event in router.generate(request)]


def test_cancel_during_reserve_frees_the_reservation():
    async def main():
        decode = FakeDecode(reserve_s=0.3)
        router = _router(decode)
        request = GenerateInput("r1", SamplingParams(max_tokens=4), token_ids=(1, 2, 3))
        task = asyncio.ensure_future(_consume(router, request))
        await asyncio.sleep(0.1)  # the reserve call is in flight
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.5)  # the reserve lands, then the cancel
        return decode, router

    decode, router = asyncio.run(main())
    assert decode.cancels == ["r1"]
    assert decode.reserved == set()
    assert router.decode[0].inflight == 0


def test_deadline_during_reserve_frees_the_reservation():
    async def main():
        decode = FakeDecode(reserve_s=0.4)
        router = _router(decode)
        request = GenerateInput("r2", SamplingParams(max_tokens=4), token_ids=(1, 2, 3), deadline_s=0.15)
        events = await _consume(router, request)
        await asyncio.sleep(0.5)
        return decode, router, events

    decode, router, events = asyncio.run(main())
    final = events[-1]
    assert final.error and "deadline" in final.error
    assert decode.reserved == set() and decode.cancels
    assert router.decode[0].inflight == 0


def test_abort_ends_a_request_waiting_for_a_decode_slot_or_its_reservation():
    """Abort reaches a request before its first token: one waiting for a decode slot (the cluster
    is full) ends at once, one whose reservation is in flight ends and frees it."""
    from engine.sequence import FinishReason

    async def main():
        decode = FakeDecode(reserve_s=0.3)
        router = _router(decode)
        router.seqs_per_worker = 1  # one decode slot in the whole cluster
        first = asyncio.ensure_future(
            _consume(router, GenerateInput("r1", SamplingParams(max_tokens=4), token_ids=(1, 2, 3), tenant="a"))
        )
        await asyncio.sleep(0.05)  # r1 holds the slot, its reserve call is in flight
        second = asyncio.ensure_future(
            _consume(router, GenerateInput("r2", SamplingParams(max_tokens=4), token_ids=(1, 2, 3), tenant="b"))
        )
        await asyncio.sleep(0.05)  # r2 waits for the slot
        assert router.slots.waiting == 1
        assert await router.abort("r2")
        waited = await asyncio.wait_for(second, 1.0)
        assert await router.abort("r1")
        reserved = await asyncio.wait_for(first, 1.0)
        await asyncio.sleep(0.5)  # the reserve lands, then the cancel
        return decode, router, waited, reserved

    decode, router, waited, reserved = asyncio.run(main())
    assert waited[-1].finish_reason is FinishReason.ABORT and reserved[-1].finish_reason is FinishReason.ABORT
    assert decode.reserved == set() and "r1" in decode.cancels
    assert router.slots.in_use == 0 and router.slots.waiting == 0 and router.decode[0].inflight == 0


def test_the_choices_of_one_request_go_where_the_first_went():
    """Without cache-aware routing, a request's choices (one `choices_of`) go to the prefill worker
    the first one went to while it serves, under a salt only they carry; others go by load."""
    from engine.kv_cache import choices_salt

    router = ClusterRouter(
        mode="disaggregated",
        tokenizer=_Vocab(),
        model_info=ModelInfo("fake", 64, 10, (), "float32", False),
        kv_capacity_tokens=64,
        prefill=[WorkerHandle(f"prefill-{i}", Role.PREFILL, object()) for i in range(3)],
        decode=[WorkerHandle("decode-0", Role.DECODE, object())],
        max_inflight=4,
        default_timeout_s=5.0,
    )
    d, pool = router.dispatch, router.prefill
    assert router.shares_choices()

    def pick(group: str):
        request = GenerateInput("r", SamplingParams(), token_ids=(1, 2), choices_of=group)
        return d._pick(pool, request, [1, 2], None), d._salt(request)

    first, salt = pick("g")
    assert salt == choices_salt("g") and d._salt(GenerateInput("p", SamplingParams(), token_ids=(1,))) == ""
    first._leases = 5  # busiest now: the choices still go there, a plain request does not
    assert pick("g")[0] is first and pick("h")[0] is not first
    first.draining = True  # no longer serving: the next choice goes by load
    assert pick("g")[0] is not first
