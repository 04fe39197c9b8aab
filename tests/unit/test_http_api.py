"""The OpenAI-compatible HTTP door over real loopback HTTP: httpx and the official openai client."""

from __future__ import annotations

import base64
import json

import httpx
import openai
import pytest

from tests.helpers.gateway import ERRORS, MODEL, GatewayThread, routed_id, wait_for

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 8
PNG_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()


@pytest.fixture(scope="module")
def server():
    srv = GatewayThread()
    yield srv
    srv.stop()


@pytest.fixture()
def router(server):
    return server.router


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=10) as c:
        yield c


@pytest.fixture(scope="module")
def oai(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=10) as c:
        yield c


def chat_body(text="hello", **kw):
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **kw}


def sse_events(resp: httpx.Response) -> list:
    """Parse an SSE body strictly: only `data: ...` events separated by blank lines."""
    body = resp.text
    assert body.endswith("data: [DONE]\n\n"), body[-200:]
    events = body.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    return [e.removeprefix("data: ") if e == "data: [DONE]" else json.loads(e.removeprefix("data: ")) for e in events]


def test_openai_chat_non_streaming(oai, router):
    resp = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=8,
        temperature=0,
        seed=3,
        stop=["\n"],
        user="u1",
    )
    assert resp.object == "chat.completion" and resp.model == MODEL and resp.id.startswith("chatcmpl-")
    choice = resp.choices[0]
    assert (choice.index, choice.message.role, choice.message.content, choice.finish_reason) == (
        0,
        "assistant",
        "Hello!",
        "stop",
    )
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (5, 3, 8)
    s = router.inputs[-1].sampling
    assert (s.max_tokens, s.temperature, s.seed, s.stop) == (8, 0.0, 3, ("\n",))


def test_openai_chat_streaming(oai):
    stream = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hello"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello!"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3


def test_openai_completions(oai, router):
    resp = oai.completions.create(model=MODEL, prompt="hello", max_tokens=4)
    assert (
        resp.object == "text_completion"
        and resp.choices[0].text == "Hello!"
        and resp.choices[0].finish_reason == "stop"
    )
    assert router.inputs[-1].prompt == "hello" and router.inputs[-1].messages is None
    text = "".join(c.choices[0].text for c in oai.completions.create(model=MODEL, prompt="hello", stream=True))
    assert text == "Hello!"
    oai.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=4)
    assert router.inputs[-1].token_ids == (1, 2, 3)


def test_cache_salt_reaches_the_router_and_is_bounded(http, router):
    assert http.post("/v1/chat/completions", json=chat_body(cache_salt="tenant-7")).status_code == 200
    assert router.inputs[-1].cache_salt == "tenant-7"
    resp = http.post("/v1/chat/completions", json=chat_body(cache_salt="s" * 1000))
    assert resp.status_code == 400 and "cache_salt length" in resp.json()["error"]["message"]
    resp = http.post("/v1/chat/completions", json=chat_body(cache_salt=7))
    assert resp.status_code == 400 and "cache_salt" in resp.json()["error"]["message"]


def test_sse_wire_format(http):
    resp = http.post("/v1/chat/completions", json=chat_body(stream=True), headers={"X-Request-Id": "sse-1"})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    assert resp.headers["x-request-id"] == "sse-1"
    events = sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["id"] for c in chunks} == {"chatcmpl-sse-1"} and all(
        c["object"] == "chat.completion.chunk" for c in chunks
    )
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:-1]] == ["Hel", "lo", "!"]
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert chunks[-1]["timings"]["ttft_s"] == pytest.approx(0.04)


def test_non_streaming_json_shape(http):
    resp = http.post("/v1/completions", json={"model": MODEL, "prompt": "hello"})
    body = resp.json()
    assert resp.status_code == 200 and body["choices"] == [
        {"index": 0, "text": "Hello!", "logprobs": None, "finish_reason": "stop"}
    ]
    assert body["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 3,
        "total_tokens": 8,
        "prompt_tokens_details": {"cached_tokens": 2},
    }
    assert body["timings"]["prefill_s"] == pytest.approx(0.02) and isinstance(body["created"], int)


