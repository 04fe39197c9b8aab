"""Tensor-parallel tests' model: the tiny seeded Llama as the `tiny` fixture builds it, loadable in
the spawned rank processes of engine.tensor_parallel.run_local_group."""

from __future__ import annotations


def tiny_loaded(seed: int = 0, layers: int = 2):
    """The tests' tiny seeded Llama with the SmolLM2 tokenizer, as the `tiny` fixture builds it."""
    from transformers import AutoTokenizer

    from engine import model_loader
    from engine.llm_engine import LoadedModel
    from tests.helpers.models import build_tiny_llama

    tokenizer = AutoTokenizer.from_pretrained(model_loader.local_dir(model_loader.resolve(None)))
    return LoadedModel(build_tiny_llama(len(tokenizer), seed, layers), tokenizer, "tiny-llama")
