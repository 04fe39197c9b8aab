"""Known model shapes by name, for `--model NAME` when no profile file is given.

Numbers are from the models' published configs. Weights and KV are counted in fp16/bf16 (2 bytes)
except SmolLM2-135M, which the embedded CPU deployment runs in float32 (4 bytes).
"""

from __future__ import annotations

from placement.errors import PlanningError
from placement.profile import ModelShape


def _model(
    name: str,
    layers: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    inter: int,
    vocab: int,
    params: float,
    dtype_bytes: int = 2,
) -> ModelShape:
    head_dim = hidden // heads
    return ModelShape(
        name=name,
        num_layers=layers,
        hidden=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate=inter,
        vocab_size=vocab,
        num_params=int(params),
        bytes_per_param=dtype_bytes,
        kv_bytes_per_token=ModelShape.kv_bytes(layers, kv_heads, head_dim, dtype_bytes),
    )


KNOWN_MODELS: dict[str, ModelShape] = {
    m.name.lower(): m
    for m in (
        _model("SmolLM2-135M", 30, 576, 9, 3, 1536, 49152, 134.5e6, dtype_bytes=4),
        _model("Llama-3-8B", 32, 4096, 32, 8, 14336, 128256, 8.03e9),
        _model("Llama-2-13B", 40, 5120, 40, 40, 13824, 32000, 13.0e9),
        _model("Llama-2-70B", 80, 8192, 64, 8, 28672, 32000, 69.0e9),
        _model("OPT-66B", 64, 9216, 72, 72, 36864, 50272, 66.0e9),
        _model("BLOOM-176B", 70, 14336, 112, 112, 57344, 250880, 176.2e9),
    )
}

_ALIASES = {
    "smollm2": "smollm2-135m",
    "smollm2-135m-instruct": "smollm2-135m",
    "llama3-8b": "llama-3-8b",
    "llama-2-70b-ish": "llama-2-70b",
    "llama2-70b": "llama-2-70b",
    "llama2-13b": "llama-2-13b",
    "opt66b": "opt-66b",
    "bloom-176b": "bloom-176b",
    "bloom176b": "bloom-176b",
}


def model_by_name(name: str) -> ModelShape:
    key = name.lower()
    key = _ALIASES.get(key, key)
    if key not in KNOWN_MODELS:
        known = ", ".join(m.name for m in KNOWN_MODELS.values())
        raise PlanningError(f"unknown model '{name}' (known: {known}; or pass a profile .json file)")
    return KNOWN_MODELS[key]
