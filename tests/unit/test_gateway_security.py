"""The gateway's doors against hostile clients, on a fake router over real loopback gRPC / HTTP:
API keys (serving and admin, separate ports), TLS and client certificates, requests and sessions
owned by their principal, per-client limits, the door's caps (each refusal names its setting),
errors before the first token as statuses, and every refusal counted with a reason."""

from __future__ import annotations

import base64
import json
import ssl
import subprocess

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import triptych
from cluster.auth import AuthError, KeyRing, load_keys
from cluster.config import LimitsConfig, ServerConfig, TlsConfig
from cluster.router_api import ChatMessage
from tests.helpers.gateway import MODEL, GatewayThread, routed_id, samples, wait_for

ALICE, BOB, ADMIN = "alice-key-0123456789abcdef", "bob-key-0123456789abcdef00", "admin-key-0123456789abcdef"
LIMITS = LimitsConfig(
    max_prompt_chars=1000,
    max_messages=8,
    max_images=2,
    max_image_bytes=64,
    max_stop_strings=2,
    max_stop_chars=8,
    max_id_chars=16,
    max_tokens=100,
    max_requests_per_client=2,
)
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 8


@pytest.fixture(scope="module")
def server():
    keys = KeyRing([("alice", ALICE), ("bob", BOB)], [("ops", ADMIN)])
    config = ServerConfig(host="127.0.0.1", grpc_port=0, http_port=0, admin_port=0, limits=LIMITS)
    srv = GatewayThread(config=config, keys=keys)
    yield srv
    srv.stop()


def client(server, key, **kw) -> triptych.Client:
    return triptych.Client(server.target, timeout=10, api_key=key, **kw)


# ------------------------------------------------------------------------------------ keys
def test_key_files_and_env(tmp_path, monkeypatch):
    f = tmp_path / "keys"
    f.write_text(f"# serving keys\nalice:{ALICE}\n{BOB}\n")
    assert [n for n, _ in load_keys(str(f), None, "serving")] == [
        "alice",
        "key-" + __import__("hashlib").sha256(BOB.encode()).hexdigest()[:8],
    ]
    monkeypatch.setenv("KEYS", f"x:{ADMIN}, y:{ALICE}")
    assert [n for n, _ in load_keys(None, "KEYS", "admin")] == ["x", "y"]
    f.write_text("alice:short\n")
    with pytest.raises(AuthError, match="line 1: the key is shorter than 16") as err:
        load_keys(str(f), None, "serving")
    assert "short" not in str(err.value).replace("shorter", "")  # never the key itself
    with pytest.raises(AuthError, match="environment variable NOPE is not set"):
        load_keys(None, "NOPE", "serving")
    ring = KeyRing([("alice", ALICE)])
    assert ring.serving(f"Bearer {ALICE}").name == "alice" and ring.serving(f"bearer  {ALICE}").name == "alice"
    assert ring.serving(None) is None and ring.serving(ALICE) is None and ring.serving(f"Bearer {BOB}") is None
    assert KeyRing().serving(None).name == "anonymous"


def test_grpc_needs_a_serving_key_and_health_does_not(server, monkeypatch):
    for key in (None, "", BOB + "x", ADMIN):
        with client(server, key or "") as c, pytest.raises(triptych.Unauthenticated):
            c.complete("hello")
    with client(server, ALICE) as c:
        assert c.complete("hello").text == "Hello!"
    monkeypatch.setenv("TRIPTYCH_API_KEY", BOB)
    with triptych.Client(server.target, timeout=10) as c:
        assert c.model_info().model == MODEL
    with grpc.insecure_channel(server.target) as channel:
        resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    with httpx.Client(base_url=server.url, timeout=10) as http:
        metrics = samples(http.get("/metrics", headers={"Authorization": f"Bearer {ALICE}"}).text)
    assert (
        metrics[
            (
                "triptych_request_errors_total",
                (("door", "grpc"), ("kind", "unauthenticated"), ("reason", "unauthenticated")),
            )
        ]
        >= 4
    )


