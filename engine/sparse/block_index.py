"""The block index: which key blocks each (query head, query block) attends to.

Geometry (one sequence, block size B, Lk keys, Lq = Lk - q_offset queries):

    absolute position p      0 ............ q_offset ................. Lk-1
    keys                     [=================================================]
    queries (row i = p - q_offset)          [==================================]
    key block kb             p // B, kb in [0, NKB),  NKB = ceil(Lk / B)
    query block j            absolute block (q_offset // B) + j, j in [0, NQB),
                             NQB = NKB - q_offset // B

Query blocks are aligned to ABSOLUTE positions, so the first one may be partial (rows before
q_offset do not exist) and block-level causality is simply kb <= q_offset // B + j. The causal
mask inside the diagonal block is applied by the kernels, not encoded here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def num_key_blocks(kv_len: int, block_size: int) -> int:
    return -(-kv_len // block_size)


def num_query_blocks(q_offset: int, kv_len: int, block_size: int) -> int:
    return num_key_blocks(kv_len, block_size) - q_offset // block_size


def causal_block_mask(q_offset: int, kv_len: int, block_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """bool [NQB, NKB]: True where key block kb is not entirely in the future of query block j."""
    nkb = num_key_blocks(kv_len, block_size)
    first = q_offset // block_size
    qb = torch.arange(first, nkb, device=device)
    kb = torch.arange(nkb, device=device)
    return kb[None, :] <= qb[:, None]


@dataclass(frozen=True)
class BlockIndex:
    """Padded per-row lists of key block ids.

    block_ids: int32 [Hq, NQB, MAXK]; entries [h, j, :counts[h, j]] are distinct key block ids in
               ascending order, all causal (kb <= q_offset // B + j); the rest is padding (0).
    counts:    int32 [Hq, NQB], 0 <= counts <= MAXK.
    A row whose list is empty, or whose rows see no causal key in it, yields output 0.
    """

    block_ids: torch.Tensor
    counts: torch.Tensor
    block_size: int
    q_offset: int
    kv_len: int

    def __post_init__(self) -> None:
        h, nqb, _ = self.block_ids.shape
        if self.counts.shape != (h, nqb):
            raise ValueError(f"counts shape {tuple(self.counts.shape)} != {(h, nqb)}")
        if nqb != num_query_blocks(self.q_offset, self.kv_len, self.block_size):
            raise ValueError(
                f"index has {nqb} query blocks, geometry needs "
                f"{num_query_blocks(self.q_offset, self.kv_len, self.block_size)}"
            )

    @property
    def num_heads(self) -> int:
        return self.block_ids.shape[0]

    @property
    def first_q_block(self) -> int:
        return self.q_offset // self.block_size

    @classmethod
    def from_mask(cls, mask: torch.Tensor, block_size: int, q_offset: int, kv_len: int) -> "BlockIndex":
        """mask: bool [Hq, NQB, NKB]; non-causal entries are dropped."""
        nqb, nkb = mask.shape[1:]
        causal = causal_block_mask(q_offset, kv_len, block_size, mask.device)
        if causal.shape != (nqb, nkb):
            raise ValueError(f"mask shape {tuple(mask.shape[1:])} != {tuple(causal.shape)}")
        mask = mask & causal
        counts = mask.sum(-1, dtype=torch.int32)
        maxk = max(int(counts.max().item()), 1)
        kb = torch.arange(nkb, device=mask.device, dtype=torch.int32)
        # Selected ids sort first (ascending), unselected ones after them.
        key = torch.where(mask, kb, kb + nkb)
        ids = torch.topk(key, maxk, dim=-1, largest=False, sorted=True).values
        ids = torch.where(ids < nkb, ids, torch.zeros_like(ids))
        return cls(ids.to(torch.int32).contiguous(), counts.contiguous(), block_size, q_offset, kv_len)

    def to_mask(self) -> torch.Tensor:
        """bool [Hq, NQB, NKB]."""
        h, nqb, maxk = self.block_ids.shape
        nkb = num_key_blocks(self.kv_len, self.block_size)
        valid = torch.arange(maxk, device=self.counts.device) < self.counts[..., None]
        mask = torch.zeros(h, nqb, nkb + 1, dtype=torch.bool, device=self.counts.device)
        ids = torch.where(valid, self.block_ids.long(), nkb)
        mask.scatter_(-1, ids, True)
        return mask[..., :nkb]

    def density(self) -> float:
        """Fraction of causal (head, query block, key block) triples that are computed."""
        causal = causal_block_mask(self.q_offset, self.kv_len, self.block_size, self.counts.device)
        total = causal.sum().item() * self.num_heads
        return float(self.counts.sum().item()) / max(total, 1)

    def token_mask(self) -> torch.Tensor:
        """bool [Hq, Lq, Lk]: the exact (query row, key) pairs computed, causal included."""
        b = self.block_size
        pos = torch.arange(self.q_offset, self.kv_len, device=self.counts.device)
        keys = torch.arange(self.kv_len, device=self.counts.device)
        rows = self.to_mask()[:, pos // b - self.first_q_block]  # [Hq, Lq, NKB]
        allowed = rows[..., keys // b]  # [Hq, Lq, Lk]
        return allowed & (keys[None, None, :] <= pos[None, :, None])

    def computed_pairs(self) -> int:
        """Number of causal (query row, key) pairs the index computes, summed over heads."""
        b = self.block_size
        nkb = num_key_blocks(self.kv_len, b)
        first = self.first_q_block
        dev = self.counts.device
        pos = torch.arange(self.q_offset, self.kv_len, device=dev)
        rows = torch.zeros(nkb, device=dev, dtype=torch.float64).index_add_(
            0, pos // b, torch.ones_like(pos, dtype=torch.float64)
        )[first:]  # [NQB]
        diag = torch.zeros(nkb, device=dev, dtype=torch.float64).index_add_(0, pos // b, (pos % b + 1).double())[
            first:
        ]  # [NQB]
        keys = torch.clamp(self.kv_len - torch.arange(nkb, device=dev) * b, max=b).double()
        cell = rows[:, None] * keys[None, :]  # [NQB, NKB]
        idx = torch.arange(cell.shape[0], device=dev)
        cell[idx, idx + first] = diag
        cell = cell * causal_block_mask(self.q_offset, self.kv_len, b, dev)
        return int((self.to_mask().double() * cell).sum().item())
