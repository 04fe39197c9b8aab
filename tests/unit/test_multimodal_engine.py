"""Greedy output of split encoder + colocated engine equals LlavaForConditionalGeneration.generate()."""

from __future__ import annotations

import random

import pytest
import torch

from engine import multimodal
from engine.errors import InvalidRequestError
from engine.llm_engine import LoadedModel
from engine.sequence import SamplingParams
from tests.helpers.llava import IMAGE_TOKEN_ID, build_tiny_llava, png_bytes

NEW_TOKENS = 16
# (text tokens before, [number of images, text tokens after each]) — image tokens unexpanded
SHAPES = [(5, [9]), (0, [3, 4]), (12, [1, 7, 20]), (30, []), (3, [0, 0]), (7, []), (40, [2])]


@pytest.fixture(scope="module")
def llava():
    return build_tiny_llava(seed=3)


@pytest.fixture(scope="module")
def split(llava, smol_tokenizer):
    encoder, lm = multimodal.split_llava(llava)
    return encoder, LoadedModel(lm, smol_tokenizer, "tiny-llava", image_token_id=IMAGE_TOKEN_ID)


@pytest.fixture(scope="module")
def requests(llava):
    """[(prompt ids with one image token per image, image bytes)]"""
    rng = random.Random(7)
    out = []
    for k, (before, afters) in enumerate(SHAPES):
        ids = [rng.randrange(3, 40000) for _ in range(before)]
        for n_after in afters:
            ids += [IMAGE_TOKEN_ID] + [rng.randrange(3, 40000) for _ in range(n_after)]
        out.append((ids, [png_bytes(100 * k + i) for i in range(len(afters))]))
    return out


@pytest.fixture(scope="module")
def reference(llava, split, requests):
    """transformers generate(), one request at a time, the processor's pixels fed to LLaVA itself."""
    proc = multimodal.ImageProcessor.from_config(llava.config)
    eos = sorted(split[1].eos_token_ids)
    text_config = llava.config.text_config
    saved = text_config._attn_implementation
    text_config._attn_implementation = "sdpa"
    outs = []
    try:
        for ids, images in requests:
            full = multimodal.expand_image_tokens(ids, IMAGE_TOKEN_ID, len(images), 16)
            kwargs = {"pixel_values": proc(images)} if images else {}
            with torch.inference_mode():
                out = llava.generate(
                    torch.tensor([full]),
                    attention_mask=torch.ones(1, len(full), dtype=torch.long),
                    max_new_tokens=NEW_TOKENS,
                    do_sample=False,
                    eos_token_id=eos,
                    pad_token_id=eos[0],
                    **kwargs,
                )
            outs.append(out[0, len(full) :].tolist())
    finally:
        text_config._attn_implementation = saved
    return outs


def features_of(encoder, llava, images):
    if not images:
        return None
    return list(encoder(multimodal.ImageProcessor.from_config(llava.config)(images)))


def run(engine, requests, feats):
    ids = [
        engine.add_request(p, SamplingParams(max_tokens=NEW_TOKENS), image_features=f)
        for (p, _), f in zip(requests, feats)
    ]
    tokens = {rid: [] for rid in ids}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    assert not engine._prompt_embeds
    return [tokens[rid] for rid in ids]


def test_reference_has_no_degenerate_outputs(reference):
    assert all(len(set(r)) > 3 for r in reference)  # seeded weights give varied greedy tokens


@pytest.mark.parametrize("index", [0, 1, 2])
def test_single_request_with_images(split, llava, requests, reference, make_engine, index):
    encoder, loaded = split
    engine = make_engine(loaded, block_size=8, num_kv_blocks=64)
    assert run(engine, [requests[index]], [features_of(encoder, llava, requests[index][1])]) == [reference[index]]


@pytest.mark.parametrize("budget,blocks", [(512, 128), (13, 256), (48, 40)])
def test_mixed_continuous_batch(split, llava, requests, reference, make_engine, budget, blocks):
    """Image and text requests in one batch; budget 13 chunks prompts mid-image, 40 blocks of 4 preempt."""
    encoder, loaded = split
    engine = make_engine(
        loaded, block_size=4 if blocks == 40 else 8, num_kv_blocks=blocks, max_num_batched_tokens=budget, max_num_seqs=5
    )
    feats = [features_of(encoder, llava, images) for _, images in requests]
    assert run(engine, requests, feats) == reference
    if blocks == 40:
        assert engine.scheduler.num_preemptions > 0


