"""Cluster hardware: `GpuSpec` and `ClusterSpec`, loaded from a small YAML file (``--cluster``).

File format (units in the key names; see placement/clusters/*.yaml and docs/PLACEMENT.md)::

    name: a100-4x8
    device: gpu                   # gpu | cpu (cpu: "devices" are CPU core groups, no num_gpus in Ray)
    num_nodes: 4
    gpus_per_node: 8
    gpu:
      name: A100-80GB
      memory_gb: 80               # device memory, GB (1e9 bytes)
      peak_tflops: 312            # dense fp16/bf16 peak, TFLOP/s
      hbm_bandwidth_gbps: 2039    # device memory bandwidth, GB/s
      compute_efficiency: 0.5     # achievable fraction of peak (MFU) for the roofline prior
      bandwidth_efficiency: 0.8   # achievable fraction of HBM bandwidth
      layer_overhead_us: 10       # fixed time per layer per forward (kernel launches, framework)
    intra_node_bandwidth_gbps: 300  # per-device link inside a node (NVLink), GB/s
    inter_node_bandwidth_gbps: 25   # per-node network (e.g. 200 Gb/s InfiniBand), GB/s
    intra_node_latency_us: 5
    inter_node_latency_us: 20
    allreduce_efficiency: 1.0     # achievable fraction of the intra-node link in a TP all-reduce
    memory_utilization: 0.9       # fraction of device memory the engine may use (weights + KV)

The three efficiencies of a GPU cluster file are calibrated on measured latencies by
`python -m placement.calibrate` (docs/PLACEMENT.md), not guessed.

Invariants: all counts >= 1, all rates and sizes > 0, efficiencies and utilization in (0, 1].
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

import yaml

from placement.errors import PlanningError


class DeviceKind(enum.Enum):
    GPU = "gpu"
    CPU = "cpu"


@dataclass(frozen=True)
class GpuSpec:
    """One accelerator. Bytes, FLOP/s and bytes/s in SI units (not GiB)."""

    name: str
    memory_bytes: float
    peak_flops: float
    hbm_bandwidth: float
    compute_efficiency: float = 0.5
    bandwidth_efficiency: float = 0.8
    layer_overhead_s: float = 10e-6  # fixed time per layer per forward (kernel launches, framework)

    @property
    def effective_flops(self) -> float:
        return self.peak_flops * self.compute_efficiency

    @property
    def effective_bandwidth(self) -> float:
        return self.hbm_bandwidth * self.bandwidth_efficiency


@dataclass(frozen=True)
class ClusterSpec:
    """num_nodes × gpus_per_node identical devices. Bandwidths in bytes/s, latencies in seconds."""

    name: str
    device: DeviceKind
    num_nodes: int
    gpus_per_node: int
    gpu: GpuSpec
    intra_node_bandwidth: float
    inter_node_bandwidth: float
    intra_node_latency: float = 5e-6
    inter_node_latency: float = 20e-6
    memory_utilization: float = 0.9
    # A tensor-parallel all-reduce achieves this fraction of the intra-node bandwidth (its per-hop
    # latency is intra_node_latency).
    allreduce_efficiency: float = 1.0

    @property
    def num_gpus(self) -> int:
        return self.num_nodes * self.gpus_per_node

    @property
    def usable_memory_bytes(self) -> float:
        """Per-device memory the engine may fill with weights and KV cache."""
        return self.gpu.memory_bytes * self.memory_utilization

    def link(self, intra_node: bool) -> tuple[float, float]:
        """(bandwidth bytes/s, latency s) of the link between two devices."""
        if intra_node or self.num_nodes == 1:
            return self.intra_node_bandwidth, self.intra_node_latency
        return self.inter_node_bandwidth, self.inter_node_latency


def _get(raw: dict, key: str, path: Path, kind: type, default=None, positive: bool = True):
    if key not in raw:
        if default is None:
            raise PlanningError(f"{path}: missing field '{key}'")
        return default
    try:
        value = kind(raw[key])
    except (TypeError, ValueError):
        raise PlanningError(f"{path}: field '{key}' must be a {kind.__name__}, got {raw[key]!r}") from None
    if positive and isinstance(value, (int, float)) and value <= 0:
        raise PlanningError(f"{path}: field '{key}' must be > 0, got {value}")
    return value


def load_cluster(path: str | Path) -> ClusterSpec:
    """Parse and validate a cluster YAML; every error is a PlanningError naming file and field."""
    path = Path(path)
    if not path.is_file():
        raise PlanningError(f"cluster file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise PlanningError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("gpu"), dict):
        raise PlanningError(f"{path}: expected a mapping with a 'gpu' section")
    g = raw["gpu"]
    gpu = GpuSpec(
        name=_get(g, "name", path, str, positive=False),
        memory_bytes=_get(g, "memory_gb", path, float) * 1e9,
        peak_flops=_get(g, "peak_tflops", path, float) * 1e12,
        hbm_bandwidth=_get(g, "hbm_bandwidth_gbps", path, float) * 1e9,
        compute_efficiency=_get(g, "compute_efficiency", path, float, 0.5),
        bandwidth_efficiency=_get(g, "bandwidth_efficiency", path, float, 0.8),
        layer_overhead_s=_get(g, "layer_overhead_us", path, float, 10.0) * 1e-6,
    )
    try:
        device = DeviceKind(str(raw.get("device", "gpu")))
    except ValueError:
        raise PlanningError(f"{path}: field 'device' must be gpu or cpu, got {raw.get('device')!r}") from None
    spec = ClusterSpec(
        name=_get(raw, "name", path, str, path.stem, positive=False),
        device=device,
        num_nodes=_get(raw, "num_nodes", path, int),
        gpus_per_node=_get(raw, "gpus_per_node", path, int),
        gpu=gpu,
        intra_node_bandwidth=_get(raw, "intra_node_bandwidth_gbps", path, float) * 1e9,
        inter_node_bandwidth=_get(raw, "inter_node_bandwidth_gbps", path, float) * 1e9,
        intra_node_latency=_get(raw, "intra_node_latency_us", path, float, 5.0) * 1e-6,
        inter_node_latency=_get(raw, "inter_node_latency_us", path, float, 20.0) * 1e-6,
        memory_utilization=_get(raw, "memory_utilization", path, float, 0.9),
        allreduce_efficiency=_get(raw, "allreduce_efficiency", path, float, 1.0),
    )
    for name, v in (
        ("compute_efficiency", gpu.compute_efficiency),
        ("bandwidth_efficiency", gpu.bandwidth_efficiency),
        ("memory_utilization", spec.memory_utilization),
        ("allreduce_efficiency", spec.allreduce_efficiency),
    ):
        if not 0.0 < v <= 1.0:
            raise PlanningError(f"{path}: field '{name}' must be in (0, 1], got {v}")
    return spec
