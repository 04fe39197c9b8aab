"""WorkerActor between encode and prefill (a LLaVA model, both halves loaded once): the encode
role sends the same features as a plain encode worker, a switch to prefill and back reloads
nothing, every call is fenced by role and epoch, and a worker without the vision tower refuses
the encode role. A plain encode worker is the same actor holding only the vision tower."""

from __future__ import annotations

import asyncio

import pytest
import torch

from cluster.worker_actor import RoleSwitchError, StaleEpochError, WorkerActor
from engine.worker_api import Role
from decode_workers.decode_core import DecodeOptions
from encode_workers.encoder import ImageEncoder
from encode_workers.transfer import EncodeShard, prepare_image_receive, receive_image_features
from encode_workers.worker import EncodeOptions
from engine import multimodal
from engine.config import EngineConfig
from engine.llm_engine import LoadedModel
from engine.sequence import SamplingParams
from engine.kv_layout import KVLayout
from kv_transfer.registry import get_backend
from prefill_workers.prefill_core import PrefillOptions, PrefillTask
from tests.helpers.llava import hf_features, png_bytes

LAYOUT = KVLayout("tiny-llava", "float32", num_layers=2, num_kv_heads=2, head_dim=16, block_size=8)


def options(model_dir, encode: bool = True) -> dict:
    cfg = EngineConfig(model=model_dir, block_size=8, num_kv_blocks=64, max_num_batched_tokens=256, max_num_seqs=4)
    opts = {Role.PREFILL: PrefillOptions(cfg, backend="fake"), Role.DECODE: DecodeOptions(cfg, backend="fake")}
    if encode:
        opts[Role.ENCODE] = EncodeOptions(model_dir, backend="fake")
    return opts


async def encode(worker: WorkerActor, rid: str, images: list[bytes], spec, epoch: int) -> list[torch.Tensor]:
    rx = get_backend("fake").Receiver(LAYOUT)
    try:
        plan = [EncodeShard(f"{rid}/encode.0", tuple(range(len(images))))]
        (desc,) = prepare_image_receive(rx, plan, spec)
        await worker.encode(plan[0].transfer_id, images, desc, epoch=epoch)
        return receive_image_features(rx, plan, timeout=10)
    finally:
        rx.close()


@pytest.fixture
def loads(monkeypatch) -> list[tuple[str, str]]:
    """Every weight load from here on: ("language", path) or ("vision", path)."""
    seen: list[tuple[str, str]] = []
    load_language, load_vision = LoadedModel.load.__func__, ImageEncoder.from_model_dir.__func__

    def language(cls, model=None, *args, **kwargs):
        seen.append(("language", model))
        return load_language(cls, model, *args, **kwargs)

    def vision(cls, model_dir, *args, **kwargs):
        seen.append(("vision", model_dir))
        return load_vision(cls, model_dir, *args, **kwargs)

    monkeypatch.setattr(LoadedModel, "load", classmethod(language))
    monkeypatch.setattr(ImageEncoder, "from_model_dir", classmethod(vision))
    return seen


def test_encode_to_prefill_and_back_without_reloading(model_dir, llava, loads):
    spec = multimodal.ImageFeatureSpec.from_config(llava.config)
    images = [png_bytes(1), png_bytes(2)]
    want = hf_features(llava, multimodal.ImageProcessor.from_config(llava.config)(images))

    async def scenario():
        w = WorkerActor("e0", model_dir, options(model_dir), 1, Role.ENCODE)
        assert sorted(loads) == [("language", model_dir), ("vision", model_dir)]  # both halves, once
        assert set(await w.roles()) == {Role.ENCODE, Role.PREFILL, Role.DECODE}
        ready = await w.ready()  # encode role: no KV cache, no layout
        assert ready.info.role == "encode" and ready.layout is None
        first = await encode(w, "r1", images, spec, epoch=0)
        with pytest.raises(StaleEpochError, match="encode worker, the call needs prefill"):
            await w.prefill(PrefillTask("x", (1, 2, 3), SamplingParams(max_tokens=2), None), epoch=0)
        with pytest.raises(StaleEpochError, match="epoch 0, the call was for epoch 3"):
            await encode(w, "r-stale", images, spec, epoch=3)
        assert await w.idle()
        ready, _ = await w.set_role(Role.PREFILL, 1)
        assert ready.info.role == "prefill" and ready.layout is not None and (await w.ready()) == ready
        with pytest.raises(StaleEpochError, match="prefill worker, the call needs encode"):
            await encode(w, "r2", images, spec, epoch=1)
        await w.set_role(Role.ENCODE, 2)
        second = await encode(w, "r3", images, spec, epoch=2)
        assert len(loads) == 2  # nothing loaded again by the switches
        await w.stop()
        return first, second

    first, second = asyncio.run(scenario())
    for a, b, ref in zip(first, second, want):
        torch.testing.assert_close(a, ref)
        assert torch.equal(a, b)