def test_image_count_mismatch_is_refused(split, llava, requests, make_engine):
    encoder, loaded = split
    engine = make_engine(loaded, block_size=8, num_kv_blocks=64)
    ids, images = requests[1]
    with pytest.raises(InvalidRequestError, match="2 image tokens"):
        engine.add_request(ids, image_features=features_of(encoder, llava, images[:1]))
    assert not engine.has_unfinished() and not engine._prompt_embeds


def test_abort_drops_stored_embeddings(split, llava, requests, make_engine):
    encoder, loaded = split
    engine = make_engine(loaded, block_size=8, num_kv_blocks=64)
    rid = engine.add_request(requests[0][0], image_features=features_of(encoder, llava, requests[0][1]))
    engine.step()
    assert engine.abort(rid) and not engine._prompt_embeds


def test_prefix_caching_never_shares_blocks_between_different_images(split, llava, requests, reference, make_engine):
    """The same token ids with another image first, then with the request's own: its answer is its
    own (prompts with images are not cached); text prompts of the batch do reuse their blocks."""
    encoder, loaded = split
    engine = make_engine(loaded, block_size=8, num_kv_blocks=256, prefix_caching=True)
    ids, images = requests[0]
    others = [png_bytes(999 + i) for i in range(len(images))]
    run(engine, [(ids, others)], [features_of(encoder, llava, others)])
    assert run(engine, [requests[0]], [features_of(encoder, llava, images)]) == [reference[0]]
    feats = [features_of(encoder, llava, im) for _, im in requests]
    assert run(engine, requests, feats) == reference
    assert run(engine, requests, feats) == reference  # again, with the text prompts' blocks cached
    assert engine.blocks.hit_tokens > 0
    engine.blocks.check()


def test_prefix_caching_keys_image_blocks_by_their_content(split, llava, requests, reference, make_engine):
    """With the images' content hashes, blocks holding an image's placeholder tokens are keyed by
    that image: the same token ids with other images share only the text blocks before the first
    image; with the same images, every full block is reused; the answers stay the reference's."""
    from engine.kv_cache import image_hash

    encoder, loaded = split
    engine = make_engine(loaded, block_size=8, num_kv_blocks=256, prefix_caching=True)
    ids, images = requests[2]  # 12 text tokens, then 3 images (16 placeholders each) with text between

    def keyed(imgs):
        engine.add_request(
            ids,
            SamplingParams(max_tokens=NEW_TOKENS),
            image_features=features_of(encoder, llava, imgs),
            image_hashes=[image_hash(b) for b in imgs],
        )
        tokens, cached = [], None
        while engine.has_unfinished():
            for out in engine.step():
                tokens += out.new_token_ids
                cached = out.cached_tokens
        return tokens, cached

    others = [png_bytes(999 + i) for i in range(len(images))]
    assert keyed(others)[1] == 0
    assert keyed(images) == (reference[2], 8)  # block 0 (text) only: block 1 holds image 0's tokens
    full = len(multimodal.expand_image_tokens(ids, IMAGE_TOKEN_ID, len(images), 16))
    assert keyed(images) == (reference[2], (full - 1) // 8 * 8)  # every full block but the last
    # the last image differs: everything up to its first block is reused, nothing after
    swapped = images[:2] + others[2:]
    first_of_last = [
        i for i, t in enumerate(multimodal.expand_image_tokens(ids, IMAGE_TOKEN_ID, 3, 16)) if t == IMAGE_TOKEN_ID
    ][32]
    assert keyed(swapped)[1] == first_of_last // 8 * 8
    engine.blocks.check()
    with pytest.raises(InvalidRequestError, match="2 image hashes for 3 images"):
        engine.add_request(ids, image_features=features_of(encoder, llava, images), image_hashes=[b"x" * 16] * 2)
    assert not engine.has_unfinished() and not engine._prompt_embeds
