"""Decode-side KV selection settings: the method enum and `KVSelectionConfig`, the one place
where the methods and their defaults are defined (the deploy schema's `kv_selection:` section
holds this object itself). The module imports no torch.

A decode step of a sequence with selection on attends to a chosen subset of its KV blocks instead
of all of them (engine/kv_select/selector.py). The paged cache stays whole: nothing is freed, so
prefix reuse, re-prefill and role switching stay exact. All budgets count KV blocks of the
engine's block_size:

- sink: the first `sink` blocks, always kept (attention sinks);
- tail: the last `window` blocks and every block of the sequence's own output (this turn's
  answer), always kept;
- middle: the blocks between them, of which each method keeps a share so that the whole kept set
  is at most `budget` of the sequence's blocks (never less than sink + tail):
  - loopserve: per layer, the blocks the most recent queries attend to most, covering a share
    `gamma` of their attention mass, at least `min_budget` and at most `budget` of the blocks;
    re-scored every `rescore_every` generated tokens from the attention of the last
    `rescore_every` queries (the first selection: from the prompt's last `rescore_every` queries
    when this engine prefilled it, else after `rescore_every` decode steps, dense until then);
  - snapkv: per layer, once: the blocks the prompt's last `rescore_every` queries attend to most
    (when the prompt was prefilled elsewhere: its first `rescore_every` decode queries), a fixed
    count filling `budget`;
  - streaming: no scoring: the window is simply widened to fill `budget` (StreamingLLM: sink +
    recent tokens);
  - quest: per layer and step: the blocks whose keys' per-block min/max bound the current
    query's attention score highest, a fixed count filling `budget`.
Sequences whose context is shorter than `dense_below` tokens attend densely.

Invariants: a constructed KVSelectionConfig is valid; a bad value raises KVSelectionConfigError
naming the field.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from engine.errors import SettingError


class KVSelectionMethod(str, enum.Enum):
    DENSE = "dense"
    LOOPSERVE = "loopserve"  # progressive: re-scored from the latest generated queries
    SNAPKV = "snapkv"  # one-shot from the prompt's last queries
    STREAMING = "streaming"  # sink + recent window
    QUEST = "quest"  # per step, by per-block key bounds


class KVSelectionConfigError(SettingError):
    """A KVSelectionConfig field out of its domain."""

    owner = "KVSelectionConfig"


@dataclass(frozen=True)
class KVSelectionConfig:
    method: KVSelectionMethod = KVSelectionMethod.DENSE
    budget: float = 0.5  # most blocks kept, as a share of the sequence's blocks
    min_budget: float = 0.1  # loopserve: fewest blocks kept, as a share
    gamma: float = 0.95  # loopserve: attention mass of the recent queries the kept blocks cover
    sink: int = 1  # leading blocks always kept
    window: int = 4  # trailing blocks always kept (besides the sequence's own output)
    rescore_every: int = 16  # loopserve: generated tokens between selections (and queries scored)
    dense_below: int = 1024  # contexts shorter than this (tokens) attend densely

    def __post_init__(self) -> None:
        KVSelectionConfigError.coerce_enum(self, "method", KVSelectionMethod)
        for name in ("budget", "gamma"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
                raise KVSelectionConfigError(name, f"{value!r} must be in (0, 1]")
        if not isinstance(self.min_budget, (int, float)) or not 0.0 <= self.min_budget <= self.budget:
            raise KVSelectionConfigError("min_budget", f"{self.min_budget!r} must be in [0, budget={self.budget}]")
        for name, lo in (("sink", 0), ("window", 1), ("rescore_every", 1), ("dense_below", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < lo:
                raise KVSelectionConfigError(name, f"{value!r} must be an integer >= {lo}")
        if self.rescore_every > 256:
            raise KVSelectionConfigError("rescore_every", f"{self.rescore_every} must be <= 256")

    @property
    def on(self) -> bool:
        return self.method is not KVSelectionMethod.DENSE
