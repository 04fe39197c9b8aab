"""Disaggregated serving with sparse prefill: a FlexPrefill prefill pool answers a ~2K-token needle
prompt (bench/ruler.py) as dense prefill does, and leaves no KV block or segment held.

dense_below=512 makes the prompt take the sparse path; the dense answer comes
from the colocated engine (dense prefill) in this process. (Sparse quality at 4K-16K is measured
by bench/sparse_quality.py and bench/ruler.py; this test is about the pool's wiring.)
"""

import pytest

from bench.ruler import make_tasks, score
from cluster.config import parse_config
from cluster.controller import start_router
from cluster.router_api import GenerateInput
from engine.sequence import SamplingParams
from tests.helpers.router import LoopThread, assert_no_leaks, run_all

pytestmark = pytest.mark.slow

LENGTH = 2048
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def needle_tasks(smol):
    # A magic-number needle in natural text near the start (depth 10%), far from the recent window
    # that any sparse pattern keeps. Depths 10-90% at 4K-16K: bench/ruler.py.
    return make_tasks(smol.tokenizer, LENGTH, ("needle",), 5)[:1]


@pytest.fixture(scope="module")
def sparse_cluster():
    loop = LoopThread()
    config = parse_config(
        {
            "version": 1,
            "ray": {"num_cpus": 3},
            "pools": {"prefill": {"sparse": {"method": "flexprefill", "dense_below": 512}}},
        },
        "test_sparse_e2e",
    )
    router = loop.run(start_router(config))
    yield loop, router
    loop.run(router.shutdown())
    loop.close()


def test_sparse_prefill_answers_like_dense(sparse_cluster, needle_tasks, smol, make_engine):
    loop, router = sparse_cluster
    # The prompts queue on one prefill worker: a generous deadline for a loaded CI machine.
    requests = [
        GenerateInput(f"needle-{i}", SamplingParams(max_tokens=NEW_TOKENS), token_ids=t.prompt_ids, deadline_s=600.0)
        for i, t in enumerate(needle_tasks)
    ]
    results = loop.run(run_all(router, requests))
    assert all(r.final.error is None for r in results), [r.final.error for r in results]
    sparse_texts = [smol.tokenizer.decode(r.token_ids, skip_special_tokens=True) for r in results]

    engine = make_engine(smol, max_num_batched_tokens=LENGTH, num_kv_blocks=LENGTH // 16 + 8, max_num_seqs=1)
    dense = engine.generate([list(t.prompt_ids) for t in needle_tasks], SamplingParams(max_tokens=NEW_TOKENS))
    dense_texts = [o.text for o in dense]

    assert all(score(t, x) for t, x in zip(needle_tasks, dense_texts)), dense_texts
    assert [score(t, x) for t, x in zip(needle_tasks, sparse_texts)] == [True] * len(needle_tasks), (
        sparse_texts,
        dense_texts,
    )
    assert_no_leaks(loop, router)
