"""Prefill and decode pools of different tensor parallelism on a local Ray: the real SmolLM2 (9 heads,
3 KV heads) served as `triptych serve` serves a YAML with prefill `tensor_parallel: 3` (three rank
actors, each computing and sending its own KV head) and decode `tensor_parallel: 1` answers 5 chat
prompts through the SDK token-identically to transformers generate(); each pool sees one worker;
nothing stays held, and after shutdown no shared-memory segment is left."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from cluster.config import load_config
from cluster.serve import start_serving, stop_serving
from tests.helpers.router import LoopThread, assert_no_leaks, assert_no_segments

pytestmark = pytest.mark.slow

PREFILL_TP = 3
NEW_TOKENS = 24  # greedy: the first tokens of the reference's SMOL_NEW_TOKENS

YAML = f"""
version: 1
mode: disaggregated
ray: {{num_cpus: {PREFILL_TP + 1}}}
server: {{grpc_port: 0, http_port: 0, admin_port: 0}}
transport: {{backend: shm}}
pools:
  prefill: {{workers: 1, num_cpus: {PREFILL_TP}, tensor_parallel: {PREFILL_TP}}}
  decode: {{workers: 1, num_cpus: 1, tensor_parallel: 1}}
"""


def test_prefill_tp3_decode_tp1_serves_token_identical_answers(tmp_path, smol_chats, smol_reference):
    import ray

    from triptych import Client

    path = tmp_path / "p3d1.yaml"
    path.write_text(YAML)
    loop = LoopThread()
    router, running = loop.run(start_serving(load_config(path), progress=lambda *_: None))
    try:
        assert [w.worker_id for w in router.prefill] == ["prefill-0"]  # three ranks, one worker
        assert [w.worker_id for w in router.decode] == ["decode-0"]
        ranks = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "-rank" in a["name"]]
        assert len(ranks) == PREFILL_TP - 1 and all("prefill-0" in r for r in ranks)
        with Client(f"{running.connect_host}:{running.grpc_port}") as client, ThreadPoolExecutor(5) as pool:
            answers = list(
                pool.map(lambda c: client.complete(messages=c, max_tokens=NEW_TOKENS, temperature=0), smol_chats[:5])
            )
        assert all(not a.error for a in answers), [a.error for a in answers]
        assert [list(a.token_ids) for a in answers] == [ref[:NEW_TOKENS] for ref in smol_reference[:5]]
        assert_no_leaks(loop, router)
    finally:
        loop.run(stop_serving(router, running, progress=lambda *_: None))
        loop.close()
    assert_no_segments()