def test_logprobs_in_the_shapes_of_chat_and_completions(http, oai):
    """Chat: choices[].logprobs.content[] with token, logprob, bytes and top_logprobs; completions:
    tokens, token_logprobs, top_logprobs and text_offset; streamed per chunk; absent unless asked."""
    body = http.post("/v1/chat/completions", json=chat_body(logprobs=True, top_logprobs=2)).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in content] == ["Hel", "lo", "!"] and [e["logprob"] for e in content] == [0, -0.5, -1]
    assert content[0]["bytes"] == list(b"Hel")
    assert content[1]["top_logprobs"] == [
        {"token": "<0>", "logprob": -1.0, "bytes": list(b"<0>")},
        {"token": "<1>", "logprob": -2.0, "bytes": list(b"<1>")},
    ]
    on = http.post("/v1/chat/completions", json=chat_body(logprobs=True)).json()["choices"][0]["logprobs"]
    assert [e["top_logprobs"] for e in on["content"]] == [[], [], []]  # no top_logprobs: the tokens' own only
    assert http.post("/v1/chat/completions", json=chat_body()).json()["choices"][0]["logprobs"] is None

    done = http.post("/v1/completions", json={"model": MODEL, "prompt": "hello", "logprobs": 1}).json()
    assert done["choices"][0]["logprobs"] == {
        "tokens": ["Hel", "lo", "!"],
        "token_logprobs": [0, -0.5, -1],
        "top_logprobs": [{"<0>": -1.0}] * 3,
        "text_offset": [0, 3, 5],
    }
    refused = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "top_logprobs": 1})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "top_logprobs"

    streamed = http.post("/v1/completions", json={"model": MODEL, "prompt": "hello", "logprobs": 0, "stream": True})
    per_chunk = [c["choices"][0]["logprobs"] for c in sse_events(streamed)[:-2]]  # the final chunk has no tokens
    assert [lp["text_offset"] for lp in per_chunk] == [[0], [3], [5]]  # continuing over the chunks
    # the official client parses the streamed chat shape
    parts = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], logprobs=True, top_logprobs=1, stream=True
    )
    tokens = [e for p in parts if p.choices and p.choices[0].logprobs for e in p.choices[0].logprobs.content]
    assert [(e.token, e.logprob, [t.token for t in e.top_logprobs]) for e in tokens] == [
        ("Hel", 0.0, ["<0>"]),
        ("lo", -0.5, ["<0>"]),
        ("!", -1.0, ["<0>"]),
    ]


@pytest.mark.parametrize(
    "word, status",
    [
        ("invalid", 400),
        ("busy", 429),
        ("down", 503),
        ("late", 504),
        ("missing", 404),
        ("crash", 500),
        ("eager-busy", 429),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_router_errors_map_to_http_statuses(http, word, status, stream):
    kind, message = ERRORS[word.removeprefix("eager-")]
    resp = http.post("/v1/chat/completions", json=chat_body(f"please {word}", stream=stream))
    assert resp.status_code == status
    assert resp.json()["error"]["message"] == message and resp.json()["error"]["code"] == kind.value


def test_openai_client_sees_errors(oai):
    with pytest.raises(openai.BadRequestError, match="max_model_len"):
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "invalid"}])
    with pytest.raises(openai.RateLimitError):
        oai.completions.create(model=MODEL, prompt="busy")
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        oai.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    "raw, needle, param",
    [
        (b"{not json", "not valid JSON", None),
        (b"[1, 2]", "must be a JSON object", None),
        (json.dumps(chat_body(n=9)).encode(), "'n' must be in [1, 8] (server.limits.max_choices)", "n"),
        (json.dumps(chat_body(n=0)).encode(), "'n' must be in [1, 8]", "n"),
        (json.dumps(chat_body(temperature="hot")).encode(), "'temperature' must be a number", "temperature"),
        (json.dumps(chat_body(temperature=1e9)).encode(), "temperature must be in", "temperature"),
        (json.dumps(chat_body(max_tokens=0)).encode(), "'max_tokens' must be >= 1", "max_tokens"),
        (json.dumps(chat_body(stop=[1])).encode(), "'stop' must be a string or an array", "stop"),
        (json.dumps({"model": MODEL, "messages": []}).encode(), "'messages' must be a non-empty array", "messages"),
        (
            json.dumps({"model": MODEL, "messages": [{"role": "user", "content": 3}]}).encode(),
            "messages[0].content",
            "messages[0].content",
        ),
        (json.dumps(chat_body(top_logprobs=2)).encode(), "'top_logprobs' needs 'logprobs': true", "top_logprobs"),
        (
            json.dumps(chat_body(logprobs=True, top_logprobs=21)).encode(),
            "'top_logprobs' must be in [0, 20]",
            "top_logprobs",
        ),
        (json.dumps(chat_body(logprobs=3)).encode(), "'logprobs' must be a boolean", "logprobs"),
        (json.dumps(chat_body(echo=True)).encode(), "'echo' is not supported", "echo"),
    ],
)
def test_bad_requests_are_400_and_server_keeps_serving(http, raw, needle, param):
    resp = http.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert needle in err["message"] and err["type"] == "invalid_request_error"
    assert "param" in err and err["param"] == param  # the OpenAI error object's field at fault
    assert http.post("/v1/chat/completions", json=chat_body()).status_code == 200


