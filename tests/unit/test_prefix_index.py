"""Cache-aware routing (cluster/prefix_index.py): the router hashes prompts as the engine does and
sends a prompt to the worker likely to hold its prefix unless that worker is much busier."""

from __future__ import annotations

from cluster.pools import Lease, WorkerHandle
from cluster.prefix_index import IndexFollower, PrefixIndex
from engine.kv_cache import BlockManager, CacheEvents, cache_key, image_hash, prefix_hashes
from engine.worker_api import Role

BS = 4


def _workers(n: int) -> list[WorkerHandle]:
    return [WorkerHandle(f"colocated-{i}", Role.COLOCATED, actor=None) for i in range(n)]


def test_the_router_hashes_a_prompt_as_the_engine_caches_it():
    tokens = list(range(100, 123))  # 5 full blocks and 3 tokens
    m = BlockManager(16, BS, prefix_caching=True)
    for salt in ("", "tenant-a"):
        table: list[int] = []
        m.allocate(table, len(tokens))
        m.register(table, hashes := [], tokens, len(tokens), cache_key(salt))
        m.free(table)
        _, engine_hashes = m.match_prefix(tokens + [7], cache_key(salt))
        assert PrefixIndex(BS, 16).hashes(tokens + [7], salt) == engine_hashes == hashes[: len(engine_hashes)]
    assert PrefixIndex(BS, 16).hashes(tokens, "a") != PrefixIndex(BS, 16).hashes(tokens, "b")
    # a prompt with images (placeholder 9): keyed by their content, as the workers key it; an
    # answer's blocks after the prompt too, even where the answer holds the placeholder token
    ids, images = [1, 2, 9, 9, 9, 9, 3, 4, 5, 6], [image_hash(b"png-1")]
    key = cache_key("s", ids, 9, images)
    index = PrefixIndex(BS, 16, image_token_id=9)
    assert index.hashes(ids, "s", images) == list(prefix_hashes(ids, BS, key)) != index.hashes(ids, "s")
    answer = ids + [9, 7, 7, 7, 7]
    assert index.hashes(answer, "s", images, len(ids)) == list(prefix_hashes(answer, BS, key))


def test_a_prompt_goes_where_its_prefix_is_unless_that_worker_is_much_busier():
    index, (a, b) = PrefixIndex(BS, 64), _workers(2)
    history = index.hashes(list(range(40)) + [1])  # 10 blocks
    assert index.pick([a, b], history) is a  # nothing cached anywhere: the least loaded, first on ties
    index.record(b, history)
    leases = [Lease(b) for _ in range(3)]  # b is busier, but holds 10 of the prompt's blocks
    assert index.pick([a, b], history) is b and index.overlap(b, history) == 10
    leases += [Lease(b) for _ in range(10)]  # now the load outweighs the blocks saved
    assert index.pick([a, b], history) is a
    for lease in leases:
        lease.release()
    other_salt = index.hashes(list(range(40)) + [1], "tenant-b")
    assert index.overlap(b, other_salt) == 0
    b.alive = False
    assert index.pick([a, b], history) is a  # only serving workers
    assert index.pick([b], history) is None


def test_the_index_is_bounded_by_a_workers_capacity_and_a_new_handle_starts_empty():
    index, (a,) = PrefixIndex(BS, 8), _workers(1)
    first = index.hashes(list(range(21)))  # 5 blocks
    second = index.hashes(list(range(500, 521)))
    index.record(a, first)
    index.record(a, second)
    assert index.blocks_held(a) == 8 and index.overlap(a, second) == 5
    assert index.overlap(a, first) == 0  # its first blocks were the oldest: forgotten first
    restarted = WorkerHandle(a.worker_id, a.role, actor=None, epoch=a.epoch + 1)
    assert index.overlap(restarted, second) == 0


def _cache(m: BlockManager, tokens: list[int], salt: str = "") -> None:
    """Compute `tokens` into `m` (as a step does) and free them: their full blocks stay cached."""
    table: list[int] = []
    m.allocate(table, len(tokens))
    m.register(table, [], tokens, len(tokens), cache_key(salt))
    m.free(table)


def test_the_index_follows_what_a_workers_cache_stored_and_evicted():
    """The engine logs stores and evictions in order; applied to the index, it believes exactly
    the blocks the cache holds, including blocks it never sent there and none it evicted."""
    m, index, (a,) = BlockManager(8, BS, prefix_caching=True), PrefixIndex(BS, 8), _workers(1)
    first, second = list(range(21)), list(range(500, 521))  # 5 full blocks each (+1 token)
    _cache(m, first)
    index.apply(a, m.drain_events())
    assert index.overlap(a, index.hashes(first)) == 5 and m.drain_events().events == ()
    _cache(m, second)  # 6 blocks on a full pool: 3 of the first prompt's cached blocks evicted
    events = m.drain_events()
    assert [stored for stored, _ in events.events].count(False) == 3 and events.snapshot is None
    index.apply(a, events)
    held = set(m._by_hash)
    assert index.overlap(a, index.hashes(second)) == 5
    assert index.overlap(a, index.hashes(first)) == 0  # its first block went first (LRU)
    assert {h for h in index.hashes(first) + index.hashes(second) if index.overlap(a, [h])} == held


def test_an_overflowed_log_is_answered_with_a_snapshot():
    m, index, (a,) = BlockManager(8, BS, prefix_caching=True), PrefixIndex(BS, 8), _workers(1)
    index.record(a, index.hashes(list(range(900, 921))))
    for start in range(0, 400, 20):  # 20 prompts of 5 blocks into 8 blocks: far more than 2 x 8 events
        _cache(m, list(range(start, start + 21)))
    events = m.drain_events()
    assert events.snapshot is not None and set(events.snapshot) == set(m._by_hash) and events.events == ()
    index.apply(a, events)
    assert index.blocks_held(a) == len(m._by_hash)
    assert m.drain_events() == CacheEvents()  # back to a log


def test_the_follower_asks_live_workers_and_applies_in_order():
    import asyncio

    class Actor:
        def __init__(self, answers):
            self.answers = list(answers)
            self.cache_events = self

        def remote(self):
            fut = asyncio.get_running_loop().create_future()
            answer = self.answers.pop(0)
            fut.set_exception(answer) if isinstance(answer, Exception) else fut.set_result(answer)
            return fut

    h1, h2 = b"1" * 16, b"2" * 16
    index = PrefixIndex(BS, 8)
    a = WorkerHandle(
        "decode-0", Role.DECODE, Actor([CacheEvents(((True, h1), (True, h2))), CacheEvents(((False, h1),))])
    )
    b = WorkerHandle("prefill-0", Role.PREFILL, Actor([RuntimeError("loop died")]))
    dead = WorkerHandle("decode-1", Role.DECODE, Actor([]), alive=False)  # never asked
    follower = IndexFollower(index, lambda: [a, b, dead])

    async def rounds():
        await follower.sync()
        first = index.overlap(a, [h1, h2])
        await follower.sync()
        await follower.stop()
        return first

    assert asyncio.run(rounds()) == 2
    assert index.overlap(a, [h2]) == 1 and index.overlap(a, [h1]) == 0 and index.blocks_held(b) == 0
