"""Language models for tests: a tiny seeded Llama, and the oracle every engine path must match
(transformers `generate()`, greedy, one request at a time)."""

from __future__ import annotations

import torch

# The real-model prompt set: 20 chat prompts whose user message is 5..2000 tokens, each continued
# greedily for SMOL_NEW_TOKENS tokens (the `smol_*` fixtures in tests/conftest.py).
SMOL_LENGTHS = [5, 10, 20, 40, 70, 100, 150, 200, 300, 400, 500, 650, 800, 1000, 1200, 1400, 1600, 1800, 1900, 2000]
SMOL_NEW_TOKENS = 24


def tiny_llama_config(vocab_size: int, layers: int = 2):
    """The tiny Llama of the tests (hidden 64, 4 heads, 2 KV heads), also LLaVA's language side."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.3,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=False,
    )


def build_tiny_llama(vocab_size: int, seed: int = 0, layers: int = 2):
    """A seeded tiny Llama (tiny_llama_config); the same seed gives the same weights."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size, layers)).eval()
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 2
    return model


def hf_greedy(loaded, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """The oracle: transformers generate() with plain SDPA attention, one request at a time.
    `loaded` is an engine LoadedModel; its attention setting is restored afterwards."""
    model = loaded.model
    saved = model.config._attn_implementation
    model.config._attn_implementation = "sdpa"
    eos = sorted(loaded.eos_token_ids)
    try:
        with torch.inference_mode():
            ids = torch.tensor([prompt_ids])
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos[0],
            )
    finally:
        model.config._attn_implementation = saved
    return out[0, len(prompt_ids) :].tolist()


class StandInTokenizer:
    """What the engine asks of a tokenizer for token-id prompts (a size, an EOS id, decode), for
    machines without the SmolLM2 tokenizer files (the GPU tests)."""

    eos_token_id = 2

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return self.vocab_size

    def decode(self, ids, skip_special_tokens=True) -> str:
        return "".join(f" {i}" for i in ids)
