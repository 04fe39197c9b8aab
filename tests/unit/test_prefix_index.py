"""Cache-aware routing (cluster/prefix_index.py): the router hashes prompts as the engine does and
sends a prompt to the worker likely to hold its prefix unless that worker is much busier."""

from __future__ import annotations

from cluster.pools import Lease, WorkerHandle
from cluster.prefix_index import PrefixIndex
from engine.kv_cache import BlockManager, cache_root
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
        m.register(table, hashes := [], tokens, len(tokens), cache_root(salt))
        m.free(table)
        _, engine_hashes = m.match_prefix(tokens + [7], cache_root(salt))
        assert PrefixIndex(BS, 16).hashes(tokens + [7], salt) == engine_hashes == hashes[: len(engine_hashes)]
    assert PrefixIndex(BS, 16).hashes(tokens, "a") != PrefixIndex(BS, 16).hashes(tokens, "b")


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
