"""The real gateway over real loopback gRPC, driven by the SDK, on a fake router."""

from __future__ import annotations

import socket

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import triptych
from cluster import gateway as gw
from cluster.auth import Principal
from cluster.config import ServerConfig, SessionsConfig
from cluster.gateway_proto import GRPC_CODES, SERVICE_NAME
from cluster.router_api import ChatMessage, ErrorKind
from cluster.sessions import SessionStore, _drop_points, _dropped, trim_to_fit
from engine.worker_api import Role
from tests.helpers.gateway import ERRORS, MAX_MODEL_LEN, MODEL, FakeRouter, GatewayThread, routed_id, wait_for

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 8


@pytest.fixture(scope="module")
def server():
    srv = GatewayThread()
    yield srv
    srv.stop()


@pytest.fixture()
def router(server) -> FakeRouter:
    return server.router


@pytest.fixture()
def client(server):
    with triptych.Client(server.target, timeout=10) as c:
        yield c


def test_generate_streams_tokens_then_final(client, router):
    chunks = list(client.generate("hello", max_tokens=8, request_id="g1"))
    assert [c.text for c in chunks[:-1]] == ["Hel", "lo", "!"]
    assert [c.index for c in chunks[:-1]] == [0, 1, 2]
    final = chunks[-1]
    assert final.is_final and final.finish_reason == "stop" and final.request_id == "g1"
    assert final.usage == triptych.Usage(prompt_tokens=5, completion_tokens=3, cached_tokens=2)
    assert final.timings.ttft_s == pytest.approx(0.04) and final.timings.transfer_s == pytest.approx(0.003)
    inp = router.inputs[-1]
    assert inp.prompt == "hello" and inp.messages is None and inp.sampling.max_tokens == 8
    assert inp.request_id not in ("", "g1")  # the router gets the gateway's own id, never the client's
    assert inp.cache_salt == ""


def test_cache_salt_reaches_the_router_and_is_bounded(client, router):
    client.complete("hello", cache_salt="tenant-7-secret")
    assert router.inputs[-1].cache_salt == "tenant-7-secret"
    with pytest.raises(triptych.InvalidArgument, match="cache_salt length"):
        client.complete("hello", cache_salt="s" * 1000)
    client.complete("hello")  # still serving


def test_sampling_defaults_follow_the_api_doc(client, router):
    client.complete("hello")
    s = router.inputs[-1].sampling
    assert s.temperature == 1.0 and s.top_p == 1.0 and s.top_k == 0 and s.seed is None
    assert s.max_tokens == MAX_MODEL_LEN  # 0: up to max_model_len
    assert router.inputs[-1].request_id  # the server assigned one
    client.complete(
        "hello", temperature=0.0, top_p=0.5, top_k=-1, seed=7, stop=["\n", "."], ignore_eos=True, images=[PNG]
    )
    inp = router.inputs[-1]
    s = inp.sampling
    assert (s.temperature, s.top_p, s.top_k, s.seed, s.stop, s.ignore_eos) == (0.0, 0.5, 0, 7, ("\n", "."), True)
    assert inp.images == (PNG,)


def test_logprobs_travel_to_the_sdk(client, router):
    c = client.complete("hello", logprobs=2)
    assert router.inputs[-1].sampling.logprobs == 2
    assert [(lp.token_id, lp.token, lp.logprob) for lp in c.logprobs] == [
        (10, "Hel", 0.0),
        (11, "lo", -0.5),
        (12, "!", -1.0),
    ]
    assert c.logprobs[0].top == (triptych.TopLogprob(100, "<0>", -1.0), triptych.TopLogprob(101, "<1>", -2.0))
    client.complete("hello")
    assert router.inputs[-1].sampling.logprobs is None and client.complete("hello").logprobs == ()