def test_admin_port_takes_only_admin_keys(server):
    for key in ("", ALICE):
        with (
            triptych.Client(server.admin_target, timeout=10, api_key=key) as c,
            pytest.raises(triptych.Unauthenticated),
        ):
            c.admin_status()
    with triptych.Client(server.admin_target, timeout=10, api_key=ADMIN) as c:
        assert c.set_worker_role("decode-1", "prefill").to_role == "prefill"
    with client(server, ADMIN) as c, pytest.raises(triptych.TriptychError) as err:
        c.set_worker_role("decode-1", "prefill")  # not on the serving port at all
    assert err.value.code in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAUTHENTICATED)


def test_http_needs_a_key_except_health(server):
    with httpx.Client(base_url=server.url, timeout=10) as http:
        resp = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert resp.status_code == 401 and resp.headers["WWW-Authenticate"] == "Bearer"
        assert resp.json()["error"]["code"] == "unauthenticated"
        assert http.get("/metrics").status_code == 401
        assert http.get("/v1/models", headers={"Authorization": "Bearer nope-nope-nope-nope"}).status_code == 401
        assert http.get("/health").status_code == 200
        auth = {"Authorization": f"Bearer {ALICE}"}
        resp = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}, headers=auth)
        assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"] == "Hello!"
        metrics = samples(http.get("/metrics", headers=auth).text)
    assert (
        metrics[
            (
                "triptych_request_errors_total",
                (("door", "http"), ("kind", "unauthenticated"), ("reason", "unauthenticated")),
            )
        ]
        >= 3
    )


# ------------------------------------------------------------------------------------ ownership
def test_requests_belong_to_their_client(server):
    router = server.router
    with client(server, ALICE) as a, client(server, BOB) as b:
        stream = a.generate("alice-1 go slow", request_id="same-id")
        next(stream)
        assert b.abort("same-id") is False  # not bob's: the same answer as unknown
        assert b.abort("never-was") is False
        other = b.generate("bob-1 go slow", request_id="same-id")  # bob's own "same-id" is no conflict
        next(other)
        assert routed_id(router, "alice-1") != routed_id(router, "bob-1")
        assert a.abort("same-id") is True
        assert list(stream)[-1].finish_reason == "abort"
        other.cancel()


def test_sessions_belong_to_their_client(server):
    router = server.router
    with client(server, ALICE) as a, client(server, BOB) as b:
        a.complete(messages=[{"role": "user", "content": "my secret is 42"}], session_id="s1", max_tokens=4)
        b.complete(messages=[{"role": "user", "content": "repeat my first message"}], session_id="s1", max_tokens=4)
        assert router.inputs[-1].messages == (ChatMessage("user", "repeat my first message"),)
        a.complete(messages=[{"role": "user", "content": "and again"}], session_id="s1", max_tokens=4)
        assert [m.content for m in router.inputs[-1].messages] == ["my secret is 42", "Hello!", "and again"]


def test_one_client_flooding_does_not_lock_out_another(server):
    with client(server, ALICE) as a, client(server, BOB) as b:
        streams = [a.generate(f"flood-{i} go slow", request_id=f"flood-{i}") for i in range(2)]
        for s in streams:
            next(s)
        with pytest.raises(triptych.ResourceExhausted, match="max_requests_per_client = 2"):
            a.complete("hello")
        assert b.complete("hello").text == "Hello!"  # another client is still admitted
        for s in streams:
            s.cancel()
        assert wait_for(lambda: not any(i.startswith("flood") for i in server.gateway.in_flight))
        assert a.complete("hello").text == "Hello!"


