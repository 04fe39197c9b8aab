"""Token sampling: greedy rows in one argmax, the others one by one with their own generator."""

from __future__ import annotations

import torch

from engine.sequence import SamplingParams


class Sampler:
    def __init__(self) -> None:
        self._generators: dict[str, torch.Generator] = {}

    def _generator(self, request_id: str, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        gen = self._generators.get(request_id)
        if gen is None:
            gen = torch.Generator().manual_seed(seed)
            self._generators[request_id] = gen
        return gen

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def sample(self, logits: torch.Tensor, request_ids: list[str], params: list[SamplingParams]) -> list[int]:
        """logits [N, V] float → N token ids."""
        if not params:
            return []
        out = logits.argmax(dim=-1).tolist()
        for i, p in enumerate(params):
            if p.greedy:
                continue
            row = logits[i].float() / p.temperature
            if p.top_k > 0 and p.top_k < row.numel():
                kth = torch.topk(row, p.top_k).values[-1]
                row = row.masked_fill(row < kth, float("-inf"))
            if p.top_p < 1.0:
                sorted_logits, order = torch.sort(row, descending=True)
                cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
                # drop a token once the mass before it already reaches top_p (the top token stays)
                drop = cum - torch.softmax(sorted_logits, dim=-1) >= p.top_p
                row = row.scatter(0, order[drop], float("-inf"))
            probs = torch.softmax(row, dim=-1)
            out[i] = int(torch.multinomial(probs, 1, generator=self._generator(request_ids[i], p.seed)).item())
        return out
