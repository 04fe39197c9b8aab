"""`triptych serve` / `triptych demo` end to end on a fake controller (no Ray, no model).

cluster.controller is replaced by a module whose start_router returns a FakeRouter, so these
tests exercise everything else for real: config loading, gateway startup on free ports, the SDK
conversation over loopback gRPC, the HTTP call, the timings table and the shutdown order.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import types

import pytest

from cluster import demo, serve
from tests.helpers.gateway import FakeRouter


@pytest.fixture()
def controller(monkeypatch):
    fake = types.ModuleType("cluster.controller")
    fake.routers = []
    fake.calls = []

    async def start_router(config, *, ray_address=None, progress=print):
        progress("fake controller: starting")
        fake.calls.append((config, ray_address))
        router = FakeRouter()
        fake.routers.append(router)
        if getattr(fake, "on_start", None):
            fake.on_start()
        return router

    fake.start_router = start_router
    monkeypatch.setitem(sys.modules, "cluster.controller", fake)
    return fake


def test_demo_runs_conversation_http_and_table(controller):
    lines: list[str] = []

    def out(*args, end="\n", flush=False):
        lines.append(" ".join(map(str, args)) + end)

    rows = asyncio.run(demo.run_demo(None, out=out))
    text = "".join(lines)
    router = controller.routers[0]
    config, address = controller.calls[0]
    assert config.server.grpc_port == 0 and config.server.http_port == 0 and address is None
    assert [r.name for r in rows] == ["gRPC turn 1", "gRPC turn 2", "gRPC turn 3", "HTTP chat"]
    assert all(r.finish_reason == "stop" and r.completion_tokens == 3 for r in rows)
    assert rows[0].ttft_s == pytest.approx(0.04) and rows[-1].transfer_s == pytest.approx(0.003)
    # The third turn carries the whole conversation: 3 user messages and 2 replies.
    assert [m.role for m in router.inputs[2].messages] == ["user", "assistant", "user", "assistant", "user"]
    assert all(i.sampling.temperature == 0.0 and i.sampling.max_tokens == demo.MAX_TOKENS for i in router.inputs)
    assert "assistant> Hello!" in text and "fake controller: starting" in text
    assert "TTFT ms" in text and "transfer ms" in text and "40.0" in text
    assert router.shut_down and text.rstrip().endswith("cluster shut down.")


def test_demo_bad_config_exits_2(tmp_path, capsys):
    bad = tmp_path / "x.yaml"
    bad.write_text("version: 1\npools: {prefill: {workers: -1}}\n")
    assert demo.run(argparse.Namespace(config=str(bad), address=None)) == 2
    assert "pools.prefill.workers" in capsys.readouterr().err


def _serve_args(**kw):
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    argv = []
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return parser.parse_args(argv)


def test_serve_config_errors_are_one_line_exit_2(tmp_path, capsys):
    assert serve.run(_serve_args(config=tmp_path / "missing.yaml")) == 2
    err = capsys.readouterr().err
    assert "missing.yaml" in err and "cannot read file" in err and err.count("\n") == 1
    assert serve.run(_serve_args(config="deploy/local.yaml", grpc_port=70000)) == 2
    assert "server.grpc_port" in capsys.readouterr().err


def _gloo_config(tmp_path) -> str:
    """deploy/local.yaml with the gloo transport, which may join a (multi-node) Ray cluster."""
    path = tmp_path / "gloo.yaml"
    path.write_text(open("deploy/local.yaml").read().replace("backend: shm", "backend: gloo"))
    return str(path)


def test_serve_overrides(tmp_path):
    cfg = serve.config_from_args(_serve_args(config=_gloo_config(tmp_path), grpc_port=0, http_port=0, address="auto"))
    assert (cfg.server.grpc_port, cfg.server.http_port, cfg.ray.address) == (0, 0, "auto")


def test_serve_refuses_shm_when_joining_a_cluster(capsys):
    assert serve.run(_serve_args(config="deploy/local.yaml", address="auto")) == 2
    err = capsys.readouterr().err
    assert "transport.backend" in err and "'shm'" in err and "within one node" in err


def test_start_serving_shuts_router_down_when_bind_fails(controller):
    import socket

    from cluster import gateway as gw

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        cfg = serve.config_from_args(_serve_args(config="deploy/local.yaml", grpc_port=0, http_port=s.getsockname()[1]))
        with pytest.raises(gw.BindError):
            asyncio.run(serve.start_serving(cfg, progress=lambda *a, **k: None))
    assert controller.routers[0].shut_down


def test_serve_until_sigterm(controller, tmp_path, capsys):
    loop_holder = {}

    def on_start():
        loop_holder["loop"] = asyncio.get_running_loop()
        loop_holder["loop"].call_later(0.3, os.kill, os.getpid(), signal.SIGTERM)

    controller.on_start = on_start
    args = _serve_args(config=_gloo_config(tmp_path), grpc_port=0, http_port=0, address="10.0.0.1:6379")
    assert serve.run(args) == 0
    out = capsys.readouterr().out
    assert "gRPC    127.0.0.1:" in out and "HTTP    http://127.0.0.1:" in out and "stopped." in out
    assert controller.calls[0][1] == "10.0.0.1:6379" and controller.routers[0].shut_down


def test_exposure_warnings():
    from cluster.config import parse_config
    from cluster.serve import exposure_warnings

    assert exposure_warnings(parse_config({"version": 1}, "x")) == []  # loopback: no warning
    open_ = exposure_warnings(parse_config({"version": 1, "server": {"host": "0.0.0.0"}}, "x"))
    assert len(open_) == 2 and "ANYONE who can reach" in open_[0] and "clear text" in open_[1]
    closed = parse_config(
        {
            "version": 1,
            "server": {
                "host": "0.0.0.0",
                "auth": {"api_keys_file": "/k"},
                "tls": {"cert_file": "/c", "key_file": "/k"},
            },
        },
        "x",
    )
    assert exposure_warnings(closed) == []