def test_a_plain_encode_worker_loads_only_the_vision_tower(model_dir, llava, loads):
    """The encode pool without role switching: the same actor, options for the encode role alone."""
    spec = multimodal.ImageFeatureSpec.from_config(llava.config)
    images = [png_bytes(4)]

    async def scenario():
        w = WorkerActor("e1", model_dir, {Role.ENCODE: EncodeOptions(model_dir, backend="fake")}, 1, Role.ENCODE)
        assert loads == [("vision", model_dir)] and await w.roles() == (Role.ENCODE,)
        assert (await w.ready()).layout is None
        got = await encode(w, "r1", images, spec, epoch=0)
        status = await w.status()
        assert (status.role, status.alive, status.running, status.kv_blocks_total) == (Role.ENCODE, True, 0, 0)
        assert (await w.stats())["images_encoded"] == 1
        with pytest.raises(RoleSwitchError, match="cannot take role prefill"):
            await w.set_role(Role.PREFILL, 1)
        await w.stop()
        return got

    torch.testing.assert_close(
        asyncio.run(scenario())[0], hf_features(llava, multimodal.ImageProcessor.from_config(llava.config)(images))[0]
    )


def test_a_worker_without_the_vision_tower_refuses_the_encode_role(model_dir, loads):
    async def scenario():
        w = WorkerActor("p0", model_dir, options(model_dir, encode=False), 1, Role.PREFILL)
        assert loads == [("language", model_dir)] and Role.ENCODE not in await w.roles()
        with pytest.raises(RoleSwitchError, match="cannot take role encode"):
            await w.set_role(Role.ENCODE, 1)
        assert w.role is Role.PREFILL and w.epoch == 0
        await w.stop()

    asyncio.run(scenario())
    opts = options(model_dir)
    with pytest.raises(ValueError, match="switches only to prefill"):
        WorkerActor("e", model_dir, {Role.ENCODE: opts[Role.ENCODE], Role.DECODE: opts[Role.DECODE]}, 1, Role.ENCODE)


def test_in_process_vision_side_is_loaded_once_and_kept(model_dir, llava, loads):
    """No encode pool: the prefill role encodes its own images. A decode worker that switches to
    prefill loads the vision side then (not at start), and keeps it: decode -> prefill -> decode
    -> prefill loads it once, and the prefill role encodes with the same tensors and cache."""
    opts = options(model_dir, encode=False)
    opts[Role.PREFILL] = PrefillOptions(opts[Role.PREFILL].engine, backend="fake", image_encoder_dir=model_dir)

    async def scenario():
        w = WorkerActor("d0", model_dir, opts, 1, Role.DECODE)
        assert loads == [("language", model_dir)]  # a decode role needs no vision
        await w.set_role(Role.PREFILL, 1)
        first = w.impl.core.image_encoder
        first.encode([png_bytes(3)])
        await w.set_role(Role.DECODE, 2)
        await w.set_role(Role.PREFILL, 3)
        second = w.impl.core.image_encoder
        hits = second.encode([png_bytes(3)])[1].cache_hits
        await w.stop()
        return first, second, hits

    first, second, hits = asyncio.run(scenario())
    assert loads == [("language", model_dir), ("vision", model_dir)]  # vision once, on the first switch to prefill
    assert first is second
    assert hits == 1  # its embedding cache survived the switches too
