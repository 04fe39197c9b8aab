"""Latency models of one serving instance: fitted from a profile, or from a roofline prior.

Models (DistServe §4.1), all in seconds, lengths in tokens:

- prefill of a batch with prompt lengths l_i:   t = a + b·Σl_i + c·Σl_i²
  (c·Σl² is causal attention, quadratic per sequence; b is the linear layers; a fixed overhead)
- one decode step of B sequences holding C tokens of KV in all:   t = a + b·C + c·B
- encode of n images:   t = a + per_image·n
- KV transfer of n bytes:   t = latency + n / bandwidth

`InstanceLatency` bundles these for one (TP, PP) instance. Its prefill/decode times are the full
latency through all PP stages; a PP instance overlaps PP batches (prefill) or PP micro-batches
(decode), which the simulator models — see placement.simulator.

`PerfModel` answers "what is the latency of (TP, PP) on this cluster?":
- no profile: the roofline prior (FLOPs / effective peak + bytes / effective HBM bandwidth,
  compute and weights split by TP, two ring all-reduces per layer over the intra-node link, PP adds
  one activation hop per stage boundary). Compute and memory time are added, not max'ed — a
  conservative bound that keeps the linear model form.
- with a profile: the fitted coefficients at the profiled (TP, PP), scaled coefficient by
  coefficient by roofline(TP, PP) / roofline(profiled TP, PP) for other configurations.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from placement.errors import PlanningError
from placement.hardware import ClusterSpec
from placement.profile import DecodeSample, EncodeSample, ModelShape, PrefillSample, Profile, TransferSample

# Activation dtype size for all-reduce and pipeline hops, bytes (fp16/bf16).
ACT_BYTES = 2
# A ViT-L/14-336-like encoder for images: FLOPs per image (2 · 0.3e9 params · 576 patches).
ENCODER_FLOPS_PER_IMAGE = 2 * 0.3e9 * 576


@dataclass(frozen=True)
class PrefillModel:
    a: float
    b: float
    c: float

    def seconds(self, sum_len: float, sum_sq: float) -> float:
        """Batch time given Σl and Σl² of its prompts."""
        return self.a + self.b * sum_len + self.c * sum_sq


@dataclass(frozen=True)
class DecodeModel:
    a: float
    b: float
    c: float

    def seconds(self, batch: int, total_context: float) -> float:
        return self.a + self.b * total_context + self.c * batch


@dataclass(frozen=True)
class EncodeModel:
    a: float
    per_image: float

    def seconds(self, num_images: int) -> float:
        return self.a + self.per_image * num_images


@dataclass(frozen=True)
class TransferModel:
    """bandwidth in bytes/s (math.inf allowed: free transfer), latency in seconds."""

    latency_s: float
    bandwidth: float

    def seconds(self, num_bytes: float) -> float:
        return self.latency_s + num_bytes / self.bandwidth


@dataclass(frozen=True)
class InstanceLatency:
    """Latency models for one instance of tp × pp devices."""

    tp: int
    pp: int
    prefill: PrefillModel
    decode: DecodeModel
    encode: EncodeModel


# ---------------------------------------------------------------- fitting


def _nonneg_lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with coefficients >= 0: best of all column subsets (few columns, so exhaustive)."""
    n = x.shape[1]
    best, best_err = np.zeros(n), float(np.sum(y * y))
    for k in range(1, n + 1):
        for cols in itertools.combinations(range(n), k):
            coef, *_ = np.linalg.lstsq(x[:, cols], y, rcond=None)
            if np.any(coef < 0):
                continue
            err = float(np.sum((x[:, cols] @ coef - y) ** 2))
            if err < best_err:
                best, best_err = np.zeros(n), err
                best[list(cols)] = coef
    return best


def fit_prefill(samples: tuple[PrefillSample, ...]) -> PrefillModel:
    if len(samples) < 3:
        raise PlanningError(f"need >= 3 prefill samples to fit a + b·Σl + c·Σl², got {len(samples)}")
    x = np.array([[1.0, sum(s.prompt_lens), sum(l * l for l in s.prompt_lens)] for s in samples])
    return PrefillModel(*_nonneg_lstsq(x, np.array([s.seconds for s in samples])))


def fit_decode(samples: tuple[DecodeSample, ...]) -> DecodeModel:
    if len(samples) < 3:
        raise PlanningError(f"need >= 3 decode samples to fit a + b·Σcontext + c·batch, got {len(samples)}")
    x = np.array([[1.0, s.total_context, s.batch_size] for s in samples])
    return DecodeModel(*_nonneg_lstsq(x, np.array([s.seconds for s in samples])))


def fit_encode(samples: tuple[EncodeSample, ...]) -> EncodeModel:
    if len(samples) < 2:
        raise PlanningError(f"need >= 2 encode samples to fit a + per_image·n, got {len(samples)}")
    x = np.array([[1.0, s.num_images] for s in samples])
    return EncodeModel(*_nonneg_lstsq(x, np.array([s.seconds for s in samples])))


def fit_transfer(samples: tuple[TransferSample, ...]) -> TransferModel:
    if len(samples) < 2:
        raise PlanningError(f"need >= 2 transfer samples to fit latency + bytes/bandwidth, got {len(samples)}")
    x = np.array([[1.0, s.num_bytes] for s in samples])
    latency, per_byte = _nonneg_lstsq(x, np.array([s.seconds for s in samples]))
    return TransferModel(latency, 1.0 / per_byte if per_byte > 0 else math.inf)


