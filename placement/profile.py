"""Profile files: what `triptych profile` measured on the real engine, as versioned JSON.

A profile holds the model's shape, the hardware it ran on (and at which TP/PP), and raw timing
samples; `placement.latency_model` fits the DistServe latency models to them. Layout (version 1)::

    {
      "version": 1,
      "model": {"name": "SmolLM2-135M", "num_layers": 30, "hidden": 576, "num_heads": 9,
                "num_kv_heads": 3, "head_dim": 64, "intermediate": 1536, "vocab_size": 49152,
                "num_params": 134515008, "bytes_per_param": 4, "kv_bytes_per_token": 92160},
      "hardware": {"description": "2-core CPU", "device": "cpu", "num_devices": 1,
                   "tensor_parallel": 1, "pipeline_parallel": 1},
      "prefill":  [{"prompt_lens": [512, 128], "seconds": 0.41}, ...],   # one batched forward
      "decode":   [{"batch_size": 8, "total_context": 4096, "seconds": 0.031}, ...],  # one step
      "encode":   [{"num_images": 2, "seconds": 0.12}, ...],             # one encoder call
      "transfer": [{"num_bytes": 1048576, "seconds": 0.0009}, ...]       # one KV transfer
    }

Units: seconds, tokens, bytes. kv_bytes_per_token counts K and V over all layers (per token of one
sequence) in the KV cache dtype. Any sample list may be empty; the fit then falls back to the
roofline prior for that phase.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from placement.errors import PlanningError

PROFILE_VERSION = 1


@dataclass(frozen=True)
class ModelShape:
    """The profiled model's geometry (what the latency model needs of it, not what the gateway reports).
    num_params counts all weights; bytes_per_param is the weight dtype size."""

    name: str
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    vocab_size: int
    num_params: int
    bytes_per_param: int
    kv_bytes_per_token: int

    @property
    def weight_bytes(self) -> float:
        return float(self.num_params) * self.bytes_per_param

    @staticmethod
    def kv_bytes(num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
        """K and V, all layers, one token."""
        return 2 * num_layers * num_kv_heads * head_dim * dtype_bytes


@dataclass(frozen=True)
class HardwareInfo:
    """Where the profile ran: device kind ("gpu"/"cpu"), devices used and the parallel config."""

    description: str
    device: str = "cpu"
    num_devices: int = 1
    tensor_parallel: int = 1
    pipeline_parallel: int = 1


@dataclass(frozen=True)
class PrefillSample:
    """One batched prefill forward: the prompt lengths in the batch (tokens) and its wall time (s)."""

    prompt_lens: tuple[int, ...]
    seconds: float


@dataclass(frozen=True)
class DecodeSample:
    """One decode step over batch_size sequences holding total_context tokens of KV in all."""

    batch_size: int
    total_context: int
    seconds: float


@dataclass(frozen=True)
class EncodeSample:
    """One encoder call over num_images images."""

    num_images: int
    seconds: float


@dataclass(frozen=True)
class TransferSample:
    """One KV transfer of num_bytes between a prefill and a decode worker."""

    num_bytes: int
    seconds: float


@dataclass(frozen=True)
class Profile:
    model: ModelShape
    hardware: HardwareInfo
    prefill: tuple[PrefillSample, ...] = ()
    decode: tuple[DecodeSample, ...] = ()
    encode: tuple[EncodeSample, ...] = ()
    transfer: tuple[TransferSample, ...] = ()
    version: int = PROFILE_VERSION


def save_profile(profile: Profile, path: str | Path) -> None:
    """Write the profile as indented JSON (tuples become lists)."""
    Path(path).write_text(json.dumps(asdict(profile), indent=1) + "\n")


def _build(cls, raw, path: Path, where: str):
    if not isinstance(raw, dict):
        raise PlanningError(f"{path}: '{where}' must be an object, got {type(raw).__name__}")
    names = {f for f in cls.__dataclass_fields__}
    unknown = set(raw) - names
    if unknown:
        raise PlanningError(f"{path}: unknown field(s) {sorted(unknown)} in '{where}'")
    try:
        obj = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    except TypeError as e:
        raise PlanningError(f"{path}: bad '{where}' ({e})") from None
    for k, v in asdict(obj).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0:
            raise PlanningError(f"{path}: '{where}.{k}' must be >= 0, got {v}")
    return obj


def load_profile(path: str | Path) -> Profile:
    """Read and validate a profile JSON; errors are PlanningErrors naming the file and field."""
    path = Path(path)
    if not path.is_file():
        raise PlanningError(f"profile file not found: {path}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PlanningError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise PlanningError(f"{path}: expected a JSON object")
    version = raw.get("version")
    if version != PROFILE_VERSION:
        raise PlanningError(f"{path}: profile version {version!r} is not supported (expected {PROFILE_VERSION})")
    for key in ("model", "hardware"):
        if key not in raw:
            raise PlanningError(f"{path}: missing field '{key}'")
    samples = {}
    for key, cls in (
        ("prefill", PrefillSample),
        ("decode", DecodeSample),
        ("encode", EncodeSample),
        ("transfer", TransferSample),
    ):
        items = raw.get(key, [])
        if not isinstance(items, list):
            raise PlanningError(f"{path}: '{key}' must be a list")
        samples[key] = tuple(_build(cls, s, path, f"{key}[{i}]") for i, s in enumerate(items))
    return Profile(
        model=_build(ModelShape, raw["model"], path, "model"),
        hardware=_build(HardwareInfo, raw["hardware"], path, "hardware"),
        version=version,
        **samples,
    )
