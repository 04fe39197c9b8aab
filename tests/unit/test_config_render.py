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
    # worker nodes join with the head's token (Ray turns token authentication on at `ray start --head`)
    lines = out.splitlines()
    token = next(i for i, line in enumerate(lines) if line.startswith("export RAY_AUTH_MODE=token RAY_AUTH_TOKEN="))
    assert token < next(i for i, line in enumerate(lines) if line.startswith("ray start --address"))


def test_ray_up(capsys):
    doc = yaml.safe_load(_run(capsys, "--format", "ray-up"))
    types = doc["available_node_types"]
    assert doc["head_node_type"] == "head" and doc["max_workers"] == 2
    assert types["prefill"]["resources"] == {"CPU": 2, "GPU": 0, "prefill": 1}
    assert types["decode"]["resources"]["decode"] == 1
    assert types["prefill"]["min_workers"] == types["prefill"]["max_workers"] == 1
    assert "prefill" not in types["head"]["resources"]
    # a CPU cluster installs the server side only (no Triton)
    (setup,) = doc["setup_commands"]
    assert "[server]" in setup and "gpu" not in setup


def test_kuberay(capsys):
    config_map, doc = yaml.safe_load_all(_run(capsys, "--format", "kuberay", "--image", "me/triptych:1"))
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    assert config_map["kind"] == "ConfigMap" and config_map["metadata"]["name"] == doc["metadata"]["name"] + "-config"
    assert parse_config(yaml.safe_load(config_map["data"]["deploy.yaml"]), "x").pools.decode.workers >= 1
    assert doc["spec"]["headGroupSpec"]["rayStartParams"]["port"] == "6379"  # what the head Service advertises
    assert doc["spec"]["authOptions"] == {"mode": "token"}
    groups = {g["groupName"]: g for g in doc["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"prefill", "decode"}
    params = groups["prefill"]["rayStartParams"]
    assert json.loads(json.loads(params["resources"])) == {"prefill": 1}  # shell-quoted JSON string
    assert groups["decode"]["replicas"] == 1
    head = doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] == "me/triptych:1"
    assert 50051 in [p["containerPort"] for p in head["ports"]]
    # the head pod serves: the deploy file mounted from the ConfigMap, `triptych serve` once Ray is up
    serve = head["lifecycle"]["postStart"]["exec"]["command"][-1]
    assert "until ray status" in serve and f"triptych serve --config {render.SERVE_CONFIG} --address auto" in serve
    assert {m["mountPath"] for m in head["volumeMounts"]} == {render.SERVE_CONFIG}


def test_cluster_names_are_dns_labels_and_gpu_groups_get_a_gpu_image(tmp_path, capsys):
    src = tmp_path / "My_Cluster.v1.yaml"
    pools = {"prefill": {"num_gpus": 1}, "decode": {"num_gpus": 1}}
    src.write_text(yaml.safe_dump({"version": 1, "pools": pools, "transport": {"backend": "nccl"}}))
    argv = [str(src), "--format", "kuberay"]
    parser = argparse.ArgumentParser()
    render.add_arguments(parser)
    assert render.run(parser.parse_args(argv)) == 0
    _, doc = yaml.safe_load_all(capsys.readouterr().out)
    assert doc["metadata"]["name"] == "triptych-my-cluster-v1"
    images = {g["groupName"]: g["template"]["spec"]["containers"][0]["image"] for g in doc["spec"]["workerGroupSpecs"]}
    assert all(image.endswith("-py311-gpu") for image in images.values()), images
    assert not doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"].endswith("-gpu")
    assert render.run(parser.parse_args(argv + ["--cluster-name", "My_Cluster.v1"])) == 2
    assert "is not a DNS-1035 label" in capsys.readouterr().err
    # ray-up: GPU nodes get the Triton kernels (the gpu extra)
    assert render.run(parser.parse_args([str(src), "--format", "ray-up"])) == 0
    (setup,) = yaml.safe_load(capsys.readouterr().out)["setup_commands"]
    assert "[server,gpu]" in setup


def test_the_dockerfile_copies_every_package_the_wheel_ships():
    import tomllib

    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    for package in include:
        assert f"COPY --chown=ray:users {package.rstrip('*')} " in dockerfile, package
    assert "-c /home/ray/triptych/constraints.txt" in dockerfile and '"/home/ray/triptych[${EXTRAS}]"' in dockerfile


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
        gpu_image=None,
        memory="8Gi",
        provider="aws",
        region="us-west-2",
    )
    commands = render_commands(cfg, args)
    assert "/etc/t/keys" in commands and "export T_ADMIN_KEYS=..." in commands
    assert "RAY_AUTH_MODE=disabled" not in commands  # Ray's token authentication is left on
    assert ray_up_config(cfg, args)["file_mounts"]["/etc/t/tls.key"] == "/etc/t/tls.key"
    head = kuberay_manifest(cfg, args)["spec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["subPath"] for m in head["containers"][0]["volumeMounts"]}
    assert mounts == {
        "/etc/t/keys": "keys",
        "/etc/t/tls.pem": "tls.pem",
        "/etc/t/tls.key": "tls.key",
        render.SERVE_CONFIG: "deploy.yaml",
    }
    assert head["volumes"][1]["secret"]["secretName"] == "triptych-sec-secrets"
    assert head["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"] == {
        "name": "triptych-sec-secrets",
        "key": "t-admin-keys",
    }
