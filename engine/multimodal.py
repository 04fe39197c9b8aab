"""LLaVA-style vision-language models split into an encode side and a language side.

    LlavaForConditionalGeneration                     Triptych
    ─────────────────────────────                     ────────
    model.vision_tower ─┐                             VisionEncoder   (encode workers)
    model.multi_modal_projector ─┘                      pixels [N, 3, S, S] → features [N, T, H]
    model.language_model + lm_head                    language CausalLM (prefill / decode / colocated)
                                                        `.model` takes inputs_embeds, `.lm_head`

The two halves share no state: an encode worker loads only the vision tower and projector
weights, a language worker only the decoder and head (`load_vision_encoder` /
`load_language_model` read just their own tensors from the checkpoint's safetensors).

Prompt side, exactly as transformers does it: each image token in the prompt is expanded into
T placeholders (`expand_image_tokens`), the prompt is embedded, and the placeholder rows are
replaced by the image features in order (`merge_image_features`, a masked_scatter). The colocated
engine feeds those embeddings for prompt rows and plain token embeddings for everything after
(`packed_inputs_embeds`), so chunked prefill and preemption slice them like token ids.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engine.errors import InvalidRequestError, ModelNotFoundError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ------------------------------------------------------------------------------------ encode side
class VisionEncoder(nn.Module):
    """Vision tower + multi-modal projector: pixel values → image features.

    Same math as `LlavaModel.get_image_features` for fixed-size images: hidden states of
    `vision_feature_layer` (one int, or a list concatenated on the last dim), CLS dropped when the
    strategy is "default", then the projector.
    """

    def __init__(self, config, vision_tower: nn.Module | None = None, projector: nn.Module | None = None) -> None:
        super().__init__()
        from transformers import AutoModel
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        self.config = config  # the full LlavaConfig
        self.vision_tower = vision_tower if vision_tower is not None else AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = projector if projector is not None else LlavaMultiModalProjector(config)
        self.feature_layer = config.vision_feature_layer
        self.select_strategy = config.vision_feature_select_strategy
        self.num_image_tokens = num_image_tokens(config)
        self.hidden_size = config.text_config.hidden_size

    @property
    def dtype(self) -> torch.dtype:
        return self.multi_modal_projector.linear_1.weight.dtype

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, 3, S, S] → features [N, num_image_tokens, text hidden]."""
        out = self.vision_tower(pixel_values.to(self.dtype), output_hidden_states=True, return_dict=True)
        layers = [self.feature_layer] if isinstance(self.feature_layer, int) else list(self.feature_layer)
        pool = [out.hidden_states[i] for i in layers]
        if self.select_strategy == "default":
            pool = [h[:, 1:] for h in pool]
        return self.multi_modal_projector(torch.cat(pool, dim=-1))


def num_image_tokens(config) -> int:
    """Placeholders per image: patches, plus CLS unless the "default" strategy drops it."""
    vc = config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2 + 1
    return n - 1 if config.vision_feature_select_strategy == "default" else n


@dataclass(frozen=True)
class ImageFeatureSpec:
    """What one image's features look like on the wire: [num_tokens, hidden_size] of dtype."""

    num_tokens: int
    hidden_size: int
    dtype: torch.dtype

    @classmethod
    def from_config(cls, config, dtype: torch.dtype = torch.float32) -> "ImageFeatureSpec":
        return cls(num_image_tokens(config), config.text_config.hidden_size, dtype)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_tokens, self.hidden_size)

    @property
    def nbytes(self) -> int:
        return self.num_tokens * self.hidden_size * self.dtype.itemsize


class ImageProcessor:
    """Image bytes (PNG, JPEG, anything PIL reads) → CLIP pixel values [N, 3, S, S].

    CLIPImageProcessor's steps without a hub: RGB, resize the shortest edge to S (bicubic),
    center-crop S x S, scale to [0, 1], normalize with the CLIP mean / std.
    """

    def __init__(self, image_size: int, mean=CLIP_MEAN, std=CLIP_STD) -> None:
        self.image_size = image_size
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    @classmethod
    def from_config(cls, config, model_dir: str | Path | None = None) -> "ImageProcessor":
        """Take mean / std from the checkpoint's preprocessor_config.json when there is one."""
        mean, std = CLIP_MEAN, CLIP_STD
        pre = Path(model_dir) / "preprocessor_config.json" if model_dir else None
        if pre is not None and pre.exists():
            data = json.loads(pre.read_text())
            mean, std = data.get("image_mean", mean), data.get("image_std", std)
        return cls(config.vision_config.image_size, mean, std)

    def decode(self, data: bytes, index: int = 0):
        return decode_image(data, index)

    def pixel_values(self, img) -> torch.Tensor:
        from PIL import Image

        s = self.image_size
        w, h = img.size
        scale = s / min(w, h)
        nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - s) // 2, (nh - s) // 2
        img = img.crop((left, top, left + s, top + s))
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(s, s, 3)
        x = x.permute(2, 0, 1).float().div_(255.0)
        return (x - self.mean) / self.std

    def __call__(self, images: list[bytes]) -> torch.Tensor:
        """[N, 3, S, S] float32; InvalidRequestError names the first image that fails."""
        return torch.stack([self.pixel_values(self.decode(b, i)) for i, b in enumerate(images)])


