"""Runs one packed forward over a scheduled batch and returns the logits of sampled rows.

The runner never decides policy: it is given (sequence, number of new tokens) pairs and turns
them into input ids, positions, cache slots and attention metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from engine import attention
from engine.kv_cache import KVSpec, allocate_kv_tensor
from engine.sequence import Sequence


@dataclass(frozen=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this forward completes the sequence's known tokens (so its last row is sampled)."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass(frozen=True)
class ForwardResult:
    logits: torch.Tensor           # [num sampled, vocab]
    sampled: list[ScheduledSeq]    # the entries whose rows were sampled, in logits order


class ModelRunner:
    def __init__(self, model, kv_spec: KVSpec, kv: torch.Tensor | None = None) -> None:
        self.model = model
        self.kv_spec = kv_spec
        self.kv = kv if kv is not None else allocate_kv_tensor(kv_spec)
        model.config._attn_implementation = attention.register()
        self._offsets = torch.arange(kv_spec.block_size)

    def _slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        """Cache slots of positions [start, end) of a sequence, as a LongTensor."""
        bs = self.kv_spec.block_size
        blocks = torch.tensor(block_table[start // bs: -(-end // bs)], dtype=torch.long)
        slots = (blocks[:, None] * bs + self._offsets[None, :]).flatten()
        first = start - (start // bs) * bs
        return slots[first: first + end - start]

    def build(self, batch: list[ScheduledSeq], on_layer_done: Callable[[int], None] | None = None,
              sparse: object | None = None):
        ids, positions, slot_parts = [], [], []
        prefills: list[attention.PrefillSegment] = []
        decode_rows, decode_ctx = [], []
        row = 0
        for entry in batch:
            seq, n = entry.seq, entry.num_new_tokens
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            ids.extend(seq.token_ids[start:end])
            positions.append(torch.arange(start, end))
            slot_parts.append(self._slots(seq.block_table, start, end))
            if n == 1 and start > 0:
                decode_rows.append(row)
                decode_ctx.append(self._slots(seq.block_table, 0, end))
            else:
                ctx = None if start == 0 else self._slots(seq.block_table, 0, end)
                prefills.append(attention.PrefillSegment(row, n, end, ctx))
            row += n
        meta = attention.AttentionMetadata(
            kv=self.kv,
            slot_mapping=torch.cat(slot_parts),
            prefills=prefills,
            decode_rows=None, decode_slots=None, decode_mask=None,
            on_layer_done=on_layer_done,
            sparse=sparse,
        )
        if decode_rows:
            lengths = torch.tensor([c.numel() for c in decode_ctx])
            meta.decode_rows = torch.tensor(decode_rows)
            meta.decode_slots = torch.nn.utils.rnn.pad_sequence(decode_ctx, batch_first=True)
            meta.decode_mask = (torch.arange(meta.decode_slots.shape[1])[None, :] < lengths[:, None])[:, None, None, :]
        return torch.tensor(ids, dtype=torch.long), torch.cat(positions), meta

    @torch.inference_mode()
    def forward(self, batch: list[ScheduledSeq], on_layer_done: Callable[[int], None] | None = None,
                sparse: object | None = None, inputs_embeds: torch.Tensor | None = None) -> ForwardResult:
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
        logits = self.model.lm_head(hidden[torch.tensor(ends, dtype=torch.long)]) if ends else hidden.new_empty(0, 0)
        return ForwardResult(logits.float(), sampled)
