"""Runs one packed forward over a scheduled batch and returns the logits of sampled rows.

The runner never decides policy: it is given (sequence, number of new tokens) pairs and turns
them into input ids, positions, cache slots and attention metadata.

Device: everything a forward builds lives on the KV cache's device, which must be the model's
(checked at construction). The host's only part in a step is the Python ints of the batch,
copied to the device once per tensor; nothing comes back to the host here (the sampler copies
the sampled token ids back, once per step).
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence
from typing import Callable

import torch

from engine import attention
from engine.errors import EngineError
from engine.kv_layout import KVLayout
from engine.kv_select.selector import SelectionPlan
from engine.scheduler import ScheduledSeq
from engine.tensor_parallel import TPGroup

# A decode bucket takes a row whose context is at least this share of the bucket's longest.
DECODE_BUCKET_FILL = 0.75


@dataclass(frozen=True)
class PlanRow:
    """One sequence of a forward: its new token ids, the position of the first, its block table,
    and whether its last row is sampled."""

    new_token_ids: tuple[int, ...]
    start: int
    block_table: Sequence[int]  # the sequence's own table, not a copy (a plan is used at once)
    samples: bool


@dataclass(frozen=True)
class ForwardResult:
    logits: torch.Tensor  # [num sampled, vocab]
    sampled: list[ScheduledSeq]  # the entries whose rows were sampled, in logits order


class ModelRunner:
    """kv: the cache tensor of `layout` (layout.check_cache holds), on the model's device; the
    runner writes and reads it at the slots `layout.slots` gives for each sequence's block table."""

    def __init__(self, model, layout: KVLayout, kv: torch.Tensor, tp: TPGroup | None = None) -> None:
        """tp: the tensor-parallel group this runner is a rank of (the model already sharded,
        `layout` this rank's part); None: one rank."""
        layout.check_cache(kv)
        weights = next(model.parameters()).device
        if weights != kv.device:
            raise EngineError(f"the KV cache is on {kv.device} but the model's weights are on {weights}")
        self.model = model
        self.layout = layout
        self.kv = kv
        self.device = kv.device
        self.tp = tp or TPGroup.single(kv.device)
        model.config._attn_implementation = attention.register()

    @staticmethod
    def plan(batch: list[ScheduledSeq]) -> list[PlanRow]:
        """What a forward over `batch` needs of each sequence, as plain values (tensor-parallel
        followers receive it from the driver, engine/tensor_parallel.py)."""
        rows = []
        for entry in batch:
            seq, start = entry.seq, entry.seq.num_computed_tokens
            new = tuple(seq.token_ids[start : start + entry.num_new_tokens])
            rows.append(PlanRow(new, start, seq.block_table, entry.samples))
        return rows

    def build(
        self,
        batch: list[ScheduledSeq],
        on_layer_done: Callable[[int], None] | None = None,
        sparse: object | None = None,
        select: SelectionPlan | None = None,
    ):
        return self.build_plan(self.plan(batch), on_layer_done, sparse, select)

    def build_plan(
        self,
        plan: list[PlanRow],
        on_layer_done: Callable[[int], None] | None = None,
        sparse: object | None = None,
        select: SelectionPlan | None = None,
    ):
        """select: the forward's decode-side KV selection; its selected and quest rows attend
        over their kept blocks (engine/attention.py), not in the dense decode buckets."""
        own = set()
        if select is not None:
            own = {r.row for r in select.quest}
            if select.selected is not None:
                own.update(select.selected.host_rows)
        # Token ids, positions and slots are gathered as Python ints and become one tensor each:
        # per-sequence tensor ops would cost more than the ints for a batch of decode rows.
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        prefills: list[attention.PrefillSegment] = []
        decodes: list[tuple[int, int, Sequence[int]]] = []  # (packed row, context length, block table)
        row = 0
        for entry in plan:
            n, start, table = len(entry.new_token_ids), entry.start, entry.block_table
            end = start + n
            ids.extend(entry.new_token_ids)
            positions.extend(range(start, end))
            slots.extend(self.layout.slots(table, start, end))
            if n == 1 and start > 0:
                if row not in own:
                    decodes.append((row, end, table))
            else:
                ctx = None if start == 0 else self._tensor(self.layout.slots(table, 0, end))
                prefills.append(attention.PrefillSegment(row, n, end, ctx))
            row += n
        meta = attention.AttentionMetadata(
            kv=self.kv,
            slot_mapping=self._tensor(slots),
            prefills=prefills,
            decodes=self._decode_buckets(decodes),
            on_layer_done=on_layer_done,
            sparse=sparse,
            select=select,
        )
        return self._tensor(ids), self._tensor(positions), meta

    def _tensor(self, values: list[int]) -> torch.Tensor:
        """A long tensor of host ints on the runner's device (one host-to-device copy)."""
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _decode_buckets(self, decodes: list[tuple[int, int, Sequence[int]]]) -> list[attention.DecodeBucket]:
        """Group decode rows by context length so that padding stays a bounded share of the gather.

        Rows are taken longest first; a bucket accepts a row while the row's context is at least
        DECODE_BUCKET_FILL of the bucket's longest (so at most ~1/4 of a bucket's gathered K/V is
        padding), and a new bucket starts otherwise. Each bucket costs one SDPA call per layer.
        """
        bs = self.layout.block_size
        buckets, group = [], []
        for entry in sorted(decodes, key=lambda e: -e[1]):
            if group and entry[1] < DECODE_BUCKET_FILL * group[0][1]:
                buckets.append(group)
                group = []
            group.append(entry)
        if group:
            buckets.append(group)
        out: list[attention.DecodeBucket] = []
        for group in buckets:
            nb = -(-group[0][1] // bs)
            blocks: list[int] = []
            for _, length, table in group:
                used = table[: -(-length // bs)]
                blocks.extend(used)
                blocks.extend([0] * (nb - len(used)))
            lengths = self._tensor([length for _, length, _ in group])
            mask = (torch.arange(nb * bs, device=self.device)[None, :] < lengths[:, None])[:, None, None, :]
            out.append(attention.DecodeBucket(self._tensor([r for r, _, _ in group]), self._tensor(blocks), mask))
        return out

    @torch.inference_mode()
    def forward(
        self,
        batch: list[ScheduledSeq],
        on_layer_done: Callable[[int], None] | None = None,
        sparse: object | None = None,
        inputs_embeds: torch.Tensor | None = None,
        extra: object = None,
        select: SelectionPlan | None = None,
    ) -> ForwardResult:
        plan = self.plan(batch)
        logits = self.forward_plan(plan, on_layer_done, sparse, inputs_embeds, extra, select)
        return ForwardResult(logits, [entry for entry, p in zip(batch, plan) if p.samples])

    @torch.inference_mode()
    def forward_plan(
        self,
        plan: list[PlanRow],
        on_layer_done: Callable[[int], None] | None = None,
        sparse: object | None = None,
        inputs_embeds: torch.Tensor | None = None,
        extra: object = None,
        select: SelectionPlan | None = None,
    ) -> torch.Tensor:
        """The float logits [sampled rows, vocab] of a forward over `plan` (the sampled rows in
        plan order); a tensor-parallel driver has its followers run the same forward (`extra`
        goes with the plan to them: what else they do with it, tensor_parallel.follow)."""
        self.tp.broadcast_plan((plan, sparse, extra), inputs_embeds)
        hidden = self._hidden(plan, on_layer_done, sparse, inputs_embeds, select)
        ends, row = [], 0
        for p in plan:
            row += len(p.new_token_ids)
            if p.samples:
                ends.append(row - 1)
        logits = self.model.lm_head(hidden[self._tensor(ends)]) if ends else hidden.new_empty(0, 0)
        return logits.float()

    @torch.inference_mode()
    def run_plan(
        self,
        plan: list[PlanRow],
        sparse: object,
        inputs_embeds: torch.Tensor | None,
        on_layer_done: Callable[[int], None] | None = None,
    ) -> None:
        """A tensor-parallel follower's part of the driver's forward (engine/tensor_parallel.py):
        the same layers on this rank's heads and cache; the driver samples."""
        self._hidden(plan, on_layer_done, sparse, inputs_embeds)

    def _hidden(self, plan, on_layer_done, sparse, inputs_embeds, select=None) -> torch.Tensor:
        input_ids, positions, meta = self.build_plan(plan, on_layer_done, sparse, select)
        kwargs = {"inputs_embeds": inputs_embeds[None]} if inputs_embeds is not None else {"input_ids": input_ids[None]}
        hidden = self.model.model(position_ids=positions[None], use_cache=False, triptych_meta=meta, **kwargs)
        return hidden.last_hidden_state[0]
