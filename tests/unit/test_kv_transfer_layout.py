import dataclasses
import pickle

import pytest
import torch

from kv_transfer.base import TransferStatus
from kv_transfer.blocks import block_runs, copy_blocks
from engine.kv_layout import KVLayout
from kv_transfer.layout import PROTOCOL_VERSION, HandshakeError, TransferMetadata, check_compatible, compat_hash
from kv_transfer.registry import get_backend

LAYOUT = KVLayout("tiny-llama", torch.float16, num_layers=2, num_kv_heads=2, head_dim=8, block_size=4)


def test_hash_is_stable_and_dtype_normalised():
    same = KVLayout("tiny-llama", "float16", 2, 2, 8, 4)
    assert same == LAYOUT and compat_hash(same) == compat_hash(LAYOUT)
    assert compat_hash(pickle.loads(pickle.dumps(LAYOUT))) == compat_hash(LAYOUT)
    assert len(compat_hash(LAYOUT)) == 64
    hashes = {compat_hash(LAYOUT)}
    for f, v in [
        ("model_id", "other"),
        ("dtype", "bfloat16"),
        ("num_layers", 3),
        ("num_kv_heads", 1),
        ("head_dim", 16),
        ("block_size", 8),
        ("kv_head_start", 1),
    ]:
        hashes.add(compat_hash(dataclasses.replace(LAYOUT, **{f: v})))
    assert len(hashes) == 8


def test_hash_is_the_wire_value():
    """The handshake hash is part of the wire format: workers of one release must agree with
    each other and with this value until PROTOCOL_VERSION changes."""
    assert PROTOCOL_VERSION == 4
    assert compat_hash(LAYOUT) == "b5a5300b835806e53fb84c383a120da133f79b690d8b14298fc7724ca2f3d78f"


def test_sizes():
    assert LAYOUT.bytes_per_block_layer() == 2 * 4 * 2 * 8 * 2
    assert LAYOUT.bytes_per_block() == 2 * LAYOUT.bytes_per_block_layer()
    assert LAYOUT.bytes_per_layer(3) == 3 * LAYOUT.bytes_per_block_layer()
    assert LAYOUT.cache_shape(5) == (2, 2, 5, 4, 2, 8)
    assert LAYOUT.blocks_for_tokens(9) == 3


def test_mismatch_names_the_field():
    with pytest.raises(HandshakeError, match="'head_dim'"):
        check_compatible(LAYOUT, dataclasses.replace(LAYOUT, head_dim=16))
    rx = get_backend("fake").Receiver(LAYOUT)
    with pytest.raises(HandshakeError, match="'dtype'"):
        rx.handshake(dataclasses.replace(LAYOUT, dtype="bfloat16"))
    with pytest.raises(ValueError, match="num_layers"):
        KVLayout("m", "float16", 0, 1, 1, 1)


def test_metadata_version_and_hash_checked_on_connect():
    backend = get_backend("fake")
    rx = backend.Receiver(LAYOUT)
    rx.allocate_cache(4)
    desc = rx.prepare("r", [0])
    old = dataclasses.replace(desc, meta=dataclasses.replace(desc.meta, protocol_version=PROTOCOL_VERSION + 1))
    with pytest.raises(HandshakeError, match="protocol_version"):
        backend.Sender(LAYOUT).connect(old)
    with pytest.raises(HandshakeError, match="'block_size'"):
        backend.Sender(dataclasses.replace(LAYOUT, block_size=8)).connect(desc)
    assert isinstance(pickle.loads(pickle.dumps(desc.meta)), TransferMetadata)
    assert rx.poll("r").status is TransferStatus.PENDING


def test_block_runs_and_copy():
    assert block_runs([0, 1, 2, 7], [3, 4, 9, 10]) == [(0, 3, 2), (2, 9, 1), (7, 10, 1)]
    src = torch.randn(2, 40, 4, 2, 8)
    for dst_ids in ([5, 6, 7], list(range(39, 0, -2))):  # few runs, then many (index path)
        src_ids = list(range(len(dst_ids)))[::-1]
        dst = torch.zeros(2, 40, 4, 2, 8)
        copy_blocks(dst, dst_ids, src, src_ids)
        assert torch.equal(dst[:, dst_ids], src[:, src_ids])
