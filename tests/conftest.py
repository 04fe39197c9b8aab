"""Shared fixtures: the real model loaded once per session, a tiny seeded Llama, a tiny LLaVA
checkpoint, and a leak check. Plain builders (no fixtures) live in `tests/helpers/`.

Every engine a test builds through `make_engine` is checked after the test: all KV blocks free.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine, LoadedModel
from tests.helpers.llava import build_tiny_llava, save_tiny_llava
from tests.helpers.models import SMOL_LENGTHS, SMOL_NEW_TOKENS, build_tiny_llama, hf_greedy
from tests.helpers.traces import AZURE_CONV


@pytest.fixture(scope="session")
def smol() -> LoadedModel:
    """The real SmolLM2-135M-Instruct, loaded once for the whole session."""
    return LoadedModel.load(None)


@pytest.fixture(scope="session")
def smol_tokenizer(smol):
    return smol.tokenizer


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
            f"KV leak: {engine.blocks.num_used_blocks} of {engine.blocks.num_total_blocks} blocks still held"
        )


@pytest.fixture(scope="session")
def smol_chats(smol):
    """20 chat prompts whose user message is 5..2000 tokens (see tests/prompts.py)."""
    from tests.prompts import chat_prompts

    return chat_prompts(smol.tokenizer, SMOL_LENGTHS)


@pytest.fixture(scope="session")
def smol_prompt_ids(smol, smol_chats):
    return [
        list(smol.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False))
        for c in smol_chats
    ]


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


@pytest.fixture(scope="module")
def llava():
    """A tiny seeded LLaVA (tests/helpers/llava.py), one per test module. A module that needs
    another seed or feature layer defines its own `llava`, which takes precedence."""
    return build_tiny_llava(seed=3)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, llava):
    """`llava` saved with the SmolLM2 tokenizer: a checkpoint directory a worker loads."""
    return save_tiny_llava(llava, tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def azure():
    """(fit, held out): the first 400 requests of the Azure conversation trace (lengths scaled to
    at most 4096 tokens), split in halves; the planner tests search on it."""
    from placement import trace as tr

    reqs = tr.scale_lengths(tr.slice_trace(tr.load_trace(AZURE_CONV), 0, 400), 1.0, 4096)
    return tr.split(reqs, 0.5)
