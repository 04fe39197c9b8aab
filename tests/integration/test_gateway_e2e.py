"""End to end over real loopback gRPC and HTTP against a real local cluster serving SmolLM2.

Greedy text through the SDK, /v1/chat/completions (httpx and the official openai client) and the
offline engine (no prefix cache) is identical, with the workers' prefix caches on; a
conversation's later turns are prefilled on the decode worker that holds the earlier turns (prompt
and answer) and report those cached tokens; bad input gets the right status and the server keeps serving; a client that disconnects
mid-stream frees its KV blocks within a second.
"""

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from cluster.config import parse_config
from cluster.serve import start_serving, stop_serving
from engine.sequence import SamplingParams
from tests.helpers.router import LoopThread
from triptych import Client
from triptych.errors import InvalidArgument, ResourceExhausted

pytestmark = pytest.mark.slow
QUEUE_LIMIT = 3
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def served():
    loop = LoopThread()
    config = parse_config(
        {
            "version": 1,
            "ray": {"num_cpus": 2},
            "engine": {"prefix_caching": True},
            "server": {"grpc_port": 0, "http_port": 0, "admin_port": 0, "max_queued_requests": QUEUE_LIMIT},
        },
        "test_gateway_e2e",
    )
    router, running = loop.run(start_serving(config, progress=lambda *_: None))
    grpc_addr = f"{running.connect_host}:{running.grpc_port}"
    http_base = f"http://{running.connect_host}:{running.http_port}"
    client = Client(grpc_addr)
    yield client, http_base, grpc_addr, router, loop
    client.close()
    loop.run(stop_serving(router, running, progress=lambda *_: None))
    loop.close()


def _good_request_works(client):
    c = client.complete(messages=[{"role": "user", "content": "Say hi."}], max_tokens=4, temperature=0)
    assert c.token_ids and not c.error


def test_sdk_http_openai_and_engine_agree(served, smol, smol_chats, make_engine):
    client, http_base, _, _, _ = served
    chats = smol_chats[:3]
    engine = make_engine(smol)
    offline = [o.text for o in engine.generate(chats, SamplingParams(max_tokens=MAX_TOKENS))]

    sdk = []
    for chat in chats:
        chunks = list(client.chat(messages=chat, max_tokens=MAX_TOKENS, temperature=0))
        sdk.append("".join(getattr(c, "text", "") for c in chunks[:-1]))
    http = []
    for chat in chats:
        r = httpx.post(
            f"{http_base}/v1/chat/completions",
            timeout=120,
            json={"messages": chat, "max_tokens": MAX_TOKENS, "temperature": 0},
        )
        assert r.status_code == 200, r.text
        http.append(r.json()["choices"][0]["message"]["content"])

    import openai

    oai = openai.OpenAI(base_url=f"{http_base}/v1", api_key="unused")
    model = oai.models.list().data[0].id
    streamed = []
    for chat in chats:
        parts = oai.chat.completions.create(
            model=model, messages=chat, max_tokens=MAX_TOKENS, temperature=0, stream=True
        )
        streamed.append("".join(p.choices[0].delta.content or "" for p in parts if p.choices))
    assert sdk == offline
    assert http == offline
    assert streamed == offline