def test_chat_messages_and_images_reach_the_router(client, router):
    reply = client.complete(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": ["What is ", PNG, {"type": "text", "text": "this?"}]},
        ],
        max_tokens=4,
    )
    assert reply.text == "Hello!" and reply.finish_reason == "stop"
    msgs = router.inputs[-1].messages
    assert msgs == (ChatMessage("system", "Be brief."), ChatMessage("user", "What is this?", (PNG,)))


def test_token_ids_input(client, router):
    client.complete(token_ids=[5, 6, 7], max_tokens=2)
    assert router.inputs[-1].token_ids == (5, 6, 7)


@pytest.mark.parametrize("word", sorted(ERRORS) + ["eager-busy", "eager-invalid"])
def test_router_errors_map_to_status_codes(client, word):
    kind, message = ERRORS[word.removeprefix("eager-")]
    with pytest.raises(triptych.TriptychError) as info:
        client.complete(f"please {word}")
    assert info.value.code == GRPC_CODES[kind]
    assert info.value.message == message


def test_router_bug_is_internal_and_server_keeps_serving(client):
    with pytest.raises(triptych.Internal) as info:
        client.complete("a bug")
    assert info.value.message == "internal error"  # the cause goes to the log, not the client
    assert client.complete("hello").text == "Hello!"


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(messages=[{"role": "robot", "content": "hi"}]), "messages[0].role must be one of"),
        (dict(prompt="hello", session_id="s"), "session_id needs chat input"),
        (dict(prompt="hello", top_p=0.0), "top_p"),
        (dict(prompt="hello", temperature=-1.0), "temperature"),
        (dict(prompt="hello", logprobs=21), "logprobs must be an integer in [0, 20]"),
    ],
)
def test_bad_input_is_invalid_argument(client, kwargs, needle):
    with pytest.raises(triptych.InvalidArgument) as info:
        client.complete(**kwargs)
    assert needle in info.value.message


def test_request_without_input_is_invalid(server):
    from protos.triptych.v1 import triptych_pb2 as pb
    from protos.triptych.v1 import triptych_pb2_grpc as pb_grpc

    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.TriptychStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(pb.GenerateRequest(), timeout=5))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no input" in info.value.details()
        chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=[pb.ContentPart(text="hi")])])
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(pb.GenerateRequest(chat=chat, images=[pb.Image(data=PNG)]), timeout=5))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "inside its messages" in info.value.details()


def test_error_after_start_is_a_final_chunk(client):
    reply = client.complete("please midfail")
    assert reply.finish_reason == "error" and reply.error == "decode worker died" and reply.text == "a"


def test_client_cancel_aborts_the_request(client, router, server):
    stream = client.generate("cancel-me go slow", request_id="cancel-me")
    for _ in range(3):
        next(stream)
    stream.cancel()
    assert wait_for(lambda: routed_id(router, "cancel-me") in router.aborts)
    assert wait_for(lambda: "cancel-me" not in server.gateway.in_flight)


def test_deadline_reaches_router_and_aborts(client, router):
    with pytest.raises(triptych.DeadlineExceeded):
        list(client.generate("deadline go slow", request_id="deadline", timeout=0.5))
    inp = next(i for i in router.inputs if i.request_id == routed_id(router, "deadline"))
    assert 0 < inp.deadline_s <= 0.6
    assert wait_for(lambda: inp.request_id in router.aborts)


def test_abort_rpc(client, router):
    stream = client.generate("go slow", request_id="to-abort")
    next(stream)
    assert client.abort("to-abort") is True
    rest = list(stream)
    assert rest[-1].is_final and rest[-1].finish_reason == "abort"
    assert client.abort("to-abort") is False  # finished: idempotent
    assert client.abort("never-existed") is False


def test_duplicate_in_flight_request_id(client):
    stream = client.generate("go slow", request_id="dup")
    next(stream)
    with pytest.raises(triptych.InvalidArgument, match="already in flight"):
        client.complete("hello", request_id="dup")
    stream.cancel()


