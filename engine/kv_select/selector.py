"""Decode-side KV selection: which KV blocks each decode row attends to, per layer.

The engine asks `KVSelector.plan(batch)` before a forward and passes the `SelectionPlan` to the
runner; the attention hook (engine/attention.py) then
  - attends each *selected* row over its per-layer compact block tables (`SelectedRows`: the
    kept blocks in order, all full but the last, so a table + a length describe them, as for a
    dense row; the paged decode kernel takes them unchanged on CUDA),
  - copies the queries of `capture_rows` into `captured` (the recent queries LoopServe and
    SnapKV score with),
  - for each `Rescore` row (which attends densely this step) adds up, per layer, the attention
    mass its recent queries and the current one give each of its blocks into `scores`,
  - for `quest` rows picks the blocks per layer itself from per-block key bounds (`bounds`, kept
    up to date for every block the forward writes);
and `KVSelector.update(plan)` turns captured queries and scores into each sequence's selection.
The cache itself is never changed by selection. What each method keeps: engine/kv_select/config.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from engine.kv_layout import KVLayout
from engine.kv_select.config import KVSelectionConfig, KVSelectionMethod

M = KVSelectionMethod


class Shape(NamedTuple):
    """A selected decode row's blocks: n in all; [0, sink) and [tail, n) always kept; `keep` of
    the middle [sink, tail) kept."""

    n: int
    sink: int
    tail: int
    keep: int

    @property
    def fixed(self) -> int:
        """Blocks always kept: the sink and the tail."""
        return self.sink + self.n - self.tail


@dataclass
class _State:
    prompt_len: int
    queries: torch.Tensor | None = None  # [layers, n <= R, Hq, D], the latest queries (any order)
    fresh: int = 0  # queries gathered since the last selection
    from_prompt: bool = False  # queries holds the prompt's last queries (the first selection is due)
    middle: torch.Tensor | None = None  # [layers, k] logical ids of the kept middle blocks, -1 pads
    middle_count: int = 0  # kept middle blocks over all layers (a host int: no device sync per step)
    selected_once: bool = False


@dataclass(frozen=True)
class Rescore:
    row: int  # packed row (a decode row attending densely this step)
    queries: torch.Tensor  # [layers, n, Hq, D] its earlier recent queries (the current one is added)
    blocks: torch.Tensor  # [N] its physical blocks, in order
    ctx_len: int


@dataclass(frozen=True)
class SelectedRows:
    rows: torch.Tensor  # [B] packed rows
    tables: torch.Tensor  # [layers, B, W] physical ids of the kept blocks, in order (pads: 0)
    lens: torch.Tensor  # [layers, B] tokens in each row's kept blocks
    host_rows: tuple[int, ...] = ()  # `rows` as host ints (the runner leaves them out of the dense buckets)


@dataclass(frozen=True)
class QuestRow:
    row: int
    blocks: torch.Tensor  # [N] physical blocks, in order
    ctx_len: int
    shape: Shape


@dataclass
class SelectionPlan:
    capture_rows: torch.Tensor | None = None  # [C] packed rows whose queries are captured
    captured: list[torch.Tensor] = field(default_factory=list)  # per layer [C, Hq, D] (the hook fills)
    rescores: list[Rescore] = field(default_factory=list)
    scores: list[list[torch.Tensor]] = field(default_factory=list)  # per rescore, per layer: mass [N]
    selected: SelectedRows | None = None
    quest: list[QuestRow] = field(default_factory=list)
    bounds: torch.Tensor | None = None  # quest: [layers, blocks, 2, Hkv, D] per-block key min / max
    written_blocks: torch.Tensor | None = None  # quest: blocks this forward writes (bounds to redo)
    # bookkeeping for update(): (request id, what) per capture row and per rescore
    capture_of: list[tuple[str, bool]] = field(default_factory=list)  # (request id, from a prompt)
    rescore_of: list[tuple[str, Shape]] = field(default_factory=list)  # (request id, its shape)


@dataclass
class SelectionStats:
    rows: int = 0  # decode rows that attended to a selection
    kept_blocks: int = 0  # their kept blocks, summed over layers
    context_blocks: int = 0  # their whole context's blocks, summed over layers
    rescores: int = 0  # selections made from scores (loopserve, snapkv)

    @property
    def density(self) -> float:
        return self.kept_blocks / self.context_blocks if self.context_blocks else 1.0

    def status(self) -> dict:
        """The WorkerStatus fields (engine/worker_api.py) of these counts."""
        return {
            "kv_selected_rows": self.rows,
            "kv_selection_density": self.density,
            "kv_selection_rescores": self.rescores,
        }


class KVSelector:
    """One engine's selection state: per sequence, its recent queries and kept middle blocks."""

    def __init__(self, config: KVSelectionConfig, layout: KVLayout, num_blocks: int, device):
        self.config = config
        self.layout = layout
        self.bs = layout.block_size
        self.device = torch.device(device)
        self.stats = SelectionStats()
        self._states: dict[str, _State] = {}
        self.bounds = None
        if config.method is M.QUEST:
            shape = (layout.num_layers, num_blocks, 2, layout.num_kv_heads, layout.head_dim)
            self.bounds = torch.zeros(shape, dtype=layout.torch_dtype, device=self.device)

    @property
    def observed_prompt_tokens(self) -> int:
        """A prompt's last tokens whose queries make the first selection (loopserve, snapkv):
        the engine computes them even when its prefix cache holds them (Scheduler.uncached_tail)."""
        return self.config.rescore_every if self.config.method in (M.LOOPSERVE, M.SNAPKV) else 0

    def forget(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    def _state(self, seq) -> _State:
        state = self._states.get(seq.request_id)
        if state is None:
            state = self._states[seq.request_id] = _State(seq.num_prompt_tokens)
        return state

    def _shape(self, ctx: int, prompt_len: int) -> Shape | None:
        """The Shape of a decode row over `ctx` tokens; None: it attends densely."""
        c = self.config
        n = -(-ctx // self.bs)
        if ctx < c.dense_below:
            return None
        tail = max(0, min(n - c.window, prompt_len // self.bs))
        sink = min(c.sink, tail)
        keep = max(0, math.ceil(c.budget * n) - sink - (n - tail))
        if keep >= tail - sink:
            return None  # the budget holds every block
        return Shape(n, sink, tail, keep)

    def plan(self, batch) -> SelectionPlan | None:
        """What the forward over `batch` (engine/scheduler.py ScheduledSeq, in packed order) does
        for selection; None when nothing in it is selected, captured or scored."""
        c = self.config
        plan = SelectionPlan()
        captures: list[int] = []
        selected: list[tuple] = []  # (row, blocks [N], logical [L, W], lens [L])
        scoring = c.method in (M.LOOPSERVE, M.SNAPKV)
        row = 0
        for entry in batch:
            seq, n_new = entry.seq, entry.num_new_tokens
            start = seq.num_computed_tokens
            end = start + n_new
            state = self._state(seq)
            # A prompt chunk (even one token, after a prefix cache hit) attends densely; its last
            # queries are kept when it ends the prompt.
            if not (n_new == 1 and start >= state.prompt_len):
                if scoring and end >= state.prompt_len and not state.selected_once:
                    w = min(c.rescore_every, n_new)
                    captures.extend(range(row + n_new - w, row + n_new))
                    plan.capture_of.extend([(seq.request_id, True)] * w)
                row += n_new
                continue
            shape = self._shape(end, state.prompt_len)
            wants_queries = c.method is M.LOOPSERVE or (c.method is M.SNAPKV and not state.selected_once)
            # the first selection at the first decode step after the prompt's queries, then every R
            due = wants_queries and (state.from_prompt or state.fresh >= c.rescore_every - 1)
            if shape is not None:
                blocks = self._tensor(seq.block_table[: shape.n])
                if c.method is M.QUEST:
                    plan.quest.append(QuestRow(row, blocks, end, shape))
                    self._count(shape.n, shape.fixed + shape.keep)
                else:
                    if due and state.queries is not None:
                        plan.rescores.append(Rescore(row, state.queries, blocks, end))
                        plan.rescore_of.append((seq.request_id, shape))
                    # attends over its current selection (also while its next one is scored)
                    if c.method is M.STREAMING or state.middle is not None:
                        logical, lens = self._logical(state, end, shape)
                        selected.append((row, blocks, logical, lens))
                        middle = shape.keep if c.method is M.STREAMING else state.middle_count / self.layout.num_layers
                        self._count(shape.n, shape.fixed + middle)
            if wants_queries:
                captures.append(row)
                plan.capture_of.append((seq.request_id, False))
            row += 1
        plan.scores = [[] for _ in plan.rescores]
        if captures:
            plan.capture_rows = self._tensor(captures)
        if selected:
            plan.selected = self._selected(selected)
        if self.bounds is not None:
            plan.bounds = self.bounds
            plan.written_blocks = self._written(batch)
        if not (captures or selected or plan.rescores or plan.quest or plan.written_blocks is not None):
            return None
        return plan

    def _count(self, n: int, kept: float) -> None:
        """A selected row of n blocks keeping `kept` per layer (on average), in the stats."""
        layers = self.layout.num_layers
        self.stats.rows += 1
        self.stats.kept_blocks += round(kept * layers)
        self.stats.context_blocks += n * layers

    def refresh_bounds(self, kv: torch.Tensor, block_table) -> None:
        """quest: the key bounds of blocks written elsewhere (a prefill worker's KV landed in
        them): computed from the cache `kv` [layers, 2, blocks, block_size, Hkv, D]."""
        if self.bounds is None or not block_table:
            return
        blocks = self._tensor(list(block_table))
        for layer in range(kv.shape[0]):
            k = kv[layer, 0].index_select(0, blocks)  # [n, bs, Hkv, D]
            self.bounds[layer].index_copy_(0, blocks, torch.stack([k.amin(1), k.amax(1)], dim=1))

    def _tensor(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _written(self, batch) -> torch.Tensor:
        """The blocks a forward over `batch` writes (quest redoes their key bounds)."""
        out: set[int] = set()
        for entry in batch:
            seq = entry.seq
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + entry.num_new_tokens
            out.update(seq.block_table[start // self.bs : -(-end // self.bs)])
        return self._tensor(sorted(out))

    def _logical(self, state: _State, ctx: int, shape: Shape) -> tuple[torch.Tensor, torch.Tensor]:
        """[L, W] logical ids of the kept blocks of each layer, in order, -1 pads at the end; and
        [L] tokens in them (every kept block is full but the last, the current one)."""
        layers = self.layout.num_layers
        n, sink, tail, keep = shape
        parts = [torch.arange(sink, device=self.device).expand(layers, sink)]
        if self.config.method is M.STREAMING:
            parts.append(torch.arange(tail - keep, tail, device=self.device).expand(layers, keep))
        else:
            parts.append(state.middle)
        parts.append(torch.arange(tail, n, device=self.device).expand(layers, n - tail))
        logical = torch.cat(parts, dim=1)
        logical = torch.where(logical < 0, n + 1, logical).sort(dim=1).values  # pads last
        counts = (logical <= n).sum(dim=1)
        logical = torch.where(logical > n, -1, logical)
        lens = counts * self.bs - (n * self.bs - ctx)
        return logical, lens

    def _selected(self, rows) -> SelectedRows:
        layers = self.layout.num_layers
        width = max(logical.shape[1] for _, _, logical, _ in rows)
        tables = torch.zeros((layers, len(rows), width), dtype=torch.long, device=self.device)
        lens = torch.empty((layers, len(rows)), dtype=torch.long, device=self.device)
        for i, (_, blocks, logical, row_lens) in enumerate(rows):
            w = logical.shape[1]
            tables[:, i, :w] = torch.where(logical < 0, 0, blocks[logical.clamp(min=0)])
            lens[:, i] = row_lens
        host = tuple(r for r, _, _, _ in rows)
        return SelectedRows(self._tensor(list(host)), tables, lens, host)

    def update(self, plan: SelectionPlan | None) -> None:
        """After the forward: keep the captured queries, select from the scores."""
        if plan is None:
            return
        if plan.captured:
            stacked = torch.stack(plan.captured)  # [L, C, Hq, D]
            i = 0
            while i < len(plan.capture_of):
                rid, from_prompt = plan.capture_of[i]
                j = i
                while j < len(plan.capture_of) and plan.capture_of[j] == (rid, from_prompt):
                    j += 1
                state = self._states.get(rid)
                if state is not None:
                    self._remember(state, stacked[:, i:j], from_prompt)
                i = j
        for (rid, shape), scores in zip(plan.rescore_of, plan.scores):
            state = self._states.get(rid)
            if state is not None and scores:
                state.middle = self._choose(torch.stack(scores), shape)
                state.middle_count = int((state.middle >= 0).sum())  # one device sync per selection
                state.fresh = 0
                state.from_prompt = False
                state.selected_once = True
                self.stats.rescores += 1

    def _remember(self, state: _State, queries: torch.Tensor, from_prompt: bool) -> None:
        r = self.config.rescore_every
        state.from_prompt = from_prompt
        if from_prompt or state.queries is None:
            state.queries = queries[:, -r:].clone()
        else:
            state.queries = torch.cat([state.queries, queries], dim=1)[:, -r:]
        state.fresh += queries.shape[1]

    def _choose(self, mass: torch.Tensor, shape: Shape) -> torch.Tensor:
        """[L, keep] logical ids of the middle blocks to keep per layer (-1 pads). snapkv: the
        `keep` with most mass. loopserve: the fewest covering `gamma` of the mass (with sink and
        tail), each with the block after it, at least min_budget of the blocks, at most `keep`:
        the recent queries attend to where a span starts (the token after an earlier occurrence
        of theirs, as a copy does), and the rest of that span (a number's further digits) is read
        in the next steps, often across a block boundary."""
        c = self.config
        n, sink, tail, keep = shape
        middle = mass[:, sink:tail]
        values, order = middle.sort(dim=1, descending=True)
        if c.method is not M.LOOPSERVE:
            return order[:, :keep] + sink
        total = mass.sum(dim=1)
        covered = (total - middle.sum(dim=1))[:, None] + values.cumsum(dim=1)
        need = ((covered < c.gamma * total[:, None]).sum(dim=1) + 1).tolist()  # one sync per selection
        least = max(0, math.ceil(c.min_budget * n) - sink - (n - tail))
        out = torch.full((mass.shape[0], keep), -1, dtype=torch.long)
        for layer, (ranked, top) in enumerate(zip(order.tolist(), need)):
            chosen: dict[int, None] = {}  # ordered
            for i, b in enumerate(ranked):
                if len(chosen) >= keep or (i >= top and len(chosen) >= least):
                    break
                for x in (b, b + 1):
                    if x < middle.shape[1] and len(chosen) < keep:
                        chosen.setdefault(x)
            out[layer, : len(chosen)] = torch.tensor(list(chosen), dtype=torch.long) + sink
        return out.to(mass.device)


# ------------------------------------------------------------------ used by the attention hook


def block_mass(q_recent: torch.Tensor, k: torch.Tensor, ctx_len: int, block_size: int, scale: float) -> torch.Tensor:
    """[N] attention mass that the queries `q_recent` [R, Hq, D] give each block of a context
    whose keys are `k` [N * block_size, Hkv, D] (the first ctx_len real), summed over queries
    and heads (each query-head's attention sums to 1)."""
    r, hq, d = q_recent.shape
    hkv = k.shape[1]
    kk = k[:ctx_len].transpose(0, 1).float()  # [Hkv, L, D]
    qq = q_recent.float().reshape(r, hkv, hq // hkv, d).permute(1, 0, 2, 3).reshape(hkv, -1, d)  # [Hkv, R*g, D]
    probs = torch.softmax(qq @ kk.transpose(1, 2) * scale, dim=-1)  # [Hkv, R*g, L]
    per_token = probs.sum(dim=(0, 1))
    n = k.shape[0] // block_size
    return torch.nn.functional.pad(per_token, (0, n * block_size - ctx_len)).view(n, block_size).sum(dim=1)


def quest_pick(q: torch.Tensor, bounds: torch.Tensor, row: QuestRow, block_size: int) -> tuple[torch.Tensor, int]:
    """Quest for one row and layer: q [Hq, D], bounds [blocks, 2, Hkv, D]; the physical ids of
    the kept blocks in order and the tokens in them (sink, the `keep` middle blocks whose keys
    bound the query's attention score highest, summed over heads, and the tail)."""
    hq, d = q.shape
    n, sink, tail, keep = row.shape
    middle = row.blocks[sink:tail]
    b = bounds.index_select(0, middle).float()  # [M, 2, Hkv, D]
    hkv = b.shape[2]
    qq = q.float().view(hkv, hq // hkv, d)[None, :, :, :]  # [1, Hkv, g, D]
    lo, hi = b[:, 0, :, None, :], b[:, 1, :, None, :]  # [M, Hkv, 1, D]
    upper = torch.maximum(qq * lo, qq * hi).sum(dim=-1).sum(dim=(1, 2))  # [M]
    top = upper.topk(keep).indices.sort().values + sink
    logical = torch.cat([torch.arange(sink, device=q.device), top, torch.arange(tail, n, device=q.device)])
    kept = logical.shape[0]
    return row.blocks.index_select(0, logical), kept * block_size - (n * block_size - row.ctx_len)