def test_bad_input_then_good_request(served):
    client, http_base, grpc_addr, _, _ = served
    with pytest.raises(InvalidArgument, match="prompt is empty"):
        client.complete(prompt="", max_tokens=4)
    with pytest.raises(InvalidArgument, match="the model's context is 8192"):
        client.complete(token_ids=[42] * 9000, max_tokens=4)
    with pytest.raises(ValueError, match="max_tokens must be >= 0, got -1"):  # refused by the SDK itself
        client.complete(prompt="hello", max_tokens=-1)
    with pytest.raises(InvalidArgument, match="image"):
        client.complete(prompt="hello", images=[b"\x00not an image"], max_tokens=4)
    _good_request_works(client)

    cases = [
        ({"messages": [{"role": "user", "content": ""}], "model": "nope"}, 404, "nope"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, 400, "max_tokens"),
        ({"prompt": [42] * 9000, "max_tokens": 4}, 400, "context"),
    ]
    for body, status, word in cases:
        url = f"{http_base}/v1/{'completions' if 'prompt' in body else 'chat/completions'}"
        r = httpx.post(url, json=body, timeout=30)
        assert r.status_code == status, (body, r.text)
        assert word in r.json()["error"]["message"]
    r = httpx.post(
        f"{http_base}/v1/chat/completions",
        content=b"{not json",
        timeout=30,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    image_msg = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}},
            ],
        }
    ]
    r = httpx.post(f"{http_base}/v1/chat/completions", json={"messages": image_msg}, timeout=30)
    assert r.status_code == 400 and "image" in r.json()["error"]["message"]

    with socket.create_connection(tuple(grpc_addr.rsplit(":", 1)[0:1]) + (int(grpc_addr.rsplit(":", 1)[1]),)) as s:
        s.sendall(b"GET / HTTP/1.1\r\n\r\n" + bytes(range(256)) * 4)
        s.settimeout(2)
        try:
            s.recv(1024)
        except OSError:
            pass
    _good_request_works(client)
    r = httpx.post(
        f"{http_base}/v1/chat/completions",
        timeout=60,
        json={"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4},
    )
    assert r.status_code == 200


def test_queue_limit_gives_resource_exhausted(served):
    client, http_base, _, _, _ = served
    long_chat = [{"role": "user", "content": "Tell me a long story about a dragon."}]

    def one(_):
        try:
            client.complete(messages=long_chat, max_tokens=40, temperature=0)
            return "ok"
        except ResourceExhausted as exc:
            assert "limit" in exc.message
            return "exhausted"

    with ThreadPoolExecutor(QUEUE_LIMIT + 3) as pool:
        outcomes = list(pool.map(one, range(QUEUE_LIMIT + 3)))
    assert "exhausted" in outcomes and "ok" in outcomes
    codes = []
    with ThreadPoolExecutor(QUEUE_LIMIT + 3) as pool:
        codes = list(
            pool.map(
                lambda _: httpx.post(
                    f"{http_base}/v1/chat/completions", timeout=120, json={"messages": long_chat, "max_tokens": 40}
                ).status_code,
                range(QUEUE_LIMIT + 3),
            )
        )
    assert 429 in codes and 200 in codes
    _good_request_works(client)


def test_disconnect_frees_kv_within_a_second(served):
    client, _, _, _, _ = served
    stream = client.chat(
        messages=[{"role": "user", "content": "Write a very long essay about the ocean."}],
        max_tokens=400,
        temperature=0,
    )
    it = iter(stream)
    for _ in range(3):
        next(it)

    def used() -> int:
        return sum(w.kv_blocks_used for p in client.cluster_status().pools for w in p.workers)

    assert used() > 0
    stream.cancel()
    t = time.monotonic()
    while used() > 0 and time.monotonic() - t < 1.0:
        time.sleep(0.05)
    assert used() == 0, f"KV blocks still used {time.monotonic() - t:.2f}s after the client left"


def test_a_conversation_reuses_its_earlier_turns_on_the_decode_worker(served, smol, make_engine):
    client, http_base, _, router, loop = served
    block = 16  # engine.block_size
    turns = ["Name three colors.", "Which of them is the warmest?", "Why is that?", "Name one more."]
    offline, history = make_engine(smol), []  # no prefix cache: the whole conversation each turn
    previous = 0
    for i, text in enumerate(turns):
        c = client.complete(
            messages=[{"role": "user", "content": text}], session_id="prefix-conv", max_tokens=12, temperature=0
        )
        assert not c.error
        history.append({"role": "user", "content": text})
        assert list(c.token_ids) == offline.generate([history], SamplingParams(max_tokens=12))[0].token_ids
        history.append({"role": "assistant", "content": c.text})
        if i:  # every full block of the previous turn's prompt and answer (but its last token, never
            # fed back) was reused: the decode worker that answered it prefilled this turn's rest
            assert c.usage.cached_tokens >= (previous - 1) // block * block > 0
        assert c.usage.cached_tokens < c.usage.prompt_tokens
        previous = c.usage.prompt_tokens + c.usage.completion_tokens
    decode = [w for p in client.cluster_status().pools for w in p.workers if w.worker_id.startswith("decode")]
    assert decode and all(w.kv_blocks_cached > 0 for w in decode)
    body = {"messages": [{"role": "user", "content": "Tell me about the sea in one line. " * 4}], "max_tokens": 4}
    usage = [httpx.post(f"{http_base}/v1/chat/completions", timeout=120, json=body).json()["usage"] for _ in range(2)]
    # the first finds at most the chat template's system prompt that every chat starts with
    assert usage[0]["prompt_tokens_details"]["cached_tokens"] < usage[1]["prompt_tokens_details"]["cached_tokens"]
    # all its full blocks but the one holding its last token (whose logits are sampled)
    assert usage[1]["prompt_tokens_details"]["cached_tokens"] == (usage[1]["prompt_tokens"] - 1) // block * block
    from tests.helpers.gateway import samples

    metrics = samples(httpx.get(f"{http_base}/metrics", timeout=30).text)
    # per pool: the later turns and the repeated request were prefilled on the decode worker
    hits = metrics[("triptych_prefix_cache_hit_tokens_total", (("pool", "decode"),))]
    assert hits >= sum(usage[1]["prompt_tokens_details"].values()) > 0
    status = client.cluster_status()
    assert any(w.kv_blocks_cached > 0 for p in status.pools for w in p.workers)


def test_n_choices_share_the_prompts_prefill(served, smol, make_engine):
    """n = 3 over HTTP: the later choices start after the first one's prefill and find its KV
    cached (every full block but the last one's), and each choice is the model's own answer."""
    _, http_base, _, _, _ = served
    from tests.helpers.gateway import samples

    def hits() -> float:
        metrics = samples(httpx.get(f"{http_base}/metrics", timeout=30).text)
        return sum(v for (name, _), v in metrics.items() if name == "triptych_prefix_cache_hit_tokens_total")

    chat = [{"role": "user", "content": "Give one short fact about owls and one about hawks. " * 5}]
    before = hits()
    r = httpx.post(
        f"{http_base}/v1/chat/completions",
        timeout=120,
        json={"messages": chat, "max_tokens": 6, "temperature": 0, "n": 3},
    )
    assert r.status_code == 200, r.text
    offline = make_engine(smol).generate([chat], SamplingParams(max_tokens=6))[0].text
    assert [c["message"]["content"] for c in r.json()["choices"]] == [offline] * 3
    prompt = r.json()["usage"]["prompt_tokens"]
    assert hits() - before >= 2 * ((prompt - 1) // 16 * 16) > 0  # engine.block_size 16


def test_logprobs_are_the_models_own_over_sdk_and_http(served, smol):
    """Log-probabilities of the real model, compared with a log-softmax of transformers' logits:
    over the SDK (the first token sampled on the prefill worker, the rest on the decode worker),
    then over HTTP chat and completions for the same prompt (now cached on the decode worker, which
    prefills it itself): the same tokens and values."""
    import torch

    client, http_base, _, _, _ = served
    tok, k, n = smol.tokenizer, 5, 8
    chat = [{"role": "user", "content": "Name two fruits, briefly."}]
    ids = list(tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False))
    salt = "logprobs"  # no cached block of another test's matches: the prompt goes to the prefill worker
    c = client.complete(messages=chat, max_tokens=n, temperature=0, logprobs=k, cache_salt=salt)
    assert not c.error and c.token_ids and len(c.logprobs) == len(c.token_ids)
    assert c.timings.transfer_s > 0  # prefilled on the prefill worker, its KV sent to the decode worker
    with torch.no_grad():
        logits = smol.model(torch.tensor([ids + list(c.token_ids)])).logits[0].float()
    ref = torch.log_softmax(logits, dim=-1)[len(ids) - 1 : -1]
    for pos, (token, lp) in enumerate(zip(c.token_ids, c.logprobs)):
        assert (lp.token_id, lp.token) == (token, tok.decode([token]))
        assert lp.logprob == pytest.approx(ref[pos, token].item(), abs=2e-3)
        assert lp.top[0].token_id == token  # greedy: the most likely token is the one chosen
        assert [t.logprob for t in lp.top] == pytest.approx(ref[pos].topk(k).values.tolist(), abs=2e-3)
        assert all(t.logprob == pytest.approx(ref[pos, t.token_id].item(), abs=2e-3) for t in lp.top)

    body = {
        "messages": chat,
        "max_tokens": n,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": k,
        "cache_salt": salt,
    }
    r = httpx.post(f"{http_base}/v1/chat/completions", timeout=120, json=body)
    assert r.status_code == 200, r.text
    assert r.json()["timings"]["transfer_s"] == 0  # prefilled on the decode worker that holds the prompt
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in content] == [lp.token for lp in c.logprobs]
    assert [e["logprob"] for e in content] == pytest.approx([lp.logprob for lp in c.logprobs], abs=2e-3)
    assert [len(e["top_logprobs"]) for e in content] == [k] * len(content)

    body = {"prompt": ids, "max_tokens": n, "temperature": 0, "logprobs": 2, "cache_salt": salt}
    r = httpx.post(f"{http_base}/v1/completions", timeout=120, json=body)
    assert r.status_code == 200, r.text
    lps = r.json()["choices"][0]["logprobs"]
    assert lps["tokens"] == [lp.token for lp in c.logprobs]
    assert lps["token_logprobs"] == pytest.approx([lp.logprob for lp in c.logprobs], abs=2e-3)
    assert [list(top) for top in lps["top_logprobs"]] == [[t.token for t in lp.top[:2]] for lp in c.logprobs]
