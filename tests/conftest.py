"""Shared fixtures: the real model loaded once per session, a tiny seeded Llama, and a leak check.

Every engine a test builds through `make_engine` is checked after the test: all KV blocks free.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine, LoadedModel


@pytest.fixture(scope="session")
def smol() -> LoadedModel:
    """The real SmolLM2-135M-Instruct, loaded once for the whole session."""
    return LoadedModel.load(None)


@pytest.fixture(scope="session")
def smol_tokenizer(smol):
    return smol.tokenizer


def build_tiny_llama(vocab_size: int, seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 2
    return model


@pytest.fixture(scope="session")
def tiny(smol_tokenizer) -> LoadedModel:
    """A seeded 2-layer Llama (hidden 64, 4 heads, 2 KV heads) with the SmolLM2 tokenizer."""
    return LoadedModel(build_tiny_llama(len(smol_tokenizer)), smol_tokenizer, "tiny-llama")


@pytest.fixture
def make_engine():
    """Build engines for a test; after it, every engine's KV blocks must all be free (leak check)."""
    engines: list[LLMEngine] = []

    def make(loaded: LoadedModel, **kwargs) -> LLMEngine:
        engine = LLMEngine(EngineConfig(**kwargs), loaded)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        assert not engine.has_unfinished(), "requests left in the engine after the test"
        assert engine.blocks.all_free(), (
            f"KV leak: {engine.blocks.num_used_blocks} of {engine.blocks.num_total_blocks} blocks still held")


def hf_greedy(loaded: LoadedModel, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """The oracle: transformers generate() with plain SDPA attention, one request at a time."""
    model = loaded.model
    saved = model.config._attn_implementation
    model.config._attn_implementation = "sdpa"
    try:
        with torch.inference_mode():
            out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=sorted(loaded.eos_token_ids), pad_token_id=sorted(loaded.eos_token_ids)[0])
    finally:
        model.config._attn_implementation = saved
    return out[0, len(prompt_ids):].tolist()


# The real-model oracle, computed once per session and shared by the engine and cluster tests.
SMOL_LENGTHS = [5, 10, 20, 40, 70, 100, 150, 200, 300, 400, 500, 650, 800, 1000, 1200, 1400, 1600, 1800, 1900, 2000]
SMOL_NEW_TOKENS = 64


@pytest.fixture(scope="session")
def smol_chats(smol):
    """20 chat prompts whose user message is 5..2000 tokens (see tests/prompts.py)."""
    from tests.prompts import chat_prompts

    return chat_prompts(smol.tokenizer, SMOL_LENGTHS)


@pytest.fixture(scope="session")
def smol_prompt_ids(smol, smol_chats):
    return [list(smol.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False))
            for c in smol_chats]


@pytest.fixture(scope="session")
def smol_reference(smol, smol_prompt_ids):
    """transformers generate() greedy continuations of the 20 prompts, one at a time."""
    return [hf_greedy(smol, ids, SMOL_NEW_TOKENS) for ids in smol_prompt_ids]


@pytest.fixture(scope="session")
def smol_colocated(smol, smol_chats):
    """The colocated engine's greedy continuations of the 20 prompts, as one continuous batch."""
    from engine.sequence import SamplingParams

    engine = LLMEngine(EngineConfig(num_kv_blocks=4096, max_num_batched_tokens=1024), smol)
    outs = engine.generate(smol_chats, SamplingParams(max_tokens=SMOL_NEW_TOKENS))
    assert engine.blocks.all_free()
    return [o.token_ids for o in outs]
