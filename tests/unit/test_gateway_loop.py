"""The gateway's event loop stays free while a hostile client sends oversized requests: every
oversized kind of tests/attacks.py, sent from another process (as an attacker would), while a
victim streams. Parsing, tokenizing (the real SmolLM2 tokenizer), chat templating and image
decoding run on the admission threads after the door's caps, so the victim's inter-token gaps
stay within 2x of what they are with no attacker."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

import pytest

from cluster.config import ServerConfig
from cluster.router import ClusterRouter
from cluster.router_api import ModelInfo
from tests import attacks
from tests.helpers.gateway import FakeRouter, GatewayThread

pytestmark = pytest.mark.slow
INFO = ModelInfo("fake-model", 8192, 49152, (2,), "float32", True)


class PreparingRouter(FakeRouter):
    """Streams like FakeRouter, but admits like the real router: prepare() tokenizes with the real
    tokenizer, applies the chat template and decodes images (ClusterRouter.prepare)."""

    def __init__(self, tokenizer) -> None:
        super().__init__()
        self.real = ClusterRouter(
            mode="disaggregated",
            tokenizer=tokenizer,
            model_info=INFO,
            kv_capacity_tokens=32768,
            prefill=[],
            decode=[],
            max_inflight=256,
            default_timeout_s=60.0,
            max_image_pixels=ServerConfig().limits.max_image_pixels,
        )

    def model_info(self) -> ModelInfo:
        return INFO

    def prepare(self, request):
        return self.real.prepare(request)

    def count_tokens(self, messages):
        return self.real.count_tokens(messages)

    def estimate_tokens(self, message):
        return self.real.estimate_tokens(message)


def _victim(target: str, streams: int | None = None) -> subprocess.Popen:
    """An ordinary client in its own process (tests/helpers/victim.py), so that the gaps it times
    are the gateway's, not this process's threads waiting for the GIL."""
    cmd = [sys.executable, "-m", "tests.helpers.victim", target]
    cmd += ["--streams", str(streams)] if streams else []
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _gaps(victim: subprocess.Popen) -> list[float]:
    out, _ = victim.communicate("", timeout=120)  # stdin closed: it finishes its stream and prints
    assert victim.returncode == 0
    return json.loads(out)


def test_oversized_requests_do_not_stall_other_clients(smol_tokenizer):
    srv = GatewayThread(PreparingRouter(smol_tokenizer))
    try:
        calm = _gaps(_victim(srv.target, streams=3))
        victim = _victim(srv.target)
        time.sleep(1.0)
        t0 = time.monotonic()
        # The attacker's process runs at the lowest priority: it stands for a client on another
        # machine (building 15-40 MB bodies is its CPU, not the server's); the gateway's work for its
        # requests keeps full priority, so a loop stall still shows in the victim's gaps.
        out = subprocess.run(
            [sys.executable, "-m", "tests.attacks", "--grpc", srv.target, "--http", srv.url, "--oversized"]
            + ["--nice", "19"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        attack_s = time.monotonic() - t0
        time.sleep(0.5)
        loaded = _gaps(victim)
    finally:
        srv.stop()
    assert out.returncode == 0, out.stderr[-2000:]
    answers = json.loads(out.stdout)
    wrong = {name: got for name, got in answers.items() if not got.startswith(attacks.BY_NAME[name].expect)}
    assert not wrong, wrong
    # p99: a stall of the loop is a handful of long gaps, which a median or p90 would not see
    # (tokenizing the char-cap prompt on the loop stalls it ~200 ms; on a thread, ~10 ms).
    p99 = lambda xs: statistics.quantiles(xs, n=100)[-1]  # noqa: E731
    print(
        f"victim gaps: calm p99 {p99(calm) * 1e3:.1f} ms (n={len(calm)}), under {len(answers)} oversized "
        f"attacks ({attack_s:.1f}s) p99 {p99(loaded) * 1e3:.1f} ms (n={len(loaded)}), max {max(loaded) * 1e3:.0f} ms"
    )
    assert len(loaded) > 100
    assert p99(loaded) <= 2 * p99(calm), (p99(calm), p99(loaded))