def decode_image(data: bytes, index: int = 0, max_pixels: int | None = None):
    """Image bytes → RGB PIL image; InvalidRequestError names the image by its index. With
    max_pixels, an image larger than that (width x height, read from its header) is refused
    before its pixels are decoded (a small file can claim a huge image)."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(data, (bytes, bytearray, memoryview)) or not data:
        raise InvalidRequestError(f"image {index}: expected non-empty image bytes, got {type(data).__name__}")
    try:
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:  # the header claims far more pixels than PIL allows
            raise InvalidRequestError(
                f"image {index} claims more pixels than the limit of {max_pixels or 'PIL'} "
                f"(server.limits.max_image_pixels)"
            ) from None
        width, height = img.size
        if max_pixels is not None and width * height > max_pixels:
            raise InvalidRequestError(
                f"image {index} is {width}x{height} pixels; the limit is {max_pixels} "
                f"pixels (server.limits.max_image_pixels)"
            )
        img.load()
        return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        if isinstance(e, InvalidRequestError):
            raise
        kind = "not an image this server can read" if isinstance(e, UnidentifiedImageError) else "a damaged image"
        raise InvalidRequestError(f"image {index} ({len(data)} bytes) could not be decoded: {kind}") from None


# ------------------------------------------------------------------------------------ prompt side
def expand_image_tokens(
    prompt_ids: list[int], image_token_id: int, num_images: int, tokens_per_image: int
) -> list[int]:
    """Each image token becomes `tokens_per_image` of them, as LlavaProcessor does.

    A prompt already expanded (num_images * tokens_per_image image tokens) is returned as is.
    """
    count = sum(1 for t in prompt_ids if t == image_token_id)
    if count == num_images * tokens_per_image:
        return list(prompt_ids)
    if count != num_images:
        raise InvalidRequestError(
            f"prompt has {count} image tokens (id {image_token_id}) but {num_images} images were given"
        )
    out: list[int] = []
    for t in prompt_ids:
        out.extend([t] * tokens_per_image if t == image_token_id else [t])
    return out


def merge_image_features(
    embed_tokens: nn.Module, prompt_ids: list[int], image_token_id: int, features: list[torch.Tensor]
) -> torch.Tensor:
    """inputs_embeds [L, H] on the embedding's device: token embeddings with image-token rows
    replaced by the features in order (features may arrive on any device)."""
    weight = embed_tokens.weight  # [vocab, H]
    feats = torch.cat([f.reshape(-1, weight.shape[-1]) for f in features]).to(weight.device, weight.dtype)
    placeholders = sum(1 for t in prompt_ids if t == image_token_id)  # counted on the host: no device sync
    if placeholders != feats.shape[0]:
        raise InvalidRequestError(
            f"prompt has {placeholders} image placeholder tokens but the images give {feats.shape[0]} feature rows"
        )
    ids = torch.tensor(prompt_ids, dtype=torch.long, device=weight.device)
    with torch.inference_mode():
        embeds = embed_tokens(ids)
    return embeds.masked_scatter((ids == image_token_id)[:, None], feats)


def prompt_with_images(
    language_model: nn.Module, image_token_id: int | None, prompt_ids: list[int], features: list[torch.Tensor]
) -> tuple[list[int], torch.Tensor]:
    """(expanded prompt ids, inputs_embeds [L, H]) for a prompt with one image token per image."""
    if image_token_id is None:
        raise InvalidRequestError("this model takes no images (it has no image token)")
    sizes = {tuple(f.shape[-2:]) for f in features}
    if len(sizes) != 1:
        raise InvalidRequestError(f"image features must all have one shape [tokens, hidden], got {sorted(sizes)}")
    ids = expand_image_tokens(prompt_ids, image_token_id, len(features), features[0].shape[-2])
    return ids, merge_image_features(language_model.get_input_embeddings(), ids, image_token_id, features)


def packed_inputs_embeds(batch, prompt_embeds: dict[str, torch.Tensor], embed_tokens: nn.Module) -> torch.Tensor:
    """inputs_embeds [T, H] for a packed batch (ModelRunner row order).

    Rows of a prompt with stored embeddings come from them; every other row (text prompts,
    generated tokens, tokens recomputed after preemption) is the plain token embedding.
    """
    parts = []
    for entry in batch:
        seq, n = entry.seq, entry.num_new_tokens
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
        stored = prompt_embeds.get(seq.request_id)
        split = start if stored is None else min(max(start, stored.shape[0]), end)
        if split > start:
            parts.append(stored[start:split])
        if end > split:
            with torch.inference_mode():
                ids = torch.tensor(seq.token_ids[split:end], dtype=torch.long, device=embed_tokens.weight.device)
                parts.append(embed_tokens(ids))
    return torch.cat(parts)


# ------------------------------------------------------------------------------------ loading
def split_llava(llava) -> tuple[VisionEncoder, nn.Module]:
    """Split an in-memory LlavaForConditionalGeneration; both halves share its weights."""
    from transformers import AutoModelForCausalLM

    config = llava.config
    encoder = VisionEncoder(config, llava.model.vision_tower, llava.model.multi_modal_projector).eval()
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config.text_config)
    lm.model = llava.model.language_model
    lm.lm_head = llava.lm_head
    lm.generation_config = llava.generation_config
    return encoder, lm.eval()


_PREFIXES = {  # checkpoint key prefix → (side, prefix inside that side's module); old and v5 layouts
    "vision_tower.": ("vision", "vision_tower."),
    "model.vision_tower.": ("vision", "vision_tower."),
    "multi_modal_projector.": ("vision", "multi_modal_projector."),
    "model.multi_modal_projector.": ("vision", "multi_modal_projector."),
    "language_model.model.": ("language", "model."),
    "model.language_model.": ("language", "model."),
    "language_model.lm_head.": ("language", "lm_head."),
    "lm_head.": ("language", "lm_head."),
}


def is_llava_dir(model_dir: str | Path | None) -> bool:
    """True for a local checkpoint directory whose config.json says model_type "llava"."""
    if not model_dir:
        return False
    config = Path(model_dir).expanduser() / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "llava"
    except (OSError, ValueError):
        return False


def load_llava_config(model_dir: str | Path):
    from transformers import LlavaConfig

    path = Path(model_dir)
    if not (path / "config.json").exists():
        raise ModelNotFoundError(f"model directory {str(path)!r} has no config.json")
    return LlavaConfig.from_pretrained(path, local_files_only=True)


def _read_side(model_dir: Path, side: str) -> dict[str, torch.Tensor]:
    """Only the tensors of one side, read lazily from every *.safetensors file of the checkpoint."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"model directory {str(model_dir)!r} has no *.safetensors files")
    out = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                for prefix in sorted(_PREFIXES, key=len, reverse=True):
                    if key.startswith(prefix):
                        if _PREFIXES[prefix][0] == side:
                            out[_PREFIXES[prefix][1] + key[len(prefix) :]] = f.get_tensor(key)
                        break
    return out


