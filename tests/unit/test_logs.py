"""`triptych serve`'s logs: timestamps, levels and the request id on every line, text or JSON; an
HTTP access log on demand; ignored OpenAI fields said once each; refusals said with their reason
without flooding the log."""

from __future__ import annotations

import io
import json
import logging

import httpx
import pytest

from cluster import logs
from cluster.config import ServerConfig
from cluster.openai_request import note_ignored_fields
from tests.helpers.gateway import MODEL, GatewayThread


@pytest.fixture()
def restore_root():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def test_text_and_json_lines_carry_time_level_and_request_id(restore_root):
    out = io.StringIO()
    logs.configure("info", "json", out)
    token = logs.REQUEST_ID.set("req-42")
    try:
        logging.getLogger("cluster.dispatch").warning("decode worker %s died", "decode-0")
        logging.getLogger("cluster.dispatch").debug("not shown at info")
    finally:
        logs.REQUEST_ID.reset(token)
    (line,) = out.getvalue().splitlines()
    record = json.loads(line)
    assert record["level"] == "warning" and record["logger"] == "cluster.dispatch"
    assert record["request_id"] == "req-42" and record["msg"] == "decode worker decode-0 died"
    assert record["ts"].endswith("Z") and "T" in record["ts"]
    out = io.StringIO()
    logs.configure("debug", "text", out)
    logging.getLogger("x").debug("outside a request")
    assert out.getvalue().rstrip().endswith("DEBUG x [-] outside a request")
    assert out.getvalue()[:4].isdigit()  # starts with the date
    with pytest.raises(ValueError, match="log level"):
        logs.configure("loud")


def test_ignored_openai_fields_are_logged_once_each(caplog):
    caplog.set_level(logging.DEBUG, logger="cluster.openai_request")
    for _ in range(3):
        note_ignored_fields({"model": "m", "messages": [], "store": True, "metadata": {}})
    lines = [r.getMessage() for r in caplog.records]
    assert sorted(lines) == [
        "ignoring OpenAI request field 'metadata': this server does not use it",
        "ignoring OpenAI request field 'store': this server does not use it",
    ]


def test_http_access_log_and_refusals_in_the_log(caplog):
    caplog.set_level(logging.INFO)
    srv = GatewayThread(config=ServerConfig(host="127.0.0.1", grpc_port=0, http_port=0, admin_port=0, access_log=True))
    try:
        with httpx.Client(base_url=srv.url, timeout=10) as c:
            ok = c.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
            assert ok.status_code == 200
            for _ in range(3):
                bad = c.post("/v1/chat/completions", json={"model": MODEL, "messages": [], "n": 2})
                assert bad.status_code == 400
    finally:
        srv.stop()
    access = [r.getMessage() for r in caplog.records if r.name == "triptych.access"]
    assert any('"POST /v1/chat/completions HTTP/1.1" 200' in a and "request_id=" in a for a in access)
    refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused a http request")]
    assert len(refused) == 1 and "(invalid_argument, bad_request)" in refused[0]  # one line per 10 s per reason
