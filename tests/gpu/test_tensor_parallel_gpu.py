"""Tensor parallelism over NCCL (engine/tensor_parallel.py): the tiny seeded Llama (4 heads, 2 KV
heads) sharded over 2 GPUs, one process per rank, gives the same greedy tokens as transformers
generate() on the CPU in fp32, and each rank's KV cache (its own KV head) stays on its GPU. No
Ray; skipped without 2 GPUs."""

import random

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
]

from engine.config import EngineConfig  # noqa: E402
from engine.sequence import SamplingParams  # noqa: E402
from engine.tensor_parallel import run_local_group  # noqa: E402
from tests.helpers.models import StandInTokenizer, build_tiny_llama, hf_greedy  # noqa: E402

VOCAB = 2048
LENGTHS = [3, 9, 17, 30, 47, 64, 100, 161]
NEW_TOKENS = 24
CONFIG = EngineConfig(
    device="cuda", dtype="float32", block_size=8, num_kv_blocks=256, max_num_batched_tokens=128, tensor_parallel=2
)


def _rank(tp):
    from engine.llm_engine import LLMEngine, LoadedModel, follower

    loaded = LoadedModel(build_tiny_llama(VOCAB), StandInTokenizer(VOCAB), "tiny-llama")
    if not tp.is_driver:
        return follower(CONFIG, loaded.placed_on(tp.device), tp)
    rng = random.Random(1234)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in LENGTHS]
    reference = [hf_greedy(loaded, p, NEW_TOKENS) for p in prompts]  # CPU, fp32, whole model
    engine = LLMEngine(CONFIG, loaded.placed_on(tp.device), tp=tp)
    outs = engine.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    cache = (str(engine.runner.kv.device), engine.runner.kv.shape[4])
    engine.close()
    return reference, [list(o.token_ids) for o in outs], cache, engine.blocks.all_free()


def test_tp2_over_nccl_is_token_identical():
    reference, tokens, cache, free = run_local_group(_rank, 2, device="cuda")
    assert tokens == reference
    assert cache == ("cuda:0", 1) and free
