"""Token sampling: greedy rows in one argmax, the others one by one with their own generator.

A seeded request's tokens are drawn from one stream (its seed's generator) wherever they are
sampled: a worker that continues a request whose earlier tokens were sampled elsewhere (the
decode worker after the prefill worker's first token; any worker after a re-prefill) first
`advance`s the generator past those draws. One multinomial draw over V probabilities consumes
the same random numbers whatever the probabilities are, so a draw over uniform weights of the
same size skips exactly one token's randomness (tests/unit/test_role_worker.py checks the streams
match).
"""

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

    def advance(self, request_id: str, params: SamplingParams, vocab_size: int, draws: int) -> None:
        """Skip the random numbers of `draws` tokens this request sampled elsewhere (seeded,
        non-greedy requests only: the others draw nothing or from the global generator)."""
        if params.greedy or params.seed is None or draws <= 0:
            return
        gen = self._generator(request_id, params.seed)
        uniform = torch.ones(vocab_size)
        for _ in range(draws):
            torch.multinomial(uniform, 1, generator=gen)

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
