"""Sparse prefill settings: the method enum and `SparsePrefillConfig`, the one place where the
methods and their defaults are defined.

The deploy schema (a pool's `sparse:` section, cluster/config_schema.py) holds this object
itself and takes its defaults from here, so a deploy file and the engine cannot disagree. The
module imports no torch: loading a deploy file does not load the engine.

Invariants: a constructed SparsePrefillConfig is valid (method is a SparseMethod, block_size a
power of two >= 16, 0 < gamma <= 1, tau >= 0, min_budget / dense_below / sink >= 0, local >= 1);
a bad value raises SparseConfigError naming the field.

Why these defaults (docs/BENCHMARKS.md, "Sparse prefill"; docs/API.md, the `sparse` table):
dense is the default method (sparse attention can change answers, so a deployment opts in).
gamma 0.9, tau 0.1 and min_budget 512 are the FlexPrefill settings every measurement used
(0.9: 1.39x TTFT at 8K on one CPU thread, no answer lost; min_budget barely moves the density:
256 instead of 512 saves 0.012). local 8 puts the static baseline near FlexPrefill's density at
gamma 0.9 (static density 0.55 at 4K and 0.32 at 8K, against FlexPrefill's 0.49 and 0.31 on
the measured layers); local 4 matches gamma 0.8 instead. dense_below 4096: shorter prompts
gained little (1.14x at best at 4K) and risk more.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from engine.errors import SettingError


class SparseMethod(str, enum.Enum):
    DENSE = "dense"
    FLEXPREFILL = "flexprefill"  # per-head query-aware or vertical-slash block selection
    STATIC = "static"  # sink + local window + power-of-two distance blocks


class SparseConfigError(SettingError):
    """A SparsePrefillConfig field out of its domain."""

    owner = "SparsePrefillConfig"


@dataclass(frozen=True)
class SparsePrefillConfig:
    """How a prefill attends. Lengths are in tokens; sink and local in units of block_size."""

    method: SparseMethod = SparseMethod.DENSE
    block_size: int = 128  # sparse block granularity
    gamma: float = 0.9  # flexprefill: cumulative attention mass each query block keeps
    tau: float = 0.1  # flexprefill: JS-distance threshold below which a head uses the query-aware pattern
    min_budget: int = 512  # flexprefill: keys always kept per query block
    dense_below: int = 4096  # prompts (Lk) shorter than this run dense attention
    sink: int = 1  # static: leading key blocks always attended
    local: int = 8  # static: window of recent key blocks, diagonal included

    def __post_init__(self) -> None:
        SparseConfigError.coerce_enum(self, "method", SparseMethod)
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise SparseConfigError("block_size", f"{self.block_size} must be a power of two >= 16")
        if not 0.0 < self.gamma <= 1.0:
            raise SparseConfigError("gamma", f"{self.gamma} must be in (0, 1]")
        if self.tau < 0.0:
            raise SparseConfigError("tau", f"{self.tau} must be >= 0")
        for name in ("min_budget", "dense_below", "sink"):
            if getattr(self, name) < 0:
                raise SparseConfigError(name, f"{getattr(self, name)} must be >= 0")
        if self.local < 1:
            raise SparseConfigError("local", f"{self.local} must be >= 1")
