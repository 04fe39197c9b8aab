"""Role switching and re-prefill on a real local cluster serving SmolLM2 (1 prefill + 2 decode).

switch decode-1 -> prefill through the admin RPC while requests stream: every request
  finishes with the reference tokens; decode-1 serves prefill at epoch 1 with the same weights
  in memory; a call for its old epoch is refused; status and /metrics show the switch
`triptych admin set-role` moves it back; refusals (last worker of a pool, unknown worker)
  are clear errors and change nothing
re-prefill (opt-in): the decode worker of a streaming request is killed; the request goes on
  elsewhere and ends with exactly the reference's greedy tokens
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import httpx
import pytest

from cluster.config import parse_config
from cluster.router_api import TokenEvent
from engine.worker_api import Role
from cluster.serve import start_serving, stop_serving
from engine.sequence import FinishReason, SamplingParams
from cluster.router_api import GenerateInput
from tests.helpers.models import hf_greedy
from tests.helpers.router import LoopThread, assert_no_leaks, collect
from triptych import Client
from triptych.errors import FailedPrecondition, InvalidArgument

pytestmark = pytest.mark.slow
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def served():
    loop = LoopThread()
    config = parse_config(
        {
            "version": 1,
            "ray": {"num_cpus": 3},
            "engine": {"num_kv_blocks": 512, "max_num_seqs": 16},
            "pools": {"prefill": {"workers": 1}, "decode": {"workers": 2}},
            "server": {"grpc_port": 0, "http_port": 0, "admin_port": 0},
        },
        "test_role_switch",
    )
    router, running = loop.run(start_serving(config, progress=lambda *_: None))
    target = running.admin_target  # role switching and status are admin calls, on the admin port
    client = Client(target)
    yield loop, router, running, client, target
    client.close()
    loop.run(stop_serving(router, running, progress=lambda *_: None))
    loop.close()


@pytest.fixture(scope="module")
def reference(smol_reference):
    """transformers generate() greedy continuations of the 8 shortest test prompts, cut at
    MAX_TOKENS (greedy: the first tokens of a longer generation)."""
    return [ids[:MAX_TOKENS] for ids in smol_reference[:8]]


async def _all(router, reqs):
    return await asyncio.gather(*(collect(router, r) for r in reqs))


def _requests(prompt_ids, n, tag, max_tokens=MAX_TOKENS):
    return [
        GenerateInput(
            f"{tag}-{i}", SamplingParams(max_tokens=max_tokens), token_ids=tuple(prompt_ids[i % len(prompt_ids)])
        )
        for i in range(n)
    ]


def _check(results, reqs, prompt_ids, reference):
    for res, req in zip(results, reqs):
        i = int(req.request_id.rsplit("-", 1)[1]) % len(prompt_ids)
        assert res.final.finish_reason in (FinishReason.STOP, FinishReason.LENGTH), (req.request_id, res.final.error)
        assert res.token_ids == reference[i][: req.sampling.max_tokens], req.request_id


def _weights(actor) -> int:
    """Run inside a worker actor: the address of its first weight tensor (a reload would move it)."""
    return next(actor.loaded.model.parameters()).data_ptr()


def test_switch_under_load_keeps_answers_and_weights(served, smol_prompt_ids, reference):
    import ray

    from cluster.worker_actor import StaleEpochError

    loop, router, running, client, _ = served
    prompts = smol_prompt_ids[:8]
    old = router.find_worker("decode-1")
    epoch, switches = old.epoch, client.admin_status().role_switch_count  # relative: the tests run in any order
    weights = ray.get(old.actor.__ray_call__.remote(_weights))
    reqs = _requests(prompts, 8, "load")

    async def scenario():
        streams = [asyncio.ensure_future(collect(router, r)) for r in reqs]
        await asyncio.sleep(0.5)  # requests are spread over both decode workers
        switch = await asyncio.get_running_loop().run_in_executor(
            None, lambda: client.set_worker_role("decode-1", "prefill", drain_timeout_s=120, timeout=300)
        )
        return switch, await asyncio.gather(*streams)

    switch, results = loop.run(scenario())
    _check(results, reqs, prompts, reference)
    assert (switch.worker_id, switch.from_role.value, switch.to_role.value) == ("decode-1", "decode", "prefill")
    assert switch.epoch == epoch + 1 and switch.reason == "manual" and switch.switch_s > 0 and switch.drain_s >= 0

    new = router.find_worker("decode-1")
    assert new.role is Role.PREFILL and new.epoch == epoch + 1 and new in router.prefill and old not in router.decode
    assert ray.get(new.actor.__ray_call__.remote(_weights)) == weights  # the same weights, not reloaded
    with pytest.raises(StaleEpochError):  # an order for its old role/epoch
        ray.get(old.actor.reserve.remote("stale", 8, 5.0, epoch=epoch))

    # Both prefill workers now take prompts; answers stay the reference's.
    reqs2 = _requests(prompts, 6, "after")
    _check(loop.run(_all(router, reqs2)), reqs2, prompts, reference)

    status = client.admin_status()
    workers = {w.worker_id: w for p in status.pools for w in p.workers}
    assert workers["decode-1"].role.value == "prefill" and workers["decode-1"].epoch == epoch + 1
    assert len(status.pool("prefill").workers) == 2 and len(status.pool("decode").workers) == 1
    assert status.role_switch_count == switches + 1 and status.role_switches[-1].worker_id == "decode-1"
    from tests.helpers.gateway import samples

    metrics = samples(httpx.get(f"http://{running.connect_host}:{running.http_port}/metrics", timeout=30).text)
    assert metrics[("triptych_role_switches_total", ())] == switches + 1
    assert metrics[("triptych_worker_epoch", (("role", "prefill"), ("worker", "decode-1")))] == epoch + 1
    assert_no_leaks(loop, router)


def test_cli_switches_back_and_refusals_are_clear(served, smol_prompt_ids, reference):
    loop, router, running, client, target = served
    if router.find_worker("decode-1").role is not Role.PREFILL:  # run alone: the previous test's switch
        client.set_worker_role("decode-1", "prefill", drain_timeout_s=120, timeout=300)
    epoch, switches = router.find_worker("decode-1").epoch, client.admin_status().role_switch_count
    cli = [sys.executable, "-m", "triptych.cli", "admin"]
    with pytest.raises(InvalidArgument, match="no worker 'decode-9'"):
        client.set_worker_role("decode-9", "prefill")
    with pytest.raises(FailedPrecondition, match="last live decode worker"):
        client.set_worker_role("decode-0", "prefill")

    out = subprocess.run(
        cli + ["set-role", "decode-1", "decode", "--target", target], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert f"decode-1: prefill -> decode (epoch {epoch + 1}" in out.stdout
    refused = subprocess.run(
        cli + ["set-role", "prefill-0", "decode", "--target", target], capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 1 and "last live prefill worker" in refused.stderr
    status = subprocess.run(cli + ["status", "--target", target], capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "prefill -> decode" in status.stdout
    assert f"role switches: {switches + 1}" in status.stdout

    assert [w.worker_id for w in router.decode] == ["decode-0", "decode-1"]
    reqs = _requests(smol_prompt_ids[:4], 4, "back")
    _check(loop.run(_all(router, reqs)), reqs, smol_prompt_ids[:4], reference[:4])
    assert_no_leaks(loop, router)


def test_reprefill_after_decode_death_gives_the_reference(served, smol, smol_prompt_ids):
    import ray

    loop, router, *_ = served
    ids = smol_prompt_ids[8]
    want = hf_greedy(smol, ids, 48)
    assert len(want) >= 24, "the reference must be long enough to kill its decode worker mid-way"
    restarts = dict(router.supervisor.restarts())
    router.reprefill_on_decode_failure = True
    req = GenerateInput("reprefill-0", SamplingParams(max_tokens=48), token_ids=tuple(ids))

    async def scenario():
        tokens, text, final, killed = [], [], None, None
        async for ev in router.generate(req):
            if isinstance(ev, TokenEvent):
                tokens.extend(ev.token_ids)
                text.append(ev.text)
                if killed is None and len(tokens) >= 8:
                    killed = next(w for w in router.decode if w.inflight)
                    ray.kill(killed.actor, no_restart=True)
            else:
                final = ev
        return tokens, "".join(text), final, killed

    try:
        tokens, text, final, killed = loop.run(scenario(), timeout=300)
    finally:
        router.reprefill_on_decode_failure = False
    assert killed is not None and final.finish_reason in (FinishReason.STOP, FinishReason.LENGTH), final.error
    assert tokens == want
    assert text == smol.tokenizer.decode(want, skip_special_tokens=True)  # continuous across the resume
    assert loop.run(router.supervisor.wait_all_alive(120)), "the killed worker was not restarted"
    assert router.supervisor.restarts().get(killed.worker_id) == restarts.get(killed.worker_id, 0) + 1
    assert_no_leaks(loop, router)
