"""The engine on CUDA: a tiny seeded Llama's greedy output equals transformers generate() (fp32),
every tensor of the engine and of its steps lives on the GPU, and with no dtype given it runs
bfloat16. No Ray, no tokenizer files (a stand-in tokenizer); skipped cleanly without CUDA."""

import random

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

from engine.config import EngineConfig  # noqa: E402
from engine.llm_engine import LLMEngine, LoadedModel  # noqa: E402
from engine.sequence import SamplingParams  # noqa: E402
from tests.helpers.devices import off_device, record_steps, resident_tensors  # noqa: E402
from tests.helpers.models import StandInTokenizer, build_tiny_llama, hf_greedy  # noqa: E402

VOCAB = 2048
LENGTHS = [1, 3, 7, 16, 17, 31, 50, 64, 100, 129, 200, 333]
NEW_TOKENS = 24
CUDA0 = torch.device("cuda", 0)


def _loaded(device: str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
    return LoadedModel(build_tiny_llama(VOCAB).to(device, dtype), StandInTokenizer(VOCAB), "tiny-llama")


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(1234)
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in LENGTHS]


def _check_engine(engine: LLMEngine) -> None:
    assert not engine.has_unfinished() and engine.blocks.all_free()
    assert not off_device(resident_tensors(engine), CUDA0)


def test_greedy_parity_with_generate_on_cuda(prompts):
    """The oracle is generate() on the CPU in fp32 (tests/helpers/models.py); the engine runs the
    same seeded weights on the GPU in fp32, all prompts at once in a continuous batch with
    chunked prefill, and must give the same tokens."""
    oracle = _loaded()
    reference = [hf_greedy(oracle, p, NEW_TOKENS) for p in prompts]
    config = EngineConfig(device="cuda", dtype="float32", block_size=8, num_kv_blocks=512, max_num_batched_tokens=128)
    engine = LLMEngine(config, _loaded("cuda"))
    assert engine.placement.device == CUDA0 and engine.runner.kv.dtype == torch.float32
    steps = record_steps(engine)
    outs = engine.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS))
    assert [o.token_ids for o in outs] == reference
    assert not off_device(steps, CUDA0)
    _check_engine(engine)


def test_a_cpu_loaded_model_moves_and_bfloat16_is_the_default(prompts):
    """A model loaded on the CPU is moved to the engine's device; without a dtype the engine
    would load bfloat16 on CUDA (a given model keeps its own dtype). Greedy bf16 output is
    not compared with fp32 generate(): rounding at bf16 flips near-ties."""
    assert EngineConfig(device="cuda").placement().dtype == "bfloat16"
    engine = LLMEngine(EngineConfig(device="cuda", num_kv_blocks=512), _loaded("cpu", torch.bfloat16))
    assert engine.loaded.device == CUDA0 and engine.runner.kv.dtype == torch.bfloat16
    steps = record_steps(engine)
    seeded = SamplingParams(max_tokens=8, temperature=0.7, seed=5, ignore_eos=True)
    outs = engine.generate(prompts[:4], [SamplingParams(max_tokens=8, ignore_eos=True)] * 3 + [seeded])
    assert all(len(o.token_ids) == 8 and all(0 <= t < VOCAB for t in o.token_ids) for o in outs)
    assert not off_device(steps, CUDA0) and any(name.startswith("generator") for name in steps)
    _check_engine(engine)
