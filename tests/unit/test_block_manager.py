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
    assert bm.allocate(table, 8) == []          # still covered by 2 blocks
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


def test_slots():
    bm = BlockManager(num_blocks=4, block_size=4)
    table = [3, 1]
    assert bm.slots(table, 2, 6) == [14, 15, 4, 5]
