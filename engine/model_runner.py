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
from typing import Callable

import torch

from engine import attention
from engine.errors import EngineError
from engine.kv_layout import KVLayout
from engine.scheduler import ScheduledSeq

# A decode bucket takes a row whose context is at least this share of the bucket's longest.
DECODE_BUCKET_FILL = 0.75


@dataclass(frozen=True)
class ForwardResult:
    logits: torch.Tensor  # [num sampled, vocab]
    sampled: list[ScheduledSeq]  # the entries whose rows were sampled, in logits order


class ModelRunner:
    """kv: the cache tensor of `layout` (layout.check_cache holds), on the model's device; the
    runner writes and reads it at the slots `layout.slots` gives for each sequence's block table."""

    def __init__(self, model, layout: KVLayout, kv: torch.Tensor) -> None:
        layout.check_cache(kv)
        weights = next(model.parameters()).device
        if weights != kv.device:
            raise EngineError(f"the KV cache is on {kv.device} but the model's weights are on {weights}")
        self.model = model
        self.layout = layout
        self.kv = kv
        self.device = kv.device
        model.config._attn_implementation = attention.register()

    def build(
        self,
        batch: list[ScheduledSeq],
        on_layer_done: Callable[[int], None] | None = None,
        sparse: object | None = None,
    ):
        # Token ids, positions and slots are gathered as Python ints and become one tensor each:
        # per-sequence tensor ops would cost more than the ints for a batch of decode rows.
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        prefills: list[attention.PrefillSegment] = []
        decodes: list[tuple[int, int, list[int]]] = []  # (packed row, context length, block table)
        row = 0
        for entry in batch:
            seq, n = entry.seq, entry.num_new_tokens
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            table = seq.block_table
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(self.layout.slots(table, start, end))
            if n == 1 and start > 0:
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
        )
        return self._tensor(ids), self._tensor(positions), meta

    def _tensor(self, values: list[int]) -> torch.Tensor:
        """A long tensor of host ints on the runner's device (one host-to-device copy)."""
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _decode_buckets(self, decodes: list[tuple[int, int, list[int]]]) -> list[attention.DecodeBucket]:
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
        out = []
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
    ) -> ForwardResult:
        input_ids, positions, meta = self.build(batch, on_layer_done, sparse)
        kwargs = {"inputs_embeds": inputs_embeds[None]} if inputs_embeds is not None else {"input_ids": input_ids[None]}
        hidden = self.model.model(position_ids=positions[None], use_cache=False, triptych_meta=meta, **kwargs)
        hidden = hidden.last_hidden_state[0]
        ends, sampled, row = [], [], 0
        for entry in batch:
            row += entry.num_new_tokens
            if entry.samples:
                ends.append(row - 1)
                sampled.append(entry)
        logits = self.model.lm_head(hidden[self._tensor(ends)]) if ends else hidden.new_empty(0, 0)
        return ForwardResult(logits.float(), sampled)
