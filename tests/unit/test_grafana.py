"""deploy/grafana/triptych.json reads only series the gateway exposes, each for the chosen model."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from cluster.metrics import Metrics
from cluster.router_api import ClusterStatus, FinalEvent, Timings
from engine.sequence import FinishReason
from engine.worker_api import Role, WorkerStatus

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "triptych.json"


def _exposed() -> set[str]:
    """Every sample name of a metrics page with one finished request and a cluster snapshot."""
    m = Metrics("m")
    timings = Timings(queue_s=0.01, encode_s=0.1, prefill_s=0.2, transfer_s=0.01, decode_s=0.5, ttft_s=0.3, tpot_s=0.05)
    rec = m.start("grpc")
    rec.on_tokens(1)
    rec.on_tokens(1)
    rec.finish(FinalEvent(FinishReason.STOP, 10, 11, "x", timings, prefilled_by="prefill"))
    m.record_rejected("invalid_argument", "http", "bad_sampling")
    worker = WorkerStatus(
        "decode-0", Role.DECODE, "n", True, 1, 2, 3, 8, kv_blocks_cached=1, kv_selected_rows=4, kv_selection_rescores=1
    )
    m.update_cluster(ClusterStatus("disaggregated", (worker,), switch_count=1, restarts=(("decode-0", 1),)))
    return {s.name for f in text_string_to_metric_families(m.render().decode()) for s in f.samples}


def test_the_dashboard_reads_only_exposed_series_for_the_chosen_model():
    dash = json.loads(DASHBOARD.read_text())
    panels = dash["panels"]
    assert len({p["id"] for p in panels}) == len(panels) and all(p["title"] for p in panels)
    exposed = _exposed()
    used = set()
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            expr = t["expr"]
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
            names = re.findall(r"\btriptych_[a-z0-9_]+", expr)
            assert names, expr
            assert set(names) <= exposed, (p["title"], set(names) - exposed)
            # every series read is the chosen model's
            assert expr.count("triptych_") == expr.count('{model=~"$model"'), expr
            if "histogram_quantile" in expr:
                assert "by (le)" in expr and all(n.endswith("_bucket") for n in names), expr
            used |= set(names)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["model"]["definition"] == "label_values(triptych_requests_total, model)"
    # the series an operator looks at first are all on it
    for name in (
        "requests_total",
        "time_to_first_token_seconds_bucket",
        "time_per_output_token_seconds_bucket",
        "prefix_cache_hit_tokens_total",
        "kv_cache_usage_ratio",
        "requests_in_flight",
    ):
        assert f"triptych_{name}" in used, name
