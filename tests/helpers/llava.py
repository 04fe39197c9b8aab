"""Vision-language models for tests: a tiny seeded LLaVA, seeded images, and LLaVA's own image
features (the reference the split encoder must equal)."""

from __future__ import annotations

import io

import torch

from tests.helpers.models import tiny_llama_config

IMAGE_TOKEN_ID = 49151  # a plain vocabulary token of the SmolLM2 tokenizer, never in test prompts
VOCAB = 49152  # len(SmolLM2 tokenizer)


def build_tiny_llava(seed: int = 0, feature_layer=-2, strategy: str = "default"):
    """Tiny seeded LLaVA: CLIP vision (28 px, patch 7 → 16 patches, 3 layers) + the tests' tiny Llama."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=28,
        patch_size=7,
        projection_dim=32,
        initializer_factor=1.0,
    )
    text = tiny_llama_config(VOCAB)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN_ID,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
        initializer_range=0.3,
    )
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 2
    return model


def save_tiny_llava(llava, path) -> str:
    """A checkpoint directory a worker can load: the LLaVA's weights and the SmolLM2 tokenizer."""
    from transformers import AutoTokenizer

    from engine import model_loader

    llava.save_pretrained(path)
    AutoTokenizer.from_pretrained(model_loader.local_dir(model_loader.resolve(None))).save_pretrained(path)
    return str(path)


def png_bytes(seed: int, size=(40, 32), fmt: str = "PNG") -> bytes:
    """A seeded random RGB image of `size` (width, height), encoded as `fmt`."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def hf_features(llava, pixel_values) -> torch.Tensor:
    """LLaVA's own projected image features, [images, tokens per image, text hidden]."""
    with torch.inference_mode():
        out = llava.get_image_features(pixel_values=pixel_values)
    return torch.stack(list(out.pooler_output))