def test_session_history_is_kept_and_sent(client, router):
    client.complete(messages=[{"role": "user", "content": "first"}], session_id="s1")
    client.complete(messages=[{"role": "user", "content": "second"}], session_id="s1")
    assert router.inputs[-1].messages == (
        ChatMessage("user", "first"),
        ChatMessage("assistant", "Hello!"),
        ChatMessage("user", "second"),
    )
    client.complete(messages=[{"role": "user", "content": "other"}], session_id="s2")
    assert router.inputs[-1].messages == (ChatMessage("user", "other"),)
    # A failed turn is not recorded.
    client.complete(messages=[{"role": "user", "content": "please midfail"}], session_id="s1")
    client.complete(messages=[{"role": "user", "content": "third"}], session_id="s1")
    assert [m.content for m in router.inputs[-1].messages] == ["first", "Hello!", "second", "Hello!", "third"]


def test_model_info_and_cluster_status(client):
    info = client.model_info()
    assert (info.model, info.max_model_len, info.eos_token_ids, info.supports_images) == (
        MODEL,
        MAX_MODEL_LEN,
        (2,),
        True,
    )
    status = client.cluster_status()
    assert status.mode == "disaggregated"
    assert [p.role for p in status.pools] == ["prefill", "decode"]
    decode = status.pool("decode")
    assert [w.worker_id for w in decode.workers] == ["decode-0", "decode-1"] and not decode.workers[1].alive
    assert status.pool("prefill").workers[0].queue_length == 3 and status.pool("prefill").workers[0].epoch == 1
    assert status.role_switches[0].to_role == "decode" and status.role_switches[0].reason == "decode queue"