def test_images_from_data_urls(http, router):
    parts = [
        {"type": "text", "text": "What is "},
        {"type": "image_url", "image_url": {"url": PNG_URL}},
        {"type": "text", "text": "this?"},
    ]
    resp = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": parts}]})
    assert resp.status_code == 200
    msg = router.inputs[-1].messages[0]
    assert msg.content == "What is this?" and msg.images == (PNG,)


@pytest.mark.parametrize(
    "url, needle",
    [
        ("data:image/png;base64,@@not-base64@@", "messages[0].content[1].image_url: invalid base64"),
        ("https://example.com/cat.png", "only data: URLs"),
        ("data:image/png,rawbytes", "not a base64 data URL"),
    ],
)
def test_bad_image_is_400_naming_the_image(http, url, needle):
    parts = [{"type": "text", "text": "see"}, {"type": "image_url", "image_url": {"url": url}}]
    resp = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": parts}]})
    assert resp.status_code == 400 and needle in resp.json()["error"]["message"]
    assert http.post("/v1/chat/completions", json=chat_body()).status_code == 200


def test_error_after_start(http):
    resp = http.post("/v1/chat/completions", json=chat_body("please midfail"))
    assert resp.status_code == 500 and resp.json()["error"]["message"] == "decode worker died"
    events = sse_events(http.post("/v1/chat/completions", json=chat_body("please midfail", stream=True)))
    assert events[-2]["error"]["message"] == "decode worker died" and events[-1] == "[DONE]"


def test_client_disconnect_aborts(server, router):
    with httpx.Client(base_url=server.url, timeout=10) as c:
        with c.stream(
            "POST",
            "/v1/chat/completions",
            json=chat_body("http-gone go slow", stream=True),
            headers={"X-Request-Id": "http-gone"},
        ) as resp:
            lines = resp.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any("x" in line for line in got)
    assert wait_for(lambda: routed_id(router, "http-gone") in router.aborts)
    assert wait_for(lambda: "http-gone" not in server.gateway.in_flight)


@pytest.mark.parametrize("stream", [False, True])
def test_an_aborted_request_ends_as_an_error_not_a_finish_reason(server, http, stream):
    """OpenAI has no finish_reason for an abort (gRPC Abort of the X-Request-Id, or shutdown)."""
    import concurrent.futures as cf

    import triptych

    rid = f"http-abort-{stream}"
    with cf.ThreadPoolExecutor(1) as pool, triptych.Client(server.target, timeout=10) as grpc_client:
        body = chat_body("go slow", stream=stream)
        pending = pool.submit(http.post, "/v1/chat/completions", json=body, headers={"X-Request-Id": rid})
        assert wait_for(lambda: rid in server.gateway.in_flight)
        assert grpc_client.abort(rid) is True
        resp = pending.result(timeout=10)
    if stream:
        events = sse_events(resp)
        assert events[-2]["error"]["code"] == "aborted" and events[-1] == "[DONE]"
        assert not any(c.get("choices") and c["choices"][0]["finish_reason"] for c in events[:-2])
    else:
        assert resp.status_code == 499 and resp.json()["error"]["code"] == "aborted"


def test_models_health_and_unknown_routes(http, oai):
    assert [m.id for m in oai.models.list().data] == [MODEL]
    assert oai.models.retrieve(MODEL).id == MODEL
    assert http.get("/v1/models/nope").status_code == 404
    assert http.get("/health").status_code == 200
    resp = http.get("/v1/nothing-here")
    assert resp.status_code == 404 and "error" in resp.json()
    assert http.get("/v1/chat/completions").status_code == 405


