"""The real SmolLM2: greedy output of the engine equals transformers generate() token for token.

20 chat-templated prompts whose user message is 5..2000 tokens (plus the template's system
prompt and a question), 64 new tokens each, all run as one continuous batch.
"""

import pytest

from engine.sequence import SamplingParams
from tests.conftest import hf_greedy
from tests.prompts import chat_prompts

LENGTHS = [5, 10, 20, 40, 70, 100, 150, 200, 300, 400, 500, 650, 800, 1000, 1200, 1400, 1600, 1800, 1900, 2000]
NEW_TOKENS = 64

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chats(smol):
    return chat_prompts(smol.tokenizer, LENGTHS)


def test_twenty_prompts_identical_to_transformers(smol, chats, make_engine):
    engine = make_engine(smol, num_kv_blocks=4096, max_num_batched_tokens=1024)
    prompt_ids = [engine.validator.tokenize(c) for c in chats]
    assert min(map(len, prompt_ids)) >= 5 and max(map(len, prompt_ids)) >= 2000
    outs = engine.generate(chats, SamplingParams(max_tokens=NEW_TOKENS))
    mismatches = []
    for ids, out in zip(prompt_ids, outs):
        assert out.prompt_token_ids == ids
        ref = hf_greedy(smol, ids, NEW_TOKENS)
        if out.token_ids != ref:
            mismatches.append((len(ids), out.token_ids, ref))
    assert not mismatches, mismatches
    assert all(o.text for o in outs)