# ------------------------------------------------------------------------------------ caps
@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(prompt="x" * 1001), "prompt characters: 1001; the limit is 1000 (server.limits.max_prompt_chars)"),
        (
            dict(messages=[{"role": "user", "content": "x"}] * 9),
            "messages: more than 8; the limit is 8 (server.limits.max_messages)",
        ),
        (dict(prompt="x", images=[PNG] * 3), "images: more than 2; the limit is 2 (server.limits.max_images)"),
        (dict(prompt="x", images=[PNG * 5]), "image 0 bytes: 80; the limit is 64 (server.limits.max_image_bytes)"),
        (dict(prompt="x", stop=["a", "b", "c"]), "stop strings: 3; the limit is 2 (server.limits.max_stop_strings)"),
        (dict(prompt="x", stop=["123456789"]), "stop[0] characters: 9; the limit is 8 (server.limits.max_stop_chars)"),
        (dict(prompt="x", request_id="r" * 17), "request_id length: 17; the limit is 16 (server.limits.max_id_chars)"),
        (dict(messages=[{"role": "user", "content": "x"}], session_id="s" * 17), "session_id length: 17"),
        (dict(prompt="x", request_id="a\nb"), "request_id holds control characters"),
        (dict(prompt="x", max_tokens=101), "max_tokens 101 is above the server's limit of 100"),
        (dict(prompt="x", temperature=float("nan")), "temperature must be a finite number, got nan"),
        (dict(prompt="x", temperature=float("inf")), "temperature must be a finite number"),
        (dict(prompt="x", top_p=float("nan")), "top_p must be a finite number"),
        (dict(token_ids=[1] * 600), "prompt has 600 tokens; the model's context is 512 tokens"),
    ],
)
def test_grpc_caps_name_their_setting(server, kwargs, needle):
    with client(server, ALICE) as c:
        with pytest.raises(triptych.InvalidArgument) as err:
            c.complete(**kwargs)
        assert needle in err.value.message
        assert c.complete("still serving").text == "Hello!"


@pytest.mark.parametrize(
    "body, status, needle",
    [
        (
            {"messages": [{"role": "user", "content": "x"}], "temperature": float("nan")},
            400,
            "NaN is not a JSON number",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "seed": 2**70},
            400,
            "seed must be an integer in [0, 2**64 - 1]",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**30}, 400, "above the server's limit"),
        ({"messages": [{"role": "user", "content": "x"}] * 9}, 400, "messages: 9; the limit is 8"),
        (
            {"messages": [{"role": "user", "content": "x"}] * 1000},  # within the body size (text_request_bytes)
            400,
            "JSON values in the body: 3000; the limit is 2152",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "stop": ["s"] * 3}, 400, "stop strings: 3"),
        ({"messages": [{"role": "user", "content": "x"}], "stop": ["s"] * 3000}, 400, "JSON values in the body"),
        ({"messages": [{"role": "robot" * 10000, "content": "x"}]}, 400, "got 'robotrobotrobot"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image_url",
                                "image_url": {"url": "data:image/png;base64," + base64.b64encode(PNG * 20).decode()},
                            }
                        ],
                    }
                ]
            },
            400,
            "max_image_bytes",
        ),
        ({"model": "x" * 50000, "messages": []}, 404, "does not exist"),
        ({"messages": [{"role": "user", "content": "x" * 100000}]}, 400, "request bytes besides images: 100047"),
    ],
)
def test_http_caps(server, body, status, needle):
    with httpx.Client(base_url=server.url, timeout=10, headers={"Authorization": f"Bearer {ALICE}"}) as http:
        resp = http.post("/v1/chat/completions", content=json.dumps(body, allow_nan=True))
        assert resp.status_code == status and needle in resp.json()["error"]["message"], resp.text[:300]
        assert len(resp.content) < 2000  # a huge value is never echoed back
        assert (
            http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}).status_code == 200
        )


