"""Prometheus metrics: own registry, recorded per request, gauges refreshed on scrape."""

from __future__ import annotations

import httpx
import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

import triptych
from cluster.metrics import Metrics
from cluster.router_api import FinalEvent, Timings
from engine.sequence import FinishReason
from tests.helpers.gateway import MODEL, GatewayThread, samples


@pytest.fixture(scope="module")
def server():
    srv = GatewayThread()
    yield srv
    srv.stop()


def test_metrics_after_requests(server):
    with triptych.Client(server.target, timeout=10) as c:
        c.complete("hello")
        c.complete("please midfail")
    with httpx.Client(base_url=server.url, timeout=10) as http:
        assert (
            http.post(
                "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
            ).status_code
            == 200
        )
        assert http.post("/v1/completions", json={"model": MODEL, "prompt": "busy"}).status_code == 429
        resp = http.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    s = samples(resp.text)
    for name in (
        "time_to_first_token",
        "inter_token_latency",
        "e2e_request_latency",
        "queue_time",
        "prefill_time",
        "kv_transfer_time",
    ):
        assert s[(f"triptych_{name}_seconds_count", ())] >= 1, name
    assert ("triptych_encode_time_seconds_count", ()) in s  # declared, no observation without images
    assert s[("triptych_time_to_first_token_seconds_sum", ())] == pytest.approx(
        0.04 * s[("triptych_time_to_first_token_seconds_count", ())]
    )
    assert s[("triptych_requests_total", (("door", "grpc"), ("finish_reason", "stop")))] >= 1
    assert s[("triptych_requests_total", (("door", "grpc"), ("finish_reason", "error")))] >= 1
    assert s[("triptych_requests_total", (("door", "http"), ("finish_reason", "stop")))] >= 1
    assert (
        s[
            (
                "triptych_request_errors_total",
                (("door", "http"), ("kind", "resource_exhausted"), ("reason", "resource_exhausted")),
            )
        ]
        >= 1
    )
    assert s[("triptych_tokens_generated_total", ())] >= 7
    assert s[("triptych_pool_queue_length", (("role", "prefill"),))] == 3
    assert s[("triptych_pool_queue_length", (("role", "decode"),))] == 1
    assert s[("triptych_kv_cache_usage_ratio", (("role", "decode"), ("worker", "decode-0")))] == pytest.approx(0.25)
    assert s[("triptych_pool_workers_alive", (("role", "decode"),))] == 1
    assert s[("triptych_role_switches_total", ())] == 1
    assert ("triptych_pool_requests_running", (("role", "decode"),)) in s
    assert s[("triptych_requests_in_flight", ())] == 0  # all ended
    for name in ("time_per_output_token_seconds", "decode_time_seconds"):
        assert s[(f"triptych_{name}_count", ())] >= 1, name
    assert s[("triptych_request_prompt_tokens_count", ())] >= 1
    assert s[("triptych_request_generation_tokens_sum", ())] >= 3
    # every series names the model, and the router's counters are counters
    families = list(text_string_to_metric_families(resp.text))
    assert {f.name for f in families if f.type == "counter"} >= {"triptych_role_switches", "triptych_worker_restarts"}
    for f in families:
        if f.name.startswith("triptych_"):
            assert all(x.labels.get("model") == MODEL for x in f.samples), f.name


def test_own_registry_not_global():
    a, b = Metrics(), Metrics()  # two in one process: no duplicate-registration error
    a.start("grpc").finish(FinalEvent(FinishReason.STOP, 1, 2, "hi", Timings(ttft_s=0.1, e2e_s=0.2)))
    assert b"triptych_requests_total" in a.render()
    assert (
        prometheus_client.REGISTRY.get_sample_value(
            "triptych_requests_total", {"finish_reason": "stop", "door": "grpc"}
        )
        is None
    )
    assert samples(b.render().decode())[("triptych_tokens_generated_total", ())] == 0


def test_prompt_and_cache_hit_tokens_are_counted_per_pool():
    m = Metrics()
    m.start("grpc").finish(
        FinalEvent(FinishReason.STOP, 40, 2, "hi", Timings(), cached_tokens=32, prefilled_by="decode")
    )
    m.start("grpc").finish(
        FinalEvent(FinishReason.STOP, 50, 2, "hi", Timings(), cached_tokens=16, prefilled_by="prefill")
    )
    m.start("http").finish(FinalEvent(FinishReason.ERROR, 9, 0, "", Timings(), error="refused"))
    s = samples(m.render().decode())
    assert s[("triptych_prompt_tokens_total", (("pool", "decode"),))] == 40
    assert s[("triptych_prefix_cache_hit_tokens_total", (("pool", "decode"),))] == 32
    assert s[("triptych_prompt_tokens_total", (("pool", "prefill"),))] == 50
    assert s[("triptych_prefix_cache_hit_tokens_total", (("pool", "prefill"),))] == 16
    assert s[("triptych_prompt_tokens_total", (("pool", "none"),))] == 9


def test_aborted_requests_skip_latency_histograms():
    m = Metrics()
    m.start("http").finish(FinalEvent(FinishReason.ABORT, 1, 2, "hi", Timings(ttft_s=0.1, e2e_s=0.2)))
    s = samples(m.render().decode())
    assert s[("triptych_e2e_request_latency_seconds_count", ())] == 0
    assert s[("triptych_requests_total", (("door", "http"), ("finish_reason", "abort")))] == 1


def test_switch_restart_and_epoch_gauges():
    from cluster.router_api import ClusterStatus, RoleSwitch
    from engine.worker_api import Role, WorkerStatus

    m = Metrics()
    status = ClusterStatus(
        "disaggregated",
        (WorkerStatus("decode-1", Role.PREFILL, "n", True, 0, 0, 0, 0, epoch=3),),
        (
            RoleSwitch("decode-1", Role.DECODE, Role.PREFILL, 100.0, "manual", epoch=1),
            RoleSwitch("decode-1", Role.PREFILL, Role.DECODE, 200.0, "manual", epoch=2),
            RoleSwitch("decode-1", Role.DECODE, Role.PREFILL, 300.0, "policy", epoch=3),
        ),
        switch_count=300,
        restarts=(("decode-0", 2),),
    )
    m.update_cluster(status)
    s = samples(m.render().decode())
    assert s[("triptych_role_switches_total", ())] == 300  # all since start, not the kept history
    assert s[("triptych_last_role_switch_timestamp_seconds", (("to_role", "prefill"), ("worker", "decode-1")))] == 300.0
    assert s[("triptych_worker_restarts_total", (("worker", "decode-0"),))] == 2
    assert s[("triptych_worker_epoch", (("role", "prefill"), ("worker", "decode-1")))] == 3
