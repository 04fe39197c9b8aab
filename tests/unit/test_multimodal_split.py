"""The split LLaVA (VisionEncoder + language CausalLM) computes what LlavaForConditionalGeneration does."""

from __future__ import annotations

import io

import pytest
import torch

from engine import multimodal
from engine.errors import InvalidRequestError
from tests.helpers.llava import IMAGE_TOKEN_ID, build_tiny_llava, hf_features, png_bytes


@pytest.fixture(scope="module")
def llava():
    """Seed 0 (the shared `llava` fixture uses seed 3)."""
    return build_tiny_llava()


@pytest.mark.parametrize("layer,strategy", [(-2, "default"), (-1, "full"), ([-3, -1], "default")])
def test_vision_encoder_matches_llava(layer, strategy):
    llava = build_tiny_llava(seed=1, feature_layer=layer, strategy=strategy)
    encoder, _ = multimodal.split_llava(llava)
    pixels = torch.randn(3, 3, 28, 28)
    ours = encoder(pixels)
    assert ours.shape == (3, multimodal.num_image_tokens(llava.config), 64)
    assert ours.shape[1] == (16 if strategy == "default" else 17)
    torch.testing.assert_close(ours, hf_features(llava, pixels), rtol=0, atol=0)


def test_language_side_is_a_causal_lm_over_the_text_config(llava):
    _, lm = multimodal.split_llava(llava)
    assert lm.config is llava.config.text_config
    assert lm.model is llava.model.language_model and lm.lm_head is llava.lm_head
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        ref = llava(input_ids=ids).logits
        ours = lm.lm_head(lm.model(inputs_embeds=lm.model.embed_tokens(ids)).last_hidden_state)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_merge_equals_llava_forward(llava):
    encoder, lm = multimodal.split_llava(llava)
    pixels = torch.randn(2, 3, 28, 28)
    ids = multimodal.expand_image_tokens([1, 9, IMAGE_TOKEN_ID, 10, IMAGE_TOKEN_ID, 11], IMAGE_TOKEN_ID, 2, 16)
    assert len(ids) == 4 + 32
    embeds = multimodal.merge_image_features(lm.model.embed_tokens, ids, IMAGE_TOKEN_ID, list(encoder(pixels)))
    with torch.inference_mode():
        ref = llava(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0]
        ours = lm.lm_head(lm.model(inputs_embeds=embeds[None]).last_hidden_state)[0]
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_expand_image_tokens_errors_and_idempotence():
    ids = [1, IMAGE_TOKEN_ID, 2]
    once = multimodal.expand_image_tokens(ids, IMAGE_TOKEN_ID, 1, 4)
    assert once == [1] + [IMAGE_TOKEN_ID] * 4 + [2]
    assert multimodal.expand_image_tokens(once, IMAGE_TOKEN_ID, 1, 4) == once
    with pytest.raises(InvalidRequestError, match="2 images"):
        multimodal.expand_image_tokens(ids, IMAGE_TOKEN_ID, 2, 4)


def test_load_each_side_from_a_local_checkpoint(llava, tmp_path):
    llava.save_pretrained(tmp_path)
    encoder = multimodal.load_vision_encoder(tmp_path)
    lm = multimodal.load_language_model(tmp_path)
    assert not any(n.startswith("model.") or "language" in n for n, _ in encoder.named_parameters())
    assert not any("vision" in n or "projector" in n for n, _ in lm.named_parameters())
    pixels = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(encoder(pixels), hf_features(llava, pixels), rtol=0, atol=0)
    ids = torch.tensor([[3, 4, 5]])
    with torch.inference_mode():
        torch.testing.assert_close(lm(input_ids=ids).logits, llava(input_ids=ids).logits, rtol=0, atol=0)


# ------------------------------------------------------------------------------------ processor
def test_processor_shapes_and_normalisation():
    proc = multimodal.ImageProcessor(28)
    pv = proc([png_bytes(0), png_bytes(1, size=(20, 50), fmt="JPEG")])
    assert pv.shape == (2, 3, 28, 28) and pv.dtype == torch.float32
    white = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (30, 30), (255, 255, 255)).save(white, format="PNG")
    pw = proc([white.getvalue()])[0]
    expected = (1 - torch.tensor(multimodal.CLIP_MEAN)) / torch.tensor(multimodal.CLIP_STD)
    torch.testing.assert_close(pw[:, 5, 5], expected)


def test_processor_close_to_clip_image_processor():
    from transformers import CLIPImageProcessor

    ref = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    from PIL import Image

    data = png_bytes(3, size=(64, 48))
    theirs = ref(images=[Image.open(io.BytesIO(data))], return_tensors="pt").pixel_values
    ours = multimodal.ImageProcessor(28)([data])
    assert (ours - theirs).abs().mean() < 0.1  # different bicubic kernels; same pipeline


@pytest.mark.parametrize("bad", [b"", b"not an image at all", png_bytes(0)[:40]])
def test_processor_bad_bytes_name_the_image(bad):
    proc = multimodal.ImageProcessor(28)
    with pytest.raises(InvalidRequestError, match=r"image 1\b"):
        proc([png_bytes(0), bad])
