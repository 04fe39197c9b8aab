import pytest
import torch

from engine.detokenizer import Detokenizer
from engine.sampler import Sampler
from engine.sequence import SamplingParams


def test_greedy_and_top_k_one_agree():
    logits = torch.randn(3, 50)
    s = Sampler()
    greedy = s.sample(logits, ["a", "b", "c"], [SamplingParams()] * 3)
    assert greedy == logits.argmax(-1).tolist()
    topk1 = s.sample(logits, ["a", "b", "c"], [SamplingParams(temperature=1.0, top_k=1)] * 3)
    assert topk1 == greedy


def test_tiny_top_p_keeps_only_the_top_token():
    logits = torch.randn(1, 50)
    out = Sampler().sample(logits, ["a"], [SamplingParams(temperature=2.0, top_p=1e-6)])
    assert out == logits.argmax(-1).tolist()


def test_seed_is_reproducible_and_per_request():
    logits = torch.zeros(1, 1000)
    p = SamplingParams(temperature=1.0, seed=7)
    a = [Sampler().sample(logits, ["x"], [p])[0] for _ in range(3)]
    assert len(set(a)) == 1
    s = Sampler()
    seq = [s.sample(logits, ["x"], [p])[0] for _ in range(5)]
    assert len(set(seq)) > 1  # the generator advances within one request


def test_temperature_sampling_follows_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    s = Sampler()
    draws = [s.sample(logits, ["r"], [SamplingParams(temperature=1.0, seed=1)])[0] for _ in range(2000)]
    freq = [draws.count(i) / len(draws) for i in range(3)]
    assert abs(freq[0] - 0.7) < 0.05 and abs(freq[1] - 0.2) < 0.05


class _CharTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_detokenizer_stop_string_and_holdback():
    d = Detokenizer(_CharTokenizer(), ("END",))
    ids, released = [], ""
    for ch in "abcEN":
        ids.append(ord(ch))
        new, stop = d.update(ids)
        released += new
        assert not stop
    assert released == "abc"  # "EN" may still become "END": held back
    ids.append(ord("D"))
    new, stop = d.update(ids)
    assert stop and released + new == "abc" and d.text == "abc"


def test_detokenizer_flush_releases_the_held_tail():
    d = Detokenizer(_CharTokenizer(), ("XYZ",))
    new, _ = d.update([ord("h"), ord("i")])
    assert new == ""
    assert d.flush() == "hi"


def test_resumed_detokenizer_sees_held_text_and_a_spanning_stop_string():
    """A re-prefilled request: its earlier output ("abcEN", of which "abc" was delivered) is the
    prefix. The held "EN" plus the new "D" is the stop string; without the prefix it is missed."""
    d = Detokenizer(_CharTokenizer(), ("END",), prefix_ids=[ord(c) for c in "abcEN"], released=3)
    new, stop = d.update([ord("D"), ord("x")])
    assert stop and new == "" and d.text == "abc"
    fresh = Detokenizer(_CharTokenizer(), ("END",))  # what a resume used to do
    assert fresh.update([ord("D"), ord("x")]) == ("", False)
    # No stop string hit: the held "EN" is delivered after the resume, nothing twice.
    d = Detokenizer(_CharTokenizer(), ("END",), prefix_ids=[ord(c) for c in "abcEN"], released=3)
    out = d.update([ord("d"), ord("y"), ord("z")])[0] + d.flush()
    assert out == "ENdyz"


def test_engine_resume_gives_the_uninterrupted_text(tiny, make_engine):
    """Greedy request cut after k tokens and re-run as prompt + those tokens with `resume`: the
    delivered text joins to the uninterrupted text, with a stop string spanning the cut."""
    from engine.sequence import SamplingParams as SP

    engine = make_engine(tiny, block_size=16, num_kv_blocks=64, max_num_batched_tokens=256, max_num_seqs=4)
    prompt = tiny.tokenizer("The three pools of a serving cluster are")["input_ids"]
    full = engine.generate([prompt], SP(max_tokens=24, ignore_eos=True))[0]
    k = 10
    before = tiny.tokenizer.decode(full.token_ids[:k], skip_special_tokens=True)
    assert full.text.startswith(before) and len(full.text) > len(before) + 3
    stop = full.text[len(before) - 2 : len(before) + 3]  # spans the cut
    assert len(stop) == 5 and full.text.find(stop) == len(before) - 2
    want = engine.generate([prompt], SP(max_tokens=24, ignore_eos=True, stop=(stop,)))[0].text
    # The first k tokens as a worker delivered them (the tail that may start the stop string held).
    sent = before[: len(before) - (len(stop) - 1)]
    rest = SP(max_tokens=24 - k, ignore_eos=True, stop=(stop,))
    rid = engine.add_request(prompt + full.token_ids[:k], rest, "resumed", resume=(k, len(sent)))
    text = sent
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == rid:
                text += out.new_text
    assert text == want and len(want) == len(before) - 2
    from engine.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="does not fit a prompt"):
        engine.add_request(prompt, rest, "bad-resume", resume=(len(prompt) + 1, 0))
    assert not engine.has_unfinished()  # nothing registered (make_engine checks blocks)


