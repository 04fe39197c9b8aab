"""Encoding inside the worker (no encode pool): InProcessEncoder, and the prefill / colocated cores
that hold one. Features equal LLaVA's own; the cache skips repeated images; a bad image fails
its request only, naming the image; a worker without the option never loads the vision side."""

from __future__ import annotations

import pytest
import torch

from decode_workers.colocated_core import ColocatedCore, ColocatedOptions
from decode_workers.decode_core import DecodeCore, DecodeOptions
from encode_workers.inproc import InProcessEncoder
from engine import multimodal
from engine.config import EngineConfig
from engine.errors import InvalidRequestError
from engine.sequence import SamplingParams
from prefill_workers.prefill_core import PrefillCore, PrefillOptions, PrefillTask
from tests.helpers.llava import IMAGE_TOKEN_ID, hf_features, png_bytes

TOKENS_PER_IMAGE = 16


def test_features_match_llava_and_cache_skips_forwards(model_dir, llava):
    enc = InProcessEncoder.from_model_dir(model_dir, max_images_per_batch=2)
    images = [png_bytes(i) for i in range(3)]
    feats, stats = enc.encode(images + [images[0]])  # the same image twice in one call
    pixels = multimodal.ImageProcessor.from_config(llava.config)(images)
    ref = hf_features(llava, pixels)
    for got, want in zip(feats, [*ref, ref[0]]):
        torch.testing.assert_close(got, want)
    assert (stats.images, stats.cache_hits, stats.forwards) == (4, 0, 2)  # 3 distinct images, 2 per forward
    assert enc.calls == 2
    again, stats2 = enc.encode(images[1:])
    assert stats2.cache_hits == 2 and stats2.forwards == 0 and enc.calls == 2
    assert all(torch.equal(a, b) for a, b in zip(again, feats[1:3]))
    assert enc.cache_stats().nbytes <= enc.cache_stats().max_bytes


def test_bad_image_is_named_and_nothing_is_encoded(model_dir):
    enc = InProcessEncoder.from_model_dir(model_dir)
    with pytest.raises(InvalidRequestError, match=r"image 1 \(5 bytes\) could not be decoded"):
        enc.encode([png_bytes(1), b"nope!"])
    assert enc.calls == 0


def engine_config(model_dir) -> EngineConfig:
    return EngineConfig(model=model_dir, block_size=8, num_kv_blocks=64, max_num_batched_tokens=512, max_num_seqs=4)


def test_prefill_core_encodes_only_when_told(model_dir):
    from engine.llm_engine import LoadedModel

    loaded = LoadedModel.load(model_dir)
    cfg = engine_config(model_dir)
    assert PrefillCore(PrefillOptions(cfg, backend="fake"), loaded).image_encoder is None
    assert ColocatedCore(ColocatedOptions(cfg), loaded).image_encoder is None
    core = PrefillCore(PrefillOptions(cfg, backend="fake", image_encoder_dir=model_dir), loaded)
    assert core.image_encoder is not None


def test_prefill_core_batch_with_a_bad_image_fails_that_request_only(model_dir):
    """Two tasks in one batch: the good one gets its first token (equal to the colocated engine's),
    the one with a bad image fails naming the image; no block is left held."""
    from engine.llm_engine import LLMEngine, LoadedModel

    loaded = LoadedModel.load(model_dir)
    cfg = engine_config(model_dir)
    decode = DecodeCore(DecodeOptions(cfg, backend="fake"), loaded)
    prefill = PrefillCore(PrefillOptions(cfg, backend="fake", image_encoder_dir=model_dir), loaded)
    sampling = SamplingParams(max_tokens=1)
    ids = multimodal.expand_image_tokens([5, IMAGE_TOKEN_ID, 7, 8], IMAGE_TOKEN_ID, 1, TOKENS_PER_IMAGE)
    good, bad = png_bytes(11), b"\x89PNG truncated"
    tasks = [
        PrefillTask(rid, tuple(ids), sampling, decode.reserve(rid, len(ids)), images=(img,))
        for rid, img in (("good", good), ("bad", bad))
    ]
    prefill.queue.extend(tasks)
    batch = prefill.take_batch()
    assert len(batch) == 2
    res = {r.request_id: r for r in prefill.run_batch(batch)}
    assert (
        res["bad"].first_token is None and "image 0" in res["bad"].error and "could not be decoded" in res["bad"].error
    )
    assert res["good"].error is None and res["good"].encode_s > 0 and res["bad"].encode_s > 0
    assert prefill.blocks.all_free()

    engine = LLMEngine(cfg, loaded)
    enc = InProcessEncoder.from_model_dir(model_dir)
    engine.add_request(ids, sampling, "ref", image_features=enc.encode([good])[0])
    ref = []
    while engine.has_unfinished():
        ref += [o for o in engine.step() if o.request_id == "ref"]
    assert res["good"].first_token == ref[-1].new_token_ids[-1]
    decode.cancel("good")
    decode.cancel("bad")


def test_colocated_core_encodes_images(model_dir):
    from engine.llm_engine import LoadedModel

    loaded = LoadedModel.load(model_dir)
    cfg = engine_config(model_dir)
    core = ColocatedCore(ColocatedOptions(cfg, image_encoder_dir=model_dir), loaded)
    ids = [5, IMAGE_TOKEN_ID, 7, 8]
    with pytest.raises(InvalidRequestError, match="image 0"):
        core.submit("bad", ids, SamplingParams(max_tokens=2), [b"not an image"])
    core.submit("ok", ids, SamplingParams(max_tokens=2), [png_bytes(2)])
    outs = []
    while core.engine.has_unfinished():
        outs += core.engine.step()
    assert outs[-1].finished and core.image_encoder.calls == 1
    assert core.engine.blocks.all_free()
