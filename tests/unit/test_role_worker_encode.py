"""RoleWorker between encode and prefill (a LLaVA model, both halves loaded once): the encode
role sends the same features as a plain encode worker, a switch to prefill and back reloads
nothing, every call is fenced by role and epoch, and a worker without the vision tower refuses
the encode role."""

from __future__ import annotations

import asyncio

import pytest
import torch

from cluster.role_worker import EncodeOptions, RoleSwitchError, RoleWorker, StaleEpochError
from engine.worker_api import Role
from decode_workers.decode_core import DecodeOptions
from encode_workers.transfer import EncodeShard, prepare_image_receive, receive_image_features
from engine import multimodal
from engine.config import EngineConfig
from engine.sequence import SamplingParams
from engine.kv_layout import KVLayout
from kv_transfer.registry import get_backend
from prefill_workers.prefill_core import PrefillOptions, PrefillTask
from tests.unit.test_encode_inproc import llava, model_dir  # noqa: F401  (fixtures: a tiny LLaVA checkpoint)
from tests.unit.test_multimodal_split import hf_features, png_bytes

LAYOUT = KVLayout("tiny-llava", "float32", num_layers=2, num_kv_heads=2, head_dim=16, block_size=8)


def options(model_dir, encode: bool = True) -> dict:
    cfg = EngineConfig(model=model_dir, block_size=8, num_kv_blocks=64, max_num_batched_tokens=256, max_num_seqs=4)
    opts = {Role.PREFILL: PrefillOptions(cfg, backend="fake"), Role.DECODE: DecodeOptions(cfg, backend="fake")}
    if encode:
        opts[Role.ENCODE] = EncodeOptions(model_dir, backend="fake")
    return opts


async def encode(worker: RoleWorker, rid: str, images: list[bytes], spec, epoch: int) -> list[torch.Tensor]:
    rx = get_backend("fake").Receiver(LAYOUT)
    try:
        plan = [EncodeShard(f"{rid}/encode.0", tuple(range(len(images))))]
        (desc,) = prepare_image_receive(rx, plan, spec)
        await worker.encode(plan[0].transfer_id, images, desc, epoch=epoch)
        return receive_image_features(rx, plan, timeout=10)
    finally:
        rx.close()


def test_encode_to_prefill_and_back_without_reloading(model_dir, llava):
    spec = multimodal.ImageFeatureSpec.from_config(llava.config)
    images = [png_bytes(1), png_bytes(2)]
    want = hf_features(llava, multimodal.ImageProcessor.from_config(llava.config)(images))

    async def scenario():
        w = RoleWorker("e0", model_dir, options(model_dir), 1, Role.ENCODE)
        assert set(await w.roles()) == {Role.ENCODE, Role.PREFILL, Role.DECODE}
        info = await w.ready()                              # encode role: info alone, as an encode worker
        assert info.role == "encode"
        ids = (await w.weights_id(), await w.vision_weights_id())
        first = await encode(w, "r1", images, spec, epoch=0)
        with pytest.raises(StaleEpochError, match="encode worker, the call needs prefill"):
            await w.prefill(PrefillTask("x", (1, 2, 3), SamplingParams(max_tokens=2), None), epoch=0)
        with pytest.raises(StaleEpochError, match="epoch 0, the call was for epoch 3"):
            await encode(w, "r-stale", images, spec, epoch=3)
        assert await w.idle()
        info, layout, _ = await w.set_role(Role.PREFILL, 1)
        assert info.role == "prefill" and layout is not None and (await w.ready())[1] == layout
        with pytest.raises(StaleEpochError, match="prefill worker, the call needs encode"):
            await encode(w, "r2", images, spec, epoch=1)
        await w.set_role(Role.ENCODE, 2)
        second = await encode(w, "r3", images, spec, epoch=2)
        assert (await w.weights_id(), await w.vision_weights_id()) == ids     # same tensors: nothing reloaded
        await w.shutdown()
        return first, second

    first, second = asyncio.run(scenario())
    for a, b, ref in zip(first, second, want):
        torch.testing.assert_close(a, ref)
        assert torch.equal(a, b)


def test_a_worker_without_the_vision_tower_refuses_the_encode_role(model_dir):
    async def scenario():
        w = RoleWorker("p0", model_dir, options(model_dir, encode=False), 1, Role.PREFILL)
        assert await w.vision_weights_id() is None and Role.ENCODE not in await w.roles()
        with pytest.raises(RoleSwitchError, match="cannot take role encode"):
            await w.set_role(Role.ENCODE, 1)
        assert w.role is Role.PREFILL and w.epoch == 0
        await w.shutdown()

    asyncio.run(scenario())
    with pytest.raises(ValueError, match="needs the prefill role"):
        RoleWorker("e", model_dir, {Role.ENCODE: EncodeOptions(model_dir)}, 1, Role.ENCODE)


def test_in_process_vision_side_is_loaded_once_and_kept(model_dir, llava, monkeypatch):
    """No encode pool: the prefill role encodes its own images. A decode worker that switches to
    prefill loads the vision side then (not at start), and keeps it: decode -> prefill -> decode
    -> prefill loads it once, and the prefill role encodes with the same tensors and cache."""
    from encode_workers.inproc import InProcessEncoder

    loads = []
    real = InProcessEncoder.from_model_dir.__func__

    def counting(cls, *a, **kw):
        loads.append(a[0])
        return real(cls, *a, **kw)

    monkeypatch.setattr(InProcessEncoder, "from_model_dir", classmethod(counting))
    opts = options(model_dir, encode=False)
    opts[Role.PREFILL] = PrefillOptions(opts[Role.PREFILL].engine, backend="fake", image_encoder_dir=model_dir)

    async def scenario():
        w = RoleWorker("d0", model_dir, opts, 1, Role.DECODE)
        assert loads == [] and await w.vision_weights_id() is None       # a decode role needs no vision
        await w.set_role(Role.PREFILL, 1)
        first = (await w.vision_weights_id(), w.impl.core.image_encoder)
        first[1].encode([png_bytes(3)])
        await w.set_role(Role.DECODE, 2)
        await w.set_role(Role.PREFILL, 3)
        second = (await w.vision_weights_id(), w.impl.core.image_encoder)
        hits = second[1].encode([png_bytes(3)])[1].cache_hits
        await w.shutdown()
        return first, second, hits

    first, second, hits = asyncio.run(scenario())
    assert loads == [model_dir]                      # loaded once, on the first switch into prefill
    assert first[0] == second[0] and first[1] is second[1]
    assert hits == 1                                 # its embedding cache survived the switches too
