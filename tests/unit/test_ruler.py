"""bench/ruler.py: exact prompt lengths, the answer placed at its depth, scoring."""

import pytest

from bench.ruler import DEPTHS, KINDS, make_tasks, score


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from engine import model_loader

    return AutoTokenizer.from_pretrained(model_loader.local_dir(model_loader.resolve(None)))


@pytest.mark.parametrize("length", [1024, 4096])
def test_exact_lengths_and_answers_in_context(tokenizer, length):
    tasks = make_tasks(tokenizer, length, KINDS, count=2)
    assert [t.kind for t in tasks] == [k for k in KINDS for _ in range(2)]
    for t in tasks:
        assert t.length == length
        text = tokenizer.decode(t.prompt_ids)
        assert text.startswith("<|im_start|>system") and "<|im_start|>assistant\n" in text
        for answer in t.answers:
            assert answer in text


def test_needle_depth_and_determinism(tokenizer):
    tasks = make_tasks(tokenizer, 2048, ("passkey",), count=len(DEPTHS))
    assert tasks == make_tasks(tokenizer, 2048, ("passkey",), count=len(DEPTHS))
    positions = []
    for t in tasks:
        text = tokenizer.decode(t.prompt_ids)
        positions.append(text.index(f"The pass key is {t.answers[0]}") / len(text))
    assert positions == sorted(positions)
    assert all(abs(p - d) < 0.1 for p, d in zip(positions, DEPTHS))


def test_cwe_top_word_is_most_common(tokenizer):
    import collections
    import re

    t = make_tasks(tokenizer, 2048, ("cwe",), count=1)[0]
    words = re.findall(r"^\d+\. (\w+)$", tokenizer.decode(t.prompt_ids), re.M)
    (top, n), (_, second) = collections.Counter(words).most_common(2)
    assert top == t.answers[0] and n > 2 * second


def test_score_is_substring_match_of_all_answers(tokenizer):
    t = make_tasks(tokenizer, 1024, ("vartrack",), count=1)[0]
    assert score(t, " ".join(t.answers).lower() + " and more")
    assert not score(t, " ".join(t.answers[:-1]))
