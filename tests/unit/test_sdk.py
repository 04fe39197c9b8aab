"""SDK tests against a fake Triptych servicer over real loopback gRPC.

The fake picks its behaviour from the prompt text: "hello" streams three chunks and a final
chunk, "slow" streams until cancelled, "invalid"/"busy"/"missing" fail with a status before
streaming, "midfail" fails after one chunk.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import pytest

import triptych
from protos.triptych.v1 import triptych_pb2 as pb
from protos.triptych.v1 import triptych_pb2_grpc as pb_grpc
from triptych import (
    AsyncClient,
    Client,
    FinalChunk,
    FinishReason,
    Role,
    TokenChunk,
)

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 8

_FAILURES = {
    "invalid": (grpc.StatusCode.INVALID_ARGUMENT, "prompt too long"),
    "busy": (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full"),
    "missing": (grpc.StatusCode.NOT_FOUND, "no such session"),
    "down": (grpc.StatusCode.UNAVAILABLE, "restarting"),
}


class FakeTriptych(pb_grpc.TriptychServicer):
    def __init__(self) -> None:
        self.requests: list[pb.GenerateRequest] = []
        self.cancelled: dict[str, threading.Event] = {}
        self.in_flight: set[str] = set()
        self._next_id = 0
        self._lock = threading.Lock()
        self.unavailable = 0  # GetModelInfo answers UNAVAILABLE this many more times
        self.info_calls = 0

    def Generate(self, request, context):
        self.requests.append(request)
        with self._lock:
            self._next_id += 1
            rid = request.request_id or f"srv-{self._next_id}"
        text = request.prompt or "chat"
        if text in _FAILURES:
            context.abort(*_FAILURES[text])
        done = threading.Event()
        cancelled = self.cancelled.setdefault(rid, threading.Event())
        context.add_callback(lambda: None if done.is_set() else cancelled.set())
        self.in_flight.add(rid)
        try:
            if text == "slow":
                for i in range(10_000):
                    yield pb.GenerateResponse(request_id=rid, chunk=pb.TokenChunk(text="x", token_ids=[7], index=i))
                    time.sleep(0.01)
            if text == "midfail":
                yield pb.GenerateResponse(request_id=rid, chunk=pb.TokenChunk(text="a", token_ids=[1], index=0))
                context.abort(grpc.StatusCode.INTERNAL, "decode worker died")
            for i, piece in enumerate(["Hel", "lo", "!"]):
                yield pb.GenerateResponse(request_id=rid, chunk=pb.TokenChunk(text=piece, token_ids=[10 + i], index=i))
            done.set()
            yield pb.GenerateResponse(
                request_id=rid,
                final=pb.FinalChunk(
                    finish_reason=pb.FINISH_REASON_STOP,
                    usage=pb.Usage(prompt_tokens=5, completion_tokens=3, cached_tokens=2),
                    timings=pb.Timings(queue_s=0.01, prefill_s=0.02, ttft_s=0.05, e2e_s=0.1),
                ),
            )
        finally:
            self.in_flight.discard(rid)

    def Abort(self, request, context):
        return pb.AbortResponse(aborted=request.request_id in self.in_flight)

    def GetModelInfo(self, request, context):
        self.info_calls += 1
        if self.unavailable > 0:
            self.unavailable -= 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        return pb.GetModelInfoResponse(
            model="SmolLM2-135M-Instruct",
            max_model_len=8192,
            vocab_size=49152,
            eos_token_ids=[2],
            dtype="float32",
            supports_images=False,
        )

    def GetClusterStatus(self, request, context):
        worker = pb.WorkerStatus(
            worker_id="prefill-0",
            role=pb.ROLE_PREFILL,
            node_id="n1",
            alive=True,
            queue_length=2,
            running=1,
            kv_blocks_used=3,
            kv_blocks_total=100,
            epoch=4,
        )
        return pb.GetClusterStatusResponse(
            mode=pb.MODE_DISAGGREGATED,
            pools=[pb.PoolStatus(role=pb.ROLE_PREFILL, workers=[worker]), pb.PoolStatus(role=pb.ROLE_DECODE)],
            role_switches=[
                pb.RoleSwitch(
                    worker_id="w",
                    from_role=pb.ROLE_DECODE,
                    to_role=pb.ROLE_PREFILL,
                    at_unix_s=1.5,
                    reason="prefill queue",
                )
            ],
        )


@pytest.fixture(scope="module")
def server():
    fake = FakeTriptych()
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_TriptychServicer_to_server(fake, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield fake, f"127.0.0.1:{port}"
    srv.stop(grace=None)


@pytest.fixture()
def client(server):
    with Client(server[1], timeout=10) as c:
        yield c


def test_import_is_light():
    code = "import sys, triptych; bad = [m for m in ('torch', 'ray', 'yaml') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_generate_streams_chunks_then_final(client):
    chunks = list(client.generate("hello", max_tokens=8))
    assert [c.text for c in chunks[:-1]] == ["Hel", "lo", "!"]
    assert all(isinstance(c, TokenChunk) for c in chunks[:-1])
    assert chunks[1].token_ids == (11,) and chunks[1].index == 1
    final = chunks[-1]
    assert isinstance(final, FinalChunk) and final.is_final and final.text == ""
    assert final.finish_reason == FinishReason.STOP == "stop"
    assert final.usage == triptych.Usage(prompt_tokens=5, completion_tokens=3, cached_tokens=2)
    assert final.timings.ttft_s == pytest.approx(0.05) and final.timings.decode_s == 0.0
    assert final.request_id.startswith("srv-")


def test_request_fields_reach_server(server, client):
    fake, _ = server
    list(
        client.generate(
            "hello",
            max_tokens=4,
            temperature=0.0,
            top_p=0.9,
            top_k=5,
            seed=3,
            stop="\n",
            images=[PNG, (b"raw", "image/x-test")],
            request_id="r1",
        )
    )
    req = fake.requests[-1]
    assert req.request_id == "r1" and req.WhichOneof("input") == "prompt"
    s = req.sampling
    assert (s.max_tokens, s.top_k, s.seed, list(s.stop)) == (4, 5, 3, ["\n"])
    assert s.HasField("temperature") and s.temperature == 0.0 and s.top_p == pytest.approx(0.9)
    assert [(i.mime_type, i.data) for i in req.images] == [("image/png", PNG), ("image/x-test", b"raw")]

    list(client.generate("hello"))
    s = fake.requests[-1].sampling
    assert not s.HasField("temperature") and not s.HasField("seed") and s.max_tokens == 0

    list(client.generate(token_ids=[1, 2, 3]))
    assert list(fake.requests[-1].token_ids.ids) == [1, 2, 3]


def test_chat_builds_messages_and_session(server, client):
    fake, _ = server
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": ["What is this?", {"type": "image", "image": PNG}, {"type": "text", "text": "?"}]},
    ]
    completion = client.complete(messages=messages, session_id="s1", max_tokens=8)
    assert completion.text == "Hello!"
    req = fake.requests[-1]
    assert req.session_id == "s1" and req.WhichOneof("input") == "chat"
    msgs = req.chat.messages
    assert [m.role for m in msgs] == ["system", "user"]
    assert [p.WhichOneof("part") for p in msgs[1].content] == ["text", "image", "text"]
    assert msgs[1].content[1].image.mime_type == "image/png"


def test_complete_folds_stream(client):
    c = client.complete("hello", max_tokens=8)
    assert (c.text, c.token_ids, c.finish_reason) == ("Hello!", (10, 11, 12), FinishReason.STOP)
    assert c.usage.completion_tokens == 3


def test_argument_errors_are_local(client):
    with pytest.raises(ValueError):
        client.generate()
    with pytest.raises(ValueError):
        client.generate("a", token_ids=[1])
    with pytest.raises(ValueError):
        client.chat([])
    with pytest.raises(TypeError):
        client.generate("a", images=["not bytes"])


@pytest.mark.parametrize(
    ("prompt", "exc", "code"),
    [
        ("invalid", triptych.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
        ("busy", triptych.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("missing", triptych.NotFound, grpc.StatusCode.NOT_FOUND),
    ],
)
def test_status_errors_are_typed(client, prompt, exc, code):
    with pytest.raises(exc) as info:
        list(client.generate(prompt))
    assert isinstance(info.value, triptych.TriptychError)
    assert info.value.code == code and info.value.message == _FAILURES[prompt][1]
    assert isinstance(info.value.__cause__, grpc.RpcError)


def test_error_after_first_chunk(client):
    stream = client.generate("midfail")
    assert next(stream).text == "a"
    with pytest.raises(triptych.Internal, match="decode worker died"):
        next(stream)


def test_deadline_exceeded(client):
    with pytest.raises(triptych.DeadlineExceeded):
        list(client.generate("slow", timeout=0.2))


def test_unavailable():
    with Client("127.0.0.1:1", timeout=2) as c:
        with pytest.raises(triptych.Unavailable):
            c.model_info()


def test_idempotent_calls_are_retried_on_unavailable_and_generate_is_not(server):
    fake, target = server
    with Client(target, timeout=10) as c:
        fake.unavailable, fake.info_calls = 2, 0
        assert c.model_info().model == "SmolLM2-135M-Instruct"
        assert fake.info_calls == 3  # two UNAVAILABLE answers, retried with backoff
        before = sum(r.prompt == "down" for r in fake.requests)
        with pytest.raises(triptych.Unavailable):
            c.complete(prompt="down")
        assert sum(r.prompt == "down" for r in fake.requests) == before + 1  # not idempotent: sent once
    with Client(target, timeout=10, max_attempts=1) as c:
        fake.unavailable, fake.info_calls = 1, 0
        with pytest.raises(triptych.Unavailable):
            c.model_info()
        assert fake.info_calls == 1
    with pytest.raises(ValueError, match="max_attempts"):
        Client(target, max_attempts=0)


def test_async_client_retries_too(server):
    fake, target = server

    async def go():
        async with AsyncClient(target, timeout=10) as c:
            fake.unavailable, fake.info_calls = 2, 0
            assert (await c.model_info()).model == "SmolLM2-135M-Instruct"
            assert fake.info_calls == 3

    asyncio.run(go())


def test_wait_for_ready_waits_for_a_server_that_comes_up():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_TriptychServicer_to_server(FakeTriptych(), srv)
    srv.add_insecure_port(f"127.0.0.1:{port}")
    starter = threading.Timer(0.5, srv.start)
    try:
        with Client(f"127.0.0.1:{port}", timeout=20, wait_for_ready=True) as c:
            starter.start()  # nothing listens until then: the call waits instead of failing
            assert c.model_info().model == "SmolLM2-135M-Instruct"
    finally:
        starter.join()
        srv.stop(grace=None)


def _wait(event: threading.Event) -> bool:
    return event.wait(timeout=5)


def test_cancel_is_seen_by_server(server, client):
    fake, _ = server
    stream = client.generate("slow", request_id="c1")
    assert next(stream).text == "x"
    stream.cancel()
    assert list(stream) == [] and stream.cancelled
    assert _wait(fake.cancelled["c1"])


def test_break_out_of_loop_cancels(server, client):
    fake, _ = server
    for chunk in client.generate("slow", request_id="c2"):
        if chunk.index == 2:
            break
    assert _wait(fake.cancelled["c2"])


def test_with_block_cancels_and_finished_stream_is_not_cancelled(server, client):
    fake, _ = server
    with client.generate("slow", request_id="c3") as stream:
        next(stream)
    assert _wait(fake.cancelled["c3"])

    with client.generate("hello", request_id="c4") as stream:
        assert list(stream)[-1].finish_reason == FinishReason.STOP
    time.sleep(0.1)
    assert not fake.cancelled["c4"].is_set()


def test_abort_model_info_cluster_status(client):
    stream = client.generate("slow", request_id="a1")
    next(stream)
    assert client.abort("a1") is True
    assert client.abort("nope") is False
    stream.cancel()

    info = client.model_info()
    assert info.model == "SmolLM2-135M-Instruct" and info.eos_token_ids == (2,) and not info.supports_images

    status = client.cluster_status()
    assert status.mode == triptych.Mode.DISAGGREGATED
    worker = status.pool(Role.PREFILL).workers[0]
    assert (worker.worker_id, worker.role, worker.kv_blocks_total, worker.epoch) == ("prefill-0", Role.PREFILL, 100, 4)
    assert status.pool("decode").workers == ()
    assert status.role_switches[0].to_role == Role.PREFILL


# -- AsyncClient ------------------------------------------------------------------------------


def test_async_generate_and_unary(server):
    async def main():
        async with AsyncClient(server[1], timeout=10) as c:
            await c.wait_ready(5)
            chunks = [chunk async for chunk in c.generate("hello", max_tokens=8)]
            completion = await c.complete(messages=[{"role": "user", "content": "hi"}])
            info = await c.model_info()
            status = await c.cluster_status()
            return chunks, completion, info, status

    chunks, completion, info, status = asyncio.run(main())
    assert "".join(c.text for c in chunks) == "Hello!" and chunks[-1].finish_reason == FinishReason.STOP
    assert completion.usage.prompt_tokens == 5
    assert info.vocab_size == 49152 and status.pools[0].role == Role.PREFILL


def test_async_errors_are_typed(server):
    async def main():
        async with AsyncClient(server[1], timeout=10) as c:
            with pytest.raises(triptych.InvalidArgument):
                async for _ in c.generate("invalid"):
                    pass
            with pytest.raises(triptych.DeadlineExceeded):
                async for _ in c.generate("slow", timeout=0.2):
                    pass

    asyncio.run(main())


def test_async_cancel_is_seen_by_server(server):
    fake, _ = server

    async def main():
        async with AsyncClient(server[1], timeout=10) as c:
            stream = c.generate("slow", request_id="ac1")
            await stream.__anext__()
            stream.cancel()
            assert [x async for x in stream] == []

            async def consume():
                async for _ in c.generate("slow", request_id="ac2"):
                    pass

            task = asyncio.create_task(consume())
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())
    assert _wait(fake.cancelled["ac1"]) and _wait(fake.cancelled["ac2"])
