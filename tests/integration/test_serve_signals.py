"""`triptych serve` stops gracefully on SIGTERM (as systemd, Kubernetes and `kill` send it): the
gateway drains, the workers close their transports, nothing is left in /dev/shm. Starting Ray
installs a SIGTERM handler of its own that exits at once; serve takes the signal back."""

import json
import signal
import subprocess
import sys
import time

import pytest

from kv_transfer.segment import list_all_segments, stale_segments

pytestmark = pytest.mark.slow


def test_sigterm_stops_serve_gracefully(tmp_path):
    before = set(list_all_segments())
    config = tmp_path / "deploy.yaml"
    config.write_text(
        json.dumps({"version": 1, "ray": {"num_cpus": 2}, "server": {"grpc_port": 0, "http_port": 0, "admin_port": 0}})
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "triptych.cli", "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if "Press Ctrl-C" in line or not line:
            break
    assert "Press Ctrl-C" in lines[-1], "".join(lines)[-3000:]
    assert set(list_all_segments()) - before, "the decode worker holds its KV segment while serving"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-3000:]
    assert "stopped." in out and "SIGTERM received" not in out
    assert not (set(list_all_segments()) - before) and not stale_segments()