def test_health_503_when_not_serving(server, http):
    server.gateway.serving = False
    try:
        assert http.get("/health").status_code == 503
        assert http.post("/v1/chat/completions", json=chat_body()).status_code == 503
    finally:
        server.gateway.serving = True


def test_a_tool_result_message_is_accepted(http, router):
    """A tool's result (role "tool", as clients send after running a tool themselves) reaches the
    chat template like any turn; an assistant turn that only called tools has no content."""
    messages = [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"celsius": 20}'},
    ]
    resp = http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages})
    assert resp.status_code == 200, resp.text
    got = router.inputs[-1].messages
    assert [(m.role, m.content) for m in got] == [
        ("user", "weather in Paris?"),
        ("assistant", ""),
        ("tool", '{"celsius": 20}'),
    ]


def test_a_chat_template_refusal_is_invalid_argument_in_its_own_words(smol):
    from engine.errors import InvalidRequestError
    from engine.llm_engine import RequestValidator

    tok = smol.tokenizer
    saved = tok.chat_template
    tok.chat_template = (
        "{% if messages[0]['role'] == 'tool' %}{{ raise_exception('tool turns need a call') }}{% endif %}x"
    )
    try:
        with pytest.raises(InvalidRequestError, match="chat template refused these messages: tool turns need a call"):
            RequestValidator(tok, 100, 100).tokenize([{"role": "tool", "content": "1"}])
    finally:
        tok.chat_template = saved


@pytest.mark.parametrize("shares", [False, True])
def test_n_choices_start_after_the_first_ones_prefill_when_the_router_shares_them(http, router, shares):
    """When the router shares the choices' prefill, choices 1..n-1 start only once choice 0's
    prefill is done (its first token), so they find its KV cached; otherwise all start at once.
    The choices carry one id of their own, which no other request carries."""
    router.shares, router.trace[:] = shares, []
    groups = []
    try:
        for stream in (False, True):
            router.trace.clear()
            resp = http.post("/v1/chat/completions", json=chat_body(n=3, stream=stream))
            assert resp.status_code == 200, resp.text
            first_token = router.trace.index(("first token", router.inputs[-3].request_id))
            later = [router.trace.index(("generate", x.request_id)) for x in router.inputs[-2:]]
            assert all(i > first_token for i in later) if shares else all(i < first_token for i in later)
            groups.append({x.choices_of for x in router.inputs[-3:]})
        assert all(len(g) == 1 and len(next(iter(g))) == 32 for g in groups) and groups[0] != groups[1]
    finally:
        router.shares = False


def test_n_choices_are_generated_as_requests_of_their_own(http, oai, router):
    """n = 3: three requests (a seeded choice i draws from seed + i), answered as
    three choices, the prompt counted once in usage; streamed, every chunk names its choice and
    each choice ends with its own finish_reason."""
    resp = http.post("/v1/chat/completions", json=chat_body(n=3, seed=7), headers={"X-Request-Id": "many"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert all(c["message"]["content"] == "Hello!" and c["finish_reason"] == "stop" for c in body["choices"])
    one = http.post("/v1/chat/completions", json=chat_body()).json()["usage"]
    assert body["usage"]["completion_tokens"] == 3 * one["completion_tokens"]
    assert body["usage"]["prompt_tokens"] == one["prompt_tokens"]  # once, not per choice
    assert sorted(i.sampling.seed for i in router.inputs[-4:-1]) == [7, 8, 9]  # the three choices, then `one`
    # an id at the length limit leaves no room for the choices' suffixes (<id>-<i>, what Abort takes)
    longest = "r" * 128  # server.limits.max_id_chars
    assert http.post("/v1/chat/completions", json=chat_body(), headers={"X-Request-Id": longest}).status_code == 200
    refused = http.post("/v1/chat/completions", json=chat_body(n=2), headers={"X-Request-Id": longest})
    assert (
        refused.status_code == 400
        and "X-Request-Id with n=2 length: 130; the limit is 128" in refused.json()["error"]["message"]
    )

    stream = oai.completions.create(
        model=MODEL, prompt="hello", n=2, stream=True, stream_options={"include_usage": True}
    )
    text, reasons, usage = {0: "", 1: ""}, {}, None
    for chunk in stream:
        for c in chunk.choices:
            text[c.index] += c.text
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
        usage = chunk.usage or usage
    assert text == {0: "Hello!", 1: "Hello!"} and reasons == {0: "stop", 1: "stop"}
    assert usage.completion_tokens == 2 * 3
