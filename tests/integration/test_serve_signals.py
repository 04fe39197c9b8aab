"""`triptych serve` under the two ways an operator stops it.

SIGKILL of the whole process tree mid-request (the gateway and router, Ray's processes, the
prefill and decode workers): no shared memory of the killed processes is held afterwards, with no
reaper (kv_transfer/segment.py), and a fresh start on the same machine serves normally.

SIGTERM (as systemd, Kubernetes and `kill` send it) stops it gracefully: the gateway drains, the
workers close their transports, nothing is held. Starting Ray installs a SIGTERM handler of its
own that exits at once; serve takes the signal back. That second start joins a cluster made by
`ray start --head`, with Ray's token authentication on, as a new user following the rendered
commands would."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import triptych
from tests.helpers.models import SMOL_NEW_TOKENS
from engine.worker_api import free_port
from kv_transfer.segment import creator_pid, held_segments, orphaned_segments

pytestmark = pytest.mark.slow
FREED_WITHIN_S = 10.0  # the kernel frees at once; this allows for the processes to be torn down


def _serve(
    config: Path, env: dict | None = None, address: str | None = None
) -> tuple[subprocess.Popen, str, list[str]]:
    """Start `triptych serve` in a session of its own; returns it, its gRPC target and its output."""
    cmd = [sys.executable, "-m", "triptych.cli", "serve", "--config", str(config)]
    proc = subprocess.Popen(
        cmd + (["--address", address] if address else []),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env=env,
    )
    lines: list[str] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if "Press Ctrl-C" in line or not line:
            break
    out = "".join(lines)
    assert "Press Ctrl-C" in lines[-1], out[-3000:]
    target = re.search(r"gRPC\s+(\S+:\d+)", out)
    assert target, out[-3000:]
    return proc, target.group(1), lines


def _tree(root: int) -> set[int]:
    """`root` and every process descended from it."""
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                stat = (p / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(p.name))
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        tree.add(pid)
        todo += children.get(pid, [])
    return tree


def _kill_tree(root: int) -> None:
    for pid in _tree(root):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _stream_until_killed(target: str) -> threading.Event:
    """A client streaming a long answer from `target` in the background; the event is set once
    tokens flow. The stack is killed under it: its errors are expected."""
    streaming = threading.Event()

    def client() -> None:
        try:
            with triptych.Client(target, timeout=120) as c:
                for _ in c.generate("Count from one to one hundred.", max_tokens=200, ignore_eos=True):
                    streaming.set()
        except Exception:
            pass

    threading.Thread(target=client, daemon=True).start()
    return streaming


def _freed(ours: set[str]) -> set[str]:
    """Of `ours`, what is still held after FREED_WITHIN_S."""
    deadline = time.monotonic() + FREED_WITHIN_S
    while (left := ours & set(held_segments())) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_sigkill_of_the_stack_strands_no_memory_and_a_fresh_start_serves(tmp_path):
    before = set(held_segments())
    config = tmp_path / "deploy.yaml"
    config.write_text(
        json.dumps({"version": 1, "ray": {"num_cpus": 2}, "server": {"grpc_port": 0, "http_port": 0, "admin_port": 0}})
    )
    proc, target, _ = _serve(config)
    assert _stream_until_killed(target).wait(120), "no token streamed"
    pids = _tree(proc.pid)
    ours = {n for n in set(held_segments()) - before if creator_pid(n) in pids}
    _kill_tree(proc.pid)  # the whole tree at once, mid-request: nothing gets to clean up
    assert {n.rsplit("-", 1)[1] for n in ours} >= {"kv", "ctl"}, "the decode worker holds its KV cache"
    proc.wait(30)
    assert not (left := _freed(ours)), f"shared memory of killed processes still held: {left}"
    assert not list(Path("/dev/shm").glob("triptych-*"))

    # A fresh start on the same machine serves, here joining a Ray cluster started by `ray start
    # --head`, which turns Ray's token authentication on: serve finds the token as a new user's
    # shell would have it (RAY_AUTH_MODE unset). Then SIGTERM stops it gracefully.
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    port = free_port()
    ray_bin = str(Path(sys.executable).with_name("ray"))
    head = [ray_bin, "start", "--head", f"--port={port}", "--num-cpus=3", "--include-dashboard=false"]
    head += ["--resources", json.dumps({"prefill": 1, "decode": 1}), "--disable-usage-stats"]
    subprocess.run(head, env=env, check=True, capture_output=True, timeout=180)
    joined = tmp_path / "joined.yaml"  # a same-node transport is refused when joining a cluster
    joined.write_text(json.dumps({**json.loads(config.read_text()), "transport": {"backend": "gloo"}}))
    try:
        proc, target, _ = _serve(joined, env=env, address=f"127.0.0.1:{port}")
        try:
            with triptych.Client(target, timeout=120) as c:
                done = c.complete("Say hi.", max_tokens=4)
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=180)
        finally:
            _kill_tree(proc.pid)  # whatever failed above: no server outlives the test
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)
    assert not done.error and done.text, done
    assert proc.returncode == 0, out[-3000:]
    assert "stopped." in out and "SIGTERM received" not in out
    deadline = time.monotonic() + 15  # its workers' processes may take a moment to end
    while set(held_segments()) - before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not (set(held_segments()) - before) and not orphaned_segments()


def _multinode_stack(transport: str) -> tuple[subprocess.Popen, str]:
    """A serving stack on three simulated nodes (tests/helpers/multinode_stack.py), every process
    of it in one tree of a session of its own; returns it and its gRPC target."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.multinode_stack", "--transport", transport],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    lines: list[str] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (lines and lines[-1].startswith("READY")):
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
    if not (lines and lines[-1].startswith("READY")):
        _kill_tree(proc.pid)
        pytest.fail("the multinode stack did not start:\n" + "".join(lines)[-3000:])
    return proc, lines[-1].split()[1]