def test_incremental_detokenizer_gives_the_whole_decodes_text(smol_tokenizer):
    """The fast path (each token decoded once) releases what re-decoding all output ids releases:
    the same text in all, the same stop, never ahead of it and at most two tokens behind (text
    before a character split over tokens may wait for the character); multi-byte characters,
    special tokens, stop strings and a resumed prefix included."""
    tok = smol_tokenizer
    gen = torch.Generator().manual_seed(0)
    texts = ["Hello, wörld! ünïcödé 日本語 — 🙂🚀 test . , ok\n\tend", "a" * 40 + " STOP here", "🙂" * 9]
    outputs = [tok.encode(t) for t in texts]
    outputs += [torch.randint(0, len(tok), (300,), generator=gen).tolist() for _ in range(3)]  # any ids
    outputs.append(tok.encode("x") + [tok.eos_token_id] + tok.encode(" after the special token"))
    for ids in outputs:
        for stop, prefix in [((), 0), (("STOP", "🚀"), 0), (("ok",), 5)]:
            released = len(Detokenizer(tok, (), incremental=False).update(ids[:prefix])[0]) if prefix else 0
            fast = Detokenizer(tok, stop, ids[:prefix], released)
            slow = Detokenizer(tok, stop, ids[:prefix], released, incremental=False)
            assert fast._stream is not None and slow._stream is None
            got, wants = "", [""]
            for n in range(prefix + 1, len(ids) + 1):
                (a, a_stop), (b, b_stop) = fast.update(ids[prefix:n]), slow.update(ids[prefix:n])
                got = got + a
                wants.append(wants[-1] + b)
                assert a_stop == b_stop and wants[-1].startswith(got), (ids[:n], stop)
                assert len(got) >= len(wants[-3 if len(wants) > 2 else 0]), (ids[:n], stop)
                if a_stop:
                    break
            want = wants[-1]
            assert got + fast.flush() == want + slow.flush() and fast.text == slow.text


# ------------------------------------------------------------------------------------ logprobs
def test_logprobs_are_the_raw_log_softmax_with_the_top_k():
    logits = torch.randn(4, 50)
    logits[2, 7] = float("-inf")  # a token the model rules out
    params = [
        SamplingParams(logprobs=3),
        SamplingParams(),  # did not ask
        SamplingParams(temperature=0.7, top_k=5, seed=3, logprobs=0),  # sampled, not greedy: raw logprobs still
        SamplingParams(logprobs=5),
    ]
    s = Sampler(token_text=lambda t: f"t{t}")
    tokens = s.sample(logits, ["a", "b", "c", "d"], params)
    ref = torch.log_softmax(logits, dim=-1)
    assert s.take_logprob("b") is None
    for rid, row, k in (("a", 0, 3), ("c", 2, 0), ("d", 3, 5)):
        lp = s.take_logprob(rid)
        assert lp.token_id == tokens[row] and lp.token == f"t{tokens[row]}"
        assert lp.logprob == pytest.approx(ref[row, tokens[row]].item(), abs=1e-6)
        top = ref[row].topk(k)
        assert [t for t, _, _ in lp.top] == top.indices.tolist() and len(lp.top) == k
        assert [v for _, _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-6)
        assert s.take_logprob(rid) is None  # taken once
    # minus infinity is reported as the floor (JSON has no infinity)
    s.sample(logits[2:3, :10], ["e"], [SamplingParams(logprobs=10)])
    assert s.take_logprob("e").top[-1] == (7, "t7", -9999.0)


def test_a_nan_row_gets_no_logprobs_and_fails_alone():
    from engine.sampler import RowFailure

    logits = torch.randn(2, 20)
    logits[0, 3] = float("nan")
    s = Sampler()
    out = s.sample(logits, ["bad", "good"], [SamplingParams(logprobs=2)] * 2)
    assert isinstance(out[0], RowFailure) and s.take_logprob("bad") is None
    assert s.take_logprob("good").token_id == out[1]


@pytest.mark.parametrize("value", [-1, 21, 2.0, True, "3"])
def test_logprobs_out_of_range_are_refused(value):
    from engine.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match=r"logprobs must be an integer in \[0, 20\]"):
        SamplingParams(logprobs=value)


def test_engine_logprobs_match_transformers_over_chunked_batches(tiny, make_engine):
    """Three prompts in one continuous batch, prefill chunked: every token's log-probability and
    top 4 are the log-softmax of transformers' logits for the same sequence."""
    engine = make_engine(tiny, block_size=8, num_kv_blocks=64, max_num_batched_tokens=24, max_num_seqs=4)
    prompts = [tiny.tokenizer(t)["input_ids"] for t in ("The sea is", "Three pools serve a model", "Hi")]
    params = [SamplingParams(max_tokens=6, ignore_eos=True, logprobs=4)] * 2 + [
        SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.9, seed=11, logprobs=4)
    ]
    rids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    got: dict[str, list] = {r: [] for r in rids}
    tokens: dict[str, list] = {r: [] for r in rids}
    while engine.has_unfinished():
        for out in engine.step():
            assert len(out.logprobs) == len(out.new_token_ids)
            got[out.request_id].extend(out.logprobs)
            tokens[out.request_id].extend(out.new_token_ids)
    for rid, prompt in zip(rids, prompts):
        assert [lp.token_id for lp in got[rid]] == tokens[rid] and len(tokens[rid]) == 6
        with torch.no_grad():
            logits = tiny.model(torch.tensor([prompt + tokens[rid]])).logits[0].float()
        ref = torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : -1]
        for pos, lp in enumerate(got[rid]):
            assert lp.logprob == pytest.approx(ref[pos, lp.token_id].item(), abs=1e-4)
            assert lp.token == tiny.tokenizer.decode([lp.token_id])
            assert [v for _, _, v in lp.top] == pytest.approx(ref[pos].topk(4).values.tolist(), abs=1e-4)
            assert all(ref[pos, t].item() == pytest.approx(v, abs=1e-4) for t, _, v in lp.top)
