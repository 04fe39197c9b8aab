"""The split LLaVA (VisionEncoder + language CausalLM) computes what LlavaForConditionalGeneration does."""

from __future__ import annotations

import io

import pytest
import torch

from engine import multimodal
from engine.errors import InvalidRequestError

IMAGE_TOKEN_ID = 49151          # a plain vocabulary token of the SmolLM2 tokenizer, never in test prompts
VOCAB = 49152                   # len(SmolLM2 tokenizer)


def build_tiny_llava(seed: int = 0, feature_layer=-2, strategy: str = "default"):
    """Tiny seeded LLaVA: CLIP vision (28 px, patch 7 → 16 patches, 3 layers) + 2-layer Llama."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=28, patch_size=7, projection_dim=32, initializer_factor=1.0)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                       tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
                         vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
                         projector_hidden_act="gelu", initializer_range=0.3)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 2
    return model


def png_bytes(seed: int, size=(40, 32), fmt: str = "PNG") -> bytes:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def llava():
    return build_tiny_llava()


def hf_features(llava, pixel_values) -> torch.Tensor:
    with torch.inference_mode():
        out = llava.get_image_features(pixel_values=pixel_values)
    return torch.stack(list(out.pooler_output))


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