def _load_into(module: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype, where: str) -> nn.Module:
    missing, unexpected = module.load_state_dict(state, strict=False)
    # Non-persistent buffers (position ids, rotary frequencies) are rebuilt by the constructor.
    if missing or unexpected:
        raise ModelNotFoundError(
            f"{where}: checkpoint does not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return module.to(dtype).eval()


def load_vision_encoder(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> VisionEncoder:
    """The encode side of a local LLaVA checkpoint: vision tower + projector weights only."""
    path = Path(model_dir)
    config = load_llava_config(path)
    return _load_into(VisionEncoder(config), _read_side(path, "vision"), dtype, str(path))


def load_language_model(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The language side of a local LLaVA checkpoint: a CausalLM over the text config."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    path = Path(model_dir)
    config = load_llava_config(path)
    state = _read_side(path, "language")
    if "lm_head.weight" not in state and config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    lm = _load_into(AutoModelForCausalLM.from_config(config.text_config), state, dtype, str(path))
    if (path / "generation_config.json").exists():
        lm.generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
    return lm


def load_llava_language(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """An engine `LoadedModel` for the language side of a local LLaVA checkpoint (+ its tokenizer)."""
    from transformers import AutoTokenizer

    from engine.llm_engine import LoadedModel  # the engine imports this module

    path = Path(model_dir)
    config = load_llava_config(path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return LoadedModel(
        load_language_model(path, dtype),
        tokenizer,
        path.name,
        image_token_id=config.image_token_id,
        image_spec=ImageFeatureSpec.from_config(config, dtype),
    )