def test_health_and_reflection(server):
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE_NAME):
            resp = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = {s.name for s in next(iter(responses)).list_services_response.service}
    assert {"triptych.v1.Triptych", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


def test_start_reports_ports_and_names_a_busy_port():
    srv = GatewayThread()
    try:
        assert srv.running.grpc_port > 0 and srv.running.http_port > 0
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
            busy = s.getsockname()[1]
            config = ServerConfig(host="127.0.0.1", grpc_port=0, http_port=busy, admin_port=0)
            with pytest.raises(gw.BindError, match=f"HTTP to 127.0.0.1:{busy}"):
                srv.call(gw.start(FakeRouter(), config))
    finally:
        srv.stop()


def test_stopped_gateway_refuses_requests():
    srv = GatewayThread()
    srv.gateway.serving = False  # as during shutdown
    try:
        with triptych.Client(srv.target, timeout=5) as c, pytest.raises(triptych.Unavailable):
            c.complete("hello")
    finally:
        srv.stop()


# -- sessions (pure) ----------------------------------------------------------------------


A, B = Principal("alice"), Principal("bob")


def test_sessions_lru_and_ttl():
    now = [0.0]
    store = SessionStore(SessionsConfig(max_sessions=2, ttl_s=10), clock=lambda: now[0])
    u = (ChatMessage("user", "hi"),)
    store.append_turn(A, "a", u, "A")
    store.append_turn(A, "b", u, "B")
    store.history(A, "a")  # a is now the most recent
    store.append_turn(A, "c", u, "C")  # evicts b
    assert store.history(A, "b") == () and len(store) == 2
    assert store.history(A, "a") == (ChatMessage("user", "hi"), ChatMessage("assistant", "A"))
    now[0] = 11.0
    assert store.history(A, "a") == () and len(store) == 0


def test_sessions_belong_to_their_principal():
    store = SessionStore()
    store.append_turn(A, "s1", (ChatMessage("user", "my secret is 42"),), "ok")
    assert store.history(B, "s1") == ()  # same id, another client: a new conversation
    store.append_turn(B, "s1", (ChatMessage("user", "hello"),), "hi")
    assert store.history(A, "s1")[0].content == "my secret is 42"
    assert store.history(B, "s1")[0].content == "hello"


def test_a_flood_of_sessions_evicts_only_the_flooder():
    store = SessionStore(SessionsConfig(max_sessions=20, max_sessions_per_client=8))
    u = (ChatMessage("user", "x"),)
    for i in range(3):
        store.append_turn(A, f"a{i}", u, "r")
    for i in range(1030):  # throwaway sessions of another client
        store.append_turn(B, f"b{i}", u, "r")
    assert [store.history(A, f"a{i}") != () for i in range(3)] == [True] * 3
    assert store.count(B) == 8 and store.count(A) == 3
    # Past the global cap, the client holding the most sessions loses its oldest one.
    many = [Principal(f"p{i}") for i in range(4)]
    for p in many:
        for i in range(3):
            store.append_turn(p, f"s{i}", u, "r")
    assert store.count() == 20 and store.count(A) == 3 and store.count(B) < 8


def test_session_bytes_are_bounded_per_client_and_in_total():
    store = SessionStore(SessionsConfig(max_session_bytes=1000, max_bytes_per_client=3000, max_bytes=5000))
    store.append_turn(A, "a", (ChatMessage("user", "x" * 500),), "r")
    for i in range(50):
        store.append_turn(B, f"b{i}", (ChatMessage("user", "y" * 800),), "r")
    many = [Principal(f"p{i}") for i in range(3)]
    for p in many:
        store.append_turn(p, "s", (ChatMessage("user", "z" * 800),), "r")
    assert store.history(A, "a") != ()  # the small client keeps its session
    assert store.count(B) <= 3 and store.total_bytes <= 5000


def test_session_history_is_capped_in_size():
    from cluster.sessions import _size

    store = SessionStore(SessionsConfig(max_session_bytes=400))
    for i in range(10):
        store.append_turn(
            A, "s", (ChatMessage("system", "sys"),) if i == 0 else (ChatMessage("user", "u" * 30),), "a" * 10
        )
    history = store.history(A, "s")
    assert history[0] == ChatMessage("system", "sys")  # system messages stay
    assert _size(history) <= 400 and history[1].role == "user" and len(history) == 3
    store.append_turn(A, "e", (ChatMessage("user", ""),) * 50, "")  # empty messages count too
    assert 0 < len(store.history(A, "e")) < 10
    store.append_turn(A, "big", (ChatMessage("system", "s" * 500),), "ok")
    assert store.history(A, "big") == ()  # a system prompt over the cap: nothing kept


def test_trim_keeps_system_and_new_messages():
    def m(role, text):
        return ChatMessage(role, text)

    history = (m("system", "s"), m("user", "u1 u1 u1"), m("assistant", "a1 a1"), m("user", "u2"), m("assistant", "a2"))
    new = (m("user", "now"),)
    count = lambda ms: sum(len(x.content.split()) for x in ms)  # noqa: E731
    assert trim_to_fit(history, new, count, 100) == history
    assert trim_to_fit(history, new, count, 4) == (m("system", "s"), m("user", "u2"), m("assistant", "a2"))
    assert trim_to_fit(history, new, count, 1) == (m("system", "s"),)


def test_trim_is_exact_with_template_overhead():
    import random

    def m(role, n):
        return ChatMessage(role, "w " * n)

    calls = []

    def count(ms):  # a template: 7 fixed tokens, 3 per message, a word per token
        calls.append(len(ms))
        return 7 + sum(3 + len(x.content.split()) for x in ms)

    rng = random.Random(0)
    for _ in range(50):
        history = tuple(
            m("system", 3) if i == 0 and rng.random() < 0.5 else m(("user", "assistant")[i % 2], rng.randint(0, 40))
            for i in range(rng.randint(0, 30))
        )
        new = (m("user", rng.randint(1, 20)),)
        budget = rng.randint(20, 400)
        points = _drop_points(history)
        exact = next(
            (_dropped(history, p) for p in points if count((*_dropped(history, p), *new)) <= budget),
            _dropped(history, points[-1]),
        )
        calls.clear()
        assert trim_to_fit(history, new, count, budget) == exact
        assert sum(n for n in calls if n > 1) <= 6 * (len(history) + len(new))  # a few whole templatings

        def strict(ms):  # a template that refuses a lone message (alternating roles): never asked for one
            assert len(ms) > 1 or ms == new
            return count(ms)

        assert trim_to_fit(history, new, strict, budget, lambda x: len(x.content.split())) == exact


def test_error_kinds_all_mapped():
    assert set(GRPC_CODES) == set(ErrorKind)


def test_stop_aborts_in_flight_requests_after_grace():
    import threading
    import time

    import httpx

    srv = GatewayThread(http_grace_s=0.3)
    router = srv.router
    client = triptych.Client(srv.target, timeout=10)
    stream = client.generate("grpc-inflight go slow", request_id="grpc-inflight")
    next(stream)

    def http_slow():
        body = {"messages": [{"role": "user", "content": "http-inflight go slow"}], "stream": True}
        try:
            with httpx.stream(
                "POST",
                srv.url + "/v1/chat/completions",
                json=body,
                timeout=10,
                headers={"X-Request-Id": "http-inflight"},
            ) as resp:
                for _ in resp.iter_lines():
                    pass
        except httpx.HTTPError:
            pass

    t = threading.Thread(target=http_slow, daemon=True)
    t.start()
    assert wait_for(lambda: "http-inflight" in srv.gateway.in_flight)
    started = time.monotonic()
    srv.call(srv.running.stop(grace_s=0.3))
    assert time.monotonic() - started < 3
    assert wait_for(
        lambda: {routed_id(router, "grpc-inflight"), routed_id(router, "http-inflight")} <= set(router.aborts)
    )
    with pytest.raises(triptych.TriptychError):
        list(stream)
    client.close()
    t.join(5)
    srv.stop()  # idempotent: stops the loop thread


def test_admin_set_worker_role(server, router):
    client = triptych.Client(server.admin_target, timeout=10)
    s = client.set_worker_role("decode-1", "prefill", drain_timeout_s=5, reason="ops")
    assert (s.worker_id, s.from_role, s.to_role, s.epoch, s.drain_s, s.switch_s, s.reason) == (
        "decode-1",
        "decode",
        "prefill",
        2,
        0.5,
        0.25,
        "ops",
    )
    assert router.inputs[-1][1:] == ("decode-1", Role.PREFILL, "ops", 5.0)
    with pytest.raises(triptych.FailedPrecondition, match="last live prefill worker"):
        client.set_worker_role("prefill-0", "decode")
    with pytest.raises(triptych.InvalidArgument, match="no worker 'nope-3'"):
        client.set_worker_role("nope-3", "decode")
    with pytest.raises(ValueError, match="encode, prefill or decode, not colocated"):
        client.set_worker_role("decode-1", "colocated")
    client.set_worker_role("encode-0", "prefill")  # encode <-> prefill goes over the same RPC
    assert router.inputs[-1][1:3] == ("encode-0", Role.PREFILL)
    from protos.triptych.v1 import triptych_pb2 as pb
    from protos.triptych.v1 import triptych_pb2_grpc as pb_grpc

    with grpc.insecure_channel(client.target) as channel:  # a raw call with no role set
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.TriptychAdminStub(channel).SetWorkerRole(pb.SetWorkerRoleRequest(worker_id="decode-1"), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "ROLE_PREFILL" in err.value.details()
    assert client.admin_status().role_switch_count == 1
    client.close()
    # The serving port does not serve the admin service at all.
    with triptych.Client(server.target, timeout=10) as serving, pytest.raises(triptych.TriptychError) as err:
        serving.set_worker_role("decode-1", "prefill")
    assert err.value.code == grpc.StatusCode.UNIMPLEMENTED


def test_admin_status_json(server, router, capsys):
    import json

    from triptych.cli import main

    assert main(["admin", "status", "--json", "--target", server.admin_target]) == 0
    status = json.loads(capsys.readouterr().out)
    with triptych.Client(server.admin_target, timeout=10) as client:
        assert status["role_switch_count"] == client.admin_status().role_switch_count
    assert status["mode"] and all("workers" in p and p["role"] for p in status["pools"])
