"""A fake Router and the real gateway running on its own event-loop thread, shared by the gateway,
HTTP and metrics tests; `samples` reads a Prometheus page.

FakeRouter picks its behaviour from the last words of the input (prompt or last message):
"slow" streams until aborted, "steady" streams 200 tokens 25 ms apart, "midfail" fails after one
token, "prefail" before any, ERRORS' keywords raise that
RouterError before the first event ("eager-..." raises from generate() itself), "bug" raises a
plain exception; anything else streams "Hel" "lo" "!" (with made-up log-probabilities when asked)
then FinalEvent(STOP).
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import NamedTuple

from prometheus_client.parser import text_string_to_metric_families

from cluster import gateway as gw
from cluster.config import ServerConfig
from cluster.router_api import (
    ChatMessage,
    ClusterStatus,
    ErrorKind,
    FinalEvent,
    GenerateInput,
    ModelInfo,
    RoleSwitch,
    Router,
    RouterError,
    Timings,
    TokenEvent,
)
from engine.sequence import FinishReason, TokenLogprob
from engine.worker_api import Role, WorkerStatus

MODEL = "fake-model"
MAX_MODEL_LEN = 512
TIMINGS = Timings(
    queue_s=0.01, encode_s=0.0, prefill_s=0.02, transfer_s=0.003, decode_s=0.05, ttft_s=0.04, tpot_s=0.01, e2e_s=0.1
)
ERRORS = {
    "invalid": (ErrorKind.INVALID_ARGUMENT, "prompt is 9000 tokens, max_model_len is 512"),
    "busy": (ErrorKind.RESOURCE_EXHAUSTED, "300 requests waiting (max_queued_requests 256)"),
    "down": (ErrorKind.UNAVAILABLE, "no live decode worker"),
    "late": (ErrorKind.DEADLINE_EXCEEDED, "request timed out after 300 s"),
    "missing": (ErrorKind.NOT_FOUND, "no such session"),
    "crash": (ErrorKind.INTERNAL, "prefill worker died"),
}


def _top(k: int) -> tuple[tuple[int, str, float], ...]:
    return tuple((100 + j, f"<{j}>", -1.0 - j) for j in range(k))


class SetRoleCall(NamedTuple):
    """A set_worker_role call, recorded in FakeRouter.inputs between the requests. It has no
    request id (None), so a search of the inputs by request id passes over it."""

    op: str
    worker_id: str
    role: Role
    reason: str
    drain_timeout_s: float
    request_id = None


def input_text(inp: GenerateInput) -> str:
    if inp.prompt is not None:
        return inp.prompt
    if inp.messages:
        return inp.messages[-1].content
    return "tokens"


class FakeRouter(Router):
    """Records every GenerateInput (and SetRoleCall) in `inputs`, in arrival order."""

    def __init__(self) -> None:
        self.inputs: list[GenerateInput] = []
        self.aborts: list[str] = []  # requests whose stream was closed or aborted early
        self.abort_calls: list[str] = []  # Abort RPC / router.abort() calls
        self.shut_down = False
        self.shares = False  # what shares_choices() answers
        self.trace: list[tuple[str, str]] = []  # ("generate" | "first token", request id), in order
        self._abort_events: dict[str, asyncio.Event] = {}

    def shares_choices(self) -> bool:
        return self.shares

    async def set_worker_role(self, worker_id, role, reason="manual", drain_timeout_s=60.0):
        self.inputs.append(SetRoleCall("set_role", worker_id, role, reason, drain_timeout_s))
        if worker_id == "prefill-0":
            raise RouterError(ErrorKind.FAILED_PRECONDITION, "worker prefill-0 is the last live prefill worker")
        if worker_id.startswith("nope"):
            raise RouterError(ErrorKind.INVALID_ARGUMENT, f"no worker {worker_id!r}")
        return RoleSwitch(worker_id, Role.DECODE, role, 1234.5, reason, epoch=2, drain_s=0.5, switch_s=0.25)

    def generate(self, request: GenerateInput, prepared=None):
        self.inputs.append(request)
        self.trace.append(("generate", request.request_id))
        word = input_text(request).split()[-1] if input_text(request).split() else ""
        if word.startswith("eager-"):
            raise RouterError(*ERRORS[word.removeprefix("eager-")])
        return self._stream(request, word)

    async def _stream(self, request: GenerateInput, word: str):
        if word in ERRORS:
            raise RouterError(*ERRORS[word])
        if word == "bug":
            raise ValueError("fake router bug")
        rid = request.request_id
        aborted = self._abort_events[rid] = asyncio.Event()
        finished = False
        try:
            if word == "slow":
                n = 0
                while not aborted.is_set():
                    yield TokenEvent((7,), "x")
                    n += 1
                    await asyncio.sleep(0.01)
                finished = True
                yield FinalEvent(FinishReason.ABORT, 3, n, "x" * n, TIMINGS)
                return
            if word == "steady":  # 200 tokens, one every 25 ms (the free-loop test's victim)
                for _ in range(200):
                    yield TokenEvent((7,), "x")
                    await asyncio.sleep(0.025)
                finished = True
                yield FinalEvent(FinishReason.LENGTH, 3, 200, "x" * 200, TIMINGS)
                return
            if word == "prefail":  # fails before its first token: the door answers with a status
                finished = True
                yield FinalEvent(
                    FinishReason.ERROR, 3, 0, "", TIMINGS, error="the prefill failed", error_kind=ErrorKind.INTERNAL
                )
                return
            if word == "midfail":
                yield TokenEvent((1,), "a")
                finished = True
                yield FinalEvent(FinishReason.ERROR, 3, 1, "a", TIMINGS, error="decode worker died")
                return
            k = request.sampling.logprobs
            for i, piece in enumerate(["Hel", "lo", "!"]):
                # with logprobs: the token's own, and k alternatives (ids 100.., "<j>", -1 - j)
                lps = () if k is None else (TokenLogprob(10 + i, piece, -0.5 * i, _top(k)),)
                if i == 0:
                    await asyncio.sleep(0.05)  # a prefill takes a while: choices started together overlap
                    self.trace.append(("first token", rid))
                yield TokenEvent((10 + i,), piece, lps)
            finished = True
            yield FinalEvent(FinishReason.STOP, 5, 3, "Hello!", TIMINGS, cached_tokens=2)
        finally:
            self._abort_events.pop(rid, None)
            if not finished:
                self.aborts.append(rid)

    async def abort(self, request_id: str) -> bool:
        self.abort_calls.append(request_id)
        event = self._abort_events.get(request_id)
        if event is None:
            return False
        event.set()
        return True

    def model_info(self) -> ModelInfo:
        return ModelInfo(MODEL, MAX_MODEL_LEN, 1000, (2,), "float32", True)

    async def cluster_status(self) -> ClusterStatus:
        return ClusterStatus(
            mode="disaggregated",
            workers=(
                WorkerStatus("prefill-0", Role.PREFILL, "node-1", True, 3, 1, 10, 100, epoch=1),
                WorkerStatus("decode-0", Role.DECODE, "node-1", True, 0, 2, 50, 200),
                WorkerStatus("decode-1", Role.DECODE, "node-2", False, 1, 0, 0, 200),
            ),
            role_switches=(RoleSwitch("decode-1", Role.PREFILL, Role.DECODE, 12.5, "decode queue"),),
        )

    def count_tokens(self, messages: tuple[ChatMessage, ...]) -> int:
        return sum(len(m.content.split()) + 2 for m in messages)  # one token per word, 2 of markup

    def estimate_tokens(self, message: ChatMessage) -> int:
        return len(message.content.split())

    async def shutdown(self) -> None:
        self.shut_down = True


class GatewayThread:
    """The real gateway (gRPC + HTTP on free loopback ports) on an event loop in its own thread,
    so blocking clients (SDK, httpx, openai) can be used from the test thread."""

    def __init__(self, router: Router | None = None, config: ServerConfig | None = None, **start_kwargs) -> None:
        self.router = router or FakeRouter()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        config = config or ServerConfig(host="127.0.0.1", grpc_port=0, http_port=0, admin_port=0)
        self.running = self.call(gw.start(self.router, config, **start_kwargs))
        self.target = self.running.grpc_target
        self.admin_target = self.running.admin_target
        self.url = self.running.http_url

    @property
    def gateway(self) -> gw.Gateway:
        return self.running.gateway

    def call(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.call(self.running.stop(grace_s=1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


def routed_id(router: FakeRouter, text: str) -> str:
    """The id the router saw for the request whose input starts with `text` (the gateway gives
    the router its own id for each request, not the client's)."""
    return next(
        i.request_id for i in reversed(router.inputs) if isinstance(i, GenerateInput) and input_text(i).startswith(text)
    )


def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """A Prometheus text page as {(sample name, sorted label pairs): value}, without the `model`
    label every series carries (test_metrics.py checks it)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = {k: v for k, v in s.labels.items() if k != "model"}
            out[(s.name, tuple(sorted(labels.items())))] = s.value
    return out
