"""Bad input to the offline API raises a clear error naming the problem, and leaves no state."""

import pytest

from engine.config import EngineConfig
from engine.errors import InvalidRequestError, ModelNotFoundError, OutOfKVCacheError
from engine.llm_engine import LLMEngine
from engine.sequence import GREEDY_TEMPERATURE, SamplingParams


def test_empty_prompt(tiny, make_engine):
    engine = make_engine(tiny)
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        engine.generate([""])
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        engine.generate([[]])


def test_prompt_longer_than_context(tiny, make_engine):
    engine = make_engine(tiny)  # tiny model context: 1024
    with pytest.raises(InvalidRequestError, match=r"prompt has 1500 tokens; the model's context is 1024"):
        engine.generate([[5] * 1500])


def test_prompt_larger_than_kv_cache(tiny, make_engine):
    engine = make_engine(tiny, block_size=4, num_kv_blocks=10)
    with pytest.raises(OutOfKVCacheError, match="KV cache holds only 40"):
        engine.generate([[5] * 100])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_tokens": 0}, "max_tokens must be a positive integer, got 0"),
        ({"max_tokens": -3}, "max_tokens must be a positive integer, got -3"),
        ({"temperature": -0.5}, r"temperature must be in \[0, 100\], got -0.5"),
        ({"temperature": float("nan")}, "temperature must be a finite number, got nan"),
        ({"temperature": float("inf")}, "temperature must be a finite number, got inf"),
        ({"temperature": 1e9}, r"temperature must be in \[0, 100\], got 1000000000.0"),
        ({"temperature": True}, "temperature must be a finite number, got True"),
        ({"temperature": "0.7"}, "temperature must be a finite number, got '0.7'"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
        ({"top_p": float("nan")}, "top_p must be a finite number, got nan"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
        ({"top_k": -1}, r"top_k must be an integer in \[0, 2147483647\], got -1"),
        ({"top_k": 2**40}, r"top_k must be an integer in \[0, 2147483647\], got 1099511627776"),
        ({"seed": 2**70}, r"seed must be an integer in \[0, 2\*\*64 - 1\], got 1180591620717411303424"),
        ({"seed": -1}, r"seed must be an integer in \[0, 2\*\*64 - 1\], got -1"),
        ({"seed": 1.5}, r"seed must be an integer in \[0, 2\*\*64 - 1\], got 1.5"),
        ({"stop": [""]}, "stop strings must be non-empty"),
        ({"stop": [3]}, "stop must be a string or a list of strings"),
        ({"ignore_eos": "yes"}, "ignore_eos must be true or false, got 'yes'"),
    ],
)
def test_bad_sampling(kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(**kwargs)


def test_tiny_temperature_is_greedy():
    # Dividing logits by 1e-37 overflows float32 and leaves nothing to sample: below the
    # documented epsilon a temperature is greedy.
    assert SamplingParams(temperature=1e-37).greedy and SamplingParams(temperature=0.0).greedy
    assert SamplingParams(temperature=GREEDY_TEMPERATURE / 2).greedy
    assert not SamplingParams(temperature=GREEDY_TEMPERATURE).greedy
    assert SamplingParams(seed=2**64 - 1).seed == 2**64 - 1


def test_bad_token_ids(tiny, make_engine):
    engine = make_engine(tiny)
    with pytest.raises(InvalidRequestError, match="token ids must be integers"):
        engine.generate([[1, 2, 10**9]])


def test_unknown_model_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        LLMEngine(EngineConfig(model=str(tmp_path / "no-such-model")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        LLMEngine(EngineConfig(model=str(tmp_path / "empty")))


def test_bad_batch_leaves_no_state(tiny, make_engine):
    engine = make_engine(tiny)
    with pytest.raises(InvalidRequestError):
        engine.generate([[5, 6, 7], ""])
    assert not engine.has_unfinished()
    assert engine.generate([[5, 6, 7]], SamplingParams(max_tokens=2))[0].token_ids


def test_bad_engine_config():
    with pytest.raises(Exception, match="block_size must be a positive integer"):
        EngineConfig(block_size=0)


def test_request_that_could_outgrow_the_cache(tiny, make_engine):
    engine = make_engine(tiny, block_size=4, num_kv_blocks=10)
    with pytest.raises(OutOfKVCacheError, match="plus max_tokens 30 can reach 50 tokens; the KV cache holds only 40"):
        engine.generate([[5] * 20], SamplingParams(max_tokens=30))
