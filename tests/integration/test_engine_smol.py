"""The real SmolLM2: greedy output of the engine equals transformers generate() token for token.

20 chat-templated prompts whose user message is 5..2000 tokens (plus the template's system
prompt and a question), SMOL_NEW_TOKENS (24) new tokens each, all run as one continuous batch.
"""

import pytest

pytestmark = pytest.mark.slow


def test_twenty_prompts_identical_to_transformers(smol_prompt_ids, smol_colocated, smol_reference):
    assert min(map(len, smol_prompt_ids)) >= 5 and max(map(len, smol_prompt_ids)) >= 2000
    mismatches = [
        (len(ids), got, ref) for ids, got, ref in zip(smol_prompt_ids, smol_colocated, smol_reference) if got != ref
    ]
    assert not mismatches, mismatches
