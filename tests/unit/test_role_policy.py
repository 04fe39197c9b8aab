"""The role policy: its decision rule and its hysteresis (sustain, cooldown, minimum pool size)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from cluster.role_policy import RolePolicy, RolePolicyOptions, Signals, decide, signals
from cluster.router_api import ClusterStatus, RoleSwitch, RouterError, ErrorKind
from engine.worker_api import Role, WorkerStatus

O = RolePolicyOptions(
    ttft_slo_s=1.0, tpot_slo_s=0.1, target=0.9, sustain=3, cooldown_s=30.0, min_samples=4, queue_high=2.0, kv_high=0.8
)


def sig(n_p=1, n_d=2, ttft=1.0, tpot=1.0, queue=0.0, kv=0.1) -> Signals:
    return Signals(n_p, n_d, ttft, tpot, queue, kv, 10)


def test_decide_moves_toward_the_short_pool():
    assert decide(sig(ttft=0.5), O).to_role is Role.PREFILL  # TTFT misses: more prefill
    assert decide(sig(queue=3.0), O).from_role is Role.DECODE  # prefill queue builds up
    assert decide(sig(n_p=2, n_d=1, tpot=0.5), O).to_role is Role.DECODE  # TPOT misses: more decode
    assert decide(sig(n_p=2, n_d=1, kv=0.9), O).to_role is Role.DECODE  # decode KV nearly full


def test_decide_holds_when_both_or_neither_short_or_a_pool_would_empty():
    assert decide(sig(), O) is None
    assert decide(sig(ttft=None, tpot=None), O) is None  # too few requests to judge
    assert decide(sig(ttft=0.5, tpot=0.5), O) is None  # both short: moving helps neither
    assert decide(sig(n_d=1, ttft=0.5), O) is None  # the last decode worker stays
    assert decide(sig(n_p=1, tpot=0.5), O) is None  # the last prefill worker stays
    # Decode KV at 0.5 over 2 workers is 1.0 over one: taking one away would overflow it.
    assert decide(sig(ttft=0.5, kv=0.5), O) is None


def _ws(wid, role, queue=0, used=0, total=100):
    return WorkerStatus(wid, role, "n", True, queue, 0, used, total)


def test_signals_count_only_requests_after_the_last_switch():
    status = ClusterStatus(
        "disaggregated",
        (_ws("p0", Role.PREFILL, queue=4), _ws("d0", Role.DECODE, used=30), _ws("d1", Role.DECODE, used=10)),
    )
    now = 1000.0
    old = [(now - 50, 5.0, 0.5, 10, True)] * 10  # before the switch at now - 40: ignored
    new = [(now - 5, 0.5, 0.05, 10, True)] * 3 + [(now - 5, 2.0, 0.05, 10, True)]
    s = signals(status, old + new, now - 40, now, O)
    assert (s.samples, s.ttft_attainment, s.tpot_attainment) == (4, 0.75, 1.0)
    assert (s.n_prefill, s.n_decode, s.prefill_queue, s.decode_kv_usage) == (1, 2, 4.0, 0.2)


@dataclass
class _Handle:
    worker_id: str
    inflight: int = 0
    serving: bool = True


class _Router:
    def __init__(self, ttft: float) -> None:
        self.prefill = [_Handle("p0")]
        self.decode = [_Handle("d0", 3), _Handle("d1", 1)]
        self.recent = [(time.monotonic() + 1.0, ttft, 0.01, 10, True)] * 10
        self.calls = []
        self.refuse = False

    async def cluster_status(self):
        return ClusterStatus("disaggregated", (_ws("p0", Role.PREFILL), _ws("d0", Role.DECODE), _ws("d1", Role.DECODE)))

    async def set_worker_role(self, worker_id, role, reason, drain_timeout_s):
        self.calls.append((worker_id, role))
        if self.refuse:
            raise RouterError(ErrorKind.FAILED_PRECONDITION, "busy")
        return RoleSwitch(worker_id, Role.DECODE, role, time.time(), reason)


def test_policy_waits_for_a_sustained_signal_then_cools_down():
    async def scenario():
        router = _Router(ttft=5.0)  # every request misses TTFT
        policy = RolePolicy(router, RolePolicyOptions(**{**O.__dict__, "cooldown_s": 0.0}))
        policy.since = 0.0
        results = [await policy.check_once() for _ in range(3)]
        assert results[:2] == [None, None] and results[2].to_role is Role.PREFILL
        assert router.calls == [("d1", Role.PREFILL)]  # the least-loaded decode worker
        # A cooldown blocks the next switch however strong the signal.
        policy.options = RolePolicyOptions(**{**O.__dict__, "cooldown_s": 60.0})
        for _ in range(5):
            assert await policy.check_once() is None
        assert len(router.calls) == 1

    asyncio.run(scenario())


def test_policy_resets_when_the_signal_flips_or_the_switch_is_refused():
    async def scenario():
        router = _Router(ttft=5.0)
        policy = RolePolicy(router, RolePolicyOptions(**{**O.__dict__, "cooldown_s": 0.0}))
        policy.since = 0.0
        await policy.check_once()
        await policy.check_once()
        router.recent = [(time.monotonic() + 1.0, 0.1, 0.01, 10, True)] * 10  # healthy again
        assert await policy.check_once() is None
        router.recent = [(time.monotonic() + 1.0, 5.0, 0.01, 10, True)] * 10
        assert [await policy.check_once() for _ in range(2)] == [None, None]  # streak restarted
        router.refuse = True
        assert await policy.check_once() is None and len(router.calls) == 1  # tried, refused
        policy.since = 0.0
        router.recent = [(time.monotonic() + 1.0, 5.0, 0.01, 10, True)] * 10
        assert await policy.check_once() is None  # a new streak is needed

    asyncio.run(scenario())


OE = RolePolicyOptions(**{**O.__dict__, "encode_prefill": True, "encode_queue_high": 2.0})


def sig_e(n_e=2, encode_queue=0.0, **kw) -> Signals:
    s = sig(**kw)
    return Signals(
        s.n_prefill,
        s.n_decode,
        s.ttft_attainment,
        s.tpot_attainment,
        s.prefill_queue,
        s.decode_kv_usage,
        s.samples,
        n_e,
        encode_queue,
    )


def test_decide_moves_between_encode_and_prefill_only_when_enabled():
    # Image shards pile up on the encode workers, prefill keeps up: a prefill worker encodes.
    p = decide(sig_e(n_p=2, encode_queue=3.0), OE)
    assert (p.from_role, p.to_role) == (Role.PREFILL, Role.ENCODE) and "encode queue/worker 3.0" in p.reason
    assert decide(sig_e(n_p=2, encode_queue=3.0), O) is None  # encode_prefill off
    assert decide(sig_e(n_p=1, encode_queue=3.0), OE) is None  # the last prefill worker stays
    assert decide(sig_e(n_p=2, encode_queue=3.0, queue=3.0), OE).from_role is Role.DECODE  # prefill queue too
    # TTFT misses while images pile up at the encode pool are the encode wait: encode gets the worker.
    assert decide(sig_e(n_p=2, encode_queue=3.0, ttft=0.5), OE).to_role is Role.ENCODE
    # Prefill short, decode cannot give (short itself), encode idle: an encode worker prefills.
    p = decide(sig_e(ttft=0.5, tpot=0.5, encode_queue=0.5), OE)
    assert (p.from_role, p.to_role) == (Role.ENCODE, Role.PREFILL)
    assert decide(sig_e(n_d=1, ttft=0.5, encode_queue=0.0), OE).from_role is Role.ENCODE  # decode at its minimum
    assert decide(sig_e(ttft=0.5), OE).from_role is Role.DECODE  # decode can give: it goes first
    assert decide(sig_e(n_e=1, ttft=0.5, tpot=0.5), OE) is None  # the last encode worker stays
    assert decide(sig_e(ttft=0.5, tpot=0.5, encode_queue=1.5), OE) is None  # encode busy: keep it


def test_signals_read_the_encode_queue():
    status = ClusterStatus(
        "disaggregated",
        (
            _ws("e0", Role.ENCODE, queue=3),
            _ws("e1", Role.ENCODE, queue=1),
            _ws("p0", Role.PREFILL),
            _ws("d0", Role.DECODE),
        ),
    )
    s = signals(status, [], 0.0, 1000.0, OE)
    assert (s.n_encode, s.encode_queue, s.n_prefill, s.n_decode) == (2, 2.0, 1, 1)
    assert "encode queue/worker 2.0" in s.describe()


def test_policy_moves_only_a_worker_that_holds_both_halves():
    class _EncodeRouter(_Router):
        def __init__(self) -> None:
            super().__init__(ttft=0.1)
            self.prefill = [_Handle("p0"), _Handle("p1", 2)]
            self.encode = [_Handle("e0")]
            self.able = {"p0": {Role.PREFILL, Role.DECODE}, "p1": {Role.PREFILL, Role.DECODE, Role.ENCODE}}

        async def cluster_status(self):
            return ClusterStatus(
                "disaggregated",
                (
                    _ws("e0", Role.ENCODE, queue=4),
                    _ws("p0", Role.PREFILL),
                    _ws("p1", Role.PREFILL),
                    _ws("d0", Role.DECODE),
                    _ws("d1", Role.DECODE),
                ),
            )

        async def worker_roles(self, handle):
            return frozenset(self.able[handle.worker_id])

    async def scenario():
        router = _EncodeRouter()
        policy = RolePolicy(router, RolePolicyOptions(**{**OE.__dict__, "cooldown_s": 0.0}))
        policy.since = 0.0
        results = [await policy.check_once() for _ in range(3)]
        assert results[2].to_role is Role.ENCODE
        assert router.calls == [("p1", Role.ENCODE)]  # p0 is less loaded but holds no vision tower
        router.able["p1"] = {Role.PREFILL, Role.DECODE}
        policy.since = 0.0
        assert [await policy.check_once() for _ in range(3)] == [None, None, None]  # nobody can
        assert len(router.calls) == 1

    asyncio.run(scenario())


def test_no_cooldown_at_start():
    """The cooldown runs from the last switch: a fresh policy acts after `sustain` checks."""

    async def scenario():
        router = _Router(ttft=5.0)
        policy = RolePolicy(router, RolePolicyOptions(**{**O.__dict__, "cooldown_s": 600.0}))
        results = [await policy.check_once() for _ in range(3)]
        assert results[2] is not None and router.calls == [("d1", Role.PREFILL)]
        assert [await policy.check_once() for _ in range(3)] == [None] * 3  # now it cools down

    asyncio.run(scenario())
