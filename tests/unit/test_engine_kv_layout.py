"""KVLayout: the one description of the paged KV cache (engine/kv_layout.py)."""

from types import SimpleNamespace

import pytest
import torch

from engine.kv_layout import KVLayout


def _config(**kw):
    base = dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3)
    return SimpleNamespace(**(base | kw))


def test_from_model_config_smollm2_geometry():
    layout = KVLayout.from_model_config(_config(), model_id="smol", dtype=torch.float32, block_size=16)
    assert layout == KVLayout("smol", "float32", num_layers=30, num_kv_heads=3, head_dim=64, block_size=16)
    assert layout.bytes_per_token == 30 * 2 * 3 * 64 * 4


def test_from_model_config_prefers_explicit_head_dim_and_defaults_kv_heads():
    explicit = KVLayout.from_model_config(_config(head_dim=128), model_id="m", dtype="bfloat16", block_size=8)
    assert explicit.head_dim == 128
    no_gqa = KVLayout.from_model_config(_config(num_key_value_heads=None), model_id="m", dtype="float16", block_size=8)
    assert no_gqa.num_kv_heads == 9


def test_new_cache_is_checked_shape():
    layout = KVLayout("m", torch.float16, num_layers=2, num_kv_heads=2, head_dim=4, block_size=4)
    kv = layout.new_cache(3)
    assert kv.shape == layout.cache_shape(3) == (2, 2, 3, 4, 2, 4) and kv.dtype == torch.float16
    layout.check_cache(kv)
    with pytest.raises(ValueError, match="dtype"):
        layout.check_cache(kv.float())
    with pytest.raises(ValueError, match="shape"):
        layout.check_cache(kv[:, :, :, :2])


@pytest.mark.parametrize("start,end", [(0, 1), (2, 6), (0, 12), (3, 4), (5, 9), (4, 8), (7, 12)])
def test_slots_match_the_formula(start, end):
    layout = KVLayout("m", "float32", num_layers=1, num_kv_heads=1, head_dim=1, block_size=4)
    table = [3, 1, 7]
    expected = [table[p // 4] * 4 + p % 4 for p in range(start, end)]
    assert layout.slots(table, start, end) == expected
    assert layout.slots([3, 1], 2, 6) == [14, 15, 4, 5]


def test_slots_address_the_cache():
    """A slot indexes kv[layer, i].view(-1, Hkv, D): the token's block row at its offset."""
    layout = KVLayout("m", "float32", num_layers=1, num_kv_heads=2, head_dim=3, block_size=4)
    kv = torch.randn(layout.cache_shape(5))
    table = [4, 0, 2]
    flat = kv[0, 1].view(-1, 2, 3)
    for p, slot in enumerate(layout.slots(table, 0, 10)):
        assert torch.equal(flat[slot], kv[0, 1, table[p // 4], p % 4])