def test_sigkill_of_a_multinode_stack_strands_no_memory_and_a_fresh_start_serves(smol_chats, smol_reference):
    """The same on three simulated nodes (each with its own raylet): the prefill worker on one node
    maps the cache of the decode worker on another. SIGKILL of every process of every node (each
    node's Ray dying with its workers) mid-request frees all of it. A fresh stack on the same
    machine, its KV now crossing the nodes over gloo (as between real machines), serves three of
    the shared chats (10..1800 tokens; tests/integration/test_disaggregated.py runs others on one
    node) concurrently, token-identical to transformers."""
    before, shm_before = set(held_segments()), set(os.listdir("/dev/shm"))
    proc, target = _multinode_stack("shm")
    try:
        with triptych.Client(target, timeout=60) as c:
            nodes = {w.role.value: w.node_id for p in c.cluster_status().pools for w in p.workers}
        assert nodes["prefill"] != nodes["decode"], nodes
        assert _stream_until_killed(target).wait(120), "no token streamed"
        pids = _tree(proc.pid)
        ours = {n for n in set(held_segments()) - before if creator_pid(n) in pids}
        cache = {n for n in ours if n.endswith("-kv")}
        assert cache, "the decode worker holds its KV cache in a segment"
        # the cache is mapped across nodes: by the decode worker and by the prefill worker
        assert len({pid for pid in pids if cache & set(held_segments(pid))}) >= 2
    finally:
        _kill_tree(proc.pid)  # every node's processes at once, mid-request
    proc.wait(30)
    assert not (left := _freed(ours)), f"shared memory of killed processes still held: {left}"
    assert set(os.listdir("/dev/shm")) - shm_before == set()

    proc, target = _multinode_stack("gloo")
    picked = [1, 9, 17]
    try:
        with triptych.Client(target, timeout=300) as c:
            nodes = {w.role.value: w.node_id for p in c.cluster_status().pools for w in p.workers}
            with ThreadPoolExecutor(len(picked)) as pool:
                answers = list(
                    pool.map(
                        lambda i: c.complete(messages=smol_chats[i], max_tokens=SMOL_NEW_TOKENS, temperature=0), picked
                    )
                )
        fresh = {n for n in set(held_segments()) - before if creator_pid(n) in _tree(proc.pid)}
    finally:
        _kill_tree(proc.pid)
    proc.wait(30)
    assert nodes["prefill"] != nodes["decode"], nodes
    assert [a.error for a in answers] == [""] * len(picked)
    assert [list(a.token_ids) for a in answers] == [smol_reference[i] for i in picked]
    assert not _freed(fresh) and not orphaned_segments()
