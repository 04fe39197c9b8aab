import pytest

from engine.errors import EngineError
from engine.kv_cache import BlockManager


def test_can_allocate_does_not_change_state():
    bm = BlockManager(num_blocks=4, block_size=4)
    table: list[int] = []
    assert bm.can_allocate(table, 16)
    assert not bm.can_allocate(table, 17)
    assert bm.num_free_blocks == 4 and table == []


def test_allocate_grows_and_free_returns():
    bm = BlockManager(num_blocks=4, block_size=4)
    table: list[int] = []
    assert bm.allocate(table, 5) == table and len(table) == 2
    assert bm.allocate(table, 8) == []  # still covered by 2 blocks
    assert len(bm.allocate(table, 9)) == 1
    assert bm.num_used_blocks == 3
    bm.free(table)
    assert table == [] and bm.all_free()


def test_allocate_beyond_pool_raises_without_partial_state():
    bm = BlockManager(num_blocks=2, block_size=4)
    table: list[int] = []
    with pytest.raises(EngineError, match="asked for 3 KV blocks, only 2 free"):
        bm.allocate(table, 12)
    assert table == [] and bm.all_free()


def test_double_free_is_refused_and_changes_nothing():
    bm = BlockManager(num_blocks=4, block_size=4)
    table: list[int] = []
    bm.allocate(table, 8)
    stale = list(table)
    bm.free(table)
    with pytest.raises(EngineError, match=f"KV block {stale[0]} is already free"):
        bm.free(stale)
    assert stale and bm.all_free() and bm.num_free_blocks == 4
    # a table that shares one block with another: nothing of it goes back
    a: list[int] = []
    bm.allocate(a, 8)
    with pytest.raises(EngineError, match="appears twice"):
        bm.pool.give_back([a[0], a[1], a[1]])
    assert bm.num_used_blocks == 2


def test_foreign_id_is_refused_and_changes_nothing():
    bm = BlockManager(num_blocks=4, block_size=4)
    table: list[int] = []
    bm.allocate(table, 4)
    for bad in ([table[0], 4], [-1], [table[0], 99]):
        with pytest.raises(EngineError, match="is not a block of this pool"):
            bm.free(bad)
    assert bm.num_used_blocks == 1
    bm.free(table)
    assert bm.all_free()


def test_ids_taken_again_after_free_can_be_freed_again():
    bm = BlockManager(num_blocks=2, block_size=4)
    for _ in range(3):
        table: list[int] = []
        bm.allocate(table, 8)
        bm.free(table)
    assert bm.all_free()
