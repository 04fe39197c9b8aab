"""Encode service in one process: cache, cross-request batching, and features sent over kv_transfer."""

from __future__ import annotations

import asyncio

import pytest
import torch

from encode_workers.encoder import ImageEncoder
from encode_workers.parallel import plan_shards
from encode_workers.service import EncodeService
from encode_workers.transfer import EncodeShard, prepare_image_receive, receive_image_features
from engine import multimodal
from engine.errors import InvalidRequestError
from kv_transfer import segment
from kv_transfer.base import TransferStatus
from engine.kv_layout import KVLayout
from kv_transfer.registry import get_backend
from tests.helpers.llava import build_tiny_llava, png_bytes

LAYOUT = KVLayout("tiny-llava", "float32", num_layers=2, num_kv_heads=2, head_dim=16, block_size=8)


@pytest.fixture(scope="module")
def llava():
    return build_tiny_llava(seed=5)


def make_encoder(llava) -> ImageEncoder:
    vision, _ = multimodal.split_llava(llava)
    return ImageEncoder(vision, multimodal.ImageProcessor.from_config(llava.config), "tiny-llava")


def local_features(llava, images) -> list[torch.Tensor]:
    enc = make_encoder(llava)
    return [enc.forward(enc.preprocess(b, i)[None])[0] for i, b in enumerate(images)]


@pytest.fixture(params=["fake", "shm"])
def setup(request, llava):
    rx = get_backend(request.param).Receiver(LAYOUT)
    service = EncodeService(make_encoder(llava), backend=request.param, cache_bytes=1 << 20)
    spec = multimodal.ImageFeatureSpec.from_config(llava.config)
    yield rx, service, spec
    service.close()
    rx.close()
    assert segment.list_segments() == []


def encode_one(rx, service, spec, rid, images):
    plan = [EncodeShard(f"{rid}/encode.0", tuple(range(len(images))))]
    (desc,) = prepare_image_receive(rx, plan, spec)
    stats = asyncio.run(service.encode(plan[0].transfer_id, images, desc))
    return receive_image_features(rx, plan, timeout=10), stats


def test_features_arrive_and_repeat_is_a_cache_hit(setup, llava):
    rx, service, spec = setup
    images = [png_bytes(i) for i in range(3)]
    feats, stats = encode_one(rx, service, spec, "r1", images)
    for got, ref in zip(feats, local_features(llava, images)):
        torch.testing.assert_close(got, ref)  # batched vs single-image forward: same math
    assert (stats.num_images, stats.cache_hits) == (3, 0) and service.encoder.calls == 1
    again, stats2 = encode_one(rx, service, spec, "r2", [images[2], images[0]])
    assert stats2.cache_hits == 2 and stats2.encode_s == 0.0 and service.encoder.calls == 1
    assert torch.equal(again[0], feats[2]) and torch.equal(again[1], feats[0])


def test_concurrent_requests_share_one_forward(setup):
    rx, service, spec = setup
    a, b = [png_bytes(10), png_bytes(11)], [png_bytes(12), png_bytes(10)]  # image 10 in both
    plans = [[EncodeShard("a/encode.0", (0, 1))], [EncodeShard("b/encode.0", (0, 1))]]
    descs = [prepare_image_receive(rx, p, spec)[0] for p in plans]

    async def both():
        return await asyncio.gather(
            service.encode("a/encode.0", a, descs[0]), service.encode("b/encode.0", b, descs[1])
        )

    asyncio.run(both())
    assert service.encoder.calls == 1 and service.batcher.batch_sizes == [3]  # deduplicated, batched
    fa, fb = (receive_image_features(rx, p, timeout=10) for p in plans)
    assert torch.equal(fa[0], fb[1])


def test_batch_budget_splits_forwards(llava):
    service = EncodeService(make_encoder(llava), backend="fake", max_images_per_batch=2)
    rx = get_backend("fake").Receiver(LAYOUT)
    spec = multimodal.ImageFeatureSpec.from_config(llava.config)
    feats, _ = encode_one(rx, service, spec, "r", [png_bytes(20 + i) for i in range(5)])
    assert len(feats) == 5 and service.batcher.batch_sizes == [2, 2, 1] and service.encoder.calls == 3


def test_bad_image_fails_the_request_and_cancels_the_transfer(setup):
    rx, service, spec = setup
    plan = [EncodeShard("bad/encode.0", (0, 1))]
    (desc,) = prepare_image_receive(rx, plan, spec)
    with pytest.raises(InvalidRequestError, match="image 1"):
        asyncio.run(service.encode("bad/encode.0", [png_bytes(1), b"garbage"], desc))
    assert rx.poll("bad/encode.0").status is TransferStatus.CANCELLED
    assert service.encoder.calls == 0
    rx.release("bad/encode.0")


def test_wrong_backend_is_refused(llava):
    service = EncodeService(make_encoder(llava), backend="shm")
    rx = get_backend("fake").Receiver(LAYOUT)
    (desc,) = prepare_image_receive(rx, [EncodeShard("x", (0,))], multimodal.ImageFeatureSpec.from_config(llava.config))
    with pytest.raises(ValueError, match="transport 'fake'"):
        asyncio.run(service.encode("x", [png_bytes(0)], desc))
    service.close()


def test_plan_shards_is_balanced_deterministic_and_complete():
    images = [png_bytes(i) for i in range(7)]
    plan = plan_shards("r", images, 3)
    assert plan == plan_shards("r", images, 3)
    assert sorted(i for _, s in plan for i in s.image_indices) == list(range(7))
    assert max(len(s.image_indices) for _, s in plan) == 3
    assert all(s.transfer_id == f"r/encode.{w}" for w, s in plan)
    assert plan_shards("r", images[:1], 4)[0][1].image_indices == (0,)
    with pytest.raises(ValueError):
        plan_shards("r", images, 0)
