"""Prometheus metrics of the gateway, in a registry of their own (never the global default one,
so several gateways — e.g. in tests — can live in one process).

Per-request latencies come from the router's FinalEvent timings (server-measured phases); the
inter-token latency is measured at the gateway as the gap between successive token events,
shared evenly among the tokens of one event. Latency histograms only count requests that
completed (STOP / LENGTH). A request answered with a final chunk, however it ended, counts in
`requests_total`; one answered with an error status instead (refused at the door, or failed before
its first token) counts in `request_errors_total` with its kind and a fixed reason label.
The per-pool / per-worker gauges are refreshed from `router.cluster_status()` on each scrape, and
so are the cluster's own counters (role switches, restarts: counted by the router, exposed as
counters). Every series carries a `model` label: the served model's name, as dashboards built for
other servers expect.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from cluster.router_api import ClusterStatus, FinalEvent
from engine.sequence import FinishReason

CONTENT_TYPE = CONTENT_TYPE_LATEST

_FAST = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
_SLOW = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
_TOKENS = tuple(float(n) for n in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000))


class Metrics:
    def __init__(self, model: str = "") -> None:
        """model: the served model's name, the `model` label of every series."""
        self.model = model
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        m = ["model"]

        def hist(name: str, doc: str, buckets: tuple[float, ...], unit: str = "_seconds"):
            return Histogram(f"triptych_{name}{unit}", doc, m, buckets=buckets, registry=r).labels(model)

        self.ttft = hist("time_to_first_token", "Arrival to first token.", _SLOW)
        self.itl = hist("inter_token_latency", "Gap between output tokens, seen at the gateway.", _FAST)
        self.tpot = hist(
            "time_per_output_token", "A request's decode time over its output tokens after the first.", _FAST
        )
        self.e2e = hist("e2e_request_latency", "Arrival to final chunk.", _SLOW)
        self.queue = hist("queue_time", "Admission wait before any phase started.", _SLOW)
        self.prefill = hist("prefill_time", "Prefill compute time.", _SLOW)
        self.decode = hist("decode_time", "Decode time: first token to the last.", _SLOW)
        self.transfer = hist("kv_transfer_time", "KV transfer time not overlapped with prefill.", _FAST)
        self.encode = hist("encode_time", "Image encoding time.", _SLOW)
        self.prompt_len = hist("request_prompt_tokens", "Prompt tokens of a request.", _TOKENS, unit="")
        self.output_len = hist("request_generation_tokens", "Output tokens of a request.", _TOKENS, unit="")
        self.requests = Counter(
            "triptych_requests",
            "Requests by how they ended and which door they came in.",
            m + ["finish_reason", "door"],
            registry=r,
        )
        self.rejected = Counter(
            "triptych_request_errors",
            "Requests refused or failed before their first token, by error kind and reason "
            "(a fixed label: the limit hit, 'unauthenticated', 'failed', ...).",
            m + ["kind", "door", "reason"],
            registry=r,
        )
        self.tokens = Counter("triptych_tokens_generated", "Completion tokens generated.", m, registry=r).labels(model)
        self.prompt_tokens = Counter(
            "triptych_prompt_tokens",
            "Prompt tokens of requests answered, by the pool that computed them (none: refused or ended first).",
            m + ["pool"],
            registry=r,
        )
        self.cached_tokens = Counter(
            "triptych_prefix_cache_hit_tokens",
            "Prompt tokens found in a worker's prefix cache (not computed), by pool; the hit rate is this over "
            "triptych_prompt_tokens of the same pool.",
            m + ["pool"],
            registry=r,
        )
        self.in_flight = Gauge(
            "triptych_requests_in_flight",
            "Requests the gateway holds: admitted or being admitted, not yet ended.",
            m,
            registry=r,
        ).labels(model)
        self.running = Gauge(
            "triptych_pool_requests_running", "Requests a pool is computing (in a batch).", m + ["role"], registry=r
        )
        self.queue_length = Gauge("triptych_pool_queue_length", "Requests waiting in a pool.", m + ["role"], registry=r)
        self.kv_usage = Gauge(
            "triptych_kv_cache_usage_ratio",
            "Fraction of a worker's KV blocks in use.",
            m + ["role", "worker"],
            registry=r,
        )
        self.kv_cached = Gauge(
            "triptych_prefix_cache_blocks",
            "A worker's cached KV blocks no request holds (prefix caching; reused or evicted on demand).",
            m + ["role", "worker"],
            registry=r,
        )
        self.kv_density = Gauge(
            "triptych_kv_selection_density",
            "Decode-side KV selection: the share of their context's KV blocks the worker's selected "
            "decode rows attended to, since the worker started.",
            m + ["role", "worker"],
            registry=r,
        )
        self.workers_alive = Gauge("triptych_pool_workers_alive", "Live workers in a pool.", m + ["role"], registry=r)
        self.last_switch = Gauge(
            "triptych_last_role_switch_timestamp_seconds",
            "Unix time of the most recent role switch of a worker, by the role it took.",
            m + ["worker", "to_role"],
            registry=r,
        )
        self.epoch = Gauge(
            "triptych_worker_epoch",
            "A worker's epoch (role switches + restarts).",
            m + ["worker", "role"],
            registry=r,
        )
        self._cluster_counters = _ClusterCounters(model)
        r.register(self._cluster_counters)

    def start(self, door: str) -> RequestRecorder:
        return RequestRecorder(self, door)

    def record_rejected(self, kind: str, door: str, reason: str | None = None) -> None:
        self.rejected.labels(model=self.model, kind=kind, door=door, reason=reason or kind).inc()

    def update_cluster(self, status: ClusterStatus) -> None:
        """Refresh the gauges from a cluster snapshot (workers that disappeared are dropped)."""
        for gauge in (
            self.queue_length,
            self.running,
            self.kv_usage,
            self.kv_cached,
            self.kv_density,
            self.workers_alive,
        ):
            gauge.clear()
        self.epoch.clear()
        self.last_switch.clear()
        queued: dict[str, int] = {}
        running: dict[str, int] = {}
        alive: dict[str, int] = {}
        model = self.model
        for w in status.workers:
            role = w.role.value
            queued[role] = queued.get(role, 0) + w.queue_length
            running[role] = running.get(role, 0) + w.running
            alive[role] = alive.get(role, 0) + int(w.alive)
            self.epoch.labels(model=model, worker=w.worker_id, role=role).set(w.epoch)
            if w.kv_blocks_total > 0:
                usage = w.kv_blocks_used / w.kv_blocks_total
                self.kv_usage.labels(model=model, role=role, worker=w.worker_id).set(usage)
                self.kv_cached.labels(model=model, role=role, worker=w.worker_id).set(w.kv_blocks_cached)
            if w.kv_selected_rows:
                self.kv_density.labels(model=model, role=role, worker=w.worker_id).set(w.kv_selection_density)
        for role, n in queued.items():
            self.queue_length.labels(model=model, role=role).set(n)
            self.running.labels(model=model, role=role).set(running[role])
        for role, n in alive.items():
            self.workers_alive.labels(model=model, role=role).set(n)
        latest = {s.worker_id: s for s in status.role_switches}  # oldest first: the last one per worker stays
        for s in latest.values():
            self.last_switch.labels(model=model, worker=s.worker_id, to_role=s.to_role.value).set(s.at_unix_s)
        self._cluster_counters.status = status

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)


