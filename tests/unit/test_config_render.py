"""cluster.render: the multinode example renders to valid YAML / commands with pool resources."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import pytest
import yaml

from cluster import render
from cluster.config import parse_config

REPO = Path(__file__).resolve().parents[2]
MULTINODE = str(REPO / "deploy" / "multinode.yaml")


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    render.add_arguments(parser)
    return parser.parse_args([MULTINODE, *argv])


def _run(capsys, *argv: str) -> str:
    assert render.run(_args(*argv)) == 0
    return capsys.readouterr().out


def test_commands(capsys):
    out = _run(capsys, "--format", "commands", "--head-address", "10.0.0.1")
    starts = [shlex.split(line) for line in out.splitlines() if line.startswith("ray start")]
    assert starts[0][:3] == ["ray", "start", "--head"]
    workers = {}
    for argv in starts[1:]:
        assert "--address=10.0.0.1:6379" in argv
        res = json.loads(next(a for a in argv if a.startswith("--resources=")).split("=", 1)[1])
        workers.update(res)
    assert workers == {"prefill": 1, "decode": 1}
    assert out.rstrip().endswith(f"triptych serve --config {MULTINODE} --address auto")


def test_ray_up(capsys):
    doc = yaml.safe_load(_run(capsys, "--format", "ray-up"))
    types = doc["available_node_types"]
    assert doc["head_node_type"] == "head" and doc["max_workers"] == 2
    assert types["prefill"]["resources"] == {"CPU": 2, "GPU": 0, "prefill": 1}
    assert types["decode"]["resources"]["decode"] == 1
    assert types["prefill"]["min_workers"] == types["prefill"]["max_workers"] == 1
    assert "prefill" not in types["head"]["resources"]


def test_kuberay(capsys):
    doc = yaml.safe_load(_run(capsys, "--format", "kuberay", "--image", "me/triptych:1"))
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    groups = {g["groupName"]: g for g in doc["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"prefill", "decode"}
    params = groups["prefill"]["rayStartParams"]
    assert json.loads(json.loads(params["resources"])) == {"prefill": 1}  # shell-quoted JSON string
    assert groups["decode"]["replicas"] == 1
    head = doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] == "me/triptych:1"
    assert 50051 in [p["containerPort"] for p in head["ports"]]


def test_node_groups_pack_workers_and_gpus():
    cfg = parse_config(
        {
            "version": 1,
            "pools": {
                "prefill": {"workers": 3, "num_cpus": 0.5, "num_gpus": 1, "resources": {"prefill": 1}},
                "decode": {"workers": 2, "num_gpus": 2},
                "encode": {"workers": 1},
            },
        }
    )
    groups = {g.name: g for g in render.node_groups(cfg, workers_per_node=2)}
    assert list(groups) == ["encode", "prefill", "decode"]
    assert (groups["prefill"].count, groups["prefill"].num_cpus, groups["prefill"].num_gpus) == (2, 1, 2)
    assert groups["prefill"].resources == {"prefill": 2}
    assert (groups["decode"].count, groups["decode"].num_gpus) == (1, 4)
    assert (groups["encode"].count, groups["encode"].resources) == (1, {"encode": 1})


def test_colocated_example_renders_one_pool(capsys):
    assert render.main([str(REPO / "deploy" / "colocated.yaml"), "--format", "ray-up"]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    assert set(doc["available_node_types"]) == {"head", "colocated"}


def test_bad_config_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\npools: {prefill: {workers: -1}}\n")
    assert render.main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml: pools.prefill.workers" in err


@pytest.mark.parametrize("fmt", render.FORMATS)
def test_multinode_yaml_renders(capsys, fmt):
    assert render.main([MULTINODE, "--format", fmt]) == 0
    assert capsys.readouterr().out


def test_a_same_node_transport_is_refused_for_a_rendered_cluster(capsys):
    """local.yaml moves KV over shared memory: a cluster of several nodes cannot."""
    assert render.main([str(REPO / "deploy" / "local.yaml")]) == 2
    err = capsys.readouterr().err
    assert "transport.backend: 'shm' works only within one node" in err and "gloo" in err


def test_keys_and_tls_are_passed_by_reference(tmp_path):
    import argparse

    from cluster.config import parse_config
    from cluster.render import kuberay_manifest, ray_up_config, render_commands

    cfg = parse_config(
        {
            "version": 1,
            "server": {
                "host": "0.0.0.0",
                "auth": {"api_keys_file": "/etc/t/keys", "admin_keys_env": "T_ADMIN_KEYS"},
                "tls": {"cert_file": "/etc/t/tls.pem", "key_file": "/etc/t/tls.key"},
            },
        },
        str(tmp_path / "sec.yaml"),
    )
    args = argparse.Namespace(
        workers_per_node=1,
        head_address="HEAD",
        port=6379,
        head_cpus=2,
        cluster_name=None,
        image=None,
        memory="8Gi",
        provider="aws",
        region="us-west-2",
    )
    commands = render_commands(cfg, args)
    assert "/etc/t/keys" in commands and "export T_ADMIN_KEYS=..." in commands
    assert "RAY_AUTH_MODE" not in commands  # Ray's token authentication is left on
    assert ray_up_config(cfg, args)["file_mounts"]["/etc/t/tls.key"] == "/etc/t/tls.key"
    head = kuberay_manifest(cfg, args)["spec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["subPath"] for m in head["containers"][0]["volumeMounts"]}
    assert mounts == {"/etc/t/keys": "keys", "/etc/t/tls.pem": "tls.pem", "/etc/t/tls.key": "tls.key"}
    assert head["volumes"][0]["secret"]["secretName"] == "triptych-sec-secrets"
    assert head["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"] == {
        "name": "triptych-sec-secrets",
        "key": "t-admin-keys",
    }