def test_http_hostile_bodies(server):
    with httpx.Client(base_url=server.url, timeout=10, headers={"Authorization": f"Bearer {ALICE}"}) as http:
        deep = http.post("/v1/chat/completions", content=b"[" * 30_000 + b"]" * 30_000)
        assert deep.status_code == 400 and "too deeply nested" in deep.json()["error"]["message"]
        big = http.post("/v1/chat/completions", content=b" " * (LIMITS.max_request_bytes + 1))
        assert big.status_code == 413
        long_id = http.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "x"}]},
            headers={"X-Request-Id": "r" * 50},
        )
        assert long_id.status_code == 400 and "max_id_chars" in long_id.json()["error"]["message"]
        metrics = samples(http.get("/metrics").text)
    assert (
        metrics[
            (
                "triptych_request_errors_total",
                (("door", "http"), ("kind", "invalid_argument"), ("reason", "body_too_large")),
            )
        ]
        >= 1
    )
    assert (
        metrics[
            (
                "triptych_request_errors_total",
                (("door", "http"), ("kind", "invalid_argument"), ("reason", "id_too_long")),
            )
        ]
        >= 1
    )


def test_failure_before_the_first_token_is_a_status(server):
    with client(server, ALICE) as c, pytest.raises(triptych.Internal, match="the prefill failed"):
        list(c.generate("please prefail"))
    with httpx.Client(base_url=server.url, timeout=10, headers={"Authorization": f"Bearer {ALICE}"}) as http:
        for stream in (False, True):
            resp = http.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "please prefail"}], "stream": stream},
            )
            assert resp.status_code == 500 and resp.json()["error"]["message"] == "the prefill failed"
        metrics = samples(http.get("/metrics").text)
    assert (
        metrics[("triptych_request_errors_total", (("door", "grpc"), ("kind", "internal"), ("reason", "failed")))] >= 1
    )