class _ClusterCounters:
    """Counters the router keeps (role switches, restarts since the cluster started), exposed as
    Prometheus counters from the last cluster snapshot."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.status: ClusterStatus | None = None

    def collect(self):
        switches = CounterMetricFamily(
            "triptych_role_switches", "Role switches since the cluster started.", labels=["model"]
        )
        restarts = CounterMetricFamily(
            "triptych_worker_restarts",
            "Successful restarts of a worker id since the cluster started.",
            labels=["model", "worker"],
        )
        selected = CounterMetricFamily(
            "triptych_kv_selected_rows",
            "Decode rows that attended to a KV selection (decode-side KV selection), per worker since it started.",
            labels=["model", "role", "worker"],
        )
        rescores = CounterMetricFamily(
            "triptych_kv_selection_rescores",
            "KV selections scored from recent queries (loopserve, snapkv), per worker since it started.",
            labels=["model", "role", "worker"],
        )
        s = self.status
        switches.add_metric([self.model], max(s.switch_count, len(s.role_switches)) if s else 0)
        for worker, n in s.restarts if s else ():
            restarts.add_metric([self.model, worker], n)
        for w in s.workers if s else ():
            if w.kv_selected_rows:
                selected.add_metric([self.model, w.role.value, w.worker_id], w.kv_selected_rows)
                rescores.add_metric([self.model, w.role.value, w.worker_id], w.kv_selection_rescores)
        yield switches
        yield restarts
        yield selected
        yield rescores


class RequestRecorder:
    """Collects one request's metrics while it streams; `finish` records them."""

    def __init__(self, metrics: Metrics, door: str) -> None:
        self._m = metrics
        self._door = door
        self._last: float | None = None

    def on_tokens(self, n: int) -> None:
        now = time.perf_counter()
        if self._last is not None and n > 0:
            gap = (now - self._last) / n
            for _ in range(n):
                self._m.itl.observe(gap)
        self._last = now

    def finish(self, final: FinalEvent) -> None:
        m = self._m
        m.requests.labels(model=m.model, finish_reason=final.finish_reason.value, door=self._door).inc()
        m.tokens.inc(max(0, final.completion_tokens))
        pool = final.prefilled_by or "none"
        m.prompt_tokens.labels(model=m.model, pool=pool).inc(max(0, final.prompt_tokens))
        m.cached_tokens.labels(model=m.model, pool=pool).inc(max(0, final.cached_tokens))
        if final.finish_reason not in (FinishReason.STOP, FinishReason.LENGTH):
            return
        t = final.timings
        m.e2e.observe(t.e2e_s)
        m.queue.observe(t.queue_s)
        m.prompt_len.observe(final.prompt_tokens)
        m.output_len.observe(final.completion_tokens)
        if final.completion_tokens > 0:
            m.ttft.observe(t.ttft_s)
        if final.completion_tokens > 1:
            m.tpot.observe(t.tpot_s)
            m.decode.observe(t.decode_s)
        if t.prefill_s > 0:
            m.prefill.observe(t.prefill_s)
        if t.transfer_s > 0:
            m.transfer.observe(t.transfer_s)
        if t.encode_s > 0:
            m.encode.observe(t.encode_s)