# ---------------------------------------------------------------- roofline prior


def roofline(
    model: ModelShape, cluster: ClusterSpec, tp: int, pp: int, stages_intra_node: bool = True
) -> InstanceLatency:
    """Roofline latency of one (tp, pp) instance; TP groups sit inside a node, PP hops may cross nodes."""
    flops = cluster.gpu.effective_flops * tp
    mem_bw = cluster.gpu.effective_bandwidth * tp
    L, h = model.num_layers, model.hidden
    # Two ring all-reduces per layer of (tokens × hidden) activations among tp devices.
    ar_bytes_per_token = 2 * L * 2 * (tp - 1) / tp * h * ACT_BYTES
    ar_b = ar_bytes_per_token / (cluster.intra_node_bandwidth * cluster.allreduce_efficiency)
    ar_a = 2 * L * 2 * (tp - 1) * cluster.intra_node_latency
    pp_bw, pp_lat = cluster.link(stages_intra_node)
    pp_b = (pp - 1) * h * ACT_BYTES / pp_bw
    pp_a = (pp - 1) * pp_lat
    weights_s = model.weight_bytes / mem_bw  # every stage reads its weights once per forward
    fixed = weights_s + L * cluster.gpu.layer_overhead_s + ar_a + pp_a
    per_token = 2 * model.num_params / flops + ar_b + pp_b
    prefill = PrefillModel(
        a=fixed,
        b=per_token + model.kv_bytes_per_token / mem_bw,  # linear layers + writing the KV
        c=2 * L * h / flops,  # causal QK^T and AV: 2·l²·hidden per layer
    )
    decode = DecodeModel(
        a=fixed,
        b=model.kv_bytes_per_token / mem_bw + 4 * L * h / flops,  # read KV + attention FLOPs per context token
        c=per_token,
    )
    encode = EncodeModel(a=L * cluster.gpu.layer_overhead_s, per_image=ENCODER_FLOPS_PER_IMAGE / flops)
    return InstanceLatency(tp, pp, prefill, decode, encode)


def _scaled(fitted, prior, reference):
    """fitted × prior / reference, field by field (fields where reference is 0 take prior's value)."""
    vals = []
    for f, p, r in zip(vars(fitted).values(), vars(prior).values(), vars(reference).values()):
        vals.append(f * p / r if r > 0 else p)
    return type(fitted)(*vals)


@dataclass(frozen=True)
class FittedProfile:
    """Models fitted from one profile at its (tp, pp); None where the profile had too few samples."""

    tp: int
    pp: int
    prefill: PrefillModel | None
    decode: DecodeModel | None
    encode: EncodeModel | None
    transfer: TransferModel | None

    @staticmethod
    def from_profile(profile: Profile) -> "FittedProfile":
        def maybe(fit, samples):
            return fit(samples) if samples else None

        hw = profile.hardware
        return FittedProfile(
            hw.tensor_parallel,
            hw.pipeline_parallel,
            maybe(fit_prefill, profile.prefill),
            maybe(fit_decode, profile.decode),
            maybe(fit_encode, profile.encode),
            maybe(fit_transfer, profile.transfer),
        )


@dataclass(frozen=True)
class PerfModel:
    """Latency and memory of any (tp, pp) instance of `model` on `cluster`, optionally profile-calibrated.

    `fitted` is the reference profile (its transfer model is used); `extra` holds profiles of the
    same model at other (tp, pp). A configuration that was profiled uses its own fit as is; any
    other is scaled from the reference by the roofline ratio.
    """

    model: ModelShape
    cluster: ClusterSpec
    fitted: FittedProfile | None = None
    extra: tuple[FittedProfile, ...] = ()

    def profiled(self, tp: int, pp: int) -> FittedProfile | None:
        """The fit measured at exactly (tp, pp), if any."""
        return next((f for f in (self.fitted, *self.extra) if f is not None and (f.tp, f.pp) == (tp, pp)), None)

    def instance(self, tp: int, pp: int, stages_intra_node: bool = True) -> InstanceLatency:
        prior = roofline(self.model, self.cluster, tp, pp, stages_intra_node)
        if self.fitted is None:
            return prior
        f = self.profiled(tp, pp) or self.fitted
        ref = roofline(self.model, self.cluster, f.tp, f.pp, True)
        if (f.tp, f.pp) == (tp, pp):
            ref = prior  # measured here: the fit as is (ratio 1, also for stages across nodes)
        return InstanceLatency(
            tp,
            pp,
            _scaled(f.prefill, prior.prefill, ref.prefill) if f.prefill else prior.prefill,
            _scaled(f.decode, prior.decode, ref.decode) if f.decode else prior.decode,
            _scaled(f.encode, prior.encode, ref.encode) if f.encode else prior.encode,
        )

    def transfer(self, intra_node: bool) -> TransferModel:
        """KV transfer between a prefill and a decode instance (measured if profiled, else the link)."""
        if self.fitted is not None and self.fitted.transfer is not None:
            return self.fitted.transfer
        bw, lat = self.cluster.link(intra_node)
        return TransferModel(lat, bw)

    def weight_bytes_per_device(self, tp: int, pp: int) -> float:
        return self.model.weight_bytes / (tp * pp)

    def kv_capacity_tokens(self, tp: int, pp: int) -> int:
        """KV tokens one instance can hold: usable memory of its tp·pp devices minus the weights (may be <= 0)."""
        free = self.cluster.usable_memory_bytes * tp * pp - self.model.weight_bytes
        return int(free // self.model.kv_bytes_per_token)