# ------------------------------------------------------------------------------------ TLS
def _certs(tmp_path):
    """A CA, a server certificate for 127.0.0.1 / localhost and a client certificate (openssl)."""

    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp_path)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
    )
    (tmp_path / "ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
        )
        run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            "ext",
        )
    return {n: str(tmp_path / n) for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def test_tls_and_client_certificates(tmp_path):
    c = _certs(tmp_path)
    tls = TlsConfig(cert_file=c["server.pem"], key_file=c["server.key"])
    srv = GatewayThread(config=ServerConfig(host="127.0.0.1", grpc_port=0, http_port=0, admin_port=0, tls=tls))
    try:
        assert srv.url.startswith("https://")
        with triptych.Client(srv.target, timeout=10, root_certificates=c["ca.pem"]) as tc:
            assert tc.complete("hello").text == "Hello!"
        with triptych.Client(srv.target, timeout=3) as plain, pytest.raises(triptych.Unavailable):
            plain.complete("hello")
        assert httpx.get(srv.url + "/health", verify=ssl.create_default_context(cafile=c["ca.pem"])).status_code == 200
        with triptych.Client(srv.admin_target, timeout=10, root_certificates=c["ca.pem"]) as admin:
            assert admin.admin_status().mode == "disaggregated"
    finally:
        srv.stop()
    mtls = TlsConfig(cert_file=c["server.pem"], key_file=c["server.key"], client_ca_file=c["ca.pem"])
    srv = GatewayThread(config=ServerConfig(host="127.0.0.1", grpc_port=0, http_port=0, admin_port=0, tls=mtls))
    try:
        with (
            triptych.Client(srv.target, timeout=3, root_certificates=c["ca.pem"]) as no_cert,
            pytest.raises(triptych.Unavailable),
        ):
            no_cert.complete("hello")
        with triptych.Client(
            srv.target,
            timeout=10,
            root_certificates=c["ca.pem"],
            certificate_chain=c["client.pem"],
            private_key=c["client.key"],
        ) as tc:
            assert tc.complete("hello").text == "Hello!"
        with pytest.raises(httpx.HTTPError):
            httpx.get(srv.url + "/health", verify=ssl.create_default_context(cafile=c["ca.pem"]))
        with_cert = ssl.create_default_context(cafile=c["ca.pem"])
        with_cert.load_cert_chain(c["client.pem"], c["client.key"])
        assert httpx.get(srv.url + "/health", verify=with_cert).status_code == 200
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------ slow clients
def test_slow_and_idle_http_connections_are_closed():
    from cluster.config import ConnectionsConfig
    from tests import attacks

    config = ServerConfig(
        host="127.0.0.1",
        grpc_port=0,
        http_port=0,
        admin_port=0,
        connections=ConnectionsConfig(http_read_timeout_s=0.5, http_keepalive_s=1.0),
    )
    srv = GatewayThread(config=config)
    try:
        target = attacks.Target(srv.target, srv.url)
        assert attacks.slow_body(target).startswith("HTTP 408 after 0.")
        assert attacks.slowloris(target).startswith("closed after 1.")
        assert attacks.idle_connections(target).startswith("100 closed after 1.")
        with triptych.Client(srv.target, timeout=10) as c:
            assert c.complete("hello").text == "Hello!"
    finally:
        srv.stop()


def test_grpc_garbage_and_options(server):
    from cluster import gateway as gw
    from tests import attacks

    assert attacks.raw_grpc(attacks.Target(server.target, server.url, key=ALICE), b"\xff" * 64).startswith(
        "INVALID_ARGUMENT: the request is not a valid GenerateRequest"
    )
    options = dict(gw.grpc_options(ServerConfig()))
    assert options["grpc.max_receive_message_length"] == 16 << 20
    assert options["grpc.max_concurrent_streams"] == 256 and options["grpc.max_connection_idle_ms"] == 300_000
    assert options["grpc.http2.min_recv_ping_interval_without_data_ms"] == 10_000


def test_a_client_that_goes_away_keeps_its_admission_share_until_its_work_ends():
    import asyncio
    import threading

    from cluster import client_share, gateway_service
    from cluster.auth import Principal
    from tests.helpers.gateway import FakeRouter

    async def scenario():
        gate = gateway_service.Gateway(FakeRouter())
        release, running = threading.Event(), []

        def heavy():
            running.append(1)
            release.wait(5)

        mallory = Principal("mallory")
        tasks = []
        for _ in range(8):  # send a heavy request, disconnect, again
            tasks.append(asyncio.ensure_future(gate.off_loop(mallory, heavy)))
            await asyncio.sleep(0.05)
            tasks[-1].cancel()
        await asyncio.sleep(0.2)
        busy = len(running)  # jobs started: only its share of the threads
        ok = await asyncio.wait_for(gate.off_loop(Principal("alice"), lambda: "served"), 2)
        release.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0.1)
        gate.close()
        return busy, ok, gate.shares.admitting()

    busy, ok, left = asyncio.run(scenario())
    assert busy == client_share.ADMISSIONS_PER_CLIENT and ok == "served" and left == 0


def test_duplicate_key_names_are_refused(tmp_path):
    from cluster.config import AuthConfig

    f = tmp_path / "keys"
    f.write_text(f"alice:{ALICE}\nalice:{BOB}\n")
    with pytest.raises(AuthError, match="the name 'alice' is given to more than one key"):
        KeyRing.load(AuthConfig(api_keys_file=str(f)))
    f.write_text(f"alice:{ALICE}\n")
    (tmp_path / "admin").write_text(f"ops:{ALICE}\n")
    with pytest.raises(AuthError, match="a key appears twice"):
        KeyRing.load(AuthConfig(api_keys_file=str(f), admin_keys_file=str(tmp_path / "admin")))


def test_cluster_status_is_cached_so_callers_cannot_load_the_workers(server):
    router = server.router
    calls = []
    status = router.cluster_status

    async def counted():
        calls.append(1)
        return await status()

    router.cluster_status = counted
    try:
        with client(server, ALICE) as c:
            for _ in range(20):
                c.cluster_status()
        with httpx.Client(base_url=server.url, timeout=10, headers={"Authorization": f"Bearer {ALICE}"}) as http:
            for _ in range(10):
                assert http.get("/metrics").status_code == 200
    finally:
        del router.cluster_status
    assert 1 <= len(calls) <= 3  # at most one refresh a second
